//! Child processes that never outlive the test that started them.
//!
//! A test can end by a panic, a timeout or a SIGKILL of the whole test binary, and Rust
//! never runs destructors of statics (the shared cluster is one). So besides killing on
//! drop, every child is started with `PR_SET_PDEATHSIG`: the kernel sends it SIGKILL when
//! its parent *thread* exits. That is why children are spawned from one dedicated thread
//! that lives as long as the process, not from whichever (pool) thread asked.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::ClusterError;

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

fn spawner() -> &'static Mutex<mpsc::Sender<SpawnRequest>> {
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("gar-testsupport-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
                // The senders live in a static, so this loop never ends before the process.
                loop {
                    std::thread::park();
                }
            })
            .map(|_| ())
            .unwrap_or_else(|e| panic!("cannot start the process spawner thread: {e}"));
        Mutex::new(tx)
    })
}

/// Spawns `cmd` from the spawner thread with `PR_SET_PDEATHSIG`, so that the child is
/// SIGKILLed when this process exits, however it exits. Also used for the daemon
/// ([`crate::daemon`]).
pub(crate) fn spawn_tied(mut cmd: Command) -> std::io::Result<Child> {
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let gone = || std::io::Error::other("the process spawner thread is gone");
    let (tx, rx) = mpsc::channel();
    spawner()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, tx))
        .map_err(|_| gone())?;
    rx.recv().map_err(|_| gone())?
}

/// SIGTERM, then waits up to `grace` for the exit: `Some(status)` if it came (or had come
/// already), `None` if the child had to be SIGKILLed.
pub(crate) fn terminate(child: &mut Child, grace: Duration) -> Option<ExitStatus> {
    if let Ok(Some(status)) = child.try_wait() {
        return Some(status);
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: plain syscall on a pid we own and have not reaped.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + grace;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A running control-plane process, its name and its log file.
#[derive(Debug)]
pub struct Process {
    pub name: &'static str,
    pub log: PathBuf,
    child: Option<Child>,
}

impl Process {
    /// Starts `bin args…` with stdout and stderr to `log`, tied to this process's life.
    pub fn spawn(
        name: &'static str,
        bin: &Path,
        args: &[String],
        log: PathBuf,
    ) -> Result<Process, ClusterError> {
        let setup = |e: std::io::Error| {
            ClusterError::Setup(format!("cannot start {name} ({}): {e}", bin.display()))
        };
        let out = File::create(&log).map_err(setup)?;
        let err = out.try_clone().map_err(setup)?;
        let mut cmd = Command::new(bin);
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
        let child = spawn_tied(cmd).map_err(setup)?;
        Ok(Process {
            name,
            log,
            child: Some(child),
        })
    }

    /// The process id, while it runs.
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// `Some(status)` once the process has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// The last `max` bytes of the log, for error messages.
    pub fn log_tail(&self, max: usize) -> String {
        let text = std::fs::read(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(max);
        String::from_utf8_lossy(&text[start..]).into_owned()
    }

    /// SIGTERM, then SIGKILL after `grace`; waits for the exit either way.
    pub fn stop(&mut self, grace: Duration) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child, grace);
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        // A test cluster's state is thrown away with it: a short grace is enough for the
        // process to exit by itself, and a slow shutdown would be paid by every test.
        self.stop(Duration::from_secs(2));
    }
}

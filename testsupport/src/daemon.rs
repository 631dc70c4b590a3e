//! The `gar-restarter run` process, as the integration tests, `cargo xtask demo` and
//! `cargo xtask bench` run it: spawned with its flags and environment, logging to a file,
//! waited for until `/readyz` answers 200, scraped, and stopped by SIGTERM or SIGKILL.
//!
//! Like the control plane's processes ([`crate::cluster::process`]), the daemon is killed
//! when the process that started it exits, however it exits.

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::cluster::process::{spawn_tied, terminate};

/// The ConfigMap every harness gives the daemon for its index cache.
pub const CACHE_CONFIGMAP: &str = "gar-restarter/gar-restarter-cache";

/// How often [`Daemon::wait_ready`] asks `/readyz`.
pub const READY_POLL: Duration = Duration::from_millis(50);

/// A free loopback address (bound and released; the caller binds it soon after).
pub fn free_addr() -> io::Result<SocketAddr> {
    TcpListener::bind("127.0.0.1:0")?.local_addr()
}

/// Everything `gar-restarter run` is started with.
#[derive(Debug, Clone)]
pub struct DaemonSpec {
    pub binary: PathBuf,
    /// `PUBSUB_EMULATOR_HOST`.
    pub pubsub_host: String,
    /// `projects/P/subscriptions/S`.
    pub subscription: String,
    /// `projects/P/topics/T`.
    pub dead_letter_topic: String,
    pub kubeconfig: PathBuf,
    pub cache_dir: PathBuf,
    pub metrics_addr: SocketAddr,
    /// stdout and stderr are appended to it, so restarts of one daemon share one log.
    pub log: PathBuf,
    /// `RUST_LOG`.
    pub log_filter: String,
    /// Flags after the standard ones; a repeated flag wins over the standard one.
    pub args: Vec<String>,
    /// Environment set last, over the standard variables.
    pub env: Vec<(String, String)>,
}

impl DaemonSpec {
    /// The command [`Daemon::spawn`] runs. The log is in the text format without colours;
    /// the caller's `GAR_RESTARTER_*` settings and OTLP endpoint do not reach the daemon.
    pub fn command(&self) -> io::Result<Command> {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("run")
            .arg("--subscription")
            .arg(&self.subscription)
            .arg("--dead-letter-topic")
            .arg(&self.dead_letter_topic)
            .arg("--metrics-addr")
            .arg(self.metrics_addr.to_string())
            .arg("--cache-dir")
            .arg(&self.cache_dir)
            .arg("--cache-configmap")
            .arg(CACHE_CONFIGMAP)
            .arg("--log-format")
            .arg("text")
            .args(&self.args);
        let inherited: Vec<OsString> = std::env::vars_os()
            .map(|(key, _)| key)
            .filter(|key| key.to_string_lossy().starts_with("GAR_RESTARTER_"))
            .collect();
        for key in inherited {
            cmd.env_remove(key);
        }
        cmd.env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env("PUBSUB_EMULATOR_HOST", &self.pubsub_host)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", &self.log_filter)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::from(append(&self.log)?))
            .stderr(Stdio::from(append(&self.log)?));
        Ok(cmd)
    }
}

fn append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

/// Why [`Daemon::wait_ready`] gave up.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("the daemon exited during start-up ({0})")]
    Exited(ExitStatus),
    #[error("the daemon was not ready within {0:?}")]
    NotReady(Duration),
}

/// A running `gar-restarter run`; SIGKILLed on drop.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    metrics_addr: SocketAddr,
    log: PathBuf,
    spawned_at: Instant,
}

impl Daemon {
    /// Starts the daemon; it is not ready yet ([`Daemon::wait_ready`]).
    pub fn spawn(spec: &DaemonSpec) -> io::Result<Daemon> {
        let cmd = spec.command()?;
        let spawned_at = Instant::now();
        let child = spawn_tied(cmd)?;
        Ok(Daemon {
            child: Some(child),
            metrics_addr: spec.metrics_addr,
            log: spec.log.clone(),
            spawned_at,
        })
    }

    /// The process id, until it is stopped.
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn metrics_addr(&self) -> SocketAddr {
        self.metrics_addr
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The whole log so far (empty if there is none yet).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `Some(status)` once the process has exited by itself.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Waits until `/readyz` answers 200, asking every [`READY_POLL`]; returns the time
    /// since the spawn.
    pub async fn wait_ready(&mut self, timeout: Duration) -> Result<Duration, DaemonError> {
        self.wait_ready_polling(timeout, READY_POLL).await
    }

    /// [`Daemon::wait_ready`], asking every `poll` (the bench measures start-up with it).
    pub async fn wait_ready_polling(
        &mut self,
        timeout: Duration,
        poll: Duration,
    ) -> Result<Duration, DaemonError> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Err(DaemonError::Exited(status));
            }
            if let Some((200, _)) = crate::http::get_status_body(self.metrics_addr, "/readyz") {
                return Ok(self.spawned_at.elapsed());
            }
            if Instant::now() > deadline {
                return Err(DaemonError::NotReady(timeout));
            }
            tokio::time::sleep(poll).await;
        }
    }

    /// The `/metrics` page; empty when nothing answers.
    pub fn metrics(&self) -> String {
        crate::metrics::scrape(self.metrics_addr)
    }

    /// The value of one series of `/metrics` (see [`crate::metrics::value`]).
    pub fn metric(&self, series: &str) -> f64 {
        crate::metrics::value(&self.metrics(), series)
    }

    /// SIGTERM, then waits up to `timeout`: the exit status, or `None` if it had to be
    /// SIGKILLed (or was stopped already). Blocks the calling thread.
    pub fn terminate(&mut self, timeout: Duration) -> Option<ExitStatus> {
        terminate(&mut self.child.take()?, timeout)
    }

    /// SIGKILL, without a drain; waits for the exit.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill();
    }
}

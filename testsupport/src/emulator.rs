//! Launcher for the Pub/Sub emulator used by the tests: Google's in-memory fake
//! `cloud.google.com/go/pubsub/pstest`, wrapped in a tiny Go `main`
//! (`testsupport/pstest/main.go`) that serves it over gRPC.
//!
//! The binary is built on first use from its Go module (`testsupport/pstest`, pinned to
//! `cloud.google.com/go/pubsub/v2`) and cached outside the clone by [`crate::gotool`].
//!
//! ```no_run
//! # async fn demo() -> Result<(), gar_testsupport::emulator::EmulatorError> {
//! use gar_testsupport::emulator::Emulator;
//! let emu = Emulator::start("p", &["gar"], &[("gar-sub", "gar")]).await?;
//! let host = emu.host(); // "127.0.0.1:PORT", the value for PUBSUB_EMULATOR_HOST
//! assert_eq!(emu.subscription("gar-sub"), "projects/p/subscriptions/gar-sub");
//! # let _ = host;
//! # Ok(())
//! # }
//! ```
//!
//! Behaviour worth knowing (pstest v2.9): message ids are `m0, m1, ...`;
//! `delivery_attempt` is set only on subscriptions with a dead-letter policy
//! ([`Emulator::start_with`]), which also forwards a message to the dead-letter topic
//! after that many deliveries, as Pub/Sub does; ack deadlines below 10 s are
//! rejected; a StreamingPull stream gets at most one message per 10 ms tick; all
//! state is in memory, so a restarted emulator only has the topics and
//! subscriptions given on its command line. The wrapper turns the one remaining
//! crash (mismatched modify-deadline lists on a stream) into a gRPC error.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use crate::gotool::{self, GoToolError};

/// How long a started emulator gets to print its `READY` line (the build, if
/// one is needed, is not counted).
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Environment variable naming a prebuilt pstest binary; skips the build.
pub const PSTEST_BIN_ENV: &str = "GAR_PSTEST_BIN";
/// Set this environment variable to keep the emulator logs of passing tests too.
pub const KEEP_LOGS_ENV: &str = "GAR_PSTEST_KEEP_LOGS";

#[derive(Debug, thiserror::Error)]
pub enum EmulatorError {
    #[error(transparent)]
    Build(#[from] GoToolError),
    #[error("{context}: {error}")]
    Io {
        context: String,
        #[source]
        error: io::Error,
    },
    #[error("pstest emulator on {addr} failed to start: {reason}\n--- {} ---\n{log_tail}", .log.display())]
    Startup {
        addr: String,
        reason: String,
        log: PathBuf,
        log_tail: String,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> EmulatorError {
    let context = context.into();
    move |error| EmulatorError::Io { context, error }
}

/// What the emulator was started with, kept for [`Emulator::restart`].
#[derive(Debug, Clone)]
struct Config {
    project: String,
    topics: Vec<String>,
    subscriptions: Vec<(String, String)>,
    /// `(subscription, dead-letter topic, max delivery attempts)`.
    dead_letters: Vec<(String, String, u32)>,
}

impl Config {
    fn new(
        project: &str,
        topics: &[&str],
        subscriptions: &[(&str, &str)],
        dead_letters: &[(&str, &str, u32)],
    ) -> Config {
        Config {
            project: project.to_owned(),
            topics: topics.iter().map(|t| (*t).to_owned()).collect(),
            subscriptions: subscriptions
                .iter()
                .map(|(s, t)| ((*s).to_owned(), (*t).to_owned()))
                .collect(),
            dead_letters: dead_letters
                .iter()
                .map(|(s, t, n)| ((*s).to_owned(), (*t).to_owned(), *n))
                .collect(),
        }
    }
}

/// A running pstest emulator. The child process is killed when this is dropped
/// (and it also exits on its own when the test process dies, via stdin EOF).
#[derive(Debug)]
pub struct Emulator {
    child: Option<Child>,
    /// Held open on purpose: the emulator runs with `-exit-on-stdin-eof`.
    stdin: Option<ChildStdin>,
    addr: SocketAddr,
    config: Config,
    log_path: PathBuf,
}

impl Emulator {
    /// Builds pstest if needed and starts it on `127.0.0.1` with a port chosen
    /// by the kernel (reported back by the emulator, so there is no
    /// pick-then-bind race). `topics` and `subscriptions` (`(name, topic)`)
    /// take short names (qualified with `project`) or full resource names.
    pub async fn start(
        project: &str,
        topics: &[&str],
        subscriptions: &[(&str, &str)],
    ) -> Result<Emulator, EmulatorError> {
        Self::start_on("127.0.0.1:0", project, topics, subscriptions).await
    }

    /// Like [`Emulator::start`] on a fixed address, e.g. to bring the emulator
    /// back on the same port after [`Emulator::kill`]. A port that is still
    /// in use is retried for up to 5 s before giving up.
    pub async fn start_on(
        addr: &str,
        project: &str,
        topics: &[&str],
        subscriptions: &[(&str, &str)],
    ) -> Result<Emulator, EmulatorError> {
        let config = Config::new(project, topics, subscriptions, &[]);
        Self::start_config(addr, config).await
    }

    /// Like [`Emulator::start`], with a Pub/Sub dead-letter policy on some subscriptions:
    /// `(subscription, dead-letter topic, max delivery attempts)`. Those subscriptions count
    /// deliveries and set `delivery_attempt`, and forward a message to the dead-letter
    /// topic after that many, as Pub/Sub does.
    pub async fn start_with_dead_letters(
        project: &str,
        topics: &[&str],
        subscriptions: &[(&str, &str)],
        dead_letters: &[(&str, &str, u32)],
    ) -> Result<Emulator, EmulatorError> {
        let config = Config::new(project, topics, subscriptions, dead_letters);
        Self::start_config("127.0.0.1:0", config).await
    }

    async fn start_config(addr: &str, config: Config) -> Result<Emulator, EmulatorError> {
        let addr = addr.to_owned();
        tokio::task::spawn_blocking(move || Self::spawn(&addr, config, None))
            .await
            .map_err(|e| EmulatorError::Io {
                context: "pstest start task failed".into(),
                error: io::Error::other(e.to_string()),
            })?
    }

    /// Blocking variant of [`Emulator::start_on`], for callers without a Tokio
    /// runtime (e.g. xtask). Use `"127.0.0.1:0"` for a free port.
    pub fn start_on_blocking(
        addr: &str,
        project: &str,
        topics: &[&str],
        subscriptions: &[(&str, &str)],
    ) -> Result<Emulator, EmulatorError> {
        let config = Config::new(project, topics, subscriptions, &[]);
        Self::spawn(addr, config, None)
    }

    /// `"127.0.0.1:PORT"`: the value for `PUBSUB_EMULATOR_HOST`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `"http://127.0.0.1:PORT"`, for clients that want an endpoint URL.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn project(&self) -> &str {
        &self.config.project
    }

    /// Full resource name of a topic: `projects/<project>/topics/<name>`.
    pub fn topic(&self, name: &str) -> String {
        qualify(&self.config.project, "topics", name)
    }

    /// Full resource name of a subscription:
    /// `projects/<project>/subscriptions/<name>`.
    pub fn subscription(&self, name: &str) -> String {
        qualify(&self.config.project, "subscriptions", name)
    }

    /// The emulator's stderr (one file per `Emulator`, appended to across
    /// restarts). Deleted on drop unless the thread is panicking or
    /// `GAR_PSTEST_KEEP_LOGS` is set.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Whether the child process is still alive.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.as_mut().map(Child::try_wait), Some(Ok(None)))
    }

    /// SIGKILLs the emulator and reaps it; all its state is lost. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        self.stdin = None;
    }

    /// Kills the emulator (if still running) and starts a fresh one on the
    /// same address with the same project, topics and subscriptions.
    pub async fn restart(&mut self) -> Result<(), EmulatorError> {
        self.kill();
        let addr = self.addr.to_string();
        let config = self.config.clone();
        let log = self.log_path.clone();
        let mut fresh = tokio::task::spawn_blocking(move || Self::spawn(&addr, config, Some(log)))
            .await
            .map_err(|e| EmulatorError::Io {
                context: "pstest restart task failed".into(),
                error: io::Error::other(e.to_string()),
            })??;
        // Take over the new child; `fresh` shares our log file, which its Drop
        // must not delete (an empty log path tells Drop to leave it alone).
        self.child = fresh.child.take();
        self.stdin = fresh.stdin.take();
        self.addr = fresh.addr;
        fresh.log_path = PathBuf::new();
        Ok(())
    }

    fn spawn(addr: &str, config: Config, log: Option<PathBuf>) -> Result<Emulator, EmulatorError> {
        let bin = build_pstest()?;
        let log_path = match log {
            Some(log) => log,
            None => new_log_path()?,
        };
        let log_file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io_err(format!("cannot open {}", log_path.display())))?;
        let log_start = log_file.metadata().map(|m| m.len()).unwrap_or(0);

        let mut cmd = Command::new(&bin);
        cmd.arg("-addr")
            .arg(addr)
            .arg("-project")
            .arg(&config.project)
            .arg("-exit-on-stdin-eof")
            .arg("-v");
        for topic in &config.topics {
            cmd.arg("-topic").arg(topic);
        }
        for (sub, topic) in &config.subscriptions {
            let policy = config
                .dead_letters
                .iter()
                .find(|(s, _, _)| s == sub)
                .map(|(_, dlq, max)| format!(",dead-letter={dlq}:{max}"))
                .unwrap_or_default();
            cmd.arg("-subscription")
                .arg(format!("{sub}={topic}{policy}"));
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file));
        let mut child = cmd
            .spawn()
            .map_err(io_err(format!("cannot run {}", bin.display())))?;
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("stdout is piped");

        // Wait for the READY line on a thread that then keeps draining stdout
        // until the child exits, so the pipe can never fill up or break.
        let (tx, rx) = mpsc::channel::<Result<String, String>>();
        std::thread::Builder::new()
            .name("pstest-stdout".into())
            .spawn(move || {
                let mut tx = Some(tx);
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if let Some(ready) = line.strip_prefix("READY ")
                        && let Some(tx) = tx.take()
                    {
                        let _ = tx.send(Ok(ready.trim().to_owned()));
                    }
                }
                if let Some(tx) = tx {
                    let _ = tx.send(Err("the emulator exited before printing READY".into()));
                }
            })
            .map_err(io_err("cannot spawn the pstest stdout reader thread"))?;

        let fail = |child: &mut Child, reason: String| {
            let _ = child.kill();
            let status = child.wait().map(|s| s.to_string()).unwrap_or_default();
            EmulatorError::Startup {
                addr: addr.to_owned(),
                reason: format!("{reason} (process {status})"),
                log: log_path.clone(),
                log_tail: read_log_tail(&log_path, log_start),
            }
        };
        let ready = match rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(ready)) => ready,
            Ok(Err(reason)) => return Err(fail(&mut child, reason)),
            Err(_) => {
                return Err(fail(
                    &mut child,
                    format!("no READY line within {START_TIMEOUT:?}"),
                ));
            }
        };
        let addr: SocketAddr = match ready.parse() {
            Ok(a) => a,
            Err(e) => {
                return Err(fail(
                    &mut child,
                    format!("bad READY address {ready:?}: {e}"),
                ));
            }
        };
        Ok(Emulator {
            child: Some(child),
            stdin,
            addr,
            config,
            log_path,
        })
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.kill();
        if self.log_path.as_os_str().is_empty() {
            return;
        }
        if std::thread::panicking() || std::env::var_os(KEEP_LOGS_ENV).is_some() {
            eprintln!("pstest emulator log kept at {}", self.log_path.display());
        } else {
            let _ = fs::remove_file(&self.log_path);
        }
    }
}

fn qualify(project: &str, kind: &str, name: &str) -> String {
    if name.contains('/') {
        name.to_owned()
    } else {
        format!("projects/{project}/{kind}/{name}")
    }
}

fn read_log_tail(path: &Path, from: u64) -> String {
    const MAX: u64 = 8 * 1024;
    let Ok(mut f) = File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = from.max(len.saturating_sub(MAX));
    let mut buf = Vec::new();
    let _ = f.seek(SeekFrom::Start(start));
    let _ = f.take(MAX).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

fn new_log_path() -> Result<PathBuf, EmulatorError> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = logs_dir();
    fs::create_dir_all(&dir).map_err(io_err(format!("cannot create {}", dir.display())))?;
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    Ok(dir.join(format!("pstest-{}-{seq}.log", std::process::id())))
}

/// The workspace root (the parent of the `testsupport` crate).
pub fn find_repo_root() -> PathBuf {
    gotool::repo_root()
}

/// Where emulator logs go: `$CARGO_TARGET_DIR/pstest-logs`, else `<repo>/target/pstest-logs`.
pub fn logs_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .or_else(|| option_env!("CARGO_TARGET_DIR").map(PathBuf::from))
        .map(|t| {
            if t.is_absolute() {
                t
            } else {
                find_repo_root().join(t)
            }
        })
        .unwrap_or_else(|| find_repo_root().join("target"));
    target.join("pstest-logs")
}

/// Builds the emulator binary if no up-to-date one is cached and returns its
/// path. Honours `GAR_PSTEST_BIN`.
pub fn build_pstest() -> Result<PathBuf, EmulatorError> {
    if let Some(bin) = std::env::var_os(PSTEST_BIN_ENV) {
        return Ok(PathBuf::from(bin));
    }
    Ok(gotool::PSTEST.binary("pstest")?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// Sends the HTTP/2 client preface and an empty SETTINGS frame and expects
    /// the server's SETTINGS frame back: proves a gRPC (HTTP/2) server answers.
    async fn assert_speaks_http2(host: &str) {
        let mut s = TcpStream::connect(host)
            .await
            .unwrap_or_else(|e| panic!("connect {host}: {e}"));
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            .await
            .unwrap();
        s.write_all(&[0, 0, 0, 0x4, 0, 0, 0, 0, 0]).await.unwrap();
        let mut header = [0u8; 9];
        tokio::time::timeout(Duration::from_secs(10), s.read_exact(&mut header))
            .await
            .expect("no HTTP/2 frame from the emulator within 10 s")
            .expect("read HTTP/2 frame header");
        assert_eq!(
            header[3], 0x4,
            "first server frame is not SETTINGS: {header:?}"
        );
    }

    async fn assert_refused(host: &str) {
        assert!(
            TcpStream::connect(host).await.is_err(),
            "{host} still accepts connections after the emulator was stopped"
        );
    }

    #[tokio::test]
    async fn emulator_starts_and_restarts_on_the_same_port() {
        let mut emu = Emulator::start("p", &["t"], &[("s", "t")])
            .await
            .expect("start pstest");
        let host = emu.host();
        assert!(host.starts_with("127.0.0.1:"), "{host}");
        assert_ne!(emu.port(), 0);
        assert!(emu.is_running());
        assert_eq!(emu.topic("t"), "projects/p/topics/t");
        assert_eq!(emu.subscription("s"), "projects/p/subscriptions/s");
        TcpStream::connect(&host).await.expect("TCP connect");
        assert_speaks_http2(&host).await;

        emu.kill();
        assert!(!emu.is_running());
        assert_refused(&host).await;
        emu.kill(); // idempotent

        let again = Emulator::start_on(&host, "p", &["t"], &[("s", "t")])
            .await
            .expect("restart pstest on the same address");
        assert_eq!(again.host(), host);
        assert_speaks_http2(&host).await;
        let log = again.log_path().to_path_buf();
        assert!(
            fs::read_to_string(&log)
                .unwrap()
                .contains("created subscription projects/p/subscriptions/s")
        );

        drop(again);
        assert_refused(&host).await;
        assert!(!log.exists(), "log of a passing test is removed on drop");
    }

    #[tokio::test]
    async fn emulator_restart_keeps_address() {
        let mut emu = Emulator::start("p", &[], &[("s", "projects/other/topics/t")])
            .await
            .expect("start pstest");
        let host = emu.host();
        emu.restart().await.expect("restart");
        assert_eq!(emu.host(), host);
        assert!(emu.is_running());
        assert_speaks_http2(&host).await;
        let log = fs::read_to_string(emu.log_path()).unwrap();
        assert_eq!(
            log.matches(
                "created subscription projects/p/subscriptions/s -> projects/other/topics/t"
            )
            .count(),
            2,
            "both runs log into the same file:\n{log}"
        );
    }

    #[tokio::test]
    async fn emulator_startup_failure_reports_the_log() {
        let err = Emulator::start("p", &[], &[("s", "")])
            .await
            .expect_err("an empty topic must be rejected");
        let msg = err.to_string();
        assert!(matches!(err, EmulatorError::Startup { .. }), "{msg}");
        assert!(msg.contains("-subscription wants NAME=TOPIC"), "{msg}");
        if let EmulatorError::Startup { log, .. } = err {
            let _ = fs::remove_file(log);
        }
    }

    #[test]
    fn emulator_build_is_cached_outside_the_clone() {
        if std::env::var_os(PSTEST_BIN_ENV).is_some() {
            return; // a prebuilt binary was given; nothing is built
        }
        let a = build_pstest().expect("build");
        let key = gotool::PSTEST.cache_key().expect("cache key");
        assert_eq!(a, gotool::tools_dir().join(key).join("pstest"));
        assert!(
            !a.starts_with(find_repo_root()),
            "{} is inside the clone",
            a.display()
        );
        // A second lookup (another test process) finds the same binary without a build.
        let modified = fs::metadata(&a).and_then(|m| m.modified()).expect("mtime");
        let b = gotool::PSTEST.binary("pstest").expect("cached build");
        assert_eq!(a, b);
        assert_eq!(
            fs::metadata(&b).and_then(|m| m.modified()).expect("mtime"),
            modified
        );
    }
}

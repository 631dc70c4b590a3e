//! Developer tasks for gar-restarter, run as `cargo xtask <task>` (alias in .cargo/config.toml).

mod bench;
mod cluster;
mod demo;
mod emulator;
mod freshness;
mod publish;
mod test;
mod util;

use std::process::ExitCode;

use clap::{CommandFactory, Parser, Subcommand};

/// Developer tasks for gar-restarter.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Option<Task>,
}

#[derive(Debug, Subcommand)]
enum Task {
    Test(test::Args),
    Demo(demo::Args),
    Bench(bench::Args),
    Emulator(emulator::Args),
    Cluster(cluster::Args),
    Publish(publish::Args),
}

fn main() -> ExitCode {
    let result = match Cli::parse().task {
        Some(Task::Test(args)) => test::run(args),
        Some(Task::Demo(args)) => demo::run(args),
        Some(Task::Bench(args)) => bench::run(args),
        Some(Task::Emulator(args)) => emulator::run(args),
        Some(Task::Cluster(args)) => cluster::run(args),
        Some(Task::Publish(args)) => publish::run(args),
        None => Cli::command().print_help().map_err(Into::into),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("\nxtask: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The arguments of one task, as `cargo xtask TASK ARGS…` parses them.
    fn parse(args: &[&str]) -> Result<Task, clap::Error> {
        let argv = ["cargo xtask"].iter().chain(args);
        Cli::try_parse_from(argv).map(|cli| cli.task.expect("a task was named"))
    }

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn names_every_task() {
        for (name, args) in [
            ("test", &[][..]),
            ("demo", &[]),
            ("bench", &[]),
            ("emulator", &[]),
            ("cluster", &[]),
            ("publish", &["--tag", "r/app:v1"]),
        ] {
            let argv: Vec<&str> = std::iter::once(name).chain(args.iter().copied()).collect();
            let task = parse(&argv).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert!(
                format!("{task:?}").to_lowercase().starts_with(name),
                "{task:?}"
            );
        }
        assert!(parse(&["frobnicate"]).is_err());
    }
}

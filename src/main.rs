//! Binary edge: parse configuration, install telemetry, dispatch the subcommand.
//!
//! Exit codes (README, *Exit codes*): 0 success; 1 a runtime failure (the cluster, Pub/Sub,
//! a dead letter that could not be replayed); 2 usage or configuration, whether from flags,
//! `GAR_RESTARTER_*`, the `--config` file, `RUST_LOG` or `OTEL_*`. A closed stdout is not an
//! error: the reader has gone, so there is no one to tell.

use std::io::Write;
use std::process::ExitCode;

use gar_restarter::config::{CacheCommand, CheckArgs, Cli, Command, DlqCommand};
use gar_restarter::daemon;
use gar_restarter::index::check;
use gar_restarter::ops::telemetry;
use gar_restarter::settle::replay;
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
    gar_restarter::util::heap::configure();
    let cli = Cli::load().unwrap_or_else(|e| e.exit());
    // aws-lc-rs is the only provider compiled in (kube is built with it, like the Google
    // SDK); installing it explicitly keeps a dependency that someday enables ring as well
    // from making rustls' choice ambiguous, which would fail the first TLS handshake.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", chain_once(&e));
            exit_code(&e)
        }
    }
}

/// 2 for configuration read from the environment at run time, 1 for everything else.
fn exit_code(e: &anyhow::Error) -> ExitCode {
    match e.downcast_ref::<telemetry::TelemetryError>() {
        Some(telemetry::TelemetryError::Init(_)) | None => ExitCode::FAILURE,
        Some(_) => ExitCode::from(2),
    }
}

/// The error and its causes, each said once. The library's messages already quote their
/// source (`listing deployments: <kube error>`), so `{:#}` would print every cause twice;
/// a cause is added only when the text so far does not already contain it.
fn chain_once(e: &anyhow::Error) -> String {
    let mut message = e.to_string();
    for cause in e.chain().skip(1) {
        let cause = cause.to_string();
        if !message.contains(&cause) {
            message.push_str(": ");
            message.push_str(&cause);
        }
    }
    message
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// `println!` panics when stdout is closed (`check … | head -0`, exit 101); this returns the
/// error instead, which `main` turns into a quiet exit.
fn print(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")?;
    out.flush()
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let format = cli.log_format.unwrap_or_else(telemetry::default_format);
    match cli.command {
        Command::Run(args) => {
            let telemetry = telemetry::init(format)?;
            let shutdown = CancellationToken::new();
            daemon::spawn_signal_handler(shutdown.clone());
            let result = daemon::run(*args, shutdown).await;
            // Flush spans on the blocking pool: the exporter may block on a slow collector.
            let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
            result?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check(args) => check_command(args).await,
        Command::Cache {
            command: CacheCommand::Rebuild(args),
        } => report(check::cache_rebuild(&args).await),
        Command::Dlq {
            command: DlqCommand::Replay(args),
        } => {
            let telemetry = telemetry::init(format)?;
            let summary = replay::replay(&args).await;
            let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
            let summary = summary?;
            print(&summary.to_string())?;
            Ok(if summary.failed > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

async fn check_command(args: CheckArgs) -> anyhow::Result<ExitCode> {
    report(check::check(&args).await)
}

/// A one-shot command's JSON report on stdout (exit 0), or its error: a usage error exits 2,
/// anything else goes up the chain (exit 1).
fn report<T: serde::Serialize>(result: Result<T, check::CheckError>) -> anyhow::Result<ExitCode> {
    match result {
        Ok(report) => {
            print(&serde_json::to_string_pretty(&report)?)?;
            Ok(ExitCode::SUCCESS)
        }
        Err(e) if e.is_usage() => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(2))
        }
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("listing deployments: {0}")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("connection refused")]
    struct Inner;

    #[derive(Debug, thiserror::Error)]
    #[error("rebuilding the index")]
    struct Terse(#[source] Inner);

    #[test]
    fn error_chains_are_printed_once() {
        let e = anyhow::Error::new(Outer(Inner));
        assert_eq!(
            format!("{e:#}"),
            "listing deployments: connection refused: connection refused"
        );
        assert_eq!(chain_once(&e), "listing deployments: connection refused");
        // A message that does not quote its cause still gets it.
        let e = anyhow::Error::new(Terse(Inner));
        assert_eq!(chain_once(&e), "rebuilding the index: connection refused");
    }

    #[test]
    fn broken_pipe_is_recognised_and_config_errors_exit_2() {
        let e = anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert!(is_broken_pipe(&e));
        assert!(!is_broken_pipe(&anyhow::Error::new(Inner)));
        let e = anyhow::Error::new(telemetry::TelemetryError::Filter("x".into()));
        assert_eq!(exit_code(&e), ExitCode::from(2));
        assert_eq!(exit_code(&anyhow::Error::new(Inner)), ExitCode::FAILURE);
    }
}

//! Binary edge: parse configuration, install telemetry, dispatch the subcommand.

use std::process::ExitCode;

use gar_restarter::config::{CacheCommand, CheckArgs, Cli, Command, DlqCommand};
use gar_restarter::{check, daemon, replay, telemetry};
use tokio_util::sync::CancellationToken;

fn main() -> ExitCode {
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
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let format = cli.log_format.unwrap_or_else(telemetry::default_format);
    match cli.command {
        Command::Run(args) => {
            let telemetry = telemetry::init(format)?;
            let shutdown = CancellationToken::new();
            daemon::spawn_signal_handler(shutdown.clone());
            let result = daemon::run(args, shutdown).await;
            // Flush spans on the blocking pool: the exporter may block on a slow collector.
            let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
            result?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check(args) => check_command(args).await,
        Command::Cache {
            command: CacheCommand::Rebuild(args),
        } => {
            let report = check::cache_rebuild(&args).await?;
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Dlq {
            command: DlqCommand::Replay(args),
        } => {
            let telemetry = telemetry::init(format)?;
            let summary = replay::replay(&args).await;
            let _ = tokio::task::spawn_blocking(move || telemetry.shutdown()).await;
            let summary = summary?;
            println!("{summary}");
            Ok(if summary.failed > 0 {
                ExitCode::FAILURE
            } else {
                ExitCode::SUCCESS
            })
        }
    }
}

async fn check_command(args: CheckArgs) -> anyhow::Result<ExitCode> {
    match check::check(&args).await {
        Ok(report) => {
            println!("{}", serde_json::to_string_pretty(&report)?);
            Ok(ExitCode::SUCCESS)
        }
        Err(e @ check::CheckError::Image(_)) => {
            eprintln!("error: {e}");
            Ok(ExitCode::from(2))
        }
        Err(e) => Err(e.into()),
    }
}

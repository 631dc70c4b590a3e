//! `cargo xtask emulator`: the pstest Pub/Sub emulator in the foreground, set up like
//! `config/local.toml` expects, until Ctrl-C.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use gar_testsupport::emulator::{self, Emulator};

/// The pstest Pub/Sub emulator in the foreground, set up for config/local.toml.
///
/// Runs the pstest Pub/Sub emulator in the foreground until Ctrl-C, with the topics
/// `gcr` and `gcr-dead-letter` and the subscriptions `gcr-restarter` (on gcr) and
/// `gcr-dead-letter-sub` (on gcr-dead-letter), as config/local.toml expects.
/// All state is in memory and lost when it stops.
#[derive(Debug, clap::Parser)]
pub struct Args {
    /// Listen address.
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:8085")]
    addr: String,
    /// Project of the topics and subscriptions (`cargo xtask demo` with
    /// PUBSUB_EMULATOR_HOST wants demo-project).
    #[arg(long, default_value = "local-project")]
    project: String,
}

const TOPICS: [&str; 2] = ["gcr", "gcr-dead-letter"];
const SUBSCRIPTIONS: [(&str, &str); 2] = [
    ("gcr-restarter", "gcr"),
    ("gcr-dead-letter-sub", "gcr-dead-letter"),
];

pub fn run(opts: Args) -> Result<()> {
    eprintln!("building pstest if needed (the first build takes about a minute)...");
    emulator::build_pstest()?;
    let mut emu = Emulator::start_on_blocking(&opts.addr, &opts.project, &TOPICS, &SUBSCRIPTIONS)
        .with_context(|| format!("starting pstest on {}", opts.addr))?;
    let host = emu.host();
    println!(
        "pstest Pub/Sub emulator listening on {host} (project {})",
        opts.project
    );
    for t in TOPICS {
        println!("  topic         {}", emu.topic(t));
    }
    for (s, t) in SUBSCRIPTIONS {
        println!("  subscription  {} -> {t}", emu.subscription(s));
    }
    println!("\nuse it with:\n  export PUBSUB_EMULATOR_HOST={host}");
    if opts.project == "local-project" {
        println!(
            "  just run-local        # or: PUBSUB_EMULATOR_HOST={host} cargo run -p gar-restarter -- --config config/local.toml run"
        );
    }
    println!(
        "\nemulator log: {} (followed below); Ctrl-C stops it\n",
        emu.log_path().display()
    );
    let _ = std::io::stdout().flush();

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let log = emu.log_path().to_path_buf();
    let exited = runtime.block_on(async {
        let mut follower = LogFollower::new(log);
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return false,
                _ = tick.tick() => {
                    follower.pump();
                    if !emu.is_running() {
                        follower.pump();
                        return true;
                    }
                }
            }
        }
    });
    drop(emu);
    if exited {
        bail!("the emulator exited unexpectedly (see its log above)");
    }
    eprintln!("\nstopped");
    Ok(())
}

/// Copies what is appended to a file to stderr.
struct LogFollower {
    path: PathBuf,
    pos: u64,
}

impl LogFollower {
    fn new(path: PathBuf) -> LogFollower {
        LogFollower { path, pos: 0 }
    }

    fn pump(&mut self) {
        let Ok(mut f) = File::open(&self.path) else {
            return;
        };
        if f.seek(SeekFrom::Start(self.pos)).is_err() {
            return;
        }
        let mut buf = Vec::new();
        if let Ok(n) = f.read_to_end(&mut buf) {
            self.pos += n as u64;
            let _ = std::io::stderr().write_all(&buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use clap::Parser;

    #[test]
    fn parses_options() {
        let o = Args::try_parse_from(["emulator"]).unwrap();
        assert_eq!(o.addr, "127.0.0.1:8085");
        assert_eq!(o.project, "local-project");
        let o = Args::try_parse_from([
            "emulator",
            "--addr",
            "0.0.0.0:9000",
            "--project=demo-project",
        ])
        .unwrap();
        assert_eq!(o.addr, "0.0.0.0:9000");
        assert_eq!(o.project, "demo-project");
        assert!(Args::try_parse_from(["emulator", "--addr"]).is_err());
        assert!(Args::try_parse_from(["emulator", "--port", "1"]).is_err());
    }
}

//! `cargo xtask publish`: publish one GAR notification to the emulator, as the registry would.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use google_cloud_pubsub::client::BasePublisher;
use google_cloud_pubsub::model::Message;

/// Publish one GAR notification (--tag IMAGE:TAG) to the emulator's gcr topic.
///
/// Publishes one Artifact Registry notification (`{"action","digest","tag"}`) to the `gcr`
/// topic of the Pub/Sub emulator started by `cargo xtask emulator`, and prints its message
/// id. With the daemon running, `gar-restarter` then restarts the workloads running TAG.
#[derive(Debug, Parser)]
pub struct Args {
    /// The pushed tag, e.g. europe-docker.pkg.dev/p/r/app:v1.
    #[arg(long)]
    tag: String,
    /// The pushed digest, `sha256:` and 64 hex digits (default: a digest made from the tag).
    #[arg(long)]
    digest: Option<String>,
    /// INSERT (a push) or DELETE.
    #[arg(long, default_value = "INSERT")]
    action: String,
    /// The emulator's address.
    #[arg(long, env = "PUBSUB_EMULATOR_HOST", default_value = "127.0.0.1:8085")]
    emulator: String,
    /// The topic, `projects/P/topics/T`.
    #[arg(long, default_value = "projects/local-project/topics/gcr")]
    topic: String,
}

/// The publisher retries an unreachable endpoint forever: bound it.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(10);

pub fn run(args: Args) -> Result<()> {
    let data = notification(&args)?;
    let runtime = tokio::runtime::Runtime::new().context("starting a Tokio runtime")?;
    let id = runtime.block_on(publish(&args, data.clone()))?;
    println!("published {id} to {}: {data}", args.topic);
    Ok(())
}

/// The registry's message body; the digest is checked here so that a typo fails at once
/// instead of being dead-lettered by the daemon.
fn notification(args: &Args) -> Result<String> {
    if !matches!(args.action.as_str(), "INSERT" | "DELETE") {
        bail!("--action: want INSERT or DELETE, got {:?}", args.action);
    }
    let digest = match &args.digest {
        Some(d) => {
            let hex = d.strip_prefix("sha256:").unwrap_or_default();
            if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                bail!("--digest: want sha256: and 64 hex digits, got {d:?}");
            }
            d.clone()
        }
        None => made_up_digest(&args.tag),
    };
    let repository = args
        .tag
        .rsplit_once(':')
        .filter(|(repo, tag)| !tag.contains('/') && !repo.is_empty())
        .map(|(repo, _)| repo)
        .with_context(|| format!("--tag: want REPOSITORY:TAG, got {:?}", args.tag))?;
    Ok(serde_json::json!({
        "action": args.action,
        "digest": format!("{repository}@{digest}"),
        "tag": args.tag,
    })
    .to_string())
}

/// A stable stand-in digest: the same tag always "pushes" the same digest, so publishing it
/// twice shows the daemon's dedupe.
fn made_up_digest(tag: &str) -> String {
    let mut hex = String::with_capacity(64);
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for round in 0u8..4 {
        for b in tag.bytes().chain([round]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        hex.push_str(&format!("{h:016x}"));
    }
    format!("sha256:{hex}")
}

async fn publish(args: &Args, data: String) -> Result<String> {
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let publisher = BasePublisher::builder()
        .with_endpoint(format!("http://{}", args.emulator))
        .with_credentials(google_cloud_auth::credentials::anonymous::Builder::new().build())
        .build()
        .await
        .context("creating the Pub/Sub publisher")?
        .publisher(args.topic.clone())
        .build();
    let msg = Message::new().set_data(bytes::Bytes::from(data));
    tokio::time::timeout(PUBLISH_TIMEOUT, publisher.publish(msg))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "publishing to {} on {} timed out after {PUBLISH_TIMEOUT:?}; is `cargo xtask \
                 emulator` running?",
                args.topic,
                args.emulator
            )
        })?
        .with_context(|| format!("publishing to {} on {}", args.topic, args.emulator))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(tag: &str, digest: Option<&str>) -> Args {
        Args {
            tag: tag.into(),
            digest: digest.map(str::to_owned),
            action: "INSERT".into(),
            emulator: "127.0.0.1:8085".into(),
            topic: "projects/local-project/topics/gcr".into(),
        }
    }

    #[test]
    fn builds_the_registry_body() {
        let d = format!("sha256:{}", "a".repeat(64));
        let body = notification(&args("europe-docker.pkg.dev/p/r/app:v1", Some(&d))).unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["action"], "INSERT");
        assert_eq!(v["tag"], "europe-docker.pkg.dev/p/r/app:v1");
        assert_eq!(v["digest"], format!("europe-docker.pkg.dev/p/r/app@{d}"));
    }

    #[test]
    fn made_up_digests_are_stable_and_valid() {
        let a = notification(&args("host:5000/app:v1", None)).unwrap();
        let b = notification(&args("host:5000/app:v1", None)).unwrap();
        assert_eq!(a, b);
        let v: serde_json::Value = serde_json::from_str(&a).unwrap();
        let digest = v["digest"].as_str().unwrap();
        let hex = digest.strip_prefix("host:5000/app@sha256:").unwrap();
        assert_eq!(hex.len(), 64);
        assert!(hex.bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn rejects_what_the_daemon_would_dead_letter() {
        let e = notification(&args("app", None)).unwrap_err().to_string();
        assert!(e.contains("--tag"), "{e}");
        let e = notification(&args("host:5000/app", None))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--tag"), "{e}");
        let e = notification(&args("app:v1", Some("sha256:zz")))
            .unwrap_err()
            .to_string();
        assert!(e.contains("--digest"), "{e}");
        let mut bad = args("app:v1", None);
        bad.action = "PUSH".into();
        assert!(
            notification(&bad)
                .unwrap_err()
                .to_string()
                .contains("--action")
        );
    }
}

//! `gar-restarter dlq replay` as an operator runs it: a subprocess against pstest, with the
//! real daemon producing the dead letters and consuming what is replayed.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use gar_testsupport::objects::deployment;
use gar_testsupport::traffic::Fault;

/// A second subscription on the GAR topic: sees exactly what a replay publishes there.
const TAP: &str = "gcr-tap";
/// Upper bound for one replay run (`--idle-timeout 2s` plus start-up and flushing).
const REPLAY_TIMEOUT: Duration = Duration::from_secs(30);

fn summary_line(out: &CommandOutput) -> &str {
    out.stdout.lines().last().unwrap_or_default()
}

/// `replayed=N skipped=M failed=K` as numbers.
fn parse_summary(line: &str) -> (u64, u64, u64) {
    let field = |name: &str| {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
    };
    (field("replayed"), field("skipped"), field("failed"))
}

async fn replay(h: &Harness, topic: &str, extra: &[&str]) -> CommandOutput {
    let dlq_sub = h.emulator.subscription(DLQ_SUB);
    let mut args = vec![
        "dlq",
        "replay",
        "--subscription",
        dlq_sub.as_str(),
        "--topic",
        topic,
        "--idle-timeout",
        "2s",
    ];
    args.extend_from_slice(extra);
    let out = h.run_command(&args, REPLAY_TIMEOUT).await;
    eprintln!(
        "dlq replay {extra:?}: {:?} in {:.2}s\n{}{}",
        out.status,
        out.elapsed.as_secs_f64(),
        out.stdout,
        out.stderr
    );
    out
}

/// Dead letters of two kinds, a dry run, a `--kind permanent` replay after the cause was
/// fixed (the API stops refusing the workload's PATCH), and the daemon restarting it from the
/// replayed message: the whole loop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_filters_by_kind_dry_runs_and_closes_the_loop() {
    let mut h = Harness::real_with_subscriptions(&[(TAP, TOPIC)]).await;
    h.api.insert(deployment("prod", "api", &[&gar("app:v1")]));
    h.api
        .insert(deployment("prod", "locked", &[&gar("locked:v1")]));
    // Its PATCH answers 403 (as with a missing RBAC rule): a permanent failure. (A deleted
    // workload is no failure at all: the live view knows it is gone and nothing is patched.)
    h.api
        .add_fault(Fault::error(deployment_path("prod", "locked"), 403).on_method("PATCH"));
    h.start_daemon().await;

    let event = insert("locked:v1", HEX_A);
    let original_attrs = HashMap::from([
        ("origin".to_string(), "ci".to_string()),
        ("trace".to_string(), "abc".to_string()),
    ]);
    let event_id = h.publish_with(&event, original_attrs.clone()).await;
    let malformed_attrs = HashMap::from([("origin".to_string(), "fuzz".to_string())]);
    h.publish_with("{not json", malformed_attrs.clone()).await;
    assert!(
        wait_until(Duration::from_secs(15), || {
            h.metric("gar_restarter_dead_letters_total{kind=\"permanent\"}") == 1.0
                && h.metric("gar_restarter_dead_letters_total{kind=\"malformed\"}") == 1.0
        })
        .await,
        "{}\n{}",
        h.metrics(),
        h.daemon_log()
    );
    let gar_topic = h.emulator.topic(TOPIC);
    let tap = h.emulator.subscription(TAP);
    // The two originals went through the tap too; drain them.
    assert_eq!(
        pull(&h.emulator.endpoint(), &tap, 2, Duration::from_secs(10))
            .await
            .len(),
        2
    );

    // Dry run: reports both, publishes and acks nothing.
    let out = replay(&h, &gar_topic, &["--dry-run"]).await;
    assert!(out.status.is_some_and(|s| s.success()), "{out:?}");
    assert_eq!(summary_line(&out), "replayed=2 skipped=0 failed=0");
    assert!(out.stdout.contains("would replay"), "{}", out.stdout);
    let leaked = pull(&h.emulator.endpoint(), &tap, 1, Duration::from_secs(2)).await;
    assert!(leaked.is_empty(), "a dry run published {leaked:?}");

    // The cause is fixed; replay only the permanent failure.
    h.api.clear_faults();
    h.api.clear_requests();
    let out = replay(&h, &gar_topic, &["--kind", "permanent"]).await;
    assert!(out.status.is_some_and(|s| s.success()), "{out:?}");
    assert_eq!(summary_line(&out), "replayed=1 skipped=1 failed=0");

    // Back on the GAR topic exactly as first published, without any dlq_* attribute…
    let replayed = pull(&h.emulator.endpoint(), &tap, 1, Duration::from_secs(10)).await;
    assert_eq!(replayed.len(), 1);
    assert_eq!(replayed[0].data.as_ref(), event.as_bytes());
    assert_eq!(replayed[0].attributes, original_attrs);
    assert_ne!(replayed[0].message_id, event_id, "a new message");

    // …and the daemon restarts the workload from it.
    let path = deployment_path("prod", "locked");
    assert!(
        wait_until(Duration::from_secs(15), || {
            accepted_patches(&h.api).contains(&(path.clone(), Some(format!("sha256:{HEX_A}"))))
        })
        .await,
        "{}",
        h.daemon_log()
    );
    assert_eq!(
        h.metric("gar_restarter_dead_letters_total{kind=\"permanent\"}"),
        1.0
    );

    // Only the malformed one is left on the dead-letter subscription (the dry run and the
    // filter released it): replaying it sends it round the loop once more. It comes straight
    // back, and the same run must not replay it again (or it would never go idle).
    let out = replay(&h, &gar_topic, &[]).await;
    assert!(out.status.is_some_and(|s| s.success()), "{out:?}");
    let (replayed, skipped, failed) = parse_summary(summary_line(&out));
    assert_eq!((replayed, failed), (1, 0), "{}", out.stdout);
    assert!(skipped <= 1, "{}", out.stdout);
    // Asks for two to prove there is only one; it is already there, so 4 s is plenty.
    let letters = h.dead_letters(2, Duration::from_secs(4)).await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    let dl = &letters[0];
    assert_eq!(dl.data.as_ref(), b"{not json");
    assert_eq!(dl.attributes["dlq_kind"], "malformed");
    assert_eq!(dl.attributes["origin"], "fuzz");
    assert_eq!(
        h.metric("gar_restarter_dead_letters_total{kind=\"malformed\"}"),
        2.0
    );
}

/// Publishing to a topic that does not exist fails: nothing is acked, the command exits
/// non-zero and every dead letter is still there afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_replay_keeps_every_dead_letter() {
    let mut h = Harness::real().await;
    h.start_daemon().await;
    for body in ["{not json", "[]"] {
        h.publish(body).await;
    }
    assert!(
        wait_until(Duration::from_secs(15), || {
            h.metric("gar_restarter_dead_letters_total{kind=\"malformed\"}") == 2.0
        })
        .await,
        "{}",
        h.metrics()
    );
    let missing_topic = h.emulator.topic("no-such-topic");
    let out = replay(&h, &missing_topic, &[]).await;
    assert_eq!(out.status.and_then(|s| s.code()), Some(1), "{out:?}");
    assert_eq!(summary_line(&out), "replayed=0 skipped=0 failed=2");
    let letters = h.dead_letters(2, Duration::from_secs(15)).await;
    assert_eq!(letters.len(), 2, "{letters:?}");
}

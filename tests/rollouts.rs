//! Rollout tracking (issue #13) against a real kube-apiserver and kube-controller-manager:
//! after a restart the daemon follows the rollout on its watch to `succeeded`, or to `failed`
//! when the Deployment controller reports `ProgressDeadlineExceeded`. The stand-in kubelet
//! makes pods Ready, or holds an image's pods unready, as a crash-looping version would.

mod common;

use std::time::Duration;

use common::*;
use gar_testsupport::objects::deployment;
use serde_json::Value;

fn rollouts(h: &Harness, result: &str) -> f64 {
    h.metric(&format!(
        "gar_restarter_rollouts_total{{kind=\"Deployment\",result=\"{result}\"}}"
    ))
}

fn available(obj: &Value) -> i64 {
    obj["status"]["availableReplicas"].as_i64().unwrap_or(0)
}

/// Inserts a one-replica Deployment and waits for its first rollout to finish, so that what
/// the daemon follows afterwards is its own.
async fn rolled_out(h: &Harness, name: &str, deadline_secs: Option<i64>) {
    let mut obj = deployment("apps", name, &[&gar("app:v1")]);
    obj["spec"]["replicas"] = 1.into();
    if let Some(secs) = deadline_secs {
        obj["spec"]["progressDeadlineSeconds"] = secs.into();
    }
    h.api.insert(obj);
    assert!(
        wait_until(Duration::from_secs(30), || available(
            &h.deployment("apps", name)
        ) == 1)
        .await,
        "the first rollout of {name} never finished: {}",
        h.deployment("apps", name)
    );
}

/// The restart's rollout is followed to its end: counted, timed from the push, logged, and the
/// message was acked long before (the ack does not wait). The outcome topic gets one record
/// for the restart and one for the rollout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rollout_is_followed_to_success() {
    let mut h = Harness::real().await;
    rolled_out(&h, "web", None).await;
    h.extra_args
        .extend(["--notify-topic".into(), h.emulator.topic(NOTIFY_TOPIC)]);
    h.start_synced().await;
    h.publish(&insert("app:v1", HEX_A)).await;
    assert!(
        wait_until(Duration::from_secs(20), || h
            .metric("gar_restarter_events_settled_total{outcome=\"ack\"}")
            == 1.0)
        .await,
        "{}",
        h.daemon_log()
    );
    assert!(
        wait_until(Duration::from_secs(60), || rollouts(&h, "succeeded") == 1.0).await,
        "the rollout was not reported as succeeded: {}\n{}",
        h.deployment("apps", "web"),
        h.daemon_log()
    );
    let web = h.deployment("apps", "web");
    assert_eq!(
        web["status"]["updatedReplicas"], 1,
        "the new ReplicaSet is the one running: {web}"
    );
    assert_eq!(h.metric("gar_restarter_push_to_rollout_seconds_count"), 1.0);
    assert_eq!(rollouts(&h, "failed") + rollouts(&h, "timed_out"), 0.0);
    assert_eq!(h.metric("gar_restarter_rollouts_tracked"), 0.0);
    let log = h.daemon_log();
    assert!(
        log.lines()
            .any(|l| l.contains("rollout succeeded") && l.contains("apps/web")),
        "{log}"
    );

    let records: Vec<Value> = pull(
        &h.emulator.endpoint(),
        &h.emulator.subscription(NOTIFY_SUB),
        2,
        Duration::from_secs(20),
    )
    .await
    .iter()
    .map(|m| serde_json::from_slice(&m.data).expect("a JSON record"))
    .collect();
    let of = |kind: &str| {
        records
            .iter()
            .find(|r| r["type"] == kind)
            .unwrap_or_else(|| panic!("no {kind} record in {records:?}"))
    };
    let (restart, rollout) = (of("restart"), of("rollout"));
    for r in [restart, rollout] {
        assert_eq!(r["workload"]["kind"], "Deployment", "{r}");
        assert_eq!(r["workload"]["namespace"], "apps");
        assert_eq!(r["workload"]["name"], "web");
        assert_eq!(r["image"], gar("app:v1"));
        assert_eq!(r["digest"], format!("sha256:{HEX_A}"));
        assert_eq!(r["strategy"], "restart");
        assert!(
            r["messageId"].as_str().is_some_and(|id| !id.is_empty()),
            "{r}"
        );
        assert!(r["publishedAt"].as_str().is_some(), "{r}");
        assert!(r["at"].as_str().is_some(), "{r}");
    }
    assert_eq!(restart["result"], "restarted");
    assert_eq!(rollout["result"], "succeeded");
    assert_eq!(restart["messageId"], rollout["messageId"]);
    let events = events_on(&h, "apps", "web").await;
    let succeeded: Vec<_> = events
        .iter()
        .filter(|(_, reason, _)| reason == "RolloutSucceeded")
        .collect();
    assert_eq!(succeeded.len(), 1, "{events:?}");
    let (kind, _, note) = succeeded[0];
    assert_eq!(kind, "Normal");
    assert!(
        note.contains(&gar("app:v1")) && note.contains(HEX_A) && note.contains("message"),
        "{note}"
    );
    assert_eq!(
        h.metric("gar_restarter_notifications_total{result=\"published\"}"),
        2.0
    );
}

/// A new version that never becomes Ready: the Deployment controller gives up after
/// `progressDeadlineSeconds` and the daemon reports the rollout as failed (WARN).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_rollout_is_reported_as_failed() {
    let mut h = Harness::real().await;
    rolled_out(&h, "web", Some(3)).await;
    h.start_synced().await;
    // From now on the pods of this image start but never pass their readiness probe.
    h.api.kubelet().hold(&gar("app:v1"));
    h.publish(&insert("app:v1", HEX_A)).await;
    assert!(
        wait_until(Duration::from_secs(60), || rollouts(&h, "failed") == 1.0).await,
        "ProgressDeadlineExceeded was not reported: {}\n{}",
        h.deployment("apps", "web"),
        h.daemon_log()
    );
    let web = h.deployment("apps", "web");
    let reason = web["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == "Progressing"))
        .map(|c| c["reason"].clone());
    assert_eq!(reason, Some("ProgressDeadlineExceeded".into()), "{web}");
    assert_eq!(rollouts(&h, "succeeded"), 0.0);
    assert_eq!(
        h.metric("gar_restarter_events_settled_total{outcome=\"ack\"}"),
        1.0,
        "the message was acked when the PATCH was accepted"
    );
    let failed = async {
        for _ in 0..100 {
            let events = events_on(&h, "apps", "web").await;
            if let Some(e) = events
                .iter()
                .find(|(_, reason, _)| reason == "RolloutFailed")
            {
                return Some(e.clone());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    }
    .await;
    let (kind, _, note) = failed.expect("a RolloutFailed Event on apps/web");
    assert_eq!(kind, "Warning");
    assert!(
        note.contains("ProgressDeadlineExceeded") && note.contains(HEX_A),
        "{note}"
    );
    let log = h.daemon_log();
    assert!(
        log.lines().any(|l| l.contains("rollout did not succeed")
            && l.contains("failed")
            && l.contains("ProgressDeadlineExceeded")),
        "{log}"
    );
}

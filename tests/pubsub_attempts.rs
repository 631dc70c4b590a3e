//! Attempts counted by Pub/Sub itself: with a subscription dead-letter policy, pstest (v2)
//! counts deliveries across consumers and sets `delivery_attempt`, so the daemon's
//! `--max-attempts` holds across replicas and restarts.

mod common;

use std::time::Duration;

use common::*;
use gar_testsupport::objects::deployment;
use gar_testsupport::traffic::Fault;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_delivery_attempts_survive_a_daemon_restart() {
    // Pub/Sub forwards after 5 deliveries; the daemon gives up first, after 3.
    let mut h = Harness::real_with_pubsub_dead_letter_policy(5).await;
    h.api.insert(deployment("prod", "api", &[&gar("app:v1")]));
    h.api
        .add_fault(Fault::error(deployment_path("prod", "api"), 503).on_method("PATCH"));
    h.extra_args = vec![
        "--max-attempts".into(),
        "3".into(),
        "--retry-budget".into(),
        "200ms".into(),
    ];
    h.start_daemon().await;
    let id = h.publish(&insert("app:v1", HEX_A)).await;
    assert!(
        wait_until(Duration::from_secs(20), || {
            h.metric("gar_restarter_events_settled_total{outcome=\"nack\"}") >= 1.0
        })
        .await,
        "{}",
        h.daemon_log()
    );
    assert_eq!(
        h.metric("gar_restarter_attempts_counted_per_process"),
        0.0,
        "delivery_attempt was set, nothing is counted locally"
    );

    // A new process knows nothing of the earlier deliveries, but Pub/Sub does: at most two
    // more deliveries reach --max-attempts (a local count would need three in this process).
    h.kill_daemon();
    h.start_daemon().await;
    let letters = h.dead_letters(1, Duration::from_secs(60)).await;
    assert_eq!(letters.len(), 1, "{}", h.daemon_log());
    let dl = &letters[0];
    assert_eq!(dl.attributes["dlq_kind"], "exhausted");
    assert_eq!(dl.attributes["dlq_attempts"], "3", "{:?}", dl.attributes);
    assert_eq!(dl.attributes["dlq_original_message_id"], id);
    assert!(
        wait_until(Duration::from_secs(5), || {
            h.metric("gar_restarter_dead_letters_total{kind=\"exhausted\"}") == 1.0
        })
        .await,
        "{}",
        h.metrics()
    );
    assert!(
        h.metric("gar_restarter_events_settled_total{outcome=\"nack\"}") <= 1.0,
        "the second process needed at most one nack before the dead letter\n{}",
        h.metrics()
    );
}

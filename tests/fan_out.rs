//! The fan-out limit (issue #13) against a real kube-apiserver: one push for many workloads
//! restarts them at `--max-restarts-per-second`, each exactly once, and the message is acked
//! once, when all are done.

mod common;

use std::time::Duration;

use common::*;
use gar_testsupport::objects::deployment;

const WORKLOADS: usize = 40;
const RATE: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_push_for_many_workloads_restarts_them_at_the_configured_rate() {
    let mut h = Harness::real().await;
    let objects = (0..WORKLOADS)
        .map(|i| {
            let mut d = deployment("apps", &format!("web-{i}"), &[&gar("sidecar:v1")]);
            // No pods: only the PATCH pace is under test, not the controllers'.
            d["spec"]["replicas"] = 0.into();
            d
        })
        .collect();
    h.api.insert_many(objects, 8);
    h.extra_args
        .extend(["--max-restarts-per-second".into(), RATE.to_string()]);
    h.start_daemon().await;
    assert!(
        wait_until(Duration::from_secs(20), || h
            .metric("gar_restarter_watch_synced")
            == 1.0)
        .await,
        "{}",
        h.daemon_log()
    );
    h.publish(&insert("sidecar:v1", HEX_A)).await;
    assert!(
        wait_until(Duration::from_secs(60), || h
            .metric("gar_restarter_events_settled_total{outcome=\"ack\"}")
            == 1.0)
        .await,
        "{}",
        h.daemon_log()
    );
    let mut patches: Vec<_> = workload_patches(&h.api)
        .into_iter()
        .filter(|p| (200..300).contains(&p.status))
        .collect();
    assert_eq!(patches.len(), WORKLOADS, "exactly one restart per workload");
    let mut paths: Vec<&str> = patches.iter().map(|p| p.path.as_str()).collect();
    paths.sort();
    paths.dedup();
    assert_eq!(paths.len(), WORKLOADS);
    patches.sort_by_key(|p| p.received_at);
    // A burst of one second's worth, then one token every 1/RATE s.
    let (first, last) = (patches[0].received_at, patches[WORKLOADS - 1].received_at);
    let paced = (WORKLOADS - RATE) as f64;
    let elapsed = (last - first).as_secs_f64();
    let rate = paced / elapsed;
    eprintln!(
        "{WORKLOADS} restarts in {elapsed:.2} s: {rate:.1}/s after the burst (configured {RATE}/s)"
    );
    assert!(
        rate <= RATE as f64 * 1.15,
        "faster than --max-restarts-per-second: {rate:.1}/s"
    );
    assert!(
        rate >= RATE as f64 * 0.6,
        "far slower than the limit allows: {rate:.1}/s"
    );
    assert_eq!(
        h.metric("gar_restarter_events_settled_total{outcome=\"nack\"}"),
        0.0,
        "acked once, never nacked halfway"
    );
}

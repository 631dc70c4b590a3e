//! The live view (issue #12) against a real kube-apiserver: the daemon acts on the cluster as
//! it is now, read from its watch, not on the snapshot it started from.

mod common;

use std::time::Duration;

use common::*;
use gar_testsupport::objects::deployment;
use gar_testsupport::traffic::{Fault, RecordedRequest};
use serde_json::Value;

const SYNCED: &str = "gar_restarter_watch_synced";

fn sha(hex: &str) -> String {
    format!("sha256:{hex}")
}

/// Waits until `outcome` has been counted for `n` settled messages in total.
async fn settled(h: &Harness, n: f64) {
    let total = || {
        ["ack", "nack", "dead_letter"]
            .iter()
            .map(|o| {
                h.metric(&format!(
                    "gar_restarter_events_settled_total{{outcome=\"{o}\"}}"
                ))
            })
            .sum::<f64>()
    };
    assert!(
        wait_until(Duration::from_secs(20), || total() >= n).await,
        "{} messages settled, expected {n}: {}",
        total(),
        h.daemon_log()
    );
}

fn digest_of(h: &Harness, ns: &str, name: &str) -> Option<String> {
    restart_annotations(&h.deployment(ns, name)).1
}

fn set_template_annotation(obj: &mut Value, key: &str, value: &str) {
    obj["spec"]["template"]["metadata"]["annotations"][key] = value.into();
}

/// A Deployment created after start-up to run an image that was already indexed is found
/// by the next push at once, without a rebuild or a LIST.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_workload_is_restarted_by_the_next_push() {
    let mut h = Harness::real().await;
    h.api.insert(deployment("apps", "old", &[&gar("app:v1")]));
    h.start_synced().await;
    let seen = h.api.requests().len();
    h.api.insert(deployment("apps", "new", &[&gar("app:v1")]));
    // The watch sees it within milliseconds; give it a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    h.publish(&insert("app:v1", HEX_A)).await;
    assert!(
        wait_until(Duration::from_secs(20), || {
            digest_of(&h, "apps", "new") == Some(sha(HEX_A))
                && digest_of(&h, "apps", "old") == Some(sha(HEX_A))
        })
        .await,
        "{}",
        h.daemon_log()
    );
    let lists: Vec<_> = h
        .api
        .requests()
        .into_iter()
        .skip(seen)
        .filter(|r| r.method == "GET" && r.query_param("watch").is_none())
        .map(|r| r.path)
        .collect();
    assert!(lists.is_empty(), "no LIST in steady state: {lists:?}");
}

/// `gar-restarter/enabled: "false"` added while the daemon runs is honoured by the next push;
/// a Deployment paused at start-up and resumed since is restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opt_out_and_resume_take_effect_at_once() {
    let mut h = Harness::real().await;
    h.api.insert(deployment("apps", "web", &[&gar("app:v1")]));
    let mut paused = deployment("apps", "batch", &[&gar("app:v1")]);
    paused["spec"]["paused"] = true.into();
    h.api.insert(paused);
    h.start_synced().await;

    h.api.modify("deployments", "apps", "web", |o| {
        o["metadata"]["annotations"]["gar-restarter/enabled"] = "false".into();
    });
    h.api.modify("deployments", "apps", "batch", |o| {
        o["spec"]["paused"] = false.into();
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    h.publish(&insert("app:v1", HEX_A)).await;
    assert!(
        wait_until(Duration::from_secs(20), || digest_of(&h, "apps", "batch")
            == Some(sha(HEX_A)))
        .await,
        "the resumed Deployment was not restarted: {}",
        h.daemon_log()
    );
    settled(&h, 1.0).await;
    assert_eq!(
        digest_of(&h, "apps", "web"),
        None,
        "the opt-out was ignored"
    );
    assert!(
        patches_to(&h.api, &deployment_path("apps", "web")).is_empty(),
        "an opted-out workload must not even be patched"
    );
}

/// Moving a tag A → B → A restarts three times (the rollback is the restart a user needs
/// most); the same push delivered again restarts nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_rollback_restarts_and_a_duplicate_does_not() {
    let mut h = Harness::real().await;
    h.api.insert(deployment("apps", "web", &[&gar("app:v1")]));
    h.start_synced().await;
    for (i, hex) in [HEX_A, HEX_B, HEX_A].into_iter().enumerate() {
        h.publish(&insert("app:v1", hex)).await;
        assert!(
            wait_until(Duration::from_secs(20), || digest_of(&h, "apps", "web")
                == Some(sha(hex)))
            .await,
            "push {i} ({hex}) did not restart: {}",
            h.daemon_log()
        );
        settled(&h, (i + 1) as f64).await;
    }
    // The same push of A again (a redelivery, or the registry publishing twice).
    h.publish(&insert("app:v1", HEX_A)).await;
    settled(&h, 4.0).await;
    let digests: Vec<Option<String>> = accepted_patches(&h.api)
        .into_iter()
        .map(|(_, d)| d)
        .collect();
    assert_eq!(
        digests,
        vec![Some(sha(HEX_A)), Some(sha(HEX_B)), Some(sha(HEX_A))],
        "{}",
        h.daemon_log()
    );
    assert_eq!(
        h.metric(
            "gar_restarter_restarts_total{kind=\"Deployment\",namespace=\"apps\",result=\"duplicate\"}"
        ),
        1.0
    );
}

/// An event older than the push the workload was last restarted for (Pub/Sub does not order
/// deliveries; a killed replica's messages come back late) restarts nothing and is acked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_event_is_stale_and_restarts_nothing() {
    let mut h = Harness::real().await;
    let mut web = deployment("apps", "web", &[&gar("app:v1")]);
    // As another replica would have left it after a push published in the future of ours.
    set_template_annotation(&mut web, "gar-restarter/digest", &sha(HEX_B));
    set_template_annotation(&mut web, "gar-restarter/image", &gar("app:v1"));
    set_template_annotation(
        &mut web,
        "gar-restarter/published-at",
        "2099-01-01T00:00:00Z",
    );
    h.api.insert(web);
    h.start_synced().await;
    h.publish(&insert("app:v1", HEX_A)).await;
    settled(&h, 1.0).await;
    assert_eq!(
        h.metric("gar_restarter_events_settled_total{outcome=\"ack\"}"),
        1.0
    );
    assert_eq!(
        h.metric(
            "gar_restarter_restarts_total{kind=\"Deployment\",namespace=\"apps\",result=\"stale\"}"
        ),
        1.0
    );
    assert!(workload_patches(&h.api).is_empty(), "a stale event PATCHed");
    assert_eq!(digest_of(&h, "apps", "web"), Some(sha(HEX_B)));
    assert!(h.daemon_log().contains("stale"), "{}", h.daemon_log());
}

/// A mounted `cache.json` without a scope lists `kube-system/coredns`; a daemon running with
/// `--namespace apps` (and RBAC that would allow the PATCH) still never touches it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scope_is_enforced_when_acting() {
    let mut h = Harness::real().await;
    h.api.insert(deployment("apps", "web", &[&gar("app:v1")]));
    h.api
        .insert(deployment("kube-system", "coredns", &[&gar("app:v1")]));
    let cache = h.cache_dir();
    std::fs::create_dir_all(&cache).unwrap();
    let index = serde_json::json!({"images": {gar("app:v1"): [
        {"namespace": "apps", "name": "web"}, {"namespace": "kube-system", "name": "coredns"}]}});
    std::fs::write(cache.join("cache.json"), index.to_string()).unwrap();
    h.extra_args.extend(["--namespace".into(), "apps".into()]);
    h.start_synced().await;
    h.publish(&insert("app:v1", HEX_A)).await;
    assert!(
        wait_until(Duration::from_secs(20), || digest_of(&h, "apps", "web")
            == Some(sha(HEX_A)))
        .await,
        "{}",
        h.daemon_log()
    );
    settled(&h, 1.0).await;
    assert_eq!(digest_of(&h, "kube-system", "coredns"), None);
    assert!(
        patches_to(&h.api, &deployment_path("kube-system", "coredns")).is_empty(),
        "coredns was patched"
    );
}

/// Two replicas, each on its own subscription so that both get every message (the worst
/// case of redelivery across replicas): one restart per (workload, digest), decided on the
/// live view with a resourceVersion precondition, at no extra API call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_restart_once_per_digest() {
    let mut h = Harness::real_with_subscriptions(&[("gcr-sub-2", TOPIC)]).await;
    for i in 0..5 {
        h.api
            .insert(deployment("apps", &format!("web-{i}"), &[&gar("app:v1")]));
    }
    h.start_synced().await;
    // The harness' flags apply to the extra daemon too; later flags win.
    h.extra_args.extend([
        "--subscription".into(),
        format!("projects/{PROJECT}/subscriptions/gcr-sub-2"),
    ]);
    let other = h.spawn_extra_daemon("replica-2").await;
    assert!(
        wait_until(Duration::from_secs(20), || other.metric(SYNCED) == 1.0).await,
        "{}",
        other.log()
    );
    for hex in [HEX_A, HEX_B] {
        h.publish(&insert("app:v1", hex)).await;
        assert!(
            wait_until(Duration::from_secs(30), || (0..5).all(|i| digest_of(
                &h,
                "apps",
                &format!("web-{i}")
            ) == Some(sha(
                hex
            ))))
            .await,
            "{}\n---\n{}",
            h.daemon_log(),
            other.log()
        );
    }
    // Both replicas settle both messages.
    let settled_both = || {
        h.metric("gar_restarter_events_settled_total{outcome=\"ack\"}")
            + other.metric("gar_restarter_events_settled_total{outcome=\"ack\"}")
    };
    assert!(
        wait_until(Duration::from_secs(30), || settled_both() == 4.0).await,
        "{}\n---\n{}",
        h.daemon_log(),
        other.log()
    );
    let accepted = accepted_patches(&h.api);
    for i in 0..5 {
        let path = deployment_path("apps", &format!("web-{i}"));
        let digests: Vec<_> = accepted
            .iter()
            .filter(|(p, _)| *p == path)
            .map(|(_, d)| d.clone())
            .collect();
        assert_eq!(
            digests,
            vec![Some(sha(HEX_A)), Some(sha(HEX_B))],
            "{path}: {accepted:?}"
        );
    }
    let gets = h
        .api
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path.contains("/deployments/web-"))
        .count();
    assert_eq!(gets, 0, "no GET per workload: the live view answers");
}

/// Requests the proxy answered since the first `from`.
fn since(h: &Harness, from: usize) -> Vec<RecordedRequest> {
    h.api.requests().into_iter().skip(from).collect()
}

fn is_deployment_watch(r: &RecordedRequest) -> bool {
    r.path.ends_with("/deployments") && r.query_param("watch").is_some()
}

fn is_deployment_list(r: &RecordedRequest) -> bool {
    r.method == "GET" && r.path.ends_with("/deployments") && r.query_param("watch").is_none()
}

/// Publishes a push of `app:v1` and waits until `name` runs it, with `optout` left alone.
async fn push_reaches(h: &mut Harness, name: &str, optout: &str) {
    h.publish(&insert("app:v1", HEX_A)).await;
    assert!(
        wait_until(Duration::from_secs(20), || digest_of(h, "apps", name)
            == Some(sha(HEX_A)))
        .await,
        "the change made while the daemon was not watching was missed: {}",
        h.daemon_log()
    );
    settled(h, 1.0).await;
    assert!(
        patches_to(&h.api, &deployment_path("apps", optout)).is_empty(),
        "the opt-out made while the daemon was not watching was missed"
    );
}

/// The daemon's watches are cut while the cluster changes, and their resume is refused, first
/// with an HTTP 410 (as a proxy may answer), then with kube-apiserver's own in-stream
/// `410 Gone` ("too old resource version"). Each time the daemon relists, and what changed
/// while it was not watching (a new Deployment, an opt-out) is not missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_relists_on_410_gone_without_missing_a_change() {
    let mut h = Harness::real().await;
    h.api.insert(deployment("apps", "old", &[&gar("app:v1")]));
    h.api
        .insert(deployment("apps", "optout", &[&gar("app:v1")]));
    h.start_synced().await;
    let from = h.api.requests().len();

    // Cut off: every watch request is refused while the cluster changes.
    h.api
        .add_fault(Fault::error("/deployments", 503).on_query("watch="));
    h.api.proxy().cut_connections();
    h.api.insert(deployment("apps", "new", &[&gar("app:v1")]));
    h.api.modify("deployments", "apps", "optout", |o| {
        o["metadata"]["annotations"]["gar-restarter/enabled"] = "false".into();
    });
    assert!(
        wait_until(Duration::from_secs(20), || since(&h, from)
            .iter()
            .any(|r| is_deployment_watch(r) && r.status == 503))
        .await,
        "the daemon never tried to resume its watch: {:?}",
        since(&h, from)
    );
    let refused = h.api.requests().len();
    h.api.clear_faults();
    h.api.add_fault(
        Fault::error("/deployments", 410)
            .on_query("watch=")
            .times(1),
    );
    h.api
        .add_fault(Fault::expire_watch("/deployments").times(1));
    // Each refused or expired watch makes the daemon relist; the third watch stays open.
    let watches = |h: &Harness| -> Vec<u16> {
        since(h, refused)
            .iter()
            .filter(|r| is_deployment_watch(r))
            .map(|r| r.status)
            // A retry may still have met the 503 rule while the rules were being swapped.
            .skip_while(|s| *s == 503)
            .collect()
    };
    assert!(
        wait_until(Duration::from_secs(40), || watches(&h).len() >= 3
            && h.metric(SYNCED) == 1.0)
        .await,
        "the daemon did not watch again after the 410s: {:?}\n{}",
        watches(&h),
        h.daemon_log()
    );
    let statuses = watches(&h);
    assert_eq!(
        statuses[..3],
        [410, 200, 200],
        "the refused resume, the expired one, then a watch that stays open"
    );
    let lists = since(&h, refused)
        .iter()
        .filter(|r| is_deployment_list(r))
        .count();
    assert!(lists >= 2, "a relist after each 410: {lists} LISTs");
    assert!(
        h.metric("gar_restarter_watch_errors_total{kind=\"deployments\"}") >= 3.0,
        "the refused and expired watches are counted"
    );
    push_reaches(&mut h, "new", "optout").await;
}

/// kube-apiserver restarts (every watch breaks, its watch cache starts over) and the cluster
/// changes before the daemon can watch again: the daemon resumes (or relists, if the server
/// no longer has its resourceVersion) and misses nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watch_survives_an_api_server_restart_without_missing_a_change() {
    let mut h = Harness::real().await;
    h.api.insert(deployment("apps", "old", &[&gar("app:v1")]));
    h.api
        .insert(deployment("apps", "optout", &[&gar("app:v1")]));
    h.start_synced().await;

    // Until the test has changed the cluster, the daemon cannot watch again.
    h.api.add_fault(Fault::error("", 503).on_query("watch="));
    let api = h.api.clone();
    let took = tokio::task::spawn_blocking(move || api.cluster().restart_apiserver())
        .await
        .expect("the restart task")
        .expect("kube-apiserver restarted");
    eprintln!("kube-apiserver restarted in {took:.1?}");
    h.api.insert(deployment("apps", "new", &[&gar("app:v1")]));
    h.api.modify("deployments", "apps", "optout", |o| {
        o["metadata"]["annotations"]["gar-restarter/enabled"] = "false".into();
    });
    let from = h.api.requests().len();
    h.api.clear_faults();
    assert!(
        wait_until(Duration::from_secs(30), || since(&h, from)
            .iter()
            .any(|r| is_deployment_watch(r) && r.status == 200))
        .await,
        "the daemon did not watch again after the restart: {}",
        h.daemon_log()
    );
    // The events since its resourceVersion (or the relist) arrive right after the watch opens.
    tokio::time::sleep(Duration::from_millis(500)).await;
    push_reaches(&mut h, "new", "optout").await;
}

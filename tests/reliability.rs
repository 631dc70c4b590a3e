//! "Never lose, never duplicate": fault tests against the real daemon binary, pstest and a
//! real kube-apiserver, with the faults injected by the proxy in front of it.
//!
//! Every test asserts what an operator could observe: the PATCHes the API server accepted
//! (filtered to workload PATCHes, since the daemon may also talk to its cache ConfigMap), the
//! dead-letter topic and `/metrics`. Timings that matter (resume after an emulator restart,
//! exit after SIGTERM) are measured and printed, so `--nocapture` shows them.

mod common;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use gar_testsupport::objects::deployment;
use gar_testsupport::traffic::Fault;
use google_cloud_pubsub::model::Message;

/// pstest redelivers an unacked message once its ack deadline (10 s at the least) has passed;
/// waits that depend on a redelivery allow for that plus generous scheduling slack.
const REDELIVERY_WAIT: Duration = Duration::from_secs(35);

fn sha(hex: &str) -> String {
    format!("sha256:{hex}")
}

/// Waits until every expected (path, digest) pair has an accepted PATCH.
async fn wait_for_pairs(
    h: &Harness,
    expected: &HashSet<(String, String)>,
    timeout: Duration,
) -> bool {
    wait_until(timeout, || missing_pairs(&h.api, expected).is_empty()).await
}

/// Pushes in publish order, per workload path: what "nothing lost" means once late events
/// are skipped. Every workload must end at its last push, and the pushes it was restarted for
/// must follow publish order without a repeat: no (workload, digest) twice, and never an
/// older digest over a newer one (a late event is acked as stale instead).
#[derive(Default)]
struct PushLog {
    order: HashMap<String, Vec<String>>,
}

impl PushLog {
    fn push(&mut self, path: String, digest: String) {
        self.order.entry(path).or_default().push(digest);
    }

    fn lagging(&self, h: &Harness) -> Vec<(String, Option<String>, String)> {
        let mut lagging: Vec<_> = self
            .order
            .iter()
            .filter_map(|(path, digests)| {
                let (ns, name) = path_ns_name(path);
                let now = restart_annotations(&h.deployment(ns, name)).1;
                let last = digests.last()?.clone();
                (now.as_ref() != Some(&last)).then(|| (path.clone(), now, last))
            })
            .collect();
        lagging.sort();
        lagging
    }

    async fn wait_all_at_last_push(&self, h: &Harness, timeout: Duration) -> bool {
        wait_until(timeout, || self.lagging(h).is_empty()).await
    }

    fn assert_in_publish_order(&self, h: &Harness) {
        let accepted = accepted_patches(&h.api);
        for (path, digests) in &self.order {
            let positions: Vec<usize> = accepted
                .iter()
                .filter(|(p, _)| p == path)
                .filter_map(|(_, d)| d.as_ref())
                .map(|d| {
                    digests
                        .iter()
                        .position(|x| x == d)
                        .unwrap_or_else(|| panic!("{path}: restarted for unknown {d}"))
                })
                .collect();
            assert!(
                positions.windows(2).all(|w| w[0] < w[1]),
                "{path}: restarts out of publish order or repeated: {positions:?}"
            );
        }
    }
}

fn path_ns_name(path: &str) -> (&str, &str) {
    let rest = path
        .strip_prefix("/apis/apps/v1/namespaces/")
        .expect("a namespaced apps path");
    let (ns, rest) = rest.split_once('/').expect("namespace");
    (ns, rest.rsplit('/').next().expect("name"))
}

fn dead_letter_total(metrics: &str) -> f64 {
    ["malformed", "permanent", "exhausted"]
        .iter()
        .map(|k| {
            metric_value(
                metrics,
                &format!("gar_restarter_dead_letters_total{{kind=\"{k}\"}}"),
            )
        })
        .sum()
}

/// (a) SIGKILL three times while 240 events stream in: every workload still ends at its last
/// push, because nothing is acked before its PATCH succeeded and a killed replica's unacked
/// messages come back after the ack deadline; and those late messages never write an older
/// digest over a newer one or restart a workload twice for one digest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_a_stream_loses_no_event() {
    const WORKLOADS: usize = 20;
    const EVENTS: usize = 240;
    let mut h = Harness::real().await;
    for i in 0..WORKLOADS {
        h.api.insert(deployment(
            "prod",
            &format!("svc{i}"),
            &[&gar(&format!("svc{i}:v1"))],
        ));
    }
    // Slow PATCHes keep a handful of messages in flight (received, not yet acked) at any time,
    // so every kill catches some mid-restart.
    h.api
        .add_fault(Fault::delay("/deployments/", Duration::from_millis(150)).on_method("PATCH"));
    h.start_daemon().await;

    let mut pushes = PushLog::default();
    let mut payloads = Vec::new();
    for n in 0..EVENTS {
        let w = n % WORKLOADS;
        let hex = hex_digest(n + 1);
        pushes.push(deployment_path("prod", &format!("svc{w}")), sha(&hex));
        payloads.push(insert(&format!("svc{w}:v1"), &hex));
    }
    let publisher = topic_publisher(&h.emulator.endpoint(), &h.emulator.topic(TOPIC)).await;
    let published = Arc::new(AtomicUsize::new(0));
    let publishing = {
        let published = published.clone();
        tokio::spawn(async move {
            for p in payloads {
                publisher
                    .publish(Message::new().set_data(Bytes::from(p)))
                    .await
                    .expect("publish");
                published.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        })
    };

    // Kill at fixed points of the stream, however fast the machine is.
    let mut at_kill = Vec::new();
    for threshold in [50, 110, 170] {
        assert!(
            wait_until(Duration::from_secs(30), || {
                published.load(Ordering::SeqCst) >= threshold
            })
            .await
        );
        let in_flight = h.metric("gar_restarter_in_flight");
        h.kill_daemon();
        let sent = published.load(Ordering::SeqCst);
        at_kill.push((sent, accepted_patches(&h.api).len(), in_flight));
        assert!(
            sent < EVENTS,
            "kill {threshold} landed after the stream ended"
        );
        h.start_daemon().await;
    }
    let last_kill = Instant::now();
    assert!(
        at_kill.iter().any(|(_, _, in_flight)| *in_flight > 0.0),
        "no kill caught a message in flight: {at_kill:?}"
    );
    tokio::time::timeout(Duration::from_secs(30), publishing)
        .await
        .expect("publishing finishes")
        .expect("publisher task");

    let done = pushes.wait_all_at_last_push(&h, REDELIVERY_WAIT).await;
    let lagging = pushes.lagging(&h);
    assert!(
        done,
        "{} of {WORKLOADS} workloads not at their last push, e.g. {:?}\n{}",
        lagging.len(),
        lagging.iter().take(5).collect::<Vec<_>>(),
        h.daemon_log()
    );
    pushes.assert_in_publish_order(&h);
    let accepted = accepted_patches(&h.api).len();
    eprintln!(
        "kill test: (published, accepted PATCHes, in flight) at each kill {at_kill:?}; every \
         workload at its last push {:.1}s after the last kill; {accepted} accepted PATCHes for \
         {EVENTS} events (the rest skipped as duplicate or stale)",
        last_kill.elapsed().as_secs_f64(),
    );
}

/// (a, variant) Killed while a slow PATCH runs, after the SDK has extended the message's
/// lease: the message comes back after the short extension deadline (10 s), not after the
/// minutes a long extension would hold it for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_a_lease_extension_redelivers_within_seconds() {
    let mut h = Harness::real().await;
    h.api.insert(deployment("prod", "api", &[&gar("app:v1")]));
    let api = deployment_path("prod", "api");
    // The first PATCH hangs, then fails (the client is gone by then anyway).
    h.api.add_fault(Fault {
        latency: Some(Duration::from_secs(8)),
        ..Fault::error(api.clone(), 503).on_method("PATCH").times(1)
    });
    h.start_daemon().await;
    h.publish(&insert("app:v1", HEX_A)).await;
    assert!(
        wait_until(Duration::from_secs(10), || {
            h.metric("gar_restarter_in_flight") == 1.0
        })
        .await,
        "{}",
        h.metrics()
    );
    // Lease extensions happen 0.5 s after receipt and every 3 s after that.
    tokio::time::sleep(Duration::from_secs(4)).await;
    h.kill_daemon();
    let killed = Instant::now();
    h.start_daemon().await;
    let expected = HashSet::from([(api.clone(), sha(HEX_A))]);
    let done = wait_for_pairs(&h, &expected, REDELIVERY_WAIT).await;
    let took = killed.elapsed();
    eprintln!(
        "kill after lease extension: redelivered and restarted {:.2}s after SIGKILL",
        took.as_secs_f64()
    );
    assert!(
        done,
        "not redelivered within {REDELIVERY_WAIT:?}\n{}",
        h.daemon_log()
    );
    assert!(
        took <= Duration::from_secs(20),
        "redelivery took {took:?}: the lease extension deadline is too long"
    );
}

/// A `Retry-After` longer than the retry budget is not slept on: the delivery gives up within
/// its budget and the redelivery succeeds, instead of holding the message for 20 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_beyond_the_budget_is_not_slept_on() {
    let mut h = Harness::real().await;
    h.api.insert(deployment("prod", "api", &[&gar("app:v1")]));
    let api = deployment_path("prod", "api");
    h.api.add_fault(
        Fault::error(api.clone(), 429)
            .on_method("PATCH")
            .with_retry_after(20)
            .times(1),
    );
    h.extra_args = vec!["--retry-budget".into(), "2s".into()];
    h.start_daemon().await;
    let published = Instant::now();
    h.publish(&insert("app:v1", HEX_A)).await;
    let expected = HashSet::from([(api.clone(), sha(HEX_A))]);
    let done = wait_for_pairs(&h, &expected, Duration::from_secs(30)).await;
    let took = published.elapsed();
    eprintln!(
        "Retry-After 20 s with a 2 s budget: restarted {:.2}s after publishing",
        took.as_secs_f64()
    );
    assert!(done, "{}", h.daemon_log());
    assert!(
        took <= Duration::from_secs(8),
        "took {took:?}: the 20 s Retry-After was slept on despite the 2 s budget"
    );
    let statuses: Vec<u16> = patches_to(&h.api, &api).iter().map(|p| p.status).collect();
    assert_eq!(statuses, vec![429, 200]);
}

/// (b) 30 % of PATCHes fail with 503 or 429 (Retry-After: 1): in-process retries and
/// redelivery absorb them all; nothing is dead-lettered, every workload ends at its last push
/// and none is ever set back to an older one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flaky_api_completes_every_event_without_dead_letters() {
    const APPS: usize = 5;
    const EVENTS: usize = 30;
    let mut h = Harness::real().await;
    for i in 0..APPS {
        for ns in ["prod", "staging"] {
            h.api.insert(deployment(
                ns,
                &format!("app{i}"),
                &[&gar(&format!("app{i}:v1"))],
            ));
        }
    }
    // The first firing error wins: 0.15 + 0.85 * 0.1765 ≈ 0.30 of PATCHes fail.
    h.api.add_fault(
        Fault::error("/deployments/", 503)
            .on_method("PATCH")
            .with_probability(0.15),
    );
    h.api.add_fault(
        Fault::error("/deployments/", 429)
            .on_method("PATCH")
            .with_probability(0.1765)
            .with_retry_after(1),
    );
    h.start_daemon().await;

    let mut pushes = PushLog::default();
    for n in 0..EVENTS {
        let app = format!("app{}", n % APPS);
        let hex = hex_digest(1000 + n);
        for ns in ["prod", "staging"] {
            pushes.push(deployment_path(ns, &app), sha(&hex));
        }
        h.publish(&insert(&format!("{app}:v1"), &hex)).await;
    }
    let done = pushes
        .wait_all_at_last_push(&h, Duration::from_secs(45))
        .await;
    assert!(
        done,
        "not at the last push: {:?}\n{}",
        pushes.lagging(&h),
        h.daemon_log()
    );
    pushes.assert_in_publish_order(&h);

    let failed: HashMap<u16, usize> =
        workload_patches(&h.api)
            .iter()
            .fold(HashMap::new(), |mut m, p| {
                *m.entry(p.status).or_default() += 1;
                m
            });
    eprintln!("flaky API: PATCH statuses {failed:?}");
    assert!(
        failed.get(&503).copied().unwrap_or(0) > 0 && failed.get(&429).copied().unwrap_or(0) > 0,
        "the faults must have fired: {failed:?}"
    );
    let letters = h.dead_letters(1, Duration::from_secs(2)).await;
    assert!(letters.is_empty(), "dead-lettered: {:?}", letters);
    assert!(
        wait_until(Duration::from_secs(5), || {
            h.metric("gar_restarter_events_settled_total{outcome=\"ack\"}") >= EVENTS as f64
        })
        .await,
        "{}",
        h.metrics()
    );
    assert_eq!(dead_letter_total(&h.metrics()), 0.0, "{}", h.metrics());
}

/// (c) One of three workloads answers 403: the event is dead-lettered as `permanent`, naming
/// that workload and the status, and the other two are restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forbidden_workload_dead_letters_the_event_and_restarts_the_others() {
    let mut h = Harness::real().await;
    for name in ["a", "b", "c"] {
        h.api.insert(deployment("prod", name, &[&gar("app:v1")]));
    }
    h.api
        .add_fault(Fault::error(deployment_path("prod", "b"), 403).on_method("PATCH"));
    h.start_daemon().await;
    let id = h.publish(&insert("app:v1", HEX_A)).await;

    let reason = h.permanent_dead_letter(&id, "Deployment prod/b", 403).await;
    assert!(
        !reason.contains("prod/a") && !reason.contains("prod/c"),
        "{reason}"
    );
    for name in ["a", "c"] {
        let (at, digest) = restart_annotations(&h.deployment("prod", name));
        assert!(at.is_some(), "prod/{name} restarted");
        assert_eq!(digest, Some(sha(HEX_A)));
    }
    assert_eq!(
        restart_annotations(&h.deployment("prod", "b")),
        (None, None)
    );
    // Restarted once each. A PATCH may also have met 409 (its precondition is the
    // resourceVersion the decision was taken on, and a new Deployment's status is still
    // moving); that one changed nothing and was decided again.
    let accepted = accepted_patches(&h.api);
    for name in ["a", "c"] {
        let path = deployment_path("prod", name);
        assert_eq!(
            accepted.iter().filter(|(p, _)| *p == path).count(),
            1,
            "prod/{name} restarted once: {accepted:?}"
        );
        assert!(
            patches_to(&h.api, &path)
                .iter()
                .all(|p| (200..300).contains(&p.status) || p.status == 409),
            "prod/{name}: only 2xx or 409"
        );
    }
}

/// (d) The emulator restarts (all its state lost, message ids start again at m0): the daemon
/// reconnects by itself and processes new events within 5 s of the emulator being back, even
/// a tag-only event whose message id repeats one seen before the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emulator_restart_resumes_within_five_seconds() {
    let mut h = Harness::real().await;
    h.api.insert(deployment("prod", "web", &[&gar("web:v1")]));
    h.api.insert(deployment("prod", "api", &[&gar("app:v1")]));
    h.start_daemon().await;
    let web = deployment_path("prod", "web");
    let api = deployment_path("prod", "api");
    let tag_only = serde_json::json!({"action": "INSERT", "tag": gar("web:v1")}).to_string();

    let first_web = h.publish(&tag_only).await;
    h.publish(&insert("app:v1", HEX_A)).await;
    assert!(
        wait_until(Duration::from_secs(10), || {
            restarts_of(&h.api, &web) == 1
                && missing_pairs(&h.api, &HashSet::from([(api.clone(), sha(HEX_A))])).is_empty()
        })
        .await,
        "{}",
        h.daemon_log()
    );
    // Let the acks reach the emulator before it goes away.
    assert!(
        wait_until(Duration::from_secs(5), || {
            h.metric("gar_restarter_events_settled_total{outcome=\"ack\"}") >= 2.0
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(500)).await;

    h.emulator.restart().await.expect("restart emulator");
    let back = Instant::now();
    let second_web = h.publish_retrying(&tag_only, Duration::from_secs(5)).await;
    h.publish_retrying(&insert("app:v1", HEX_B), Duration::from_secs(5))
        .await;
    let expected = HashSet::from([(api.clone(), sha(HEX_B))]);
    let resumed = wait_until(Duration::from_secs(20), || {
        patches_to(&h.api, &web)
            .iter()
            .filter(|p| p.status == 200)
            .count()
            == 2
            && missing_pairs(&h.api, &expected).is_empty()
    })
    .await;
    let took = back.elapsed();
    eprintln!(
        "emulator restart: events published after the restart processed {:.2}s after the \
         emulator was back (message ids {first_web} before, {second_web} after)",
        took.as_secs_f64()
    );
    assert!(
        resumed,
        "not processed after the emulator restart (web PATCHes: {}, api missing: {:?})\n{}",
        patches_to(&h.api, &web).len(),
        missing_pairs(&h.api, &expected),
        h.daemon_log()
    );
    assert!(
        took <= Duration::from_secs(5),
        "took {took:?} to resume after the emulator came back\n{}",
        h.daemon_log()
    );
}

/// (e) The same event published three times, close together and with slow PATCHes so the
/// copies are in flight at once: exactly one PATCH per workload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_events_restart_each_workload_once() {
    let mut h = Harness::real().await;
    h.api.insert(deployment("prod", "api", &[&gar("app:v1")]));
    h.api
        .insert(deployment("staging", "api", &[&gar("app:v1")]));
    h.api
        .add_fault(Fault::delay("/deployments/", Duration::from_millis(300)).on_method("PATCH"));
    h.start_daemon().await;
    let body = insert("app:v1", HEX_A);
    for _ in 0..3 {
        h.publish(&body).await;
    }
    assert!(
        wait_until(Duration::from_secs(15), || {
            h.metric("gar_restarter_events_settled_total{outcome=\"ack\"}") >= 3.0
        })
        .await,
        "{}\n{}",
        h.metrics(),
        h.daemon_log()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    for ns in ["prod", "staging"] {
        let n = restarts_of(&h.api, &deployment_path(ns, "api"));
        assert_eq!(n, 1, "{ns}/api PATCHed {n} times\n{}", h.daemon_log());
    }
    assert_eq!(accepted_patches(&h.api).len(), 2);
}

/// (f) Each class of malformed message reaches the dead-letter topic as `malformed`, with a
/// reason naming the problem and the payload unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_are_dead_lettered_with_a_reason_per_class() {
    let mut h = Harness::real().await;
    h.api.insert(deployment("prod", "api", &[&gar("app:v1")]));
    h.start_daemon().await;
    h.api.clear_requests();

    let huge = format!(
        r#"{{"action":"INSERT","tag":"{}","pad":"{}"}}"#,
        gar("app:v1"),
        "x".repeat(70_000)
    );
    let cases: Vec<(&str, String, &[&str])> = vec![
        ("not-json", "{not json".into(), &["not a JSON object"]),
        (
            "missing-action",
            serde_json::json!({"tag": gar("app:v1")}).to_string(),
            &["no \"action\" field"],
        ),
        (
            "unknown-action",
            serde_json::json!({"action": "UPDATE", "tag": gar("app:v1")}).to_string(),
            &["unknown action \"UPDATE\""],
        ),
        (
            "invalid-reference",
            serde_json::json!({"action": "INSERT", "tag": "Not A Ref"}).to_string(),
            &["field \"tag\"", "\"Not A Ref\"", "invalid"],
        ),
        ("too-large", huge.clone(), &["over the 64 KiB limit"]),
        (
            "tag-is-digest",
            serde_json::json!({"action": "INSERT", "tag": gar(&format!("app@sha256:{HEX_A}"))})
                .to_string(),
            &["digest reference, not a tag"],
        ),
    ];
    let mut sent = HashMap::new();
    for (case, body, _) in &cases {
        let attrs = HashMap::from([("case".to_string(), case.to_string())]);
        let id = h.publish_with(body, attrs).await;
        sent.insert(case.to_string(), (id, body.clone()));
    }
    let letters = h.dead_letters(cases.len(), Duration::from_secs(20)).await;
    assert_eq!(letters.len(), cases.len(), "{}", h.daemon_log());
    let by_case: HashMap<String, &Message> = letters
        .iter()
        .map(|m| (m.attributes["case"].clone(), m))
        .collect();
    for (case, _, needles) in &cases {
        let dl = by_case
            .get(*case)
            .unwrap_or_else(|| panic!("{case} not dead-lettered"));
        let (id, body) = &sent[*case];
        assert_eq!(dl.attributes["dlq_kind"], "malformed", "{case}");
        assert_eq!(&dl.attributes["dlq_original_message_id"], id, "{case}");
        assert_eq!(dl.attributes["dlq_attempts"], "1", "{case}");
        assert_eq!(dl.data.as_ref(), body.as_bytes(), "{case}: payload kept");
        let reason = &dl.attributes["dlq_reason"];
        for needle in *needles {
            assert!(
                reason.contains(needle),
                "{case}: {reason:?} lacks {needle:?}"
            );
        }
    }
    assert!(
        workload_patches(&h.api).is_empty(),
        "nothing malformed restarts anything"
    );
    assert!(
        wait_until(Duration::from_secs(5), || {
            h.metric("gar_restarter_dead_letters_total{kind=\"malformed\"}") == cases.len() as f64
        })
        .await,
        "{}",
        h.metrics()
    );
}

/// (g) SIGTERM during a burst with slow PATCHes: the daemon exits 0 within the shutdown
/// timeout (plus a margin for flushing acks), and everything it did not finish is processed
/// by the next daemon.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_burst_exits_in_time_and_redelivers_the_rest() {
    const EVENTS: usize = 30;
    const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(2);
    let mut h = Harness::real().await;
    for i in 0..EVENTS {
        h.api.insert(deployment(
            "prod",
            &format!("w{i}"),
            &[&gar(&format!("w{i}:v1"))],
        ));
    }
    h.api
        .add_fault(Fault::delay("/deployments/", Duration::from_millis(300)).on_method("PATCH"));
    // One PATCH hangs past the shutdown timeout, so the drain has to give up on it.
    h.api.add_fault(
        Fault::delay(deployment_path("prod", "w0"), Duration::from_secs(8))
            .on_method("PATCH")
            .times(1),
    );
    h.extra_args = vec![
        "--shutdown-timeout".into(),
        "2s".into(),
        "--max-in-flight".into(),
        "4".into(),
    ];
    h.start_daemon().await;

    let mut expected = HashSet::new();
    for i in 0..EVENTS {
        let hex = hex_digest(i + 1);
        expected.insert((deployment_path("prod", &format!("w{i}")), sha(&hex)));
        h.publish(&insert(&format!("w{i}:v1"), &hex)).await;
    }
    assert!(
        wait_until(Duration::from_secs(10), || accepted_patches(&h.api).len()
            >= 3)
        .await,
        "{}",
        h.daemon_log()
    );
    let started = Instant::now();
    let status = h.terminate_daemon(Duration::from_secs(20));
    let took = started.elapsed();
    let accepted_at_exit = accepted_patches(&h.api).len();
    eprintln!(
        "shutdown: exited with {status:?} {:.2}s after SIGTERM (--shutdown-timeout 2s); \
         {accepted_at_exit}/{EVENTS} restarted by then",
        took.as_secs_f64()
    );
    let status = status.expect("daemon exits after SIGTERM");
    assert!(status.success(), "exit status {status}\n{}", h.daemon_log());
    assert!(
        took <= SHUTDOWN_TIMEOUT + Duration::from_secs(3),
        "took {took:?} to exit"
    );
    assert!(
        h.daemon_log().contains("shutdown timeout reached"),
        "the hanging PATCH must have outlived the drain\n{}",
        h.daemon_log()
    );
    assert!(
        accepted_at_exit < EVENTS,
        "the burst must still have been in progress at SIGTERM"
    );

    h.start_daemon().await;
    let done = wait_for_pairs(&h, &expected, REDELIVERY_WAIT).await;
    assert!(
        done,
        "lost after SIGTERM: {:?}\n{}",
        missing_pairs(&h.api, &expected),
        h.daemon_log()
    );
}

/// (h) Partial success: of three workloads, one fails twice with 503 and in-process retries
/// are off (`--retry-budget 0s`), so the message is nacked twice; each redelivery PATCHes only
/// the failed workload again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redelivery_after_partial_success_patches_only_what_failed() {
    let mut h = Harness::real().await;
    for name in ["a", "b", "c"] {
        h.api.insert(deployment("prod", name, &[&gar("app:v1")]));
    }
    h.api.add_fault(
        Fault::error(deployment_path("prod", "c"), 503)
            .on_method("PATCH")
            .times(2),
    );
    h.extra_args = vec!["--retry-budget".into(), "0s".into()];
    h.start_daemon().await;
    let published = Instant::now();
    h.publish(&insert("app:v1", HEX_A)).await;

    let c = deployment_path("prod", "c");
    assert!(
        wait_until(REDELIVERY_WAIT, || {
            patches_to(&h.api, &c).iter().any(|p| p.status == 200)
        })
        .await,
        "{}",
        h.daemon_log()
    );
    eprintln!(
        "partial success: c restarted on the third delivery {:.2}s after publishing",
        published.elapsed().as_secs_f64()
    );
    assert!(
        wait_until(Duration::from_secs(5), || {
            h.metric("gar_restarter_events_settled_total{outcome=\"ack\"}") == 1.0
        })
        .await
    );
    let statuses: Vec<u16> = patches_to(&h.api, &c)
        .iter()
        .map(|p| p.status)
        .filter(|s| *s != 409)
        .collect();
    assert_eq!(statuses, vec![503, 503, 200]);
    for name in ["a", "b"] {
        assert_eq!(
            restarts_of(&h.api, &deployment_path("prod", name)),
            1,
            "prod/{name} must not be PATCHed again on redelivery\n{}",
            h.daemon_log()
        );
    }
    assert_eq!(
        h.metric("gar_restarter_events_settled_total{outcome=\"nack\"}"),
        2.0
    );
    assert_eq!(dead_letter_total(&h.metrics()), 0.0);
}

/// (i) A workload that always answers 503, with `--max-attempts 2`: after the second
/// delivery the message is dead-lettered as `exhausted` with the last error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn always_failing_workload_is_dead_lettered_as_exhausted() {
    let mut h = Harness::real().await;
    h.api.insert(deployment("prod", "api", &[&gar("app:v1")]));
    h.api
        .add_fault(Fault::error(deployment_path("prod", "api"), 503).on_method("PATCH"));
    h.extra_args = vec![
        "--max-attempts".into(),
        "2".into(),
        "--retry-budget".into(),
        "300ms".into(),
    ];
    h.start_daemon().await;
    let published = Instant::now();
    let id = h.publish(&insert("app:v1", HEX_A)).await;

    let letters = h.dead_letters(1, REDELIVERY_WAIT).await;
    assert_eq!(letters.len(), 1, "{}", h.daemon_log());
    eprintln!(
        "exhausted: dead-lettered {:.2}s after publishing",
        published.elapsed().as_secs_f64()
    );
    let dl = &letters[0];
    assert_eq!(dl.attributes["dlq_kind"], "exhausted");
    assert_eq!(dl.attributes["dlq_attempts"], "2");
    assert_eq!(dl.attributes["dlq_original_message_id"], id);
    let reason = &dl.attributes["dlq_reason"];
    for needle in ["after 2 attempts", "Deployment prod/api", "503"] {
        assert!(reason.contains(needle), "{reason:?} lacks {needle:?}");
    }
    assert_eq!(
        restart_annotations(&h.deployment("prod", "api")),
        (None, None)
    );
    assert!(
        wait_until(Duration::from_secs(5), || {
            h.metric("gar_restarter_dead_letters_total{kind=\"exhausted\"}") == 1.0
        })
        .await
    );
    assert_eq!(
        h.metric("gar_restarter_events_settled_total{outcome=\"nack\"}"),
        1.0
    );
}

/// (j) Two daemons on one subscription: all 50 events are processed, no workload is
/// restarted twice for one digest or set back to an older one, every workload ends at its
/// last push, and pstest's round-robin gives both replicas a share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_the_subscription_without_duplicates() {
    const APPS: usize = 10;
    const EVENTS: usize = 50;
    let mut h = Harness::real().await;
    for i in 0..APPS {
        for ns in ["prod", "staging"] {
            h.api.insert(deployment(
                ns,
                &format!("app{i}"),
                &[&gar(&format!("app{i}:v1"))],
            ));
        }
    }
    h.start_daemon().await;
    let second = h.spawn_extra_daemon("replica-2").await;

    // Published as one batch: pstest hands the messages that are ready in one 10 ms tick out
    // round-robin, but starts every tick at the first stream, so messages published one at a
    // time would nearly all go to whichever replica connected first.
    let mut pushes = PushLog::default();
    let publisher = topic_publisher(&h.emulator.endpoint(), &h.emulator.topic(TOPIC)).await;
    let mut pending = Vec::new();
    for n in 0..EVENTS {
        let app = format!("app{}", n % APPS);
        let hex = hex_digest(5000 + n);
        for ns in ["prod", "staging"] {
            pushes.push(deployment_path(ns, &app), sha(&hex));
        }
        let body = insert(&format!("{app}:v1"), &hex);
        pending.push(publisher.publish(Message::new().set_data(Bytes::from(body))));
    }
    for id in futures::future::join_all(pending).await {
        id.expect("publish");
    }
    let done = pushes
        .wait_all_at_last_push(&h, Duration::from_secs(30))
        .await;
    assert!(
        done,
        "not at the last push: {:?}\n{}",
        pushes.lagging(&h),
        second.log()
    );
    let acked = |m: &str| metric_value(m, "gar_restarter_events_settled_total{outcome=\"ack\"}");
    assert!(
        wait_until(Duration::from_secs(5), || acked(&h.metrics())
            + acked(&second.metrics())
            >= EVENTS as f64)
        .await
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let first_received = h.metric("gar_restarter_events_received_total{action=\"insert\"}");
    let second_received = second.metric("gar_restarter_events_received_total{action=\"insert\"}");
    eprintln!(
        "two replicas: events received {first_received} + {second_received}; {} workload PATCHes",
        workload_patches(&h.api).len()
    );
    pushes.assert_in_publish_order(&h);
    assert_eq!(first_received + second_received, EVENTS as f64);
    assert!(
        first_received > 0.0 && second_received > 0.0,
        "both replicas should have processed some events: {first_received} / {second_received}"
    );
}

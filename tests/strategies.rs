//! Strategies, the pull-policy warning and Kubernetes Events (issue #13, sections 1, 2 and 4)
//! against a real kube-apiserver: the objects and the `events.k8s.io/v1` Events are read back.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

const HEX_C: &str = "cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc";

fn container(name: &str, image: &str) -> Value {
    json!({"name": name, "image": image})
}

/// A Deployment with these containers and initContainers and workload annotations.
fn workload(
    ns: &str,
    name: &str,
    containers: Vec<Value>,
    init: Vec<Value>,
    annotations: &[(&str, &str)],
) -> Value {
    let mut obj = gar_testsupport::objects::deployment(ns, name, &["placeholder"]);
    obj["spec"]["template"]["spec"]["containers"] = Value::from(containers);
    if !init.is_empty() {
        obj["spec"]["template"]["spec"]["initContainers"] = Value::from(init);
    }
    for (k, v) in annotations {
        obj["metadata"]["annotations"][*k] = json!(v);
    }
    obj
}

/// `name`'s image in the Deployment as the API server has it now.
fn image_of(obj: &Value, list: &str, name: &str) -> Option<String> {
    obj.pointer(&format!("/spec/template/spec/{list}"))?
        .as_array()?
        .iter()
        .find(|c| c["name"] == name)?
        .get("image")?
        .as_str()
        .map(str::to_owned)
}

fn pinned(tag: &str, hex: &str) -> String {
    format!("{}@sha256:{hex}", gar(tag))
}

/// Waits until `ns/name` has at least `n` Events with `reason`; returns their notes.
async fn wait_events(h: &Harness, ns: &str, name: &str, reason: &str, n: usize) -> Vec<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let notes: Vec<String> = events_on(h, ns, name)
            .await
            .into_iter()
            .filter(|(_, r, _)| r == reason)
            .map(|(_, _, note)| note)
            .collect();
        if notes.len() >= n || std::time::Instant::now() > deadline {
            assert!(
                notes.len() >= n,
                "{ns}/{name}: {} {reason} Events, expected {n}: {:?}\n{}",
                notes.len(),
                events_on(h, ns, name).await,
                h.daemon_log()
            );
            return notes;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// pin-digest: one PATCH pins the matching container and initContainer (a sidecar is left
/// alone), writes the restart annotations and a `PinnedDigest` Event; the next push of the
/// tag finds the pinned workload under its tag and pins again. A hand-written `repo@sha256`
/// is never touched, nor is a workload whose strategy annotation is a typo.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pin_digest_pins_the_matching_containers_and_repins_on_the_next_push() {
    let mut h = Harness::real().await;
    let strategy = [("gar-restarter/strategy", "pin-digest")];
    h.api.insert(workload(
        "apps",
        "web",
        vec![
            container("app", &gar("app:v1")),
            container("proxy", &gar("proxy:v1")),
        ],
        vec![container("migrate", &gar("app:v1"))],
        &strategy,
    ));
    h.api.insert(workload(
        "apps",
        "manual",
        vec![container("app", &format!("{}@sha256:{HEX_C}", gar("app")))],
        vec![],
        &strategy,
    ));
    h.api.insert(workload(
        "apps",
        "typo",
        vec![container("app", &gar("app:v1"))],
        vec![],
        &[("gar-restarter/strategy", "pin_digest")],
    ));
    h.start_synced().await;

    let first = h.publish(&insert("app:v1", HEX_A)).await;
    assert!(
        wait_until(Duration::from_secs(20), || {
            image_of(&h.deployment("apps", "web"), "containers", "app")
                == Some(pinned("app:v1", HEX_A))
        })
        .await,
        "apps/web not pinned: {}",
        h.daemon_log()
    );
    let web = h.deployment("apps", "web");
    assert_eq!(
        image_of(&web, "initContainers", "migrate"),
        Some(pinned("app:v1", HEX_A)),
        "the initContainer is pinned too"
    );
    assert_eq!(
        image_of(&web, "containers", "proxy"),
        Some(gar("proxy:v1")),
        "the sidecar is untouched"
    );
    let (restarted_at, digest) = restart_annotations(&web);
    assert!(restarted_at.is_some(), "restartedAt is written");
    assert_eq!(digest, Some(format!("sha256:{HEX_A}")));
    assert_eq!(
        web.pointer("/spec/template/metadata/annotations/gar-restarter~1image")
            .and_then(Value::as_str),
        Some(gar("app:v1").as_str())
    );
    let notes = wait_events(&h, "apps", "web", "PinnedDigest", 1).await;
    let note = &notes[0];
    for part in [gar("app:v1"), format!("sha256:{HEX_A}"), first.clone()] {
        assert!(note.contains(&part), "{note:?} names {part}");
    }
    assert!(
        note.contains("container app") && note.contains("initContainer migrate"),
        "{note:?}"
    );
    assert!(
        !events_on(&h, "apps", "web")
            .await
            .iter()
            .any(|(_, r, _)| r == "StaleImageRisk"),
        "a pinned workload runs the digest whatever the pull policy"
    );

    // The next push of the tag finds the pinned workload under its tag and pins again.
    let second = h.publish(&insert("app:v1", HEX_B)).await;
    assert!(
        wait_until(Duration::from_secs(20), || {
            let web = h.deployment("apps", "web");
            image_of(&web, "containers", "app") == Some(pinned("app:v1", HEX_B))
                && image_of(&web, "initContainers", "migrate") == Some(pinned("app:v1", HEX_B))
        })
        .await,
        "apps/web not re-pinned: {}",
        h.daemon_log()
    );
    let web = h.deployment("apps", "web");
    assert_eq!(image_of(&web, "containers", "proxy"), Some(gar("proxy:v1")));
    assert_eq!(restart_annotations(&web).1, Some(format!("sha256:{HEX_B}")));
    let notes = wait_events(&h, "apps", "web", "PinnedDigest", 2).await;
    assert!(
        notes
            .iter()
            .any(|n| n.contains(&format!("sha256:{HEX_B}")) && n.contains(&second)),
        "{notes:?}"
    );
    assert_eq!(
        h.metric(
            "gar_restarter_restarts_total{kind=\"Deployment\",namespace=\"apps\",result=\"pinned\"}"
        ),
        2.0,
        "{}",
        h.metrics()
    );

    // Pinned by hand without a tag: not indexed, never touched.
    let manual = h.deployment("apps", "manual");
    assert_eq!(restart_annotations(&manual), (None, None));
    assert_eq!(
        image_of(&manual, "containers", "app"),
        Some(format!("{}@sha256:{HEX_C}", gar("app")))
    );
    // An unknown strategy is not guessed: skipped, counted and logged.
    let typo = h.deployment("apps", "typo");
    assert_eq!(restart_annotations(&typo), (None, None));
    assert_eq!(image_of(&typo, "containers", "app"), Some(gar("app:v1")));
    assert_eq!(
        h.metric("gar_restarter_restarts_total{kind=\"Deployment\",namespace=\"apps\",result=\"unknown_strategy\"}"),
        2.0
    );
    let log = h.daemon_log();
    assert!(
        log.contains("apps/typo") && log.contains("pin_digest") && log.contains("WARN"),
        "{log}"
    );
}

/// restart: a container whose pull policy is IfNotPresent (the API server's default for a
/// tag other than `latest`) is restarted but flagged: a Warning `StaleImageRisk` Event naming
/// image, digest, message id and the fix, the metric and a WARN line. Every restart gets a
/// Normal `Restarted` Event; `imagePullPolicy: Always` is not flagged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_flags_a_cached_pull_policy_and_writes_events() {
    let mut h = Harness::real().await;
    h.api.insert(workload(
        "apps",
        "api",
        vec![container("app", &gar("app:v2"))],
        vec![],
        &[],
    ));
    let mut always = container("app", &gar("app:v2"));
    always["imagePullPolicy"] = json!("Always");
    h.api
        .insert(workload("apps", "always", vec![always], vec![], &[]));
    h.start_synced().await;
    assert_eq!(
        h.metric("gar_restarter_stale_image_risk_total{kind=\"Deployment\"}"),
        0.0,
        "the series exists from start-up: {}",
        h.metrics()
    );

    let id = h.publish(&insert("app:v2", HEX_A)).await;
    assert!(
        wait_until(Duration::from_secs(20), || {
            restart_annotations(&h.deployment("apps", "api")).1 == Some(format!("sha256:{HEX_A}"))
                && restart_annotations(&h.deployment("apps", "always")).1
                    == Some(format!("sha256:{HEX_A}"))
        })
        .await,
        "not restarted: {}",
        h.daemon_log()
    );
    // A restart changes no image.
    assert_eq!(
        image_of(&h.deployment("apps", "api"), "containers", "app"),
        Some(gar("app:v2"))
    );
    let warnings = wait_events(&h, "apps", "api", "StaleImageRisk", 1).await;
    let note = &warnings[0];
    for part in [
        gar("app:v2"),
        format!("sha256:{HEX_A}"),
        id.clone(),
        "IfNotPresent".to_string(),
        "imagePullPolicy: Always".to_string(),
        "gar-restarter/strategy: pin-digest".to_string(),
    ] {
        assert!(note.contains(&part), "{note:?} names {part}");
    }
    let api_events = events_on(&h, "apps", "api").await;
    assert!(
        api_events
            .iter()
            .any(|(t, r, _)| t == "Warning" && r == "StaleImageRisk"),
        "{api_events:?}"
    );
    for name in ["api", "always"] {
        let notes = wait_events(&h, "apps", name, "Restarted", 1).await;
        assert!(
            notes[0].contains(&gar("app:v2"))
                && notes[0].contains(&format!("sha256:{HEX_A}"))
                && notes[0].contains(&id),
            "{name}: {notes:?}"
        );
    }
    assert!(
        events_on(&h, "apps", "always")
            .await
            .iter()
            .all(|(_, r, _)| r != "StaleImageRisk"),
        "imagePullPolicy: Always is not a risk"
    );
    assert_eq!(
        h.metric("gar_restarter_stale_image_risk_total{kind=\"Deployment\"}"),
        1.0
    );
    assert!(
        wait_until(Duration::from_secs(5), || {
            h.metric(
                "gar_restarter_kubernetes_events_total{reason=\"Restarted\",result=\"emitted\"}",
            ) >= 2.0
        })
        .await,
        "{}",
        h.metrics()
    );
    // The Recorder's latency, off the hot path (reported for BENCHMARKS-style notes).
    let (sum, count) = (
        h.metric("gar_restarter_kubernetes_event_seconds_sum"),
        h.metric("gar_restarter_kubernetes_event_seconds_count"),
    );
    eprintln!(
        "Kubernetes Event writes: {count} in {:.1} ms, {:.2} ms each",
        sum * 1e3,
        sum * 1e3 / count.max(1.0)
    );
    let log = h.daemon_log();
    assert!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains("apps/api")
            && l.contains("imagePullPolicy: Always")
            && l.contains("gar-restarter/strategy: pin-digest")),
        "{log}"
    );
}

/// `--dry-run` writes no Event (and patches nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_emits_no_events() {
    let mut h = Harness::real().await;
    h.api.insert(workload(
        "apps",
        "api",
        vec![container("app", &gar("app:v2"))],
        vec![],
        &[],
    ));
    h.extra_args.push("--dry-run".into());
    h.start_synced().await;
    h.publish(&insert("app:v2", HEX_A)).await;
    assert!(
        wait_until(Duration::from_secs(20), || {
            h.metric("gar_restarter_events_settled_total{outcome=\"ack\"}") >= 1.0
        })
        .await,
        "{}",
        h.daemon_log()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(events_on(&h, "apps", "api").await, vec![]);
    assert_eq!(
        restart_annotations(&h.deployment("apps", "api")),
        (None, None)
    );
    assert!(
        !h.api
            .requests()
            .iter()
            .any(|r| r.path.contains("events.k8s.io")),
        "no Event request"
    );
}

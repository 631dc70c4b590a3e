//! End to end: GAR events through pstest → the real daemon → a real kube-apiserver.

mod common;

use std::time::Duration;

use common::*;
use gar_testsupport::objects::deployment;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn insert_restarts_exactly_the_deployments_running_the_tag() {
    let mut h = Harness::real().await;
    h.api.insert(deployment("prod", "api", &[&gar("app:v1")]));
    h.api
        .insert(deployment("staging", "api", &[&gar("app:v1"), "redis:7"]));
    h.api.insert(deployment("prod", "old", &[&gar("app:v0")]));
    h.start_daemon().await;
    h.api.clear_requests();

    h.publish(&insert("app:v1", HEX_A)).await;
    assert!(
        wait_until(Duration::from_secs(10), || accepted_patches(&h.api).len()
            >= 2)
        .await,
        "two PATCHes expected\n{}",
        h.daemon_log()
    );
    for ns in ["prod", "staging"] {
        let (at, digest) = restart_annotations(&h.deployment(ns, "api"));
        assert!(at.is_some(), "{ns}/api restarted");
        assert_eq!(digest.as_deref(), Some(format!("sha256:{HEX_A}").as_str()));
    }
    assert_eq!(
        restart_annotations(&h.deployment("prod", "old")),
        (None, None)
    );

    // Exactly what kubectl sends, and nothing else on the hot path.
    let patches: Vec<_> = workload_patches(&h.api)
        .into_iter()
        .filter(|p| (200..300).contains(&p.status))
        .collect();
    assert_eq!(patches.len(), 2);
    for p in &patches {
        assert_eq!(
            p.content_type.as_deref(),
            Some("application/strategic-merge-patch+json")
        );
        assert_eq!(
            p.query_param("fieldManager").as_deref(),
            Some("gar-restarter")
        );
        let at = p.body.as_ref().unwrap()["spec"]["template"]["metadata"]["annotations"]
            ["kubectl.kubernetes.io/restartedAt"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(
            at.ends_with('Z') && at.len() == 20,
            "RFC 3339 seconds: {at}"
        );
    }
    // Nothing but PATCHes: no GET before acting (the live view decides), no LIST. A 409 may
    // show up when a Deployment's status moved since the view the decision was taken on. The
    // Kubernetes Events about the restarts are written in the background, off the hot path.
    let others: Vec<String> = h
        .api
        .requests()
        .into_iter()
        .filter(|r| r.method != "PATCH" && r.query_param("watch").is_none())
        .filter(|r| !(r.method == "POST" && r.path.starts_with("/apis/events.k8s.io/")))
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(
        others.is_empty(),
        "only PATCHes on the hot path: {others:?}"
    );
    assert!(
        h.api
            .patches()
            .iter()
            .all(|p| (200..300).contains(&p.status) || p.status == 409),
        "{:?}",
        h.api.patches()
    );

    // Acked: no redelivery within 15 s (pstest's ack deadline is 10 s).
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(
        h.metric("gar_restarter_events_received_total{action=\"insert\"}"),
        1.0
    );
    assert_eq!(
        h.metric("gar_restarter_events_settled_total{outcome=\"ack\"}"),
        1.0
    );
    assert_eq!(accepted_patches(&h.api).len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digest_only_push_and_delete_patch_nothing() {
    let mut h = Harness::real().await;
    h.api.insert(deployment("prod", "api", &[&gar("app:v1")]));
    h.start_daemon().await;
    h.api.clear_requests();

    let digest_only = serde_json::json!({
        "action": "INSERT", "digest": gar(&format!("app@sha256:{HEX_A}"))
    });
    let delete = serde_json::json!({"action": "DELETE", "tag": gar("app:v1")});
    h.publish(&digest_only.to_string()).await;
    h.publish(&delete.to_string()).await;
    assert!(
        wait_until(Duration::from_secs(10), || {
            h.metric("gar_restarter_events_settled_total{outcome=\"ack\"}") >= 2.0
        })
        .await,
        "{}",
        h.metrics()
    );
    assert_eq!(
        h.metric("gar_restarter_events_received_total{action=\"insert_digest_only\"}"),
        1.0
    );
    assert_eq!(
        h.metric("gar_restarter_events_received_total{action=\"delete\"}"),
        1.0
    );
    assert!(h.api.patches().is_empty());
    // Nothing but the daemon's own watches (and their relists) reached the API.
    let others: Vec<String> = h
        .api
        .requests()
        .into_iter()
        .filter(|r| {
            let workload_list = r.method == "GET"
                && ["/deployments", "/statefulsets", "/daemonsets"]
                    .iter()
                    .any(|k| r.path.ends_with(k));
            !workload_list
        })
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(others.is_empty(), "{others:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_message_is_dead_lettered_with_reason_and_acked() {
    let mut h = Harness::real().await;
    h.start_daemon().await;
    let attrs = std::collections::HashMap::from([("origin".to_string(), "test".to_string())]);
    let id = h.publish_with("{not json", attrs).await;

    let letters = h.dead_letters(1, Duration::from_secs(15)).await;
    assert_eq!(letters.len(), 1, "{}", h.daemon_log());
    let dl = &letters[0];
    assert_eq!(dl.data.as_ref(), b"{not json");
    assert_eq!(dl.attributes["origin"], "test");
    assert_eq!(dl.attributes["dlq_kind"], "malformed");
    assert!(
        dl.attributes["dlq_reason"].contains("not a JSON object"),
        "{:?}",
        dl.attributes
    );
    assert_eq!(dl.attributes["dlq_original_message_id"], id);
    assert_eq!(dl.attributes["dlq_attempts"], "1");
    assert_eq!(dl.attributes["dlq_source_subscription"], h.subscription());
    assert!(dl.attributes["dlq_failed_at"].ends_with('Z'));
    assert!(
        wait_until(Duration::from_secs(5), || {
            h.metric("gar_restarter_events_settled_total{outcome=\"dead_letter\"}") == 1.0
        })
        .await
    );
    // The original was acked, so it is not redelivered past pstest's 10 s deadline.
    tokio::time::sleep(Duration::from_secs(12)).await;
    assert_eq!(
        h.metric("gar_restarter_events_received_total{action=\"malformed\"}"),
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn digest_pinned_deployment_is_not_restarted_and_short_names_match() {
    let mut h = Harness::real().await;
    h.api.insert(deployment(
        "prod",
        "pinned",
        &[&gar(&format!("app@sha256:{HEX_B}"))],
    ));
    h.api.insert(deployment("prod", "web", &["nginx"]));
    h.start_daemon().await;
    h.api.clear_requests();

    h.publish(&insert("app:v1", HEX_A)).await;
    let nginx = serde_json::json!({
        "action": "INSERT",
        "digest": format!("docker.io/library/nginx@sha256:{HEX_A}"),
        "tag": "docker.io/library/nginx:latest",
    });
    h.publish(&nginx.to_string()).await;
    assert!(
        wait_until(Duration::from_secs(10), || {
            h.metric("gar_restarter_events_settled_total{outcome=\"ack\"}") >= 2.0
        })
        .await
    );
    assert!(
        restart_annotations(&h.deployment("prod", "web"))
            .0
            .is_some(),
        "nginx matched"
    );
    assert_eq!(
        restart_annotations(&h.deployment("prod", "pinned")),
        (None, None)
    );
    let patched: Vec<String> = accepted_patches(&h.api)
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    assert_eq!(
        patched,
        vec!["/apis/apps/v1/namespaces/prod/deployments/web".to_string()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_while_pubsub_is_unreachable() {
    let mut h = Harness::real().await;
    // Nothing listens there: the SDK retries silently, readiness must not pretend otherwise.
    h.extra_env.push((
        "PUBSUB_EMULATOR_HOST".into(),
        format!("127.0.0.1:{}", free_port()),
    ));
    h.spawn_daemon();
    assert!(
        wait_until(Duration::from_secs(10), || matches!(
            http_get(h.metrics_addr, "/healthz"),
            Some((200, _))
        ))
        .await
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (code, body) = http_get(h.metrics_addr, "/readyz").expect("readyz answers");
    assert_eq!(code, 503, "{body}\n{}", h.daemon_log());
    assert!(body.contains("stream_connected=false"), "{body}");
    assert!(
        h.daemon_log().contains("Pub/Sub endpoint unreachable"),
        "{}",
        h.daemon_log()
    );
}

//! RBAC proven on a real API server: the daemon runs as `gar-restarter/gar-restarter` with
//! exactly the rules `deploy/` renders, everything it does succeeds with them, and each rule,
//! taken away, shows up as a clear error of the right class.

mod common;

use std::time::Duration;

use common::*;
use gar_testsupport::cluster::kubeconfig;
use gar_testsupport::cluster::rbac::{Grant, RuleRef};
use gar_testsupport::objects::{daemonset, deployment, statefulset};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Patch, PatchParams};

fn sha(hex: &str) -> String {
    format!("sha256:{hex}")
}

/// Requests the API server (through the proxy) refused, as `METHOD path -> code`.
fn denied(h: &Harness) -> Vec<String> {
    h.api
        .requests()
        .into_iter()
        .filter(|r| r.status == 403)
        .map(|r| format!("{} {} -> {}", r.method, r.path, r.status))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_rendered_rules_nothing_the_daemon_does_is_denied() {
    let mut h = Harness::real().await;
    h.api.insert(deployment("prod", "web", &[&gar("app:v1")]));
    h.api.insert(statefulset("data", "db", &[&gar("app:v1")]));
    h.api.insert(daemonset("infra", "agent", &[&gar("app:v1")]));
    // Cold start: no mounted index, no ConfigMap, so the daemon scans and writes the cache.
    h.start_daemon().await;
    h.publish(&insert("app:v1", HEX_A)).await;
    assert!(
        wait_until(Duration::from_secs(20), || {
            h.metric("gar_restarter_events_settled_total{outcome=\"ack\"}") >= 1.0
        })
        .await,
        "{}",
        h.daemon_log()
    );
    for (resource, ns, name) in [
        ("deployments", "prod", "web"),
        ("statefulsets", "data", "db"),
        ("daemonsets", "infra", "agent"),
    ] {
        let obj = h.api.get(resource, ns, name).expect("exists");
        assert_eq!(restart_annotations(&obj).1, Some(sha(HEX_A)), "{ns}/{name}");
    }
    let cache = h
        .api
        .get("configmaps", "gar-restarter", "gar-restarter-cache");
    assert!(cache.is_some(), "the index was written back");
    // The Kubernetes Events on the three workloads (written in the background) get through.
    assert!(
        wait_until(Duration::from_secs(10), || {
            h.metric(
                "gar_restarter_kubernetes_events_total{reason=\"Restarted\",result=\"emitted\"}",
            ) >= 3.0
        })
        .await,
        "{}",
        h.metrics()
    );
    assert_eq!(denied(&h), Vec::<String>::new());
    let kinds: Vec<String> = h
        .api
        .requests()
        .iter()
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert!(
        kinds
            .iter()
            .any(|k| k.starts_with("GET /apis/apps/v1/deployments")),
        "{kinds:?}"
    );
    assert!(
        kinds
            .iter()
            .any(|k| k.starts_with("POST /api/v1/namespaces/gar-restarter/configmaps")),
        "{kinds:?}"
    );
    for ns in ["prod", "data", "infra"] {
        let post = format!("POST /apis/events.k8s.io/v1/namespaces/{ns}/events");
        assert!(kinds.iter().any(|k| k.starts_with(&post)), "{kinds:?}");
    }
}

/// Where the 403 must come from when `rule` is missing, the resource the daemon must name,
/// and whether the restart still happens.
fn expectation(grant: &Grant, rule: &RuleRef) -> (&'static str, &'static str, bool) {
    let text = grant.rule(rule).map(|r| r.to_string()).unwrap_or_default();
    if text.contains("events.k8s.io") {
        // Without create on events the restart still happens (an Event never holds up or
        // fails a message); the refused Event is counted and logged, naming the resource.
        (
            "POST /apis/events.k8s.io/v1/namespaces/prod/events",
            "events",
            true,
        )
    } else if text.contains("deployments") {
        // Without list/get/patch on workloads nothing can be indexed or restarted.
        ("GET /apis/apps/v1/deployments", "deployments", false)
    } else if text.contains("resourceNames") {
        // Without get/update on the cache ConfigMap the daemon refuses to guess: a 403 there
        // is an installation error, so it stays unready and retries, loudly, rather than
        // scanning the cluster behind the operator's back at every start.
        (
            "GET /api/v1/namespaces/gar-restarter/configmaps/gar-restarter-cache",
            "configmaps",
            false,
        )
    } else {
        // Without create, the first write of the index fails; the scan it wanted to store
        // still answers the lookup, so the restart happens and the failed write is reported.
        (
            "POST /api/v1/namespaces/gar-restarter/configmaps",
            "configmaps",
            true,
        )
    }
}

/// One daemon per rule of `deploy/base`, each without that rule: the first request that needs
/// it is refused with 403, the daemon names the resource and the status, and it never
/// reports success for work it could not do.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_rule_taken_away_is_a_clear_403() {
    let rules = {
        let probe = Harness::real().await;
        let grant = probe.api.grant().clone();
        let rules = grant.rules();
        assert_eq!(
            rules.len(),
            4,
            "deploy/base's rules changed: {:?}",
            grant.objects
        );
        rules
            .into_iter()
            .map(|r| (grant.clone(), r))
            .collect::<Vec<_>>()
    };
    for (grant, rule) in rules {
        let (request, resource, restarts) = expectation(&grant, &rule);
        let removed = grant.rule(&rule).cloned();
        let mut h = Harness::real_with("base", |g| g.without(&rule)).await;
        h.api.insert(deployment("prod", "web", &[&gar("app:v1")]));
        h.spawn_daemon();
        let id = h.publish(&insert("app:v1", HEX_A)).await;
        assert!(
            wait_until(Duration::from_secs(30), || {
                denied(&h).iter().any(|d| d.starts_with(request))
            })
            .await,
            "without {removed:?}: no 403 on {request}: {:?}\n{}",
            h.api.requests(),
            h.daemon_log()
        );
        // The proxy records the 403 before the daemon has logged it.
        let named = |log: &str| log.contains("403") && log.contains(resource);
        assert!(
            wait_until(Duration::from_secs(10), || named(&h.daemon_log())).await,
            "without {removed:?}: the log must name {resource} and 403\n{}",
            h.daemon_log()
        );
        let log = h.daemon_log();
        if !restarts {
            // Nothing can be looked up: the event is never acked as done.
            tokio::time::sleep(Duration::from_secs(3)).await;
            assert_eq!(
                h.metric("gar_restarter_events_settled_total{outcome=\"ack\"}"),
                0.0,
                "without {removed:?}: message {id} acked\n{log}"
            );
            assert_eq!(
                restart_annotations(&h.deployment("prod", "web")),
                (None, None)
            );
        } else {
            assert!(
                wait_until(Duration::from_secs(20), || {
                    restart_annotations(&h.deployment("prod", "web")).1 == Some(sha(HEX_A))
                })
                .await,
                "without {removed:?}: prod/web not restarted\n{}",
                h.daemon_log()
            );
        }
        assert!(
            h.metric(&format!(
                "gar_restarter_api_requests_total{{verb=\"{}\",resource=\"{resource}\",code=\"403\"}}",
                if request.starts_with("POST") { "create" } else if request.contains("/gar-restarter-cache") { "get" } else { "list" }
            )) >= 1.0,
            "without {removed:?}: the 403 is counted\n{}",
            h.metrics()
        );
    }
}

/// `patch` taken away from the workload rule: the index builds, the restart is refused, and
/// the event is dead-lettered as `permanent`, naming the workload and the status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_patch_the_event_is_dead_lettered_naming_the_workload() {
    let mut h = Harness::real_with("base", |mut g| {
        for o in &mut g.objects {
            if o["kind"] == "ClusterRole"
                && let Some(verbs) = o["rules"][0]["verbs"].as_array_mut()
            {
                verbs.retain(|v| v != "patch");
            }
        }
        g
    })
    .await;
    h.api.insert(deployment("prod", "web", &[&gar("app:v1")]));
    h.start_daemon().await;
    let id = h.publish(&insert("app:v1", HEX_A)).await;
    h.permanent_dead_letter(&id, "Deployment prod/web", 403)
        .await;
    assert_eq!(
        denied(&h),
        vec!["PATCH /apis/apps/v1/namespaces/prod/deployments/web -> 403".to_string()]
    );
}

/// The namespaced overlay's Role grants only `apps`: the daemon's identity cannot restart
/// anything elsewhere, even when an index lists it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_namespaced_role_cannot_restart_outside_its_namespace() {
    let mut h = Harness::real_with("overlays/namespaced", |g| g).await;
    h.api.insert(deployment("apps", "web", &[&gar("app:v1")]));
    h.api.insert(deployment("other", "web", &[&gar("app:v1")]));

    // Directly, with the daemon's own token: the API server refuses.
    let path = h.dir.path().join("direct.kubeconfig");
    let token = h
        .api
        .cluster()
        .service_account_kubeconfig("gar-restarter", "gar-restarter", &path, None)
        .await
        .expect("token");
    let cluster = h.api.cluster();
    let client = kubeconfig::client(cluster.server(), cluster.ca_pem(), &token).expect("client");
    let patch = serde_json::json!({"spec": {"template": {"metadata": {"annotations": {
        "kubectl.kubernetes.io/restartedAt": "2026-12-02T00:00:00Z"}}}}});
    let pp = PatchParams::default();
    let api: kube::Api<Deployment> = kube::Api::namespaced(client.clone(), "other");
    match api.patch("web", &pp, &Patch::Strategic(&patch)).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 403, "{s:?}"),
        other => panic!("a PATCH outside `apps` must be refused, got {other:?}"),
    }
    let api: kube::Api<Deployment> = kube::Api::namespaced(client, "apps");
    api.patch("web", &pp, &Patch::Strategic(&patch))
        .await
        .expect("inside `apps` the same PATCH is allowed");

    // Through the daemon, with an index that lists both (as a stale or hand-written
    // cache.json might): apps/web is restarted, and other/web is not even tried, since the
    // scope is enforced when acting.
    let cache = h.cache_dir();
    std::fs::create_dir_all(&cache).unwrap();
    let index = serde_json::json!({"images": {gar("app:v1"): [
        {"namespace": "apps", "name": "web"}, {"namespace": "other", "name": "web"}]}});
    std::fs::write(cache.join("cache.json"), index.to_string()).unwrap();
    h.extra_args.extend(["--namespace".into(), "apps".into()]);
    h.start_daemon().await;
    h.publish(&insert("app:v1", HEX_A)).await;
    assert!(
        wait_until(Duration::from_secs(20), || {
            restart_annotations(&h.deployment("apps", "web")).1 == Some(sha(HEX_A))
        })
        .await,
        "{}",
        h.daemon_log()
    );
    assert_eq!(restart_annotations(&h.deployment("other", "web")).1, None);
    let refused: Vec<String> = denied(&h)
        .into_iter()
        .filter(|d| d.starts_with("PATCH"))
        .collect();
    assert!(refused.is_empty(), "{refused:?}");
    assert!(
        workload_patches(&h.api)
            .iter()
            .all(|r| !r.path.contains("/namespaces/other/")),
        "no PATCH outside --namespace"
    );
}

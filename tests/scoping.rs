//! Scope (`--namespace`, `--selector`) and `check` against a real kube-apiserver: what the
//! daemon lists is what the server was asked for, and what it restarts is in scope.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;
use gar_testsupport::objects::{daemonset, deployment};
use serde_json::Value;

const APPS: [&str; 3] = ["/deployments", "/statefulsets", "/daemonsets"];

fn labelled(mut obj: Value, team: &str) -> Value {
    obj["metadata"]["labels"]["team"] = team.into();
    obj
}

/// `--namespace prod --selector team=web`: only prod's `team=web` workload is restarted,
/// and every workload request the daemon sends is confined to `prod` and carries the
/// selector, so the server (not the daemon) does the filtering.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scope_limits_what_is_listed_and_what_is_restarted() {
    let mut h = Harness::real().await;
    let image = gar("app:v1");
    h.api
        .insert(labelled(deployment("prod", "a", &[&image]), "web"));
    h.api.insert(deployment("prod", "b", &[&image]));
    h.api
        .insert(labelled(deployment("staging", "c", &[&image]), "web"));
    h.extra_args = ["--namespace", "prod", "--selector", "team=web"]
        .map(String::from)
        .to_vec();
    h.start_daemon().await;
    h.publish(&insert("app:v1", HEX_A)).await;
    assert!(
        wait_until(Duration::from_secs(10), || h
            .metric("gar_restarter_events_settled_total{outcome=\"ack\"}")
            == 1.0)
        .await,
        "{}",
        h.daemon_log()
    );
    assert_eq!(
        accepted_patches(&h.api),
        vec![(
            "/apis/apps/v1/namespaces/prod/deployments/a".to_string(),
            Some(format!("sha256:{HEX_A}"))
        )]
    );
    let workload_requests: Vec<_> = h
        .api
        .requests()
        .into_iter()
        .filter(|r| APPS.iter().any(|k| r.path.contains(k)))
        .collect();
    assert!(!workload_requests.is_empty());
    for r in &workload_requests {
        assert!(
            r.path.starts_with("/apis/apps/v1/namespaces/prod/"),
            "outside the scope: {} {}",
            r.method,
            r.path
        );
        if r.method == "GET" && APPS.iter().any(|k| r.path.ends_with(k)) {
            assert_eq!(
                r.query_param("labelSelector").as_deref(),
                Some("team=web"),
                "a list without the selector: {:?}",
                r.query
            );
        }
    }
}

fn check(kubeconfig: &Path, cache_dir: &Path, extra: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_gar-restarter"))
        .args(["check", "--image", &gar("app:v1"), "--cache-dir"])
        .arg(cache_dir)
        .args(["--cache-configmap", "gar-restarter/gar-restarter-cache"])
        .args(extra)
        .env("KUBECONFIG", kubeconfig)
        .output()
        .expect("run check");
    assert!(
        out.status.success(),
        "check {extra:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("check prints JSON")
}

fn workloads(report: &Value) -> Vec<String> {
    let mut names: Vec<String> = report["workloads"]
        .as_array()
        .expect("workloads")
        .iter()
        .map(|w| format!("{} {}/{}", w["kind"], w["namespace"], w["name"]).replace('"', ""))
        .collect();
    names.sort();
    names
}

/// `check` with the daemon's identity: the first run finds no ConfigMap and answers from a
/// scan without storing it (a plain `check` only reads), `--rebuild` scans and stores, the
/// next plain run reads the stored index back from the API, and a scope narrows the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_answers_from_a_rebuild_then_from_the_stored_index() {
    let h = Harness::real().await;
    let image = gar("app:v1");
    h.api
        .insert(deployment("prod", "api", &[&image, "redis:7"]));
    h.api.insert(daemonset("ops", "agent", &[&image]));
    h.api
        .insert(deployment("staging", "other", &[&gar("app:v2")]));
    let kubeconfig = h.dir.path().join("kubeconfig");
    let cache_dir = h.cache_dir();
    let expected = vec![
        "DaemonSet ops/agent".to_string(),
        "Deployment prod/api".to_string(),
    ];

    let run = |extra: &'static [&'static str]| {
        let (kubeconfig, cache_dir) = (kubeconfig.clone(), cache_dir.clone());
        tokio::task::spawn_blocking(move || check(&kubeconfig, &cache_dir, extra))
    };
    let first = run(&[]).await.expect("join");
    assert_eq!(first["source"], "rebuild", "{first}");
    assert_eq!(first["image"], image);
    assert_eq!(workloads(&first), expected);
    let stored = || {
        h.api
            .get("configmaps", "gar-restarter", "gar-restarter-cache")
            .is_some()
    };
    assert!(!stored(), "a plain check wrote the cache ConfigMap");

    let rebuilt = run(&["--rebuild"]).await.expect("join");
    assert_eq!(rebuilt["source"], "rebuild", "{rebuilt}");
    assert_eq!(workloads(&rebuilt), expected);
    assert!(stored(), "check --rebuild stores the index");

    let second = run(&[]).await.expect("join");
    assert_eq!(second["source"], "api", "{second}");
    assert_eq!(workloads(&second), expected);

    let scoped = run(&["--rebuild", "--namespace", "ops"])
        .await
        .expect("join");
    assert_eq!(workloads(&scoped), vec!["DaemonSet ops/agent".to_string()]);
}

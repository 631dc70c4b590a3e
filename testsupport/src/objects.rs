//! Sample Kubernetes objects as JSON, for the tests, the benchmarks and the demo: the same
//! builders seed the real API server and the fake one.

use serde_json::{Map, Value, json};

/// The pod-template annotation `kubectl rollout restart` sets, and so does the daemon.
pub const RESTARTED_AT_ANNOTATION: &str = "kubectl.kubernetes.io/restartedAt";

fn workload(kind: &str, ns: &str, name: &str, images: &[&str]) -> Value {
    let containers: Vec<Value> = images
        .iter()
        .enumerate()
        .map(|(i, image)| json!({ "name": format!("c{i}"), "image": image }))
        .collect();
    let mut obj = json!({
        "apiVersion": "apps/v1",
        "kind": kind,
        "metadata": { "name": name, "namespace": ns, "labels": { "app": name } },
        "spec": {
            "selector": { "matchLabels": { "app": name } },
            "template": {
                "metadata": { "labels": { "app": name } },
                "spec": { "containers": containers },
            },
        },
    });
    if kind != "DaemonSet" {
        obj["spec"]["replicas"] = json!(1);
    }
    if kind == "StatefulSet" {
        obj["spec"]["serviceName"] = json!(name);
    }
    obj
}

/// An apps/v1 Deployment with one replica and containers `c0..cN` running `images`.
pub fn deployment(ns: &str, name: &str, images: &[&str]) -> Value {
    workload("Deployment", ns, name, images)
}

/// An apps/v1 StatefulSet with one replica and containers `c0..cN` running `images`.
pub fn statefulset(ns: &str, name: &str, images: &[&str]) -> Value {
    workload("StatefulSet", ns, name, images)
}

/// An apps/v1 DaemonSet with containers `c0..cN` running `images`.
pub fn daemonset(ns: &str, name: &str, images: &[&str]) -> Value {
    workload("DaemonSet", ns, name, images)
}

/// A v1 ConfigMap with the given string data.
pub fn configmap(ns: &str, name: &str, data: &[(&str, &str)]) -> Value {
    let data: Map<String, Value> = data
        .iter()
        .map(|(k, v)| ((*k).to_owned(), json!(v)))
        .collect();
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": { "name": name, "namespace": ns },
        "data": data,
    })
}

/// The `kubectl.kubernetes.io/restartedAt` pod-template annotation of a workload, if set.
pub fn restarted_at(obj: &Value) -> Option<String> {
    obj.pointer("/spec/template/metadata/annotations")
        .and_then(|a| a.get(RESTARTED_AT_ANNOTATION))
        .and_then(Value::as_str)
        .map(str::to_owned)
}

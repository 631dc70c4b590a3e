//! The install, on a real API server (issue #15, items 1 and 3).
//!
//! - Every render of `deploy/` (the kustomize base, each overlay, base + every component in
//!   another namespace, and `helm template` with each `ci/*-values.yaml`) is applied object
//!   by object with server-side dry-run as admin: the API server's own validation and
//!   defaulting accept every object.
//! - The ValidatingAdmissionPolicy of `deploy/components/admission-policy` lets the daemon's
//!   identity restart and pin a digest, and nothing else.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use gar_testsupport::cluster::Cluster;
use gar_testsupport::cluster::rbac::{self, Grant};
use gar_testsupport::gotool::{self, HELM};
use gar_testsupport::objects::{deployment, statefulset};
use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams};
use kube::discovery::{self, ApiResource, Scope};
use kube::{Api, Client};
use serde_json::{Value, json};

/// The namespace `helm template` renders each `ci/<name>-values.yaml` in, as in
/// `deploy/validate.sh`'s `helm_ns` table.
const HELM_NAMESPACES: [(&str, &str); 4] = [
    ("default", "gar-restarter"),
    ("namespaced", "ops"),
    ("full", "platform-tools"),
    ("emulator", "gar-restarter"),
];

/// The Prometheus Operator kinds the monitoring objects use; their CRDs are not part of a
/// bare control plane. They get minimal CRDs (any spec), so that they are sent and
/// accepted like everything else instead of being skipped.
const MONITOR_KINDS: [(&str, &str); 2] = [
    ("ServiceMonitor", "servicemonitors"),
    ("PodMonitor", "podmonitors"),
];

fn monitor_crds() -> Vec<Value> {
    MONITOR_KINDS
        .iter()
        .map(|(kind, plural)| {
            json!({
                "apiVersion": "apiextensions.k8s.io/v1",
                "kind": "CustomResourceDefinition",
                "metadata": {"name": format!("{plural}.monitoring.coreos.com")},
                "spec": {
                    "group": "monitoring.coreos.com",
                    "scope": "Namespaced",
                    "names": {"kind": kind, "plural": plural, "listKind": format!("{kind}List"),
                              "singular": kind.to_ascii_lowercase()},
                    "versions": [{"name": "v1", "served": true, "storage": true,
                                  "schema": {"openAPIV3Schema": {"type": "object",
                                      "x-kubernetes-preserve-unknown-fields": true}}}],
                },
            })
        })
        .collect()
}

/// This test's own cluster (owned, so that its processes stop and its directory goes when the
/// test ends; a `static` one is never dropped and left 120 MB behind per run), with the
/// monitoring CRDs established.
async fn cluster_with_monitor_crds() -> Cluster {
    init_crypto();
    let cluster = tokio::task::spawn_blocking(Cluster::start)
        .await
        .expect("cluster start task")
        .unwrap_or_else(|e| panic!("{e}"));
    Grant {
        objects: monitor_crds(),
    }
    .apply(&cluster)
    .expect("install the monitoring CRDs");
    for (_, plural) in MONITOR_KINDS {
        let crd = format!("crd/{plural}.monitoring.coreos.com");
        cluster
            .kubectl_output(
                &["wait", "--for=condition=Established", "--timeout=20s", &crd],
                None,
            )
            .expect("the monitoring CRDs become established");
    }
    cluster
}

/// `kind namespace/name` of an object, for messages.
fn describe(o: &Value) -> String {
    format!(
        "{} {}/{}",
        o["kind"].as_str().unwrap_or("?"),
        o.pointer("/metadata/namespace")
            .and_then(Value::as_str)
            .unwrap_or("-"),
        o.pointer("/metadata/name")
            .and_then(Value::as_str)
            .unwrap_or("?")
    )
}

/// What the render tests sent to the API server: one line per refused object
/// (`render: kind ns/name: message`) and the kinds that were sent.
#[derive(Default)]
struct DryRuns {
    refused: Vec<String>,
    kinds: BTreeSet<String>,
}

impl DryRuns {
    /// Applies every object of `render` with server-side dry-run as admin.
    async fn apply(&mut self, cluster: &Cluster, client: &Client, render: &str, objects: &[Value]) {
        let (refused, kinds) = dry_run_apply(cluster, client, render, objects).await;
        self.refused.extend(refused);
        self.kinds.extend(kinds);
    }

    /// Every object was accepted, and each of `kinds` was among them.
    fn assert_accepted(&self, kinds: &[&str]) {
        assert_eq!(
            self.refused,
            Vec::<String>::new(),
            "objects the API server refused"
        );
        for kind in kinds {
            assert!(
                self.kinds.contains(*kind),
                "no {kind} was sent: {:?}",
                self.kinds
            );
        }
    }
}

/// Applies every object of `render` with server-side dry-run as admin, after creating the
/// namespaces they live in, and returns one line per object the server refused
/// (`render: kind ns/name: message`) and the kinds that were sent.
async fn dry_run_apply(
    cluster: &Cluster,
    client: &Client,
    render: &str,
    objects: &[Value],
) -> (Vec<String>, BTreeSet<String>) {
    cluster
        .create_namespaces_of(objects)
        .await
        .unwrap_or_else(|e| panic!("{render}: {e}"));
    let mut resources: HashMap<String, (ApiResource, bool)> = HashMap::new();
    let mut refused = Vec::new();
    let mut kinds = BTreeSet::new();
    let params = PatchParams::apply("gar-install-test").force().dry_run();
    for object in objects {
        let what = describe(object);
        let api_version = object["apiVersion"].as_str().unwrap_or_default();
        let kind = object["kind"].as_str().unwrap_or_default();
        let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
        let key = format!("{api_version}/{kind}");
        if !resources.contains_key(&key) {
            let gvk = GroupVersionKind::gvk(group, version, kind);
            match discovery::pinned_kind(client, &gvk).await {
                Ok((ar, caps)) => {
                    resources.insert(key.clone(), (ar, caps.scope == Scope::Namespaced));
                }
                Err(e) => {
                    refused.push(format!("{render}: {what}: kind not served: {e}"));
                    continue;
                }
            }
        }
        let (ar, namespaced) = &resources[&key];
        kinds.insert(kind.to_owned());
        let name = object["metadata"]["name"].as_str().unwrap_or_default();
        let api: Api<DynamicObject> = match object.pointer("/metadata/namespace") {
            Some(Value::String(ns)) if *namespaced => Api::namespaced_with(client.clone(), ns, ar),
            // A namespaced object without a namespace would land in `default`: a render
            // must not rely on that.
            _ if *namespaced => {
                refused.push(format!(
                    "{render}: {what}: namespaced kind without a namespace"
                ));
                continue;
            }
            _ => Api::all_with(client.clone(), ar),
        };
        match api.patch(name, &params, &Patch::Apply(object)).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) => {
                refused.push(format!("{render}: {what}: {} {}", s.code, s.message))
            }
            Err(e) => refused.push(format!("{render}: {what}: {e}")),
        }
    }
    (refused, kinds)
}

/// A kustomization under the repository's git-ignored `.tools/` (kustomize loads only
/// relative paths inside its root's tree), with `body` below `apiVersion`/`kind`.
fn generated_kustomization(body: &str) -> tempfile::TempDir {
    let tools = gotool::repo_root().join(".tools");
    std::fs::create_dir_all(&tools).expect("create .tools");
    let dir = tempfile::Builder::new()
        .prefix("install-test-")
        .tempdir_in(&tools)
        .expect("temp kustomization dir");
    let text = format!("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n{body}");
    std::fs::write(dir.path().join("kustomization.yaml"), text).expect("write kustomization");
    dir
}

fn subdirs(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("read {}: {e}", dir.display()))
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("kustomization.yaml").is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_kustomize_render_passes_server_side_dry_run() {
    let cluster = &cluster_with_monitor_crds().await;
    let client = cluster.admin_client().expect("admin client");
    let deploy = gotool::repo_root().join("deploy");
    let mut renders: Vec<(String, std::path::PathBuf)> =
        vec![("deploy/base".into(), deploy.join("base"))];
    for overlay in subdirs(&deploy.join("overlays")) {
        renders.push((
            format!("deploy/overlays/{overlay}"),
            deploy.join("overlays").join(&overlay),
        ));
    }
    // Base and every component, moved to `ops` in one kustomization.
    let components = subdirs(&deploy.join("components"));
    assert!(components.len() >= 3, "components: {components:?}");
    let mut body = "namespace: ops\nresources: [../../deploy/base]\ncomponents:\n".to_owned();
    for c in &components {
        body.push_str(&format!("  - ../../deploy/components/{c}\n"));
    }
    let ops_all = generated_kustomization(&body);
    renders.push((
        format!("base + components {components:?} in namespace ops"),
        ops_all.path().to_path_buf(),
    ));
    assert!(renders.len() >= 5, "{renders:?}");

    let mut sent = DryRuns::default();
    let started = Instant::now();
    for (render, dir) in &renders {
        let objects =
            rbac::kustomize(cluster, dir).unwrap_or_else(|e| panic!("render {render}: {e}"));
        assert!(objects.len() >= 5, "{render}: {} objects", objects.len());
        sent.apply(cluster, &client, render, &objects).await;
    }
    eprintln!(
        "{} kustomize renders dry-run applied in {:.1?}",
        renders.len(),
        started.elapsed()
    );
    sent.assert_accepted(&[
        "Namespace",
        "Deployment",
        "ClusterRole",
        "Role",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
        "NetworkPolicy",
        "ServiceMonitor",
        "PodMonitor",
    ]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_helm_render_passes_server_side_dry_run() {
    let cluster = &cluster_with_monitor_crds().await;
    let client = cluster.admin_client().expect("admin client");
    let helm = HELM.binary("helm").expect("helm");
    let chart = gotool::repo_root().join("deploy/helm/gar-restarter");
    let mut values: Vec<String> = std::fs::read_dir(chart.join("ci"))
        .expect("read ci/")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_string_lossy()
                .strip_suffix("-values.yaml")
                .map(str::to_owned)
        })
        .collect();
    values.sort();
    assert!(values.len() >= 4, "ci values: {values:?}");

    let mut sent = DryRuns::default();
    for v in &values {
        let ns = HELM_NAMESPACES
            .iter()
            .find(|(name, _)| name == v)
            .map(|(_, ns)| *ns)
            .unwrap_or_else(|| panic!("ci/{v}-values.yaml has no namespace in HELM_NAMESPACES"));
        let render = format!("helm template -f ci/{v}-values.yaml -n {ns}");
        let out = std::process::Command::new(&helm)
            .args(["template", "gar-restarter"])
            .arg(&chart)
            .args(["-n", ns, "-f"])
            .arg(chart.join("ci").join(format!("{v}-values.yaml")))
            .output()
            .expect("run helm");
        assert!(
            out.status.success(),
            "{render}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let objects = rbac::objects(cluster, &out.stdout, &render)
            .unwrap_or_else(|e| panic!("{render}: {e}"));
        assert!(objects.len() >= 5, "{render}: {} objects", objects.len());
        sent.apply(cluster, &client, &render, &objects).await;
    }
    sent.assert_accepted(&[
        "Deployment",
        "ValidatingAdmissionPolicy",
        "NetworkPolicy",
        "ServiceMonitor",
    ]);
}

// ---------------------------------------------------------------------------------------------
// The admission policy
// ---------------------------------------------------------------------------------------------

const POLICY: &str = "gar-restarter-fence";

/// More than the daemon's RBAC allows (PUT, DELETE, the scale subresource), bound to its
/// service account: otherwise RBAC refuses those requests before admission and the policy
/// is never asked. The fence must hold even where RBAC is too wide.
fn wider_rbac() -> Grant {
    Grant {
        objects: vec![
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
                   "metadata": {"name": "gar-tests-wider"},
                   "rules": [{"apiGroups": ["apps"],
                              "resources": ["deployments", "deployments/scale"],
                              "verbs": ["get", "update", "patch", "delete"]}]}),
            json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                   "metadata": {"name": "gar-tests-wider"},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                               "name": "gar-tests-wider"},
                   "subjects": [{"kind": "ServiceAccount", "name": rbac::DEPLOY_SERVICE_ACCOUNT,
                                 "namespace": rbac::DEPLOY_NAMESPACE}]}),
        ],
    }
}

/// Asserts that `result` is the policy's denial: the status code the API server gives a
/// ValidatingAdmissionPolicy `reason: Forbidden`, the policy's name and `message` part.
fn assert_fenced<T: std::fmt::Debug>(what: &str, result: Result<T, kube::Error>, message: &str) {
    match result {
        Err(kube::Error::Api(s)) => {
            assert_eq!(s.code, 403, "{what}: {s:?}");
            assert!(
                s.message.contains(POLICY) && s.message.contains(message),
                "{what}: the denial must name {POLICY} and say {message:?}: {}",
                s.message
            );
        }
        other => panic!("{what}: must be denied by {POLICY}, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admission_policy_lets_the_daemon_restart_and_pin_and_nothing_else() {
    let mut h = Harness::real().await;
    h.api.insert(deployment("prod", "web", &[&gar("app:v1")]));
    h.api.insert(statefulset("prod", "db", &[&gar("app:v1")]));
    h.api.insert(deployment("prod", "probe", &[&gar("app:v1")]));
    let cluster = h.api.cluster();
    wider_rbac().apply(cluster).expect("wider RBAC");
    let policy = gotool::repo_root().join("deploy/components/admission-policy/policy.yaml");
    cluster
        .kubectl_output(
            &[
                "apply",
                "--server-side",
                "--field-manager=gar-tests",
                "-f",
                &policy.to_string_lossy(),
            ],
            None,
        )
        .expect("apply the policy and its binding");

    let daemon = h.api.daemon_client();
    let deployments: Api<Deployment> = Api::namespaced(daemon, "prod");
    // Until the API server has loaded the policy, this forged dry-run PATCH passes.
    let forged_replicas = json!({"spec": {"replicas": 5}});
    let probe_params = PatchParams {
        dry_run: true,
        ..PatchParams::default()
    };
    let started = Instant::now();
    let loaded = loop {
        let r = deployments
            .patch("probe", &probe_params, &Patch::Strategic(&forged_replicas))
            .await;
        match r {
            Err(kube::Error::Api(s)) if s.message.contains(POLICY) => break Some(s),
            _ if started.elapsed() > Duration::from_secs(20) => break None,
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let loaded = loaded.expect("the policy was not in force 20 s after it was applied");
    eprintln!(
        "{POLICY} in force after {:.1?}: {} {}",
        started.elapsed(),
        loaded.code,
        loaded.message
    );

    // The daemon's own restart, end to end, passes.
    h.start_daemon().await;
    h.api.clear_requests();
    h.publish(&insert("app:v1", HEX_A)).await;
    let sha_a = format!("sha256:{HEX_A}");
    assert!(
        wait_until(Duration::from_secs(20), || {
            ["deployments/web", "statefulsets/db"]
                .iter()
                .all(|w| accepted_patches(&h.api).iter().any(|(p, _)| p.ends_with(w)))
        })
        .await,
        "the daemon's PATCHes were not accepted: {:?}\n{}",
        workload_patches(&h.api)
            .iter()
            .map(|p| format!("{} {} -> {}", p.method, p.path, p.status))
            .collect::<Vec<_>>(),
        h.daemon_log()
    );
    for (resource, name) in [("deployments", "web"), ("statefulsets", "db")] {
        let obj = h.api.get(resource, "prod", name).expect("exists");
        let (at, digest) = restart_annotations(&obj);
        assert!(at.is_some(), "prod/{name} restarted");
        assert_eq!(digest, Some(sha_a.clone()), "prod/{name}");
    }
    assert!(
        workload_patches(&h.api).iter().all(|p| p.status < 300),
        "no PATCH of the daemon was refused"
    );
    h.kill_daemon();

    // Pinning the running tag to a digest of the same repository passes.
    let pinned = format!("{}@sha256:{HEX_B}", gar("app:v1"));
    let pin = json!({"spec": {"template": {"spec": {"containers": [
        {"name": "c0", "image": pinned}]}}}});
    deployments
        .patch("web", &PatchParams::default(), &Patch::Strategic(&pin))
        .await
        .expect("a pin-digest PATCH passes the policy");
    let web = h.deployment("prod", "web");
    assert_eq!(
        web["spec"]["template"]["spec"]["containers"][0]["image"],
        pinned
    );
    let before = h.deployment("prod", "web");

    // Everything else the daemon's identity might try is denied, naming the policy.
    let other_repo = format!("{}@sha256:{HEX_B}", gar("other:v1"));
    let forged = [
        (
            "replicas",
            json!({"spec": {"replicas": 3}}),
            "outside spec.template",
        ),
        (
            "another image repository",
            json!({"spec": {"template": {"spec": {"containers": [
                {"name": "c0", "image": other_repo}]}}}}),
            "pinning a digest of the same repository",
        ),
        (
            "a label on the workload",
            json!({"metadata": {"labels": {"team": "x"}}}),
            "workload's metadata",
        ),
        (
            "an annotation on the workload",
            json!({"metadata": {"annotations": {"note": "x"}}}),
            "workload's metadata",
        ),
        (
            "another pod-template annotation",
            json!({"spec": {"template": {"metadata": {"annotations": {
                "kubectl.kubernetes.io/restartedAt": "2026-12-03T00:00:00Z",
                "example.com/debug": "on"}}}}}),
            "only the pod template annotations",
        ),
    ];
    for (what, patch, message) in &forged {
        let r = deployments
            .patch("web", &PatchParams::default(), &Patch::Strategic(patch))
            .await;
        assert_fenced(what, r, message);
    }
    let r = deployments
        .patch_scale(
            "web",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"replicas": 4}})),
        )
        .await;
    assert_fenced("the scale subresource", r, "may only UPDATE");
    let r = deployments.delete("web", &DeleteParams::default()).await;
    assert_fenced("DELETE", r, "may only UPDATE");

    // The deployment controller still updates status and its revision annotation; what
    // the denied requests aimed at is unchanged.
    let after = h.deployment("prod", "web");
    assert_eq!(
        after["spec"], before["spec"],
        "no denied request changed the spec"
    );
    assert_eq!(after["metadata"]["labels"], before["metadata"]["labels"]);
    assert_eq!(after["metadata"]["annotations"]["note"], Value::Null);
    assert_eq!(after["spec"]["replicas"], 1);
}

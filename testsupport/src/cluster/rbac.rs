//! The daemon's RBAC exactly as `deploy/` renders it, applied to the test cluster.
//!
//! The rules (API groups, resources, verbs, resource names) are taken unchanged from
//! `kubectl kustomize deploy/<overlay>`. Only *where* they apply is moved, so that tests
//! can run side by side in one cluster: the daemon's own namespace (`gar-restarter`
//! in the manifests) becomes the test's, a namespace the manifests name for workloads
//! (`apps` in the namespaced overlay) becomes the test's workload namespace, and
//! cluster-scoped names get the test's suffix.

use std::path::Path;

use serde_json::Value;

use super::{Cluster, ClusterError};

/// The namespace and service account the manifests install the daemon as.
pub const DEPLOY_NAMESPACE: &str = "gar-restarter";
pub const DEPLOY_SERVICE_ACCOUNT: &str = "gar-restarter";
/// The workload namespace the namespaced overlay grants.
pub const DEPLOY_APPS_NAMESPACE: &str = "apps";

const RBAC_KINDS: [&str; 4] = ["ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"];

/// Where a test puts the daemon and its workloads.
#[derive(Debug, Clone)]
pub struct Placement {
    /// Replaces `gar-restarter`: the daemon's service account and cache live here.
    pub system_namespace: String,
    /// Replaces `apps`.
    pub apps_namespace: String,
    /// Appended to cluster-scoped names.
    pub suffix: String,
}

/// The RBAC objects of one overlay, placed for one test.
#[derive(Debug, Clone)]
pub struct Grant {
    pub objects: Vec<Value>,
}

/// One rule of one role, as `(role kind, role name, index)`.
pub type RuleRef = (String, String, usize);

impl Grant {
    /// Renders `deploy/<overlay>` (e.g. `base`, `overlays/namespaced`) with the kubectl of the
    /// cluster's release and keeps the RBAC objects, placed for `placement`.
    pub fn render(
        cluster: &Cluster,
        overlay: &str,
        placement: &Placement,
    ) -> Result<Grant, ClusterError> {
        let dir = crate::gotool::repo_root().join("deploy").join(overlay);
        let items = kustomize(cluster, &dir)?;
        let dir = dir.display();
        let objects: Vec<Value> = items
            .into_iter()
            .filter(|o| o["kind"].as_str().is_some_and(|k| RBAC_KINDS.contains(&k)))
            .map(|o| place(o, placement))
            .collect();
        if objects.is_empty() {
            return Err(ClusterError::Setup(format!(
                "{dir} renders no RBAC objects"
            )));
        }
        Ok(Grant { objects })
    }

    /// Every rule of every role, in order.
    pub fn rules(&self) -> Vec<RuleRef> {
        let mut out = Vec::new();
        for o in &self.objects {
            let kind = o["kind"].as_str().unwrap_or_default();
            if kind != "Role" && kind != "ClusterRole" {
                continue;
            }
            let name = o["metadata"]["name"].as_str().unwrap_or_default();
            let n = o["rules"].as_array().map_or(0, Vec::len);
            out.extend((0..n).map(|i| (kind.to_owned(), name.to_owned(), i)));
        }
        out
    }

    /// The rule `rule` refers to.
    pub fn rule(&self, rule: &RuleRef) -> Option<&Value> {
        self.objects
            .iter()
            .find(|o| o["kind"] == rule.0.as_str() && o["metadata"]["name"] == rule.1.as_str())
            .and_then(|o| o["rules"].get(rule.2))
    }

    /// The same grant without one rule.
    pub fn without(&self, rule: &RuleRef) -> Grant {
        let mut grant = self.clone();
        for o in &mut grant.objects {
            if o["kind"] == rule.0.as_str()
                && o["metadata"]["name"] == rule.1.as_str()
                && let Some(rules) = o["rules"].as_array_mut()
                && rule.2 < rules.len()
            {
                rules.remove(rule.2);
            }
        }
        grant
    }

    /// Applies the objects with the admin identity (`kubectl apply`, server-side).
    pub fn apply(&self, cluster: &Cluster) -> Result<(), ClusterError> {
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": self.objects});
        let body = serde_json::to_vec(&list).map_err(|e| ClusterError::Setup(e.to_string()))?;
        cluster.kubectl_output(
            &[
                "apply",
                "--server-side",
                "--force-conflicts",
                "--field-manager=gar-tests",
                "-f",
                "-",
            ],
            Some(&body),
        )?;
        Ok(())
    }
}

/// Every object `kubectl kustomize DIR` renders, as JSON, with the kubectl of the cluster's
/// release. Public for `tests/install.rs`, which sends whole renders to the API server.
pub fn kustomize(cluster: &Cluster, dir: &Path) -> Result<Vec<Value>, ClusterError> {
    let dir = dir.to_string_lossy().into_owned();
    let yaml = cluster.kubectl_output(&["kustomize", &dir], None)?;
    objects(cluster, &yaml, &dir)
}

/// The objects of a YAML stream (a kustomize or `helm template` render) as JSON, `what`
/// naming the render in errors. kubectl turns the stream into JSON objects, so no YAML
/// parser is needed; its client-side dry run maps each kind through discovery, so the
/// cluster must know every kind (CRDs included). Fields the server owns that the dry run
/// may print (`creationTimestamp: null`, ...) are dropped, so the objects can be applied.
pub fn objects(cluster: &Cluster, yaml: &[u8], what: &str) -> Result<Vec<Value>, ClusterError> {
    let json = cluster.kubectl_output(
        &["create", "--dry-run=client", "-o", "json", "-f", "-"],
        Some(yaml),
    )?;
    let mut items = Vec::new();
    for parsed in serde_json::Deserializer::from_slice(&json).into_iter::<Value>() {
        let parsed = parsed
            .map_err(|e| ClusterError::Setup(format!("kubectl printed no JSON for {what}: {e}")))?;
        match parsed["kind"].as_str() {
            Some("List") => items.extend(parsed["items"].as_array().cloned().unwrap_or_default()),
            _ => items.push(parsed),
        }
    }
    for object in &mut items {
        if let Some(meta) = object["metadata"].as_object_mut() {
            meta.remove("creationTimestamp");
            meta.remove("resourceVersion");
            meta.remove("uid");
        }
    }
    Ok(items)
}

fn rename_namespace(value: &mut Value, placement: &Placement) {
    let replacement = match value.as_str() {
        Some(DEPLOY_NAMESPACE) => placement.system_namespace.clone(),
        Some(DEPLOY_APPS_NAMESPACE) => placement.apps_namespace.clone(),
        _ => return,
    };
    *value = Value::String(replacement);
}

fn place(mut object: Value, placement: &Placement) -> Value {
    let cluster_scoped = object["kind"]
        .as_str()
        .is_some_and(|k| k.starts_with("Cluster"));
    let renamed = |name: &str| {
        if placement.suffix.is_empty() {
            name.to_owned()
        } else {
            format!("{name}-{}", placement.suffix)
        }
    };
    // `get_mut`/`pointer_mut`, not `object["x"]`: indexing a JSON object mutably inserts a
    // null for a missing key, which the API server then rejects as an unknown field.
    if cluster_scoped {
        if let Some(name) = object.pointer_mut("/metadata/name")
            && let Some(n) = name.as_str()
        {
            *name = Value::String(renamed(n));
        }
    } else if let Some(ns) = object.pointer_mut("/metadata/namespace") {
        rename_namespace(ns, placement);
    }
    if object.pointer("/roleRef/kind").and_then(Value::as_str) == Some("ClusterRole")
        && let Some(name) = object.pointer_mut("/roleRef/name")
        && let Some(n) = name.as_str()
    {
        *name = Value::String(renamed(n));
    }
    if let Some(subjects) = object.get_mut("subjects").and_then(Value::as_array_mut) {
        for subject in subjects {
            if let Some(ns) = subject.get_mut("namespace") {
                rename_namespace(ns, placement);
            }
        }
    }
    object
}

/// Gives a cluster the daemon's identity as the manifests install it: renders the RBAC of
/// `deploy/<overlay>` in the manifests' own namespaces, lets `edit` change it (e.g. remove a
/// rule), applies it, and writes a kubeconfig of the service account
/// `gar-restarter/gar-restarter` to `kubeconfig` (pointing at `server` when given, e.g. a
/// proxy). Returns what was applied and the service account's token. Shared by the tests'
/// `KubeApi` and `cargo xtask cluster`, so that both run the daemon with the same rights.
pub async fn install_daemon_identity(
    cluster: &Cluster,
    overlay: &str,
    edit: impl FnOnce(Grant) -> Grant,
    kubeconfig: &Path,
    server: Option<&str>,
) -> Result<(Grant, String), ClusterError> {
    cluster.create_namespace(DEPLOY_NAMESPACE).await?;
    let placement = Placement {
        system_namespace: DEPLOY_NAMESPACE.into(),
        apps_namespace: DEPLOY_APPS_NAMESPACE.into(),
        suffix: String::new(),
    };
    let grant = edit(Grant::render(cluster, overlay, &placement)?);
    // The namespaces the manifests put Roles and RoleBindings in must exist first.
    cluster.create_namespaces_of(&grant.objects).await?;
    grant.apply(cluster)?;
    let token = cluster
        .service_account_kubeconfig(DEPLOY_NAMESPACE, DEPLOY_SERVICE_ACCOUNT, kubeconfig, server)
        .await?;
    Ok((grant, token))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn placement() -> Placement {
        Placement {
            system_namespace: "t1-sys".into(),
            apps_namespace: "t1-apps".into(),
            suffix: "t1".into(),
        }
    }

    #[test]
    fn placing_moves_namespaces_and_names_but_keeps_the_rules() {
        let rules =
            json!([{"apiGroups": ["apps"], "resources": ["deployments"], "verbs": ["patch"]}]);
        let role = place(
            json!({"kind": "ClusterRole", "metadata": {"name": "w"}, "rules": rules}),
            &placement(),
        );
        assert_eq!(role["metadata"]["name"], "w-t1");
        assert_eq!(role["rules"], rules);
        let binding = place(
            json!({"kind": "RoleBinding", "metadata": {"name": "b", "namespace": "apps"},
                   "roleRef": {"kind": "Role", "name": "r"},
                   "subjects": [{"kind": "ServiceAccount", "name": "gar-restarter", "namespace": "gar-restarter"}]}),
            &placement(),
        );
        assert_eq!(binding["metadata"]["namespace"], "t1-apps");
        assert_eq!(binding["roleRef"]["name"], "r", "a Role keeps its name");
        assert_eq!(binding["subjects"][0]["namespace"], "t1-sys");
        assert_eq!(binding["subjects"][0]["name"], "gar-restarter");
        let other = place(
            json!({"kind": "Role", "metadata": {"name": "r", "namespace": "kube-system"}}),
            &placement(),
        );
        assert_eq!(
            other["metadata"]["namespace"], "kube-system",
            "other namespaces stay"
        );
    }

    #[test]
    fn without_removes_exactly_one_rule() {
        let grant = Grant {
            objects: vec![json!({"kind": "Role", "metadata": {"name": "r"},
                                 "rules": [{"verbs": ["get"]}, {"verbs": ["create"]}]})],
        };
        let rules = grant.rules();
        assert_eq!(rules.len(), 2);
        let smaller = grant.without(&rules[0]);
        assert_eq!(smaller.objects[0]["rules"], json!([{"verbs": ["create"]}]));
        assert_eq!(grant.rule(&rules[1]), Some(&json!({"verbs": ["create"]})));
    }
}

//! The test-facing handle on a real control plane: the daemon's identity, RBAC from
//! `deploy/`, the fault proxy it talks through, the fake kubelet, and object helpers with
//! the same names as the fake API server's (`insert`, `get`, `modify`, `patches`, …), so a
//! test reads the same against either.

use std::path::Path;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use kube::api::{DeleteParams, DynamicObject, PostParams};
use kube::discovery::ApiResource;
use kube::{Api, Client};
use serde_json::Value;

use crate::cluster::kubelet::Kubelet;
use crate::cluster::rbac::{self, Grant};
use crate::cluster::{Cluster, ClusterError, block_on};
use crate::proxy::ApiProxy;
use crate::traffic::{Fault, Recording, RequestLog};

/// One control plane of its own (so tests can change RBAC and namespaces freely), the
/// daemon's service account `gar-restarter/gar-restarter` bound by the rules of a `deploy/`
/// overlay, and the proxy the daemon reaches it through.
pub struct KubeApi {
    proxy: ApiProxy,
    /// The daemon's service-account token (TokenRequest API).
    daemon_token: String,
    kubelet: Kubelet,
    grant: Grant,
    // Last: stops after everything that talks to it.
    cluster: Cluster,
}

impl std::fmt::Debug for KubeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeApi")
            .field("server", &self.cluster.server())
            .field("proxy", &self.proxy)
            .finish()
    }
}

/// The apps/v1 and v1 kinds the tests create, by plural or kind.
fn resource(name: &str) -> ApiResource {
    let (group, version, kind, plural) = match name.to_ascii_lowercase().as_str() {
        "deployment" | "deployments" => ("apps", "v1", "Deployment", "deployments"),
        "statefulset" | "statefulsets" => ("apps", "v1", "StatefulSet", "statefulsets"),
        "daemonset" | "daemonsets" => ("apps", "v1", "DaemonSet", "daemonsets"),
        "replicaset" | "replicasets" => ("apps", "v1", "ReplicaSet", "replicasets"),
        "configmap" | "configmaps" => ("", "v1", "ConfigMap", "configmaps"),
        "pod" | "pods" => ("", "v1", "Pod", "pods"),
        other => panic!("KubeApi: no resource {other:?} in the test kinds"),
    };
    ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: if group.is_empty() {
            version.into()
        } else {
            format!("{group}/{version}")
        },
        kind: kind.into(),
        plural: plural.into(),
    }
}

impl KubeApi {
    /// A control plane with the daemon's RBAC from `deploy/base`.
    pub async fn start() -> Result<Arc<KubeApi>, ClusterError> {
        Self::start_with("base", |g| g).await
    }

    /// A control plane with the RBAC of `deploy/<overlay>`, edited by `edit` (e.g. to remove
    /// one rule) before it is applied.
    pub async fn start_with(
        overlay: &str,
        edit: impl FnOnce(Grant) -> Grant,
    ) -> Result<Arc<KubeApi>, ClusterError> {
        let started = std::time::Instant::now();
        let cluster = tokio::task::spawn_blocking(Cluster::start)
            .await
            .map_err(|e| ClusterError::Setup(format!("cluster start task: {e}")))??;
        let proxy = ApiProxy::start(cluster.server(), cluster.ca_pem())
            .await
            .map_err(|e| ClusterError::Setup(e.to_string()))?;
        let kubelet = Kubelet::start(&cluster, None)?;
        let cluster_ready = started.elapsed();
        // The manifests' own names and namespaces: this cluster is the test's alone.
        let kubeconfig = cluster.dir().join("gar-restarter.kubeconfig");
        let (grant, daemon_token) =
            rbac::install_daemon_identity(&cluster, overlay, edit, &kubeconfig, Some(&proxy.url()))
                .await?;
        eprintln!(
            "gar-testsupport: API for the daemon ready in {:.1?} (cluster {cluster_ready:.1?}, \
             then deploy/{overlay} RBAC and the daemon's token)",
            started.elapsed()
        );
        Ok(Arc::new(KubeApi {
            proxy,
            daemon_token,
            kubelet,
            grant,
            cluster,
        }))
    }

    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// The stand-in kubelet that makes pods Ready (and can hold an image's pods unready).
    pub fn kubelet(&self) -> &Kubelet {
        &self.kubelet
    }

    pub fn proxy(&self) -> &ApiProxy {
        &self.proxy
    }

    /// The RBAC objects applied for the daemon.
    pub fn grant(&self) -> &Grant {
        &self.grant
    }

    /// A client with the admin identity, straight to the API server.
    pub fn admin(&self) -> Client {
        self.cluster
            .admin_client()
            .unwrap_or_else(|e| panic!("admin client: {e}"))
    }

    /// The proxy's URL, which the daemon's kubeconfig names.
    pub fn url(&self) -> String {
        self.proxy.url()
    }

    /// Writes a kubeconfig with the daemon's service-account identity, through the proxy.
    pub fn write_kubeconfig(&self, path: &Path) -> std::io::Result<()> {
        crate::cluster::kubeconfig::write(
            path,
            &self.proxy.url(),
            self.cluster.ca_file(),
            &format!(
                "system:serviceaccount:{}:{}",
                rbac::DEPLOY_NAMESPACE,
                rbac::DEPLOY_SERVICE_ACCOUNT
            ),
            &self.daemon_token,
        )
        .map_err(std::io::Error::other)
    }

    /// A client with the daemon's identity, through the proxy (so its requests are recorded
    /// and faults apply), with kube's retries off as in the daemon.
    pub fn daemon_client(&self) -> Client {
        Client::try_from(self.daemon_config()).unwrap_or_else(|e| panic!("daemon client: {e}"))
    }

    /// The client configuration behind [`KubeApi::daemon_client`], for callers that add
    /// layers of their own.
    pub fn daemon_config(&self) -> kube::Config {
        let url = self
            .proxy
            .url()
            .parse()
            .unwrap_or_else(|e| panic!("proxy URL: {e}"));
        let mut config = kube::Config::new(url);
        config.auth_info.token = Some(self.daemon_token.clone().into());
        config.default_retry = false;
        config
    }

    /// Runs `f` with an admin client on a private runtime and waits for it. The client is
    /// made inside that runtime: a kube client's request buffer is a task on the runtime
    /// that built it, and the caller's runtime may be the very one this call blocks.
    fn with_admin<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce(Client) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = T> + Send,
        T: Send + 'static,
    {
        let (server, ca, token) = (
            self.cluster.server().to_owned(),
            self.cluster.ca_pem().to_owned(),
            self.cluster.admin_token().to_owned(),
        );
        block_on(async move {
            let client = crate::cluster::kubeconfig::client(&server, &ca, &token)
                .unwrap_or_else(|e| panic!("admin client: {e}"));
            f(client).await
        })
    }

    fn dynamic(client: Client, resource_name: &str, ns: &str) -> Api<DynamicObject> {
        Api::namespaced_with(client, ns, &resource(resource_name))
    }

    /// Creates `obj` (its namespace too, if missing) with the admin identity. Fields the
    /// server owns (resourceVersion, uid, status, …) are dropped first, so an object read
    /// back earlier can be created again, as with the fake.
    pub fn insert(&self, obj: Value) {
        self.insert_many(vec![obj], 1);
    }

    /// Creates every object, `concurrency` requests at a time (their namespaces first):
    /// how a bench fills a cluster with thousands of workloads in seconds.
    pub fn insert_many(&self, objects: Vec<Value>, concurrency: usize) {
        let objects: Vec<(String, String, String, DynamicObject)> =
            objects.into_iter().map(creatable).collect();
        let mut namespaces: Vec<String> = objects.iter().map(|(_, ns, _, _)| ns.clone()).collect();
        namespaces.sort();
        namespaces.dedup();
        let result = self.with_admin(move |client| async move {
            let api: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
            for ns in namespaces {
                let namespace =
                    serde_json::from_value(serde_json::json!({"metadata": {"name": ns}}))
                        .map_err(|e| e.to_string())?;
                match api.create(&PostParams::default(), &namespace).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(s)) if s.code == 409 => {}
                    Err(e) => return Err(format!("create namespace {ns}: {e}")),
                }
            }
            futures::stream::iter(objects)
                .map(|(kind, ns, name, object)| {
                    let api = Self::dynamic(client.clone(), &kind, &ns);
                    async move {
                        api.create(&PostParams::default(), &object)
                            .await
                            .map(|_| ())
                            .map_err(|e| format!("create {kind} {ns}/{name}: {e}"))
                    }
                })
                .buffer_unordered(concurrency.max(1))
                .try_collect::<()>()
                .await
        });
        if let Err(e) = result {
            panic!("KubeApi::insert: {e}");
        }
    }

    /// The object as the API server has it now.
    pub fn get(&self, resource_name: &str, ns: &str, name: &str) -> Option<Value> {
        let (kind, namespace, name) = (resource_name.to_owned(), ns.to_owned(), name.to_owned());
        self.with_admin(move |client| async move {
            Self::dynamic(client, &kind, &namespace)
                .get_opt(&name)
                .await
        })
        .unwrap_or_else(|e| panic!("KubeApi::get {resource_name} {ns}: {e}"))
        .map(|o| serde_json::to_value(o).unwrap_or_default())
    }

    /// A ConfigMap's keys as kubelet mounts them: `data` and `binaryData` (decoded), one
    /// file's bytes per key. Empty when the ConfigMap does not exist.
    pub fn configmap_files(
        &self,
        ns: &str,
        name: &str,
    ) -> std::collections::BTreeMap<String, Vec<u8>> {
        let (namespace, name) = (ns.to_owned(), name.to_owned());
        let cm = self
            .with_admin(move |client| async move {
                Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client, &namespace)
                    .get_opt(&name)
                    .await
            })
            .unwrap_or_else(|e| panic!("KubeApi::configmap_files {ns}: {e}"));
        let Some(cm) = cm else {
            return Default::default();
        };
        let text = cm
            .data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.into_bytes()));
        let binary = cm
            .binary_data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0));
        text.chain(binary).collect()
    }

    /// Every object of a resource, in all namespaces, as the API server has them now.
    pub fn list(&self, resource_name: &str) -> Vec<Value> {
        let kind = resource_name.to_owned();
        self.with_admin(move |client| async move {
            Api::<DynamicObject>::all_with(client, &resource(&kind))
                .list(&Default::default())
                .await
        })
        .unwrap_or_else(|e| panic!("KubeApi::list {resource_name}: {e}"))
        .items
        .into_iter()
        .map(|o| serde_json::to_value(o).unwrap_or_default())
        .collect()
    }

    /// Deletes the object (foreground, at once) and returns what it was.
    pub fn remove(&self, resource_name: &str, ns: &str, name: &str) -> Option<Value> {
        let old = self.get(resource_name, ns, name)?;
        let (kind, namespace, name) = (resource_name.to_owned(), ns.to_owned(), name.to_owned());
        self.with_admin(move |client| async move {
            Self::dynamic(client, &kind, &namespace)
                .delete(&name, &DeleteParams::default())
                .await
        })
        .unwrap_or_else(|e| panic!("KubeApi::remove {resource_name} {ns}: {e}"));
        Some(old)
    }

    /// Reads the object, lets `f` change it and writes it back (PUT, by resourceVersion);
    /// on 409 (a controller wrote it in between) reads it again and reapplies `f`.
    pub fn modify(
        &self,
        resource_name: &str,
        ns: &str,
        name: &str,
        mut f: impl FnMut(&mut Value),
    ) -> Option<Value> {
        for _ in 0..10 {
            let mut object = self.get(resource_name, ns, name)?;
            f(&mut object);
            let (kind, namespace, name) =
                (resource_name.to_owned(), ns.to_owned(), name.to_owned());
            let object: DynamicObject = serde_json::from_value(object).ok()?;
            let result = self.with_admin(move |client| async move {
                Self::dynamic(client, &kind, &namespace)
                    .replace(&name, &PostParams::default(), &object)
                    .await
            });
            match result {
                Ok(updated) => return serde_json::to_value(updated).ok(),
                Err(kube::Error::Api(s)) if s.code == 409 => continue,
                Err(e) => panic!("KubeApi::modify {resource_name} {ns}: {e}"),
            }
        }
        panic!("KubeApi::modify {resource_name} {ns}/{name}: 10 conflicts in a row")
    }

    pub fn add_fault(&self, fault: Fault) {
        self.proxy.add_fault(fault)
    }

    pub fn clear_faults(&self) {
        self.proxy.clear_faults()
    }
}

/// `obj` without its server-owned fields, with the resource, namespace and name to create it
/// under.
fn creatable(mut obj: Value) -> (String, String, String, DynamicObject) {
    if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
        for owned in [
            "resourceVersion",
            "uid",
            "creationTimestamp",
            "generation",
            "managedFields",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
        ] {
            meta.remove(owned);
        }
    }
    if let Some(o) = obj.as_object_mut() {
        o.remove("status");
    }
    let kind = obj["kind"].as_str().unwrap_or_default().to_owned();
    let ns = obj["metadata"]["namespace"]
        .as_str()
        .unwrap_or("default")
        .to_owned();
    let name = obj["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let object: DynamicObject = serde_json::from_value(obj)
        .unwrap_or_else(|e| panic!("KubeApi::insert: not an object: {e}"));
    (kind, ns, name, object)
}

/// The daemon's API traffic, as the proxy in front of the API server recorded it.
impl Recording for KubeApi {
    fn with_log<R>(&self, f: impl FnOnce(&mut RequestLog) -> R) -> R {
        self.proxy.with_log(f)
    }
}

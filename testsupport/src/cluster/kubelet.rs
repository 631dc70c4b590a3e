//! A stand-in for the scheduler and the kubelet, so that rollouts finish.
//!
//! The control plane has no nodes that run containers. This loop does the two things a
//! rollout waits for, through the same API calls the real components make: it binds each
//! new pod of a namespace to one fake Node (`pods/binding`, as the scheduler does) and
//! reports it Running and Ready (`pods/status`, as the kubelet does). Pods being deleted
//! are removed at once, as a kubelet does when their containers have stopped. Images can be
//! "held": their pods run but never become Ready, which is how a crash-looping new version
//! looks to a Deployment.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::Api;
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::json;

use super::{Cluster, ClusterError, kubeconfig};

/// The one node every pod is bound to.
pub const NODE: &str = "gar-test-node";

/// Runs until dropped, on a thread and runtime of its own, so that a test blocking its own
/// runtime does not stop pods from becoming Ready.
#[derive(Debug)]
pub struct Kubelet {
    held: Arc<Mutex<HashSet<String>>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Kubelet {
    /// Makes sure the fake node exists and is Ready, then starts serving the pods of
    /// `namespace` (`None`: of every namespace).
    pub fn start(cluster: &Cluster, namespace: Option<&str>) -> Result<Kubelet, ClusterError> {
        let (server, ca, token) = (
            cluster.server().to_owned(),
            cluster.ca_pem().to_owned(),
            cluster.admin_token().to_owned(),
        );
        let namespace = namespace.map(str::to_owned);
        let held = Arc::new(Mutex::new(HashSet::new()));
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let looped = held.clone();
        std::thread::Builder::new()
            .name("gar-test-kubelet".into())
            .spawn(move || {
                let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                runtime.block_on(async move {
                    // The client is made here: its request buffer runs on this runtime.
                    let client = match kubeconfig::client(&server, &ca, &token) {
                        Ok(c) => c,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    if let Err(e) = ensure_node(&client).await {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                    let _ = ready_tx.send(Ok(()));
                    let pods: Api<Pod> = match namespace {
                        Some(ns) => Api::namespaced(client, &ns),
                        None => Api::all(client),
                    };
                    tokio::select! {
                        _ = run(pods, looped) => {}
                        _ = stopped => {}
                    }
                });
            })
            .map_err(|e| ClusterError::Setup(format!("cannot start the kubelet thread: {e}")))?;
        ready_rx
            .recv()
            .map_err(|_| ClusterError::Setup("the kubelet thread ended at start".into()))??;
        Ok(Kubelet {
            held,
            stop: Some(stop),
        })
    }

    /// Pods whose containers run `image` (exactly) stay unready from now on.
    pub fn hold(&self, image: &str) {
        self.held
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(image.to_owned());
    }
}

impl Drop for Kubelet {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn ensure_node(client: &kube::Client) -> Result<(), ClusterError> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node = Node {
        metadata: ObjectMeta {
            name: Some(NODE.to_owned()),
            labels: Some([("kubernetes.io/hostname".to_owned(), NODE.to_owned())].into()),
            ..ObjectMeta::default()
        },
        ..Node::default()
    };
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(error) => {
            return Err(ClusterError::Kube {
                context: format!("create node {NODE}"),
                error,
            });
        }
    }
    let now = Time(Timestamp::now());
    let status = json!({"status": {
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
                        "lastHeartbeatTime": now, "lastTransitionTime": now}],
        "capacity": {"cpu": "64", "memory": "256Gi", "pods": "1000"},
        "allocatable": {"cpu": "64", "memory": "256Gi", "pods": "1000"},
    }});
    nodes
        .patch_status(NODE, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .map_err(|error| ClusterError::Kube {
            context: format!("mark node {NODE} Ready"),
            error,
        })?;
    Ok(())
}

async fn run(pods: Api<Pod>, held: Arc<Mutex<HashSet<String>>>) {
    loop {
        if let Ok(list) = pods.list(&ListParams::default()).await {
            for pod in list.items {
                // Errors are retried on the next pass: a pod may be gone or changed.
                let _ = step(&pods, &pod, &held).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn step(
    pods: &Api<Pod>,
    pod: &Pod,
    held: &Mutex<HashSet<String>>,
) -> Result<(), kube::Error> {
    let (Some(name), Some(ns)) = (
        pod.metadata.name.as_deref(),
        pod.metadata.namespace.as_deref(),
    ) else {
        return Ok(());
    };
    // `pods` may be cluster-wide; writes go to the pod's own namespace.
    let pods: Api<Pod> = Api::namespaced(pods.clone().into_client(), ns);
    let pods = &pods;
    if pod.metadata.deletion_timestamp.is_some() {
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        };
        pods.delete(name, &dp).await?;
        return Ok(());
    }
    let Some(spec) = pod.spec.as_ref() else {
        return Ok(());
    };
    if spec.node_name.is_none() {
        let binding = json!({
            "apiVersion": "v1", "kind": "Binding",
            "metadata": {"name": name},
            "target": {"apiVersion": "v1", "kind": "Node", "name": NODE},
        });
        pods.create_subresource::<_, serde_json::Value>(
            "binding",
            name,
            &PostParams::default(),
            &binding,
        )
        .await?;
        return Ok(());
    }
    let is_held = {
        let held = held.lock().unwrap_or_else(|e| e.into_inner());
        spec.containers
            .iter()
            .any(|c| c.image.as_ref().is_some_and(|i| held.contains(i)))
    };
    let ready = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .map(|c| c.status == "True");
    // Already reported as it should be.
    if ready == Some(!is_held) {
        return Ok(());
    }
    let now = Time(Timestamp::now());
    let flag = if is_held { "False" } else { "True" };
    let containers: Vec<serde_json::Value> = spec
        .containers
        .iter()
        .map(|c| {
            let state = if is_held {
                json!({"waiting": {"reason": "CrashLoopBackOff"}})
            } else {
                json!({"running": {"startedAt": now}})
            };
            json!({"name": c.name, "image": c.image, "imageID": "", "ready": !is_held,
                   "started": !is_held, "restartCount": 0, "state": state})
        })
        .collect();
    let status = json!({"status": {
        "phase": "Running",
        "startTime": now,
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now},
            {"type": "Initialized", "status": "True", "lastTransitionTime": now},
            {"type": "ContainersReady", "status": flag, "lastTransitionTime": now},
            {"type": "Ready", "status": flag, "lastTransitionTime": now},
        ],
        "containerStatuses": containers,
    }});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await?;
    Ok(())
}

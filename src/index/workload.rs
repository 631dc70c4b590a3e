//! The workloads gar-restarter can restart, and the images their pod templates run.

use std::fmt;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{PodSpec, PodTemplateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::ingest::image::{ImageRef, index_key};

/// Annotation on a workload that opts it out of indexing (and so of restarts).
pub const ENABLED_ANNOTATION: &str = "gar-restarter/enabled";
/// Annotation on a workload that picks how it is restarted (`restart` or `pin-digest`);
/// `--strategy` is the default.
pub const STRATEGY_ANNOTATION: &str = "gar-restarter/strategy";
/// Pod-template annotations our restart PATCH writes, read back through the watch: which
/// push the workload was last restarted for. They make dedupe and the out-of-order guard
/// exact across replicas and restarts, at no API cost.
pub const DIGEST_ANNOTATION: &str = "gar-restarter/digest";
pub const PUBLISHED_AT_ANNOTATION: &str = "gar-restarter/published-at";
pub const IMAGE_ANNOTATION: &str = "gar-restarter/image";

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default,
)]
pub enum WorkloadKind {
    #[default]
    Deployment,
    StatefulSet,
    DaemonSet,
}

impl WorkloadKind {
    pub const ALL: [WorkloadKind; 3] = [
        WorkloadKind::Deployment,
        WorkloadKind::StatefulSet,
        WorkloadKind::DaemonSet,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "Deployment",
            WorkloadKind::StatefulSet => "StatefulSet",
            WorkloadKind::DaemonSet => "DaemonSet",
        }
    }

    /// The REST resource name, as metrics and the API paths spell it.
    pub fn plural(self) -> &'static str {
        match self {
            WorkloadKind::Deployment => "deployments",
            WorkloadKind::StatefulSet => "statefulsets",
            WorkloadKind::DaemonSet => "daemonsets",
        }
    }
}

impl fmt::Display for WorkloadKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One workload as the index stores it. Field names follow the `cache.json` format.
///
/// Names are shared `Arc<str>`: a workload running five images appears under five keys, and
/// the index holds tens of thousands of these.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct WorkloadRef {
    #[serde(default, skip_serializing_if = "is_deployment")]
    pub kind: WorkloadKind,
    pub namespace: Arc<str>,
    pub name: Arc<str>,
    /// A paused Deployment is not restarted (kubectl refuses it too); recorded at index time
    /// so that skipping it costs no API call.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
}

fn is_deployment(k: &WorkloadKind) -> bool {
    *k == WorkloadKind::Deployment
}

impl WorkloadRef {
    pub fn new(kind: WorkloadKind, namespace: &str, name: &str) -> Self {
        Self {
            kind,
            namespace: Arc::from(namespace),
            name: Arc::from(name),
            paused: false,
        }
    }
}

impl fmt::Display for WorkloadRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// The push a workload was last restarted for, as its pod template records it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestartRecord {
    /// The pushed tag (`gar-restarter/image`), normalised.
    pub image: Option<String>,
    pub digest: Option<String>,
    /// The event's publish time (`gar-restarter/published-at`).
    pub published_at: Option<OffsetDateTime>,
}

impl RestartRecord {
    fn from_annotations(annotations: Option<&std::collections::BTreeMap<String, String>>) -> Self {
        let get = |k: &str| annotations.and_then(|a| a.get(k)).map(|v| v.trim());
        Self {
            image: get(IMAGE_ANNOTATION)
                .and_then(|v| ImageRef::parse(v).ok())
                .map(|r| r.as_str().to_string()),
            digest: get(DIGEST_ANNOTATION).map(str::to_string),
            published_at: get(PUBLISHED_AT_ANNOTATION)
                .and_then(|v| OffsetDateTime::parse(v, &Rfc3339).ok()),
        }
    }
}

/// Whether a `gar-restarter/enabled` value lets a workload be restarted: `"false"` always
/// opts out; with `--opt-in`, only `"true"` opts in.
pub fn enabled(flag: Option<&str>, opt_in: bool) -> bool {
    match flag.map(|v| v.trim().to_ascii_lowercase()).as_deref() {
        Some("false") => false,
        Some("true") => true,
        _ => !opt_in,
    }
}

/// One container's image as the pod template has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerImage {
    pub container: String,
    pub init: bool,
    /// The normalised tag reference it is indexed under (see [`index_key`]): `repo:tag@…`
    /// keeps its tag; `None` for `repo@sha256:…` (pinned by hand) or unparseable images.
    pub image: Option<ImageRef>,
    pub pull_policy: Option<String>,
    /// The image exactly as the pod template writes it, when that differs from `image`'s
    /// normalised form (`None`: the same, as for every fully spelled GAR image, so the live
    /// view holds no second copy): pin-digest keeps its spelling, and the pull-policy
    /// defaults read its tag.
    pub written: Option<String>,
}

impl ContainerImage {
    /// Whether the pod template pins a digest (`…@sha256:…`): a restart cannot change it.
    pub fn digest_pinned(&self) -> bool {
        self.written.as_deref().is_some_and(|w| w.contains('@'))
    }

    /// The image as the pod template writes it (see [`ContainerImage::written`]).
    pub fn spelled(&self) -> Option<&str> {
        self.written
            .as_deref()
            .or_else(|| self.image.as_ref().map(ImageRef::as_str))
    }
}

/// Rollout progress as the workload reports it: the inputs of kubectl's `rollout status`,
/// per kind (fields a kind does not have stay at their defaults).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RolloutStatus {
    pub observed_generation: i64,
    /// Deployment and StatefulSet `spec.replicas` (the API server defaults it to 1);
    /// DaemonSet `status.desiredNumberScheduled`.
    pub desired: i32,
    /// `status.replicas`: every pod of a Deployment, old ones included.
    pub replicas: i32,
    /// `updatedReplicas` (DaemonSet: `updatedNumberScheduled`).
    pub updated_replicas: i32,
    /// `availableReplicas` (DaemonSet: `numberAvailable`).
    pub available_replicas: i32,
    /// StatefulSet `readyReplicas`.
    pub ready_replicas: i32,
    /// StatefulSet `spec.updateStrategy.rollingUpdate.partition`.
    pub partition: Option<i32>,
    /// StatefulSet `updateRevision` and `currentRevision`.
    pub update_revision: Option<String>,
    pub current_revision: Option<String>,
    /// The reason of a Deployment's `Progressing` condition (`ProgressDeadlineExceeded`: failed).
    pub progressing_reason: Option<String>,
    /// Deployment `spec.progressDeadlineSeconds`.
    pub progress_deadline_seconds: Option<i32>,
    /// `OnDelete` update strategy (StatefulSet, DaemonSet): pods change only when someone
    /// deletes them, so there is no rollout to follow.
    pub on_delete: bool,
}

/// What the daemon keeps of one live workload: only what its decisions need, not the object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadState {
    pub workload: WorkloadRef,
    pub containers: Vec<ContainerImage>,
    /// Deployment `spec.paused` (kubectl refuses to restart a paused Deployment).
    pub paused: bool,
    /// The workload's own `gar-restarter/enabled` annotation, raw, judged with `--opt-in`.
    pub annotations_enabled: Option<String>,
    /// The workload's own `gar-restarter/strategy` annotation, raw (judged when deciding,
    /// so that an unknown value is reported rather than guessed).
    pub strategy: Option<String>,
    pub last_restart: RestartRecord,
    /// The object's resourceVersion when seen: the PATCH precondition, so that a decision
    /// taken on a stale view fails with 409 and is taken again.
    pub resource_version: Option<String>,
    /// The object's uid: what an Event names so that `kubectl describe` shows it.
    pub uid: Option<String>,
    pub generation: i64,
    pub status: RolloutStatus,
}

impl WorkloadState {
    /// Whether `--opt-in`/`gar-restarter/enabled` allow restarting it.
    pub fn enabled(&self, opt_in: bool) -> bool {
        enabled(self.annotations_enabled.as_deref(), opt_in)
    }

    /// Distinct tag references the pod template runs (containers and init containers).
    pub fn images(&self) -> Vec<ImageRef> {
        let mut out: Vec<ImageRef> = Vec::new();
        for c in &self.containers {
            if let Some(i) = &c.image
                && !out.contains(i)
            {
                out.push(i.clone());
            }
        }
        out
    }

    fn from_parts(
        kind: WorkloadKind,
        meta: &ObjectMeta,
        template: &PodTemplateSpec,
        paused: bool,
        status: RolloutStatus,
    ) -> Option<Self> {
        let namespace = meta.namespace.as_deref()?;
        let name = meta.name.as_deref()?;
        let mut workload = WorkloadRef::new(kind, namespace, name);
        workload.paused = paused;
        let containers = template
            .spec
            .iter()
            .flat_map(|s| {
                let init = s.init_containers.iter().flatten().map(|c| (c, true));
                s.containers.iter().map(|c| (c, false)).chain(init)
            })
            .map(|(c, init)| {
                let image = c.image.as_deref().and_then(index_key);
                let written = c
                    .image
                    .clone()
                    .filter(|w| image.as_ref().is_none_or(|i| i.as_str() != w));
                ContainerImage {
                    container: c.name.clone(),
                    init,
                    image,
                    pull_policy: c.image_pull_policy.clone(),
                    written,
                }
            })
            .collect();
        Some(Self {
            workload,
            containers,
            paused,
            annotations_enabled: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(ENABLED_ANNOTATION))
                .cloned(),
            strategy: meta
                .annotations
                .as_ref()
                .and_then(|a| a.get(STRATEGY_ANNOTATION))
                .cloned(),
            last_restart: RestartRecord::from_annotations(
                template
                    .metadata
                    .as_ref()
                    .and_then(|m| m.annotations.as_ref()),
            ),
            resource_version: meta.resource_version.clone(),
            uid: meta.uid.clone(),
            generation: meta.generation.unwrap_or(0),
            status,
        })
    }
}

/// A workload kind the live view watches.
pub trait Workload:
    kube::Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
    + Clone
    + serde::de::DeserializeOwned
    + fmt::Debug
    + Send
    + Sync
    + 'static
{
    const KIND: WorkloadKind;
    /// `None` for an object without a namespace or name (never served by a real API server).
    fn state(&self) -> Option<WorkloadState>;
}

impl Workload for Deployment {
    const KIND: WorkloadKind = WorkloadKind::Deployment;
    fn state(&self) -> Option<WorkloadState> {
        let spec = self.spec.as_ref()?;
        let st = self.status.as_ref();
        let status = RolloutStatus {
            observed_generation: st.and_then(|s| s.observed_generation).unwrap_or(0),
            desired: spec.replicas.unwrap_or(1),
            replicas: st.and_then(|s| s.replicas).unwrap_or(0),
            updated_replicas: st.and_then(|s| s.updated_replicas).unwrap_or(0),
            available_replicas: st.and_then(|s| s.available_replicas).unwrap_or(0),
            progressing_reason: st
                .and_then(|s| s.conditions.as_ref())
                .and_then(|cs| cs.iter().find(|c| c.type_ == "Progressing"))
                .and_then(|c| c.reason.clone()),
            progress_deadline_seconds: spec.progress_deadline_seconds,
            ..RolloutStatus::default()
        };
        WorkloadState::from_parts(
            Self::KIND,
            &self.metadata,
            &spec.template,
            spec.paused.unwrap_or(false),
            status,
        )
    }
}

impl Workload for StatefulSet {
    const KIND: WorkloadKind = WorkloadKind::StatefulSet;
    fn state(&self) -> Option<WorkloadState> {
        let spec = self.spec.as_ref()?;
        let st = self.status.as_ref();
        let strategy = spec.update_strategy.as_ref();
        let status = RolloutStatus {
            observed_generation: st.and_then(|s| s.observed_generation).unwrap_or(0),
            desired: spec.replicas.unwrap_or(1),
            replicas: st.map(|s| s.replicas).unwrap_or(0),
            updated_replicas: st.and_then(|s| s.updated_replicas).unwrap_or(0),
            available_replicas: st.and_then(|s| s.available_replicas).unwrap_or(0),
            ready_replicas: st.and_then(|s| s.ready_replicas).unwrap_or(0),
            partition: strategy
                .and_then(|u| u.rolling_update.as_ref())
                .and_then(|r| r.partition),
            update_revision: st.and_then(|s| s.update_revision.clone()),
            current_revision: st.and_then(|s| s.current_revision.clone()),
            on_delete: strategy.and_then(|u| u.type_.as_deref()) == Some("OnDelete"),
            ..RolloutStatus::default()
        };
        WorkloadState::from_parts(Self::KIND, &self.metadata, &spec.template, false, status)
    }
}

impl Workload for DaemonSet {
    const KIND: WorkloadKind = WorkloadKind::DaemonSet;
    fn state(&self) -> Option<WorkloadState> {
        let spec = self.spec.as_ref()?;
        let st = self.status.as_ref();
        let status = RolloutStatus {
            observed_generation: st.and_then(|s| s.observed_generation).unwrap_or(0),
            desired: st.map(|s| s.desired_number_scheduled).unwrap_or(0),
            updated_replicas: st.and_then(|s| s.updated_number_scheduled).unwrap_or(0),
            available_replicas: st.and_then(|s| s.number_available).unwrap_or(0),
            on_delete: spec
                .update_strategy
                .as_ref()
                .and_then(|u| u.type_.as_deref())
                == Some("OnDelete"),
            ..RolloutStatus::default()
        };
        WorkloadState::from_parts(Self::KIND, &self.metadata, &spec.template, false, status)
    }
}

/// Normalised tag references of every container and init container in a pod template.
///
/// Digest-pinned images are left out: a push of a tag can never change what they run.
/// Unparseable images are returned separately so the caller can log them.
pub fn template_images(spec: Option<&PodSpec>) -> (Vec<ImageRef>, Vec<String>) {
    let mut images = Vec::new();
    let mut invalid = Vec::new();
    let Some(spec) = spec else {
        return (images, invalid);
    };
    let containers = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten());
    for c in containers {
        let Some(image) = c.image.as_deref() else {
            continue;
        };
        match ImageRef::parse(image) {
            Ok(r) if r.tag().is_some() => {
                if !images.contains(&r) {
                    images.push(r);
                }
            }
            Ok(_) => {}
            Err(_) => invalid.push(image.to_string()),
        }
    }
    (images, invalid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::Container;

    fn container(image: &str) -> Container {
        Container {
            name: "c".into(),
            image: Some(image.into()),
            ..Default::default()
        }
    }

    #[test]
    fn images_include_init_containers_and_skip_digests() {
        let spec = PodSpec {
            containers: vec![
                container("nginx"),
                container(
                    "gcr.io/p/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
                ),
                container("nginx:latest"),
                container("Not Valid"),
            ],
            init_containers: Some(vec![container("busybox:1.36")]),
            ..Default::default()
        };
        let (images, invalid) = template_images(Some(&spec));
        let got: Vec<&str> = images.iter().map(ImageRef::as_str).collect();
        assert_eq!(
            got,
            vec![
                "docker.io/library/nginx:latest",
                "docker.io/library/busybox:1.36"
            ]
        );
        assert_eq!(invalid, vec!["Not Valid"]);
    }

    #[test]
    fn workload_ref_json_defaults_to_deployment() {
        let w: WorkloadRef =
            serde_json::from_str(r#"{"name":"api","namespace":"production"}"#).unwrap();
        assert_eq!(
            w,
            WorkloadRef::new(WorkloadKind::Deployment, "production", "api")
        );
        assert_eq!(
            serde_json::to_string(&w).unwrap(),
            r#"{"namespace":"production","name":"api"}"#
        );
        let s: WorkloadRef =
            serde_json::from_str(r#"{"kind":"StatefulSet","name":"db","namespace":"x","extra":1}"#)
                .unwrap();
        assert_eq!(s.kind, WorkloadKind::StatefulSet);
    }

    #[test]
    fn a_tag_pinned_by_digest_stays_indexed_under_its_tag() {
        let d = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let mut pinned = container(&format!("gcr.io/p/app:v1@{d}"));
        pinned.name = "app".into();
        let mut by_hand = container(&format!("gcr.io/p/tool@{d}"));
        by_hand.name = "tool".into();
        let spec = PodSpec {
            containers: vec![pinned, by_hand],
            ..Default::default()
        };
        let deployment = Deployment {
            metadata: ObjectMeta {
                name: Some("web".into()),
                namespace: Some("apps".into()),
                annotations: Some(
                    [(STRATEGY_ANNOTATION.to_string(), "pin-digest".to_string())].into(),
                ),
                ..Default::default()
            },
            spec: Some(k8s_openapi::api::apps::v1::DeploymentSpec {
                template: PodTemplateSpec {
                    metadata: None,
                    spec: Some(spec),
                },
                ..Default::default()
            }),
            status: None,
        };
        let state = deployment.state().unwrap();
        let images: Vec<String> = state
            .images()
            .iter()
            .map(|i| i.as_str().to_string())
            .collect();
        assert_eq!(images, ["gcr.io/p/app:v1"]);
        assert_eq!(state.strategy.as_deref(), Some("pin-digest"));
        assert!(state.containers[0].digest_pinned());
        assert_eq!(
            state.containers[0].spelled(),
            Some(format!("gcr.io/p/app:v1@{d}").as_str())
        );
        assert_eq!(state.containers[1].image, None, "no tag: pinned by hand");
    }
}

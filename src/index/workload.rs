//! The workloads gar-restarter can restart, and the images their pod templates run.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::index::containers::Containers;
use crate::ingest::image::ImageRef;

/// Every annotation gar-restarter reads or writes starts with this; the others are not
/// even decoded (see [`object`](crate::index::object)).
pub const ANNOTATION_PREFIX: &str = "gar-restarter/";
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
    /// From the pod template's annotations.
    pub fn from_annotations(annotations: &std::collections::BTreeMap<String, String>) -> Self {
        let get = |k: &str| annotations.get(k).map(|v| v.trim());
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

/// A container's `imagePullPolicy`: as declared ([`PullPolicy::declared`]), or after
/// Kubernetes' defaulting (`act::strategy::effective_pull_policy`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    /// A declared `imagePullPolicy`; `None` when it is unset (or empty), so that defaulting
    /// applies. An unknown value is taken as `IfNotPresent`: the API server rejects one, so
    /// only a hand-made object can carry it.
    pub fn declared(value: &str) -> Option<PullPolicy> {
        match value.trim() {
            "" => None,
            "Always" => Some(PullPolicy::Always),
            "Never" => Some(PullPolicy::Never),
            _ => Some(PullPolicy::IfNotPresent),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PullPolicy::Always => "Always",
            PullPolicy::IfNotPresent => "IfNotPresent",
            PullPolicy::Never => "Never",
        }
    }

    /// Whether a restart can start an image the node already has under the same tag.
    pub fn may_reuse_cached(self) -> bool {
        !matches!(self, PullPolicy::Always)
    }
}

/// One container's image as the pod template has it, as decoded; the view keeps it packed
/// ([`Containers`]) and hands out borrowed [`Container`](crate::index::containers::Container)s.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerImage {
    pub container: Box<str>,
    pub init: bool,
    /// The normalised tag reference it is indexed under (see [`index_key`]): `repo:tag@…`
    /// keeps its tag; `None` for `repo@sha256:…` (pinned by hand) or unparseable images.
    ///
    /// [`index_key`]: crate::ingest::image::index_key
    pub image: Option<ImageRef>,
    /// As declared; `None`: unset, Kubernetes' defaulting applies.
    pub pull_policy: Option<PullPolicy>,
    /// The image exactly as the pod template writes it, when that differs from `image`'s
    /// normalised form (`None`: the same, as for every fully spelled GAR image, so the live
    /// view holds no second copy): pin-digest keeps its spelling, and the pull-policy
    /// defaults read its tag.
    pub written: Option<Box<str>>,
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
    pub update_revision: Option<Box<str>>,
    pub current_revision: Option<Box<str>>,
    /// The reason of a Deployment's `Progressing` condition (`ProgressDeadlineExceeded`: failed).
    pub progressing_reason: Option<Box<str>>,
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
    pub containers: Containers,
    /// Deployment `spec.paused` (kubectl refuses to restart a paused Deployment).
    pub paused: bool,
    /// The workload's own `gar-restarter/enabled` annotation, raw, judged with `--opt-in`.
    pub annotations_enabled: Option<Box<str>>,
    /// The workload's own `gar-restarter/strategy` annotation, raw (judged when deciding,
    /// so that an unknown value is reported rather than guessed).
    pub strategy: Option<Box<str>>,
    pub last_restart: RestartRecord,
    /// The object's resourceVersion when seen: the PATCH precondition, so that a decision
    /// taken on a stale view fails with 409 and is taken again.
    pub resource_version: Option<Box<str>>,
    /// The object's uid: what an Event names so that `kubectl describe` shows it.
    pub uid: Option<Box<str>>,
    pub generation: i64,
    pub status: RolloutStatus,
}

impl WorkloadState {
    /// Whether `--opt-in`/`gar-restarter/enabled` allow restarting it.
    pub fn enabled(&self, opt_in: bool) -> bool {
        enabled(self.annotations_enabled.as_deref(), opt_in)
    }

    /// Distinct tag references the pod template runs (containers and init containers).
    pub fn images(&self) -> Vec<&str> {
        self.images_by_container()
            .into_iter()
            .map(|(_, image)| image)
            .collect()
    }

    /// [`WorkloadState::images`], each with the index of the first container that runs it.
    pub fn images_by_container(&self) -> Vec<(usize, &str)> {
        let mut out: Vec<(usize, &str)> = Vec::new();
        for (i, c) in self.containers.iter().enumerate() {
            if let Some(image) = c.image
                && !out.iter().any(|&(_, seen)| seen == image)
            {
                out.push((i, image));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
}

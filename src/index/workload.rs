//! The workloads gar-restarter can restart, and the images their pod templates run.

use std::fmt;
use std::sync::Arc;

use k8s_openapi::api::core::v1::PodSpec;
use serde::{Deserialize, Serialize};

use crate::ingest::image::ImageRef;

/// Annotation on a workload that opts it out of indexing (and so of restarts).
pub const ENABLED_ANNOTATION: &str = "gar-restarter/enabled";

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
}

//! Workload objects as the daemon decodes them from LIST pages and watch events: only the
//! fields a [`WorkloadState`] keeps.
//!
//! Why not k8s-openapi's `Deployment`: decoding one allocates every field of the object
//! (managedFields, every label and annotation, `kubectl.kubernetes.io/last-applied-configuration`
//! which is the whole object again as a string, env, probes, volumes, …) for the view to keep
//! a few strings of it, and what glibc keeps after freeing the rest stays resident: with
//! 10,000 Deployments watched the daemon ran in 73.5 MiB RSS, and 59.6 MiB once it decoded
//! these instead (BENCHMARKS.md). They skip every other field while decoding (serde's
//! `IgnoredAny`: nothing is allocated for it), and of the annotations keep only
//! `gar-restarter/*` ones.
//!
//! The three kinds share one type, [`Object`]: their fields differ only where
//! [`RolloutStatus`] is filled, so [`Object::into_state`] is the one place that maps them.

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};

use crate::index::workload::{
    ANNOTATION_PREFIX, ContainerImage, ENABLED_ANNOTATION, PullPolicy, RestartRecord,
    RolloutStatus, STRATEGY_ANNOTATION, WorkloadKind, WorkloadRef, WorkloadState,
};
use crate::ingest::image::index_key;

/// A workload kind as a type, so that kube's typed `Api` and watcher can serve [`Object`].
pub trait Kind: Clone + fmt::Debug + Send + Sync + 'static {
    const KIND: WorkloadKind;
}

#[derive(Debug, Clone)]
pub struct Deployments;
#[derive(Debug, Clone)]
pub struct StatefulSets;
#[derive(Debug, Clone)]
pub struct DaemonSets;

impl Kind for Deployments {
    const KIND: WorkloadKind = WorkloadKind::Deployment;
}
impl Kind for StatefulSets {
    const KIND: WorkloadKind = WorkloadKind::StatefulSet;
}
impl Kind for DaemonSets {
    const KIND: WorkloadKind = WorkloadKind::DaemonSet;
}

/// An `apps/v1` Deployment, StatefulSet or DaemonSet, decoded down to what the daemon keeps.
/// Its metadata holds the name, namespace, uid, resourceVersion (which kube's watcher
/// resumes from), generation and the `gar-restarter/*` annotations; nothing else.
#[derive(Debug, Clone, Deserialize)]
#[serde(bound = "")]
pub struct Object<K: Kind> {
    #[serde(default, deserialize_with = "kept_metadata")]
    metadata: ObjectMeta,
    #[serde(default)]
    spec: Option<Spec>,
    #[serde(default)]
    status: Option<Status>,
    #[serde(skip)]
    kind: PhantomData<K>,
}

/// The spec fields of the three kinds, together (a kind leaves the others' at `None`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Spec {
    replicas: Option<i32>,
    /// Deployment only.
    paused: Option<bool>,
    progress_deadline_seconds: Option<i32>,
    template: Template,
    /// StatefulSet and DaemonSet (a Deployment's is `strategy`, which nothing here reads).
    update_strategy: Option<UpdateStrategy>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct Template {
    metadata: TemplateMeta,
    spec: PodSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct TemplateMeta {
    #[serde(deserialize_with = "our_annotations")]
    annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct PodSpec {
    containers: Vec<Container>,
    init_containers: Vec<Container>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Container {
    name: String,
    image: Option<String>,
    image_pull_policy: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct UpdateStrategy {
    #[serde(rename = "type")]
    type_: Option<String>,
    rolling_update: Option<RollingUpdate>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct RollingUpdate {
    /// StatefulSet only; a DaemonSet's rollingUpdate has none.
    partition: Option<i32>,
}

/// The status fields of the three kinds, together.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct Status {
    observed_generation: Option<i64>,
    replicas: Option<i32>,
    updated_replicas: Option<i32>,
    available_replicas: Option<i32>,
    ready_replicas: Option<i32>,
    update_revision: Option<String>,
    current_revision: Option<String>,
    conditions: Vec<Condition>,
    /// DaemonSet.
    desired_number_scheduled: Option<i32>,
    updated_number_scheduled: Option<i32>,
    number_available: Option<i32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct Condition {
    #[serde(rename = "type")]
    type_: String,
    reason: Option<String>,
}

impl<K: Kind> Object<K> {
    /// What the view keeps of it; `None` for an object without a namespace, name or spec
    /// (never served by a real API server).
    pub fn into_state(self) -> Option<WorkloadState> {
        let meta = self.metadata;
        let spec = self.spec?;
        let st = self.status.unwrap_or_default();
        let strategy = spec.update_strategy.unwrap_or_default();
        let on_delete = strategy.type_.as_deref() == Some("OnDelete");
        // Deployment and StatefulSet name these the same; a DaemonSet has its own below.
        let common = RolloutStatus {
            observed_generation: st.observed_generation.unwrap_or(0),
            desired: spec.replicas.unwrap_or(1),
            replicas: st.replicas.unwrap_or(0),
            updated_replicas: st.updated_replicas.unwrap_or(0),
            available_replicas: st.available_replicas.unwrap_or(0),
            ..RolloutStatus::default()
        };
        let status = match K::KIND {
            WorkloadKind::Deployment => RolloutStatus {
                progressing_reason: st
                    .conditions
                    .into_iter()
                    .find(|c| c.type_ == "Progressing")
                    .and_then(|c| c.reason)
                    .map(String::into_boxed_str),
                progress_deadline_seconds: spec.progress_deadline_seconds,
                ..common
            },
            WorkloadKind::StatefulSet => RolloutStatus {
                ready_replicas: st.ready_replicas.unwrap_or(0),
                partition: strategy.rolling_update.and_then(|r| r.partition),
                update_revision: st.update_revision.map(String::into_boxed_str),
                current_revision: st.current_revision.map(String::into_boxed_str),
                on_delete,
                ..common
            },
            WorkloadKind::DaemonSet => RolloutStatus {
                observed_generation: common.observed_generation,
                desired: st.desired_number_scheduled.unwrap_or(0),
                updated_replicas: st.updated_number_scheduled.unwrap_or(0),
                available_replicas: st.number_available.unwrap_or(0),
                on_delete,
                ..RolloutStatus::default()
            },
        };
        let paused = K::KIND == WorkloadKind::Deployment && spec.paused.unwrap_or(false);
        let mut workload =
            WorkloadRef::new(K::KIND, meta.namespace.as_deref()?, meta.name.as_deref()?);
        workload.paused = paused;
        let pod = spec.template.spec;
        let containers = pod
            .containers
            .into_iter()
            .map(|c| (c, false))
            .chain(pod.init_containers.into_iter().map(|c| (c, true)))
            .map(|(c, init)| container_image(c, init))
            .collect();
        let mut annotations = meta.annotations.unwrap_or_default();
        Some(WorkloadState {
            workload,
            containers,
            paused,
            annotations_enabled: annotations
                .remove(ENABLED_ANNOTATION)
                .map(String::into_boxed_str),
            strategy: annotations
                .remove(STRATEGY_ANNOTATION)
                .map(String::into_boxed_str),
            last_restart: RestartRecord::from_annotations(&spec.template.metadata.annotations),
            resource_version: meta.resource_version.map(String::into_boxed_str),
            uid: meta.uid.map(String::into_boxed_str),
            generation: meta.generation.unwrap_or(0),
            status,
        })
    }
}

fn container_image(c: Container, init: bool) -> ContainerImage {
    let image = c.image.as_deref().and_then(index_key);
    // The spelling is kept only where it differs from the normalised form (see
    // `ContainerImage::written`): for fully spelled GAR images it is not stored twice.
    let written = c
        .image
        .filter(|w| image.as_ref().is_none_or(|i| i.as_str() != w))
        .map(String::into_boxed_str);
    ContainerImage {
        container: c.name.into_boxed_str(),
        init,
        image,
        pull_policy: c
            .image_pull_policy
            .as_deref()
            .and_then(PullPolicy::declared),
        written,
    }
}

impl<K: Kind> kube::Resource for Object<K> {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> std::borrow::Cow<'_, str> {
        K::KIND.as_str().into()
    }
    fn group(_: &()) -> std::borrow::Cow<'_, str> {
        "apps".into()
    }
    fn version(_: &()) -> std::borrow::Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> std::borrow::Cow<'_, str> {
        K::KIND.plural().into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The metadata fields kept: see [`Object`].
#[derive(Default, Deserialize)]
#[serde(rename_all = "camelCase", default)]
struct KeptMeta {
    name: Option<String>,
    namespace: Option<String>,
    uid: Option<String>,
    resource_version: Option<String>,
    generation: Option<i64>,
    #[serde(deserialize_with = "our_annotations")]
    annotations: BTreeMap<String, String>,
}

fn kept_metadata<'de, D: Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let m = KeptMeta::deserialize(d)?;
    Ok(ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        uid: m.uid,
        resource_version: m.resource_version,
        generation: m.generation,
        annotations: (!m.annotations.is_empty()).then_some(m.annotations),
        ..ObjectMeta::default()
    })
}

/// The `gar-restarter/*` annotations of an annotation map (or `null`); every other key and
/// value is skipped without being allocated.
fn our_annotations<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    struct Annotations;
    impl<'de> Visitor<'de> for Annotations {
        type Value = BTreeMap<String, String>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a map of annotations")
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(BTreeMap::new())
        }
        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(BTreeMap::new())
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_map(self)
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut ours = BTreeMap::new();
            while let Some(key) = map.next_key::<AnnotationKey>()? {
                match key {
                    AnnotationKey::Ours(k) => {
                        ours.insert(k, map.next_value::<String>()?);
                    }
                    AnnotationKey::Other => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(ours)
        }
    }
    d.deserialize_option(Annotations)
}

/// An annotation key: allocated only when it is one of ours.
enum AnnotationKey {
    Ours(String),
    Other,
}

impl<'de> Deserialize<'de> for AnnotationKey {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Key;
        impl Visitor<'_> for Key {
            type Value = AnnotationKey;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an annotation key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<AnnotationKey, E> {
                Ok(if v.starts_with(ANNOTATION_PREFIX) {
                    AnnotationKey::Ours(v.to_owned())
                } else {
                    AnnotationKey::Other
                })
            }
        }
        d.deserialize_str(Key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    /// A Deployment as kube-apiserver serves it, with the fields the daemon skips.
    fn served_deployment() -> serde_json::Value {
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": "web", "namespace": "apps", "uid": "u-1", "resourceVersion": "42",
                "generation": 3,
                "labels": {"app": "web"},
                "annotations": {
                    "gar-restarter/strategy": "pin-digest",
                    "gar-restarter/enabled": "true",
                    "kubectl.kubernetes.io/last-applied-configuration": "{\"huge\":true}",
                    "deployment.kubernetes.io/revision": "3"
                },
                "managedFields": [{"manager": "kubectl", "operation": "Apply",
                                   "fieldsV1": {"f:spec": {"f:replicas": {}}}}]
            },
            "spec": {
                "replicas": 2,
                "paused": true,
                "progressDeadlineSeconds": 120,
                "strategy": {"type": "RollingUpdate",
                             "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 1}},
                "selector": {"matchLabels": {"app": "web"}},
                "template": {
                    "metadata": {
                        "labels": {"app": "web"},
                        "annotations": {
                            "gar-restarter/digest": D,
                            "gar-restarter/published-at": "2026-12-03T10:00:00Z",
                            "gar-restarter/image": "gcr.io/p/app:v1",
                            "kubectl.kubernetes.io/restartedAt": "2026-12-03T10:00:01Z"
                        }
                    },
                    "spec": {
                        "containers": [
                            {"name": "app", "image": format!("gcr.io/p/app:v1@{D}"),
                             "imagePullPolicy": "IfNotPresent",
                             "env": [{"name": "A", "value": "b"}], "ports": [{"containerPort": 80}]},
                            {"name": "tool", "image": format!("gcr.io/p/tool@{D}")},
                            {"name": "nginx", "image": "nginx"}
                        ],
                        "initContainers": [{"name": "init", "image": "gcr.io/p/init:1"}],
                        "volumes": [{"name": "v", "emptyDir": {}}]
                    }
                }
            },
            "status": {
                "observedGeneration": 3, "replicas": 3, "updatedReplicas": 2,
                "availableReplicas": 1, "readyReplicas": 1,
                "conditions": [
                    {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                    {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}
                ]
            }
        })
    }

    #[test]
    fn a_served_deployment_keeps_what_the_view_needs() {
        let obj: Object<Deployments> = serde_json::from_value(served_deployment()).unwrap();
        let meta = kube::Resource::meta(&obj);
        assert_eq!(meta.resource_version.as_deref(), Some("42"));
        assert!(meta.managed_fields.is_none() && meta.labels.is_none());
        let kept: Vec<&String> = meta.annotations.iter().flat_map(|a| a.keys()).collect();
        assert_eq!(kept, ["gar-restarter/enabled", "gar-restarter/strategy"]);

        let s = obj.into_state().unwrap();
        assert_eq!(s.workload.to_string(), "Deployment apps/web");
        assert!(s.paused && s.workload.paused);
        assert_eq!(s.annotations_enabled.as_deref(), Some("true"));
        assert_eq!(s.strategy.as_deref(), Some("pin-digest"));
        assert_eq!(s.uid.as_deref(), Some("u-1"));
        assert_eq!(s.generation, 3);
        assert_eq!(s.last_restart.digest.as_deref(), Some(D));
        assert_eq!(s.last_restart.image.as_deref(), Some("gcr.io/p/app:v1"));
        assert!(s.last_restart.published_at.is_some());
        assert_eq!(
            s.images(),
            [
                "gcr.io/p/app:v1",
                "docker.io/library/nginx:latest",
                "gcr.io/p/init:1"
            ],
            "a tag pinned by digest stays indexed under its tag; one pinned by hand is not"
        );
        let c: Vec<_> = s.containers.iter().collect();
        assert_eq!(c[0].pull_policy, Some(PullPolicy::IfNotPresent));
        assert!(c[0].digest_pinned());
        assert_eq!(c[3].container, "init");
        assert!(c[3].init);
        assert_eq!(c[1].image, None, "no tag: pinned by hand");
        assert_eq!(
            s.status,
            RolloutStatus {
                observed_generation: 3,
                desired: 2,
                replicas: 3,
                updated_replicas: 2,
                available_replicas: 1,
                progressing_reason: Some("ProgressDeadlineExceeded".into()),
                progress_deadline_seconds: Some(120),
                ..RolloutStatus::default()
            }
        );
    }

    #[test]
    fn statefulset_and_daemonset_status_map_to_kubectls_inputs() {
        let sts: Object<StatefulSets> = serde_json::from_value(json!({
            "metadata": {"name": "db", "namespace": "apps"},
            "spec": {"replicas": 3, "updateStrategy": {"type": "RollingUpdate",
                     "rollingUpdate": {"partition": 1}},
                     "template": {"spec": {"containers": [{"name": "db", "image": "gcr.io/p/db:1"}]}}},
            "status": {"observedGeneration": 2, "replicas": 3, "readyReplicas": 2,
                       "updatedReplicas": 1, "currentRevision": "db-1", "updateRevision": "db-2"}
        }))
        .unwrap();
        let s = sts.into_state().unwrap();
        assert_eq!(s.workload.kind, WorkloadKind::StatefulSet);
        assert_eq!(
            s.status,
            RolloutStatus {
                observed_generation: 2,
                desired: 3,
                replicas: 3,
                updated_replicas: 1,
                ready_replicas: 2,
                partition: Some(1),
                update_revision: Some("db-2".into()),
                current_revision: Some("db-1".into()),
                ..RolloutStatus::default()
            }
        );
        let ds: Object<DaemonSets> = serde_json::from_value(json!({
            "metadata": {"name": "agent", "namespace": "kube-system", "annotations": null},
            "spec": {"updateStrategy": {"type": "OnDelete",
                     "rollingUpdate": {"maxUnavailable": 1}},
                     "template": {"spec": {"containers": [{"name": "a", "image": "gcr.io/p/a:1"}]}}},
            "status": {"observedGeneration": 1, "desiredNumberScheduled": 4,
                       "updatedNumberScheduled": 3, "numberAvailable": 2}
        }))
        .unwrap();
        let s = ds.into_state().unwrap();
        assert!(!s.paused);
        assert_eq!(
            s.status,
            RolloutStatus {
                observed_generation: 1,
                desired: 4,
                updated_replicas: 3,
                available_replicas: 2,
                on_delete: true,
                ..RolloutStatus::default()
            }
        );
    }

    #[test]
    fn an_object_without_name_namespace_or_spec_is_not_kept() {
        for v in [
            json!({"metadata": {"name": "x"}, "spec": {}}),
            json!({"metadata": {"namespace": "x"}, "spec": {}}),
            json!({"metadata": {"name": "x", "namespace": "y"}}),
        ] {
            let obj: Object<Deployments> = serde_json::from_value(v).unwrap();
            assert!(obj.into_state().is_none());
        }
    }

    #[test]
    fn a_wrongly_typed_kept_field_is_an_error_and_a_skipped_one_is_not() {
        let mut bad = served_deployment();
        bad["spec"]["replicas"] = json!("two");
        assert!(serde_json::from_value::<Object<Deployments>>(bad).is_err());
        let mut odd = served_deployment();
        odd["spec"]["template"]["spec"]["volumes"] = json!("not a list");
        odd["metadata"]["annotations"]["other"] = json!({"not": "a string"});
        assert!(serde_json::from_value::<Object<Deployments>>(odd).is_ok());
    }

    #[test]
    fn the_typed_api_paths_are_the_kinds() {
        use kube::Resource;
        assert_eq!(
            Object::<StatefulSets>::url_path(&(), Some("apps")),
            "/apis/apps/v1/namespaces/apps/statefulsets"
        );
        assert_eq!(Object::<DaemonSets>::kind(&()), "DaemonSet");
        assert_eq!(Object::<Deployments>::api_version(&()), "apps/v1");
    }
}

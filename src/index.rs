//! The image → workloads index and its `cache.json` format.
//!
//! ```json
//! {"version": 1, "generatedAt": "…", "scope": {"namespaces": [], "selector": null},
//!  "images": {"docker.io/library/nginx:latest": [{"name": "api", "namespace": "production"}]}}
//! ```
//! Only `images` is required, so the original hand-written files load unchanged. Keys are
//! normalised on load, so `nginx` and `docker.io/library/nginx:latest` are the same key.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::image::ImageRef;
use crate::workload::{WorkloadKind, WorkloadRef};

pub const FORMAT_VERSION: u32 = 1;

/// What an index was built from; a rebuild with another scope must not be mistaken for ours.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Scope {
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub selector: Option<String>,
    /// Only workloads annotated `gar-restarter/enabled: "true"` are indexed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub opt_in: bool,
}

/// The on-disk / in-ConfigMap shape.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IndexFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generated_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<Scope>,
    pub images: BTreeMap<String, Vec<WorkloadRef>>,
}

/// Borrowing twins of [`IndexFile`] and [`WorkloadRef`] for fast loading.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawIndexFile<'a> {
    #[serde(default)]
    version: Option<u32>,
    #[serde(default, borrow)]
    generated_at: Option<Cow<'a, str>>,
    #[serde(default)]
    scope: Option<Scope>,
    #[serde(borrow)]
    images: HashMap<Key<'a>, Vec<RawWorkload<'a>>>,
}

/// serde borrows a `Cow` only as a direct field, so map keys need this newtype.
#[derive(Deserialize, PartialEq, Eq, Hash)]
struct Key<'a>(#[serde(borrow)] Cow<'a, str>);

#[derive(Deserialize)]
struct RawWorkload<'a> {
    #[serde(default)]
    kind: WorkloadKind,
    #[serde(borrow)]
    namespace: Cow<'a, str>,
    #[serde(borrow)]
    name: Cow<'a, str>,
    #[serde(default)]
    paused: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("index is not valid cache.json: {0}")]
    Json(#[from] serde_json::Error),
}

/// The in-memory index: one hash lookup per event, no allocation on a hit.
#[derive(Debug, Default, Clone)]
pub struct Index {
    images: HashMap<String, Arc<[WorkloadRef]>>,
    generated_at: Option<String>,
    scope: Option<Scope>,
    workloads: usize,
}

impl Index {
    /// Builds an index from (workload, images it runs) pairs.
    pub fn build<I>(entries: I, scope: Scope, generated_at: String) -> Self
    where
        I: IntoIterator<Item = (WorkloadRef, Vec<ImageRef>)>,
    {
        let mut map: BTreeMap<String, Vec<WorkloadRef>> = BTreeMap::new();
        for (workload, images) in entries {
            for image in images {
                map.entry(image.as_str().to_string())
                    .or_default()
                    .push(workload.clone());
            }
        }
        Self::from_file(IndexFile {
            version: Some(FORMAT_VERSION),
            generated_at: Some(generated_at),
            scope: Some(scope),
            images: map,
        })
    }

    pub fn from_file(file: IndexFile) -> Self {
        let trusted = file.version.is_some();
        let entries = file.images.into_iter().map(|(k, v)| {
            let workloads = v
                .into_iter()
                .map(|w| RawWorkload {
                    kind: w.kind,
                    namespace: Cow::Owned(w.namespace.to_string()),
                    name: Cow::Owned(w.name.to_string()),
                    paused: w.paused,
                })
                .collect();
            (Cow::Owned(k), workloads)
        });
        Self::assemble(entries, trusted, file.generated_at, file.scope)
    }

    /// Parses `cache.json` borrowing from `bytes` (names are interned once, not copied per
    /// image): a 50,000-ref index loads in tens of milliseconds.
    pub fn from_json(bytes: &[u8]) -> Result<Self, IndexError> {
        let raw: RawIndexFile<'_> = serde_json::from_slice(bytes)?;
        let trusted = raw.version.is_some();
        Ok(Self::assemble(
            raw.images.into_iter().map(|(k, v)| (k.0, v)),
            trusted,
            raw.generated_at.map(Cow::into_owned),
            raw.scope,
        ))
    }

    /// `trusted`: the file carries a `version`, so gar-restarter wrote it and its keys are
    /// already normalised. Hand-written files get every key normalised.
    fn assemble<'a>(
        entries: impl Iterator<Item = (Cow<'a, str>, Vec<RawWorkload<'a>>)>,
        trusted: bool,
        generated_at: Option<String>,
        scope: Option<Scope>,
    ) -> Self {
        let mut interned: HashMap<(WorkloadKind, Cow<'a, str>, Cow<'a, str>), WorkloadRef> =
            HashMap::new();
        let mut images: HashMap<String, Vec<WorkloadRef>> = HashMap::new();
        for (key, workloads) in entries {
            let key = if trusted {
                key.into_owned()
            } else {
                // Keep an unparseable key verbatim so it can still match an identical (equally
                // odd) event reference.
                ImageRef::parse(&key)
                    .map(|r| r.as_str().to_string())
                    .unwrap_or_else(|_| key.into_owned())
            };
            let list = images.entry(key).or_default();
            for w in workloads {
                let id = (w.kind, w.namespace, w.name);
                let shared = interned.entry(id).or_insert_with_key(|(kind, ns, name)| {
                    let mut r = WorkloadRef::new(*kind, ns, name);
                    r.paused = w.paused;
                    r
                });
                list.push(shared.clone());
            }
        }
        let images = images
            .into_iter()
            .map(|(k, mut v)| {
                v.sort();
                v.dedup();
                (k, Arc::from(v))
            })
            .collect();
        Self {
            images,
            generated_at,
            scope,
            workloads: interned.len(),
        }
    }

    pub fn to_file(&self) -> IndexFile {
        IndexFile {
            version: Some(FORMAT_VERSION),
            generated_at: self.generated_at.clone(),
            scope: self.scope.clone(),
            images: self
                .images
                .iter()
                .map(|(k, v)| (k.clone(), v.to_vec()))
                .collect(),
        }
    }

    /// Compact JSON with sorted keys, so equal indexes serialise to equal bytes.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(&self.to_file()).unwrap_or_default()
    }

    pub fn get(&self, image: &ImageRef) -> Option<&Arc<[WorkloadRef]>> {
        self.images.get(image.as_str())
    }

    pub fn image_count(&self) -> usize {
        self.images.len()
    }

    pub fn workload_count(&self) -> usize {
        self.workloads
    }

    pub fn generated_at(&self) -> Option<&str> {
        self.generated_at.as_deref()
    }

    pub fn scope(&self) -> Option<&Scope> {
        self.scope.as_ref()
    }

    /// Same images and workloads, ignoring when it was generated.
    pub fn same_content(&self, other: &Index) -> bool {
        self.images == other.images
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::WorkloadKind;

    #[test]
    fn seeds_format_loads_unchanged_and_keys_are_normalised() {
        let json = br#"{"images": {
            "nginx": [{"name": "api", "namespace": "production"}],
            "gcr.io/p/app:v1": [{"name": "db", "namespace": "data", "kind": "StatefulSet"}]
        }, "someFutureField": true}"#;
        let idx = Index::from_json(json).unwrap();
        let nginx = ImageRef::parse("docker.io/library/nginx:latest").unwrap();
        assert_eq!(
            idx.get(&nginx).unwrap().as_ref(),
            &[WorkloadRef::new(
                WorkloadKind::Deployment,
                "production",
                "api"
            )]
        );
        let app = ImageRef::parse("gcr.io/p/app:v1").unwrap();
        assert_eq!(idx.get(&app).unwrap()[0].kind, WorkloadKind::StatefulSet);
        assert_eq!(idx.workload_count(), 2);
        assert!(Index::from_json(b"{\"images\": 3}").is_err());
        assert!(Index::from_json(b"{}").is_err());
    }

    #[test]
    fn build_round_trips_through_json() {
        let w = |n: &str| WorkloadRef::new(WorkloadKind::Deployment, "ns", n);
        let img = |s: &str| ImageRef::parse(s).unwrap();
        let idx = Index::build(
            [
                (w("a"), vec![img("nginx"), img("redis:7")]),
                (w("b"), vec![img("nginx")]),
            ],
            Scope::default(),
            "2026-01-01T00:00:00Z".into(),
        );
        assert_eq!(idx.get(&img("nginx:latest")).unwrap().len(), 2);
        let back = Index::from_json(&idx.to_json()).unwrap();
        assert!(back.same_content(&idx));
        assert_eq!(back.generated_at(), Some("2026-01-01T00:00:00Z"));
        assert_eq!(idx.to_json(), back.to_json());
    }
}

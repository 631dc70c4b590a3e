//! The image → workloads index and its `cache.json` format.
//!
//! ```json
//! {"version": 1, "generatedAt": "…", "scope": {"namespaces": [], "selector": null},
//!  "images": {"docker.io/library/nginx:latest": [{"name": "api", "namespace": "production"}]}}
//! ```
//! Only `images` is required, so the original hand-written files load unchanged. Keys are
//! normalised on load, so `nginx` and `docker.io/library/nginx:latest` are the same key.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::hash::BuildHasher;
use std::marker::PhantomData;
use std::sync::Arc;

use hashbrown::{DefaultHashBuilder, HashMap, HashTable};
use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

use crate::index::workload::{WorkloadKind, WorkloadRef};
use crate::ingest::image::ImageRef;
use crate::util::json::BorrowedStr;

mod compact;

pub use compact::MAX_KEY_BYTES;

/// The version of the plain form (`cache.json`); the compressed forms store
/// [`compact::VERSION`].
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

/// The borrowing twin of [`IndexFile`] for fast loading: `images` is built straight into the
/// index while the JSON is read, with no per-key allocation.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawIndexFile<'a> {
    #[serde(default)]
    version: Option<u32>,
    #[serde(default, borrow)]
    generated_at: Option<Cow<'a, str>>,
    #[serde(default)]
    scope: Option<Scope>,
    /// Version 2 only: every workload once, named by position in `images`.
    #[serde(default, borrow)]
    workloads: Vec<RawWorkload<'a>>,
    #[serde(borrow)]
    images: RawImages<'a>,
}

/// `images` as either version writes it: a map of image → workloads (1), or a front-coded
/// list of image → workload positions ([`compact`]).
enum RawImages<'a> {
    Map(Box<Builder<'a>>),
    Compact(compact::RawImages<'a>),
}

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
    #[error("index is too large: {0} bytes of keys or references (the limit is 4 GiB)")]
    TooLarge(usize),
    #[error("index is not valid compact cache.json (version 2): {0}")]
    Compact(String),
}

/// One image key: where its string sits in `keys` and its workload ids in `lists`.
#[derive(Debug, Clone, Copy)]
struct Entry {
    key_start: u32,
    key_len: u32,
    list_start: u32,
    list_len: u32,
}

impl Entry {
    fn key<'k>(&self, keys: &'k str) -> &'k str {
        &keys[self.key_start as usize..][..self.key_len as usize]
    }

    fn ids<'l>(&self, lists: &'l [u32]) -> &'l [u32] {
        &lists[self.list_start as usize..][..self.list_len as usize]
    }
}

/// The in-memory index: one hash lookup per event, no allocation on a miss.
///
/// Laid out for memory: every key lives in one string, every workload once in `workloads`,
/// and an image maps to a run of `u32` ids. For 50,000 refs over 10,000 workloads that is
/// 5.5 MiB of heap, against 10.3 MiB for a map of owned keys to lists of shared names
/// (`cargo bench --bench lookup`), and the load makes a handful of allocations instead of
/// hundreds of thousands.
#[derive(Clone, Default)]
pub struct Index {
    keys: String,
    table: HashTable<Entry>,
    hasher: DefaultHashBuilder,
    lists: Vec<u32>,
    workloads: Vec<WorkloadRef>,
    generated_at: Option<String>,
    scope: Option<Scope>,
}

impl std::fmt::Debug for Index {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Index")
            .field("images", &self.table.len())
            .field("workloads", &self.workloads.len())
            .field("generated_at", &self.generated_at)
            .field("scope", &self.scope)
            .finish()
    }
}

impl Index {
    /// Builds an index from (workload, images it runs) pairs.
    ///
    /// The pairs are sorted by image and each image's list built in one go, straight into
    /// the final layout, and the workloads are the given ones (their names shared, not
    /// copied). Through a map of owned keys, as before, the snapshot of 100,000 watched
    /// workloads cost 500,000 key strings and lists on the way, every time it was written.
    pub fn build<I, S>(entries: I, scope: Scope, generated_at: String) -> Self
    where
        I: IntoIterator<Item = (WorkloadRef, Vec<S>)>,
        S: AsRef<str>,
    {
        let entries: Vec<(WorkloadRef, Vec<S>)> = entries.into_iter().collect();
        let mut pairs: Vec<(&str, u32)> = entries
            .iter()
            .enumerate()
            .flat_map(|(i, (_, images))| images.iter().map(move |s| (s.as_ref(), i as u32)))
            .collect();
        pairs.sort_unstable();
        let runs: Vec<&[(&str, u32)]> = pairs.chunk_by(|a, b| a.0 == b.0).collect();
        let mut builder = Builder::default();
        builder.reserve(
            entries.len(),
            runs.len(),
            runs.iter().map(|run| run[0].0.len()).sum(),
            pairs.len(),
        );
        let mut ids_of = vec![None; entries.len()];
        let mut ids = Vec::new();
        for run in runs {
            ids.clear();
            for &(_, e) in run {
                let id = *ids_of[e as usize]
                    .get_or_insert_with(|| builder.shared_workload(&entries[e as usize].0));
                ids.push(id);
            }
            builder.add(run[0].0, &mut ids);
        }
        builder.finish(true, Some(generated_at), Some(scope))
    }

    /// Parses `cache.json` borrowing from `bytes`: a 50,000-ref index loads in milliseconds.
    pub fn from_json(bytes: &[u8]) -> Result<Self, IndexError> {
        let raw: RawIndexFile<'_> = serde_json::from_slice(bytes)?;
        let builder = match raw.images {
            RawImages::Map(builder) => *builder,
            RawImages::Compact(images) => compact::build(raw.workloads, images)?,
        };
        if let Some(len) = builder.overflow {
            return Err(IndexError::TooLarge(len));
        }
        Ok(builder.finish(
            raw.version.is_some(),
            raw.generated_at.map(Cow::into_owned),
            raw.scope,
        ))
    }

    /// The compact form (version 2, see [`compact`]): for the gzip and sharded forms.
    pub fn to_compact_json(&self) -> Vec<u8> {
        compact::to_json(self)
    }

    fn key(&self, e: &Entry) -> &str {
        e.key(&self.keys)
    }

    fn list(&self, e: &Entry) -> impl ExactSizeIterator<Item = &WorkloadRef> {
        e.ids(&self.lists)
            .iter()
            .map(|&id| &self.workloads[id as usize])
    }

    fn entry(&self, key: &str) -> Option<&Entry> {
        self.table
            .find(self.hasher.hash_one(key), |e| self.key(e) == key)
    }

    /// Every image key with its workloads, in no particular order.
    pub fn iter(
        &self,
    ) -> impl Iterator<Item = (&str, impl ExactSizeIterator<Item = &WorkloadRef>)> {
        self.table.iter().map(|e| (self.key(e), self.list(e)))
    }

    pub fn to_file(&self) -> IndexFile {
        IndexFile {
            version: Some(FORMAT_VERSION),
            generated_at: self.generated_at.clone(),
            scope: self.scope.clone(),
            images: self
                .iter()
                .map(|(k, v)| (k.to_string(), v.cloned().collect()))
                .collect(),
        }
    }

    /// Compact JSON with sorted keys, so equal indexes serialise to equal bytes.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(&self.to_file()).unwrap_or_default()
    }

    /// The workloads running `image`; `None` when the image is not indexed at all. A hit
    /// copies the (usually one or two) workload handles; a miss allocates nothing.
    pub fn get(&self, image: &ImageRef) -> Option<Arc<[WorkloadRef]>> {
        self.entry(image.as_str())
            .map(|e| self.list(e).cloned().collect())
    }

    /// Every image key's length, added up.
    pub fn key_bytes(&self) -> usize {
        self.keys.len()
    }

    pub fn image_count(&self) -> usize {
        self.table.len()
    }

    pub fn workload_count(&self) -> usize {
        self.workloads.len()
    }

    pub fn generated_at(&self) -> Option<&str> {
        self.generated_at.as_deref()
    }

    pub fn scope(&self) -> Option<&Scope> {
        self.scope.as_ref()
    }

    /// Same images and workloads, ignoring when it was generated.
    pub fn same_content(&self, other: &Index) -> bool {
        self.image_count() == other.image_count()
            && self.iter().all(|(key, list)| {
                other
                    .entry(key)
                    .is_some_and(|theirs| list.eq(other.list(theirs)))
            })
    }
}

/// Assembles an [`Index`]; also the `images` map's deserializer, so that loading goes from
/// JSON to the final layout in one pass.
#[derive(Default)]
struct Builder<'a> {
    index: Index,
    /// (kind, namespace, name) → id in `index.workloads`; borrowed from the file when possible.
    interned: HashMap<(WorkloadKind, Cow<'a, str>, Cow<'a, str>), u32, DefaultHashBuilder>,
    /// The ids a key brings when it repeats, as (the key's `key_start`, `key_len`, id); the
    /// two place a key uniquely, even the empty key, which starts where the next one does.
    /// They join its list once, in [`Builder::into_index`]: re-copying the merged list on
    /// every repeat cost K²/2 ids for K repeats (1.3 GB for a 984 KB `cache.json`).
    repeats: Vec<(u32, u32, u32)>,
    /// Set when a key or id no longer fits a `u32`; reported by [`Index::from_json`].
    overflow: Option<usize>,
}

impl<'a> Builder<'a> {
    /// Room for what a file says it holds, so that loading it grows nothing (a growing table
    /// rehashes every key it holds, each time it doubles).
    fn reserve(&mut self, workloads: usize, images: usize, key_bytes: usize, refs: usize) {
        let index = &mut self.index;
        index.workloads.reserve(workloads);
        self.interned.reserve(workloads);
        index.keys.reserve(key_bytes);
        index.lists.reserve(refs);
        let (keys, hasher) = (&index.keys, &index.hasher);
        index
            .table
            .reserve(images, |e| hasher.hash_one(e.key(keys)));
    }

    fn workload(
        &mut self,
        kind: WorkloadKind,
        namespace: Cow<'a, str>,
        name: Cow<'a, str>,
        paused: bool,
    ) -> u32 {
        self.intern((kind, namespace, name), |(kind, namespace, name)| {
            let mut w = WorkloadRef::new(*kind, namespace, name);
            w.paused = paused;
            w
        })
    }

    /// The id of `w`, which the index then shares (its names are not copied).
    fn shared_workload(&mut self, w: &'a WorkloadRef) -> u32 {
        let key = (
            w.kind,
            Cow::Borrowed(&*w.namespace),
            Cow::Borrowed(&*w.name),
        );
        self.intern(key, |_| w.clone())
    }

    /// The id of the workload `key` names; the first time, `make` gives the workload.
    fn intern(
        &mut self,
        key: (WorkloadKind, Cow<'a, str>, Cow<'a, str>),
        make: impl FnOnce(&(WorkloadKind, Cow<'a, str>, Cow<'a, str>)) -> WorkloadRef,
    ) -> u32 {
        let workloads = &mut self.index.workloads;
        *self.interned.entry(key).or_insert_with_key(|key| {
            workloads.push(make(key));
            workloads.len() as u32 - 1
        })
    }

    /// Adds `key` → `ids` (sorted and deduplicated here); a repeated key merges its lists,
    /// in [`Builder::into_index`], so a repeat costs its own ids and no more.
    fn add(&mut self, key: &str, ids: &mut Vec<u32>) {
        let hash = self.index.hasher.hash_one(key);
        let keys = &self.index.keys;
        if let Some(e) = self.index.table.find(hash, |e| e.key(keys) == key) {
            let (start, len) = (e.key_start, e.key_len);
            if self.fits(0, ids.len()) {
                self.repeats.extend(ids.iter().map(|&id| (start, len, id)));
            }
            return;
        }
        sort_ids(&self.index.workloads, ids);
        self.insert(hash, key, ids);
    }

    /// Adds a key known not to be there yet with `ids` already in workload order: what a
    /// compact file gives, which says so by being sorted.
    fn add_new(&mut self, key: &str, ids: &[u32]) {
        let hash = self.index.hasher.hash_one(key);
        self.insert(hash, key, ids);
    }

    /// Whether `key_len` more key bytes and `refs` more ids still fit the `u32` offsets;
    /// records the overflow when not.
    fn fits(&mut self, key_len: usize, refs: usize) -> bool {
        let key_bytes = self.index.keys.len() + key_len;
        let refs = self.index.lists.len() + self.repeats.len() + refs;
        if key_bytes > u32::MAX as usize || refs > u32::MAX as usize {
            self.overflow = Some(key_bytes.max(refs));
            return false;
        }
        true
    }

    fn insert(&mut self, hash: u64, key: &str, ids: &[u32]) {
        if !self.fits(key.len(), ids.len()) {
            return;
        }
        let index = &mut self.index;
        let entry = Entry {
            key_start: index.keys.len() as u32,
            key_len: key.len() as u32,
            list_start: index.lists.len() as u32,
            list_len: ids.len() as u32,
        };
        index.keys.push_str(key);
        index.lists.extend_from_slice(ids);
        let (keys, hasher) = (&index.keys, &index.hasher);
        index
            .table
            .insert_unique(hash, entry, |e| hasher.hash_one(e.key(keys)));
    }

    /// The index with every repeated key's ids merged into its list, sorted and
    /// deduplicated: one pass over `lists`, however often keys repeated. Without repeats (a
    /// file gar-restarter wrote, any normal one) the layout is left exactly as loaded.
    fn into_index(self) -> Index {
        let Builder {
            mut index,
            mut repeats,
            ..
        } = self;
        if repeats.is_empty() {
            return index;
        }
        // By key, and the same workload listed again under the same key only once.
        repeats.sort_unstable();
        repeats.dedup();
        let mut lists = Vec::with_capacity(index.lists.len() + repeats.len());
        let mut ids = Vec::new();
        for e in index.table.iter_mut() {
            let at = (e.key_start, e.key_len);
            let from = repeats.partition_point(|&(start, len, _)| (start, len) < at);
            let to = from + repeats[from..].partition_point(|&(start, len, _)| (start, len) == at);
            let start = lists.len() as u32;
            if from == to {
                lists.extend_from_slice(e.ids(&index.lists));
            } else {
                ids.clear();
                ids.extend_from_slice(e.ids(&index.lists));
                ids.extend(repeats[from..to].iter().map(|&(_, _, id)| id));
                sort_ids(&index.workloads, &mut ids);
                lists.extend_from_slice(&ids);
            }
            e.list_start = start;
            e.list_len = lists.len() as u32 - start;
        }
        index.lists = lists;
        index
    }

    /// `trusted`: the file carries a `version`, so gar-restarter wrote it and its keys are
    /// already normalised. Hand-written files get every key normalised (and lists merged
    /// where two spellings name the same image).
    fn finish(self, trusted: bool, generated_at: Option<String>, scope: Option<Scope>) -> Index {
        let index = self.into_index();
        let mut index = if trusted { index } else { renormalise(index) };
        index.generated_at = generated_at;
        index.scope = scope;
        index.keys.shrink_to_fit();
        index.lists.shrink_to_fit();
        index.workloads.shrink_to_fit();
        let (keys, hasher) = (&index.keys, &index.hasher);
        index.table.shrink_to(0, |e| hasher.hash_one(e.key(keys)));
        index
    }
}

/// Rebuilds the keys of a hand-written index in normal form. An unparseable key is kept
/// verbatim so it can still match an identical (equally odd) event reference.
fn renormalise(mut index: Index) -> Index {
    // Workload ids stay valid: the workloads move over as they are, only keys are rebuilt.
    let mut builder = Builder {
        index: Index {
            workloads: std::mem::take(&mut index.workloads),
            ..Index::default()
        },
        ..Builder::default()
    };
    let mut ids = Vec::new();
    for e in index.table.iter() {
        let key = index.key(e);
        ids.clear();
        ids.extend_from_slice(e.ids(&index.lists));
        match ImageRef::parse(key) {
            Ok(r) => builder.add(r.as_str(), &mut ids),
            Err(_) => builder.add(key, &mut ids),
        }
    }
    // Spellings of one image (`app:v1@sha256:…`, `app:v2@sha256:…`, …) are repeats here.
    builder.into_index()
}

fn sort_ids(workloads: &[WorkloadRef], ids: &mut Vec<u32>) {
    ids.sort_unstable_by(|a, b| workloads[*a as usize].cmp(&workloads[*b as usize]));
    ids.dedup();
}

impl<'de: 'a, 'a> Deserialize<'de> for RawImages<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ImagesVisitor(PhantomData))
    }
}

struct ImagesVisitor<'a>(PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for ImagesVisitor<'a> {
    type Value = RawImages<'a>;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a map of image references to lists of workloads (version 1), or a list of [shared, rest, [workload positions]] (version 2)")
    }

    fn visit_seq<S: SeqAccess<'de>>(self, seq: S) -> Result<Self::Value, S::Error> {
        compact::RawImages::read(seq).map(RawImages::Compact)
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
        let mut builder = Builder::default();
        let mut ids = Vec::new();
        while let Some(BorrowedStr(key)) = map.next_key::<BorrowedStr<'de>>()? {
            ids.clear();
            map.next_value_seed(WorkloadsSeed {
                builder: &mut builder,
                ids: &mut ids,
            })?;
            builder.add(&key, &mut ids);
        }
        Ok(RawImages::Map(Box::new(builder)))
    }
}

/// Reads one image's workload list straight into the builder (no `Vec` per key).
struct WorkloadsSeed<'b, 'a> {
    builder: &'b mut Builder<'a>,
    ids: &'b mut Vec<u32>,
}

impl<'de: 'a, 'a> DeserializeSeed<'de> for WorkloadsSeed<'_, 'a> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de: 'a, 'a> Visitor<'de> for WorkloadsSeed<'_, 'a> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list of workloads")
    }

    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<(), S::Error> {
        while let Some(w) = seq.next_element::<RawWorkload<'de>>()? {
            let id = self.builder.workload(w.kind, w.namespace, w.name, w.paused);
            self.ids.push(id);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::workload::WorkloadKind;

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
    fn spellings_of_one_image_merge_and_lists_are_deduplicated() {
        let json = br#"{"images": {
            "nginx": [{"name": "b", "namespace": "ns"}, {"name": "a", "namespace": "ns"}],
            "docker.io/library/nginx:latest": [{"name": "a", "namespace": "ns"}],
            "Not A Ref": [{"name": "c", "namespace": "ns"}]
        }}"#;
        let idx = Index::from_json(json).unwrap();
        let nginx = ImageRef::parse("nginx").unwrap();
        let names: Vec<String> = idx
            .get(&nginx)
            .unwrap()
            .iter()
            .map(|w| w.name.to_string())
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(idx.image_count(), 2, "the unparseable key is kept verbatim");
        assert_eq!(idx.workload_count(), 3);
        assert!(idx.get(&ImageRef::parse("redis").unwrap()).is_none());
    }

    #[test]
    fn escaped_strings_load_like_plain_ones() {
        // Escapes cannot be borrowed from the file: these take the owned path.
        let json = br#"{"version": 1, "images": {
            "gcr.io\/p\/app:v1": [{"name": "a\u0062", "namespace": "ns"}],
            "gcr.io/p/app:v2": [{"name": "ab", "namespace": "ns"}]
        }}"#;
        let idx = Index::from_json(json).unwrap();
        let v1 = idx
            .get(&ImageRef::parse("gcr.io/p/app:v1").unwrap())
            .unwrap();
        assert_eq!(&*v1[0].name, "ab");
        assert_eq!(idx.workload_count(), 1, "one workload, interned once");
        assert_eq!(idx.image_count(), 2);
    }

    #[test]
    fn same_content_compares_every_list() {
        let w = |n: &str| WorkloadRef::new(WorkloadKind::Deployment, "ns", n);
        let img = |s: &str| ImageRef::parse(s).unwrap();
        let build = |second: &str| {
            Index::build(
                [
                    (w("a"), vec![img("nginx")]),
                    (w(second), vec![img("redis")]),
                ],
                Scope::default(),
                "t".into(),
            )
        };
        assert!(build("b").same_content(&build("b")));
        assert!(!build("b").same_content(&build("c")));
        let mut paused = w("b");
        paused.paused = true;
        let with_paused = Index::build(
            [(w("a"), vec![img("nginx")]), (paused, vec![img("redis")])],
            Scope::default(),
            "t".into(),
        );
        assert!(!build("b").same_content(&with_paused));
        assert!(!build("b").same_content(&Index::default()));
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

    /// `serde_json` hands the loader every repeat of a key; each used to append a fresh copy
    /// of the merged list, K²/2 ids for K repeats. Counted in ids stored, not timed.
    #[test]
    fn repeated_keys_cost_one_id_per_distinct_workload_not_a_copy_per_repeat() {
        use std::fmt::Write;
        const K: usize = 2_000;
        let digest = format!("sha256:{}", "a".repeat(64));
        // Written by us (`version`): keys taken as they are, two of them repeating in turn,
        // and the empty key, which starts in `keys` where the next one does.
        let mut trusted = String::from(r#"{"version": 1, "images": {"#);
        // Hand-written: spellings that only normalisation finds to be one image.
        let mut spellings = String::from(r#"{"images": {"#);
        for i in 0..K {
            let sep = if i == 0 { "" } else { "," };
            let key = ["", "gcr.io/p/app:v1", "gcr.io/p/app:v2"][i % 3];
            write!(
                trusted,
                r#"{sep}"{key}": [{{"name": "w{i}", "namespace": "ns"}}, {{"name": "shared", "namespace": "ns"}}]"#
            )
            .unwrap();
            write!(
                spellings,
                r#"{sep}"gcr.io/p/app:t{i}@{digest}": [{{"name": "w{i}", "namespace": "ns"}}, {{"name": "shared", "namespace": "ns"}}]"#
            )
            .unwrap();
        }
        trusted.push_str("}}");
        spellings.push_str("}}");

        let idx = Index::from_json(trusted.as_bytes()).unwrap();
        assert_eq!(idx.image_count(), 3);
        // Each key: its third of the K workloads, and `shared` once.
        let pairs = K + 3;
        assert_eq!(idx.iter().map(|(_, list)| list.len()).sum::<usize>(), pairs);
        assert!(idx.lists.len() <= pairs, "{} ids stored", idx.lists.len());
        for (key, list) in idx.iter() {
            let list: Vec<&WorkloadRef> = list.collect();
            assert!(
                list.windows(2).all(|w| w[0] < w[1]),
                "{key:?}: sorted, no duplicates"
            );
            assert!(list.iter().any(|w| &*w.name == "shared"), "{key:?}");
        }
        let v2 = idx
            .get(&ImageRef::parse("gcr.io/p/app:v2").unwrap())
            .unwrap();
        assert_eq!(v2.len(), K / 3 + 1);
        assert!(v2.iter().any(|w| &*w.name == "w2") && !v2.iter().any(|w| &*w.name == "w1"));

        let idx = Index::from_json(spellings.as_bytes()).unwrap();
        assert_eq!(idx.image_count(), 1);
        let app = ImageRef::parse(&format!("gcr.io/p/app@{digest}")).unwrap();
        assert_eq!(idx.get(&app).unwrap().len(), K + 1);
        assert!(idx.lists.len() <= K + 1, "{} ids stored", idx.lists.len());
    }
}

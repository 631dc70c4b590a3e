//! The compact `cache.json` (version 2): what the gzip and sharded forms store.
//!
//! ```json
//! {"version": 2, "generatedAt": "…", "scope": {…},
//!  "workloads": [{"namespace": "prod", "name": "api"}, {"namespace": "prod", "name": "web"}],
//!  "images": [[0, "europe-docker.pkg.dev/p/r/app:v1", [0, 1]], [31, "2", [1]]]}
//! ```
//! Version 1 spells every workload out under every image it runs, and every image in full.
//! At 100,000 workloads of five images each that is 61 MiB of JSON, past what a reader
//! decompresses, and a scan at every start. Here each workload is written once and named by
//! its position, and the images are sorted, each giving how many leading bytes it shares
//! with the one before (front coding) and the rest. Registry hosts and repository paths are
//! written once per run of images that share them.
//!
//! The plain form stays version 1: it is what people write by hand and read with `kubectl`.

use std::borrow::Cow;

use serde::Serialize;
use serde::de::{DeserializeSeed, Deserializer, SeqAccess, Visitor};

use super::{Builder, Entry, Index, IndexError, RawWorkload, Scope};
use crate::index::workload::WorkloadRef;
use crate::util::json::BorrowedStr;

pub const VERSION: u32 = 2;

/// Most bytes the images may add up to once front coding is undone (64 MiB).
///
/// Front coding lets a few bytes of JSON stand for a long key (`[500, "a", []]` is the key
/// before plus one byte), so the decompression cap alone does not bound a load's memory:
/// 36 MiB of such entries would make terabytes of keys. 100,000 workloads of five 63-byte GAR
/// images, the scale this is measured at, make 31.5 MB. The writer refuses to store more.
pub const MAX_KEY_BYTES: usize = 64 << 20;

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct CompactFile<'a> {
    version: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    generated_at: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    scope: Option<&'a Scope>,
    workloads: Vec<&'a WorkloadRef>,
    images: Vec<(usize, &'a str, Vec<u32>)>,
}

/// `images` as read, flat: per image its shared prefix length, the rest and how many
/// workload positions it has, and every image's positions one after the other. A `Vec` per
/// image would be 500,000 allocations at 100,000 workloads, and as many frees.
#[derive(Default)]
pub struct RawImages<'a> {
    images: Vec<(usize, Cow<'a, str>, u32)>,
    positions: Vec<u32>,
}

impl<'de> RawImages<'de> {
    pub fn read<S: SeqAccess<'de>>(mut seq: S) -> Result<Self, S::Error> {
        let mut raw = RawImages {
            images: Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16)),
            positions: Vec::new(),
        };
        while let Some(image) = seq.next_element_seed(ImageSeed(&mut raw.positions))? {
            raw.images.push(image);
        }
        Ok(raw)
    }
}

/// One `[shared, "rest", [positions…]]`, its positions appended to the shared list.
struct ImageSeed<'p>(&'p mut Vec<u32>);

const IMAGE: &str = "[shared prefix length, rest of the image, [workload positions]]";

impl<'de> DeserializeSeed<'de> for ImageSeed<'_> {
    type Value = (usize, Cow<'de, str>, u32);

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ImageSeed<'_> {
    type Value = (usize, Cow<'de, str>, u32);

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(IMAGE)
    }

    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<Self::Value, S::Error> {
        let missing = |n| serde::de::Error::invalid_length(n, &IMAGE);
        let shared: usize = seq.next_element()?.ok_or_else(|| missing(0))?;
        let BorrowedStr(rest) = seq.next_element()?.ok_or_else(|| missing(1))?;
        let before = self.0.len();
        seq.next_element_seed(PositionsSeed(&mut *self.0))?
            .ok_or_else(|| missing(2))?;
        let count = u32::try_from(self.0.len() - before).unwrap_or(u32::MAX);
        Ok((shared, rest, count))
    }
}

struct PositionsSeed<'p>(&'p mut Vec<u32>);

impl<'de> DeserializeSeed<'de> for PositionsSeed<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for PositionsSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a list of workload positions")
    }

    fn visit_seq<S: SeqAccess<'de>>(self, mut seq: S) -> Result<(), S::Error> {
        while let Some(p) = seq.next_element::<u32>()? {
            self.0.push(p);
        }
        Ok(())
    }
}

/// The index as version 2 JSON. Workloads are numbered in sorted order and images sorted,
/// so equal indexes serialise to equal bytes.
pub fn to_json(index: &Index) -> Vec<u8> {
    let mut order: Vec<u32> = (0..index.workloads.len() as u32).collect();
    order.sort_unstable_by(|a, b| index.workloads[*a as usize].cmp(&index.workloads[*b as usize]));
    let mut position = vec![0u32; order.len()];
    for (new, &old) in order.iter().enumerate() {
        position[old as usize] = new as u32;
    }
    let mut entries: Vec<&Entry> = index.table.iter().collect();
    entries.sort_unstable_by(|a, b| index.key(a).cmp(index.key(b)));
    let mut previous = "";
    let images = entries
        .into_iter()
        .map(|e| {
            let key = index.key(e);
            let shared = shared_prefix(previous, key);
            previous = key;
            let mut ids: Vec<u32> = e
                .ids(&index.lists)
                .iter()
                .map(|&id| position[id as usize])
                .collect();
            ids.sort_unstable();
            (shared, &key[shared..], ids)
        })
        .collect();
    let file = CompactFile {
        version: VERSION,
        generated_at: index.generated_at.as_deref(),
        scope: index.scope.as_ref(),
        workloads: order
            .iter()
            .map(|&id| &index.workloads[id as usize])
            .collect(),
        images,
    };
    // Serialising plain data into a Vec cannot fail.
    serde_json::to_vec(&file).unwrap_or_default()
}

/// Bytes `a` and `b` start with in common, on a character boundary of both.
fn shared_prefix(a: &str, b: &str) -> usize {
    let mut n = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    while !b.is_char_boundary(n) {
        n -= 1;
    }
    n
}

/// Builds the index from a version 2 file's `workloads` and `images`.
///
/// A file we wrote lists its workloads and its images in order, so each image is new and its
/// workloads are in order already: no lookup and no sort per image, which halved the load at
/// 100,000 workloads. Images out of order are refused (that is not a file we wrote, and a
/// key could repeat); workloads out of order cost a sort per image.
pub fn build<'a>(
    workloads: Vec<RawWorkload<'a>>,
    raw: RawImages<'a>,
) -> Result<Builder<'a>, IndexError> {
    let RawImages { images, positions } = raw;
    let mut builder = Builder::default();
    builder.reserve(
        workloads.len(),
        images.len(),
        images
            .iter()
            .map(|i| i.0 + i.1.len())
            .sum::<usize>()
            .min(MAX_KEY_BYTES),
        positions.len(),
    );
    let ids: Vec<u32> = workloads
        .into_iter()
        .map(|w| builder.workload(w.kind, w.namespace, w.name, w.paused))
        .collect();
    let in_order = builder.index.workloads.is_sorted_by(|a, b| a < b);
    let mut key = String::new();
    let mut expanded = 0;
    let mut list = Vec::new();
    let mut next = positions.iter();
    for (n, (shared, rest, count)) in images.into_iter().enumerate() {
        if shared > key.len() || !key.is_char_boundary(shared) {
            return Err(IndexError::Compact(format!(
                "image {n} shares {shared} bytes with the one before, {key:?}, which it cannot"
            )));
        }
        if n > 0 && *rest <= key[shared..] {
            return Err(IndexError::Compact(format!(
                "image {n} ({:?}) does not sort after the one before ({key:?})",
                format!("{}{rest}", &key[..shared])
            )));
        }
        key.truncate(shared);
        key.push_str(&rest);
        expanded += key.len();
        if expanded > MAX_KEY_BYTES {
            return Err(IndexError::Compact(format!(
                "its images add up to more than {MAX_KEY_BYTES} bytes once front coding is \
                 undone (at image {n}); refused as a probable bomb"
            )));
        }
        list.clear();
        for &p in next.by_ref().take(count as usize) {
            let Some(&id) = ids.get(p as usize) else {
                return Err(IndexError::Compact(format!(
                    "image {key:?} names workload {p}, but only {} are listed",
                    ids.len()
                )));
            };
            list.push(id);
        }
        if in_order && list.is_sorted_by(|a, b| a < b) {
            builder.add_new(&key, &list);
        } else {
            builder.add(&key, &mut list);
        }
    }
    Ok(builder)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::workload::WorkloadKind;
    use crate::ingest::image::ImageRef;

    fn sample() -> Index {
        let w = |kind, ns: &str, n: &str| WorkloadRef::new(kind, ns, n);
        let mut paused = w(WorkloadKind::Deployment, "prod", "paused");
        paused.paused = true;
        Index::build(
            [
                (
                    w(WorkloadKind::Deployment, "prod", "web"),
                    vec![
                        "europe-docker.pkg.dev/p/r/app:v1",
                        "europe-docker.pkg.dev/p/r/app:v2",
                    ],
                ),
                (
                    w(WorkloadKind::StatefulSet, "data", "db"),
                    vec!["europe-docker.pkg.dev/p/r/app:v1", "gcr.io/p/é:1"],
                ),
                (paused, vec!["gcr.io/p/éa:1"]),
            ],
            Scope {
                namespaces: vec!["prod".into(), "data".into()],
                ..Scope::default()
            },
            "2026-12-03T00:00:00Z".into(),
        )
    }

    #[test]
    fn an_index_reads_back_as_written() {
        let index = sample();
        let json = to_json(&index);
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(text.starts_with(r#"{"version":2,"#), "{text}");
        assert!(
            text.contains(r#"[31,"2",[1]]"#) && text.contains(r#"[11,"a:1",[0]]"#),
            "front-coded against the key before, never inside a character: {text}"
        );
        assert_eq!(
            text.matches(r#""name":"web""#).count(),
            1,
            "each workload once"
        );
        let back = Index::from_json(&json).unwrap();
        assert!(back.same_content(&index));
        assert_eq!(back.scope(), index.scope());
        assert_eq!(back.generated_at(), Some("2026-12-03T00:00:00Z"));
        let app = ImageRef::parse("europe-docker.pkg.dev/p/r/app:v1").unwrap();
        let mut kinds: Vec<_> = back.get(&app).unwrap().iter().map(|w| w.kind).collect();
        kinds.sort();
        assert_eq!(kinds, [WorkloadKind::Deployment, WorkloadKind::StatefulSet]);
        // Not a valid reference, but kept verbatim, as every key of a file we wrote.
        let (_, mut paused) = back.iter().find(|(k, _)| *k == "gcr.io/p/éa:1").unwrap();
        assert!(paused.next().unwrap().paused);
        assert_eq!(to_json(&back), json, "equal indexes, equal bytes");
    }

    #[test]
    fn a_shared_prefix_never_splits_a_character() {
        assert_eq!(shared_prefix("gcr.io/p/é:1", "gcr.io/p/éa:1"), 11);
        assert_eq!(
            shared_prefix("aé", "aè"),
            1,
            "é and è share their first byte"
        );
        assert_eq!(shared_prefix("", "x"), 0);
    }

    #[test]
    fn a_bad_file_names_what_is_wrong() {
        let err = |json: &str| Index::from_json(json.as_bytes()).unwrap_err().to_string();
        let e = err(
            r#"{"version":2,"workloads":[{"namespace":"a","name":"b"}],"images":[[0,"x:1",[1]]]}"#,
        );
        assert!(
            e.contains(r#"image "x:1" names workload 1, but only 1 are listed"#),
            "{e}"
        );
        let e = err(r#"{"version":2,"workloads":[],"images":[[0,"x:1",[]],[9,"y",[]]]}"#);
        assert!(e.contains("image 1 shares 9 bytes"), "{e}");
        let e = err(r#"{"version":2,"workloads":[],"images":[[0,"é",[]],[1,"y",[]]]}"#);
        assert!(e.contains("image 1 shares 1 bytes"), "{e}");
        let e = err(r#"{"version":2,"workloads":[],"images":[[0,"x"]]}"#);
        assert!(e.contains("not valid cache.json"), "{e}");
        let e = err(r#"{"version":2,"workloads":[],"images":[[0,"b:1",[]],[0,"a:1",[]]]}"#);
        assert!(
            e.contains(r#"image 1 ("a:1") does not sort after the one before ("b:1")"#),
            "{e}"
        );
        let e = err(r#"{"version":2,"workloads":[],"images":[[0,"a:1",[]],[3,"",[]]]}"#);
        assert!(e.contains("does not sort after"), "a repeated key: {e}");
    }

    #[test]
    fn front_coding_cannot_expand_past_the_cap() {
        // Each entry is the key before plus one byte: 12 bytes of JSON for a 4 KiB key.
        let long = "a".repeat(4096);
        let mut json = format!(r#"{{"version":2,"workloads":[],"images":[[0,"{long}",[]]"#);
        for n in 0..(MAX_KEY_BYTES / 4096 + 1) {
            json.push_str(&format!(r#",[{},"b",[]]"#, 4096 + n));
        }
        json.push_str("]}");
        let started = std::time::Instant::now();
        let e = Index::from_json(json.as_bytes()).unwrap_err().to_string();
        assert!(e.contains("refused as a probable bomb"), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
    }

    #[test]
    fn workloads_out_of_order_still_load_in_order() {
        let json = br#"{"version":2,"workloads":[{"namespace":"b","name":"x"},
            {"namespace":"a","name":"y"},{"namespace":"b","name":"x"}],
            "images":[[0,"i:1",[0,1,2]]]}"#;
        let index = Index::from_json(json).unwrap();
        let (_, list) = index.iter().next().unwrap();
        let names: Vec<&str> = list.map(|w| &*w.name).collect();
        assert_eq!(
            names,
            ["y", "x"],
            "sorted, and the repeated workload listed once"
        );
    }
}

//! The three stored forms of the index, chosen by size so it always fits ConfigMaps:
//!
//! * **plain**: `data["cache.json"]`, the original format, while it fits;
//! * **gzip**: `binaryData["cache.json.gz"]` once plain JSON would pass the 1 MiB limit;
//! * **sharded**: gzip split across `NAME-0…NAME-N` (`binaryData["cache.json.gz.<i>"]`), with
//!   `data["cache-manifest.json"]` in `NAME` naming the shard count and the SHA-256 of the
//!   whole gzip stream, so a reader can tell a half-updated set from a complete one.
//!
//! Shard keys differ per shard so that a projected volume can mount them all in one directory
//! next to the manifest.

use std::collections::BTreeMap;
use std::io::{Read, Write};

use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::index::table::{Index, IndexError, MAX_KEY_BYTES};

pub const PLAIN_KEY: &str = "cache.json";
pub const GZIP_KEY: &str = "cache.json.gz";
pub const MANIFEST_KEY: &str = "cache-manifest.json";

/// ConfigMaps are capped at 1 MiB including metadata; keep ~48 KiB of headroom for it.
pub const CONFIGMAP_PAYLOAD_LIMIT: usize = 1_000_000;
/// binaryData is base64 in the object, so raw bytes may use 3/4 of the payload limit.
pub const SHARD_RAW_BYTES: usize = CONFIGMAP_PAYLOAD_LIMIT / 4 * 3;
/// Upper bound on shards (and on the resourceNames RBAC must list).
pub const MAX_SHARDS: usize = 8;
/// Most stored bytes an index can occupy: the main ConfigMap plus [`MAX_SHARDS`] shards,
/// 1 MiB each (9 MiB).
pub const MAX_STORED_BYTES: usize = (MAX_SHARDS + 1) * 1024 * 1024;
/// Output allowed per byte the ConfigMaps can store.
///
/// Why 4: gzip makes `cache.json` about 10× smaller, so the limit is not "anything 9 MiB of
/// gzip could hold" (a gzip bomb expands 1000×: a 610 KB file once became 551 MB and took
/// every replica past its memory limit). It is a memory budget instead: the decoder's output
/// is the largest transient allocation of a load, it lives next to the index in use, and
/// 36 MiB of JSON is some 125,000 workloads, six times the scale this is built and measured
/// for (20,000 workloads make 5.8 MB of JSON). [`encode`] refuses to write more, so whatever we store we can read back.
pub const DECOMPRESSION_FACTOR: usize = 4;
/// A decompressed index larger than this (36 MiB) is refused with [`CodecError::Decompressed`]
/// rather than exhausting memory; the index in use is kept.
pub const MAX_DECOMPRESSED_BYTES: usize = DECOMPRESSION_FACTOR * MAX_STORED_BYTES;

pub fn shard_key(i: usize) -> String {
    format!("{GZIP_KEY}.{i}")
}

pub fn shard_name(base: &str, i: usize) -> String {
    format!("{base}-{i}")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    Plain,
    Gzip,
    Sharded,
}

impl Form {
    pub fn as_str(self) -> &'static str {
        match self {
            Form::Plain => "plain",
            Form::Gzip => "gzip",
            Form::Sharded => "sharded",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub version: u32,
    pub shards: usize,
    /// SHA-256 (hex) of the concatenated shards, i.e. of the whole gzip stream.
    pub sha256: String,
    #[serde(default)]
    pub generated_at: Option<String>,
}

/// What goes into the ConfigMap `NAME` (and, for the sharded form, `NAME-i`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub form: Form,
    pub data: BTreeMap<String, String>,
    pub binary_data: BTreeMap<String, Vec<u8>>,
    /// `(key, bytes)` per shard, in order.
    pub shards: Vec<(String, Vec<u8>)>,
    /// Bytes stored in total (before base64).
    pub bytes: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("no cache.json, cache.json.gz or cache-manifest.json present")]
    Empty,
    #[error(transparent)]
    Index(#[from] IndexError),
    #[error("gzip: {0}")]
    Gzip(String),
    #[error("manifest: {0}")]
    Manifest(String),
    #[error("shard {0} is missing")]
    MissingShard(usize),
    #[error("shards do not match the manifest checksum (an update is probably in progress)")]
    Checksum,
    #[error("index needs {needed} shards, more than the {max} allowed")]
    TooLarge { needed: usize, max: usize },
    #[error(
        "gzip: the index decompresses to more than {limit} bytes ({stored} stored), \
         past the limit of {DECOMPRESSION_FACTOR} x the 9 MiB the ConfigMaps can hold; refused \
         as a probable gzip bomb"
    )]
    Decompressed { limit: usize, stored: usize },
    #[error("index JSON is {bytes} bytes, over the {limit} bytes a reader accepts")]
    JsonTooLarge { bytes: usize, limit: usize },
    #[error(
        "the index's images add up to {bytes} bytes, over the {MAX_KEY_BYTES} a reader accepts"
    )]
    KeysTooLarge { bytes: usize },
}

/// Size limits, parameters so tests can force every form with small inputs.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub payload: usize,
    pub shard_raw: usize,
    pub max_shards: usize,
    /// Largest index JSON written or read back; see [`MAX_DECOMPRESSED_BYTES`].
    pub max_json: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            payload: CONFIGMAP_PAYLOAD_LIMIT,
            shard_raw: SHARD_RAW_BYTES,
            max_shards: MAX_SHARDS,
            max_json: MAX_DECOMPRESSED_BYTES,
        }
    }
}

/// The plain form (version 1 JSON) while it fits one ConfigMap, else the compact form
/// (version 2) gzipped, in one ConfigMap or in shards.
pub fn encode(index: &Index, limits: Limits) -> Result<Encoded, CodecError> {
    if plain_at_least(index) <= limits.payload {
        let json = index.to_json();
        if json.len() <= limits.payload {
            let text = String::from_utf8_lossy(&json).into_owned();
            return Ok(Encoded {
                form: Form::Plain,
                bytes: text.len(),
                data: BTreeMap::from([(PLAIN_KEY.to_string(), text)]),
                binary_data: BTreeMap::new(),
                shards: Vec::new(),
            });
        }
    }
    if index.key_bytes() > MAX_KEY_BYTES {
        return Err(CodecError::KeysTooLarge {
            bytes: index.key_bytes(),
        });
    }
    let json = index.to_compact_json();
    if json.len() > limits.max_json {
        return Err(CodecError::JsonTooLarge {
            bytes: json.len(),
            limit: limits.max_json,
        });
    }
    let gz = gzip(&json)?;
    if gz.len().div_ceil(3) * 4 <= limits.payload {
        return Ok(Encoded {
            form: Form::Gzip,
            bytes: gz.len(),
            data: BTreeMap::new(),
            binary_data: BTreeMap::from([(GZIP_KEY.to_string(), gz)]),
            shards: Vec::new(),
        });
    }
    let chunk = limits.shard_raw.max(1);
    let needed = gz.len().div_ceil(chunk);
    if needed > limits.max_shards {
        return Err(CodecError::TooLarge {
            needed,
            max: limits.max_shards,
        });
    }
    let manifest = Manifest {
        version: 1,
        shards: needed,
        sha256: hex(&Sha256::digest(&gz)),
        generated_at: index.generated_at().map(str::to_string),
    };
    let manifest_json =
        serde_json::to_string(&manifest).map_err(|e| CodecError::Manifest(e.to_string()))?;
    let shards = gz
        .chunks(chunk)
        .enumerate()
        .map(|(i, c)| (shard_key(i), c.to_vec()))
        .collect();
    Ok(Encoded {
        form: Form::Sharded,
        bytes: gz.len(),
        data: BTreeMap::from([(MANIFEST_KEY.to_string(), manifest_json)]),
        binary_data: BTreeMap::new(),
        shards,
    })
}

/// A lower bound on the plain JSON's length, without writing it: every key quoted, and per
/// reference `{"namespace":"…","name":"…"}`. At 100,000 workloads the plain JSON would be
/// 61 MiB, built only to be found too large.
fn plain_at_least(index: &Index) -> usize {
    index
        .iter()
        .map(|(key, list)| {
            let refs: usize = list.map(|w| 26 + w.namespace.len() + w.name.len()).sum();
            key.len() + 3 + refs
        })
        .sum()
}

/// Decodes whichever form is present. `shard` fetches shard `i`'s bytes (from the same
/// directory for a mount, from `NAME-i` through the API).
pub fn decode(
    data: &BTreeMap<String, String>,
    binary_data: &BTreeMap<String, Vec<u8>>,
    shard: impl FnMut(usize) -> Option<Vec<u8>>,
) -> Result<(Index, Form), CodecError> {
    decode_limited(data, binary_data, shard, MAX_DECOMPRESSED_BYTES)
}

/// [`decode`] with the decompressed-size limit as a parameter, for tests.
pub fn decode_limited(
    data: &BTreeMap<String, String>,
    binary_data: &BTreeMap<String, Vec<u8>>,
    mut shard: impl FnMut(usize) -> Option<Vec<u8>>,
    max_json: usize,
) -> Result<(Index, Form), CodecError> {
    if let Some(json) = data.get(PLAIN_KEY) {
        return Ok((Index::from_json(json.as_bytes())?, Form::Plain));
    }
    if let Some(gz) = binary_data.get(GZIP_KEY) {
        return Ok((Index::from_json(&gunzip(gz, max_json)?)?, Form::Gzip));
    }
    let Some(manifest) = data.get(MANIFEST_KEY) else {
        return Err(CodecError::Empty);
    };
    let manifest: Manifest =
        serde_json::from_str(manifest).map_err(|e| CodecError::Manifest(e.to_string()))?;
    if manifest.shards == 0 || manifest.shards > 64 {
        return Err(CodecError::Manifest(format!(
            "bad shard count {}",
            manifest.shards
        )));
    }
    let mut gz = Vec::new();
    for i in 0..manifest.shards {
        gz.extend(shard(i).ok_or(CodecError::MissingShard(i))?);
    }
    if hex(&Sha256::digest(&gz)) != manifest.sha256 {
        return Err(CodecError::Checksum);
    }
    Ok((Index::from_json(&gunzip(&gz, max_json)?)?, Form::Sharded))
}

fn gzip(bytes: &[u8]) -> Result<Vec<u8>, CodecError> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::default());
    enc.write_all(bytes)
        .and_then(|_| enc.finish())
        .map_err(|e| CodecError::Gzip(e.to_string()))
}

/// Decompresses at most `limit` bytes. One byte more is read to tell "exactly the limit"
/// from "past it": the old code stopped at its limit silently and handed the truncated JSON
/// on, which failed later with a confusing parse error after the memory was spent.
fn gunzip(bytes: &[u8], limit: usize) -> Result<Vec<u8>, CodecError> {
    // Capacity from the compressed size, capped: a bomb's header cannot make us reserve more.
    let mut out = Vec::with_capacity(bytes.len().saturating_mul(4).min(limit));
    GzDecoder::new(bytes)
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| CodecError::Gzip(e.to_string()))?;
    if out.len() > limit {
        return Err(CodecError::Decompressed {
            limit,
            stored: bytes.len(),
        });
    }
    Ok(out)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::table::Scope;
    use crate::index::workload::{WorkloadKind, WorkloadRef};
    use crate::ingest::image::ImageRef;

    /// 20,000 workloads over 50,000 image references.
    pub(crate) fn big_index(workloads: usize) -> Index {
        let entries = (0..workloads).map(|i| {
            let kind = WorkloadKind::ALL[i % 3];
            let w = WorkloadRef::new(kind, &format!("team-{}", i % 97), &format!("svc-{i}"));
            let images = (0..(1 + i % 4))
                .map(|j| {
                    ImageRef::parse(&format!(
                        "europe-west4-docker.pkg.dev/project-{}/repo/img-{}:v{}",
                        i % 13,
                        (i * 7 + j) % 25_000,
                        j
                    ))
                    .unwrap()
                })
                .collect();
            (w, images)
        });
        Index::build(entries, Scope::default(), "2026-11-25T00:00:00Z".into())
    }

    fn round_trip(index: &Index, limits: Limits) -> Form {
        let enc = encode(index, limits).unwrap();
        let shards = enc.shards.clone();
        let (back, form) = decode(&enc.data, &enc.binary_data, |i| {
            shards.get(i).map(|(_, b)| b.clone())
        })
        .unwrap();
        assert!(back.same_content(index));
        assert_eq!(form, enc.form);
        form
    }

    #[test]
    fn twenty_thousand_workloads_survive_every_form() {
        let index = big_index(20_000);
        assert_eq!(index.workload_count(), 20_000);
        let json_len = index.to_json().len();
        assert!(
            json_len > CONFIGMAP_PAYLOAD_LIMIT,
            "plain would not fit: {json_len}"
        );
        // Default limits: 20k workloads fit gzip-compressed in one ConfigMap.
        let form = round_trip(&index, Limits::default());
        assert_eq!(form, Form::Gzip);
        // Force sharding with a small shard size.
        let limits = Limits {
            payload: 100_000,
            shard_raw: 60_000,
            max_shards: 64,
            ..Limits::default()
        };
        assert_eq!(round_trip(&index, limits), Form::Sharded);
        // Small indexes stay plain (the original format).
        assert_eq!(round_trip(&big_index(10), Limits::default()), Form::Plain);
    }

    #[test]
    fn detects_missing_and_stale_shards() {
        let index = big_index(5_000);
        let limits = Limits {
            payload: 10_000,
            shard_raw: 20_000,
            max_shards: 64,
            ..Limits::default()
        };
        let enc = encode(&index, limits).unwrap();
        assert!(enc.shards.len() > 1);
        let err = decode(&enc.data, &enc.binary_data, |i| {
            (i == 0).then(|| enc.shards[0].1.clone())
        })
        .unwrap_err();
        assert!(matches!(err, CodecError::MissingShard(1)));
        let err = decode(&enc.data, &enc.binary_data, |i| {
            let mut b = enc.shards[i].1.clone();
            if i == 1 {
                b[0] ^= 0xff;
            }
            Some(b)
        })
        .unwrap_err();
        assert!(matches!(err, CodecError::Checksum));
        let limits = Limits {
            payload: 10_000,
            shard_raw: 1_000,
            max_shards: 2,
            ..Limits::default()
        };
        assert!(matches!(
            encode(&index, limits),
            Err(CodecError::TooLarge { .. })
        ));
    }

    /// A real gzip bomb: `len` bytes of zeros (plus a JSON prefix), compressed ~1000×.
    /// Streamed into the encoder so the test itself never holds the expanded bytes.
    pub(crate) fn gzip_bomb(len: usize) -> Vec<u8> {
        let mut enc = GzEncoder::new(Vec::new(), Compression::best());
        enc.write_all(br#"{"images":{"a":[],"pad":""#).unwrap();
        let zeros = vec![b'0'; 1024 * 1024];
        let mut left = len;
        while left > 0 {
            let n = left.min(zeros.len());
            enc.write_all(&zeros[..n]).unwrap();
            left -= n;
        }
        enc.finish().unwrap()
    }

    #[test]
    fn a_gzip_bomb_is_refused_with_a_clear_error() {
        let bomb = gzip_bomb(MAX_DECOMPRESSED_BYTES + 1024 * 1024);
        // Small enough to sit in one ConfigMap, as the 610 KB bomb of issue #14 did.
        assert!(bomb.len() < CONFIGMAP_PAYLOAD_LIMIT, "{} bytes", bomb.len());
        let binary = BTreeMap::from([(GZIP_KEY.to_string(), bomb.clone())]);
        let err = decode(&BTreeMap::new(), &binary, |_| None).unwrap_err();
        assert!(
            matches!(err, CodecError::Decompressed { limit: MAX_DECOMPRESSED_BYTES, stored } if stored == bomb.len()),
            "{err:?}"
        );
        assert!(err.to_string().contains("gzip bomb"), "{err}");

        // The sharded form goes through the same limit (a small one keeps the test quick).
        let bomb = gzip_bomb(200_000);
        let manifest = Manifest {
            version: 1,
            shards: 1,
            sha256: hex(&Sha256::digest(&bomb)),
            generated_at: None,
        };
        let data = BTreeMap::from([(
            MANIFEST_KEY.to_string(),
            serde_json::to_string(&manifest).unwrap(),
        )]);
        let err =
            decode_limited(&data, &BTreeMap::new(), |_| Some(bomb.clone()), 100_000).unwrap_err();
        assert!(
            matches!(err, CodecError::Decompressed { limit: 100_000, .. }),
            "{err:?}"
        );
    }

    #[test]
    fn what_we_write_we_can_read_back() {
        let index = big_index(2_000);
        // The compressed forms store the compact JSON; the limit applies to it.
        let json = index.to_compact_json().len();
        let limits = Limits {
            max_json: json - 1,
            payload: 1_000,
            ..Limits::default()
        };
        assert!(matches!(
            encode(&index, limits),
            Err(CodecError::JsonTooLarge { .. })
        ));
        // Exactly at the limit is still read back.
        let enc = encode(
            &index,
            Limits {
                payload: 1_000,
                ..Limits::default()
            },
        )
        .unwrap();
        let shards = |i: usize| enc.shards.get(i).map(|(_, b)| b.clone());
        let (back, _) = decode_limited(&enc.data, &enc.binary_data, shards, json).unwrap();
        assert!(back.same_content(&index));
        // And the default limit leaves the supported scale (20,000 workloads) ample room.
        let twenty_k = big_index(20_000).to_compact_json().len();
        assert!(twenty_k * 6 < MAX_DECOMPRESSED_BYTES, "{twenty_k} bytes");
    }
}

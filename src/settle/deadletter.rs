//! Dead-letter format: the original data unchanged, the original attributes, and `dlq_*`
//! attributes that say why. `dlq replay` strips exactly these attributes again.
//!
//! A message that cannot be republished whole (too many attributes once ours are added,
//! attributes over Pub/Sub's limits, data near 10 MB) would be refused by the dead-letter
//! topic, nacked, redelivered and refused again forever. It becomes a *bounded record*
//! instead: attributes trimmed to fit, data replaced by its SHA-256 and size when too big,
//! and `dlq_truncated=true`, so that it can always be published and the original acked.
//! `dlq replay` refuses such a record: it is no longer the original byte for byte.

use std::collections::HashMap;
use std::future::Future;

use bytes::Bytes;
use sha2::{Digest, Sha256};

pub const ATTR_REASON: &str = "dlq_reason";
pub const ATTR_KIND: &str = "dlq_kind";
pub const ATTR_ATTEMPTS: &str = "dlq_attempts";
pub const ATTR_ORIGINAL_ID: &str = "dlq_original_message_id";
pub const ATTR_SOURCE_SUBSCRIPTION: &str = "dlq_source_subscription";
pub const ATTR_FAILED_AT: &str = "dlq_failed_at";
/// `true` on a bounded record: attributes were dropped or cut, or the data replaced.
pub const ATTR_TRUNCATED: &str = "dlq_truncated";
/// On a bounded record whose data was replaced: the original data's SHA-256 (hex) and size.
pub const ATTR_ORIGINAL_SHA256: &str = "dlq_original_sha256";
pub const ATTR_ORIGINAL_BYTES: &str = "dlq_original_bytes";
/// On a bounded record: how many original attributes were dropped, and how many cut short.
pub const ATTR_DROPPED_ATTRIBUTES: &str = "dlq_dropped_attributes";

/// Pub/Sub's limits on a published message (https://cloud.google.com/pubsub/quotas).
pub const MAX_ATTRIBUTES: usize = 100;
pub const MAX_ATTRIBUTE_KEY_BYTES: usize = 256;
/// Pub/Sub caps an attribute value at 1024 bytes.
pub const MAX_ATTRIBUTE_BYTES: usize = 1024;
/// 10 MB, counted in decimal to stay on the safe side of however the service rounds it.
pub const MAX_MESSAGE_BYTES: usize = 10_000_000;
/// Room kept under [`MAX_MESSAGE_BYTES`] for the request's own framing.
const FRAMING_HEADROOM: usize = 64 * 1024;
/// Our `dlq_*` attributes, at most: the six always added, plus the four of a bounded record.
const OUR_ATTRIBUTES: usize = 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeadLetterKind {
    /// The payload is not a GAR event.
    Malformed,
    /// A workload's restart failed in a way retrying cannot fix (403, 404, 422).
    Permanent,
    /// Transient failures outlasted `--max-attempts` deliveries.
    Exhausted,
}

impl DeadLetterKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadLetterKind::Malformed => "malformed",
            DeadLetterKind::Permanent => "permanent",
            DeadLetterKind::Exhausted => "exhausted",
        }
    }
}

/// A message ready to be published to the dead-letter topic.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadLetter {
    pub data: Bytes,
    pub attributes: HashMap<String, String>,
}

impl DeadLetter {
    pub fn new(
        data: Bytes,
        original_attributes: &HashMap<String, String>,
        kind: DeadLetterKind,
        reason: &str,
        attempts: u32,
        original_id: &str,
        subscription: &str,
    ) -> Self {
        let (mut attributes, dropped) = fitting_attributes(original_attributes);
        attributes.insert(ATTR_REASON.into(), truncate(reason, MAX_ATTRIBUTE_BYTES));
        attributes.insert(ATTR_KIND.into(), kind.as_str().into());
        attributes.insert(ATTR_ATTEMPTS.into(), attempts.to_string());
        attributes.insert(
            ATTR_ORIGINAL_ID.into(),
            truncate(original_id, MAX_ATTRIBUTE_BYTES),
        );
        attributes.insert(
            ATTR_SOURCE_SUBSCRIPTION.into(),
            truncate(subscription, MAX_ATTRIBUTE_BYTES),
        );
        attributes.insert(ATTR_FAILED_AT.into(), crate::util::clock::now_rfc3339());
        let mut truncated = dropped > 0;
        if dropped > 0 {
            attributes.insert(ATTR_DROPPED_ATTRIBUTES.into(), dropped.to_string());
        }
        let attribute_bytes: usize = attributes.iter().map(|(k, v)| k.len() + v.len()).sum();
        // The attributes are bounded (≤ 100 × 1280 bytes), so there is always room for a
        // replacement; the data gets whatever is left.
        let data_budget = MAX_MESSAGE_BYTES - FRAMING_HEADROOM - attribute_bytes;
        let data = if data.len() > data_budget {
            truncated = true;
            let sha256 = hex(&Sha256::digest(&data));
            let size = data.len();
            attributes.insert(ATTR_ORIGINAL_SHA256.into(), sha256.clone());
            attributes.insert(ATTR_ORIGINAL_BYTES.into(), size.to_string());
            // Data and attributes both say it, so a reader of either sees the same record.
            Bytes::from(format!(
                r#"{{"dlqTruncated":true,"originalSha256":"{sha256}","originalBytes":{size}}}"#
            ))
        } else {
            data
        };
        if truncated {
            attributes.insert(ATTR_TRUNCATED.into(), "true".into());
        }
        // An empty payload with no attributes cannot be published; ours always has attributes.
        Self { data, attributes }
    }

    /// Whether this is a bounded record rather than the original byte for byte.
    pub fn is_truncated(&self) -> bool {
        is_truncated(&self.attributes)
    }
}

/// Whether a dead letter's attributes mark it as a bounded record.
pub fn is_truncated(attributes: &HashMap<String, String>) -> bool {
    attributes.get(ATTR_TRUNCATED).is_some_and(|v| v == "true")
}

/// The original attributes that fit next to ours, and how many could not be kept whole.
///
/// Keys over Pub/Sub's limit are dropped (a cut key would be a different attribute); values
/// over it are cut; past `100 − OUR_ATTRIBUTES` attributes the rest are dropped, in key order
/// so that every redelivery produces the same record.
fn fitting_attributes(original: &HashMap<String, String>) -> (HashMap<String, String>, usize) {
    let room = MAX_ATTRIBUTES - OUR_ATTRIBUTES;
    let fits = original.len() <= room
        && original
            .iter()
            .all(|(k, v)| k.len() <= MAX_ATTRIBUTE_KEY_BYTES && v.len() <= MAX_ATTRIBUTE_BYTES);
    if fits {
        return (original.clone(), 0);
    }
    let mut keys: Vec<&String> = original
        .keys()
        .filter(|k| !k.is_empty() && k.len() <= MAX_ATTRIBUTE_KEY_BYTES)
        .collect();
    keys.sort();
    let mut kept = HashMap::with_capacity(room);
    for key in keys.into_iter().take(room) {
        kept.insert(key.clone(), truncate(&original[key], MAX_ATTRIBUTE_BYTES));
    }
    let not_whole = original.len() - kept.len()
        + kept
            .iter()
            .filter(|(k, v)| original.get(*k) != Some(*v))
            .count();
    (kept, not_whole)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The attributes a replay sends back: the originals, without any `dlq_*`.
pub fn original_attributes(attributes: &HashMap<String, String>) -> HashMap<String, String> {
    attributes
        .iter()
        .filter(|(k, _)| !k.starts_with("dlq_"))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_string();
    }
    let mut end = max - 3;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &s[..end])
}

#[derive(Debug, thiserror::Error)]
#[error("publishing to dead-letter topic {topic}: {message}")]
pub struct PublishError {
    pub topic: String,
    pub message: String,
}

/// Where dead letters go; Pub/Sub in production, memory in tests and benches.
pub trait DeadLetterSink: Send + Sync + 'static {
    fn publish(
        &self,
        letter: DeadLetter,
    ) -> impl Future<Output = Result<String, PublishError>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn letter(data: Vec<u8>, attributes: &HashMap<String, String>) -> DeadLetter {
        DeadLetter::new(
            Bytes::from(data),
            attributes,
            DeadLetterKind::Malformed,
            "bad",
            1,
            "m1",
            "projects/p/subscriptions/s",
        )
    }

    /// What Pub/Sub would refuse; a letter must never be one of these.
    fn assert_publishable(dl: &DeadLetter) {
        assert!(
            dl.attributes.len() <= MAX_ATTRIBUTES,
            "{}",
            dl.attributes.len()
        );
        for (k, v) in &dl.attributes {
            assert!(
                !k.is_empty() && k.len() <= MAX_ATTRIBUTE_KEY_BYTES,
                "key {}",
                k.len()
            );
            assert!(v.len() <= MAX_ATTRIBUTE_BYTES, "value of {k}: {}", v.len());
        }
        let attr_bytes: usize = dl.attributes.iter().map(|(k, v)| k.len() + v.len()).sum();
        assert!(dl.data.len() + attr_bytes <= MAX_MESSAGE_BYTES);
    }

    #[test]
    fn a_message_that_fits_is_kept_whole() {
        let orig: HashMap<String, String> = (0..90)
            .map(|i| (format!("k{i:02}"), "v".repeat(1024)))
            .collect();
        let data = vec![b'x'; 9_000_000];
        let dl = letter(data.clone(), &orig);
        assert_publishable(&dl);
        assert!(!dl.is_truncated());
        assert_eq!(dl.data.as_ref(), &data[..]);
        assert_eq!(original_attributes(&dl.attributes), orig);
    }

    #[test]
    fn too_many_or_too_long_attributes_are_trimmed() {
        let mut orig: HashMap<String, String> = (0..100)
            .map(|i| (format!("k{i:03}"), i.to_string()))
            .collect();
        orig.insert("long-value".into(), "v".repeat(5000));
        orig.insert("k".repeat(300), "key too long".into());
        let dl = letter(b"{}".to_vec(), &orig);
        assert_publishable(&dl);
        assert!(dl.is_truncated());
        assert_eq!(dl.attributes[ATTR_TRUNCATED], "true");
        // Data untouched; the first attributes in key order kept.
        assert_eq!(dl.data.as_ref(), b"{}");
        assert_eq!(dl.attributes["k000"], "0");
        let kept = original_attributes(&dl.attributes);
        assert_eq!(kept.len(), MAX_ATTRIBUTES - OUR_ATTRIBUTES);
        let dropped: usize = dl.attributes[ATTR_DROPPED_ATTRIBUTES].parse().unwrap();
        assert_eq!(
            dropped,
            orig.len() - kept.len() + kept.iter().filter(|(k, v)| orig[*k] != **v).count()
        );
        // The same input always yields the same record (redeliveries agree).
        let again = letter(b"{}".to_vec(), &orig);
        assert_eq!(original_attributes(&again.attributes), kept);
    }

    #[test]
    fn data_near_ten_megabytes_is_replaced_by_its_digest() {
        let data = vec![b'z'; 10 * 1024 * 1024];
        let dl = letter(data.clone(), &HashMap::new());
        assert_publishable(&dl);
        assert!(dl.is_truncated());
        let sha = hex(&Sha256::digest(&data));
        assert_eq!(dl.attributes[ATTR_ORIGINAL_SHA256], sha);
        assert_eq!(dl.attributes[ATTR_ORIGINAL_BYTES], data.len().to_string());
        let body: serde_json::Value = serde_json::from_slice(&dl.data).unwrap();
        assert_eq!(body["originalSha256"], sha.as_str());
        assert_eq!(body["originalBytes"], data.len());
        // Replay strips every one of these again.
        assert!(original_attributes(&dl.attributes).is_empty());
    }

    #[test]
    fn attributes_added_and_stripped() {
        let orig = HashMap::from([("k".to_string(), "v".to_string())]);
        let dl = DeadLetter::new(
            Bytes::from_static(b"x"),
            &orig,
            DeadLetterKind::Permanent,
            &"r".repeat(5000),
            3,
            "m7",
            "projects/p/subscriptions/s",
        );
        assert_eq!(dl.attributes[ATTR_KIND], "permanent");
        assert_eq!(dl.attributes[ATTR_ATTEMPTS], "3");
        assert_eq!(dl.attributes[ATTR_ORIGINAL_ID], "m7");
        assert!(dl.attributes[ATTR_REASON].len() <= 1024);
        assert!(dl.attributes[ATTR_FAILED_AT].ends_with('Z'));
        assert_eq!(dl.attributes["k"], "v");
        assert_eq!(original_attributes(&dl.attributes), orig);
    }
}

//! Dead-letter format: the original data unchanged, the original attributes, and `dlq_*`
//! attributes that say why. `dlq replay` strips exactly these attributes again.

use std::collections::HashMap;
use std::future::Future;

use bytes::Bytes;

pub const ATTR_REASON: &str = "dlq_reason";
pub const ATTR_KIND: &str = "dlq_kind";
pub const ATTR_ATTEMPTS: &str = "dlq_attempts";
pub const ATTR_ORIGINAL_ID: &str = "dlq_original_message_id";
pub const ATTR_SOURCE_SUBSCRIPTION: &str = "dlq_source_subscription";
pub const ATTR_FAILED_AT: &str = "dlq_failed_at";

/// Pub/Sub caps an attribute value at 1024 bytes.
const MAX_ATTRIBUTE_BYTES: usize = 1024;

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
        let mut attributes = original_attributes.clone();
        attributes.insert(ATTR_REASON.into(), truncate(reason, MAX_ATTRIBUTE_BYTES));
        attributes.insert(ATTR_KIND.into(), kind.as_str().into());
        attributes.insert(ATTR_ATTEMPTS.into(), attempts.to_string());
        attributes.insert(ATTR_ORIGINAL_ID.into(), original_id.into());
        attributes.insert(ATTR_SOURCE_SUBSCRIPTION.into(), subscription.into());
        attributes.insert(ATTR_FAILED_AT.into(), crate::clock::now_rfc3339());
        // An empty payload with no attributes cannot be published; ours always has attributes.
        Self { data, attributes }
    }
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

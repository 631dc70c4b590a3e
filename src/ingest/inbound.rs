//! A received message, independent of the transport: what the source hands the pipeline.

use std::collections::HashMap;
use std::time::SystemTime;

use bytes::Bytes;

/// A received message, independent of the transport.
#[derive(Debug, Clone)]
pub struct Inbound {
    pub id: String,
    pub data: Bytes,
    pub attributes: HashMap<String, String>,
    pub publish_time: Option<SystemTime>,
    /// Pub/Sub's count, present only when the subscription has a dead-letter policy.
    pub delivery_attempt: Option<i32>,
}

/// Identifies one published message across its redeliveries: the message id plus the
/// publish time the service stamped on it.
///
/// The id alone is not enough: an emulator (and a re-created topic) hands out `m0, m1, …`
/// again after a restart, and a new message that reused an id would inherit the old one's
/// attempt count or, for a tag-only event, be skipped as a "duplicate" of it. A redelivery
/// carries the same publish time, so it still maps to the same key.
pub fn delivery_key(msg: &Inbound) -> String {
    let published = msg
        .publish_time
        .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok());
    match published {
        Some(at) => format!("{}@{}.{:09}", msg.id, at.as_secs(), at.subsec_nanos()),
        None => msg.id.clone(),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn msg(id: &str, published_secs: Option<u64>) -> Inbound {
        Inbound {
            id: id.to_string(),
            data: Bytes::new(),
            attributes: HashMap::new(),
            publish_time: published_secs.map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s)),
            delivery_attempt: None,
        }
    }

    #[test]
    fn delivery_key_tells_reused_ids_apart() {
        assert_eq!(
            delivery_key(&msg("m0", Some(7))),
            delivery_key(&msg("m0", Some(7)))
        );
        assert_ne!(
            delivery_key(&msg("m0", Some(7))),
            delivery_key(&msg("m0", Some(8)))
        );
        assert_ne!(
            delivery_key(&msg("m0", Some(7))),
            delivery_key(&msg("m1", Some(7)))
        );
        assert_eq!(delivery_key(&msg("m0", None)), "m0");
    }
}

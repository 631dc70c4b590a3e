//! `dlq replay`: republish dead-lettered messages to the source topic.
//!
//! Each message goes back with its original data and attributes (the `dlq_*` ones removed)
//! and is acked only after that publish succeeded. Messages filtered out by `--kind`, or seen
//! in `--dry-run`, are held until the end and then released (nacked), so one run never sees
//! the same message twice.
//!
//! A replayed message that fails again is dead-lettered again, with `dlq_original_message_id`
//! naming the id this run published it under. Such a message is held too, not replayed: a
//! message that can never succeed (a malformed one, say) would otherwise go round the loop
//! until the run is killed, since the idle timeout never fires.

use std::collections::HashSet;
use std::fmt;

use google_cloud_pubsub::model::Message;
use google_cloud_pubsub::subscriber::ShutdownBehavior;

use crate::config::ReplayArgs;
use crate::ingest::pubsub::{self, PubSubError};
use crate::settle::deadletter::{
    ATTR_KIND, ATTR_ORIGINAL_ID, ATTR_REASON, ATTR_TRUNCATED, is_truncated, original_attributes,
};

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReplaySummary {
    pub replayed: u64,
    pub skipped: u64,
    pub failed: u64,
}

impl fmt::Display for ReplaySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "replayed={} skipped={} failed={}",
            self.replayed, self.skipped, self.failed
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error(transparent)]
    Client(#[from] PubSubError),
    #[error("pulling from {subscription}: {message}")]
    Pull {
        subscription: String,
        message: String,
    },
    /// The SDK retries a refused connection silently, so an unreachable endpoint would
    /// otherwise look like an empty subscription: `replayed=0` and exit 0.
    #[error(
        "could not reach Pub/Sub at {endpoint} to pull from {subscription}: {message} \
         (nothing was replayed)"
    )]
    Unreachable {
        endpoint: String,
        subscription: String,
        message: String,
    },
}

/// `Err(why)` when nothing accepts TCP connections at `authority` within 2 s.
pub async fn probe_endpoint(authority: &str) -> Result<(), String> {
    let connect = tokio::net::TcpStream::connect(authority);
    match tokio::time::timeout(std::time::Duration::from_secs(2), connect).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no answer within 2 s".to_string()),
    }
}

/// Prints one line of the run's report. A closed stdout (`dlq replay … | head -1`) must not
/// panic the run half-way, with messages held: the report is lost, the replay goes on.
fn report(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

pub async fn replay(args: &ReplayArgs) -> Result<ReplaySummary, ReplayError> {
    let subscriber = pubsub::subscriber().await?;
    let publisher = pubsub::publisher(&args.topic).await?;
    let mut stream = subscriber
        .subscribe(args.subscription.as_str())
        .set_max_outstanding_messages(1000)
        // Dead letters may be 10 MB each and held ones stay outstanding until the end: bound
        // the bytes too (the SDK default is 100 MiB). Past it the stream pauses and the run
        // ends on its idle timeout; the next run sees the rest.
        .set_max_outstanding_bytes(64 << 20)
        // Held (skipped, dry-run) messages are released at the end; should the command be
        // killed instead, they come back after this short deadline rather than the SDK's 60 s.
        .set_max_lease_extension(crate::ingest::pubsub::LEASE_EXTENSION)
        .set_shutdown_behavior(ShutdownBehavior::NackImmediately)
        .build();
    let token = stream.shutdown_token();
    let mut summary = ReplaySummary::default();
    let mut held = Vec::new();
    let mut seen = HashSet::new();
    // Ids this run published: a dead letter pointing at one of them is our own replay that
    // failed again.
    let mut published = HashSet::new();
    let verb = if args.dry_run {
        "would replay"
    } else {
        "replayed"
    };
    loop {
        if args.limit.is_some_and(|l| summary.replayed >= l) {
            break;
        }
        let next = match tokio::time::timeout(args.idle_timeout, stream.next()).await {
            Err(_) if seen.is_empty() => {
                // Idle from the start: an empty subscription, or an endpoint we never
                // reached. Only the second is a failure.
                let endpoint = pubsub::endpoint_authority();
                if let Err(message) = probe_endpoint(&endpoint).await {
                    return Err(ReplayError::Unreachable {
                        endpoint,
                        subscription: args.subscription.clone(),
                        message,
                    });
                }
                break;
            }
            Err(_) => break, // idle
            Ok(None) => break,
            Ok(Some(Err(e))) => {
                return Err(ReplayError::Pull {
                    subscription: args.subscription.clone(),
                    message: e.to_string(),
                });
            }
            Ok(Some(Ok(next))) => next,
        };
        let (message, handler) = next;
        let id = message.message_id.clone();
        if !seen.insert(id.clone()) {
            held.push(handler);
            continue;
        }
        let kind = message
            .attributes
            .get(ATTR_KIND)
            .cloned()
            .unwrap_or_default();
        let reason = message
            .attributes
            .get(ATTR_REASON)
            .cloned()
            .unwrap_or_default();
        if let Some(original) = message.attributes.get(ATTR_ORIGINAL_ID)
            && published.contains(original)
        {
            summary.skipped += 1;
            report(format_args!(
                "skipped {id}: replayed by this run as {original} and dead-lettered again"
            ));
            held.push(handler);
            continue;
        }
        if is_truncated(&message.attributes) {
            // Its attributes were trimmed or its data replaced by a digest when it was
            // dead-lettered: republishing it would send something the publisher never sent.
            summary.skipped += 1;
            report(format_args!("{}", truncated_notice(&id)));
            held.push(handler);
            continue;
        }
        if args.kind.as_deref().is_some_and(|k| k != kind) {
            summary.skipped += 1;
            report(format_args!("skipped {id} kind={kind:?}"));
            held.push(handler);
            continue;
        }
        if args.dry_run {
            summary.replayed += 1;
            report(format_args!(
                "{verb} {id} kind={kind} reason={reason:?} bytes={}",
                message.data.len()
            ));
            held.push(handler);
            continue;
        }
        let original = Message::new()
            .set_data(message.data.clone())
            .set_attributes(original_attributes(&message.attributes));
        match publisher.publish(original).await {
            Ok(new_id) => {
                handler.ack();
                summary.replayed += 1;
                report(format_args!(
                    "{verb} {id} as {new_id} kind={kind} reason={reason:?}"
                ));
                published.insert(new_id);
            }
            Err(e) => {
                handler.nack();
                summary.failed += 1;
                eprintln!("failed {id}: publishing to {}: {e}", args.topic);
            }
        }
    }
    drop(held);
    // Closing the stream first keeps the service from sending the held messages, released
    // just now, straight back to this stream, where they would wait out their ack deadline
    // before the next run could see them.
    drop(stream);
    // Flushes our acks; held messages are released for redelivery.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), token.shutdown()).await;
    Ok(summary)
}

/// What `dlq replay` prints for a bounded record, which it leaves on the subscription.
pub fn truncated_notice(id: &str) -> String {
    format!(
        "skipped {id}: {ATTR_TRUNCATED}=true, a bounded record that cannot be replayed byte for \
         byte (attributes trimmed or data replaced by dlq_original_sha256); it stays on the \
         dead-letter subscription for inspection"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn probe_tells_a_closed_port_from_an_open_one() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listener.local_addr().unwrap().to_string();
        assert_eq!(probe_endpoint(&open).await, Ok(()));
        drop(listener);
        let err = probe_endpoint(&open).await.unwrap_err();
        assert!(!err.is_empty());
    }

    #[test]
    fn truncated_notice_says_it_cannot_be_replayed() {
        let notice = truncated_notice("m9");
        assert!(notice.starts_with("skipped m9:"), "{notice}");
        assert!(
            notice.contains("cannot be replayed byte for byte"),
            "{notice}"
        );
    }
}

//! Settle: ack, nack, or dead-letter then ack. A message is acked only when its work is done
//! or it is safely on the dead-letter topic ([`deadletter`]); [`replay`] sends dead letters
//! back to the topic once their cause is fixed. This is the end of a delivery.

pub mod deadletter;
pub mod replay;

use std::sync::Arc;

use tracing::Instrument;

use crate::ingest::inbound::Inbound;
use crate::ops::metrics::{KindLabels, Metrics, OutcomeLabels};
use crate::settle::deadletter::{DeadLetter, DeadLetterKind, DeadLetterSink};

/// What to do with a message once the work is over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settlement {
    /// Done (or nothing to do): `outcome` says which, for logs and metrics.
    Ack { outcome: &'static str },
    /// Retry later by redelivery.
    Nack { reason: String },
    /// Give up: publish to the dead-letter topic, then ack.
    DeadLetter {
        kind: DeadLetterKind,
        reason: String,
    },
}

/// The transport's acknowledgement handle. Dropping it without a call must nack.
pub trait AckHandle: Send + 'static {
    fn ack(self);
    fn nack(self);
}

impl AckHandle for google_cloud_pubsub::subscriber::handler::Handler {
    fn ack(self) {
        google_cloud_pubsub::subscriber::handler::Handler::ack(self)
    }
    fn nack(self) {
        google_cloud_pubsub::subscriber::handler::Handler::nack(self)
    }
}

/// What actually happened, which can differ from the plan when the dead-letter publish fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    Acked,
    Nacked,
    DeadLettered,
}

impl Settled {
    pub fn as_str(self) -> &'static str {
        match self {
            Settled::Acked => "ack",
            Settled::Nacked => "nack",
            Settled::DeadLettered => "dead_letter",
        }
    }
}

/// Carries out settlements: the dead-letter sink, the subscription (named in dead letters and
/// spans) and the metrics, shared by every delivery.
pub struct Settler<D> {
    pub sink: Arc<D>,
    pub subscription: Arc<str>,
    pub metrics: Arc<Metrics>,
}

impl<D: DeadLetterSink> Settler<D> {
    pub async fn settle<H: AckHandle>(
        &self,
        settlement: Settlement,
        msg: &Inbound,
        attempt: u32,
        handle: H,
    ) -> Settled {
        // Named for the stage; the Pub/Sub operation it ends in is `messaging.operation.name`.
        let span = tracing::info_span!(
            "settle",
            "messaging.system" = "gcp_pubsub",
            "messaging.operation.type" = "settle",
            "messaging.operation.name" = tracing::field::Empty,
            action = tracing::field::Empty,
            reason = tracing::field::Empty,
            "otel.status_code" = tracing::field::Empty,
        );
        let settled = self
            .settle_in_span(settlement, msg, attempt, handle, &span)
            .instrument(span.clone())
            .await;
        self.metrics
            .events_settled
            .get_or_create(&OutcomeLabels {
                outcome: settled.as_str(),
            })
            .inc();
        settled
    }

    async fn settle_in_span<H: AckHandle>(
        &self,
        settlement: Settlement,
        msg: &Inbound,
        attempt: u32,
        handle: H,
        span: &tracing::Span,
    ) -> Settled {
        match settlement {
            Settlement::Ack { outcome } => {
                span.record("action", "ack");
                span.record("reason", outcome);
                span.record("messaging.operation.name", "ack");
                handle.ack();
                tracing::debug!(message_id = %msg.id, outcome, "acked");
                Settled::Acked
            }
            Settlement::Nack { reason } => {
                span.record("action", "nack");
                span.record("reason", reason.as_str());
                span.record("messaging.operation.name", "nack");
                span.record("otel.status_code", "error");
                handle.nack();
                tracing::warn!(message_id = %msg.id, attempt, %reason, "nacked for redelivery");
                Settled::Nacked
            }
            Settlement::DeadLetter { kind, reason } => {
                span.record("action", "dead_letter");
                span.record("reason", reason.as_str());
                span.record("otel.status_code", "error");
                let letter = DeadLetter::new(
                    msg.data.clone(),
                    &msg.attributes,
                    kind,
                    &reason,
                    attempt,
                    &msg.id,
                    &self.subscription,
                );
                let truncated = letter.is_truncated();
                if truncated {
                    tracing::warn!(
                        message_id = %msg.id,
                        bytes = msg.data.len(),
                        attributes = msg.attributes.len(),
                        "message cannot be dead-lettered whole; publishing a bounded record (dlq_truncated=true)"
                    );
                }
                match self.sink.publish(letter).await {
                    Ok(dlq_id) => {
                        span.record("messaging.operation.name", "ack");
                        handle.ack();
                        self.metrics
                            .dead_letters
                            .get_or_create(&KindLabels {
                                kind: kind.as_str(),
                            })
                            .inc();
                        tracing::warn!(message_id = %msg.id, dlq_message_id = %dlq_id, kind = kind.as_str(), truncated, %reason, "dead-lettered");
                        Settled::DeadLettered
                    }
                    Err(e) => {
                        // Never ack what is not safely elsewhere: redeliver and try again.
                        span.record("messaging.operation.name", "nack");
                        handle.nack();
                        tracing::error!(message_id = %msg.id, error = %e, "dead-letter publish failed; nacked");
                        Settled::Nacked
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use bytes::Bytes;

    use super::*;
    use crate::act::restart::{Restarter, RestarterConfig};
    use crate::index::lookup::SharedIndex;
    use crate::pipeline::{Context, Pipeline, PipelineConfig};
    use crate::settle::deadletter::{ATTR_REASON, ATTR_TRUNCATED, PublishError};
    use crate::util::excerpt::EXCERPT_BYTES;

    #[derive(Default)]
    struct Recorded(Mutex<Vec<&'static str>>);
    struct Handle<'a>(&'a Recorded);
    // The trait wants 'static handles; tests leak one recorder each.
    impl AckHandle for Handle<'static> {
        fn ack(self) {
            self.0.0.lock().unwrap().push("ack");
        }
        fn nack(self) {
            self.0.0.lock().unwrap().push("nack");
        }
    }

    #[derive(Default)]
    struct Sink(Mutex<Vec<DeadLetter>>);
    impl DeadLetterSink for Sink {
        async fn publish(&self, letter: DeadLetter) -> Result<String, PublishError> {
            self.0.lock().unwrap().push(letter);
            Ok("dlq-1".into())
        }
    }

    fn pipeline(sink: Arc<Sink>) -> Pipeline<SharedIndex, Sink> {
        // Never contacted: malformed messages stop before any API call.
        let mut config = kube::Config::new("http://127.0.0.1:9".parse().unwrap());
        config.default_retry = false;
        let client = kube::Client::try_from(config).unwrap();
        Pipeline::new(
            Arc::new(SharedIndex::default()),
            Restarter::new(client, RestarterConfig::default()),
            Context {
                settler: Settler {
                    sink,
                    subscription: Arc::from("projects/p/subscriptions/s"),
                    metrics: Arc::new(Metrics::new()),
                },
                abort: tokio_util::sync::CancellationToken::new(),
                rollouts: None,
                notify: None,
            },
            PipelineConfig { max_attempts: 5 },
        )
    }

    /// One delivery through the pipeline, as the source hands it over.
    async fn run(data: Vec<u8>, attributes: HashMap<String, String>) -> (Settled, DeadLetter) {
        let msg = Inbound {
            id: "m1".into(),
            data: Bytes::from(data),
            attributes,
            publish_time: None,
            delivery_attempt: Some(1),
        };
        let sink = Arc::new(Sink::default());
        let p = pipeline(sink.clone());
        let acks: &'static Recorded = Box::leak(Box::default());
        let settled = p.handle(msg, Handle(acks)).await.expect("not aborted");
        assert_eq!(*acks.0.lock().unwrap(), ["ack"]);
        let letter = sink.0.lock().unwrap().pop().expect("a dead letter");
        (settled, letter)
    }

    /// Issue #14 item 12: the reason quotes a bounded excerpt, the dead letter keeps it all.
    #[tokio::test]
    async fn hostile_payload_reason_is_bounded_and_data_kept_whole() {
        let data = format!(
            r#"{{"action":"{}","tag":"gcr.io/p/a:v"}}"#,
            "\u{1b}X".repeat(30_000)
        )
        .into_bytes();
        let (settled, letter) = run(data.clone(), HashMap::new()).await;
        assert_eq!(settled, Settled::DeadLettered);
        assert_eq!(letter.data.as_ref(), &data[..]);
        let reason = &letter.attributes[ATTR_REASON];
        assert!(
            reason.len() <= EXCERPT_BYTES + 100,
            "{} bytes: {reason}",
            reason.len()
        );
        assert!(!reason.contains('\u{1b}'), "{reason:?}");
        assert!(!letter.is_truncated());
    }

    /// Issue #14 item 13: a message without `delivery_attempt` raises the gauge; one with it
    /// does not.
    #[tokio::test]
    async fn attempts_counted_per_process_is_exported() {
        let p = pipeline(Arc::default());
        let text = || p.metrics_text();
        let mut msg = Inbound {
            id: "m1".into(),
            data: Bytes::new(),
            attributes: HashMap::new(),
            publish_time: None,
            delivery_attempt: Some(3),
        };
        assert_eq!(p.attempt(&msg), 3);
        assert!(text().contains("gar_restarter_attempts_counted_per_process 0"));
        msg.delivery_attempt = None;
        assert_eq!(p.attempt(&msg), 1);
        assert_eq!(p.attempt(&msg), 2);
        assert!(text().contains("gar_restarter_attempts_counted_per_process 1"));
    }

    /// Issue #14 item 4: a message with 100 attributes cannot be republished whole; it is
    /// dead-lettered as a bounded record and acked rather than nacked forever.
    #[tokio::test]
    async fn unpublishable_message_becomes_a_bounded_record_and_is_acked() {
        let attributes = (0..100).map(|i| (format!("a{i}"), "v".into())).collect();
        let (settled, letter) = run(b"[1]".to_vec(), attributes).await;
        assert_eq!(settled, Settled::DeadLettered);
        assert_eq!(letter.attributes[ATTR_TRUNCATED], "true");
        assert!(letter.attributes.len() <= 100);
    }
}

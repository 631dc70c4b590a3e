//! Settle stage: ack, nack, or dead-letter then ack. A message is acked only when its work is
//! done or it is safely on the dead-letter topic.

use std::sync::Arc;

use tracing::Instrument;

use crate::deadletter::{DeadLetter, DeadLetterSink};
use crate::metrics::{KindLabels, Metrics, OutcomeLabels};
use crate::pipeline::{Inbound, Settlement};

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

pub async fn settle<H: AckHandle, D: DeadLetterSink>(
    settlement: Settlement,
    msg: &Inbound,
    attempt: u32,
    handle: H,
    sink: &D,
    subscription: &str,
    metrics: &Arc<Metrics>,
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
    settle_in_span(
        settlement,
        msg,
        attempt,
        handle,
        sink,
        subscription,
        metrics,
        span.clone(),
    )
    .instrument(span)
    .await
}

#[allow(clippy::too_many_arguments)]
async fn settle_in_span<H: AckHandle, D: DeadLetterSink>(
    settlement: Settlement,
    msg: &Inbound,
    attempt: u32,
    handle: H,
    sink: &D,
    subscription: &str,
    metrics: &Arc<Metrics>,
    span: tracing::Span,
) -> Settled {
    let settled = match settlement {
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
                subscription,
            );
            match sink.publish(letter).await {
                Ok(dlq_id) => {
                    span.record("messaging.operation.name", "ack");
                    handle.ack();
                    metrics
                        .dead_letters
                        .get_or_create(&KindLabels {
                            kind: kind.as_str(),
                        })
                        .inc();
                    tracing::warn!(message_id = %msg.id, dlq_message_id = %dlq_id, kind = kind.as_str(), %reason, "dead-lettered");
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
    };
    metrics
        .events_settled
        .get_or_create(&OutcomeLabels {
            outcome: settled.as_str(),
        })
        .inc();
    settled
}

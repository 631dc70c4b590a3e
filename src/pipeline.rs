//! The per-message pipeline: parse → look up → restart, ending in a [`Settlement`] that the
//! settle stage carries out. Nothing here touches Pub/Sub, so every path is testable with an
//! in-memory message.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::future::join_all;
use tracing::{Instrument, field};

use crate::act::decide::{Push, Skip};
use crate::act::dedupe::{BoundedTtlMap, InFlight};
use crate::act::restart::{RestartError, RestartOutcome, Restarter};
use crate::index::live::{Key, key_of};
use crate::index::lookup::Lookup;
use crate::ingest::event::{self, Event};
use crate::ops::metrics::Metrics;
use crate::ops::metrics::{ActionLabels, RestartLabels};
use crate::settle::deadletter::DeadLetterKind;

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

pub struct PipelineConfig {
    pub max_attempts: u32,
}

pub struct Pipeline<L> {
    lookup: Arc<L>,
    restarter: Restarter,
    metrics: Arc<Metrics>,
    /// Workloads whose decision and PATCH are running: a concurrent event for the same
    /// workload waits, then decides on what the first one did.
    inflight: InFlight<Key>,
    /// Deliveries per message (see [`delivery_key`]), for subscriptions without a dead-letter
    /// policy.
    attempts: BoundedTtlMap<String, u32>,
    max_attempts: u32,
    warned_per_process: AtomicBool,
}

/// Attempt counts kept at most; ~100 bytes each, so about 10 MB at worst.
const ATTEMPTS_CAPACITY: usize = 100_000;

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

impl<L: Lookup> Pipeline<L> {
    pub fn new(
        lookup: Arc<L>,
        restarter: Restarter,
        metrics: Arc<Metrics>,
        config: PipelineConfig,
    ) -> Self {
        Self {
            lookup,
            restarter,
            metrics,
            inflight: InFlight::new(),
            // Long enough to outlive any redelivery cycle of a failing message.
            attempts: BoundedTtlMap::new(Duration::from_secs(6 * 3600), ATTEMPTS_CAPACITY),
            max_attempts: config.max_attempts,
            warned_per_process: AtomicBool::new(false),
        }
    }

    /// The delivery number of this message: Pub/Sub's when it knows it, ours otherwise.
    pub fn attempt(&self, msg: &Inbound) -> u32 {
        match msg.delivery_attempt {
            Some(n) if n > 0 => n as u32,
            _ => {
                self.note_attempts_per_process();
                self.attempts
                    .update(delivery_key(msg), |c| c.unwrap_or(0) + 1)
            }
        }
    }

    /// Without `delivery_attempt` each replica counts its own deliveries and a restart
    /// forgets them, so a message failing while replicas come and go may never reach
    /// `--max-attempts`. Said once per process (a WARN per message would flood), and kept
    /// as a gauge for alerting.
    fn note_attempts_per_process(&self) {
        if !self.warned_per_process.swap(true, Ordering::Relaxed) {
            self.metrics.attempts_counted_per_process.set(1);
            tracing::warn!(
                "messages arrive without delivery_attempt (the subscription has no dead-letter \
                 policy): attempts are counted per process and reset on restart; set a \
                 dead-letter policy with max_delivery_attempts above --max-attempts"
            );
        }
    }

    /// Runs parse → look up → restart for one delivery. `attempt` comes from [`Self::attempt`].
    pub async fn process(&self, msg: &Inbound, attempt: u32) -> Settlement {
        let settlement = self.process_inner(msg, attempt).await;
        if !matches!(settlement, Settlement::Nack { .. }) {
            self.attempts.remove(&delivery_key(msg));
        }
        settlement
    }

    async fn process_inner(&self, msg: &Inbound, attempt: u32) -> Settlement {
        let received = Instant::now();
        let parsed = {
            let _span = tracing::info_span!("parse", bytes = msg.data.len()).entered();
            event::parse(&msg.data)
        };
        let event = match parsed {
            Ok(ev) => ev,
            Err(e) => {
                self.count_action("malformed");
                tracing::warn!(message_id = %msg.id, error = %e, "malformed message");
                return Settlement::DeadLetter {
                    kind: DeadLetterKind::Malformed,
                    reason: format!("message {}: {e}", msg.id),
                };
            }
        };
        let current = tracing::Span::current();
        match &event {
            Event::Delete { reference } => {
                self.count_action("delete");
                current.record("gar.image", reference.as_str());
                return Settlement::Ack { outcome: "delete" };
            }
            Event::InsertDigestOnly { digest } => {
                self.count_action("insert_digest_only");
                current.record("gar.image", digest.as_str());
                return Settlement::Ack {
                    outcome: "digest_only",
                };
            }
            Event::Insert { .. } => self.count_action("insert"),
        }
        let Event::Insert { tag, digest } = event else {
            return Settlement::Ack { outcome: "ignored" };
        };
        current.record("gar.image", tag.as_str());
        if let Some(d) = &digest {
            current.record("gar.digest", d.as_str());
        }

        let lookup_span =
            tracing::info_span!("lookup", image = %tag, source = field::Empty, hits = field::Empty);
        let started = Instant::now();
        let hits = match self
            .lookup
            .lookup(&tag)
            .instrument(lookup_span.clone())
            .await
        {
            Ok(h) => h,
            Err(e) => {
                return self.transient_failure(attempt, format!("message {}: {e}", msg.id));
            }
        };
        self.metrics
            .observe_lookup(hits.source.as_str(), started.elapsed());
        lookup_span.record("source", hits.source.as_str());
        lookup_span.record("hits", hits.workloads.len());
        if hits.workloads.is_empty() {
            tracing::debug!(image = %tag, "no workload runs this image");
            return Settlement::Ack {
                outcome: "no_match",
            };
        }

        let push = Push {
            image: tag.clone(),
            digest: digest.clone(),
            published_at: msg
                .publish_time
                .map(time::OffsetDateTime::from)
                .unwrap_or_else(time::OffsetDateTime::now_utc),
        };
        let tag = &tag;
        let push = &push;
        let jobs = hits.workloads.iter().map(|w| {
            let span = tracing::info_span!(
                "restart",
                "k8s.namespace.name" = %w.namespace,
                "k8s.workload.kind" = w.kind.as_str(),
                "k8s.workload.name" = %w.name,
                result = field::Empty,
            );
            async move {
                // Held until this restart is done, so that a copy of the event processed
                // concurrently decides on what this one did.
                let _claim = self.inflight.claim(key_of(w)).await;
                // The first PATCH only: a retry's latency is the API's doing, not ours.
                let first_send = std::sync::Once::new();
                let on_send = || {
                    first_send.call_once(|| {
                        self.metrics
                            .receive_to_patch_seconds
                            .observe(received.elapsed().as_secs_f64())
                    })
                };
                let result = self.restarter.restart(w, push, on_send).await;
                let label = match &result {
                    Ok(o) => o.as_str(),
                    Err(e) if e.is_transient() => "transient_error",
                    Err(_) => "permanent_error",
                };
                tracing::Span::current().record("result", label);
                self.metrics
                    .restarts
                    .get_or_create(&RestartLabels {
                        kind: w.kind.as_str(),
                        namespace: w.namespace.to_string(),
                        result: label,
                    })
                    .inc();
                match &result {
                    Ok(RestartOutcome::Restarted) => {
                        if let Some(lag) = msg.publish_time.and_then(|t| t.elapsed().ok()) {
                            self.metrics.push_to_restart_seconds.observe(lag.as_secs_f64());
                        }
                        self.metrics
                            .receive_to_restart_seconds
                            .observe(received.elapsed().as_secs_f64());
                        tracing::info!(workload = %w, image = %tag, digest = push.digest.as_deref(), "restarted");
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(workload = %w, error = %e, "restart failed"),
                }
                (w, result)
            }
            .instrument(span)
        });
        let results = join_all(jobs).await;

        let mut transient: Vec<&RestartError> = Vec::new();
        let mut permanent: Vec<&RestartError> = Vec::new();
        let mut restarted = 0usize;
        let mut dry_run = false;
        let mut stale = false;
        for (_, r) in &results {
            match r {
                Ok(RestartOutcome::Restarted) => restarted += 1,
                Ok(RestartOutcome::DryRun) => dry_run = true,
                Ok(RestartOutcome::Skipped(Skip::Stale)) => stale = true,
                Ok(_) => {}
                Err(e) if e.is_transient() => transient.push(e),
                Err(e) => permanent.push(e),
            }
        }
        if let Some(last) = transient.last() {
            // Retry only what failed: what was restarted is recorded and will be skipped.
            return self.transient_failure(attempt, format!("message {}: {last}", msg.id));
        }
        if !permanent.is_empty() {
            let reasons: Vec<String> = permanent
                .iter()
                .map(|e| match e.status {
                    Some(code) => format!("{} (HTTP {code}): {}", e.workload, e.message),
                    None => e.to_string(),
                })
                .collect();
            return Settlement::DeadLetter {
                kind: DeadLetterKind::Permanent,
                reason: format!("message {} image {tag}: {}", msg.id, reasons.join("; ")),
            };
        }
        let outcome = match (restarted, dry_run, stale) {
            (0, true, _) => "dry_run",
            // Every workload had been restarted for a later push of this tag.
            (0, false, true) => "stale",
            (0, false, false) => "nothing_to_restart",
            _ => "restarted",
        };
        Settlement::Ack { outcome }
    }

    fn transient_failure(&self, attempt: u32, reason: String) -> Settlement {
        if attempt >= self.max_attempts {
            Settlement::DeadLetter {
                kind: DeadLetterKind::Exhausted,
                reason: format!("after {attempt} attempts: {reason}"),
            }
        } else {
            Settlement::Nack { reason }
        }
    }

    /// The metrics this pipeline reports to, as `/metrics` would show them.
    pub fn metrics_text(&self) -> String {
        self.metrics.encode()
    }

    fn count_action(&self, action: &'static str) {
        self.metrics
            .events_received
            .get_or_create(&ActionLabels { action })
            .inc();
    }
}

#[cfg(test)]
mod tests {
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

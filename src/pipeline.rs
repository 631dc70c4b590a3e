//! One delivery, driven from one place: [`Pipeline::handle`] opens the consumer span, counts
//! the attempt, runs parse → look up → act ([`Pipeline::process`]) and settles the result.
//! The source makes one call per message; nothing here touches Pub/Sub itself, so every path
//! is testable with an in-memory message and ack handle.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use futures::future::join_all;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, field};

use crate::act::decide::{Push, Skip};
use crate::act::dedupe::{BoundedTtlMap, InFlight};
use crate::act::notify::{self, Notifier};
use crate::act::restart::{RestartError, RestartOutcome, Restarter};
use crate::act::rollout::Rollouts;
use crate::index::live::{Key, key_of};
use crate::index::lookup::{Lookup, LookupError};
use crate::index::workload::WorkloadRef;
use crate::ingest::event::{self, Event};
use crate::ingest::image::ImageRef;
use crate::ingest::inbound::{Inbound, delivery_key};
use crate::ops::metrics::Metrics;
use crate::ops::metrics::{ActionLabels, RestartLabels};
use crate::settle::deadletter::{DeadLetterKind, DeadLetterSink};
use crate::settle::{AckHandle, Settled, Settlement, Settler};
use crate::util::clock::{format_rfc3339_nanos, now_rfc3339};

pub struct PipelineConfig {
    pub max_attempts: u32,
}

/// What every delivery shares besides the stages: where settlements go (sink, subscription,
/// metrics) and the token that tells unfinished deliveries to give up at shutdown.
pub struct Context<D> {
    pub settler: Settler<D>,
    /// Cancelled when the drain timeout is over: a delivery still running nacks its message.
    pub abort: CancellationToken,
    /// Follows each restart's rollout after the ack (with the live view; `None` without).
    pub rollouts: Option<Arc<Rollouts>>,
    /// Publishes each restart to `--notify-topic` (`None` without one).
    pub notify: Option<Arc<Notifier>>,
}

pub struct Pipeline<L, D> {
    lookup: Arc<L>,
    restarter: Restarter,
    ctx: Context<D>,
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

impl<L: Lookup, D: DeadLetterSink> Pipeline<L, D> {
    pub fn new(
        lookup: Arc<L>,
        restarter: Restarter,
        ctx: Context<D>,
        config: PipelineConfig,
    ) -> Self {
        Self {
            lookup,
            restarter,
            metrics: ctx.settler.metrics.clone(),
            ctx,
            inflight: InFlight::new(),
            // Long enough to outlive any redelivery cycle of a failing message.
            attempts: BoundedTtlMap::new(Duration::from_secs(6 * 3600), ATTEMPTS_CAPACITY),
            max_attempts: config.max_attempts,
            warned_per_process: AtomicBool::new(false),
        }
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// The token [`Context::abort`]: the source cancels it when the drain timeout is over.
    pub fn abort_token(&self) -> CancellationToken {
        self.ctx.abort.clone()
    }

    /// One delivery, transport aside: the consumer span (continuing the publisher's trace),
    /// the attempt, the work, then settle. `None` when shutdown aborted it (it is nacked).
    pub async fn handle<H: AckHandle>(&self, msg: Inbound, handle: H) -> Option<Settled> {
        let attempt = self.attempt(&msg);
        let span = process_span(&self.ctx.settler.subscription, &msg, attempt);
        crate::ops::telemetry::continue_trace(&span, &msg.attributes);
        self.metrics.in_flight.inc();
        let settled = async {
            tokio::select! {
                biased;
                settlement = self.process(&msg, attempt) => {
                    Some(self.ctx.settler.settle(settlement, &msg, attempt, handle).await)
                }
                _ = self.ctx.abort.cancelled() => {
                    handle.nack();
                    tracing::warn!(message_id = %msg.id, "shutdown: nacked unfinished message");
                    None
                }
            }
        }
        .instrument(span.clone())
        .await;
        self.metrics.in_flight.dec();
        // The consumer span fails when the message was not done with: retried or given up on.
        let failed = match settled {
            Some(Settled::Acked) => None,
            Some(s) => Some(s.as_str()),
            None => Some("shutdown"),
        };
        if let Some(error_type) = failed {
            span.record("otel.status_code", "error");
            span.record("error.type", error_type);
        }
        settled
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
        let push = match self.classify(msg) {
            Ok(push) => push,
            Err(settled) => return settled,
        };
        let workloads = match self.look_up(&push.image).await {
            Ok(w) if w.is_empty() => {
                tracing::debug!(image = %push.image, "no workload runs this image");
                return Settlement::Ack {
                    outcome: "no_match",
                };
            }
            Ok(w) => w,
            Err(e) => return self.transient_failure(attempt, format!("message {}: {e}", msg.id)),
        };
        let jobs = workloads
            .iter()
            .map(|w| self.restart_one(w, &push, msg, received));
        let results = join_all(jobs).await;
        self.verdict(&results, msg, attempt, &push)
    }

    /// Parses the payload and says what kind of event it is: a tag push to act on (with the
    /// span's image attributes set), or the settlement of anything else.
    fn classify(&self, msg: &Inbound) -> Result<Push, Settlement> {
        let parsed = {
            let _span = tracing::info_span!("parse", bytes = msg.data.len()).entered();
            event::parse(&msg.data)
        };
        let event = match parsed {
            Ok(ev) => ev,
            Err(e) => {
                self.count_action("malformed");
                tracing::warn!(message_id = %msg.id, error = %e, "malformed message");
                return Err(Settlement::DeadLetter {
                    kind: DeadLetterKind::Malformed,
                    reason: format!("message {}: {e}", msg.id),
                });
            }
        };
        let current = tracing::Span::current();
        let (tag, digest) = match event {
            Event::Delete { reference } => {
                self.count_action("delete");
                current.record("gar.image", reference.as_str());
                return Err(Settlement::Ack { outcome: "delete" });
            }
            Event::InsertDigestOnly { digest } => {
                self.count_action("insert_digest_only");
                current.record("gar.image", digest.as_str());
                return Err(Settlement::Ack {
                    outcome: "digest_only",
                });
            }
            Event::Insert { tag, digest } => {
                self.count_action("insert");
                (tag, digest)
            }
        };
        current.record("gar.image", tag.as_str());
        if let Some(d) = &digest {
            current.record("gar.digest", d.as_str());
        }
        Ok(Push {
            image: tag,
            digest,
            published_at: msg
                .publish_time
                .map(time::OffsetDateTime::from)
                .unwrap_or_else(time::OffsetDateTime::now_utc),
            message_id: msg.id.to_string(),
        })
    }

    /// The workloads that run `tag`, in a `lookup` span, timed by source.
    async fn look_up(&self, tag: &ImageRef) -> Result<Arc<[WorkloadRef]>, LookupError> {
        let span =
            tracing::info_span!("lookup", image = %tag, source = field::Empty, hits = field::Empty);
        let started = Instant::now();
        let hits = self.lookup.lookup(tag).instrument(span.clone()).await?;
        self.metrics
            .observe_lookup(hits.source.as_str(), started.elapsed());
        span.record("source", hits.source.as_str());
        span.record("hits", hits.workloads.len());
        Ok(hits.workloads)
    }

    /// Decides on and restarts one workload, in its `restart` span, and counts the result.
    async fn restart_one<'w>(
        &self,
        w: &'w WorkloadRef,
        push: &Push,
        msg: &Inbound,
        received: Instant,
    ) -> (&'w WorkloadRef, Result<RestartOutcome, RestartError>) {
        let span = tracing::info_span!(
            "restart",
            "k8s.namespace.name" = %w.namespace,
            "k8s.workload.kind" = w.kind.as_str(),
            "k8s.workload.name" = %w.name,
            result = field::Empty,
            "gar.strategy" = field::Empty,
            "gar.stale_image_risk" = field::Empty,
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
                Ok(outcome @ (RestartOutcome::Restarted | RestartOutcome::Pinned)) => {
                    if let Some(lag) = msg.publish_time.and_then(|t| t.elapsed().ok()) {
                        self.metrics.push_to_restart_seconds.observe(lag.as_secs_f64());
                    }
                    self.metrics
                        .receive_to_restart_seconds
                        .observe(received.elapsed().as_secs_f64());
                    tracing::info!(workload = %w, image = %push.image, digest = push.digest.as_deref(), message_id = %push.message_id, result = outcome.as_str(), "restarted");
                    let strategy = match outcome {
                        RestartOutcome::Pinned => "pin-digest",
                        _ => "restart",
                    };
                    if let Some(rollouts) = &self.ctx.rollouts {
                        rollouts.track(w, push, &msg.id, strategy);
                    }
                    if let Some(n) = &self.ctx.notify {
                        n.send(notify::Record {
                            kind: "restart",
                            workload: w.into(),
                            image: push.image.as_str().to_owned(),
                            digest: push.digest.clone(),
                            strategy,
                            result: outcome.as_str(),
                            message_id: msg.id.clone(),
                            published_at: Some(format_rfc3339_nanos(push.published_at)),
                            at: now_rfc3339(),
                            detail: None,
                        });
                    }
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(workload = %w, error = %e, "restart failed"),
            }
            (w, result)
        }
        .instrument(span)
        .await
    }

    /// One settlement from the per-workload results: retry what failed transiently (the
    /// restarted ones are recorded and will be skipped), dead-letter permanent failures
    /// naming each workload, or ack with what was done.
    fn verdict(
        &self,
        results: &[(&WorkloadRef, Result<RestartOutcome, RestartError>)],
        msg: &Inbound,
        attempt: u32,
        push: &Push,
    ) -> Settlement {
        let tag = &push.image;
        let mut transient: Vec<&RestartError> = Vec::new();
        let mut permanent: Vec<&RestartError> = Vec::new();
        let mut restarted = 0usize;
        let mut dry_run = false;
        let mut stale = false;
        for (_, r) in results {
            match r {
                Ok(RestartOutcome::Restarted | RestartOutcome::Pinned) => restarted += 1,
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

/// The consumer span, named and attributed per the OpenTelemetry messaging conventions.
pub fn process_span(subscription: &str, msg: &Inbound, attempt: u32) -> tracing::Span {
    let short = subscription.rsplit('/').next().unwrap_or(subscription);
    tracing::info_span!(
        "process",
        "otel.name" = %format!("process {short}"),
        "otel.kind" = "consumer",
        "messaging.system" = "gcp_pubsub",
        "messaging.operation.type" = "process",
        "messaging.operation.name" = "process",
        "messaging.destination.subscription.name" = %subscription,
        "messaging.message.id" = %msg.id,
        "messaging.gcp_pubsub.message.delivery_attempt" = attempt,
        "messaging.message.body.size" = msg.data.len(),
        "gar.image" = field::Empty,
        "gar.digest" = field::Empty,
        "otel.status_code" = field::Empty,
        "error.type" = field::Empty,
        trace_id = field::Empty,
    )
}

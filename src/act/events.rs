//! Kubernetes Events (`events.k8s.io/v1`) on the workloads the daemon acted on, so that
//! `kubectl describe` and `kubectl events` show what happened to them and why.
//!
//! Emitting is off the hot path and can never fail or hold up a message: [`EventEmitter::emit`]
//! queues without waiting (a full queue drops the event, counted), and one background task
//! publishes with kube's [`Recorder`], each try bounded by a timeout and never retried.
//! Failures are counted in `gar_restarter_kubernetes_events_total{result="failed"}` and logged
//! at WARN once per burst (again at most once a minute while it lasts).
//!
//! Each event is published with a fresh `Recorder`: kube's recorder folds events with the same
//! reason on the same object into a series by PATCHing the first one, which keeps the *first*
//! note, and every push must name its own digest and message id.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Client;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use tokio::sync::mpsc;

use crate::ops::metrics::{KubeEventLabels, Metrics};

/// Why an Event is written. Rollout tracking adds `RolloutSucceeded` (Normal) and
/// `RolloutFailed` (Warning) here, with their action `Rollout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// `restart`: the pod template was restarted for a push (Normal).
    Restarted,
    /// `pin-digest`: the matching containers were pinned to the pushed digest (Normal).
    PinnedDigest,
    /// `restart` of a container whose pull policy may start the old image again (Warning).
    StaleImageRisk,
    /// The rollout a restart started finished (Normal).
    RolloutSucceeded,
    /// The rollout a restart started failed (ProgressDeadlineExceeded) or timed out (Warning).
    RolloutFailed,
}

impl Reason {
    pub const ALL: [Reason; 5] = [
        Reason::Restarted,
        Reason::PinnedDigest,
        Reason::StaleImageRisk,
        Reason::RolloutSucceeded,
        Reason::RolloutFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Reason::Restarted => "Restarted",
            Reason::PinnedDigest => "PinnedDigest",
            Reason::StaleImageRisk => "StaleImageRisk",
            Reason::RolloutSucceeded => "RolloutSucceeded",
            Reason::RolloutFailed => "RolloutFailed",
        }
    }

    pub fn event_type(self) -> EventType {
        match self {
            Reason::Restarted | Reason::PinnedDigest | Reason::RolloutSucceeded => {
                EventType::Normal
            }
            Reason::StaleImageRisk | Reason::RolloutFailed => EventType::Warning,
        }
    }

    /// The `action` field: what the daemon did, which the reason explains.
    pub fn action(self) -> &'static str {
        match self {
            Reason::Restarted | Reason::StaleImageRisk => "Restart",
            Reason::PinnedDigest => "PinDigest",
            Reason::RolloutSucceeded | Reason::RolloutFailed => "Rollout",
        }
    }
}

/// One Event to write about `regarding` (a workload, with its uid, as the PATCH returned it).
#[derive(Debug, Clone)]
pub struct WorkloadEvent {
    pub reason: Reason,
    pub regarding: ObjectReference,
    /// Human-readable; cut to the API's 1 kB limit.
    pub note: String,
}

/// Events waiting to be written; past this the newest are dropped (and counted).
const QUEUE: usize = 1024;
/// One try per Event: a slow API server delays the Events behind it, never the messages.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
const NOTE_MAX_BYTES: usize = 1024;
const REWARN_AFTER: Duration = Duration::from_secs(60);

/// Queues Events for the background writer; a disabled one (dry run, tests) drops them.
#[derive(Clone, Default)]
pub struct EventEmitter {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    tx: mpsc::Sender<WorkloadEvent>,
    metrics: Arc<Metrics>,
    /// Set once a full queue was logged; the writer clears it when an Event gets through.
    warned_full: AtomicBool,
}

impl EventEmitter {
    /// Emits nothing: `--dry-run`, and libraries' tests.
    pub fn disabled() -> Self {
        Self::default()
    }

    /// Starts the writer task on the current runtime; it ends when every emitter is dropped.
    pub fn spawn(client: Client, reporter: Reporter, metrics: Arc<Metrics>) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let inner = Arc::new(Inner {
            tx,
            metrics: metrics.clone(),
            warned_full: AtomicBool::new(false),
        });
        tokio::spawn(write_events(client, reporter, rx, inner.clone()));
        Self { inner: Some(inner) }
    }

    /// Queues `event` without waiting.
    pub fn emit(&self, mut event: WorkloadEvent) {
        let Some(inner) = &self.inner else {
            return;
        };
        truncate(&mut event.note, NOTE_MAX_BYTES);
        let reason = event.reason;
        if let Err(e) = inner.tx.try_send(event) {
            inner.count(reason, "dropped");
            if !inner.warned_full.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    reason = reason.as_str(),
                    error = %e,
                    "Kubernetes Event queue full ({QUEUE}): dropping Events until the writer catches up"
                );
            }
        }
    }
}

impl Inner {
    fn count(&self, reason: Reason, result: &'static str) {
        self.metrics
            .kubernetes_events
            .get_or_create(&KubeEventLabels {
                reason: reason.as_str(),
                result,
            })
            .inc();
    }
}

/// Failures since the last success, for one WARN per burst.
#[derive(Default)]
struct Burst {
    failures: u64,
    warned_at: Option<Instant>,
}

async fn write_events(
    client: Client,
    reporter: Reporter,
    mut rx: mpsc::Receiver<WorkloadEvent>,
    inner: Arc<Inner>,
) {
    // The receiver holds no sender, so the loop ends when every emitter is gone.
    let inner_weak = Arc::downgrade(&inner);
    let metrics = inner.metrics.clone();
    drop(inner);
    let mut burst = Burst::default();
    while let Some(ev) = rx.recv().await {
        let recorder = Recorder::new(client.clone(), reporter.clone());
        let event = Event {
            type_: ev.reason.event_type(),
            reason: ev.reason.as_str().to_string(),
            note: Some(ev.note.clone()),
            action: ev.reason.action().to_string(),
            secondary: None,
        };
        let started = Instant::now();
        let result =
            tokio::time::timeout(PUBLISH_TIMEOUT, recorder.publish(&event, &ev.regarding)).await;
        metrics
            .kubernetes_event_seconds
            .observe(started.elapsed().as_secs_f64());
        let workload = describe(&ev.regarding);
        let error = match result {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(_) => Some(format!("no answer within {PUBLISH_TIMEOUT:?}")),
        };
        let label = if error.is_some() { "failed" } else { "emitted" };
        metrics
            .kubernetes_events
            .get_or_create(&KubeEventLabels {
                reason: ev.reason.as_str(),
                result: label,
            })
            .inc();
        match error {
            None => {
                if burst.failures > 0 {
                    tracing::info!(
                        failures = burst.failures,
                        "Kubernetes Events are written again"
                    );
                }
                burst = Burst::default();
                if let Some(inner) = inner_weak.upgrade() {
                    inner.warned_full.store(false, Ordering::Relaxed);
                }
            }
            Some(error) => {
                burst.failures += 1;
                if burst.warned_at.is_none_or(|t| t.elapsed() >= REWARN_AFTER) {
                    burst.warned_at = Some(Instant::now());
                    tracing::warn!(
                        reason = ev.reason.as_str(),
                        %workload,
                        failures = burst.failures,
                        %error,
                        "writing the Kubernetes Event {} on {workload} failed (not retried; \
                         needs create/patch on events.k8s.io events): {error}",
                        ev.reason.as_str()
                    );
                }
            }
        }
    }
}

fn describe(r: &ObjectReference) -> String {
    format!(
        "{} {}/{}",
        r.kind.as_deref().unwrap_or("?"),
        r.namespace.as_deref().unwrap_or("?"),
        r.name.as_deref().unwrap_or("?")
    )
}

/// Cuts `s` to at most `max` bytes, at a character boundary, marking the cut with `…`.
fn truncate(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push('…');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_fit_the_api_limit() {
        let mut s = "é".repeat(600);
        truncate(&mut s, NOTE_MAX_BYTES);
        assert!(s.len() <= NOTE_MAX_BYTES && s.ends_with('…'), "{}", s.len());
        let mut short = "ok".to_string();
        truncate(&mut short, NOTE_MAX_BYTES);
        assert_eq!(short, "ok");
    }

    #[test]
    fn reasons_and_types() {
        assert_eq!(Reason::StaleImageRisk.event_type(), EventType::Warning);
        assert_eq!(Reason::PinnedDigest.event_type(), EventType::Normal);
        assert_eq!(Reason::PinnedDigest.action(), "PinDigest");
    }

    #[tokio::test]
    async fn a_disabled_emitter_drops_silently() {
        EventEmitter::disabled().emit(WorkloadEvent {
            reason: Reason::Restarted,
            regarding: ObjectReference::default(),
            note: "x".into(),
        });
    }
}

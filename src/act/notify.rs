//! The outcome topic (`--notify-topic`): one JSON record per restart and per rollout
//! outcome, so that a Cloud Function or a chat integration can announce deploys without the
//! daemon knowing about Slack.
//!
//! Publishing never blocks or nacks the main work: records go into a bounded queue
//! ([`QUEUE`]) that one background task drains, retrying each record briefly ([`ATTEMPTS`]
//! tries over about a second) before counting it as failed. A full queue (the topic down
//! during a storm) drops the record and counts that too: `notifications_total{result}`.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::index::workload::WorkloadRef;
use crate::ops::metrics::{Metrics, ResultLabels};

/// Records waiting to be published at most; ~1 KB each.
pub const QUEUE: usize = 1_024;
/// Tries per record.
pub const ATTEMPTS: usize = 3;

/// Where records go: the Pub/Sub topic in production, a vector in tests.
pub trait RecordSink: Send + Sync + 'static {
    fn send(&self, json: Vec<u8>) -> impl Future<Output = Result<(), String>> + Send;
}

/// One outcome, as published (camelCase JSON).
#[derive(Debug, Clone, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// `restart` or `rollout`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub workload: Workload,
    pub image: String,
    pub digest: Option<String>,
    pub strategy: &'static str,
    /// A restart: `restarted` or `pinned`; a rollout: `succeeded`, `failed` or `timed_out`.
    pub result: &'static str,
    pub message_id: String,
    /// The push's publish time (RFC 3339).
    pub published_at: Option<String>,
    /// When this outcome happened (RFC 3339).
    pub at: String,
    /// What kubectl would say about the rollout's end; absent for a restart.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Workload {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
}

impl From<&WorkloadRef> for Workload {
    fn from(w: &WorkloadRef) -> Self {
        Self {
            kind: w.kind.as_str(),
            namespace: w.namespace.to_string(),
            name: w.name.to_string(),
        }
    }
}

/// The sending half: cheap to call from the pipeline and the rollout tracker.
pub struct Notifier {
    tx: mpsc::Sender<Record>,
    metrics: Arc<Metrics>,
}

impl Notifier {
    /// Starts the publishing task on `sink`; it stops with `shutdown`, after flushing what is
    /// queued (each record still gets its tries).
    pub fn spawn<S: RecordSink>(
        sink: S,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(drain(sink, rx, metrics.clone(), shutdown));
        Arc::new(Self { tx, metrics })
    }

    /// Queues `record`; never waits.
    pub fn send(&self, record: Record) {
        if self.tx.try_send(record).is_err() {
            self.count("dropped");
            tracing::warn!("the outcome topic's queue is full: a record was dropped");
        }
    }

    fn count(&self, result: &'static str) {
        count(&self.metrics, result);
    }
}

fn count(metrics: &Metrics, result: &'static str) {
    metrics
        .notifications
        .get_or_create(&ResultLabels { result })
        .inc();
}

async fn drain<S: RecordSink>(
    sink: S,
    mut rx: mpsc::Receiver<Record>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    loop {
        let record = tokio::select! {
            biased;
            r = rx.recv() => r,
            _ = shutdown.cancelled() => {
                rx.close();
                rx.recv().await
            }
        };
        let Some(record) = record else {
            return;
        };
        let Ok(json) = serde_json::to_vec(&record) else {
            count(&metrics, "failed");
            continue;
        };
        let policy = ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(200))
            .with_max_delay(Duration::from_secs(1))
            .with_max_times(ATTEMPTS - 1);
        let sent = (|| sink.send(json.clone())).retry(policy).await;
        match sent {
            Ok(()) => count(&metrics, "published"),
            Err(e) => {
                count(&metrics, "failed");
                tracing::warn!(
                    workload = %format!("{}/{}/{}", record.workload.kind, record.workload.namespace, record.workload.name),
                    message_id = %record.message_id,
                    error = %e,
                    "could not publish an outcome record after {ATTEMPTS} tries; it is dropped"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::workload::WorkloadKind;
    use crate::util::clock::format_rfc3339;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use time::OffsetDateTime;

    #[derive(Clone, Default)]
    struct Flaky {
        failures: Arc<AtomicUsize>,
        sent: Arc<Mutex<Vec<serde_json::Value>>>,
    }

    impl RecordSink for Flaky {
        async fn send(&self, json: Vec<u8>) -> Result<(), String> {
            if self
                .failures
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err("unavailable".into());
            }
            let v = serde_json::from_slice(&json).map_err(|e| e.to_string())?;
            self.sent.lock().map_err(|e| e.to_string())?.push(v);
            Ok(())
        }
    }

    fn record() -> Record {
        Record {
            kind: "restart",
            workload: (&WorkloadRef::new(WorkloadKind::Deployment, "apps", "web")).into(),
            image: "europe-docker.pkg.dev/p/r/app:v1".into(),
            digest: Some("sha256:ab".into()),
            strategy: "restart",
            result: "restarted",
            message_id: "m-1".into(),
            published_at: OffsetDateTime::from_unix_timestamp(1_700_000_000)
                .ok()
                .map(format_rfc3339),
            at: format_rfc3339(OffsetDateTime::UNIX_EPOCH),
            detail: None,
        }
    }

    fn published(m: &Metrics, result: &'static str) -> u64 {
        m.notifications
            .get_or_create(&ResultLabels { result })
            .get()
    }

    async fn until(cond: impl Fn() -> bool) {
        for _ in 0..200 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    #[tokio::test]
    async fn records_are_retried_briefly_then_counted() {
        let metrics = Arc::new(Metrics::new());
        let sink = Flaky::default();
        sink.failures.store(ATTEMPTS - 1, Ordering::SeqCst);
        let shutdown = CancellationToken::new();
        let n = Notifier::spawn(sink.clone(), metrics.clone(), shutdown.clone());
        n.send(record());
        until(|| published(&metrics, "published") == 1).await;
        assert_eq!(published(&metrics, "published"), 1);
        let sent = sink.sent.lock().map(|v| v.clone()).unwrap_or_default();
        assert_eq!(sent[0]["type"], "restart");
        assert_eq!(sent[0]["workload"]["name"], "web");
        assert_eq!(sent[0]["messageId"], "m-1");
        assert_eq!(sent[0]["publishedAt"], "2023-11-14T22:13:20Z");
        assert!(sent[0].get("detail").is_none());

        sink.failures.store(ATTEMPTS, Ordering::SeqCst);
        n.send(record());
        until(|| published(&metrics, "failed") == 1).await;
        assert_eq!(
            published(&metrics, "failed"),
            1,
            "given up after {ATTEMPTS} tries"
        );
        assert_eq!(published(&metrics, "published"), 1);
        shutdown.cancel();
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_instead_of_waiting() {
        let metrics = Arc::new(Metrics::new());
        let (tx, _rx) = mpsc::channel(1);
        let n = Notifier {
            tx,
            metrics: metrics.clone(),
        };
        n.send(record());
        n.send(record());
        assert_eq!(published(&metrics, "dropped"), 1);
    }
}

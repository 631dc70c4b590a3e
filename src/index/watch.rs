//! Feeds the [`LiveView`] from kube's runtime watcher: one stream per workload kind and
//! namespace in scope (one cluster-wide without `--namespace`), with the `--selector`.
//!
//! The watcher lists, then watches from the list's resourceVersion. When a stream fails (the
//! API server restarted, the connection dropped, `410 Gone` as a watch event or as the HTTP
//! status of the watch request) it is re-created with backoff, which relists, rather than
//! resumed: a resumed watch replays what it missed but never says when it has caught up,
//! while a list ends with `InitDone`. Until then the stream counts as not synced
//! ([`LiveView::degrade`]), so the view stops answering and a miss is not taken as
//! authoritative on a view that may lack what changed meanwhile. Every `--refresh-interval`
//! each stream is re-created too: a safety net, at one LIST per stream per interval.

use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use futures::StreamExt;
use kube::Client;
use kube::api::Api;
use kube::runtime::watcher as watch_stream;
use kube::runtime::watcher::{self, Event};
use tokio_util::sync::CancellationToken;

use crate::cluster::status_code;
use crate::index::live::{Change, LiveView, StreamId, key_of};
use crate::index::object::{DaemonSets, Deployments, Kind, Object, StatefulSets};
use crate::index::workload::WorkloadKind;
use crate::ops::metrics::{Metrics, StreamLabels};

pub struct WatchConfig {
    pub selector: Option<String>,
    /// How often each stream is re-created (a relist), as a safety net.
    pub relist_interval: Duration,
}

/// Starts one task per stream of `live`; they stop with `shutdown`.
pub fn spawn(
    client: Client,
    live: Arc<LiveView>,
    config: WatchConfig,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
) {
    let config = Arc::new(config);
    for stream in live.streams().to_vec() {
        let ctx = StreamContext {
            client: client.clone(),
            live: live.clone(),
            config: config.clone(),
            metrics: metrics.clone(),
            shutdown: shutdown.clone(),
            stream,
        };
        match ctx.stream.kind {
            WorkloadKind::Deployment => tokio::spawn(ctx.run::<Deployments>()),
            WorkloadKind::StatefulSet => tokio::spawn(ctx.run::<StatefulSets>()),
            WorkloadKind::DaemonSet => tokio::spawn(ctx.run::<DaemonSets>()),
        };
    }
}

struct StreamContext {
    client: Client,
    live: Arc<LiveView>,
    config: Arc<WatchConfig>,
    metrics: Arc<Metrics>,
    shutdown: CancellationToken,
    stream: StreamId,
}

impl StreamContext {
    fn api<K: Kind>(&self) -> Api<Object<K>> {
        match &self.stream.namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        }
    }

    fn where_(&self) -> String {
        match &self.stream.namespace {
            Some(ns) => format!("{} in namespace {ns}", self.stream.kind.plural()),
            None => format!("{} in all namespaces", self.stream.kind.plural()),
        }
    }

    async fn run<K: Kind>(self) {
        let labels = StreamLabels {
            kind: self.stream.kind.plural(),
        };
        let mut cfg = watcher::Config::default();
        if let Some(sel) = &self.config.selector {
            cfg = cfg.labels(sel);
        }
        let mut failing = false;
        let mut backoff = retry_delays();
        loop {
            let started = Instant::now();
            match self.stream_once::<K>(&cfg, &labels, &mut failing).await {
                Ended::Shutdown => return,
                Ended::Relist => {
                    tracing::debug!(stream = %self.where_(), "re-creating the watch (periodic relist)");
                }
                Ended::Failed => {
                    // Until the relist is done the view may lack what changed meanwhile, so
                    // it stops answering: a miss is no longer authoritative.
                    self.live.degrade(&self.stream);
                    self.metrics.watch_synced.set(0);
                    if started.elapsed() >= HEALTHY {
                        backoff = retry_delays();
                    }
                    let delay = backoff.next().unwrap_or(MAX_RETRY_DELAY);
                    tokio::select! {
                        _ = self.shutdown.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// One watcher stream, from its list until it fails, the periodic relist is due, or
    /// shutdown.
    async fn stream_once<K: Kind>(
        &self,
        cfg: &watcher::Config,
        labels: &StreamLabels,
        failing: &mut bool,
    ) -> Ended {
        let mut events = watch_stream(self.api::<K>(), cfg.clone()).boxed();
        let relist = tokio::time::sleep(self.config.relist_interval);
        tokio::pin!(relist);
        loop {
            let event = tokio::select! {
                _ = self.shutdown.cancelled() => return Ended::Shutdown,
                _ = &mut relist => return Ended::Relist,
                ev = events.next() => ev,
            };
            match event {
                Some(Ok(event)) => {
                    self.metrics.watch_events.get_or_create(labels).inc();
                    let Some(change) = change_of(event) else {
                        continue;
                    };
                    let done = matches!(change, Change::ListDone);
                    self.live.apply(&self.stream, change);
                    if done {
                        self.metrics
                            .watch_synced
                            .set(i64::from(self.live.is_synced()));
                        // The list's pages of whole objects are freed by now.
                        crate::util::heap::release_freed_memory();
                        if std::mem::take(failing) {
                            tracing::info!(stream = %self.where_(), "watch recovered");
                        }
                        tracing::info!(
                            stream = %self.where_(),
                            workloads = self.live.workload_count(),
                            synced = self.live.is_synced(),
                            "watch listed"
                        );
                    }
                }
                Some(Err(e)) => {
                    self.metrics.watch_errors.get_or_create(labels).inc();
                    // One WARN per outage: the stream is re-created with backoff until a
                    // relist succeeds.
                    if !*failing {
                        tracing::warn!(stream = %self.where_(), error = %e, gone = start_gone(&e), "watch failed; relisting with backoff (until then lookups and decisions use the snapshot index)");
                        *failing = true;
                    } else {
                        tracing::debug!(stream = %self.where_(), error = %e, "watch still failing");
                    }
                    return Ended::Failed;
                }
                None => return Ended::Failed,
            }
        }
    }
}

/// Why a watcher stream was given up.
enum Ended {
    Shutdown,
    /// `--refresh-interval` passed: re-created on purpose, at once.
    Relist,
    /// An error, or the end of the stream: re-created after a backoff.
    Failed,
}

/// A stream that ran this long before failing was healthy: the backoff starts over.
const HEALTHY: Duration = Duration::from_secs(60);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(30);

/// Delays between attempts while a stream keeps failing: 0.5 s doubling to 30 s, jittered.
fn retry_delays() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(MAX_RETRY_DELAY)
        .with_jitter()
        .without_max_times()
        .build()
}

/// Whether the server refused to start a watch with `410 Gone` (HTTP status, not an event).
fn start_gone(e: &watcher::Error) -> bool {
    matches!(e, watcher::Error::WatchStartFailed(err) if status_code(err) == Some(410))
}

fn change_of<K: Kind>(event: Event<Object<K>>) -> Option<Change> {
    Some(match event {
        Event::Init => Change::ListStarted,
        Event::InitApply(obj) => Change::Listed(obj.into_state()?),
        Event::InitDone => Change::ListDone,
        Event::Apply(obj) => Change::Applied(obj.into_state()?),
        Event::Delete(obj) => Change::Deleted(key_of(&obj.into_state()?.workload)),
    })
}

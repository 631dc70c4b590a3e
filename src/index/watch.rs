//! Feeds the [`LiveView`] from kube's runtime watcher: one stream per workload kind and
//! namespace in scope (one cluster-wide without `--namespace`), with the `--selector`.
//!
//! The watcher lists, then watches from the list's resourceVersion; it resumes a broken watch
//! from the last version it saw and relists when the server answers `410 Gone`, so a change
//! is never missed, only seen late. Every `--refresh-interval` each stream is re-created,
//! which relists: a safety net against anything a watch could still miss, at one LIST per
//! stream per interval.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use kube::Client;
use kube::api::Api;
use kube::runtime::watcher::{self, Event};
use kube::runtime::{WatchStreamExt, watcher as watch_stream};
use tokio_util::sync::CancellationToken;

use crate::index::live::{Change, LiveView, StreamId, key_of};
use crate::index::workload::{Workload, WorkloadKind};
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
            WorkloadKind::Deployment => tokio::spawn(ctx.run::<Deployment>()),
            WorkloadKind::StatefulSet => tokio::spawn(ctx.run::<StatefulSet>()),
            WorkloadKind::DaemonSet => tokio::spawn(ctx.run::<DaemonSet>()),
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
    fn api<K: Workload>(&self) -> Api<K> {
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

    async fn run<K: Workload>(self) {
        let labels = StreamLabels {
            kind: self.stream.kind.plural(),
        };
        let mut cfg = watcher::Config::default();
        if let Some(sel) = &self.config.selector {
            cfg = cfg.labels(sel);
        }
        let mut failing = false;
        loop {
            let mut events = watch_stream(self.api::<K>(), cfg.clone())
                .default_backoff()
                .boxed();
            let relist = tokio::time::sleep(self.config.relist_interval);
            tokio::pin!(relist);
            loop {
                let event = tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    _ = &mut relist => break,
                    ev = events.next() => ev,
                };
                match event {
                    Some(Ok(event)) => {
                        if failing {
                            tracing::info!(stream = %self.where_(), "watch recovered");
                            failing = false;
                        }
                        self.metrics.watch_events.get_or_create(&labels).inc();
                        if let Some(change) = change_of(event) {
                            let done = matches!(change, Change::ListDone);
                            self.live.apply(&self.stream, change);
                            if done {
                                tracing::info!(
                                    stream = %self.where_(),
                                    workloads = self.live.workload_count(),
                                    synced = self.live.is_synced(),
                                    "watch listed"
                                );
                            }
                        }
                    }
                    Some(Err(e)) => {
                        self.metrics.watch_errors.get_or_create(&labels).inc();
                        // One WARN per outage: the backoff retries every few seconds.
                        if !failing {
                            tracing::warn!(stream = %self.where_(), error = %e, "watch failed; retrying with backoff (the live view keeps its last state)");
                            failing = true;
                        } else {
                            tracing::debug!(stream = %self.where_(), error = %e, "watch still failing");
                        }
                    }
                    None => break,
                }
            }
            tracing::debug!(stream = %self.where_(), "re-creating the watch (periodic relist)");
        }
    }
}

fn change_of<K: Workload>(event: Event<K>) -> Option<Change> {
    Some(match event {
        Event::Init => Change::ListStarted,
        Event::InitApply(obj) => Change::Listed(obj.state()?),
        Event::InitDone => Change::ListDone,
        Event::Apply(obj) => Change::Applied(obj.state()?),
        Event::Delete(obj) => Change::Deleted(key_of(&obj.state()?.workload)),
    })
}

//! [`CacheChain`]: the [`Lookup`] the daemon uses.
//!
//! * Start-up: mount → API (1 GET) → rebuild (LIST pages + 1 write).
//! * Hot path: a hash lookup in memory; zero API calls.
//! * Miss: at most one rebuild per `--min-rebuild-interval`, shared by every concurrent miss
//!   (single flight); refs still unknown afterwards are negatively cached until the next
//!   rebuild. A storm of pushes for images nobody runs costs one LIST sweep.
//! * Freshness: with the watch, lookups go to the live view once it has listed (a miss is
//!   then authoritative: no rebuild), and the view is written back to the ConfigMap every
//!   `--snapshot-interval` when it changed; while it is complete no snapshot index is held
//!   and kubelet swaps of the mount are not read. Without the watch, a rebuild every
//!   `--refresh-interval`, and the mount is reloaded on every kubelet swap.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use kube::Client;
use tokio_util::sync::CancellationToken;

use crate::cluster::ClusterError;
use crate::config::ObjectName;
use crate::index::cache::mount::{self, MountState};
use crate::index::cache::store::{Store, StoreError, Written};
use crate::index::live::LiveView;
use crate::index::lookup::{Hits, Lookup, LookupError, LookupSource, SharedIndex};
use crate::index::scan;
use crate::index::table::{Index, Scope};
use crate::index::workload::WorkloadRef;
use crate::ingest::image::ImageRef;
use crate::ops::metrics::{Metrics, ResultLabels};
use crate::util::lock::lock;

/// Where the index in use came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Origin {
    None = 0,
    Mount = 1,
    Api = 2,
    Rebuild = 3,
    /// A snapshot of the live view.
    Watch = 4,
}

impl Origin {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Origin::Mount,
            2 => Origin::Api,
            3 => Origin::Rebuild,
            4 => Origin::Watch,
            _ => Origin::None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Origin::None => "none",
            Origin::Mount => "mount",
            Origin::Api => "api",
            Origin::Rebuild => "rebuild",
            Origin::Watch => "watch",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    #[error("rebuilding the index: {0}")]
    Scan(#[from] ClusterError),
    #[error("reading the cache ConfigMap: {0}")]
    Store(#[from] StoreError),
}

pub struct ChainConfig {
    pub cache_dir: PathBuf,
    pub configmap: ObjectName,
    pub scope: Scope,
    pub min_rebuild_interval: Duration,
    pub refresh_interval: Duration,
    /// Whether a rebuild is stored in the ConfigMap (in the background). The daemon does;
    /// a read-only `check` does not, so that it has no side effect that depends on how long
    /// the process lives.
    pub store_rebuilds: bool,
}

/// Negative-cache entries kept at most; beyond that, misses rely on the interval check.
const NEGATIVE_CAPACITY: usize = 100_000;

#[derive(Clone)]
pub struct CacheChain {
    inner: Arc<Inner>,
}

struct Inner {
    index: SharedIndex,
    origin: AtomicU8,
    client: Client,
    store: Store,
    config: ChainConfig,
    metrics: Arc<Metrics>,
    /// Held while scanning: concurrent misses wait here instead of scanning again.
    rebuild_lock: tokio::sync::Mutex<()>,
    /// Bumped after every rebuild attempt, so a waiter can tell one finished meanwhile.
    generation: AtomicU64,
    last_rebuild: Mutex<Option<(Instant, bool)>>,
    negative: Mutex<HashSet<String>>,
    /// The mounted files last read, and whether they provided the index.
    mount_seen: Mutex<Option<(mount::Fingerprint, bool)>>,
    /// Serialises ConfigMap writes from this process.
    write_lock: tokio::sync::Mutex<()>,
    /// The watch-fed view, once the daemon has started one.
    live: OnceLock<Arc<LiveView>>,
}

impl CacheChain {
    pub fn new(client: Client, config: ChainConfig, metrics: Arc<Metrics>) -> Self {
        let store = Store::new(client.clone(), config.configmap.clone());
        Self {
            inner: Arc::new(Inner {
                index: SharedIndex::default(),
                origin: AtomicU8::new(Origin::None as u8),
                client,
                store,
                config,
                metrics,
                rebuild_lock: tokio::sync::Mutex::new(()),
                generation: AtomicU64::new(0),
                last_rebuild: Mutex::new(None),
                negative: Mutex::new(HashSet::new()),
                mount_seen: Mutex::new(None),
                write_lock: tokio::sync::Mutex::new(()),
                live: OnceLock::new(),
            }),
        }
    }

    pub fn origin(&self) -> Origin {
        Origin::from_u8(self.inner.origin.load(Ordering::Relaxed))
    }

    pub fn index(&self) -> Arc<Index> {
        self.inner.index.load()
    }

    /// Loads the first index available: mount, then API, then a rebuild.
    pub async fn init(&self) -> Result<Origin, ChainError> {
        if self.reload_mount_off_runtime().await {
            return Ok(Origin::Mount);
        }
        match self.inner.store.read().await {
            Ok(Some(index)) if self.in_scope(&index) => {
                tracing::info!(
                    configmap = %self.inner.config.configmap,
                    images = index.image_count(),
                    "index loaded from the cache ConfigMap"
                );
                self.swap(index, Origin::Api);
                return Ok(Origin::Api);
            }
            Ok(Some(_)) => {
                tracing::info!(configmap = %self.inner.config.configmap, "stored index was built for another scope; rebuilding");
            }
            Ok(None) => {
                tracing::info!(configmap = %self.inner.config.configmap, "no cache ConfigMap; rebuilding");
            }
            Err(StoreError::Codec { source, name }) => {
                self.inner.metrics.index_load_failures.inc();
                tracing::warn!(configmap = %name, error = %source, "stored index unreadable; rebuilding");
            }
            Err(e) => return Err(e.into()),
        }
        self.rebuild("start-up").await?;
        Ok(Origin::Rebuild)
    }

    fn in_scope(&self, index: &Index) -> bool {
        // Hand-written indexes carry no scope: trust them.
        index.scope().is_none_or(|s| *s == self.inner.config.scope)
    }

    fn swap(&self, index: Index, origin: Origin) {
        let generated = index
            .generated_at()
            .and_then(|t| {
                time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
            })
            .map(|t| t.unix_timestamp());
        self.inner
            .metrics
            .set_index(index.image_count(), index.workload_count(), generated);
        self.inner.index.store(index);
        self.inner.origin.store(origin as u8, Ordering::Relaxed);
        crate::util::heap::release_freed_memory();
    }

    /// [`Self::reload_mount`] on a blocking thread: parsing a large index takes tens of
    /// milliseconds that must not stall the runtime (start-up overlaps it with Pub/Sub set-up).
    pub async fn reload_mount_off_runtime(&self) -> bool {
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.reload_mount())
            .await
            .unwrap_or(false)
    }

    /// Re-reads the mount; swaps the index in if it is valid, in scope, not older than the
    /// one in use, and different. Returns whether the mount now provides the index.
    ///
    /// Files whose fingerprint (`..data` target, inode, size, mtime) matches the last read are
    /// not parsed again: kubelet writes every update as new files in a new directory, so an
    /// unchanged fingerprint means unchanged content.
    pub fn reload_mount(&self) -> bool {
        // A complete live view answers every lookup: the mount (most often the snapshot this
        // daemon wrote) is read again when it is needed, after the watch has fallen behind.
        if self.inner.live.get().is_some_and(|l| l.is_synced()) {
            return false;
        }
        let dir = &self.inner.config.cache_dir;
        let fingerprint = mount::fingerprint(dir);
        {
            let last = lock(&self.inner.mount_seen);
            if let Some((seen, provides)) = last.as_ref()
                && fingerprint.as_ref() == Some(seen)
            {
                return *provides;
            }
        }
        let provides = self.load_mount(dir);
        *lock(&self.inner.mount_seen) = fingerprint.map(|f| (f, provides));
        provides
    }

    fn load_mount(&self, dir: &std::path::Path) -> bool {
        match mount::load(dir) {
            MountState::Absent => false,
            MountState::Invalid(reason) => {
                self.inner.metrics.index_load_failures.inc();
                tracing::warn!(%reason, "mounted index is invalid; keeping the index in use");
                false
            }
            MountState::Loaded(index, form) => {
                if !self.in_scope(&index) {
                    tracing::warn!(dir = %dir.display(), "mounted index was built for another scope; ignoring it");
                    return false;
                }
                let current = self.inner.index.load();
                let has_current = self.origin() != Origin::None;
                if has_current && current.same_content(&index) {
                    return true;
                }
                let older = match (index.generated_at(), current.generated_at()) {
                    (Some(new), Some(cur)) => new < cur,
                    _ => false,
                };
                if has_current && older {
                    tracing::debug!("mounted index is older than the one in use; keeping ours");
                    return true;
                }
                tracing::info!(
                    dir = %dir.display(),
                    form = form.as_str(),
                    images = index.image_count(),
                    workloads = index.workload_count(),
                    "index loaded from the mount"
                );
                self.swap(index, Origin::Mount);
                self.clear_negative();
                true
            }
        }
    }

    fn clear_negative(&self) {
        lock(&self.inner.negative).clear();
    }

    /// Scans the cluster, swaps the new index in at once, then writes the ConfigMap.
    pub async fn rebuild(&self, reason: &str) -> Result<(), ChainError> {
        let _guard = self.inner.rebuild_lock.lock().await;
        self.rebuild_locked(reason).await
    }

    async fn rebuild_locked(&self, reason: &str) -> Result<(), ChainError> {
        let started = Instant::now();
        let result = scan::scan(&self.inner.client, &self.inner.config.scope).await;
        let ok = result.is_ok();
        *lock(&self.inner.last_rebuild) = Some((Instant::now(), ok));
        self.inner.generation.fetch_add(1, Ordering::AcqRel);
        self.inner
            .metrics
            .rebuilds
            .get_or_create(&ResultLabels {
                result: if ok { "ok" } else { "error" },
            })
            .inc();
        let index = result?;
        tracing::info!(
            reason,
            images = index.image_count(),
            workloads = index.workload_count(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "index rebuilt from a cluster scan"
        );
        self.swap(index, Origin::Rebuild);
        self.clear_negative();
        if self.inner.config.store_rebuilds {
            let this = self.clone();
            tokio::spawn(async move { this.write_current().await });
        }
        Ok(())
    }

    /// Stores the index in use, read once the write lock is held (so that a write queued
    /// behind another stores the newest index); failures are logged, as the next rebuild
    /// will try again.
    async fn write_current(&self) {
        let _guard = self.inner.write_lock.lock().await;
        let index = self.inner.index.load();
        self.write_locked(&index).await;
    }

    /// Stores `index` (a snapshot of the live view); failures are logged, as the next
    /// snapshot will try again.
    async fn write_index(&self, index: &Index) {
        let _guard = self.inner.write_lock.lock().await;
        self.write_locked(index).await;
    }

    /// The write itself; the caller holds `write_lock`.
    async fn write_locked(&self, index: &Index) {
        match self.inner.store.write(index).await {
            Ok((written, encoded)) => tracing::info!(
                configmap = %self.inner.config.configmap,
                result = ?written,
                form = encoded.form.as_str(),
                bytes = encoded.bytes,
                "cache ConfigMap written"
            ),
            Err(e) => tracing::warn!(error = %e, "writing the cache ConfigMap failed"),
        }
    }

    /// Rebuilds and waits for the ConfigMap write; for `cache rebuild` and `check --rebuild`.
    pub async fn rebuild_and_store(
        &self,
    ) -> Result<(Written, crate::index::cache::codec::Encoded), ChainError> {
        let _guard = self.inner.rebuild_lock.lock().await;
        let index = scan::scan(&self.inner.client, &self.inner.config.scope).await?;
        self.swap(index, Origin::Rebuild);
        let _write = self.inner.write_lock.lock().await;
        let index = self.inner.index.load();
        Ok(self.inner.store.write(&index).await?)
    }

    /// Background work: reload the mount on kubelet swaps; then either write the live view
    /// back every `snapshot_interval` (with a watch) or rebuild every `--refresh-interval`.
    pub fn spawn_background(
        &self,
        live: Option<(Arc<LiveView>, Duration)>,
        shutdown: CancellationToken,
    ) {
        let this = self.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move { this.watch_mount(stop).await });
        let this = self.clone();
        if let Some((live, interval)) = live {
            let _ = self.inner.live.set(live.clone());
            let releaser = (self.clone(), live.clone(), shutdown.clone());
            tokio::spawn(
                async move { releaser.0.release_while_live(releaser.1, releaser.2).await },
            );
            tokio::spawn(async move { this.write_snapshots(live, interval, shutdown).await });
            return;
        }
        tokio::spawn(async move {
            let period = this.inner.config.refresh_interval;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(period) => {}
                }
                if let Err(e) = this.rebuild("periodic refresh").await {
                    tracing::warn!(error = %e, "periodic rebuild failed; keeping the index in use");
                }
            }
        });
    }

    /// Stores the live view as the snapshot, at most every `interval` and only when it
    /// changed: the next start-up (this replica's or another's) then begins from it. Replicas
    /// racing on the ConfigMap converge as for rebuilds (the newer `generatedAt` wins).
    async fn write_snapshots(
        &self,
        live: Arc<LiveView>,
        interval: Duration,
        shutdown: CancellationToken,
    ) {
        let mut written = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
            let changes = live.changes();
            if !live.is_synced() || written == Some(changes) {
                continue;
            }
            let index = live.snapshot(
                self.inner.config.scope.clone(),
                crate::util::clock::now_rfc3339(),
            );
            self.inner
                .metrics
                .set_index(index.image_count(), index.workload_count(), None);
            self.inner
                .origin
                .store(Origin::Watch as u8, Ordering::Relaxed);
            written = Some(changes);
            if self.inner.config.store_rebuilds {
                self.write_index(&index).await;
            }
            // Built for the write only: see `release_while_live`.
            drop(index);
            crate::util::heap::release_freed_memory();
        }
    }

    /// While the live view is complete it answers every lookup, and when it falls behind,
    /// what it last knew comes first: the snapshot index is then not read, and is only the
    /// ConfigMap's content, built from the view when written ([`Self::write_snapshots`]).
    /// So whenever the view becomes complete, the snapshot index in memory is dropped (5.2
    /// MiB at 10,000 workloads), including one a rebuild loaded during a watch outage.
    async fn release_while_live(&self, live: Arc<LiveView>, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = live.wait_until(true) => {}
            }
            if self.inner.index.load().workload_count() > 0 {
                self.inner.index.store(Index::default());
                self.inner
                    .origin
                    .store(Origin::Watch as u8, Ordering::Relaxed);
                crate::util::heap::release_freed_memory();
                tracing::debug!("live view complete: the snapshot index is no longer held");
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = live.wait_until(false) => {}
            }
        }
    }

    async fn watch_mount(&self, shutdown: CancellationToken) {
        let dir = self.inner.config.cache_dir.clone();
        let mut warned = false;
        loop {
            match mount::watch(&dir) {
                Ok((_watcher, mut events)) => {
                    tracing::info!(dir = %dir.display(), "watching the mounted index");
                    // Catch a swap that happened before the watch was in place (unchanged
                    // files are recognised by their fingerprint and not parsed again).
                    self.reload_mount_off_runtime().await;
                    loop {
                        tokio::select! {
                            _ = shutdown.cancelled() => return,
                            ev = events.recv() => match ev {
                                Some(()) => { self.reload_mount_off_runtime().await; }
                                None => break,
                            },
                        }
                    }
                }
                Err(e) => {
                    if !warned {
                        tracing::info!(error = %e, "mounted index directory not watchable yet; retrying every 5 s");
                        warned = true;
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    }

    fn negative_contains(&self, key: &str) -> bool {
        lock(&self.inner.negative).contains(key)
    }

    fn remember_miss(&self, key: &str) {
        let mut set = lock(&self.inner.negative);
        if set.len() < NEGATIVE_CAPACITY {
            set.insert(key.to_string());
        }
    }

    /// `Some(ok)` when the last rebuild is younger than the minimum interval.
    fn recent_rebuild(&self) -> Option<bool> {
        let last = *lock(&self.inner.last_rebuild);
        last.filter(|(at, _)| at.elapsed() < self.inner.config.min_rebuild_interval)
            .map(|(_, ok)| ok)
    }

    fn hits(workloads: Option<Arc<[WorkloadRef]>>, source: LookupSource) -> Hits {
        Hits {
            workloads: workloads.unwrap_or_else(|| Arc::from(Vec::new())),
            source,
        }
    }

    fn failed(image: &ImageRef, message: String) -> LookupError {
        LookupError::Rebuild {
            image: image.to_string(),
            message,
        }
    }
}

impl Lookup for CacheChain {
    async fn lookup(&self, image: &ImageRef) -> Result<Hits, LookupError> {
        // The live view answers once it has listed, a miss included; until then (bounded by
        // `--watch-sync-timeout` from start-up or from a watch failure) this waits for it,
        // then uses what the view last knew, then the snapshot and a rebuild.
        if let Some(live) = self.inner.live.get() {
            if live.wait_synced().await
                && let Some(workloads) = live.lookup(image)
            {
                return Ok(Hits {
                    workloads,
                    source: LookupSource::Watch,
                });
            }
            // The watch is failing or relisting past the wait: what the view last knew is
            // at least as recent as any snapshot written from it. A miss there goes on to
            // the snapshot and the rebuild, which can find what was created meanwhile.
            if let Some(workloads) = live.last_known(image)
                && !workloads.is_empty()
            {
                return Ok(Hits {
                    workloads,
                    source: LookupSource::LastKnown,
                });
            }
        }
        if let Some(w) = self.inner.index.get(image) {
            return Ok(Self::hits(Some(w), LookupSource::Memory));
        }
        let key = image.as_str();
        if self.negative_contains(key) {
            return Ok(Self::hits(None, LookupSource::Memory));
        }
        match self.recent_rebuild() {
            Some(true) => {
                self.remember_miss(key);
                return Ok(Self::hits(None, LookupSource::Memory));
            }
            // The API failed us recently: redeliver later rather than call it again now.
            Some(false) => {
                return Err(Self::failed(
                    image,
                    "the last rebuild failed; retrying after --min-rebuild-interval".into(),
                ));
            }
            None => {}
        }
        let seen = self.inner.generation.load(Ordering::Acquire);
        let _guard = self.inner.rebuild_lock.lock().await;
        if self.inner.generation.load(Ordering::Acquire) == seen && self.recent_rebuild().is_none()
        {
            self.rebuild_locked(&format!("miss for {image}"))
                .await
                .map_err(|e| Self::failed(image, e.to_string()))?;
        } else if self.recent_rebuild() == Some(false) {
            return Err(Self::failed(
                image,
                "the rebuild for a concurrent miss failed".into(),
            ));
        }
        match self.inner.index.get(image) {
            Some(w) => Ok(Self::hits(Some(w), LookupSource::Rebuild)),
            None => {
                self.remember_miss(key);
                Ok(Self::hits(None, LookupSource::Rebuild))
            }
        }
    }
}

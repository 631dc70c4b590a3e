//! The live view: every workload in scope as the watch last reported it, and the image →
//! workloads map built from it incrementally.
//!
//! It is fed by [`watch`](crate::index::watch) and read at two moments: the lookup (which
//! workloads run this tag) and, just before each PATCH, the decision (is it still in scope,
//! enabled, unpaused, and not already restarted for this push). Until every watch stream has
//! finished its first list the view is incomplete, so readers wait for it, with a bound, and
//! fall back to the snapshot index when it is late.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crate::index::table::{Index, Scope};
use crate::index::workload::{WorkloadKind, WorkloadRef, WorkloadState};
use crate::ingest::image::ImageRef;

/// Identifies a workload independently of its state (a [`WorkloadRef`] also carries `paused`).
pub type Key = (WorkloadKind, Arc<str>, Arc<str>);

pub fn key_of(w: &WorkloadRef) -> Key {
    (w.kind, w.namespace.clone(), w.name.clone())
}

/// One watch stream: a kind in one namespace, or in all of them.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StreamId {
    pub kind: WorkloadKind,
    /// `None`: every namespace.
    pub namespace: Option<String>,
}

impl StreamId {
    fn owns(&self, key: &Key) -> bool {
        key.0 == self.kind && self.namespace.as_deref().is_none_or(|ns| *key.1 == *ns)
    }
}

/// A watch event as the view applies it (kube's `watcher::Event`, converted).
#[derive(Debug)]
pub enum Change {
    /// A (re)list starts: what it does not list again is gone once it is done.
    ListStarted,
    Listed(WorkloadState),
    ListDone,
    Applied(WorkloadState),
    Deleted(Key),
}

/// Told about every workload state the view applies and every deletion, before the view
/// applies it: how the rollout tracker follows rollouts without polling. Called on the watch
/// task, so it must not block.
pub trait Observer: Send + Sync {
    fn applied(&self, state: &WorkloadState);
    fn deleted(&self, key: &Key);
}

/// What the view knows about one workload when a decision is taken.
#[derive(Debug, Clone)]
pub enum Current {
    /// The view is complete and has it.
    Live(Arc<WorkloadState>),
    /// The view is complete and does not have it: deleted, or outside the namespaces or
    /// selector the daemon watches.
    Absent,
    /// The view is not complete (first list still running, or the watch is off).
    Unknown,
}

#[derive(Default)]
struct State {
    workloads: HashMap<Key, Arc<WorkloadState>>,
    by_image: HashMap<ImageRef, Holders>,
    /// Streams that have completed at least one list.
    synced: HashSet<StreamId>,
    /// Keys seen by each stream's list in progress.
    listing: HashMap<StreamId, HashSet<Key>>,
}

pub struct LiveView {
    state: RwLock<State>,
    streams: Vec<StreamId>,
    opt_in: bool,
    /// Whether every stream has listed once; readers wait on it.
    synced: tokio::sync::watch::Sender<bool>,
    /// Whether the view has been complete at least once: what it holds is then a whole
    /// picture, if possibly a late one ([`LiveView::last_known`]).
    was_complete: std::sync::atomic::AtomicBool,
    /// Until when readers wait for the view to be complete before they fall back: start-up
    /// plus `--watch-sync-timeout`, and again from the moment a failed stream made it
    /// incomplete (so the first seconds of an outage wait for the relist, later ones do not).
    sync_deadline: std::sync::Mutex<Instant>,
    sync_timeout: Duration,
    /// Bumped by every applied change, so the snapshot writer knows when to write.
    changes: AtomicU64,
    observer: std::sync::OnceLock<Arc<dyn Observer>>,
}

impl LiveView {
    pub fn new(streams: Vec<StreamId>, opt_in: bool, sync_timeout: Duration) -> Self {
        Self {
            state: RwLock::new(State::default()),
            streams,
            opt_in,
            synced: tokio::sync::watch::Sender::new(false),
            was_complete: std::sync::atomic::AtomicBool::new(false),
            sync_deadline: std::sync::Mutex::new(Instant::now() + sync_timeout),
            sync_timeout,
            changes: AtomicU64::new(0),
            observer: std::sync::OnceLock::new(),
        }
    }

    /// Sets the one [`Observer`] told about every change from now on; `false` if one was
    /// set already.
    pub fn set_observer(&self, observer: Arc<dyn Observer>) -> bool {
        self.observer.set(observer).is_ok()
    }

    /// The streams that cover `scope`: one per kind, per namespace (or one cluster-wide).
    pub fn streams_for(scope: &Scope) -> Vec<StreamId> {
        let namespaces: Vec<Option<String>> = if scope.namespaces.is_empty() {
            vec![None]
        } else {
            scope.namespaces.iter().cloned().map(Some).collect()
        };
        WorkloadKind::ALL
            .iter()
            .flat_map(|kind| {
                namespaces.iter().map(|ns| StreamId {
                    kind: *kind,
                    namespace: ns.clone(),
                })
            })
            .collect()
    }

    pub fn streams(&self) -> &[StreamId] {
        &self.streams
    }

    pub fn is_synced(&self) -> bool {
        *self.synced.borrow()
    }

    /// Waits until the view is complete, at most until `--watch-sync-timeout` after start-up
    /// or after the failure that made it incomplete. `false`: the watch is late (or still
    /// failing); the caller falls back to the snapshot.
    pub async fn wait_synced(&self) -> bool {
        if self.is_synced() {
            return true;
        }
        let deadline = *crate::util::lock::lock(&self.sync_deadline);
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            return false;
        };
        let mut rx = self.synced.subscribe();
        matches!(
            tokio::time::timeout(left, rx.wait_for(|s| *s)).await,
            Ok(Ok(_))
        )
    }

    /// Waits, without a bound, until the view is complete (`true`) or no longer is (`false`).
    pub async fn wait_until(&self, complete: bool) {
        let mut rx = self.synced.subscribe();
        // The sender lives as long as `self`: this cannot fail while it is borrowed.
        let _ = rx.wait_for(|s| *s == complete).await;
    }

    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    pub fn workload_count(&self) -> usize {
        self.read().workloads.len()
    }

    pub fn image_count(&self) -> usize {
        self.read().by_image.len()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies one change from `stream`.
    pub fn apply(&self, stream: &StreamId, change: Change) {
        if let Some(o) = self.observer.get() {
            match &change {
                Change::Listed(w) | Change::Applied(w) => o.applied(w),
                Change::Deleted(key) => o.deleted(key),
                Change::ListStarted | Change::ListDone => {}
            }
        }
        let mut st = self.write();
        match change {
            Change::ListStarted => {
                st.listing.insert(stream.clone(), HashSet::new());
            }
            Change::Listed(w) => {
                let key = key_of(&w.workload);
                if let Some(seen) = st.listing.get_mut(stream) {
                    seen.insert(key.clone());
                }
                upsert(&mut st, key, w);
            }
            Change::Applied(w) => upsert(&mut st, key_of(&w.workload), w),
            Change::Deleted(key) => remove(&mut st, &key),
            Change::ListDone => {
                // Whatever this stream owned and did not list again was deleted meanwhile.
                let seen = st.listing.remove(stream).unwrap_or_default();
                let gone: Vec<Key> = st
                    .workloads
                    .keys()
                    .filter(|k| stream.owns(k) && !seen.contains(*k))
                    .cloned()
                    .collect();
                for k in &gone {
                    remove(&mut st, k);
                }
                st.synced.insert(stream.clone());
                if self.streams.iter().all(|s| st.synced.contains(s)) {
                    self.was_complete.store(true, Ordering::Relaxed);
                    self.synced.send_replace(true);
                }
            }
        }
        drop(st);
        self.changes.fetch_add(1, Ordering::Relaxed);
    }

    /// Marks `stream` as not synced until its next list is done (its watch failed, so the view
    /// may lack what changed since): lookups wait for the relist up to `--watch-sync-timeout`
    /// from now, then fall back to the snapshot index. What the stream listed stays, for the
    /// relist to reconcile.
    pub fn degrade(&self, stream: &StreamId) {
        let mut st = self.write();
        st.listing.remove(stream);
        let was_complete = self.is_synced();
        if st.synced.remove(stream) && was_complete {
            self.synced.send_replace(false);
            *crate::util::lock::lock(&self.sync_deadline) = Instant::now() + self.sync_timeout;
        }
    }

    /// The enabled workloads that run `image`, as they are now. `None`: the view is not
    /// complete, so it cannot say.
    pub fn lookup(&self, image: &ImageRef) -> Option<Arc<[WorkloadRef]>> {
        if !self.is_synced() {
            return None;
        }
        Some(self.enabled_holders(&self.read(), image))
    }

    /// What the view last knew of `image`, complete or not: for when the watch has been
    /// failing longer than readers wait. `None`: it has never been complete, so what it
    /// holds is a partial list. It is never older than a snapshot index written from it.
    pub fn last_known(&self, image: &ImageRef) -> Option<Arc<[WorkloadRef]>> {
        if !self.was_complete.load(Ordering::Relaxed) {
            return None;
        }
        Some(self.enabled_holders(&self.read(), image))
    }

    fn enabled_holders(&self, st: &State, image: &ImageRef) -> Arc<[WorkloadRef]> {
        st.by_image
            .get(image)
            .into_iter()
            .flat_map(Holders::keys)
            .filter_map(|k| st.workloads.get(k))
            .filter(|w| w.enabled(self.opt_in))
            .map(|w| w.workload.clone())
            .collect()
    }

    /// The workload's state now, for the decision just before a PATCH.
    pub fn current(&self, workload: &WorkloadRef) -> Current {
        if !self.is_synced() {
            return Current::Unknown;
        }
        match self.read().workloads.get(&key_of(workload)) {
            Some(w) => Current::Live(w.clone()),
            None => Current::Absent,
        }
    }

    /// The view as a snapshot index, for the cache ConfigMap and the next start-up.
    pub fn snapshot(&self, scope: Scope, generated_at: String) -> Index {
        let st = self.read();
        let entries: Vec<(WorkloadRef, Vec<ImageRef>)> = st
            .workloads
            .values()
            .filter(|w| w.enabled(self.opt_in))
            .map(|w| (w.workload.clone(), w.images()))
            .filter(|(_, images)| !images.is_empty())
            .collect();
        drop(st);
        Index::build(entries, scope, generated_at)
    }
}

fn upsert(st: &mut State, key: Key, w: WorkloadState) {
    let images = w.images();
    if let Some(old) = st.workloads.get(&key)
        && old.images() == images
    {
        st.workloads.insert(key, Arc::new(w));
        return;
    }
    remove(st, &key);
    for image in images {
        match st.by_image.entry(image) {
            Entry::Occupied(mut e) => e.get_mut().add(key.clone()),
            Entry::Vacant(e) => {
                e.insert(Holders::One(key.clone()));
            }
        }
    }
    st.workloads.insert(key, Arc::new(w));
}

fn remove(st: &mut State, key: &Key) {
    let Some(old) = st.workloads.remove(key) else {
        return;
    };
    for image in old.images() {
        if let Some(holders) = st.by_image.get_mut(&image)
            && holders.remove(key)
        {
            st.by_image.remove(&image);
        }
    }
}

/// The workloads that run one image. Most images are run by one workload, held inline: no
/// allocation of its own (at 50,000 images a list each was 2.4 MiB, and when they were
/// `Vec`s grown by `push`, 7 MiB).
#[derive(Debug)]
enum Holders {
    One(Key),
    Many(Vec<Key>),
}

impl Holders {
    fn keys(&self) -> &[Key] {
        match self {
            Holders::One(key) => std::slice::from_ref(key),
            Holders::Many(keys) => keys,
        }
    }

    fn add(&mut self, key: Key) {
        match self {
            Holders::One(first) => *self = Holders::Many(vec![first.clone(), key]),
            Holders::Many(keys) => keys.push(key),
        }
    }

    /// Removes `key`; `true` when none is left.
    fn remove(&mut self, key: &Key) -> bool {
        match self {
            Holders::One(k) => k == key,
            Holders::Many(keys) => {
                keys.retain(|k| k != key);
                if keys.len() == 1
                    && let Some(last) = keys.pop()
                {
                    *self = Holders::One(last);
                }
                matches!(self, Holders::Many(keys) if keys.is_empty())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::workload::{ContainerImage, RestartRecord, RolloutStatus};

    fn state(ns: &str, name: &str, images: &[&str]) -> WorkloadState {
        WorkloadState {
            workload: WorkloadRef::new(WorkloadKind::Deployment, ns, name),
            containers: images
                .iter()
                .enumerate()
                .map(|(i, image)| ContainerImage {
                    container: format!("c{i}").into(),
                    init: false,
                    image: ImageRef::parse(image).ok(),
                    pull_policy: None,
                    written: Some((*image).into()),
                })
                .collect(),
            paused: false,
            annotations_enabled: None,
            strategy: None,
            last_restart: RestartRecord::default(),
            resource_version: Some("1".into()),
            uid: None,
            generation: 1,
            status: RolloutStatus::default(),
        }
    }

    fn all_deployments() -> StreamId {
        StreamId {
            kind: WorkloadKind::Deployment,
            namespace: None,
        }
    }

    fn synced_view(initial: Vec<WorkloadState>) -> LiveView {
        let s = all_deployments();
        let view = LiveView::new(vec![s.clone()], false, Duration::from_secs(1));
        view.apply(&s, Change::ListStarted);
        for w in initial {
            view.apply(&s, Change::Listed(w));
        }
        view.apply(&s, Change::ListDone);
        view
    }

    fn names(view: &LiveView, image: &str) -> Vec<String> {
        let mut v: Vec<String> = view
            .lookup(&ImageRef::parse(image).unwrap())
            .unwrap()
            .iter()
            .map(|w| w.name.to_string())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn not_synced_until_every_stream_listed() {
        let a = all_deployments();
        let b = StreamId {
            kind: WorkloadKind::StatefulSet,
            namespace: None,
        };
        let view = LiveView::new(vec![a.clone(), b.clone()], false, Duration::ZERO);
        let image = ImageRef::parse("app:v1").unwrap();
        view.apply(&a, Change::ListStarted);
        view.apply(&a, Change::ListDone);
        assert!(view.lookup(&image).is_none());
        assert!(matches!(
            view.current(&WorkloadRef::new(WorkloadKind::Deployment, "x", "y")),
            Current::Unknown
        ));
        view.apply(&b, Change::ListStarted);
        view.apply(&b, Change::ListDone);
        assert_eq!(view.lookup(&image).unwrap().len(), 0);
    }

    #[test]
    fn a_failed_stream_stops_the_view_answering_until_it_has_listed_again() {
        let view = synced_view(vec![state("prod", "web", &["app:v1"])]);
        let s = all_deployments();
        let image = ImageRef::parse("app:v1").unwrap();
        assert!(view.is_synced());
        view.degrade(&s);
        assert!(!view.is_synced());
        assert!(
            view.lookup(&image).is_none(),
            "a miss must not be authoritative"
        );
        assert!(matches!(
            view.current(&WorkloadRef::new(WorkloadKind::Deployment, "prod", "web")),
            Current::Unknown
        ));
        // The relist finds what changed while the watch was down.
        view.apply(&s, Change::ListStarted);
        view.apply(&s, Change::Listed(state("prod", "web", &["app:v1"])));
        view.apply(&s, Change::Listed(state("prod", "new", &["app:v1"])));
        view.apply(&s, Change::ListDone);
        assert!(view.is_synced());
        assert_eq!(names(&view, "app:v1"), ["new", "web"]);
    }

    #[test]
    fn holders_of_an_image_come_and_go() {
        let key = |n: &str| key_of(&WorkloadRef::new(WorkloadKind::Deployment, "ns", n));
        let mut h = Holders::One(key("a"));
        assert!(!h.remove(&key("b")), "not a holder");
        h.add(key("b"));
        h.add(key("c"));
        assert_eq!(h.keys(), [key("a"), key("b"), key("c")]);
        assert!(!h.remove(&key("a")));
        assert!(!h.remove(&key("c")));
        assert!(
            matches!(&h, Holders::One(k) if *k == key("b")),
            "back inline"
        );
        assert!(h.remove(&key("b")), "none left");
        let mut many = Holders::Many(vec![key("x")]);
        assert!(many.remove(&key("x")));
    }

    #[test]
    fn what_the_view_last_knew_is_there_once_it_has_been_complete() {
        let s = all_deployments();
        let view = LiveView::new(vec![s.clone()], false, Duration::ZERO);
        let image = ImageRef::parse("app:v1").unwrap();
        view.apply(&s, Change::ListStarted);
        view.apply(&s, Change::Listed(state("prod", "web", &["app:v1"])));
        assert!(
            view.last_known(&image).is_none(),
            "a first list still running is a partial picture"
        );
        view.apply(&s, Change::ListDone);
        view.degrade(&s);
        assert!(view.lookup(&image).is_none());
        // Changes still applied while it is behind show, as in the snapshot written next.
        view.apply(&s, Change::Applied(state("prod", "api", &["app:v1"])));
        let mut off = state("prod", "web", &["app:v1"]);
        off.annotations_enabled = Some("false".into());
        view.apply(&s, Change::Applied(off));
        let known: Vec<String> = view
            .last_known(&image)
            .unwrap()
            .iter()
            .map(|w| w.name.to_string())
            .collect();
        assert_eq!(known, ["api"]);
    }

    #[tokio::test]
    async fn after_a_failure_readers_wait_for_the_relist_with_a_bound() {
        let view = Arc::new(synced_view(vec![state("prod", "web", &["app:v1"])]));
        let s = all_deployments();
        view.degrade(&s);
        let relister = (view.clone(), s.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            relister.0.apply(&relister.1, Change::ListStarted);
            relister.0.apply(&relister.1, Change::ListDone);
        });
        assert!(view.wait_synced().await, "the relist is waited for");
        // A relist that does not come within --watch-sync-timeout (1 s here): fall back.
        view.degrade(&s);
        let started = Instant::now();
        assert!(!view.wait_synced().await);
        assert!(started.elapsed() >= Duration::from_millis(900));
        assert!(!view.wait_synced().await, "past the bound, no more waiting");
        assert!(started.elapsed() < Duration::from_millis(1500));
    }

    #[test]
    fn changes_apply_incrementally() {
        let view = synced_view(vec![
            state("prod", "web", &["app:v1", "sidecar:1"]),
            state("prod", "api", &["app:v1"]),
        ]);
        assert_eq!(names(&view, "app:v1"), ["api", "web"]);
        let s = all_deployments();
        // An image change moves the workload from one key to the other.
        view.apply(&s, Change::Applied(state("prod", "web", &["app:v2"])));
        assert_eq!(names(&view, "app:v1"), ["api"]);
        assert_eq!(names(&view, "app:v2"), ["web"]);
        assert!(names(&view, "sidecar:1").is_empty());
        // A new workload is found at once.
        view.apply(&s, Change::Applied(state("dev", "new", &["app:v1"])));
        assert_eq!(names(&view, "app:v1"), ["api", "new"]);
        // An opt-out drops it from lookups but it stays known (it may opt in again).
        let mut off = state("prod", "api", &["app:v1"]);
        off.annotations_enabled = Some("false".into());
        view.apply(&s, Change::Applied(off));
        assert_eq!(names(&view, "app:v1"), ["new"]);
        assert!(matches!(
            view.current(&WorkloadRef::new(WorkloadKind::Deployment, "prod", "api")),
            Current::Live(_)
        ));
        view.apply(
            &s,
            Change::Deleted(key_of(&WorkloadRef::new(
                WorkloadKind::Deployment,
                "dev",
                "new",
            ))),
        );
        assert!(names(&view, "app:v1").is_empty());
        // sidecar:1 is gone with its last workload; app:v1 stays for the opted-out api.
        assert_eq!(view.image_count(), 2, "empty keys are dropped");
    }

    #[test]
    fn a_relist_removes_what_it_no_longer_lists() {
        let view = synced_view(vec![
            state("prod", "web", &["app:v1"]),
            state("prod", "gone", &["app:v1"]),
        ]);
        let s = all_deployments();
        view.apply(&s, Change::ListStarted);
        view.apply(&s, Change::Listed(state("prod", "web", &["app:v1"])));
        // Until the relist is done the old state keeps serving.
        assert_eq!(names(&view, "app:v1"), ["gone", "web"]);
        view.apply(&s, Change::ListDone);
        assert_eq!(names(&view, "app:v1"), ["web"]);
        assert!(matches!(
            view.current(&WorkloadRef::new(WorkloadKind::Deployment, "prod", "gone")),
            Current::Absent
        ));
    }

    #[test]
    fn a_relist_of_one_namespace_leaves_the_others() {
        let a = StreamId {
            kind: WorkloadKind::Deployment,
            namespace: Some("a".into()),
        };
        let b = StreamId {
            kind: WorkloadKind::Deployment,
            namespace: Some("b".into()),
        };
        let view = LiveView::new(vec![a.clone(), b.clone()], false, Duration::ZERO);
        for (s, ns) in [(&a, "a"), (&b, "b")] {
            view.apply(s, Change::ListStarted);
            view.apply(s, Change::Listed(state(ns, "web", &["app:v1"])));
            view.apply(s, Change::ListDone);
        }
        view.apply(&a, Change::ListStarted);
        view.apply(&a, Change::ListDone);
        let got: Vec<String> = view
            .lookup(&ImageRef::parse("app:v1").unwrap())
            .unwrap()
            .iter()
            .map(|w| w.namespace.to_string())
            .collect();
        assert_eq!(got, ["b"]);
    }

    #[test]
    fn snapshot_holds_the_enabled_workloads() {
        let mut off = state("prod", "off", &["app:v1"]);
        off.annotations_enabled = Some("false".into());
        let view = synced_view(vec![state("prod", "web", &["app:v1"]), off]);
        let index = view.snapshot(Scope::default(), "2026-12-03T00:00:00Z".into());
        let hits = index.get(&ImageRef::parse("app:v1").unwrap()).unwrap();
        assert_eq!(hits.len(), 1);
        assert_eq!(&*hits[0].name, "web");
    }
}

//! The live view: every workload in scope as the watch last reported it, and the image →
//! workloads map built from it incrementally.
//!
//! It is fed by [`watch`](crate::index::watch) and read at two moments: the lookup (which
//! workloads run this tag) and, just before each PATCH, the decision (is it still in scope,
//! enabled, unpaused, and not already restarted for this push). Until every watch stream has
//! finished its first list the view is incomplete, so readers wait for it, with a bound, and
//! fall back to the snapshot index when it is late.

use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use hashbrown::{DefaultHashBuilder, HashTable};

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

/// The view's tables, laid out for memory: at 100,000 workloads of five images each, a
/// `HashMap<ImageRef, _>` of inline keys and holders took 68 MiB for its 1M slots alone.
/// Here a slot is a pointer and an index, and the strings live once, in the workload's
/// packed containers ([`Containers`](crate::index::containers::Containers)).
#[derive(Default)]
struct State {
    /// Every workload, found by the hash of its [`Key`].
    workloads: HashTable<Arc<WorkloadState>>,
    /// Image → the workloads that run it, found by the hash of the image key.
    by_image: HashTable<Holders>,
    hasher: DefaultHashBuilder,
    /// One shared string per namespace, rather than one per workload.
    namespaces: HashSet<Arc<str>>,
    /// Streams that have completed at least one list.
    synced: HashSet<StreamId>,
    /// Keys seen by each stream's list in progress.
    listing: HashMap<StreamId, HashSet<Key>>,
}

fn key_hash(hasher: &DefaultHashBuilder, kind: WorkloadKind, namespace: &str, name: &str) -> u64 {
    hasher.hash_one((kind, namespace, name))
}

fn is(w: &WorkloadState, kind: WorkloadKind, namespace: &str, name: &str) -> bool {
    w.workload.kind == kind && *w.workload.namespace == *namespace && *w.workload.name == *name
}

impl State {
    fn get(&self, kind: WorkloadKind, namespace: &str, name: &str) -> Option<&Arc<WorkloadState>> {
        let hash = key_hash(&self.hasher, kind, namespace, name);
        self.workloads.find(hash, |w| is(w, kind, namespace, name))
    }

    fn holders(&self, image: &str) -> Option<&Holders> {
        self.by_image
            .find(self.hasher.hash_one(image), |h| h.image() == image)
    }

    /// The namespace's shared string.
    fn intern(&mut self, namespace: &Arc<str>) -> Arc<str> {
        match self.namespaces.get(namespace) {
            Some(shared) => shared.clone(),
            None => {
                self.namespaces.insert(namespace.clone());
                namespace.clone()
            }
        }
    }
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
                    .iter()
                    .map(|w| key_of(&w.workload))
                    .filter(|k| stream.owns(k) && !seen.contains(k))
                    .collect();
                for k in &gone {
                    remove(&mut st, k);
                }
                drop(gone);
                // Namespaces no workload is in any more.
                st.namespaces.retain(|ns| Arc::strong_count(ns) > 1);
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
        st.holders(image.as_str())
            .map(Holders::states)
            .unwrap_or_default()
            .iter()
            .filter(|w| w.enabled(self.opt_in))
            .map(|w| w.workload.clone())
            .collect()
    }

    /// The workload's state now, for the decision just before a PATCH.
    pub fn current(&self, workload: &WorkloadRef) -> Current {
        if !self.is_synced() {
            return Current::Unknown;
        }
        match self
            .read()
            .get(workload.kind, &workload.namespace, &workload.name)
        {
            Some(w) => Current::Live(w.clone()),
            None => Current::Absent,
        }
    }

    /// The view as a snapshot index, for the cache ConfigMap and the next start-up.
    pub fn snapshot(&self, scope: Scope, generated_at: String) -> Index {
        // The states are taken under the lock (a pointer each) and the index is built after
        // it, so the watch is not held up: at 100,000 workloads the build takes a while.
        let states: Vec<Arc<WorkloadState>> = self
            .read()
            .workloads
            .iter()
            .filter(|w| w.enabled(self.opt_in))
            .cloned()
            .collect();
        let entries = states
            .iter()
            .map(|w| (w.workload.clone(), w.images()))
            .filter(|(_, images)| !images.is_empty());
        Index::build(entries, scope, generated_at)
    }
}

/// Replaces what the view holds of `key` with `w`. Every image slot points at the state it
/// came from, so they are all rewritten, even when the images did not change: five hash
/// lookups, against a stale state served to the next lookup.
fn upsert(st: &mut State, key: Key, mut w: WorkloadState) {
    remove(st, &key);
    w.workload.namespace = st.intern(&w.workload.namespace);
    let w = Arc::new(w);
    let State {
        workloads,
        by_image,
        hasher,
        ..
    } = st;
    for (i, image) in w.images_by_container() {
        let hash = hasher.hash_one(image);
        match by_image.find_mut(hash, |h| h.image() == image) {
            Some(holders) => holders.add(w.clone()),
            None => {
                let one = Holders::One {
                    state: w.clone(),
                    container: i as u32,
                };
                by_image.insert_unique(hash, one, |h| hasher.hash_one(h.image()));
            }
        }
    }
    let hash = key_hash(hasher, key.0, &key.1, &key.2);
    workloads.insert_unique(hash, w.clone(), |w| {
        key_hash(
            hasher,
            w.workload.kind,
            &w.workload.namespace,
            &w.workload.name,
        )
    });
}

fn remove(st: &mut State, key: &Key) {
    let State {
        workloads,
        by_image,
        hasher,
        ..
    } = st;
    let hash = key_hash(hasher, key.0, &key.1, &key.2);
    let Ok(found) = workloads.find_entry(hash, |w| is(w, key.0, &key.1, &key.2)) else {
        return;
    };
    let (old, _) = found.remove();
    for image in old.images() {
        if let Ok(mut entry) = by_image.find_entry(hasher.hash_one(image), |h| h.image() == image)
            && entry.get_mut().remove(key)
        {
            entry.remove();
        }
    }
}

/// The workloads that run one image, each as its state. Most images are run by one workload:
/// that is held inline, and the image key is read from its container, not stored again.
enum Holders {
    One {
        state: Arc<WorkloadState>,
        /// The first of its containers that runs the image.
        container: u32,
    },
    Many(Box<Many>),
}

struct Many {
    image: Box<str>,
    states: Vec<Arc<WorkloadState>>,
}

impl Holders {
    fn image(&self) -> &str {
        match self {
            Holders::One { state, container } => state
                .containers
                .get(*container as usize)
                .and_then(|c| c.image)
                .unwrap_or_default(),
            Holders::Many(many) => &many.image,
        }
    }

    fn states(&self) -> &[Arc<WorkloadState>] {
        match self {
            Holders::One { state, .. } => std::slice::from_ref(state),
            Holders::Many(many) => &many.states,
        }
    }

    fn add(&mut self, state: Arc<WorkloadState>) {
        if let Holders::Many(many) = self {
            many.states.push(state);
            return;
        }
        let image: Box<str> = self.image().into();
        let states = vec![self.states()[0].clone(), state];
        *self = Holders::Many(Box::new(Many { image, states }));
    }

    /// Removes `key`'s state; `true` when none is left.
    fn remove(&mut self, key: &Key) -> bool {
        let held = |w: &WorkloadState| is(w, key.0, &key.1, &key.2);
        match self {
            Holders::One { state, .. } => held(state),
            Holders::Many(many) => {
                many.states.retain(|w| !held(w));
                if many.states.len() == 1
                    && let Some(last) = many.states.pop()
                {
                    let image = &*many.image;
                    let container = last.containers.iter().position(|c| c.image == Some(image));
                    *self = Holders::One {
                        container: container.unwrap_or_default() as u32,
                        state: last,
                    };
                }
                matches!(self, Holders::Many(many) if many.states.is_empty())
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
        let held = |n: &str| Arc::new(state("ns", n, &["sidecar:1", "app:v1"]));
        let key = |n: &str| key_of(&WorkloadRef::new(WorkloadKind::Deployment, "ns", n));
        let names = |h: &Holders| -> Vec<String> {
            h.states()
                .iter()
                .map(|w| w.workload.name.to_string())
                .collect()
        };
        let mut h = Holders::One {
            state: held("a"),
            container: 1,
        };
        assert_eq!(
            h.image(),
            "docker.io/library/app:v1",
            "read from the container"
        );
        assert!(!h.remove(&key("b")), "not a holder");
        h.add(held("b"));
        h.add(held("c"));
        assert_eq!(names(&h), ["a", "b", "c"]);
        assert_eq!(h.image(), "docker.io/library/app:v1");
        assert!(!h.remove(&key("a")));
        assert!(!h.remove(&key("c")));
        assert!(
            matches!(&h, Holders::One { state, container: 1 } if &*state.workload.name == "b"),
            "back inline, on the container that runs it"
        );
        assert_eq!(h.image(), "docker.io/library/app:v1");
        assert!(h.remove(&key("b")), "none left");
        let mut many = Holders::Many(Box::new(Many {
            image: "x".into(),
            states: vec![held("x")],
        }));
        assert!(many.remove(&key("x")));
    }

    #[test]
    fn an_unchanged_image_serves_the_newest_state() {
        let view = synced_view(vec![state("prod", "web", &["app:v1"])]);
        let mut off = state("prod", "web", &["app:v1"]);
        off.annotations_enabled = Some("false".into());
        view.apply(&all_deployments(), Change::Applied(off));
        assert!(names(&view, "app:v1").is_empty(), "the opt-out is seen");
        view.apply(
            &all_deployments(),
            Change::Applied(state("prod", "web", &["app:v1", "app:v1"])),
        );
        assert_eq!(names(&view, "app:v1"), ["web"], "one entry per image");
        assert_eq!(view.image_count(), 1);
    }

    #[test]
    fn namespaces_are_shared_and_let_go() {
        let view = synced_view(vec![
            state("prod", "web", &["app:v1"]),
            state("prod", "api", &["app:v2"]),
        ]);
        let current = |name: &str| match view.current(&WorkloadRef::new(
            WorkloadKind::Deployment,
            "prod",
            name,
        )) {
            Current::Live(w) => w,
            other => panic!("{other:?}"),
        };
        assert!(Arc::ptr_eq(
            &current("web").workload.namespace,
            &current("api").workload.namespace
        ));
        let s = all_deployments();
        view.apply(&s, Change::ListStarted);
        view.apply(&s, Change::ListDone);
        assert!(
            view.read().namespaces.is_empty(),
            "no workload left in prod"
        );
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

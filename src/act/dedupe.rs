//! Small bounded, time-limited maps: which (workload, digest) pairs were already restarted,
//! and how often a message id has been delivered when Pub/Sub does not tell us; plus
//! [`InFlight`], which keeps two copies of the same work from running at the same time.
//!
//! Bounded by count as well as time so a flood of distinct ids cannot grow memory without
//! limit; the oldest entries go first.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::util::lock::lock;

pub struct BoundedTtlMap<K, V> {
    ttl: Duration,
    capacity: usize,
    inner: Mutex<Inner<K, V>>,
}

struct Inner<K, V> {
    map: HashMap<K, (V, Instant)>,
    order: VecDeque<(K, Instant)>,
}

impl<K: Eq + Hash + Clone, V: Clone> BoundedTtlMap<K, V> {
    pub fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            ttl,
            capacity: capacity.max(1),
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                order: VecDeque::new(),
            }),
        }
    }

    pub fn get(&self, key: &K) -> Option<V> {
        let now = Instant::now();
        let inner = self.lock();
        inner
            .map
            .get(key)
            .filter(|(_, at)| now.duration_since(*at) < self.ttl)
            .map(|(v, _)| v.clone())
    }

    pub fn contains(&self, key: &K) -> bool {
        self.get(key).is_some()
    }

    /// Inserts or replaces; the entry's lifetime starts now.
    pub fn insert(&self, key: K, value: V) {
        let now = Instant::now();
        let mut inner = self.lock();
        self.evict(&mut inner, now);
        inner.map.insert(key.clone(), (value, now));
        inner.order.push_back((key, now));
    }

    /// Applies `f` to the current value (or `None`) and stores the result, atomically.
    pub fn update(&self, key: K, f: impl FnOnce(Option<V>) -> V) -> V {
        let now = Instant::now();
        let mut inner = self.lock();
        self.evict(&mut inner, now);
        let current = inner
            .map
            .get(&key)
            .filter(|(_, at)| now.duration_since(*at) < self.ttl)
            .map(|(v, _)| v.clone());
        let first_seen = inner
            .map
            .get(&key)
            .map(|(_, at)| *at)
            .filter(|at| now.duration_since(*at) < self.ttl);
        let value = f(current);
        match first_seen {
            Some(at) => {
                inner.map.insert(key, (value.clone(), at));
            }
            None => {
                inner.map.insert(key.clone(), (value.clone(), now));
                inner.order.push_back((key, now));
            }
        }
        value
    }

    pub fn remove(&self, key: &K) {
        self.lock().map.remove(key);
    }

    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn evict(&self, inner: &mut Inner<K, V>, now: Instant) {
        while let Some((key, at)) = inner.order.front() {
            let expired = now.duration_since(*at) >= self.ttl;
            if !expired && inner.map.len() < self.capacity {
                break;
            }
            // Only drop the map entry if it is the one this queue slot was created for.
            if inner.map.get(key).is_some_and(|(_, t)| t == at) {
                inner.map.remove(key);
            }
            inner.order.pop_front();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<K, V>> {
        lock(&self.inner)
    }
}

/// Keys being worked on right now.
///
/// A "done" map alone is check-then-act: duplicates of one event delivered a few
/// milliseconds apart (a publisher retry, a redelivery racing a slow ack) all find the key
/// absent and all restart the workload. [`InFlight::claim`] makes the check atomic: a second
/// claimant waits until the first one's [`Claim`] is dropped, then looks at the done map,
/// which by then says whether the first one succeeded.
///
/// Entries exist only while claimed, so the map is bounded by the work in flight.
pub struct InFlight<K> {
    claims: Mutex<HashMap<K, Arc<Notify>>>,
}

/// Held while working on a key; dropping it (also by cancellation) wakes the waiters.
pub struct Claim<'a, K: Eq + Hash> {
    owner: &'a InFlight<K>,
    key: K,
}

impl<K: Eq + Hash + Clone> Default for InFlight<K> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: Eq + Hash + Clone> InFlight<K> {
    pub fn new() -> Self {
        Self {
            claims: Mutex::new(HashMap::new()),
        }
    }

    /// Waits until nobody else holds `key`, then holds it.
    pub async fn claim(&self, key: K) -> Claim<'_, K> {
        loop {
            let released = {
                let mut claims = lock(&self.claims);
                match claims.get(&key) {
                    None => {
                        claims.insert(key.clone(), Arc::new(Notify::new()));
                        return Claim { owner: self, key };
                    }
                    Some(notify) => {
                        // Registered while the map is locked, so the holder's release
                        // (which also locks the map) cannot slip in between and be missed.
                        let mut released = Box::pin(notify.clone().notified_owned());
                        released.as_mut().enable();
                        released
                    }
                }
            };
            released.await;
        }
    }

    /// Number of keys claimed now.
    pub fn len(&self) -> usize {
        lock(&self.claims).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl<K: Eq + Hash> Drop for Claim<'_, K> {
    fn drop(&mut self) {
        if let Some(notify) = lock(&self.owner.claims).remove(&self.key) {
            notify.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expires_and_bounds() {
        let m = BoundedTtlMap::new(Duration::from_millis(50), 3);
        m.insert("a", 1);
        assert_eq!(m.get(&"a"), Some(1));
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(m.get(&"a"), None);
        for (i, k) in ["b", "c", "d", "e"].into_iter().enumerate() {
            m.insert(k, i);
        }
        assert!(m.len() <= 3);
        assert!(!m.contains(&"b"), "oldest evicted first");
        assert!(m.contains(&"e"));
    }

    #[test]
    fn update_counts() {
        let m = BoundedTtlMap::new(Duration::from_secs(60), 10);
        for want in 1..=4u32 {
            assert_eq!(m.update("id", |c| c.unwrap_or(0) + 1), want);
        }
        m.remove(&"id");
        assert_eq!(m.update("id", |c| c.unwrap_or(0) + 1), 1);
    }

    #[tokio::test]
    async fn claims_serialise_the_same_key_only() {
        let inflight = Arc::new(InFlight::new());
        let first = inflight.claim("k").await;
        // Another key is independent.
        drop(inflight.claim("other").await);

        let waiter = {
            let inflight = inflight.clone();
            tokio::spawn(async move {
                let _claim = inflight.claim("k").await;
            })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiter.is_finished(), "second claim waits for the first");
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("released claim wakes the waiter")
            .expect("waiter task");
        assert!(inflight.is_empty());
    }

    #[tokio::test]
    async fn cancelled_waiter_leaves_nothing_behind() {
        let inflight = InFlight::new();
        let first = inflight.claim(1u32).await;
        let waited = tokio::time::timeout(Duration::from_millis(20), inflight.claim(1)).await;
        assert!(waited.is_err());
        drop(first);
        assert!(inflight.is_empty());
        drop(inflight.claim(1).await);
        assert!(inflight.is_empty());
    }
}

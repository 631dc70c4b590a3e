//! Small bounded, time-limited maps: which (workload, digest) pairs were already restarted,
//! and how often a message id has been delivered when Pub/Sub does not tell us.
//!
//! Bounded by count as well as time so a flood of distinct ids cannot grow memory without
//! limit; the oldest entries go first.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
        // A panic while holding this lock cannot leave the map inconsistent in a way that
        // matters (worst case: one entry too many), so recover rather than propagate.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
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
}

//! What `/readyz` and `/healthz` report: readiness from the stream and the index, liveness
//! from the message loop's heartbeat.
//!
//! A liveness probe that always answers "ok" only proves that the HTTP server's task runs.
//! The work happens in the message loop (`source::run`): if a blocking call or a deadlock
//! wedges it, or starves the runtime's workers, the HTTP server can go on answering while no
//! message is ever taken again. So the loop beats from every point where it waits, and
//! `/healthz` fails once the last beat is older than `--liveness-timeout`; the kubelet then
//! restarts the pod and Pub/Sub redelivers what it held.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The default `--liveness-timeout`: well above the longest the loop can legitimately go
/// without being polled (it beats from every wait, including reconnect back-offs, which are
/// capped at 30 s), and short enough that a wedged pod is replaced within about a minute.
pub const DEFAULT_LIVENESS_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug)]
pub struct Health {
    pub stream_connected: AtomicBool,
    pub index_loaded: AtomicBool,
    started: Instant,
    /// Milliseconds after `started` of the message loop's last beat; 0 before the first,
    /// while the daemon is still starting (the startup probe covers that phase).
    last_beat_ms: AtomicU64,
    liveness_timeout: Duration,
}

/// The answer of `/healthz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// The message loop has not started yet (index load, Pub/Sub clients).
    Starting,
    /// The loop beat `since` ago.
    Alive { since: Duration },
    /// The loop's last beat is older than the liveness timeout.
    Wedged { since: Duration },
}

impl Default for Health {
    fn default() -> Self {
        Health::new(DEFAULT_LIVENESS_TIMEOUT)
    }
}

impl Health {
    pub fn new(liveness_timeout: Duration) -> Health {
        Health {
            stream_connected: AtomicBool::new(false),
            index_loaded: AtomicBool::new(false),
            started: Instant::now(),
            last_beat_ms: AtomicU64::new(0),
            liveness_timeout,
        }
    }

    pub fn ready(&self) -> bool {
        self.stream_connected.load(Ordering::Relaxed) && self.index_loaded.load(Ordering::Relaxed)
    }

    /// How often the message loop beats: a few beats per timeout, so one late tick under
    /// load never fails the probe.
    pub fn beat_interval(&self) -> Duration {
        (self.liveness_timeout / 6).max(Duration::from_millis(50))
    }

    /// Called by the message loop whenever it is polled while waiting.
    pub fn beat(&self) {
        self.beat_at(Instant::now());
    }

    pub fn liveness(&self) -> Liveness {
        self.liveness_at(Instant::now())
    }

    fn beat_at(&self, now: Instant) {
        // At least 1, so that a beat in the first millisecond is not read as "never".
        let ms = now
            .saturating_duration_since(self.started)
            .as_millis()
            .max(1);
        self.last_beat_ms
            .store(u64::try_from(ms).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    fn liveness_at(&self, now: Instant) -> Liveness {
        let beat = self.last_beat_ms.load(Ordering::Relaxed);
        if beat == 0 {
            return Liveness::Starting;
        }
        let since = now
            .saturating_duration_since(self.started)
            .saturating_sub(Duration::from_millis(beat));
        if since > self.liveness_timeout {
            Liveness::Wedged { since }
        } else {
            Liveness::Alive { since }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starting_until_the_first_beat_then_alive() {
        let h = Health::new(Duration::from_secs(60));
        assert_eq!(h.liveness(), Liveness::Starting);
        h.beat();
        assert!(matches!(h.liveness(), Liveness::Alive { .. }));
    }

    #[test]
    fn wedged_once_the_last_beat_is_older_than_the_timeout() {
        let h = Health::new(Duration::from_secs(60));
        let t0 = h.started + Duration::from_secs(5);
        h.beat_at(t0);
        assert_eq!(
            h.liveness_at(t0 + Duration::from_secs(60)),
            Liveness::Alive {
                since: Duration::from_secs(60)
            }
        );
        assert_eq!(
            h.liveness_at(t0 + Duration::from_secs(61)),
            Liveness::Wedged {
                since: Duration::from_secs(61)
            }
        );
        // A beat brings it back: the probe reports the loop, it does not latch.
        h.beat_at(t0 + Duration::from_secs(62));
        assert!(matches!(
            h.liveness_at(t0 + Duration::from_secs(63)),
            Liveness::Alive { .. }
        ));
    }

    #[test]
    fn several_beats_per_timeout() {
        assert_eq!(
            Health::new(Duration::from_secs(60)).beat_interval(),
            Duration::from_secs(10)
        );
        assert_eq!(
            Health::new(Duration::from_millis(60)).beat_interval(),
            Duration::from_millis(50)
        );
    }

    #[test]
    fn readiness_needs_the_stream_and_the_index() {
        let h = Health::default();
        assert!(!h.ready());
        h.stream_connected.store(true, Ordering::Relaxed);
        assert!(!h.ready());
        h.index_loaded.store(true, Ordering::Relaxed);
        assert!(h.ready());
    }
}

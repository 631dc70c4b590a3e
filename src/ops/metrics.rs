//! Prometheus metrics (OpenMetrics text), all prefixed `gar_restarter_`.

use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabels {
    pub action: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RestartLabels {
    pub kind: &'static str,
    pub namespace: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KubeEventLabels {
    /// The Event's reason: Restarted, PinnedDigest, StaleImageRisk.
    pub reason: &'static str,
    /// emitted, failed (the API refused or did not answer), dropped (queue full).
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StreamLabels {
    /// The resource watched: deployments, statefulsets or daemonsets.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RolloutLabels {
    pub kind: &'static str,
    /// succeeded, failed or timed_out.
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiLabels {
    pub verb: String,
    pub resource: String,
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BuildLabels {
    pub version: &'static str,
    pub git_sha: &'static str,
}

/// The commit, when the build sets `GAR_RESTARTER_GIT_SHA` (the Dockerfile and CI can pass
/// `git rev-parse HEAD`); `unknown` otherwise.
pub const GIT_SHA: &str = match option_env!("GAR_RESTARTER_GIT_SHA") {
    Some(sha) => sha,
    None => "unknown",
};

/// Label values known in advance: their series exist at 0 from start-up, so that a rate or
/// an alert on, say, `dead_letters_total{kind="exhausted"}` has a series before the first
/// event rather than appearing out of nothing.
const ACTIONS: [&str; 4] = ["insert", "insert_digest_only", "delete", "malformed"];
const SETTLED: [&str; 3] = ["ack", "nack", "dead_letter"];
const DEAD_LETTER_KINDS: [&str; 3] = ["malformed", "permanent", "exhausted"];
const REBUILD_RESULTS: [&str; 2] = ["ok", "error"];
const ROLLOUT_RESULTS: [&str; 3] = ["succeeded", "failed", "timed_out"];
const ROLLOUT_DROPS: [&str; 4] = ["superseded", "deleted", "untrackable", "capacity"];

fn histogram_seconds() -> Histogram {
    // 50 µs … ~27 min: covers a memory lookup and a full cluster rebuild alike.
    Histogram::new(exponential_buckets(0.000_05, 2.5, 16))
}

pub struct Metrics {
    registry: Registry,
    pub events_received: Family<ActionLabels, Counter>,
    pub events_settled: Family<OutcomeLabels, Counter>,
    pub restarts: Family<RestartLabels, Counter>,
    pub dead_letters: Family<KindLabels, Counter>,
    pub lookup_seconds: Family<SourceLabels, Histogram, fn() -> Histogram>,
    pub push_to_restart_seconds: Histogram,
    pub receive_to_restart_seconds: Histogram,
    pub receive_to_patch_seconds: Histogram,
    pub index_images: Gauge,
    pub index_workloads: Gauge,
    index_age_seconds: Gauge<f64, std::sync::atomic::AtomicU64>,
    index_loaded_unix: AtomicI64,
    pub index_load_failures: Counter,
    pub rebuilds: Family<ResultLabels, Counter>,
    pub api_requests: Family<ApiLabels, Counter>,
    pub stream_reconnects: Counter,
    pub in_flight: Gauge,
    /// 1 once a message arrived without `delivery_attempt` (no dead-letter policy on the
    /// subscription): attempts are then counted per process and forgotten on restart.
    pub attempts_counted_per_process: Gauge,
    pub build_info: Family<BuildLabels, Gauge>,
    pub watch_events: Family<StreamLabels, Counter>,
    pub watch_errors: Family<StreamLabels, Counter>,
    /// 1 once every watch stream has listed: lookups and decisions use the live view.
    pub watch_synced: Gauge,
    /// The allocator's view of the heap, read at each scrape: what explains the RSS.
    pub heap_in_use: Gauge,
    pub heap_free: Gauge,
    pub rollouts: Family<RolloutLabels, Counter>,
    pub push_to_rollout_seconds: Histogram,
    pub rollouts_dropped: Family<ReasonLabels, Counter>,
    pub rollouts_tracked: Gauge,
    pub notifications: Family<ResultLabels, Counter>,
    /// Restarts (strategy `restart`) of a workload with a container whose effective pull
    /// policy is IfNotPresent or Never, by workload kind.
    pub stale_image_risk: Family<KindLabels, Counter>,
    pub kubernetes_events: Family<KubeEventLabels, Counter>,
    /// Time to write one Kubernetes Event (off the hot path).
    pub kubernetes_event_seconds: Histogram,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("gar_restarter");
        let m = Self {
            events_received: Family::default(),
            events_settled: Family::default(),
            restarts: Family::default(),
            dead_letters: Family::default(),
            lookup_seconds: Family::new_with_constructor(histogram_seconds),
            push_to_restart_seconds: histogram_seconds(),
            // Fine buckets: this is the daemon's own share of the latency, in the ms range.
            receive_to_restart_seconds: Histogram::new(exponential_buckets(0.000_1, 1.25, 40)),
            // Finer still: parse, lookup and building the PATCH take microseconds.
            receive_to_patch_seconds: Histogram::new(exponential_buckets(0.000_01, 1.25, 50)),
            index_images: Gauge::default(),
            index_workloads: Gauge::default(),
            index_age_seconds: Gauge::default(),
            index_loaded_unix: AtomicI64::new(0),
            index_load_failures: Counter::default(),
            rebuilds: Family::default(),
            api_requests: Family::default(),
            stream_reconnects: Counter::default(),
            in_flight: Gauge::default(),
            attempts_counted_per_process: Gauge::default(),
            build_info: Family::default(),
            watch_events: Family::default(),
            watch_errors: Family::default(),
            watch_synced: Gauge::default(),
            heap_in_use: Gauge::default(),
            heap_free: Gauge::default(),
            rollouts: Family::default(),
            // 0.5 s … ~2.6 h: a rollout takes seconds to the progress deadline and beyond.
            push_to_rollout_seconds: Histogram::new(exponential_buckets(0.5, 1.8, 16)),
            rollouts_dropped: Family::default(),
            rollouts_tracked: Gauge::default(),
            notifications: Family::default(),
            stale_image_risk: Family::default(),
            kubernetes_events: Family::default(),
            kubernetes_event_seconds: Histogram::new(exponential_buckets(0.000_1, 2.0, 18)),
            registry: Registry::default(),
        };
        for action in ACTIONS {
            let _ = m.events_received.get_or_create(&ActionLabels { action });
        }
        for outcome in SETTLED {
            let _ = m.events_settled.get_or_create(&OutcomeLabels { outcome });
        }
        for kind in DEAD_LETTER_KINDS {
            let _ = m.dead_letters.get_or_create(&KindLabels { kind });
        }
        for kind in ["deployments", "statefulsets", "daemonsets"] {
            let _ = m.watch_events.get_or_create(&StreamLabels { kind });
            let _ = m.watch_errors.get_or_create(&StreamLabels { kind });
        }
        for kind in ["Deployment", "StatefulSet", "DaemonSet"] {
            let _ = m.stale_image_risk.get_or_create(&KindLabels { kind });
        }
        for reason in crate::act::events::Reason::ALL {
            for result in ["emitted", "failed", "dropped"] {
                let _ = m.kubernetes_events.get_or_create(&KubeEventLabels {
                    reason: reason.as_str(),
                    result,
                });
            }
        }
        for result in REBUILD_RESULTS {
            let _ = m.rebuilds.get_or_create(&ResultLabels { result });
        }
        for kind in ["Deployment", "StatefulSet", "DaemonSet"] {
            for result in ROLLOUT_RESULTS {
                let _ = m.rollouts.get_or_create(&RolloutLabels { kind, result });
            }
        }
        for result in ["published", "failed", "dropped"] {
            let _ = m.notifications.get_or_create(&ResultLabels { result });
        }
        for reason in ROLLOUT_DROPS {
            let _ = m.rollouts_dropped.get_or_create(&ReasonLabels { reason });
        }
        m.build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
                git_sha: GIT_SHA,
            })
            .set(1);
        registry.register(
            "events_received",
            "Pub/Sub messages received, by event action",
            m.events_received.clone(),
        );
        registry.register(
            "events_settled",
            "Messages settled, by outcome (ack, nack, dead_letter)",
            m.events_settled.clone(),
        );
        registry.register(
            "restarts",
            "Workload restarts, by kind, namespace and result",
            m.restarts.clone(),
        );
        registry.register(
            "dead_letters",
            "Messages published to the dead-letter topic, by kind",
            m.dead_letters.clone(),
        );
        registry.register(
            "lookup_seconds",
            "Image lookup latency, by source (memory, mount, api, rebuild)",
            m.lookup_seconds.clone(),
        );
        registry.register(
            "push_to_restart_seconds",
            "From the message's publish time to the restart PATCH being accepted",
            m.push_to_restart_seconds.clone(),
        );
        registry.register(
            "receive_to_restart_seconds",
            "From the start of a message's processing to its restart PATCH being accepted",
            m.receive_to_restart_seconds.clone(),
        );
        registry.register(
            "receive_to_patch_seconds",
            "From the start of a message's processing to its first restart PATCH being handed to the Kubernetes client (the daemon's own share of the latency)",
            m.receive_to_patch_seconds.clone(),
        );
        registry.register(
            "stale_image_risk",
            "Restarts of workloads with a container whose effective imagePullPolicy (IfNotPresent, Never) may start the old image from a node's cache, by kind",
            m.stale_image_risk.clone(),
        );
        registry.register(
            "kubernetes_events",
            "Kubernetes Events on workloads, by reason and result (emitted, failed, dropped)",
            m.kubernetes_events.clone(),
        );
        registry.register(
            "kubernetes_event_seconds",
            "Time to write one Kubernetes Event (in the background, never on a message's path)",
            m.kubernetes_event_seconds.clone(),
        );
        registry.register(
            "watch_events",
            "Watch events applied to the live view, by resource",
            m.watch_events.clone(),
        );
        registry.register(
            "watch_errors",
            "Watch failures (each retried with backoff), by resource",
            m.watch_errors.clone(),
        );
        registry.register(
            "watch_synced",
            "1 once every watch stream has listed and the live view is complete",
            m.watch_synced.clone(),
        );
        registry.register(
            "heap_in_use_bytes",
            "Heap bytes allocated and in use (glibc's mallinfo2), read at scrape",
            m.heap_in_use.clone(),
        );
        registry.register(
            "heap_free_bytes",
            "Heap bytes freed but still held by the allocator (glibc's mallinfo2: not returned to the kernel), read at scrape",
            m.heap_free.clone(),
        );
        registry.register(
            "rollouts",
            "Rollouts followed to their end after a restart, by kind and result (succeeded, failed: ProgressDeadlineExceeded, timed_out)",
            m.rollouts.clone(),
        );
        registry.register(
            "push_to_rollout_seconds",
            "From the message's publish time to the end of the rollout it started (any result)",
            m.push_to_rollout_seconds.clone(),
        );
        registry.register(
            "rollouts_dropped",
            "Rollouts no longer followed before their end, by reason (superseded by a later restart, workload deleted, untrackable: OnDelete strategy, capacity)",
            m.rollouts_dropped.clone(),
        );
        registry.register(
            "rollouts_tracked",
            "Rollouts being followed now",
            m.rollouts_tracked.clone(),
        );
        registry.register(
            "notifications",
            "Outcome records for --notify-topic, by result (published, failed after its tries, dropped: queue full)",
            m.notifications.clone(),
        );
        registry.register(
            "index_images",
            "Image references in the index",
            m.index_images.clone(),
        );
        registry.register(
            "index_workloads",
            "Workloads in the index",
            m.index_workloads.clone(),
        );
        registry.register(
            "index_age_seconds",
            "Seconds since the index in use was generated",
            m.index_age_seconds.clone(),
        );
        registry.register(
            "index_load_failures",
            "Mounted or stored indexes that could not be read",
            m.index_load_failures.clone(),
        );
        registry.register(
            "rebuilds",
            "Index rebuilds from a cluster scan, by result",
            m.rebuilds.clone(),
        );
        registry.register(
            "api_requests",
            "Kubernetes API requests, by verb, resource and HTTP code",
            m.api_requests.clone(),
        );
        registry.register(
            "stream_reconnects",
            "Times the streaming pull was re-created",
            m.stream_reconnects.clone(),
        );
        registry.register(
            "in_flight",
            "Messages being processed now",
            m.in_flight.clone(),
        );
        registry.register(
            "attempts_counted_per_process",
            "1 when messages arrive without delivery_attempt (no dead-letter policy on the subscription), so attempts are counted per process and reset on restart",
            m.attempts_counted_per_process.clone(),
        );
        registry.register(
            "build_info",
            "Always 1; the labels name the running build",
            m.build_info.clone(),
        );
        Self { registry, ..m }
    }

    /// Records the index now in use; `generated_unix` is when it was built.
    pub fn set_index(&self, images: usize, workloads: usize, generated_unix: Option<i64>) {
        self.index_images.set(images as i64);
        self.index_workloads.set(workloads as i64);
        let at = generated_unix.unwrap_or_else(unix_now);
        self.index_loaded_unix.store(at, Ordering::Relaxed);
    }

    pub fn observe_lookup(&self, source: &'static str, elapsed: Duration) {
        self.lookup_seconds
            .get_or_create(&SourceLabels { source })
            .observe(elapsed.as_secs_f64());
    }

    /// OpenMetrics text for `/metrics`.
    pub fn encode(&self) -> String {
        let loaded = self.index_loaded_unix.load(Ordering::Relaxed);
        if loaded > 0 {
            self.index_age_seconds
                .set((unix_now() - loaded).max(0) as f64);
        }
        if let Some(heap) = crate::util::heap::stats() {
            self.heap_in_use.set(heap.in_use as i64);
            self.heap_free.set(heap.free as i64);
        }
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_with_prefix() {
        let m = Metrics::new();
        m.events_received
            .get_or_create(&ActionLabels { action: "insert" })
            .inc();
        m.observe_lookup("memory", Duration::from_micros(3));
        m.set_index(3, 2, None);
        let text = m.encode();
        assert!(
            text.contains("gar_restarter_events_received_total{action=\"insert\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("gar_restarter_lookup_seconds_bucket{le="),
            "{text}"
        );
        assert!(text.contains("gar_restarter_index_images 3"), "{text}");
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn labelled_counters_and_build_info_exist_from_start_up() {
        let text = Metrics::new().encode();
        for series in [
            "gar_restarter_events_received_total{action=\"malformed\"} 0",
            "gar_restarter_events_settled_total{outcome=\"dead_letter\"} 0",
            "gar_restarter_dead_letters_total{kind=\"exhausted\"} 0",
            "gar_restarter_rebuilds_total{result=\"error\"} 0",
            "gar_restarter_attempts_counted_per_process 0",
        ] {
            assert!(text.contains(series), "{series} missing:\n{text}");
        }
        let build = format!(
            "gar_restarter_build_info{{version=\"{}\",git_sha=\"{GIT_SHA}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&build), "{build} missing:\n{text}");
    }
}

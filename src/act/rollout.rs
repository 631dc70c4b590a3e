//! Rollout tracking: after a restart, follow the workload through the live view's watch until
//! its rollout succeeded, failed or timed out, by the rules of `kubectl rollout status`.
//!
//! No polling: the live view tells the tracker about every state it applies
//! ([`Observer`]), and the tracker only compares it with what it follows. The ack of the
//! message does not wait for any of this (a rollout can outlast any Pub/Sub lease), so the
//! outcome is reported on its own: `rollouts_total{result}`, `push_to_rollout_seconds`, a
//! `rollout` span linked to the restart's trace, and a log line.
//!
//! Tracking is bounded: at most [`CAPACITY`] rollouts at once, each for at most its
//! Deployment's `progressDeadlineSeconds` (or `--rollout-timeout`) plus [`MARGIN`]. What is
//! dropped before its end (a later restart of the same workload, a deletion, the bound) is
//! counted in `rollouts_dropped_total{reason}`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use crate::act::decide::Push;
use crate::index::live::{Key, Observer, key_of};
use crate::index::workload::{
    RestartRecord, RolloutStatus, WorkloadKind, WorkloadRef, WorkloadState,
};
use crate::ops::metrics::{Metrics, ReasonLabels, RolloutLabels};
use crate::util::lock::lock;

/// Rollouts followed at once; ~1 KB each with their span.
pub const CAPACITY: usize = 10_000;
/// Past the Deployment controller's own deadline: time for it to write the condition.
pub const MARGIN: Duration = Duration::from_secs(60);
/// How often deadlines are checked.
const SWEEP: Duration = Duration::from_secs(1);

/// Where a rollout stands, by `kubectl rollout status`'s rules for its kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Progress {
    /// Still rolling out; the text says what it waits for, as kubectl would.
    Waiting(String),
    Succeeded,
    /// The Deployment controller gave up: `Progressing` is `ProgressDeadlineExceeded`.
    Failed(String),
    /// An `OnDelete` strategy: nothing rolls out until someone deletes the pods.
    Untrackable,
}

/// `kubectl rollout status` for one observed state, `generation` being the object's.
pub fn progress(kind: WorkloadKind, generation: i64, s: &RolloutStatus) -> Progress {
    use Progress::*;
    match kind {
        WorkloadKind::Deployment => {
            if generation > s.observed_generation {
                return Waiting("the spec update to be observed".into());
            }
            if s.progressing_reason.as_deref() == Some("ProgressDeadlineExceeded") {
                return Failed("exceeded its progress deadline (ProgressDeadlineExceeded)".into());
            }
            if s.updated_replicas < s.desired {
                return Waiting(format!(
                    "{} of {} new replicas updated",
                    s.updated_replicas, s.desired
                ));
            }
            if s.replicas > s.updated_replicas {
                return Waiting(format!(
                    "{} old replicas pending termination",
                    s.replicas - s.updated_replicas
                ));
            }
            if s.available_replicas < s.updated_replicas {
                return Waiting(format!(
                    "{} of {} updated replicas available",
                    s.available_replicas, s.updated_replicas
                ));
            }
            Succeeded
        }
        WorkloadKind::StatefulSet => {
            if s.on_delete {
                return Untrackable;
            }
            if s.observed_generation == 0 || generation > s.observed_generation {
                return Waiting("the spec update to be observed".into());
            }
            if s.ready_replicas < s.desired {
                return Waiting(format!("{} pods to be ready", s.desired - s.ready_replicas));
            }
            // The API server defaults `rollingUpdate.partition` to 0, so kubectl takes this
            // branch for every RollingUpdate StatefulSet it reads back.
            if let Some(partition) = s.partition {
                let want = s.desired - partition;
                return if s.updated_replicas < want {
                    Waiting(format!(
                        "partitioned roll out: {} of {want} new pods updated",
                        s.updated_replicas
                    ))
                } else {
                    Succeeded
                };
            }
            if s.update_revision != s.current_revision {
                return Waiting(format!(
                    "{} pods at revision {}",
                    s.updated_replicas,
                    s.update_revision.as_deref().unwrap_or("?")
                ));
            }
            Succeeded
        }
        WorkloadKind::DaemonSet => {
            if s.on_delete {
                return Untrackable;
            }
            if generation > s.observed_generation {
                return Waiting("the spec update to be observed".into());
            }
            if s.updated_replicas < s.desired {
                return Waiting(format!(
                    "{} of {} new pods updated",
                    s.updated_replicas, s.desired
                ));
            }
            if s.available_replicas < s.desired {
                return Waiting(format!(
                    "{} of {} updated pods available",
                    s.available_replicas, s.desired
                ));
            }
            Succeeded
        }
    }
}

/// How a followed rollout ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutResult {
    Succeeded,
    Failed,
    TimedOut,
}

impl RolloutResult {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutResult::Succeeded => "succeeded",
            RolloutResult::Failed => "failed",
            RolloutResult::TimedOut => "timed_out",
        }
    }
}

/// A rollout that ended, as reported (and, for subscribers such as the Events emitter, handed on).
#[derive(Debug, Clone)]
pub struct Finished {
    pub workload: WorkloadRef,
    pub image: String,
    pub digest: Option<String>,
    pub message_id: String,
    /// `restart` or `pin-digest`.
    pub strategy: &'static str,
    /// The workload's uid, when the watch showed it before the end.
    pub uid: Option<String>,
    pub result: RolloutResult,
    /// kubectl's words for the end (or for what it still waited for, when timed out).
    pub detail: String,
    /// The push's publish time.
    pub published_at: Option<OffsetDateTime>,
    /// Publish time of the push → end of the rollout.
    pub push_to_end: Option<Duration>,
}

struct Tracked {
    workload: WorkloadRef,
    /// The push the restart was for: the pod template carries it once our PATCH is seen.
    push: RestartRecord,
    message_id: String,
    strategy: &'static str,
    deadline: Instant,
    /// The object's generation once our template is seen; rollouts of other specs don't count.
    generation: Option<i64>,
    /// What kubectl would say it waits for, for the timed-out report.
    waiting: String,
    /// The object's uid, once the watch has shown it (for the Events).
    uid: Option<String>,
    span: tracing::Span,
}

pub struct RolloutConfig {
    /// Deadline for StatefulSets and DaemonSets (no progress deadline of their own), and for
    /// a Deployment until its `progressDeadlineSeconds` is seen.
    pub timeout: Duration,
}

/// Told about a rollout that ended.
type FinishHook = Box<dyn Fn(&Finished) + Send + Sync>;

/// The rollouts being followed, fed by the live view.
pub struct Rollouts {
    tracked: Mutex<HashMap<Key, Tracked>>,
    config: RolloutConfig,
    metrics: Arc<Metrics>,
    /// Told about every rollout that ends (the Events emitter, for one).
    on_finish: Mutex<Vec<FinishHook>>,
}

impl Rollouts {
    pub fn new(config: RolloutConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            tracked: Mutex::new(HashMap::new()),
            config,
            metrics,
            on_finish: Mutex::new(Vec::new()),
        }
    }

    /// Calls `f` for every rollout that ends from now on.
    pub fn on_finish(&self, f: impl Fn(&Finished) + Send + Sync + 'static) {
        lock(&self.on_finish).push(Box::new(f));
    }

    pub fn len(&self) -> usize {
        lock(&self.tracked).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Starts following `workload`'s rollout for `push`, restarted by message `message_id`.
    /// Called inside the `restart` span, which the `rollout` span follows from.
    pub fn track(
        &self,
        workload: &WorkloadRef,
        push: &Push,
        message_id: &str,
        strategy: &'static str,
    ) {
        let span = tracing::info_span!(
            parent: None,
            "rollout",
            "k8s.namespace.name" = %workload.namespace,
            "k8s.workload.kind" = workload.kind.as_str(),
            "k8s.workload.name" = %workload.name,
            "gar.image" = %push.image,
            "gar.digest" = push.digest.as_deref().unwrap_or(""),
            "messaging.message.id" = %message_id,
            result = tracing::field::Empty,
        );
        span.follows_from(tracing::Span::current());
        let tracked = Tracked {
            workload: workload.clone(),
            push: push.record(),
            message_id: message_id.to_owned(),
            strategy,
            deadline: Instant::now() + self.config.timeout + MARGIN,
            generation: None,
            waiting: "the restart to be observed".into(),
            uid: None,
            span,
        };
        let mut map = lock(&self.tracked);
        let key = key_of(workload);
        if map.len() >= CAPACITY && !map.contains_key(&key) {
            drop(map);
            self.drop_one("capacity", workload);
            return;
        }
        let replaced = map.insert(key, tracked).is_some();
        self.metrics.rollouts_tracked.set(map.len() as i64);
        drop(map);
        if replaced {
            self.drop_one("superseded", workload);
        }
    }

    fn drop_one(&self, reason: &'static str, workload: &WorkloadRef) {
        self.metrics
            .rollouts_dropped
            .get_or_create(&ReasonLabels { reason })
            .inc();
        tracing::debug!(%workload, reason, "rollout no longer followed");
    }

    /// Ends every rollout whose deadline has passed, as `timed_out`.
    pub fn sweep(&self, now: Instant) {
        let expired: Vec<Tracked> = {
            let mut map = lock(&self.tracked);
            let out = map
                .extract_if(|_, t| t.deadline <= now)
                .map(|(_, t)| t)
                .collect();
            self.metrics.rollouts_tracked.set(map.len() as i64);
            out
        };
        for t in expired {
            let detail = format!("still waiting for {} at the deadline", t.waiting);
            self.finish(t, RolloutResult::TimedOut, detail);
        }
    }

    /// Checks deadlines every second until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut tick = tokio::time::interval(SWEEP);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => self.sweep(Instant::now()),
            }
        }
    }

    fn finish(&self, t: Tracked, result: RolloutResult, detail: String) {
        let push_to_end: Option<Duration> = t
            .push
            .published_at
            .and_then(|at| (OffsetDateTime::now_utc() - at).try_into().ok());
        self.metrics
            .rollouts
            .get_or_create(&RolloutLabels {
                kind: t.workload.kind.as_str(),
                result: result.as_str(),
            })
            .inc();
        if let Some(d) = push_to_end {
            self.metrics
                .push_to_rollout_seconds
                .observe(d.as_secs_f64());
        }
        t.span.record("result", result.as_str());
        let finished = Finished {
            workload: t.workload,
            image: t.push.image.unwrap_or_default(),
            digest: t.push.digest,
            message_id: t.message_id,
            strategy: t.strategy,
            uid: t.uid,
            result,
            detail,
            published_at: t.push.published_at,
            push_to_end,
        };
        t.span.in_scope(|| match result {
            RolloutResult::Succeeded => tracing::info!(
                workload = %finished.workload, image = %finished.image,
                digest = finished.digest.as_deref(), message_id = %finished.message_id,
                seconds_since_push = finished.push_to_end.map(|d| d.as_secs_f64()),
                "rollout succeeded"
            ),
            _ => tracing::warn!(
                workload = %finished.workload, image = %finished.image,
                digest = finished.digest.as_deref(), message_id = %finished.message_id,
                result = result.as_str(), detail = %finished.detail,
                "rollout did not succeed"
            ),
        });
        for f in lock(&self.on_finish).iter() {
            f(&finished);
        }
    }
}

/// What one observed state means for a followed rollout.
enum Step {
    Keep,
    Drop(&'static str),
    End(RolloutResult, String),
}

/// Advances `t` with `state` (the same workload).
fn step(t: &mut Tracked, state: &WorkloadState) -> Step {
    if t.uid.is_none() {
        t.uid = state.uid.as_deref().map(String::from);
    }
    let record = &state.last_restart;
    if t.generation.is_none() {
        if record.digest != t.push.digest || record.published_at != t.push.published_at {
            // Not our template yet (an event from before our PATCH), or already a later
            // push's, which is tracked on its own.
            return if later(record, &t.push) {
                Step::Drop("superseded")
            } else {
                Step::Keep
            };
        }
        t.generation = Some(state.generation);
        if let Some(secs) = state.status.progress_deadline_seconds {
            t.deadline = Instant::now() + Duration::from_secs(secs.max(0) as u64) + MARGIN;
        }
    }
    if t.generation != Some(state.generation) {
        // The spec changed again since our restart (someone's edit, or our next push, which
        // is tracked on its own): this rollout is no longer the one to report.
        return Step::Drop("superseded");
    }
    match progress(state.workload.kind, state.generation, &state.status) {
        Progress::Waiting(what) => {
            t.waiting = what;
            Step::Keep
        }
        Progress::Succeeded => {
            Step::End(RolloutResult::Succeeded, "successfully rolled out".into())
        }
        Progress::Failed(why) => Step::End(RolloutResult::Failed, why),
        Progress::Untrackable => Step::Drop("untrackable"),
    }
}

impl Observer for Rollouts {
    fn applied(&self, state: &WorkloadState) {
        let key = key_of(&state.workload);
        let mut map = lock(&self.tracked);
        let Some(t) = map.get_mut(&key) else {
            return;
        };
        let step = step(t, state);
        if matches!(step, Step::Keep) {
            return;
        }
        let removed = map.remove(&key);
        self.metrics.rollouts_tracked.set(map.len() as i64);
        drop(map);
        match (step, removed) {
            (Step::Drop(reason), _) => self.drop_one(reason, &state.workload),
            (Step::End(result, detail), Some(t)) => self.finish(t, result, detail),
            _ => {}
        }
    }

    fn deleted(&self, key: &Key) {
        let removed = {
            let mut map = lock(&self.tracked);
            let t = map.remove(key);
            self.metrics.rollouts_tracked.set(map.len() as i64);
            t
        };
        if let Some(t) = removed {
            self.drop_one("deleted", &t.workload);
        }
    }
}

/// Whether the template's record is for a push published after `ours`.
fn later(record: &RestartRecord, ours: &RestartRecord) -> bool {
    matches!((record.published_at, ours.published_at), (Some(a), Some(b)) if a > b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::workload::ContainerImage;
    use crate::ingest::image::ImageRef;

    fn status() -> RolloutStatus {
        RolloutStatus {
            observed_generation: 2,
            desired: 3,
            replicas: 3,
            updated_replicas: 3,
            available_replicas: 3,
            ready_replicas: 3,
            ..RolloutStatus::default()
        }
    }

    #[test]
    fn deployment_follows_kubectl() {
        let d = WorkloadKind::Deployment;
        assert_eq!(progress(d, 2, &status()), Progress::Succeeded);
        assert!(
            matches!(progress(d, 3, &status()), Progress::Waiting(w) if w.contains("observed"))
        );
        let mut s = status();
        s.updated_replicas = 1;
        assert!(
            matches!(progress(d, 2, &s), Progress::Waiting(w) if w == "1 of 3 new replicas updated")
        );
        let mut s = status();
        s.replicas = 4;
        assert!(matches!(progress(d, 2, &s), Progress::Waiting(w) if w.contains("1 old replicas")));
        let mut s = status();
        s.available_replicas = 2;
        assert!(matches!(progress(d, 2, &s), Progress::Waiting(w) if w.contains("2 of 3 updated")));
        let mut s = status();
        s.updated_replicas = 1;
        s.progressing_reason = Some("ProgressDeadlineExceeded".into());
        assert!(matches!(progress(d, 2, &s), Progress::Failed(_)));
        // The condition counts only once the controller has seen the spec.
        assert!(matches!(progress(d, 3, &s), Progress::Waiting(_)));
    }

    #[test]
    fn statefulset_follows_kubectl() {
        let k = WorkloadKind::StatefulSet;
        let mut s = status();
        s.update_revision = Some("web-2".into());
        s.current_revision = Some("web-1".into());
        assert!(matches!(progress(k, 2, &s), Progress::Waiting(w) if w.contains("web-2")));
        s.current_revision = Some("web-2".into());
        assert_eq!(progress(k, 2, &s), Progress::Succeeded);
        s.ready_replicas = 1;
        assert!(matches!(progress(k, 2, &s), Progress::Waiting(w) if w == "2 pods to be ready"));
        let mut s = status();
        s.partition = Some(1);
        s.updated_replicas = 1;
        assert!(matches!(progress(k, 2, &s), Progress::Waiting(w) if w.contains("1 of 2")));
        s.updated_replicas = 2;
        assert_eq!(progress(k, 2, &s), Progress::Succeeded);
        let mut s = status();
        s.observed_generation = 0;
        assert!(matches!(progress(k, 0, &s), Progress::Waiting(_)));
        s.on_delete = true;
        assert_eq!(progress(k, 2, &s), Progress::Untrackable);
    }

    #[test]
    fn daemonset_follows_kubectl() {
        let k = WorkloadKind::DaemonSet;
        assert_eq!(progress(k, 2, &status()), Progress::Succeeded);
        let mut s = status();
        s.updated_replicas = 2;
        assert!(
            matches!(progress(k, 2, &s), Progress::Waiting(w) if w == "2 of 3 new pods updated")
        );
        let mut s = status();
        s.available_replicas = 0;
        assert!(matches!(progress(k, 2, &s), Progress::Waiting(w) if w.contains("available")));
    }

    fn push(hex: char, secs: i64) -> Push {
        Push {
            image: ImageRef::parse("europe-docker.pkg.dev/p/r/app:v1").expect("ref"),
            digest: Some(format!("sha256:{}", hex.to_string().repeat(64))),
            published_at: OffsetDateTime::from_unix_timestamp(1_700_000_000 + secs).expect("time"),
            message_id: "m".into(),
        }
    }

    fn state(
        w: &WorkloadRef,
        record: RestartRecord,
        generation: i64,
        s: RolloutStatus,
    ) -> WorkloadState {
        WorkloadState {
            workload: w.clone(),
            containers: vec![ContainerImage {
                container: "app".into(),
                init: false,
                image: None,
                pull_policy: None,
                written: None,
            }]
            .into(),
            paused: false,
            annotations_enabled: None,
            strategy: None,
            last_restart: record,
            resource_version: None,
            uid: None,
            generation,
            status: s,
        }
    }

    fn rollouts() -> (Rollouts, Arc<Metrics>) {
        let metrics = Arc::new(Metrics::new());
        let r = Rollouts::new(
            RolloutConfig {
                timeout: Duration::from_secs(600),
            },
            metrics.clone(),
        );
        (r, metrics)
    }

    fn count(m: &Metrics, result: &'static str) -> u64 {
        m.rollouts
            .get_or_create(&RolloutLabels {
                kind: "Deployment",
                result,
            })
            .get()
    }

    #[test]
    fn a_rollout_ends_when_our_template_is_rolled_out() {
        let (r, m) = rollouts();
        let w = WorkloadRef::new(WorkloadKind::Deployment, "apps", "web");
        let p = push('a', 0);
        let finished = Arc::new(Mutex::new(Vec::new()));
        let seen = finished.clone();
        r.on_finish(move |f| lock(&seen).push((f.result, f.message_id.clone())));
        r.track(&w, &p, "m-1", "restart");
        // The state from before our PATCH is "done", but not with our template.
        r.applied(&state(&w, RestartRecord::default(), 1, status()));
        assert_eq!(r.len(), 1);
        let mut rolling = status();
        rolling.updated_replicas = 1;
        r.applied(&state(
            &w,
            p.record(),
            3,
            RolloutStatus {
                observed_generation: 3,
                ..rolling
            },
        ));
        assert_eq!(r.len(), 1);
        r.applied(&state(
            &w,
            p.record(),
            3,
            RolloutStatus {
                observed_generation: 3,
                ..status()
            },
        ));
        assert!(r.is_empty());
        assert_eq!(count(&m, "succeeded"), 1);
        assert_eq!(
            *lock(&finished),
            vec![(RolloutResult::Succeeded, "m-1".to_owned())]
        );
    }

    #[test]
    fn failed_superseded_deleted_and_timed_out_rollouts_are_reported_or_counted() {
        let (r, m) = rollouts();
        let w = WorkloadRef::new(WorkloadKind::Deployment, "apps", "web");
        let (a, b) = (push('a', 0), push('b', 10));
        r.track(&w, &a, "m-1", "restart");
        let mut stuck = status();
        stuck.observed_generation = 3;
        stuck.updated_replicas = 1;
        stuck.progressing_reason = Some("ProgressDeadlineExceeded".into());
        r.applied(&state(&w, a.record(), 3, stuck));
        assert_eq!(count(&m, "failed"), 1);

        r.track(&w, &a, "m-1", "restart");
        r.track(&w, &b, "m-2", "restart");
        let dropped = |reason| {
            m.rollouts_dropped
                .get_or_create(&ReasonLabels { reason })
                .get()
        };
        assert_eq!(
            dropped("superseded"),
            1,
            "a later restart replaces the one before"
        );
        r.deleted(&key_of(&w));
        assert_eq!(dropped("deleted"), 1);

        r.track(&w, &b, "m-2", "restart");
        r.sweep(Instant::now() + Duration::from_secs(600) + MARGIN);
        assert_eq!(count(&m, "timed_out"), 1);
        assert!(r.is_empty());
    }

    #[test]
    fn the_progress_deadline_sets_the_timeout_and_capacity_bounds_memory() {
        let (r, m) = rollouts();
        let w = WorkloadRef::new(WorkloadKind::Deployment, "apps", "web");
        let p = push('a', 0);
        r.track(&w, &p, "m-1", "restart");
        let mut s = status();
        s.observed_generation = 1;
        s.progress_deadline_seconds = Some(5);
        r.applied(&state(&w, p.record(), 3, s));
        r.sweep(Instant::now() + Duration::from_secs(30));
        assert_eq!(r.len(), 1, "5 s + the margin have not passed");
        r.sweep(Instant::now() + Duration::from_secs(5) + MARGIN + Duration::from_secs(1));
        assert_eq!(count(&m, "timed_out"), 1);

        for i in 0..CAPACITY + 3 {
            r.track(
                &WorkloadRef::new(WorkloadKind::Deployment, "apps", &format!("w-{i}")),
                &p,
                "m",
                "restart",
            );
        }
        assert_eq!(r.len(), CAPACITY);
        assert_eq!(
            m.rollouts_dropped
                .get_or_create(&ReasonLabels { reason: "capacity" })
                .get(),
            3
        );
    }
}

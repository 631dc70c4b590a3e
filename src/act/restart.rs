//! Restart: the PATCH `kubectl rollout restart` sends, plus annotations that record the push
//! it was for, taken only after [`decide`] says so on the workload's live state.

use std::num::NonZeroU32;
use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::{Client, Resource};
use serde_json::{Value, json};

use std::sync::Arc;

use crate::act::decide::{Decision, Pin, Plan, Push, Skip, decide};
use crate::act::dedupe::BoundedTtlMap;
use crate::act::events::{EventEmitter, Reason, WorkloadEvent};
use crate::act::strategy::Strategy;
use crate::cluster::{ErrorClass, classify, status_code};
use crate::index::live::{Current, Key, LiveView, key_of};
use crate::index::table::Scope;
use crate::index::workload::{
    DIGEST_ANNOTATION, IMAGE_ANNOTATION, PUBLISHED_AT_ANNOTATION, RestartRecord,
    STRATEGY_ANNOTATION, WorkloadKind, WorkloadRef,
};
use crate::ops::metrics::{KindLabels, Metrics};

pub const RESTARTED_AT_ANNOTATION: &str = "kubectl.kubernetes.io/restartedAt";
pub const FIELD_MANAGER: &str = "gar-restarter";

/// Our own restarts remembered per workload, until the watch shows them (normally within
/// milliseconds; without the live view, for `--dedupe-window`).
const RECENT_CAPACITY: usize = 100_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartOutcome {
    Restarted,
    /// pin-digest: the matching containers now name the pushed digest (and it restarted).
    Pinned,
    DryRun,
    /// Not restarted, and why (paused, opted out, out of scope, duplicate, stale).
    Skipped(Skip),
}

impl RestartOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            RestartOutcome::Restarted => "restarted",
            RestartOutcome::Pinned => "pinned",
            RestartOutcome::DryRun => "dry_run",
            RestartOutcome::Skipped(skip) => skip.as_str(),
        }
    }
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("restarting {workload}: {message}")]
pub struct RestartError {
    pub workload: WorkloadRef,
    /// HTTP status of the API's answer, when there was one.
    pub status: Option<u16>,
    pub class: ErrorClass,
    pub message: String,
}

impl RestartError {
    fn from_kube(workload: &WorkloadRef, verb: &str, e: &kube::Error) -> Self {
        let message = match (e, status_code(e)) {
            (kube::Error::Api(s), Some(code)) => {
                format!("{verb} returned HTTP {code} {}: {}", s.reason, s.message)
            }
            _ => format!("{verb} failed: {e}"),
        };
        Self {
            workload: workload.clone(),
            status: status_code(e),
            class: classify(e),
            message,
        }
    }

    fn deferred(workload: &WorkloadRef, why: &str) -> Self {
        Self {
            workload: workload.clone(),
            status: None,
            class: ErrorClass::Transient { retry_after: None },
            message: format!("not decided yet: {why}"),
        }
    }

    pub fn is_transient(&self) -> bool {
        matches!(self.class, ErrorClass::Transient { .. })
    }
}

/// Retry policy for transient API errors within one delivery.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub min_delay: Duration,
    pub max_delay: Duration,
    pub max_times: usize,
    /// Wall-clock time one delivery may spend on a workload, requests, backoff and
    /// server-requested `Retry-After` included; keeps a message well inside its Pub/Sub lease.
    /// A retry that would end past it is not made: the message is nacked instead.
    pub budget: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            min_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(5),
            max_times: 8,
            budget: Duration::from_secs(30),
        }
    }
}

/// What a [`Restarter`] needs besides the client.
pub struct RestarterConfig {
    pub dry_run: bool,
    pub retry: RetryPolicy,
    /// The namespaces, selector and opt-in the daemon runs with: enforced when acting.
    pub scope: Scope,
    /// The watch-fed view decisions are read from; `None` (no watch) decides on the index.
    pub live: Option<Arc<LiveView>>,
    /// How long our own restart is remembered when the watch does not show it.
    pub dedupe_window: Duration,
    /// `--max-restarts-per-second`, shared by every message in flight; `None`: unlimited.
    pub max_restarts_per_second: Option<NonZeroU32>,
    /// `--strategy`: for workloads without a `gar-restarter/strategy` annotation.
    pub strategy: Strategy,
    /// Where the Kubernetes Events go (disabled under `--dry-run`).
    pub events: EventEmitter,
    /// `stale_image_risk_total` is counted here.
    pub metrics: Arc<Metrics>,
}

impl Default for RestarterConfig {
    /// No dry run, the default retry policy, every namespace, no live view, 10 minutes,
    /// `restart`, no Events, metrics of its own.
    fn default() -> Self {
        Self {
            dry_run: false,
            retry: RetryPolicy::default(),
            scope: Scope::default(),
            live: None,
            dedupe_window: Duration::from_secs(600),
            max_restarts_per_second: None,
            strategy: Strategy::Restart,
            events: EventEmitter::disabled(),
            metrics: Arc::new(Metrics::new()),
        }
    }
}

/// The process-wide token bucket of `--max-restarts-per-second` (GCRA, with a burst of one
/// second's worth).
type Limiter = governor::DefaultDirectRateLimiter;

pub struct Restarter {
    client: Client,
    config: RestarterConfig,
    recent: BoundedTtlMap<Key, RestartRecord>,
    limiter: Option<Limiter>,
}

impl Restarter {
    pub fn new(client: Client, config: RestarterConfig) -> Self {
        Self {
            recent: BoundedTtlMap::new(config.dedupe_window, RECENT_CAPACITY),
            limiter: config
                .max_restarts_per_second
                .map(|rate| governor::RateLimiter::direct(governor::Quota::per_second(rate))),
            client,
            config,
        }
    }

    /// Waits for a token of `--max-restarts-per-second` when this push would restart
    /// `workload` (a skip costs none), so that the retry budget that follows counts only
    /// the API's time. The decision is taken again after the wait, on the view as it is then.
    async fn wait_for_token(&self, workload: &WorkloadRef, push: &Push) {
        let Some(limiter) = &self.limiter else {
            return;
        };
        if self.config.dry_run
            || !matches!(self.decision(workload, push).1, Decision::Restart { .. })
        {
            return;
        }
        let started = Instant::now();
        limiter.until_ready().await;
        let waited = started.elapsed();
        if waited >= Duration::from_millis(1) {
            tracing::debug!(%workload, ?waited, "waited for --max-restarts-per-second");
        }
    }

    /// The decision for `workload` now: on the live view when there is one.
    fn decision(&self, workload: &WorkloadRef, push: &Push) -> (Current, Decision) {
        let current = match &self.config.live {
            Some(live) => live.current(workload),
            None => Current::Unknown,
        };
        let ours = self.recent.get(&key_of(workload));
        let decision = decide(
            workload,
            &current,
            ours.as_ref(),
            push,
            &self.config.scope,
            self.config.strategy,
        );
        (current, decision)
    }

    /// Restarts one workload, retrying transient errors with exponential backoff and jitter,
    /// honouring the API server's `retryAfterSeconds`, within the retry budget.
    ///
    /// `on_send` runs as each PATCH is handed to the client: the daemon's own latency ends
    /// there and the API server's begins.
    pub async fn restart(
        &self,
        workload: &WorkloadRef,
        push: &Push,
        on_send: impl Fn() + Sync,
    ) -> Result<RestartOutcome, RestartError> {
        self.wait_for_token(workload, push).await;
        let retry = self.config.retry;
        let backoff = ExponentialBuilder::default()
            .with_min_delay(retry.min_delay)
            .with_max_delay(retry.max_delay)
            .with_max_times(retry.max_times)
            .with_jitter();
        // Checked against the clock rather than backon's `with_total_delay`, which adds up
        // only its own planned sleeps: a `Retry-After: 60` or slow requests would otherwise
        // keep a message far past the budget and its lease.
        let deadline = Instant::now() + retry.budget;
        (|| self.restart_once(workload, push, &on_send))
            .retry(backoff)
            .when(RestartError::is_transient)
            .adjust(move |e, planned| {
                retry_delay(e.class, planned).filter(|d| Instant::now() + *d <= deadline)
            })
            .notify(|e, delay| {
                tracing::debug!(error = %e, ?delay, "retrying transient API error");
            })
            .await
    }

    /// One decision and at most one PATCH. A 409 (the workload changed since the view the
    /// decision was taken on) is transient: the retry decides again on the newer view.
    async fn restart_once(
        &self,
        workload: &WorkloadRef,
        push: &Push,
        on_send: &(impl Fn() + Sync),
    ) -> Result<RestartOutcome, RestartError> {
        let key = key_of(workload);
        let (current, decision) = self.decision(workload, push);
        let (precondition, plan) = match decision {
            Decision::Skip(Skip::UnknownStrategy) => {
                let value = match &current {
                    Current::Live(s) => s.strategy.as_deref().unwrap_or_default().to_string(),
                    _ => String::new(),
                };
                tracing::warn!(
                    %workload,
                    image = %push.image,
                    message_id = %push.message_id,
                    value = %crate::util::excerpt::quote(&value),
                    "not restarting {workload}: its {STRATEGY_ANNOTATION} annotation {} is \
                     neither \"restart\" nor \"pin-digest\"; fix the annotation (or remove it for \
                     --strategy={})",
                    crate::util::excerpt::quote(&value),
                    self.config.strategy
                );
                return Ok(RestartOutcome::Skipped(Skip::UnknownStrategy));
            }
            Decision::Skip(skip) => {
                tracing::info!(%workload, image = %push.image, digest = push.digest.as_deref(), reason = skip.as_str(), "not restarting");
                return Ok(RestartOutcome::Skipped(skip));
            }
            Decision::Defer(why) => return Err(RestartError::deferred(workload, why)),
            Decision::Restart { precondition, plan } => (precondition, plan),
        };
        let span = tracing::Span::current();
        span.record("gar.strategy", plan.strategy.as_str());
        let body = patch_body(
            &crate::util::clock::now_rfc3339(),
            push,
            precondition.as_deref(),
            &plan.pins,
        );
        if self.config.dry_run {
            tracing::info!(%workload, strategy = plan.strategy.as_str(), patch = %body, "dry run: would restart");
            return Ok(RestartOutcome::DryRun);
        }
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..Default::default()
        };
        let body = Patch::Strategic(&body);
        let resource = resource_of(workload.kind);
        let api: Api<DynamicObject> =
            Api::namespaced_with(self.client.clone(), &workload.namespace, &resource);
        let patch = api.patch(&workload.name, &params, &body);
        on_send();
        let patched = patch
            .await
            .map_err(|e| RestartError::from_kube(workload, "PATCH", &e))?;
        self.recent.insert(key, push.record());
        self.report(workload, push, &plan, patched.object_ref(&resource));
        Ok(match plan.strategy {
            Strategy::Restart => RestartOutcome::Restarted,
            Strategy::PinDigest => RestartOutcome::Pinned,
        })
    }

    /// After an accepted PATCH: the stale-image warning (metric, span, log) and the Events.
    fn report(
        &self,
        workload: &WorkloadRef,
        push: &Push,
        plan: &Plan,
        regarding: k8s_openapi::api::core::v1::ObjectReference,
    ) {
        let digest = push.digest.as_deref().unwrap_or("unknown");
        let what = format!(
            "{} (digest {digest}, Pub/Sub message {})",
            push.image, push.message_id
        );
        if !plan.stale_risks.is_empty() {
            let containers = plan
                .stale_risks
                .iter()
                .map(|r| format!("{} ({})", r.container, r.policy.as_str()))
                .collect::<Vec<_>>()
                .join(", ");
            self.config
                .metrics
                .stale_image_risk
                .get_or_create(&KindLabels {
                    kind: workload.kind.as_str(),
                })
                .inc();
            tracing::Span::current().record("gar.stale_image_risk", containers.as_str());
            let fix = format!(
                "set imagePullPolicy: Always on the container, or annotate the workload \
                 {STRATEGY_ANNOTATION}: pin-digest"
            );
            tracing::warn!(
                %workload,
                image = %push.image,
                digest,
                message_id = %push.message_id,
                containers = %containers,
                "restarted {workload} for {what}, but container {containers} may start the old \
                 image from a node's cache: {fix}"
            );
            self.config.events.emit(WorkloadEvent {
                reason: Reason::StaleImageRisk,
                regarding: regarding.clone(),
                note: format!(
                    "Restarted for {what}, but container {containers} may start the old image \
                     from a node's cache: {fix}"
                ),
            });
        }
        let (reason, note) = match plan.strategy {
            Strategy::Restart => (Reason::Restarted, format!("Restarted for {what}")),
            Strategy::PinDigest => (
                Reason::PinnedDigest,
                format!("Pinned {} to {what}", describe_pins(&plan.pins)),
            ),
        };
        self.config.events.emit(WorkloadEvent {
            reason,
            regarding,
            note,
        });
    }
}

fn resource_of(kind: WorkloadKind) -> ApiResource {
    match kind {
        WorkloadKind::Deployment => ApiResource::erase::<Deployment>(&()),
        WorkloadKind::StatefulSet => ApiResource::erase::<StatefulSet>(&()),
        WorkloadKind::DaemonSet => ApiResource::erase::<DaemonSet>(&()),
    }
}

/// `container app, initContainer migrate`.
fn describe_pins(pins: &[Pin]) -> String {
    pins.iter()
        .map(|p| {
            let kind = if p.init { "initContainer" } else { "container" };
            format!("{kind} {}", p.container)
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// The sleep before the next try: the planned backoff, stretched to a server's Retry-After.
fn retry_delay(class: ErrorClass, planned: Option<Duration>) -> Option<Duration> {
    match class {
        ErrorClass::Transient {
            retry_after: Some(after),
        } => planned.map(|p| p.max(after)),
        _ => planned,
    }
}

/// The strategic-merge patch `kubectl rollout restart` sends, plus the push it is for (tag,
/// digest, publish time) and, when the decision was taken on the live view, a resourceVersion
/// precondition (a stale one gets 409 Conflict). `pins` (pin-digest) set those containers'
/// images in the same strategic-merge PATCH, merged by container name: the others are left
/// as they are.
pub fn patch_body(
    restarted_at: &str,
    push: &Push,
    resource_version: Option<&str>,
    pins: &[Pin],
) -> Value {
    let mut annotations = serde_json::Map::new();
    annotations.insert(RESTARTED_AT_ANNOTATION.into(), Value::from(restarted_at));
    if let Some(d) = &push.digest {
        annotations.insert(DIGEST_ANNOTATION.into(), Value::from(d.as_str()));
    }
    annotations.insert(IMAGE_ANNOTATION.into(), Value::from(push.image.as_str()));
    annotations.insert(
        PUBLISHED_AT_ANNOTATION.into(),
        Value::from(crate::util::clock::format_rfc3339_nanos(push.published_at)),
    );
    let mut body = json!({"spec": {"template": {"metadata": {"annotations": annotations}}}});
    let list = |init: bool| -> Vec<Value> {
        pins.iter()
            .filter(|p| p.init == init)
            .map(|p| json!({"name": p.container, "image": p.image}))
            .collect()
    };
    let (containers, init_containers) = (list(false), list(true));
    if !containers.is_empty() {
        body["spec"]["template"]["spec"]["containers"] = Value::from(containers);
    }
    if !init_containers.is_empty() {
        body["spec"]["template"]["spec"]["initContainers"] = Value::from(init_containers);
    }
    if let Some(rv) = resource_version {
        body["metadata"] = json!({ "resourceVersion": rv });
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_is_what_kubectl_sends_plus_the_push() {
        let push = Push {
            image: crate::ingest::image::ImageRef::parse("gcr.io/p/app:v1").unwrap(),
            digest: Some("sha256:ab".into()),
            published_at: time::OffsetDateTime::from_unix_timestamp_nanos(
                1_764_072_000_123_456_789,
            )
            .unwrap(),
            message_id: "m1".into(),
        };
        let body = patch_body("2026-11-25T12:00:00Z", &push, None, &[]);
        let annotations = &body["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(annotations[RESTARTED_AT_ANNOTATION], "2026-11-25T12:00:00Z");
        assert_eq!(annotations[DIGEST_ANNOTATION], "sha256:ab");
        assert_eq!(annotations[IMAGE_ANNOTATION], "gcr.io/p/app:v1");
        assert_eq!(
            annotations[PUBLISHED_AT_ANNOTATION],
            "2025-11-25T12:00:00.123456789Z"
        );
        assert!(body.get("metadata").is_none());
        assert!(
            body["spec"]["template"].get("spec").is_none(),
            "restart leaves the pod spec alone"
        );
        let body = patch_body("t", &push, Some("42"), &[]);
        assert_eq!(body["metadata"]["resourceVersion"], "42");
    }

    #[test]
    fn pin_digest_patch_sets_only_the_pinned_containers() {
        let push = Push {
            image: crate::ingest::image::ImageRef::parse("gcr.io/p/app:v1").unwrap(),
            digest: Some("sha256:ab".into()),
            published_at: time::OffsetDateTime::from_unix_timestamp(1_764_072_000).unwrap(),
            message_id: "m7".into(),
        };
        let pins = [
            Pin {
                container: "app".into(),
                init: false,
                image: "gcr.io/p/app:v1@sha256:ab".into(),
            },
            Pin {
                container: "migrate".into(),
                init: true,
                image: "gcr.io/p/app:v1@sha256:ab".into(),
            },
        ];
        let body = patch_body("t", &push, Some("9"), &pins);
        let spec = &body["spec"]["template"]["spec"];
        assert_eq!(
            spec["containers"],
            json!([{"name": "app", "image": "gcr.io/p/app:v1@sha256:ab"}])
        );
        assert_eq!(
            spec["initContainers"],
            json!([{"name": "migrate", "image": "gcr.io/p/app:v1@sha256:ab"}])
        );
        // The same annotations as a restart, and the precondition.
        let annotations = &body["spec"]["template"]["metadata"]["annotations"];
        assert_eq!(annotations[DIGEST_ANNOTATION], "sha256:ab");
        assert_eq!(annotations[RESTARTED_AT_ANNOTATION], "t");
        assert_eq!(body["metadata"]["resourceVersion"], "9");
        assert_eq!(describe_pins(&pins), "container app, initContainer migrate");
        // Only init containers: no `containers` key (which strategic merge would leave alone
        // anyway, but the body stays minimal).
        let body = patch_body("t", &push, None, &pins[1..]);
        assert!(body["spec"]["template"]["spec"].get("containers").is_none());
    }
}

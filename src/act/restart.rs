//! Restart stage: the PATCH `kubectl rollout restart` sends, plus our digest annotation.

use std::time::{Duration, Instant};

use backon::{ExponentialBuilder, Retryable};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, StatefulSet};
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use serde_json::{Value, json};

use crate::cluster::{ErrorClass, classify, status_code};
use crate::config::DedupeMode;
use crate::index::workload::{WorkloadKind, WorkloadRef};

pub const RESTARTED_AT_ANNOTATION: &str = "kubectl.kubernetes.io/restartedAt";
pub const DIGEST_ANNOTATION: &str = "gar-restarter/digest";
pub const FIELD_MANAGER: &str = "gar-restarter";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestartOutcome {
    Restarted,
    DryRun,
    /// kubectl refuses to restart a paused Deployment; so do we.
    SkippedPaused,
    /// `--dedupe-mode cluster`: the template already carries this digest.
    AlreadyAtDigest,
}

impl RestartOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            RestartOutcome::Restarted => "restarted",
            RestartOutcome::DryRun => "dry_run",
            RestartOutcome::SkippedPaused => "skipped_paused",
            RestartOutcome::AlreadyAtDigest => "already_at_digest",
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

#[derive(Clone)]
pub struct Restarter {
    client: Client,
    dry_run: bool,
    mode: DedupeMode,
    retry: RetryPolicy,
}

impl Restarter {
    pub fn new(client: Client, dry_run: bool, mode: DedupeMode, retry: RetryPolicy) -> Self {
        Self {
            client,
            dry_run,
            mode,
            retry,
        }
    }

    /// Restarts one workload, retrying transient errors with exponential backoff and jitter,
    /// honouring the API server's `retryAfterSeconds`, within the retry budget.
    ///
    /// `on_send` runs as each PATCH is handed to the client: the daemon's own latency ends
    /// there and the API server's begins.
    pub async fn restart(
        &self,
        workload: &WorkloadRef,
        digest: Option<&str>,
        on_send: impl Fn() + Sync,
    ) -> Result<RestartOutcome, RestartError> {
        let backoff = ExponentialBuilder::default()
            .with_min_delay(self.retry.min_delay)
            .with_max_delay(self.retry.max_delay)
            .with_max_times(self.retry.max_times)
            .with_jitter();
        // Checked against the clock rather than backon's `with_total_delay`, which adds up
        // only its own planned sleeps: a `Retry-After: 60` or slow requests would otherwise
        // keep a message far past the budget and its lease.
        let deadline = Instant::now() + self.retry.budget;
        (|| self.restart_once(workload, digest, &on_send))
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

    async fn restart_once(
        &self,
        workload: &WorkloadRef,
        digest: Option<&str>,
        on_send: &(impl Fn() + Sync),
    ) -> Result<RestartOutcome, RestartError> {
        let api = self.api(workload);
        let mut precondition = None;
        let mut paused = workload.paused;
        if self.mode == DedupeMode::Cluster {
            let live = api
                .get(&workload.name)
                .await
                .map_err(|e| RestartError::from_kube(workload, "GET", &e))?;
            let template_annotations = &live.data["spec"]["template"]["metadata"]["annotations"];
            if let Some(d) = digest
                && template_annotations[DIGEST_ANNOTATION].as_str() == Some(d)
            {
                return Ok(RestartOutcome::AlreadyAtDigest);
            }
            paused = live.data["spec"]["paused"].as_bool().unwrap_or(false);
            precondition = live.metadata.resource_version.clone();
        }
        if paused && workload.kind == WorkloadKind::Deployment {
            tracing::info!(%workload, "not restarting: the Deployment is paused (kubectl refuses it too)");
            return Ok(RestartOutcome::SkippedPaused);
        }
        let body = patch_body(
            &crate::util::clock::now_rfc3339(),
            digest,
            precondition.as_deref(),
        );
        if self.dry_run {
            tracing::info!(%workload, patch = %body, "dry run: would restart");
            return Ok(RestartOutcome::DryRun);
        }
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_string()),
            ..Default::default()
        };
        let body = Patch::Strategic(&body);
        let patch = api.patch(&workload.name, &params, &body);
        on_send();
        patch
            .await
            .map_err(|e| RestartError::from_kube(workload, "PATCH", &e))?;
        Ok(RestartOutcome::Restarted)
    }

    fn api(&self, workload: &WorkloadRef) -> Api<DynamicObject> {
        let resource = match workload.kind {
            WorkloadKind::Deployment => ApiResource::erase::<Deployment>(&()),
            WorkloadKind::StatefulSet => ApiResource::erase::<StatefulSet>(&()),
            WorkloadKind::DaemonSet => ApiResource::erase::<DaemonSet>(&()),
        };
        Api::namespaced_with(self.client.clone(), &workload.namespace, &resource)
    }
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

/// The strategic-merge patch `kubectl rollout restart` sends, plus the pushed digest and, in
/// cluster dedupe mode, a resourceVersion precondition (a stale one gets 409 Conflict).
pub fn patch_body(
    restarted_at: &str,
    digest: Option<&str>,
    resource_version: Option<&str>,
) -> Value {
    let mut annotations = serde_json::Map::new();
    annotations.insert(RESTARTED_AT_ANNOTATION.into(), Value::from(restarted_at));
    if let Some(d) = digest {
        annotations.insert(DIGEST_ANNOTATION.into(), Value::from(d));
    }
    let mut body = json!({"spec": {"template": {"metadata": {"annotations": annotations}}}});
    if let Some(rv) = resource_version {
        body["metadata"] = json!({ "resourceVersion": rv });
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patch_is_what_kubectl_sends() {
        let body = patch_body("2026-11-25T12:00:00Z", None, None);
        assert_eq!(
            body.to_string(),
            r#"{"spec":{"template":{"metadata":{"annotations":{"kubectl.kubernetes.io/restartedAt":"2026-11-25T12:00:00Z"}}}}}"#
        );
        let body = patch_body("t", Some("sha256:ab"), Some("42"));
        assert_eq!(
            body["spec"]["template"]["metadata"]["annotations"][DIGEST_ANNOTATION],
            "sha256:ab"
        );
        assert_eq!(body["metadata"]["resourceVersion"], "42");
    }
}

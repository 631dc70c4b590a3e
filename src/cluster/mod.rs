//! Kubernetes access shared by every stage: the client (config inference, no hidden retries,
//! per-request metrics) and how API errors are classified, by HTTP code.

pub mod api_metrics;

use std::time::Duration;

use kube::Client;
use kube::api::Api;
use serde::de::DeserializeOwned;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot configure the Kubernetes client (KUBECONFIG or in-cluster): {0}")]
    Config(String),
    #[error("listing {resource}{scope}: {source}")]
    List {
        resource: &'static str,
        scope: String,
        #[source]
        source: kube::Error,
    },
}

impl ClusterError {
    pub fn class(&self) -> ErrorClass {
        match self {
            ClusterError::Config(_) => ErrorClass::Permanent,
            ClusterError::List { source, .. } => classify(source),
        }
    }
}

/// Builds a client with kube's config inference (KUBECONFIG, then in-cluster).
///
/// kube's own retry layer is off: it would retry 429/5xx up to 15 times with delays of up to
/// 1000 s, hidden from our attempt counting and far past the Pub/Sub lease.
pub async fn client() -> Result<Client, ClusterError> {
    client_with_metrics(std::sync::Arc::new(crate::ops::metrics::Metrics::new())).await
}

/// [`client`], counting every API request in `metrics.api_requests` (verb, resource, code).
pub async fn client_with_metrics(
    metrics: std::sync::Arc<crate::ops::metrics::Metrics>,
) -> Result<Client, ClusterError> {
    build(metrics, Duration::from_secs(30)).await
}

/// The client the watches use: like [`client_with_metrics`], but a read may wait as long as a
/// watch request lasts (kube's runtime watcher asks for 290 s), since an idle watch is silent
/// between bookmarks. A dead connection is still noticed by its TCP keepalive or a request
/// timeout, and the watcher resumes from the last resourceVersion it saw.
pub async fn watch_client(
    metrics: std::sync::Arc<crate::ops::metrics::Metrics>,
) -> Result<Client, ClusterError> {
    build(metrics, Duration::from_secs(295)).await
}

async fn build(
    metrics: std::sync::Arc<crate::ops::metrics::Metrics>,
    read_timeout: Duration,
) -> Result<Client, ClusterError> {
    let mut config = kube::Config::infer()
        .await
        .map_err(|e| ClusterError::Config(e.to_string()))?;
    config.default_retry = false;
    config.connect_timeout = Some(Duration::from_secs(5));
    config.read_timeout = Some(read_timeout);
    config.write_timeout = Some(Duration::from_secs(10));
    let layer = crate::cluster::api_metrics::ApiMetricsLayer::new(metrics);
    Ok(kube::client::ClientBuilder::try_from(config)
        .map_err(|e| ClusterError::Config(e.to_string()))?
        .with_layer(&layer)
        .build())
}

/// [`client`] for a command that may not need the API at all (`check` answering from the
/// mounted index): when no Kubernetes config can be inferred, it still returns a client,
/// and every request that client sends fails with the reason the config could not be made.
/// The mount is read first, so it can answer; an API call still names what is missing.
pub async fn client_or_unconfigured() -> Client {
    match client().await {
        Ok(client) => client,
        Err(e) => Client::new(Unconfigured(e.to_string().into()), "default"),
    }
}

/// The transport of [`client_or_unconfigured`] when there is no cluster to talk to.
#[derive(Clone)]
struct Unconfigured(std::sync::Arc<str>);

impl tower_service::Service<http::Request<kube::client::Body>> for Unconfigured {
    type Response = http::Response<kube::client::Body>;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<kube::client::Body>) -> Self::Future {
        std::future::ready(Err(std::io::Error::other(format!(
            "{} {}: {}",
            req.method(),
            req.uri().path(),
            self.0
        ))))
    }
}

/// Whether retrying can help.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Connection errors, timeouts, 5xx, 429, 409, 401 (a token about to be refreshed).
    Transient { retry_after: Option<Duration> },
    /// 403 (RBAC), 404 (gone), 422 (invalid), other 4xx, and anything we cannot retry.
    Permanent,
}

pub fn classify(error: &kube::Error) -> ErrorClass {
    match error {
        kube::Error::Api(status) => {
            let retry_after = status
                .details
                .as_ref()
                .map(|d| d.retry_after_seconds)
                .filter(|s| *s > 0)
                .map(|s| Duration::from_secs(u64::from(s)));
            match status.code {
                // code 0: the body was not a Status, so we know nothing; assume a proxy hiccup.
                0 | 401 | 408 | 409 | 429 | 500..=599 => ErrorClass::Transient { retry_after },
                _ => ErrorClass::Permanent,
            }
        }
        kube::Error::HyperError(_)
        | kube::Error::Service(_)
        | kube::Error::SerdeError(_)
        | kube::Error::ReadEvents(_) => ErrorClass::Transient { retry_after: None },
        _ => ErrorClass::Permanent,
    }
}

/// Whether the API answered 404, by the HTTP code alone.
///
/// kube-core 5's `Status::is_not_found` (and so `Api::get_opt`) looks at the `reason` text
/// only, so a proxy or an aggregated API answering 404 with another reason (or none) would
/// be an error instead of "absent". Every API error here is classified by its code.
pub fn is_not_found(error: &kube::Error) -> bool {
    matches!(error, kube::Error::Api(s) if s.code == 404)
}

/// `Api::get_opt`, but "not found" is decided by [`is_not_found`], the HTTP code.
pub async fn get_opt<K>(api: &Api<K>, name: &str) -> Result<Option<K>, kube::Error>
where
    K: Clone + DeserializeOwned + std::fmt::Debug,
{
    match api.get(name).await {
        Ok(obj) => Ok(Some(obj)),
        Err(e) if is_not_found(&e) => Ok(None),
        Err(e) => Err(e),
    }
}

/// HTTP status of an API error, for metrics, logs and dead-letter reasons.
pub fn status_code(error: &kube::Error) -> Option<u16> {
    match error {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::core::Status;

    fn api_err(code: u16, retry: u32) -> kube::Error {
        api_err_with_reason(code, retry, "Reason")
    }

    fn api_err_with_reason(code: u16, retry: u32, reason: &str) -> kube::Error {
        let s: Status = serde_json::from_value(serde_json::json!({
            "status": "Failure", "message": "x", "reason": reason, "code": code,
            "details": {"retryAfterSeconds": retry}
        }))
        .unwrap();
        kube::Error::Api(Box::new(s))
    }

    /// Issue #14 item 14: a 404 whose reason is not `NotFound` is still "not found".
    #[test]
    fn not_found_is_decided_by_the_code_not_the_reason() {
        for reason in [
            "NotFound",
            "",
            "Failed to parse error data",
            "page not found",
            "Gone",
        ] {
            let e = api_err_with_reason(404, 0, reason);
            assert!(is_not_found(&e), "reason {reason:?}");
            assert_eq!(classify(&e), ErrorClass::Permanent);
        }
        // kube's own check, which `get_opt` relies on, misses these.
        let kube::Error::Api(odd) = api_err_with_reason(404, 0, "page not found") else {
            unreachable!()
        };
        assert!(!odd.is_not_found());
        // And a `NotFound` reason on another code is not a 404.
        assert!(!is_not_found(&api_err_with_reason(500, 0, "NotFound")));
        assert!(!is_not_found(&api_err_with_reason(403, 0, "NotFound")));
    }

    #[test]
    fn classification() {
        for code in [403, 404, 422, 400] {
            assert_eq!(classify(&api_err(code, 0)), ErrorClass::Permanent, "{code}");
        }
        for code in [500, 502, 503, 504, 409] {
            assert_eq!(
                classify(&api_err(code, 0)),
                ErrorClass::Transient { retry_after: None },
                "{code}"
            );
        }
        assert_eq!(
            classify(&api_err(429, 3)),
            ErrorClass::Transient {
                retry_after: Some(Duration::from_secs(3))
            }
        );
    }
}

//! What the test API endpoints share: the request log and the fault rules. The fake API
//! server and the fault-injecting proxy in front of the real API server both record every
//! request as a [`RecordedRequest`] and both obey the same [`Fault`] rules, so a test reads
//! the traffic the same way whichever one it runs against.

use std::time::{Duration, Instant};

use serde_json::Value;

/// One request as the fake server saw it, recorded after it was answered.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedRequest {
    pub method: String,
    /// Path without the query string, e.g. `/apis/apps/v1/namespaces/ns/deployments/web`.
    pub path: String,
    /// Raw query string exactly as received: `/x?&limit=5` gives `Some("&limit=5")`, `/x?`
    /// gives `Some("")` and `/x` gives `None`.
    pub query: Option<String>,
    pub content_type: Option<String>,
    /// The request body: parsed JSON when it is JSON, otherwise the raw text as a
    /// `Value::String`; `None` when the body was empty.
    pub body: Option<Value>,
    /// Status code of the response that was sent (including injected faults).
    pub status: u16,
    /// When the request head arrived, for latency measurements.
    pub received_at: Instant,
}

impl RecordedRequest {
    /// First value of the (percent-decoded) query parameter `key`.
    pub fn query_param(&self, key: &str) -> Option<String> {
        let query = self.query.as_deref()?;
        url::form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.into_owned())
    }
}

/// The requests a server answered, in order: what the proxy and the fake API server record,
/// and what tests assert on.
#[derive(Debug, Default)]
pub struct RequestLog(Vec<RecordedRequest>);

impl RequestLog {
    pub fn push(&mut self, request: RecordedRequest) {
        self.0.push(request);
    }

    pub fn all(&self) -> Vec<RecordedRequest> {
        self.0.clone()
    }

    pub fn clear(&mut self) {
        self.0.clear();
    }

    /// Requests with this method (case-insensitive) whose path starts with `path_prefix`.
    pub fn matching(&self, method: &str, path_prefix: &str) -> Vec<RecordedRequest> {
        self.0
            .iter()
            .filter(|r| r.method.eq_ignore_ascii_case(method) && r.path.starts_with(path_prefix))
            .cloned()
            .collect()
    }
}

/// What a recording server offers tests: the proxy in front of the real API server, and the
/// fake API server. Implementors say where their [`RequestLog`] is; the rest comes with it.
pub trait Recording {
    /// Runs `f` on the log, under whatever lock guards it.
    fn with_log<R>(&self, f: impl FnOnce(&mut RequestLog) -> R) -> R;

    /// Every request so far, in the order they were answered.
    fn requests(&self) -> Vec<RecordedRequest> {
        self.with_log(|log| log.all())
    }

    fn clear_requests(&self) {
        self.with_log(RequestLog::clear)
    }

    /// Requests with this method (case-insensitive) whose path starts with `path_prefix`.
    fn requests_matching(&self, method: &str, path_prefix: &str) -> Vec<RecordedRequest> {
        self.with_log(|log| log.matching(method, path_prefix))
    }

    /// Number of requests with this method whose path starts with `path_prefix`.
    fn count(&self, method: &str, path_prefix: &str) -> usize {
        self.requests_matching(method, path_prefix).len()
    }

    /// All PATCH requests, including failed and fault-injected ones.
    fn patches(&self) -> Vec<RecordedRequest> {
        self.requests_matching("PATCH", "")
    }
}

/// A failure and/or delay injected on requests whose path contains `path_contains`.
///
/// Build one with a struct literal plus `..Default::default()` (the default fires always,
/// forever, on every method and path) or with the helper constructors.
#[derive(Debug, Clone, PartialEq)]
pub struct Fault {
    /// HTTP method to match (case-insensitive); `None` matches every method.
    pub method: Option<String>,
    /// Substring the request path (without query) must contain; empty matches every path.
    pub path_contains: String,
    /// Substring the raw query string must contain (`watch=true` tells a watch from a LIST);
    /// `None` matches every query, none included.
    pub query_contains: Option<String>,
    /// Reply with a `Status` body of this code instead of serving the request.
    pub status: Option<u16>,
    /// Delay before replying (or before serving normally, when `status` is `None`).
    pub latency: Option<Duration>,
    /// Chance in `0.0..=1.0` that a matching request triggers the fault.
    pub probability: f64,
    /// How many more times the fault may fire; `None` means forever.
    pub times: Option<usize>,
    /// Seconds to put in a `Retry-After` header (and `details.retryAfterSeconds`).
    pub retry_after: Option<u64>,
    /// Close the connection without an answer (honoured by the proxy; the fake API server
    /// answers 503 instead).
    pub drop_connection: bool,
    /// Answer as kube-apiserver answers a watch whose resourceVersion it no longer has:
    /// HTTP 200, one `ERROR` event carrying a `410 Gone` Status, and the end of the stream
    /// (honoured by the proxy; the fake API server, which cannot watch, answers 410).
    pub expire_watch: bool,
}

impl Default for Fault {
    fn default() -> Self {
        Self {
            method: None,
            path_contains: String::new(),
            query_contains: None,
            status: None,
            latency: None,
            probability: 1.0,
            times: None,
            retry_after: None,
            drop_connection: false,
            expire_watch: false,
        }
    }
}

impl Fault {
    /// Answer requests whose path contains `path_contains` with an error `status`.
    pub fn error(path_contains: impl Into<String>, status: u16) -> Self {
        Self {
            path_contains: path_contains.into(),
            status: Some(status),
            ..Self::default()
        }
    }

    /// Delay requests whose path contains `path_contains`, then serve them normally.
    pub fn delay(path_contains: impl Into<String>, latency: Duration) -> Self {
        Self {
            path_contains: path_contains.into(),
            latency: Some(latency),
            ..Self::default()
        }
    }

    /// Only match requests with this HTTP method.
    pub fn on_method(mut self, method: &str) -> Self {
        self.method = Some(method.to_ascii_uppercase());
        self
    }

    /// Only match requests whose query string contains `query` (e.g. `watch=true`).
    pub fn on_query(mut self, query: &str) -> Self {
        self.query_contains = Some(query.to_owned());
        self
    }

    /// Fire at most `times` times, then disappear.
    pub fn times(mut self, times: usize) -> Self {
        self.times = Some(times);
        self
    }

    /// Fire with this probability (`0.0..=1.0`).
    pub fn with_probability(mut self, probability: f64) -> Self {
        self.probability = probability;
        self
    }

    /// Send `Retry-After: secs` with the error.
    pub fn with_retry_after(mut self, secs: u64) -> Self {
        self.retry_after = Some(secs);
        self
    }

    /// Close matching connections without an answer.
    pub fn drop_connection(path_contains: impl Into<String>) -> Self {
        Self {
            path_contains: path_contains.into(),
            drop_connection: true,
            ..Self::default()
        }
    }

    /// `target` is the request's path, with its `?query` when it has one.
    /// Expire the watches on paths containing `path_contains` (see [`Fault::expire_watch`]).
    pub fn expire_watch(path_contains: impl Into<String>) -> Self {
        Self {
            path_contains: path_contains.into(),
            query_contains: Some("watch=".into()),
            expire_watch: true,
            ..Self::default()
        }
    }

    fn matches(&self, method: &str, target: &str) -> bool {
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        self.method
            .as_deref()
            .is_none_or(|m| m.eq_ignore_ascii_case(method))
            && path.contains(self.path_contains.as_str())
            && self
                .query_contains
                .as_deref()
                .is_none_or(|q| query.contains(q))
    }
}

/// What the fault rules decided for one request.
#[derive(Debug, Default, PartialEq)]
pub struct Rolled {
    /// Sum of the latencies of the firing rules.
    pub latency: Duration,
    /// `(code, Retry-After seconds)` of the first firing error rule.
    pub status: Option<(u16, Option<u64>)>,
    /// A firing rule asked to drop the connection.
    pub drop_connection: bool,
    /// A firing rule asked to expire the watch (an in-stream `410 Gone`).
    pub expire_watch: bool,
}

/// Evaluates every matching fault: latencies add up, the first firing error (or drop) wins
/// (later error faults are then not consulted, so their `times` budget is not spent).
/// `target` is the request path, with its `?query` when there is one.
pub fn roll(faults: &mut Vec<Fault>, method: &str, target: &str) -> Rolled {
    let mut outcome = Rolled::default();
    for fault in faults.iter_mut() {
        let is_error = fault.status.is_some() || fault.drop_connection || fault.expire_watch;
        let decided = outcome.status.is_some() || outcome.drop_connection || outcome.expire_watch;
        if !fault.matches(method, target) || fault.times == Some(0) || (decided && is_error) {
            continue;
        }
        let fires = fault.probability >= 1.0
            || (fault.probability > 0.0 && rand::random::<f64>() < fault.probability);
        if !fires {
            continue;
        }
        if let Some(times) = &mut fault.times {
            *times -= 1;
        }
        if let Some(latency) = fault.latency {
            outcome.latency += latency;
        }
        if fault.drop_connection {
            outcome.drop_connection = true;
        } else if fault.expire_watch {
            outcome.expire_watch = true;
        } else if let Some(code) = fault.status {
            outcome.status = Some((code, fault.retry_after));
        }
    }
    faults.retain(|f| f.times != Some(0));
    outcome
}

/// The `reason` the real API server uses for a status code; clients branch on it.
pub fn reason_for(code: u16) -> &'static str {
    match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "NotFound",
        405 => "MethodNotAllowed",
        406 => "NotAcceptable",
        409 => "Conflict",
        410 => "Expired",
        413 => "RequestEntityTooLarge",
        415 => "UnsupportedMediaType",
        422 => "Invalid",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_fire_their_budget_and_the_first_error_wins() {
        let mut faults = vec![
            Fault::delay("deployments", Duration::from_millis(5)),
            Fault::error("deployments", 503)
                .times(1)
                .with_retry_after(2),
            Fault::error("deployments", 500),
        ];
        let first = roll(
            &mut faults,
            "PATCH",
            "/apis/apps/v1/namespaces/a/deployments/w",
        );
        assert_eq!(first.latency, Duration::from_millis(5));
        assert_eq!(first.status, Some((503, Some(2))));
        assert_eq!(faults.len(), 2, "the spent rule is gone");
        let second = roll(
            &mut faults,
            "GET",
            "/apis/apps/v1/namespaces/a/deployments/w",
        );
        assert_eq!(second.status, Some((500, None)));
        let other = roll(&mut faults, "GET", "/api/v1/namespaces/a/configmaps/c");
        assert_eq!(other, Rolled::default());
        let mut drop = vec![Fault::drop_connection("").on_method("PATCH")];
        assert!(roll(&mut drop, "patch", "/x").drop_connection);
        assert!(!roll(&mut drop, "GET", "/x").drop_connection);
    }

    #[test]
    fn a_query_rule_tells_a_watch_from_a_list() {
        let path = "/apis/apps/v1/namespaces/a/deployments";
        let mut faults = vec![Fault::error("deployments", 410).on_query("watch=true")];
        assert_eq!(roll(&mut faults, "GET", path), Rolled::default());
        assert_eq!(
            roll(&mut faults, "GET", &format!("{path}?limit=500")),
            Rolled::default()
        );
        let watch = roll(
            &mut faults,
            "GET",
            &format!("{path}?watch=true&resourceVersion=7"),
        );
        assert_eq!(watch.status, Some((410, None)));
    }
}

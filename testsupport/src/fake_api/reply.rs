//! Answers: `metav1.Status` errors and fully decided HTTP responses.

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::Full;
use serde_json::{Value, json};

use super::resources::ResourceType;
use crate::traffic::reason_for;

/// An error answered as a `metav1.Status` body.
#[derive(Debug, Clone)]
pub(super) struct ApiError {
    pub(super) code: u16,
    pub(super) reason: &'static str,
    pub(super) message: String,
    pub(super) details: Option<Value>,
    pub(super) retry_after: Option<u64>,
}

impl ApiError {
    pub(super) fn new(code: u16, message: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason_for(code),
            message: message.into(),
            details: None,
            retry_after: None,
        }
    }

    pub(super) fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    pub(super) fn object_details(rt: &ResourceType, name: &str) -> Value {
        let mut details = json!({ "name": name, "kind": rt.plural });
        if !rt.group.is_empty() {
            details["group"] = json!(rt.group);
        }
        details
    }

    pub(super) fn not_found(rt: &ResourceType, name: &str) -> Self {
        Self::new(404, format!("{} \"{name}\" not found", rt.qualified()))
            .with_details(Self::object_details(rt, name))
    }

    pub(super) fn already_exists(rt: &ResourceType, name: &str) -> Self {
        let mut err = Self::new(409, format!("{} \"{name}\" already exists", rt.qualified()))
            .with_details(Self::object_details(rt, name));
        err.reason = "AlreadyExists";
        err
    }

    pub(super) fn conflict(rt: &ResourceType, name: &str, why: &str) -> Self {
        Self::new(
            409,
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": {why}",
                rt.qualified()
            ),
        )
        .with_details(Self::object_details(rt, name))
    }

    pub(super) fn stale(rt: &ResourceType, name: &str) -> Self {
        Self::conflict(
            rt,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    pub(super) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }

    pub(super) fn invalid(rt: &ResourceType, name: &str, message: &str) -> Self {
        let group = if rt.group.is_empty() {
            String::new()
        } else {
            format!(".{}", rt.group)
        };
        let mut details = json!({ "name": name, "kind": rt.kind });
        if !rt.group.is_empty() {
            details["group"] = json!(rt.group);
        }
        Self::new(
            422,
            format!("{}{group} \"{name}\" is invalid: {message}", rt.kind),
        )
        .with_details(details)
    }

    pub(super) fn method_not_allowed() -> Self {
        Self::new(
            405,
            "the server does not allow this method on the requested resource",
        )
        .with_details(json!({}))
    }

    pub(super) fn route_not_found() -> Self {
        Self::new(404, "the server could not find the requested resource").with_details(json!({}))
    }

    /// Error produced by a [`Fault`](crate::traffic::Fault).
    pub(super) fn injected(code: u16, retry_after: Option<u64>) -> Self {
        let text = StatusCode::from_u16(code)
            .ok()
            .and_then(|c| c.canonical_reason())
            .unwrap_or("error");
        let mut err = Self::new(code, format!("{text} (injected by FakeApi)"));
        if let Some(secs) = retry_after {
            err = err.with_details(json!({ "retryAfterSeconds": secs }));
            err.retry_after = Some(secs);
        }
        err
    }

    pub(super) fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": if self.code < 400 { "Success" } else { "Failure" },
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

/// A fully decided HTTP response.
pub(super) struct Reply {
    pub(super) status: u16,
    pub(super) content_type: &'static str,
    pub(super) body: Bytes,
    pub(super) retry_after: Option<u64>,
}

impl Reply {
    pub(super) fn json(status: u16, value: &Value) -> Self {
        Self {
            status,
            content_type: "application/json",
            body: Bytes::from(value.to_string()),
            retry_after: None,
        }
    }

    pub(super) fn text(status: u16, text: &'static str) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: Bytes::from_static(text.as_bytes()),
            retry_after: None,
        }
    }

    pub(super) fn into_response(self) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(self.body));
        *response.status_mut() =
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(self.content_type),
        );
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response
    }
}

impl From<ApiError> for Reply {
    fn from(err: ApiError) -> Self {
        let mut reply = Reply::json(err.code, &err.to_status());
        reply.retry_after = err.retry_after;
        reply
    }
}

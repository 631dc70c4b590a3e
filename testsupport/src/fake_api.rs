//! A fake Kubernetes API server for tests.
//!
//! It speaks enough of the real API's REST protocol (paths, verbs, `Status` error bodies,
//! resource versions, paging, label selectors, merge/strategic-merge/JSON patches) that an
//! unmodified `kube` client can talk to it, while letting tests seed objects, inspect every
//! request that was made and inject failures or latency on chosen routes.
//!
//! Objects are stored as plain [`serde_json::Value`]s so tests never have to agree with the
//! server on a typed schema. Behaviour deliberately mirrors the real API server where it is
//! cheap to do so:
//!
//! * every write that changes an object bumps the global `resourceVersion`; a write that leaves
//!   the object byte-for-byte identical is a no-op and keeps it (as etcd-backed storage does);
//! * `metadata.generation` is bumped only when `spec` changes (apps resources only);
//! * writes to the main resource of a type with a `status` subresource cannot change `status`;
//! * a `resourceVersion` in a PUT body, or left in the result of a PATCH, is an optimistic
//!   concurrency precondition and yields `409 Conflict` when stale.
//!
//! Known simplifications: no watch (returns 405), no admission/validation beyond names,
//! server-side apply is approximated by a strategic merge (creating the object if absent),
//! `fieldSelector` only understands `metadata.name` and `metadata.namespace`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use rand::Rng;
use serde_json::{Map, Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

// ---------------------------------------------------------------------------------------------
// Resource types
// ---------------------------------------------------------------------------------------------

/// Static description of a resource type the fake serves.
#[derive(Debug)]
struct ResourceType {
    /// API group; empty for the core (`/api/v1`) group.
    group: &'static str,
    version: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
    /// Whether the API server maintains `metadata.generation` (bumped when `spec` changes).
    tracks_generation: bool,
    /// Whether `status` is a subresource, so writes to the main resource cannot change it.
    status_subresource: bool,
}

impl ResourceType {
    fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    /// `deployments.apps` / `configmaps`: the name the API server uses in error messages.
    fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_owned()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

const fn apps(plural: &'static str, kind: &'static str) -> ResourceType {
    ResourceType {
        group: "apps",
        version: "v1",
        plural,
        kind,
        namespaced: true,
        tracks_generation: true,
        status_subresource: true,
    }
}

const fn plain(
    group: &'static str,
    plural: &'static str,
    kind: &'static str,
    namespaced: bool,
) -> ResourceType {
    ResourceType {
        group,
        version: "v1",
        plural,
        kind,
        namespaced,
        tracks_generation: false,
        status_subresource: false,
    }
}

static RESOURCES: &[ResourceType] = &[
    apps("deployments", "Deployment"),
    apps("statefulsets", "StatefulSet"),
    apps("daemonsets", "DaemonSet"),
    apps("replicasets", "ReplicaSet"),
    plain("", "configmaps", "ConfigMap", true),
    plain("", "secrets", "Secret", true),
    plain("", "pods", "Pod", true),
    plain("", "namespaces", "Namespace", false),
    plain("coordination.k8s.io", "leases", "Lease", true),
];

fn resource_by_path(group: &str, version: &str, plural: &str) -> Option<&'static ResourceType> {
    RESOURCES
        .iter()
        .find(|rt| rt.group == group && rt.version == version && rt.plural == plural)
}

/// Lookup for the test-facing API: accepts the plural (`deployments`), the singular
/// (`deployment`) or the kind (`Deployment`).
fn resource_by_name(name: &str) -> Option<&'static ResourceType> {
    RESOURCES
        .iter()
        .find(|rt| rt.plural == name || rt.kind.eq_ignore_ascii_case(name))
}

fn resource_by_kind(kind: &str, api_version: Option<&str>) -> Option<&'static ResourceType> {
    RESOURCES
        .iter()
        .find(|rt| rt.kind == kind && api_version.is_none_or(|v| v == rt.api_version()))
}

fn resource_for_name_or_panic(resource: &str) -> &'static ResourceType {
    resource_by_name(resource)
        .unwrap_or_else(|| panic!("FakeApi: unsupported resource {resource:?}"))
}

// ---------------------------------------------------------------------------------------------
// Public test-facing types
// ---------------------------------------------------------------------------------------------

pub use crate::objects::{
    RESTARTED_AT_ANNOTATION, configmap, daemonset, deployment, restarted_at, statefulset,
};
pub use crate::traffic::{Fault, RecordedRequest, Recording};

// ---------------------------------------------------------------------------------------------
// Errors and replies
// ---------------------------------------------------------------------------------------------

use crate::traffic::{RequestLog, reason_for};

/// An error answered as a `metav1.Status` body.
#[derive(Debug, Clone)]
struct ApiError {
    code: u16,
    reason: &'static str,
    message: String,
    details: Option<Value>,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(code: u16, message: impl Into<String>) -> Self {
        Self {
            code,
            reason: reason_for(code),
            message: message.into(),
            details: None,
            retry_after: None,
        }
    }

    fn with_details(mut self, details: Value) -> Self {
        self.details = Some(details);
        self
    }

    fn object_details(rt: &ResourceType, name: &str) -> Value {
        let mut details = json!({ "name": name, "kind": rt.plural });
        if !rt.group.is_empty() {
            details["group"] = json!(rt.group);
        }
        details
    }

    fn not_found(rt: &ResourceType, name: &str) -> Self {
        Self::new(404, format!("{} \"{name}\" not found", rt.qualified()))
            .with_details(Self::object_details(rt, name))
    }

    fn already_exists(rt: &ResourceType, name: &str) -> Self {
        let mut err = Self::new(409, format!("{} \"{name}\" already exists", rt.qualified()))
            .with_details(Self::object_details(rt, name));
        err.reason = "AlreadyExists";
        err
    }

    fn conflict(rt: &ResourceType, name: &str, why: &str) -> Self {
        Self::new(
            409,
            format!(
                "Operation cannot be fulfilled on {} \"{name}\": {why}",
                rt.qualified()
            ),
        )
        .with_details(Self::object_details(rt, name))
    }

    fn stale(rt: &ResourceType, name: &str) -> Self {
        Self::conflict(
            rt,
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        )
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, message)
    }

    fn invalid(rt: &ResourceType, name: &str, message: &str) -> Self {
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

    fn method_not_allowed() -> Self {
        Self::new(
            405,
            "the server does not allow this method on the requested resource",
        )
        .with_details(json!({}))
    }

    fn route_not_found() -> Self {
        Self::new(404, "the server could not find the requested resource").with_details(json!({}))
    }

    /// Error produced by a [`Fault`].
    fn injected(code: u16, retry_after: Option<u64>) -> Self {
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

    fn to_status(&self) -> Value {
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
struct Reply {
    status: u16,
    content_type: &'static str,
    body: Bytes,
    retry_after: Option<u64>,
}

impl Reply {
    fn json(status: u16, value: &Value) -> Self {
        Self {
            status,
            content_type: "application/json",
            body: Bytes::from(value.to_string()),
            retry_after: None,
        }
    }

    fn text(status: u16, text: &'static str) -> Self {
        Self {
            status,
            content_type: "text/plain; charset=utf-8",
            body: Bytes::from_static(text.as_bytes()),
            retry_after: None,
        }
    }

    fn into_response(self) -> Response<Full<Bytes>> {
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

// ---------------------------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------------------------

/// What a resource path addresses.
enum Target {
    Collection {
        rt: &'static ResourceType,
        namespace: Option<String>,
    },
    Object {
        rt: &'static ResourceType,
        namespace: Option<String>,
        name: String,
        subresource: Option<String>,
    },
}

fn route(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (group, version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    if rest.iter().any(|s| s.is_empty()) {
        return None;
    }
    let lookup = |plural: &str| resource_by_path(group, version, plural);
    match rest {
        ["namespaces", ns, plural, tail @ ..] if lookup(plural).is_some_and(|rt| rt.namespaced) => {
            let rt = lookup(plural)?;
            let namespace = Some((*ns).to_owned());
            match tail {
                [] => Some(Target::Collection { rt, namespace }),
                [name] => Some(Target::Object {
                    rt,
                    namespace,
                    name: (*name).to_owned(),
                    subresource: None,
                }),
                [name, sub] => Some(Target::Object {
                    rt,
                    namespace,
                    name: (*name).to_owned(),
                    subresource: Some((*sub).to_owned()),
                }),
                _ => None,
            }
        }
        [plural, tail @ ..] => {
            let rt = lookup(plural)?;
            match tail {
                [] => Some(Target::Collection {
                    rt,
                    namespace: None,
                }),
                [name] if !rt.namespaced => Some(Target::Object {
                    rt,
                    namespace: None,
                    name: (*name).to_owned(),
                    subresource: None,
                }),
                [name, sub] if !rt.namespaced => Some(Target::Object {
                    rt,
                    namespace: None,
                    name: (*name).to_owned(),
                    subresource: Some((*sub).to_owned()),
                }),
                _ => None,
            }
        }
        _ => None,
    }
}

/// Decoded query parameters.
struct Params(Vec<(String, String)>);

impl Params {
    fn parse(query: Option<&str>) -> Self {
        Self(
            query
                .map(|q| {
                    url::form_urlencoded::parse(q.as_bytes())
                        .into_owned()
                        .collect()
                })
                .unwrap_or_default(),
        )
    }

    fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    fn non_empty(&self, key: &str) -> Option<&str> {
        self.get(key).filter(|v| !v.is_empty())
    }

    fn is_watch(&self) -> bool {
        matches!(self.get("watch"), Some("true" | "1"))
    }

    fn dry_run(&self) -> bool {
        self.get("dryRun") == Some("All")
    }
}

// ---------------------------------------------------------------------------------------------
// Selectors
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A parsed `labelSelector` (set-based and equality-based syntax).
#[derive(Debug, Clone, PartialEq)]
struct LabelSelector(Vec<Requirement>);

fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')
}

fn is_value_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

impl LabelSelector {
    fn parse(selector: &str) -> Result<Self, String> {
        let selector = selector.trim();
        if selector.is_empty() {
            return Ok(Self(Vec::new()));
        }
        // Split on commas that are not inside a `(...)` value set.
        let mut terms = Vec::new();
        let (mut depth, mut start) = (0usize, 0usize);
        for (i, c) in selector.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth = depth.saturating_sub(1),
                ',' if depth == 0 => {
                    terms.push(&selector[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        terms.push(&selector[start..]);
        terms
            .into_iter()
            .map(Self::parse_term)
            .collect::<Result<_, _>>()
            .map(Self)
    }

    fn parse_term(term: &str) -> Result<Requirement, String> {
        let term = term.trim();
        let key_of = |key: &str| -> Result<String, String> {
            if key.is_empty() || !key.chars().all(is_key_char) {
                Err(format!("invalid label key {key:?} in {term:?}"))
            } else {
                Ok(key.to_owned())
            }
        };
        let value_of = |value: &str| -> Result<String, String> {
            let value = value.trim();
            if value.chars().all(is_value_char) {
                Ok(value.to_owned())
            } else {
                Err(format!("invalid label value {value:?} in {term:?}"))
            }
        };
        if let Some(key) = term.strip_prefix('!') {
            return Ok(Requirement::DoesNotExist(key_of(key.trim())?));
        }
        let key_end = term.find(|c| !is_key_char(c)).unwrap_or(term.len());
        let key = key_of(&term[..key_end])?;
        let rest = term[key_end..].trim_start();
        if rest.is_empty() {
            return Ok(Requirement::Exists(key));
        }
        if let Some(value) = rest.strip_prefix("!=") {
            return Ok(Requirement::NotEquals(key, value_of(value)?));
        }
        if let Some(value) = rest.strip_prefix("==").or_else(|| rest.strip_prefix('=')) {
            return Ok(Requirement::Equals(key, value_of(value)?));
        }
        let set_of = |rest: &str| -> Result<Vec<String>, String> {
            let inner = rest
                .trim()
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| format!("expected a parenthesised value set in {term:?}"))?;
            let values: Vec<String> = inner.split(',').map(value_of).collect::<Result<_, _>>()?;
            if inner.trim().is_empty() {
                return Err(format!("empty value set in {term:?}"));
            }
            Ok(values)
        };
        let op_word = rest.split(|c: char| c.is_whitespace() || c == '(').next();
        match op_word {
            Some("in") => Ok(Requirement::In(key, set_of(&rest[2..])?)),
            Some("notin") => Ok(Requirement::NotIn(key, set_of(&rest[5..])?)),
            _ => Err(format!("unknown operator in {term:?}")),
        }
    }

    fn matches(&self, labels: Option<&Map<String, Value>>) -> bool {
        let label = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        self.0.iter().all(|req| match req {
            Requirement::Equals(k, v) => label(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
            Requirement::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::NotIn(k, vs) => label(k).is_none_or(|l| vs.iter().all(|v| v != l)),
            Requirement::Exists(k) => label(k).is_some(),
            Requirement::DoesNotExist(k) => label(k).is_none(),
        })
    }
}

/// The subset of `fieldSelector` the fake understands: `metadata.name` and
/// `metadata.namespace` with `=`, `==` and `!=`. Other fields are ignored (match everything).
struct FieldSelector(Vec<(&'static str, bool, String)>);

impl FieldSelector {
    fn parse(selector: Option<&str>) -> Self {
        let mut terms = Vec::new();
        for term in selector.unwrap_or("").split(',') {
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (f, true, v)
            } else {
                continue;
            };
            let pointer = match field.trim() {
                "metadata.name" => "/metadata/name",
                "metadata.namespace" => "/metadata/namespace",
                _ => continue,
            };
            terms.push((pointer, equal, value.trim().to_owned()));
        }
        Self(terms)
    }

    fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(pointer, equal, value)| {
            let actual = obj.pointer(pointer).and_then(Value::as_str).unwrap_or("");
            (actual == value) == *equal
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Patching
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq)]
enum PatchKind {
    Json,
    Merge,
    Strategic,
    Apply,
}

impl PatchKind {
    fn from_content_type(content_type: Option<&str>) -> Result<Self, ApiError> {
        let media = content_type
            .and_then(|ct| ct.split(';').next())
            .map(|m| m.trim().to_ascii_lowercase())
            .unwrap_or_default();
        match media.as_str() {
            "application/json-patch+json" => Ok(Self::Json),
            "application/merge-patch+json" => Ok(Self::Merge),
            "application/strategic-merge-patch+json" => Ok(Self::Strategic),
            "application/apply-patch+yaml" => Ok(Self::Apply),
            _ => Err(ApiError::new(
                415,
                format!(
                    "the body of the request was in an unknown format - accepted media types include: \
                     application/json-patch+json, application/merge-patch+json, \
                     application/apply-patch+yaml (got {media:?})"
                ),
            )),
        }
    }
}

/// RFC 7386 JSON merge patch: objects merge recursively, `null` deletes, anything else replaces.
fn json_merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                json_merge(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

/// `patchMergeKey` of the well-known lists that a strategic merge patch merges element-wise
/// (as declared by the Kubernetes types); lists not named here are replaced wholesale.
fn merge_key(field: &str) -> Option<&'static str> {
    match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "env"
        | "imagePullSecrets"
        | "resourceClaims" => Some("name"),
        "ports" => Some("containerPort"),
        "volumeMounts" => Some("mountPath"),
        "volumeDevices" => Some("devicePath"),
        "hostAliases" => Some("ip"),
        "ownerReferences" => Some("uid"),
        "conditions" => Some("type"),
        "topologySpreadConstraints" => Some("topologyKey"),
        _ => None,
    }
}

/// Lists of scalars with `patchStrategy: merge` (union instead of replace).
fn is_scalar_merge_list(field: &str) -> bool {
    field == "finalizers"
}

/// Drops strategic-merge directives (`$patch`, `$setElementOrder/...`, ...) from a value that
/// is being inserted verbatim.
fn strip_directives(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .filter(|(k, _)| !k.starts_with('$'))
                .map(|(k, v)| (k.clone(), strip_directives(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(strip_directives).collect()),
        other => other.clone(),
    }
}

fn directive(map: &Map<String, Value>) -> Option<&str> {
    map.get("$patch").and_then(Value::as_str)
}

/// A strategic merge patch: JSON merge semantics plus element-wise merging of the well-known
/// keyed lists ([`merge_key`]) and the `$patch: replace|delete` / `$deleteFromPrimitiveList`
/// directives. Enough for what controllers send; not the full upstream algorithm.
fn strategic_merge(
    target: &mut Map<String, Value>,
    patch: &Map<String, Value>,
) -> Result<(), String> {
    if directive(patch) == Some("replace") {
        if let Value::Object(replacement) = strip_directives(&Value::Object(patch.clone())) {
            *target = replacement;
        }
        return Ok(());
    }
    for (key, value) in patch {
        if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            if let (Some(Value::Array(list)), Value::Array(remove)) = (target.get_mut(field), value)
            {
                list.retain(|v| !remove.contains(v));
            }
            continue;
        }
        if key.starts_with('$') {
            continue;
        }
        match value {
            Value::Null => {
                target.remove(key);
            }
            Value::Object(patch_map) => {
                if directive(patch_map) == Some("delete") {
                    target.remove(key);
                    continue;
                }
                let slot = target
                    .entry(key.clone())
                    .or_insert_with(|| Value::Object(Map::new()));
                if !slot.is_object() {
                    *slot = Value::Object(Map::new());
                }
                if let Value::Object(target_map) = slot {
                    strategic_merge(target_map, patch_map)?;
                }
            }
            Value::Array(items) if merge_key(key).is_some() || is_scalar_merge_list(key) => {
                let slot = target
                    .entry(key.clone())
                    .or_insert_with(|| Value::Array(Vec::new()));
                if !slot.is_array() {
                    *slot = Value::Array(Vec::new());
                }
                if let Value::Array(list) = slot {
                    match merge_key(key) {
                        Some(mk) => merge_keyed_list(list, items, mk)?,
                        None => {
                            for item in items {
                                if !list.contains(item) {
                                    list.push(item.clone());
                                }
                            }
                        }
                    }
                }
            }
            other => {
                target.insert(key.clone(), strip_directives(other));
            }
        }
    }
    Ok(())
}

fn merge_keyed_list(list: &mut Vec<Value>, items: &[Value], merge_key: &str) -> Result<(), String> {
    let replace_marker = |item: &Value| {
        item.as_object()
            .is_some_and(|m| directive(m) == Some("replace") && m.len() == 1)
    };
    if items.iter().any(replace_marker) {
        *list = items
            .iter()
            .filter(|item| !replace_marker(item))
            .map(strip_directives)
            .collect();
        return Ok(());
    }
    for item in items {
        let Value::Object(patch_map) = item else {
            return Err(format!(
                "expected a map in a list merged by {merge_key:?}, got {item}"
            ));
        };
        let key_value = patch_map
            .get(merge_key)
            .ok_or_else(|| format!("map is missing required merge key {merge_key:?}: {item}"))?;
        let position = list
            .iter()
            .position(|e| e.get(merge_key) == Some(key_value));
        match (directive(patch_map), position) {
            (Some("delete"), Some(i)) => {
                list.remove(i);
            }
            (Some("delete"), None) => {}
            (Some("replace"), Some(i)) => list[i] = strip_directives(item),
            (_, Some(i)) => {
                if let Value::Object(target_map) = &mut list[i] {
                    strategic_merge(target_map, patch_map)?;
                } else {
                    list[i] = strip_directives(item);
                }
            }
            (_, None) => {
                let mut fresh = Map::new();
                strategic_merge(&mut fresh, patch_map)?;
                list.push(Value::Object(fresh));
            }
        }
    }
    Ok(())
}

/// Splits a JSON pointer into its parent pointer and unescaped last token.
fn split_pointer(pointer: &str) -> Result<(&str, String), String> {
    let idx = pointer
        .rfind('/')
        .ok_or_else(|| format!("invalid JSON pointer {pointer:?}"))?;
    let token = pointer[idx + 1..].replace("~1", "/").replace("~0", "~");
    Ok((&pointer[..idx], token))
}

fn pointer_add(doc: &mut Value, pointer: &str, value: Value) -> Result<(), String> {
    if pointer.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (parent, token) = split_pointer(pointer)?;
    match doc.pointer_mut(parent) {
        Some(Value::Object(map)) => {
            map.insert(token, value);
            Ok(())
        }
        Some(Value::Array(list)) => {
            let index = if token == "-" {
                list.len()
            } else {
                token
                    .parse::<usize>()
                    .ok()
                    .filter(|i| *i <= list.len())
                    .ok_or_else(|| format!("invalid array index in {pointer:?}"))?
            };
            list.insert(index, value);
            Ok(())
        }
        _ => Err(format!("doc is missing path: {pointer:?}")),
    }
}

fn pointer_remove(doc: &mut Value, pointer: &str) -> Result<Value, String> {
    let (parent, token) = split_pointer(pointer)?;
    let missing = || format!("doc is missing path: {pointer:?}");
    match doc.pointer_mut(parent) {
        Some(Value::Object(map)) => map.remove(&token).ok_or_else(missing),
        Some(Value::Array(list)) => match token.parse::<usize>() {
            Ok(i) if i < list.len() => Ok(list.remove(i)),
            _ => Err(missing()),
        },
        _ => Err(missing()),
    }
}

/// RFC 6902 JSON patch. Malformed operations are 400s, operations that do not apply are 422s.
fn json_patch(doc: &mut Value, patch: &Value) -> Result<(), ApiError> {
    let ops = patch
        .as_array()
        .ok_or_else(|| ApiError::bad_request("a JSON patch must be a JSON array of operations"))?;
    let unprocessable = |msg: String| ApiError::new(422, msg);
    for op in ops {
        let field = |name: &str| {
            op.get(name).ok_or_else(|| {
                ApiError::bad_request(format!("JSON patch operation {op} lacks {name:?}"))
            })
        };
        let pointer_field = |name: &str| {
            field(name)?
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| ApiError::bad_request(format!("{name:?} must be a string in {op}")))
        };
        let path = pointer_field("path")?;
        match field("op")?.as_str().unwrap_or_default() {
            "add" => pointer_add(doc, &path, field("value")?.clone()).map_err(unprocessable)?,
            "remove" => {
                pointer_remove(doc, &path).map_err(unprocessable)?;
            }
            "replace" => {
                let slot = doc
                    .pointer_mut(&path)
                    .ok_or_else(|| unprocessable(format!("doc is missing key: {path:?}")))?;
                *slot = field("value")?.clone();
            }
            "move" => {
                let value = pointer_remove(doc, &pointer_field("from")?).map_err(unprocessable)?;
                pointer_add(doc, &path, value).map_err(unprocessable)?;
            }
            "copy" => {
                let from = pointer_field("from")?;
                let value = doc
                    .pointer(&from)
                    .cloned()
                    .ok_or_else(|| unprocessable(format!("doc is missing from path: {from:?}")))?;
                pointer_add(doc, &path, value).map_err(unprocessable)?;
            }
            "test" => {
                if doc.pointer(&path) != Some(field("value")?) {
                    return Err(unprocessable(format!("testing value {path:?} failed")));
                }
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unexpected JSON patch operation {other:?}"
                )));
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Object helpers
// ---------------------------------------------------------------------------------------------

type ObjectKey = (&'static str, String, String);

fn str_at<'a>(obj: &'a Value, pointer: &str) -> Option<&'a str> {
    obj.pointer(pointer)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
}

/// `metadata` of `obj` as a map, created (or replaced if it was not a map) when needed.
fn metadata_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.is_object() {
        *obj = Value::Object(Map::new());
    }
    let Value::Object(map) = obj else {
        unreachable!("obj was just made an object")
    };
    let meta = map
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()));
    if !meta.is_object() {
        *meta = Value::Object(Map::new());
    }
    match meta {
        Value::Object(meta) => meta,
        _ => unreachable!("metadata was just made an object"),
    }
}

fn set_or_remove(obj: &mut Value, key: &str, value: Option<Value>) {
    if let Value::Object(map) = obj {
        match value {
            Some(v) => {
                map.insert(key.to_owned(), v);
            }
            None => {
                map.remove(key);
            }
        }
    }
}

fn parse_object(body: &[u8]) -> Result<Value, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(obj @ Value::Object(_)) => Ok(obj),
        Ok(_) => Err(ApiError::bad_request(
            "the request body must be a JSON object",
        )),
        Err(e) => Err(ApiError::bad_request(format!(
            "couldn't decode the request body as JSON: {e}"
        ))),
    }
}

/// Rejects a body whose `kind`/`apiVersion` contradict the URL.
fn check_type(rt: &ResourceType, obj: &Value) -> Result<(), ApiError> {
    if let Some(kind) = str_at(obj, "/kind")
        && kind != rt.kind
    {
        return Err(ApiError::bad_request(format!(
            "the kind in the data ({kind}) does not match the expected kind ({})",
            rt.kind
        )));
    }
    if let Some(api_version) = str_at(obj, "/apiVersion")
        && api_version != rt.api_version()
    {
        return Err(ApiError::bad_request(format!(
            "the API version in the data ({api_version}) does not match the expected API version ({})",
            rt.api_version()
        )));
    }
    Ok(())
}

/// Rejects a PUT/PATCH result that is not an object of this type addressed by `key`.
fn check_identity(rt: &ResourceType, key: &ObjectKey, obj: &Value) -> Result<(), ApiError> {
    let (_, namespace, name) = key;
    if !obj.is_object() {
        return Err(ApiError::bad_request("the object must be a JSON object"));
    }
    check_type(rt, obj)?;
    if let Some(body_name) = str_at(obj, "/metadata/name")
        && body_name != name
    {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({body_name}) does not match the name on the URL ({name})"
        )));
    }
    if rt.namespaced && str_at(obj, "/metadata/namespace").is_some_and(|ns| ns != namespace) {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    Ok(())
}

/// Object names must be DNS-1123 subdomains, as for nearly every built-in resource.
fn validate_name(rt: &ResourceType, name: &str) -> Result<(), ApiError> {
    let valid = !name.is_empty()
        && name.len() <= 253
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name.ends_with(|c: char| c.is_ascii_alphanumeric());
    if valid {
        Ok(())
    } else {
        Err(ApiError::invalid(
            rt,
            name,
            "metadata.name: Invalid value: a lowercase RFC 1123 subdomain must consist of lower \
             case alphanumeric characters, '-' or '.', and must start and end with an \
             alphanumeric character",
        ))
    }
}

fn new_uid() -> String {
    let mut bytes: [u8; 16] = rand::random();
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    let hex = hex_encode(&bytes);
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Random suffix for `metadata.generateName`, from the same alphabet the API server uses.
fn name_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..5)
        .map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())] as char)
        .collect()
}

/// Current UTC time as RFC 3339 with second precision, like `metav1.Time`.
fn now_rfc3339() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day); Howard Hinnant's algorithm.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn encode_continue(namespace: &str, name: &str) -> String {
    hex_encode(format!("{namespace}\0{name}").as_bytes())
}

fn decode_continue(token: &str) -> Result<(String, String), ApiError> {
    let invalid = || ApiError::bad_request(format!("continue key is not valid: {token:?}"));
    let raw = hex_decode(token).ok_or_else(invalid)?;
    let text = String::from_utf8(raw).map_err(|_| invalid())?;
    let (namespace, name) = text.split_once('\0').ok_or_else(invalid)?;
    Ok((namespace.to_owned(), name.to_owned()))
}

// ---------------------------------------------------------------------------------------------
// State and API semantics
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct State {
    /// Keyed by (plural, namespace, name); namespace is empty for cluster-scoped objects.
    objects: BTreeMap<ObjectKey, Value>,
    /// Last resourceVersion handed out (global across all resources, like etcd's revision).
    resource_version: u64,
    requests: RequestLog,
    faults: Vec<Fault>,
}

/// What the fault rules decided for one request.
#[derive(Default)]
struct FaultOutcome {
    latency: Duration,
    error: Option<ApiError>,
}

fn key(rt: &'static ResourceType, namespace: Option<&str>, name: &str) -> ObjectKey {
    let namespace = if rt.namespaced {
        namespace.unwrap_or_default()
    } else {
        ""
    };
    (rt.plural, namespace.to_owned(), name.to_owned())
}

impl State {
    fn next_resource_version(&mut self) -> String {
        self.resource_version += 1;
        self.resource_version.to_string()
    }

    fn objects_of(&self, rt: &'static ResourceType) -> impl Iterator<Item = (&ObjectKey, &Value)> {
        self.objects
            .range((rt.plural, String::new(), String::new())..)
            .take_while(move |((plural, _, _), _)| *plural == rt.plural)
    }

    fn roll_faults(&mut self, method: &str, path: &str) -> FaultOutcome {
        let rolled = crate::traffic::roll(&mut self.faults, method, path);
        FaultOutcome {
            latency: rolled.latency,
            error: rolled
                .status
                .map(|(code, retry_after)| ApiError::injected(code, retry_after)),
        }
    }

    /// Fills in the server-owned fields of an object that is being created.
    fn stamp_new(
        &mut self,
        rt: &ResourceType,
        obj: &mut Value,
        namespace: &str,
        name: &str,
        commit: bool,
    ) {
        let resource_version = if commit {
            self.next_resource_version()
        } else {
            (self.resource_version + 1).to_string()
        };
        obj["apiVersion"] = json!(rt.api_version());
        obj["kind"] = json!(rt.kind);
        let meta = metadata_mut(obj);
        meta.insert("name".into(), json!(name));
        if rt.namespaced {
            meta.insert("namespace".into(), json!(namespace));
        } else {
            meta.remove("namespace");
        }
        if meta
            .get("uid")
            .and_then(Value::as_str)
            .is_none_or(str::is_empty)
        {
            meta.insert("uid".into(), json!(new_uid()));
        }
        if !meta.contains_key("creationTimestamp") || meta["creationTimestamp"].is_null() {
            meta.insert("creationTimestamp".into(), json!(now_rfc3339()));
        }
        if rt.tracks_generation && !meta.get("generation").is_some_and(Value::is_u64) {
            meta.insert("generation".into(), json!(1));
        }
        meta.insert("resourceVersion".into(), json!(resource_version));
    }

    fn list(
        &self,
        rt: &'static ResourceType,
        namespace: Option<&str>,
        params: &Params,
    ) -> Result<Value, ApiError> {
        let labels = params
            .non_empty("labelSelector")
            .map(LabelSelector::parse)
            .transpose()
            .map_err(|e| ApiError::bad_request(format!("unable to parse requirement: {e}")))?;
        let fields = FieldSelector::parse(params.get("fieldSelector"));
        let limit = match params.non_empty("limit") {
            None => None,
            Some(text) => Some(text.parse::<usize>().map_err(|_| {
                ApiError::bad_request(format!("invalid value for limit: {text:?}"))
            })?),
        }
        .filter(|limit| *limit > 0);
        let start_after = params
            .non_empty("continue")
            .map(decode_continue)
            .transpose()?;

        let matching: Vec<(&ObjectKey, &Value)> = self
            .objects_of(rt)
            .filter(|((_, ns, _), _)| namespace.is_none_or(|want| want == ns))
            .filter(|((_, ns, name), _)| {
                start_after
                    .as_ref()
                    .is_none_or(|(after_ns, after_name)| (ns, name) > (after_ns, after_name))
            })
            .filter(|(_, obj)| {
                let obj_labels = obj.pointer("/metadata/labels").and_then(Value::as_object);
                labels.as_ref().is_none_or(|sel| sel.matches(obj_labels)) && fields.matches(obj)
            })
            .collect();
        let page_len = limit.map_or(matching.len(), |l| l.min(matching.len()));
        let (page, rest) = matching.split_at(page_len);

        let mut metadata = json!({ "resourceVersion": self.resource_version.to_string() });
        if let (Some(((_, ns, name), _)), false) = (page.last(), rest.is_empty()) {
            metadata["continue"] = json!(encode_continue(ns, name));
            metadata["remainingItemCount"] = json!(rest.len());
        }
        Ok(json!({
            "kind": rt.list_kind(),
            "apiVersion": rt.api_version(),
            "metadata": metadata,
            "items": page.iter().map(|(_, obj)| (*obj).clone()).collect::<Vec<_>>(),
        }))
    }

    /// Watches are not implemented; this is the hook where a streaming response would go.
    fn watch(
        &self,
        _rt: &'static ResourceType,
        _namespace: Option<&str>,
    ) -> Result<Value, ApiError> {
        Err(
            ApiError::new(405, "watch is not supported by the fake API server")
                .with_details(json!({})),
        )
    }

    fn get(
        &self,
        rt: &'static ResourceType,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Value, ApiError> {
        self.objects
            .get(&key(rt, namespace, name))
            .cloned()
            .ok_or_else(|| ApiError::not_found(rt, name))
    }

    fn create(
        &mut self,
        rt: &'static ResourceType,
        namespace: Option<&str>,
        mut obj: Value,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        check_type(rt, &obj)?;
        let namespace = if rt.namespaced {
            let Some(namespace) = namespace else {
                return Err(ApiError::method_not_allowed());
            };
            if str_at(&obj, "/metadata/namespace").is_some_and(|ns| ns != namespace) {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            namespace
        } else {
            ""
        };
        let name = match (
            str_at(&obj, "/metadata/name"),
            str_at(&obj, "/metadata/generateName"),
        ) {
            (Some(name), _) => name.to_owned(),
            (None, Some(prefix)) => format!("{prefix}{}", name_suffix()),
            (None, None) => {
                return Err(ApiError::invalid(
                    rt,
                    "",
                    "metadata.name: Required value: name or generateName is required",
                ));
            }
        };
        validate_name(rt, &name)?;
        let key = key(rt, Some(namespace), &name);
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(rt, &name));
        }
        // Server-owned identity is never taken from the client.
        let meta = metadata_mut(&mut obj);
        for field in ["uid", "creationTimestamp", "generation", "resourceVersion"] {
            meta.remove(field);
        }
        if rt.status_subresource {
            obj["status"] = json!({});
        }
        self.stamp_new(rt, &mut obj, namespace, &name, !dry_run);
        if !dry_run {
            self.objects.insert(key, obj.clone());
        }
        Ok(obj)
    }

    /// Shared tail of PUT and PATCH: preconditions, server-owned fields, generation and
    /// resourceVersion bookkeeping, then the store.
    fn commit_update(
        &mut self,
        rt: &'static ResourceType,
        key: ObjectKey,
        old: &Value,
        incoming: Value,
        status_only: bool,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let name = key.2.as_str();
        check_identity(rt, &key, &incoming)?;
        let old_rv = str_at(old, "/metadata/resourceVersion").unwrap_or_default();
        if str_at(&incoming, "/metadata/resourceVersion").is_some_and(|rv| rv != old_rv) {
            return Err(ApiError::stale(rt, name));
        }
        let old_uid = str_at(old, "/metadata/uid").unwrap_or_default();
        if let Some(uid) = str_at(&incoming, "/metadata/uid")
            && uid != old_uid
        {
            return Err(ApiError::conflict(
                rt,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {old_uid}"
                ),
            ));
        }

        let mut new = if status_only {
            let mut new = old.clone();
            set_or_remove(&mut new, "status", incoming.get("status").cloned());
            new
        } else {
            let mut new = incoming;
            if rt.status_subresource {
                set_or_remove(&mut new, "status", old.get("status").cloned());
            }
            new
        };
        new["apiVersion"] = json!(rt.api_version());
        new["kind"] = json!(rt.kind);
        let old_meta = old.get("metadata").and_then(Value::as_object);
        let spec_changed = old.get("spec") != new.get("spec");
        let meta = metadata_mut(&mut new);
        for field in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "generation",
            "resourceVersion",
        ] {
            match old_meta.and_then(|m| m.get(field)) {
                Some(value) => meta.insert(field.to_owned(), value.clone()),
                None => meta.remove(field),
            };
        }
        if rt.tracks_generation && spec_changed {
            let generation = meta.get("generation").and_then(Value::as_u64).unwrap_or(0);
            meta.insert("generation".into(), json!(generation + 1));
        }
        if new == *old {
            // Like the real storage layer: an update that changes nothing is not written.
            return Ok(new);
        }
        if !dry_run {
            let resource_version = self.next_resource_version();
            metadata_mut(&mut new).insert("resourceVersion".into(), json!(resource_version));
            self.objects.insert(key, new.clone());
        }
        Ok(new)
    }

    fn replace(
        &mut self,
        rt: &'static ResourceType,
        namespace: Option<&str>,
        name: &str,
        status_only: bool,
        body: Value,
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let key = key(rt, namespace, name);
        // The body is validated against the URL before the lookup, as the real handler does.
        check_identity(rt, &key, &body)?;
        let old = self
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(rt, name))?;
        self.commit_update(rt, key, &old, body, status_only, dry_run)
    }

    #[allow(clippy::too_many_arguments)]
    fn patch(
        &mut self,
        rt: &'static ResourceType,
        namespace: Option<&str>,
        name: &str,
        status_only: bool,
        content_type: Option<&str>,
        body: &[u8],
        params: &Params,
    ) -> Result<(u16, Value), ApiError> {
        let kind = PatchKind::from_content_type(content_type)?;
        let patch: Value = serde_json::from_slice(body).map_err(|e| {
            ApiError::bad_request(format!("couldn't decode the patch as JSON: {e}"))
        })?;
        if kind == PatchKind::Apply && params.non_empty("fieldManager").is_none() {
            return Err(ApiError::bad_request(
                "PATCH, application/apply-patch+yaml: fieldManager is required for apply requests",
            ));
        }
        let dry_run = params.dry_run();
        let key = key(rt, namespace, name);
        let Some(old) = self.objects.get(&key).cloned() else {
            if kind == PatchKind::Apply && !status_only {
                if str_at(&patch, "/metadata/name").is_some_and(|n| n != name) {
                    return Err(ApiError::bad_request(format!(
                        "the name of the object does not match the name on the URL ({name})"
                    )));
                }
                let mut obj = patch;
                metadata_mut(&mut obj).insert("name".into(), json!(name));
                return self.create(rt, namespace, obj, dry_run).map(|o| (201, o));
            }
            return Err(ApiError::not_found(rt, name));
        };
        let mut new = old.clone();
        match kind {
            PatchKind::Json => json_patch(&mut new, &patch)?,
            PatchKind::Merge => json_merge(&mut new, &patch),
            PatchKind::Strategic | PatchKind::Apply => {
                let Value::Object(patch) = &patch else {
                    return Err(ApiError::bad_request(
                        "a strategic merge patch must be a JSON object",
                    ));
                };
                if let Value::Object(target) = &mut new {
                    strategic_merge(target, patch).map_err(|e| ApiError::new(422, e))?;
                }
            }
        }
        self.commit_update(rt, key, &old, new, status_only, dry_run)
            .map(|obj| (200, obj))
    }

    fn delete(
        &mut self,
        rt: &'static ResourceType,
        namespace: Option<&str>,
        name: &str,
        body: &[u8],
        dry_run: bool,
    ) -> Result<Value, ApiError> {
        let options = if body.iter().all(u8::is_ascii_whitespace) {
            Value::Null
        } else {
            parse_object(body)?
        };
        let key = key(rt, namespace, name);
        let old = self
            .objects
            .get(&key)
            .ok_or_else(|| ApiError::not_found(rt, name))?;
        let old_rv = str_at(old, "/metadata/resourceVersion").unwrap_or_default();
        let old_uid = str_at(old, "/metadata/uid").unwrap_or_default();
        if let Some(rv) = str_at(&options, "/preconditions/resourceVersion")
            && rv != old_rv
        {
            return Err(ApiError::conflict(
                rt,
                name,
                &format!(
                    "Precondition failed: ResourceVersion in precondition: {rv}, ResourceVersion in object meta: {old_rv}"
                ),
            ));
        }
        if let Some(uid) = str_at(&options, "/preconditions/uid")
            && uid != old_uid
        {
            return Err(ApiError::conflict(
                rt,
                name,
                &format!(
                    "Precondition failed: UID in precondition: {uid}, UID in object meta: {old_uid}"
                ),
            ));
        }
        let mut details = ApiError::object_details(rt, name);
        details["uid"] = json!(old_uid);
        if !dry_run {
            self.objects.remove(&key);
        }
        // Built-in types answer an immediate delete with a Success Status, not the object.
        Ok(json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": details,
        }))
    }

    fn delete_collection(
        &mut self,
        rt: &'static ResourceType,
        namespace: Option<&str>,
        params: &Params,
    ) -> Result<Value, ApiError> {
        let mut everything = Params(
            params
                .0
                .iter()
                .filter(|(k, _)| k != "limit" && k != "continue")
                .cloned()
                .collect(),
        );
        everything.0.push(("limit".into(), "0".into()));
        let list = self.list(rt, namespace, &everything)?;
        if !params.dry_run() {
            for item in list["items"].as_array().into_iter().flatten() {
                let ns = str_at(item, "/metadata/namespace");
                let name = str_at(item, "/metadata/name").unwrap_or_default();
                self.objects.remove(&key(rt, ns, name));
            }
        }
        Ok(list)
    }

    /// Answers one request (faults already handled).
    fn dispatch(
        &mut self,
        local_addr: SocketAddr,
        method: &str,
        path: &str,
        query: Option<&str>,
        content_type: Option<&str>,
        body: &[u8],
    ) -> Reply {
        if let Some(reply) = discovery(local_addr, method, path) {
            return reply;
        }
        let Some(target) = route(path) else {
            return ApiError::route_not_found().into();
        };
        let params = Params::parse(query);
        let dry_run = params.dry_run();
        let result = match (method, target) {
            ("GET", Target::Collection { rt, namespace }) if params.is_watch() => {
                self.watch(rt, namespace.as_deref()).map(|v| (200, v))
            }
            ("GET", Target::Collection { rt, namespace }) => self
                .list(rt, namespace.as_deref(), &params)
                .map(|v| (200, v)),
            ("POST", Target::Collection { rt, namespace }) => parse_object(body)
                .and_then(|obj| self.create(rt, namespace.as_deref(), obj, dry_run))
                .map(|v| (201, v)),
            ("DELETE", Target::Collection { rt, namespace })
                if namespace.is_some() || !rt.namespaced =>
            {
                self.delete_collection(rt, namespace.as_deref(), &params)
                    .map(|v| (200, v))
            }
            (
                _,
                Target::Object {
                    subresource: Some(sub),
                    ..
                },
            ) if sub != "status" => Err(ApiError::route_not_found()),
            ("GET", Target::Object { rt, namespace, .. }) if params.is_watch() => {
                self.watch(rt, namespace.as_deref()).map(|v| (200, v))
            }
            (
                "GET",
                Target::Object {
                    rt,
                    namespace,
                    name,
                    ..
                },
            ) => self.get(rt, namespace.as_deref(), &name).map(|v| (200, v)),
            (
                "PUT",
                Target::Object {
                    rt,
                    namespace,
                    name,
                    subresource,
                },
            ) => parse_object(body)
                .and_then(|obj| {
                    self.replace(
                        rt,
                        namespace.as_deref(),
                        &name,
                        subresource.is_some(),
                        obj,
                        dry_run,
                    )
                })
                .map(|v| (200, v)),
            (
                "PATCH",
                Target::Object {
                    rt,
                    namespace,
                    name,
                    subresource,
                },
            ) => self.patch(
                rt,
                namespace.as_deref(),
                &name,
                subresource.is_some(),
                content_type,
                body,
                &params,
            ),
            (
                "DELETE",
                Target::Object {
                    rt,
                    namespace,
                    name,
                    subresource: None,
                },
            ) => self
                .delete(rt, namespace.as_deref(), &name, body, dry_run)
                .map(|v| (200, v)),
            _ => Err(ApiError::method_not_allowed()),
        };
        match result {
            Ok((code, value)) => Reply::json(code, &value),
            Err(err) => err.into(),
        }
    }
}

/// Version, health and discovery endpoints, derived from [`RESOURCES`].
fn discovery(local_addr: SocketAddr, method: &str, path: &str) -> Option<Reply> {
    if method != "GET" {
        return None;
    }
    let resource_list = |group: &str, version: &str| {
        let group_version = if group.is_empty() {
            version.to_owned()
        } else {
            format!("{group}/{version}")
        };
        let mut resources = Vec::new();
        for rt in RESOURCES
            .iter()
            .filter(|rt| rt.group == group && rt.version == version)
        {
            resources.push(json!({
                "name": rt.plural,
                "singularName": rt.kind.to_ascii_lowercase(),
                "namespaced": rt.namespaced,
                "kind": rt.kind,
                "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update"],
            }));
            resources.push(json!({
                "name": format!("{}/status", rt.plural),
                "singularName": "",
                "namespaced": rt.namespaced,
                "kind": rt.kind,
                "verbs": ["get", "patch", "update"],
            }));
        }
        if resources.is_empty() {
            return None;
        }
        Some(Reply::json(
            200,
            &json!({
                "kind": "APIResourceList",
                "apiVersion": "v1",
                "groupVersion": group_version,
                "resources": resources,
            }),
        ))
    };
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["version"] => Some(Reply::json(
            200,
            &json!({
                "major": "1",
                "minor": "33",
                "gitVersion": "v1.33.0-fake",
                "gitCommit": "0000000000000000000000000000000000000000",
                "gitTreeState": "clean",
                "buildDate": "2025-01-01T00:00:00Z",
                "goVersion": "go1.24",
                "compiler": "gc",
                "platform": "linux/amd64",
            }),
        )),
        ["healthz" | "livez" | "readyz"] => Some(Reply::text(200, "ok")),
        ["api"] => Some(Reply::json(
            200,
            &json!({
                "kind": "APIVersions",
                "versions": ["v1"],
                "serverAddressByClientCIDRs": [
                    { "clientCIDR": "0.0.0.0/0", "serverAddress": local_addr.to_string() }
                ],
            }),
        )),
        ["apis"] => {
            let mut groups: Vec<&str> = RESOURCES
                .iter()
                .map(|rt| rt.group)
                .filter(|g| !g.is_empty())
                .collect();
            groups.dedup();
            let groups: Vec<Value> = groups
                .into_iter()
                .map(|g| {
                    let version = json!({ "groupVersion": format!("{g}/v1"), "version": "v1" });
                    json!({ "name": g, "versions": [version.clone()], "preferredVersion": version })
                })
                .collect();
            Some(Reply::json(
                200,
                &json!({ "kind": "APIGroupList", "apiVersion": "v1", "groups": groups }),
            ))
        }
        ["api", version] => resource_list("", version),
        ["apis", group, version] => resource_list(group, version),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Server
// ---------------------------------------------------------------------------------------------

/// State shared between the handle and the server tasks.
struct Shared {
    addr: SocketAddr,
    state: Mutex<State>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("FakeApi state mutex poisoned")
    }

    async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        let received_at = Instant::now();
        let (parts, body) = request.into_parts();
        let method = parts.method.as_str().to_owned();
        let path = parts.uri.path().to_owned();
        let query = parts.uri.query().map(str::to_owned);
        let content_type = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let (body, read_error) = match body.collect().await {
            Ok(collected) => (collected.to_bytes(), None),
            Err(e) => (Bytes::new(), Some(e)),
        };
        let recorded_body = if body.is_empty() {
            None
        } else {
            Some(
                serde_json::from_slice(&body)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned())),
            )
        };

        let faults = self.lock().roll_faults(&method, &path);
        if !faults.latency.is_zero() {
            tokio::time::sleep(faults.latency).await;
        }

        let mut state = self.lock();
        let reply = match (faults.error, read_error) {
            (Some(err), _) => err.into(),
            (None, Some(e)) => {
                ApiError::bad_request(format!("failed to read request body: {e}")).into()
            }
            (None, None) => state.dispatch(
                self.addr,
                &method,
                &path,
                query.as_deref(),
                content_type.as_deref(),
                &body,
            ),
        };
        state.requests.push(RecordedRequest {
            method,
            path,
            query,
            content_type,
            body: recorded_body,
            status: reply.status,
            received_at,
        });
        drop(state);
        reply.into_response()
    }
}

async fn serve(listener: TcpListener, shared: Arc<Shared>, mut shutdown: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            // Resolves on `stop()` and when the last `FakeApi` handle is dropped.
            _ = shutdown.wait_for(|stopped| *stopped) => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                tokio::spawn(serve_connection(stream, shared.clone(), shutdown.clone()));
            }
            // Transient accept errors (e.g. EMFILE); back off briefly instead of spinning.
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

async fn serve_connection(
    stream: TcpStream,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<bool>,
) {
    // Without this every small response waits on Nagle + delayed ACK (~40 ms per request).
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |request| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(shared.handle(request).await) }
    });
    let connection = http1::Builder::new().serve_connection(TokioIo::new(stream), service);
    tokio::select! {
        // Client-side I/O errors are of no interest to a fake server.
        _ = connection => {}
        _ = shutdown.wait_for(|stopped| *stopped) => {}
    }
}

/// Owns the shutdown signal; dropping the last handle stops the server.
struct Handle {
    shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.shutdown.send_replace(true);
    }
}

/// A fake Kubernetes API server listening on a local port.
///
/// Cheap to clone (all clones share one server); the server stops on [`FakeApi::stop`] or when
/// the last clone is dropped. All methods are synchronous and safe to call from any thread.
#[derive(Clone)]
pub struct FakeApi {
    inner: Arc<Handle>,
}

impl std::fmt::Debug for FakeApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeApi")
            .field("addr", &self.inner.shared.addr)
            .finish_non_exhaustive()
    }
}

impl FakeApi {
    /// Starts a server on an ephemeral port of 127.0.0.1. Must be called inside a Tokio runtime.
    pub async fn start() -> io::Result<FakeApi> {
        Self::start_on(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))).await
    }

    /// Starts a server on `addr` (port 0 picks a free port).
    pub async fn start_on(addr: SocketAddr) -> io::Result<FakeApi> {
        let listener = TcpListener::bind(addr).await?;
        let shared = Arc::new(Shared {
            addr: listener.local_addr()?,
            state: Mutex::new(State::default()),
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        tokio::spawn(serve(listener, shared.clone(), shutdown_rx));
        Ok(FakeApi {
            inner: Arc::new(Handle { shared, shutdown }),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.shared.lock()
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr())
    }

    pub fn addr(&self) -> SocketAddr {
        self.inner.shared.addr
    }

    /// Writes a kubeconfig pointing at this server (plain HTTP, no credentials, namespace
    /// `default`), for code that loads its client config from `KUBECONFIG`.
    pub fn write_kubeconfig(&self, path: &Path) -> io::Result<()> {
        let kubeconfig = format!(
            "apiVersion: v1\n\
             kind: Config\n\
             clusters:\n\
             - name: fake\n  cluster:\n    server: {url}\n\
             contexts:\n\
             - name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: default\n\
             current-context: fake\n\
             users:\n\
             - name: fake\n  user: {{}}\n\
             preferences: {{}}\n",
            url = self.url()
        );
        std::fs::write(path, kubeconfig)
    }

    /// Seeds (or overwrites) an object of any supported kind, bypassing the HTTP layer.
    ///
    /// `kind` and `metadata.name` are required, `metadata.namespace` defaults to `default` for
    /// namespaced kinds. Sets a fresh `resourceVersion`, and `uid`, `creationTimestamp` and
    /// (for apps kinds) `generation: 1` unless present. `status` is kept as given.
    ///
    /// # Panics
    /// On an unsupported `kind`/`apiVersion` or a missing name: it is a bug in the test.
    pub fn insert(&self, obj: Value) {
        let kind = str_at(&obj, "/kind")
            .unwrap_or_else(|| panic!("FakeApi::insert: object has no kind: {obj}"));
        let rt = resource_by_kind(kind, str_at(&obj, "/apiVersion"))
            .unwrap_or_else(|| panic!("FakeApi::insert: unsupported kind {kind:?}"));
        let name = str_at(&obj, "/metadata/name")
            .unwrap_or_else(|| panic!("FakeApi::insert: object has no metadata.name: {obj}"))
            .to_owned();
        let namespace = if rt.namespaced {
            str_at(&obj, "/metadata/namespace")
                .unwrap_or("default")
                .to_owned()
        } else {
            String::new()
        };
        let mut obj = obj;
        let mut state = self.state();
        state.stamp_new(rt, &mut obj, &namespace, &name, true);
        state.objects.insert(key(rt, Some(&namespace), &name), obj);
    }

    /// The stored object, if any. `resource` is the plural (`deployments`), singular or kind;
    /// `ns` is ignored for cluster-scoped resources.
    ///
    /// # Panics
    /// On an unsupported resource name.
    pub fn get(&self, resource: &str, ns: &str, name: &str) -> Option<Value> {
        let rt = resource_for_name_or_panic(resource);
        self.state().objects.get(&key(rt, Some(ns), name)).cloned()
    }

    /// All stored objects of a resource, sorted by (namespace, name).
    pub fn list_objects(&self, resource: &str) -> Vec<Value> {
        let rt = resource_for_name_or_panic(resource);
        self.state()
            .objects_of(rt)
            .map(|(_, obj)| obj.clone())
            .collect()
    }

    /// Deletes an object out of band; returns it if it existed.
    pub fn remove(&self, resource: &str, ns: &str, name: &str) -> Option<Value> {
        let rt = resource_for_name_or_panic(resource);
        self.state().objects.remove(&key(rt, Some(ns), name))
    }

    /// Mutates a stored object out of band, as another controller would: bumps its
    /// `resourceVersion` (and `generation` if `spec` changed). Returns the new object, or
    /// `None` if it does not exist. Handy to make a client's cached copy stale.
    pub fn modify(
        &self,
        resource: &str,
        ns: &str,
        name: &str,
        f: impl FnOnce(&mut Value),
    ) -> Option<Value> {
        let rt = resource_for_name_or_panic(resource);
        let mut state = self.state();
        let key = key(rt, Some(ns), name);
        let old = state.objects.get(&key)?.clone();
        let mut new = old.clone();
        f(&mut new);
        let spec_changed = old.get("spec") != new.get("spec");
        let resource_version = state.next_resource_version();
        let meta = metadata_mut(&mut new);
        meta.insert("resourceVersion".into(), json!(resource_version));
        if rt.tracks_generation && spec_changed {
            let generation = meta.get("generation").and_then(Value::as_u64).unwrap_or(0);
            meta.insert("generation".into(), json!(generation + 1));
        }
        state.objects.insert(key, new.clone());
        Some(new)
    }

    /// The last resourceVersion handed out (what a list would report).
    pub fn resource_version(&self) -> u64 {
        self.state().resource_version
    }

    /// Adds a fault rule; rules are evaluated in insertion order (see [`Fault`]).
    pub fn add_fault(&self, fault: Fault) {
        self.state().faults.push(fault);
    }

    pub fn clear_faults(&self) {
        self.state().faults.clear();
    }

    /// Stops accepting connections and closes open ones. Stored state stays inspectable.
    pub fn stop(&self) {
        self.inner.shutdown.send_replace(true);
    }
}

impl Recording for FakeApi {
    fn with_log<R>(&self, f: impl FnOnce(&mut RequestLog) -> R) -> R {
        f(&mut self.state().requests)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A response read off the wire by [`send`].
    #[derive(Debug)]
    struct Resp {
        status: u16,
        headers: Vec<(String, String)>,
        body: Value,
    }

    impl Resp {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }
    }

    /// Minimal HTTP/1.1 client: one request per connection, `Connection: close`, so the
    /// response is simply everything until EOF.
    async fn send(
        api: &FakeApi,
        method: &str,
        target: &str,
        content_type: Option<&str>,
        body: Option<&Value>,
    ) -> Resp {
        let body = body.map(Value::to_string).unwrap_or_default();
        let mut request = format!(
            "{method} {target} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\nContent-Length: {}\r\n",
            api.addr(),
            body.len()
        );
        if let Some(ct) = content_type {
            request.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        request.push_str("\r\n");
        request.push_str(&body);
        let mut stream = TcpStream::connect(api.addr()).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap();
        let raw = String::from_utf8(raw).unwrap();
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let mut lines = head.lines();
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let body = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_owned()));
        Resp {
            status,
            headers,
            body,
        }
    }

    async fn get(api: &FakeApi, target: &str) -> Resp {
        send(api, "GET", target, None, None).await
    }

    const SMP: &str = "application/strategic-merge-patch+json";
    const MERGE: &str = "application/merge-patch+json";
    const DEPLOY: &str = "/apis/apps/v1/namespaces/prod/deployments/web";

    fn names(list: &Value) -> Vec<String> {
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| {
                format!(
                    "{}/{}",
                    i["metadata"]["namespace"].as_str().unwrap(),
                    i["metadata"]["name"].as_str().unwrap()
                )
            })
            .collect()
    }

    #[tokio::test]
    async fn lists_across_pages_with_exact_query_recorded() {
        let api = FakeApi::start().await.unwrap();
        for (ns, name) in [("b", "x"), ("a", "z"), ("a", "y"), ("c", "w"), ("b", "a")] {
            api.insert(deployment(ns, name, &["img:1"]));
        }
        api.insert(statefulset("a", "not-a-deployment", &["img:1"]));

        let mut seen = Vec::new();
        let mut target = "/apis/apps/v1/deployments?&limit=2".to_owned();
        let mut pages = 0;
        loop {
            let resp = get(&api, &target).await;
            assert_eq!(resp.status, 200, "{:?}", resp.body);
            assert_eq!(resp.header("content-type"), Some("application/json"));
            assert_eq!(resp.body["kind"], "DeploymentList");
            assert_eq!(resp.body["apiVersion"], "apps/v1");
            assert_eq!(resp.body["metadata"]["resourceVersion"], "6");
            for item in resp.body["items"].as_array().unwrap() {
                assert_eq!(item["kind"], "Deployment");
                assert_eq!(item["apiVersion"], "apps/v1");
            }
            seen.extend(names(&resp.body));
            pages += 1;
            match resp.body["metadata"]["continue"]
                .as_str()
                .filter(|c| !c.is_empty())
            {
                Some(token) => {
                    target = format!("/apis/apps/v1/deployments?&limit=2&continue={token}")
                }
                None => break,
            }
        }
        assert_eq!(pages, 3);
        assert_eq!(seen, ["a/y", "a/z", "b/a", "b/x", "c/w"]);

        let requests = api.requests();
        assert_eq!(requests.len(), 3);
        assert_eq!(requests[0].method, "GET");
        assert_eq!(requests[0].path, "/apis/apps/v1/deployments");
        assert_eq!(requests[0].query.as_deref(), Some("&limit=2"));
        assert!(
            requests[1]
                .query
                .as_deref()
                .unwrap()
                .starts_with("&limit=2&continue=")
        );
        assert_eq!(requests[0].body, None);
        assert_eq!(requests[0].status, 200);
        assert_eq!(requests[1].query_param("limit").as_deref(), Some("2"));
        assert_eq!(api.count("GET", "/apis/apps/v1/deployments"), 3);
        assert_eq!(api.count("get", "/apis/apps/v1/statefulsets"), 0);

        // A namespaced list without a limit returns everything in one page.
        let resp = get(&api, "/apis/apps/v1/namespaces/a/deployments").await;
        assert_eq!(names(&resp.body), ["a/y", "a/z"]);
        assert!(resp.body["metadata"].get("continue").is_none());

        // Garbage continue tokens are a 400, like the real server.
        let resp = get(&api, "/apis/apps/v1/deployments?limit=1&continue=zz").await;
        assert_eq!(resp.status, 400);
        assert_eq!(resp.body["reason"], "BadRequest");

        api.clear_requests();
        assert!(api.requests().is_empty());
    }

    #[tokio::test]
    async fn filters_by_label_selector() {
        let api = FakeApi::start().await.unwrap();
        let labelled = |name: &str, labels: Value| {
            let mut d = deployment("ns", name, &["img"]);
            d["metadata"]["labels"] = labels;
            d
        };
        api.insert(labelled("a", json!({ "tier": "web", "env": "prod" })));
        api.insert(labelled("b", json!({ "tier": "db", "env": "prod" })));
        api.insert(labelled("c", json!({ "tier": "web" })));
        api.insert(deployment("other", "d", &["img"]));

        let cases = [
            ("tier%3Dweb", vec!["ns/a", "ns/c"]),
            ("tier%3D%3Dweb,env%3Dprod", vec!["ns/a"]),
            ("tier!%3Dweb", vec!["ns/b"]),
            ("tier+in+(db,web),env", vec!["ns/a", "ns/b"]),
            ("tier%20notin%20(db)", vec!["ns/a", "ns/c"]),
            ("!env", vec!["ns/c"]),
            ("env", vec!["ns/a", "ns/b"]),
        ];
        for (selector, want) in cases {
            let resp = get(
                &api,
                &format!(
                    "/apis/apps/v1/namespaces/ns/deployments?&limit=500&labelSelector={selector}"
                ),
            )
            .await;
            assert_eq!(resp.status, 200, "{selector}: {:?}", resp.body);
            assert_eq!(names(&resp.body), want, "selector {selector}");
        }

        let resp = get(&api, "/apis/apps/v1/deployments?labelSelector=app+in+d").await;
        assert_eq!(resp.status, 400);

        // fieldSelector on metadata.name is understood, other fields are ignored.
        let resp = get(
            &api,
            "/apis/apps/v1/deployments?fieldSelector=metadata.name%3Db,status.phase%3DRunning",
        )
        .await;
        assert_eq!(names(&resp.body), ["ns/b"]);
    }

    #[test]
    fn parses_label_selectors() {
        use Requirement::*;
        let sel = LabelSelector::parse("a=b, c==d,e!=f,g in (h, i),j notin (k),l,!m,example.com/n")
            .unwrap();
        assert_eq!(
            sel.0,
            vec![
                Equals("a".into(), "b".into()),
                Equals("c".into(), "d".into()),
                NotEquals("e".into(), "f".into()),
                In("g".into(), vec!["h".into(), "i".into()]),
                NotIn("j".into(), vec!["k".into()]),
                Exists("l".into()),
                DoesNotExist("m".into()),
                Exists("example.com/n".into()),
            ]
        );
        assert!(LabelSelector::parse("a in ()").is_err());
        assert!(LabelSelector::parse("a,").is_err());
        assert!(LabelSelector::parse("a < 3").is_err());
        assert!(LabelSelector::parse("").unwrap().matches(None));
    }

    #[tokio::test]
    async fn get_missing_object_is_a_not_found_status() {
        let api = FakeApi::start().await.unwrap();
        let resp = get(&api, "/apis/apps/v1/namespaces/prod/deployments/ghost").await;
        assert_eq!(resp.status, 404);
        assert_eq!(resp.header("content-type"), Some("application/json"));
        assert_eq!(
            resp.body,
            json!({
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": "deployments.apps \"ghost\" not found",
                "reason": "NotFound",
                "details": { "name": "ghost", "group": "apps", "kind": "deployments" },
                "code": 404,
            })
        );

        let resp = get(&api, "/api/v1/namespaces/prod/configmaps/ghost").await;
        assert_eq!(resp.body["message"], "configmaps \"ghost\" not found");
        assert!(resp.body["details"].get("group").is_none());

        for unknown in [
            "/apis/apps/v1/namespaces/prod/widgets",
            "/nope",
            "/api/v1/deployments",
        ] {
            let resp = get(&api, unknown).await;
            assert_eq!(resp.status, 404, "{unknown}");
            assert_eq!(resp.body["reason"], "NotFound");
        }

        api.insert(deployment("prod", "web", &["img"]));
        let resp = get(&api, DEPLOY).await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.body["metadata"]["generation"], 1);
        assert_eq!(
            resp.body["spec"]["template"]["spec"]["containers"][0]["name"],
            "c0"
        );

        let resp = get(&api, "/apis/apps/v1/deployments?watch=true").await;
        assert_eq!(resp.status, 405);
        assert_eq!(resp.body["reason"], "MethodNotAllowed");
        let resp = send(
            &api,
            "POST",
            DEPLOY,
            Some("application/json"),
            Some(&json!({})),
        )
        .await;
        assert_eq!(resp.status, 405);
    }

    #[tokio::test]
    async fn create_then_conflicting_create_and_replace() {
        let api = FakeApi::start().await.unwrap();
        let path = "/api/v1/namespaces/gar/configmaps";
        let cm = configmap("gar", "state", &[("k", "v1")]);

        let resp = send(
            &api,
            "POST",
            &format!("{path}?&fieldManager=gar"),
            Some("application/json"),
            Some(&cm),
        )
        .await;
        assert_eq!(resp.status, 201, "{:?}", resp.body);
        let created = resp.body;
        assert_eq!(created["metadata"]["resourceVersion"], "1");
        assert_eq!(created["kind"], "ConfigMap");
        assert!(created["metadata"]["uid"].as_str().unwrap().len() == 36);
        assert!(
            created["metadata"]["creationTimestamp"]
                .as_str()
                .unwrap()
                .ends_with('Z')
        );
        assert!(created["metadata"].get("generation").is_none());
        assert_eq!(api.get("configmaps", "gar", "state").unwrap(), created);

        let resp = send(&api, "POST", path, Some("application/json"), Some(&cm)).await;
        assert_eq!(resp.status, 409);
        assert_eq!(resp.body["reason"], "AlreadyExists");

        // PUT with the current resourceVersion succeeds and bumps it.
        let obj_path = format!("{path}/state");
        let mut update = created.clone();
        update["data"]["k"] = json!("v2");
        let resp = send(
            &api,
            "PUT",
            &format!("{obj_path}?"),
            Some("application/json"),
            Some(&update),
        )
        .await;
        assert_eq!(resp.status, 200, "{:?}", resp.body);
        assert_eq!(resp.body["metadata"]["resourceVersion"], "2");
        assert_eq!(resp.body["metadata"]["uid"], created["metadata"]["uid"]);

        // Replaying it with the now stale resourceVersion is a Conflict that changes nothing.
        update["data"]["k"] = json!("v3");
        let resp = send(
            &api,
            "PUT",
            &format!("{obj_path}?"),
            Some("application/json"),
            Some(&update),
        )
        .await;
        assert_eq!(resp.status, 409);
        assert_eq!(resp.body["reason"], "Conflict");
        assert_eq!(resp.body["code"], 409);
        assert_eq!(
            api.get("configmaps", "gar", "state").unwrap()["data"]["k"],
            "v2"
        );

        // Without a resourceVersion the PUT is unconditional.
        update["metadata"]
            .as_object_mut()
            .unwrap()
            .remove("resourceVersion");
        let resp = send(
            &api,
            "PUT",
            &obj_path,
            Some("application/json"),
            Some(&update),
        )
        .await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.body["data"]["k"], "v3");
        assert_eq!(resp.body["metadata"]["resourceVersion"], "3");

        let puts = api.requests_matching("PUT", &obj_path);
        assert_eq!(puts.len(), 3);
        assert_eq!(puts[0].query.as_deref(), Some(""));
        assert_eq!(puts[2].query, None);
        assert_eq!(puts[1].status, 409);
        assert_eq!(puts[1].content_type.as_deref(), Some("application/json"));
        assert_eq!(puts[1].body.as_ref().unwrap()["data"]["k"], "v3");

        let resp = send(
            &api,
            "PUT",
            &format!("{path}/missing"),
            Some("application/json"),
            Some(&update),
        )
        .await;
        assert_eq!(resp.status, 400, "name mismatch with the URL");

        // DELETE answers with a Success Status; the object is gone afterwards.
        let resp = send(&api, "DELETE", &obj_path, None, None).await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.body["status"], "Success");
        assert_eq!(resp.body["details"]["name"], "state");
        assert_eq!(get(&api, &obj_path).await.status, 404);
        assert_eq!(
            send(&api, "DELETE", &obj_path, None, None).await.status,
            404
        );
    }

    #[tokio::test]
    async fn patch_merges_annotations_and_bumps_versions() {
        let api = FakeApi::start().await.unwrap();
        let mut web = deployment("prod", "web", &["img:1", "sidecar:1"]);
        web["spec"]["template"]["metadata"]["annotations"] = json!({ "keep": "me" });
        web["status"] = json!({ "observedGeneration": 1 });
        api.insert(web);
        api.insert(configmap("prod", "unrelated", &[]));
        let before = api.get("deployments", "prod", "web").unwrap();
        assert_eq!(before["metadata"]["resourceVersion"], "1");

        let patch = json!({ "spec": { "template": { "metadata": { "annotations": {
            RESTARTED_AT_ANNOTATION: "2025-01-01T00:00:00Z"
        } } } } });
        let target = format!("{DEPLOY}?&fieldManager=gar-restarter");
        let resp = send(&api, "PATCH", &target, Some(SMP), Some(&patch)).await;
        assert_eq!(resp.status, 200, "{:?}", resp.body);
        let after = resp.body;
        assert_eq!(
            restarted_at(&after).as_deref(),
            Some("2025-01-01T00:00:00Z")
        );
        assert_eq!(
            after["spec"]["template"]["metadata"]["annotations"]["keep"],
            "me"
        );
        assert_eq!(
            after["spec"]["template"]["spec"]["containers"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        assert_eq!(after["metadata"]["resourceVersion"], "3");
        assert_eq!(after["metadata"]["generation"], 2);
        assert_eq!(after["status"], before["status"]);
        assert_eq!(api.get("deployments", "prod", "web").unwrap(), after);

        // The same patch again changes nothing and, like the real server, keeps the version.
        let resp = send(&api, "PATCH", &target, Some(SMP), Some(&patch)).await;
        assert_eq!(resp.body["metadata"]["resourceVersion"], "3");

        // A resourceVersion in the patch is a precondition.
        let guarded =
            json!({ "metadata": { "resourceVersion": "1", "annotations": { "x": "y" } } });
        let resp = send(&api, "PATCH", &target, Some(SMP), Some(&guarded)).await;
        assert_eq!(resp.status, 409);
        assert_eq!(resp.body["reason"], "Conflict");
        let guarded =
            json!({ "metadata": { "resourceVersion": "3", "annotations": { "x": "y" } } });
        let resp = send(&api, "PATCH", &target, Some(MERGE), Some(&guarded)).await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.body["metadata"]["resourceVersion"], "4");
        assert_eq!(
            resp.body["metadata"]["generation"], 2,
            "metadata-only change keeps generation"
        );

        // Strategic merge merges containers by name; JSON merge replaces the list.
        let image = json!({ "spec": { "template": { "spec": { "containers": [
            { "name": "c1", "image": "sidecar:2" }
        ] } } } });
        let resp = send(&api, "PATCH", DEPLOY, Some(SMP), Some(&image)).await;
        let containers = resp.body["spec"]["template"]["spec"]["containers"].clone();
        assert_eq!(
            containers,
            json!([{ "name": "c0", "image": "img:1" }, { "name": "c1", "image": "sidecar:2" }])
        );
        let resp = send(&api, "PATCH", DEPLOY, Some(MERGE), Some(&image)).await;
        assert_eq!(
            resp.body["spec"]["template"]["spec"]["containers"],
            json!([{ "name": "c1", "image": "sidecar:2" }])
        );
        assert_eq!(resp.body["metadata"]["generation"], 4);

        // null deletes.
        let delete =
            json!({ "spec": { "template": { "metadata": { "annotations": { "keep": null } } } } });
        let resp = send(&api, "PATCH", DEPLOY, Some(SMP), Some(&delete)).await;
        assert!(
            resp.body["spec"]["template"]["metadata"]["annotations"]
                .get("keep")
                .is_none()
        );

        // JSON patch works too; a failed test op is a 422.
        let ops = json!([{ "op": "replace", "path": "/spec/replicas", "value": 3 }]);
        let resp = send(
            &api,
            "PATCH",
            DEPLOY,
            Some("application/json-patch+json"),
            Some(&ops),
        )
        .await;
        assert_eq!(resp.body["spec"]["replicas"], 3);
        let ops = json!([{ "op": "test", "path": "/spec/replicas", "value": 1 }]);
        let resp = send(
            &api,
            "PATCH",
            DEPLOY,
            Some("application/json-patch+json"),
            Some(&ops),
        )
        .await;
        assert_eq!(resp.status, 422);

        let resp = send(
            &api,
            "PATCH",
            DEPLOY,
            Some("application/json"),
            Some(&patch),
        )
        .await;
        assert_eq!(resp.status, 415);
        assert_eq!(resp.body["reason"], "UnsupportedMediaType");
        let resp = send(
            &api,
            "PATCH",
            "/apis/apps/v1/namespaces/prod/deployments/nope",
            Some(SMP),
            Some(&patch),
        )
        .await;
        assert_eq!(resp.status, 404);

        let patches = api.patches();
        assert_eq!(patches.len(), 11);
        assert_eq!(
            patches[0].query.as_deref(),
            Some("&fieldManager=gar-restarter")
        );
        assert_eq!(patches[0].content_type.as_deref(), Some(SMP));
        assert_eq!(patches[0].body.as_ref(), Some(&patch));
        assert_eq!(patches[2].status, 409);
    }

    #[tokio::test]
    async fn status_writes_only_touch_status() {
        let api = FakeApi::start().await.unwrap();
        api.insert(deployment("prod", "web", &["img"]));
        let patch = json!({ "status": { "readyReplicas": 1 }, "spec": { "replicas": 9 } });
        let resp = send(
            &api,
            "PATCH",
            &format!("{DEPLOY}/status"),
            Some(MERGE),
            Some(&patch),
        )
        .await;
        assert_eq!(resp.status, 200);
        assert_eq!(resp.body["status"]["readyReplicas"], 1);
        assert_eq!(resp.body["spec"]["replicas"], 1);
        assert_eq!(resp.body["metadata"]["generation"], 1);
        assert_eq!(get(&api, &format!("{DEPLOY}/scale")).await.status, 404);
    }

    #[tokio::test]
    async fn injected_faults_fire_the_requested_number_of_times() {
        let api = FakeApi::start().await.unwrap();
        api.insert(deployment("prod", "web", &["img"]));
        api.add_fault(Fault {
            method: Some("PATCH".into()),
            path_contains: "/deployments/web".into(),
            status: Some(503),
            times: Some(2),
            retry_after: Some(7),
            ..Fault::default()
        });
        let patch = json!({ "metadata": { "labels": { "x": "y" } } });
        for _ in 0..2 {
            let resp = send(&api, "PATCH", DEPLOY, Some(SMP), Some(&patch)).await;
            assert_eq!(resp.status, 503);
            assert_eq!(resp.body["reason"], "ServiceUnavailable");
            assert_eq!(resp.body["kind"], "Status");
            assert_eq!(resp.header("retry-after"), Some("7"));
        }
        assert_eq!(
            api.get("deployments", "prod", "web").unwrap()["metadata"]["resourceVersion"],
            "1"
        );
        // GETs never matched the PATCH-only fault.
        assert_eq!(get(&api, DEPLOY).await.status, 200);
        let resp = send(&api, "PATCH", DEPLOY, Some(SMP), Some(&patch)).await;
        assert_eq!(resp.status, 200);
        let statuses: Vec<u16> = api.patches().iter().map(|r| r.status).collect();
        assert_eq!(statuses, [503, 503, 200]);

        // Reasons follow the code.
        for (code, reason) in [
            (429, "TooManyRequests"),
            (403, "Forbidden"),
            (500, "InternalError"),
            (409, "Conflict"),
        ] {
            api.add_fault(Fault::error("/deployments", code).times(1));
            let resp = get(&api, DEPLOY).await;
            assert_eq!(
                (resp.status, resp.body["reason"].as_str()),
                (code, Some(reason))
            );
            assert_eq!(resp.header("retry-after"), None);
        }

        // Probability zero never fires; clear_faults removes everything.
        api.add_fault(Fault::error("", 500).with_probability(0.0));
        assert_eq!(get(&api, DEPLOY).await.status, 200);
        api.add_fault(Fault::error("", 500));
        assert_eq!(get(&api, DEPLOY).await.status, 500);
        api.clear_faults();
        assert_eq!(get(&api, DEPLOY).await.status, 200);

        // Latency alone delays, then serves normally.
        api.add_fault(
            Fault::delay("/deployments/web", Duration::from_millis(200))
                .on_method("get")
                .times(1),
        );
        let started = std::time::Instant::now();
        let resp = get(&api, DEPLOY).await;
        assert!(started.elapsed() >= Duration::from_millis(200));
        assert_eq!(resp.status, 200);
        let started = std::time::Instant::now();
        get(&api, DEPLOY).await;
        assert!(started.elapsed() < Duration::from_millis(200));
    }

    #[tokio::test]
    async fn out_of_band_changes_make_clients_stale() {
        let api = FakeApi::start().await.unwrap();
        api.insert(deployment("prod", "web", &["img"]));
        let stale = api.get("deployment", "prod", "web").unwrap();
        let changed = api
            .modify("Deployment", "prod", "web", |d| {
                d["spec"]["replicas"] = json!(2)
            })
            .unwrap();
        assert_eq!(changed["metadata"]["generation"], 2);
        assert_eq!(api.resource_version(), 2);
        let resp = send(&api, "PUT", DEPLOY, Some("application/json"), Some(&stale)).await;
        assert_eq!(resp.status, 409);
        assert_eq!(api.list_objects("deployments").len(), 1);
        assert!(api.remove("deployments", "prod", "web").is_some());
        assert!(api.list_objects("deployments").is_empty());
    }

    #[tokio::test]
    async fn stops_serving_and_writes_kubeconfig() {
        let api = FakeApi::start().await.unwrap();
        assert!(api.url().starts_with("http://127.0.0.1:"));
        let path = std::env::temp_dir().join(format!("fake-api-kubeconfig-{}", api.addr().port()));
        api.write_kubeconfig(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert!(text.contains(&format!("server: {}", api.url())));
        assert!(text.contains("namespace: default"));

        assert_eq!(get(&api, "/version").await.body["major"], "1");
        assert_eq!(
            get(&api, "/apis/apps/v1").await.body["resources"][0]["name"],
            "deployments"
        );

        let addr = api.addr();
        api.stop();
        let mut refused = false;
        for _ in 0..50 {
            if TcpStream::connect(addr).await.is_err() {
                refused = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(refused, "server still accepting after stop()");
    }

    #[test]
    fn formats_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(19_783), (2024, 3, 1));
        assert_eq!(civil_from_days(11_016), (2000, 2, 29));
    }
}

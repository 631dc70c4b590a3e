//! The objects and the API semantics on them: list, get, create, replace, patch, delete.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use serde_json::{Value, json};

use super::discovery::discovery;
use super::object::{
    ObjectKey, hex_decode, hex_encode, metadata_mut, name_suffix, new_uid, now_rfc3339,
    set_or_remove, str_at,
};
use super::patch::{PatchKind, json_merge, json_patch, strategic_merge};
use super::reply::{ApiError, Reply};
use super::resources::ResourceType;
use super::routing::{Params, Target, route};
use super::selectors::{FieldSelector, LabelSelector};
use super::validation::{check_identity, check_type, parse_object, validate_name};
use crate::traffic::{Fault, RequestLog};

pub(super) fn encode_continue(namespace: &str, name: &str) -> String {
    hex_encode(format!("{namespace}\0{name}").as_bytes())
}

pub(super) fn decode_continue(token: &str) -> Result<(String, String), ApiError> {
    let invalid = || ApiError::bad_request(format!("continue key is not valid: {token:?}"));
    let raw = hex_decode(token).ok_or_else(invalid)?;
    let text = String::from_utf8(raw).map_err(|_| invalid())?;
    let (namespace, name) = text.split_once('\0').ok_or_else(invalid)?;
    Ok((namespace.to_owned(), name.to_owned()))
}

#[derive(Default)]
pub(super) struct State {
    /// Keyed by (plural, namespace, name); namespace is empty for cluster-scoped objects.
    pub(super) objects: BTreeMap<ObjectKey, Value>,
    /// Last resourceVersion handed out (global across all resources, like etcd's revision).
    pub(super) resource_version: u64,
    pub(super) requests: RequestLog,
    pub(super) faults: Vec<Fault>,
}

/// What the fault rules decided for one request.
#[derive(Default)]
pub(super) struct FaultOutcome {
    pub(super) latency: Duration,
    pub(super) error: Option<ApiError>,
}

/// A `uid` precondition (in a PUT or PATCH body, or in DeleteOptions) that `old` must meet.
fn check_uid(
    rt: &ResourceType,
    name: &str,
    precondition: Option<&str>,
    old: &Value,
) -> Result<(), ApiError> {
    let old_uid = str_at(old, "/metadata/uid").unwrap_or_default();
    match precondition {
        Some(uid) if uid != old_uid => Err(ApiError::conflict(
            rt,
            name,
            &format!(
                "Precondition failed: UID in precondition: {uid}, UID in object meta: {old_uid}"
            ),
        )),
        _ => Ok(()),
    }
}

pub(super) fn key(rt: &'static ResourceType, namespace: Option<&str>, name: &str) -> ObjectKey {
    let namespace = if rt.namespaced {
        namespace.unwrap_or_default()
    } else {
        ""
    };
    (rt.plural, namespace.to_owned(), name.to_owned())
}

impl State {
    pub(super) fn next_resource_version(&mut self) -> String {
        self.resource_version += 1;
        self.resource_version.to_string()
    }

    pub(super) fn objects_of(
        &self,
        rt: &'static ResourceType,
    ) -> impl Iterator<Item = (&ObjectKey, &Value)> {
        self.objects
            .range((rt.plural, String::new(), String::new())..)
            .take_while(move |((plural, _, _), _)| *plural == rt.plural)
    }

    pub(super) fn roll_faults(&mut self, method: &str, path: &str) -> FaultOutcome {
        let rolled = crate::traffic::roll(&mut self.faults, method, path);
        FaultOutcome {
            latency: rolled.latency,
            error: rolled
                .status
                .or(rolled.expire_watch.then_some((410, None)))
                .map(|(code, retry_after)| ApiError::injected(code, retry_after)),
        }
    }

    /// Fills in the server-owned fields of an object that is being created.
    pub(super) fn stamp_new(
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

    pub(super) fn list(
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
    pub(super) fn watch(
        &self,
        _rt: &'static ResourceType,
        _namespace: Option<&str>,
    ) -> Result<Value, ApiError> {
        Err(
            ApiError::new(405, "watch is not supported by the fake API server")
                .with_details(json!({})),
        )
    }

    pub(super) fn get(
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

    pub(super) fn create(
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
    pub(super) fn commit_update(
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
        check_uid(rt, name, str_at(&incoming, "/metadata/uid"), old)?;

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

    pub(super) fn replace(
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
    pub(super) fn patch(
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

    pub(super) fn delete(
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
        check_uid(rt, name, str_at(&options, "/preconditions/uid"), old)?;
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

    pub(super) fn delete_collection(
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
    pub(super) fn dispatch(
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

//! The three patch algorithms: JSON merge (RFC 7386), strategic merge, JSON patch
//! (RFC 6902).

use serde_json::{Map, Value};

use super::reply::ApiError;

#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum PatchKind {
    Json,
    Merge,
    Strategic,
    Apply,
}

impl PatchKind {
    pub(super) fn from_content_type(content_type: Option<&str>) -> Result<Self, ApiError> {
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
pub(super) fn json_merge(target: &mut Value, patch: &Value) {
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
pub(super) fn merge_key(field: &str) -> Option<&'static str> {
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
pub(super) fn is_scalar_merge_list(field: &str) -> bool {
    field == "finalizers"
}

/// Drops strategic-merge directives (`$patch`, `$setElementOrder/...`, ...) from a value that
/// is being inserted verbatim.
pub(super) fn strip_directives(value: &Value) -> Value {
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

pub(super) fn directive(map: &Map<String, Value>) -> Option<&str> {
    map.get("$patch").and_then(Value::as_str)
}

/// A strategic merge patch: JSON merge semantics plus element-wise merging of the well-known
/// keyed lists ([`merge_key`]) and the `$patch: replace|delete` / `$deleteFromPrimitiveList`
/// directives. Enough for what controllers send; not the full upstream algorithm.
pub(super) fn strategic_merge(
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

pub(super) fn merge_keyed_list(
    list: &mut Vec<Value>,
    items: &[Value],
    merge_key: &str,
) -> Result<(), String> {
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
pub(super) fn split_pointer(pointer: &str) -> Result<(&str, String), String> {
    let idx = pointer
        .rfind('/')
        .ok_or_else(|| format!("invalid JSON pointer {pointer:?}"))?;
    let token = pointer[idx + 1..].replace("~1", "/").replace("~0", "~");
    Ok((&pointer[..idx], token))
}

pub(super) fn pointer_add(doc: &mut Value, pointer: &str, value: Value) -> Result<(), String> {
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

pub(super) fn pointer_remove(doc: &mut Value, pointer: &str) -> Result<Value, String> {
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
pub(super) fn json_patch(doc: &mut Value, patch: &Value) -> Result<(), ApiError> {
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

//! Rejecting request bodies the real API server would reject.

use serde_json::Value;

use super::object::{ObjectKey, str_at};
use super::reply::ApiError;
use super::resources::ResourceType;

pub(super) fn parse_object(body: &[u8]) -> Result<Value, ApiError> {
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
pub(super) fn check_type(rt: &ResourceType, obj: &Value) -> Result<(), ApiError> {
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
pub(super) fn check_identity(
    rt: &ResourceType,
    key: &ObjectKey,
    obj: &Value,
) -> Result<(), ApiError> {
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
pub(super) fn validate_name(rt: &ResourceType, name: &str) -> Result<(), ApiError> {
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

//! Version, health and discovery endpoints.

use std::net::SocketAddr;

use serde_json::{Value, json};

use super::reply::Reply;
use super::resources::RESOURCES;

/// Version, health and discovery endpoints, derived from [`RESOURCES`].
pub(super) fn discovery(local_addr: SocketAddr, method: &str, path: &str) -> Option<Reply> {
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

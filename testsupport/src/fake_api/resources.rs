//! The resource types the fake serves, and finding them by path, name or kind.

/// Static description of a resource type the fake serves.
#[derive(Debug)]
pub(super) struct ResourceType {
    /// API group; empty for the core (`/api/v1`) group.
    pub(super) group: &'static str,
    pub(super) version: &'static str,
    pub(super) plural: &'static str,
    pub(super) kind: &'static str,
    pub(super) namespaced: bool,
    /// Whether the API server maintains `metadata.generation` (bumped when `spec` changes).
    pub(super) tracks_generation: bool,
    /// Whether `status` is a subresource, so writes to the main resource cannot change it.
    pub(super) status_subresource: bool,
}

impl ResourceType {
    pub(super) fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub(super) fn list_kind(&self) -> String {
        format!("{}List", self.kind)
    }

    /// `deployments.apps` / `configmaps`: the name the API server uses in error messages.
    pub(super) fn qualified(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_owned()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

pub(super) const fn apps(plural: &'static str, kind: &'static str) -> ResourceType {
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

pub(super) const fn plain(
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

pub(super) static RESOURCES: &[ResourceType] = &[
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

pub(super) fn resource_by_path(
    group: &str,
    version: &str,
    plural: &str,
) -> Option<&'static ResourceType> {
    RESOURCES
        .iter()
        .find(|rt| rt.group == group && rt.version == version && rt.plural == plural)
}

/// Lookup for the test-facing API: accepts the plural (`deployments`), the singular
/// (`deployment`) or the kind (`Deployment`).
pub(super) fn resource_by_name(name: &str) -> Option<&'static ResourceType> {
    RESOURCES
        .iter()
        .find(|rt| rt.plural == name || rt.kind.eq_ignore_ascii_case(name))
}

pub(super) fn resource_by_kind(
    kind: &str,
    api_version: Option<&str>,
) -> Option<&'static ResourceType> {
    RESOURCES
        .iter()
        .find(|rt| rt.kind == kind && api_version.is_none_or(|v| v == rt.api_version()))
}

pub(super) fn resource_for_name_or_panic(resource: &str) -> &'static ResourceType {
    resource_by_name(resource)
        .unwrap_or_else(|| panic!("FakeApi: unsupported resource {resource:?}"))
}

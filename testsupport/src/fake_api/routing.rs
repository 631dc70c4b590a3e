//! What a request path addresses, and its query parameters.

use super::resources::{ResourceType, resource_by_path};

/// What a resource path addresses.
pub(super) enum Target {
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

pub(super) fn route(path: &str) -> Option<Target> {
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
pub(super) struct Params(pub(super) Vec<(String, String)>);

impl Params {
    pub(super) fn parse(query: Option<&str>) -> Self {
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

    pub(super) fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub(super) fn non_empty(&self, key: &str) -> Option<&str> {
        self.get(key).filter(|v| !v.is_empty())
    }

    pub(super) fn is_watch(&self) -> bool {
        matches!(self.get("watch"), Some("true" | "1"))
    }

    pub(super) fn dry_run(&self) -> bool {
        self.get("dryRun") == Some("All")
    }
}

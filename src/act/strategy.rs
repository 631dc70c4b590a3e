//! How a workload is made to run a pushed tag: the strategy (`restart` or `pin-digest`), and
//! the pull-policy rules that decide whether a plain restart can start the old image again.

use std::fmt;

use clap::ValueEnum;

pub use crate::index::workload::PullPolicy;

/// Per workload, `gar-restarter/strategy` on its metadata; `--strategy` is the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum Strategy {
    /// `kubectl rollout restart`'s PATCH plus the `gar-restarter/*` annotations. A container
    /// whose effective pull policy is `IfNotPresent` or `Never` may start the old image again
    /// on a node that has it cached: flagged as a stale-image risk.
    #[default]
    Restart,
    /// One PATCH that sets each matching container's image to `REPO:TAG@sha256:…` (and writes
    /// the same annotations): the pods run exactly the pushed digest, whatever the policy.
    PinDigest,
}

impl Strategy {
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Restart => "restart",
            Strategy::PinDigest => "pin-digest",
        }
    }

    /// The value of a `gar-restarter/strategy` annotation, trimmed and case-insensitive;
    /// `Err` carries the value as written, for the log line that names it.
    pub fn from_annotation(raw: &str) -> Result<Self, String> {
        let v = raw.trim().to_ascii_lowercase();
        match v.as_str() {
            "restart" => Ok(Strategy::Restart),
            "pin-digest" => Ok(Strategy::PinDigest),
            _ => Err(crate::util::excerpt::quote(raw)),
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The policy the kubelet applies to `image` (as the pod spec writes it) with `declared` (see
/// [`PullPolicy::declared`]) set or not, by Kubernetes' defaulting (`SetDefaults_Container`):
/// unset means `Always` when the tag is `latest` or there is neither tag nor digest, else
/// `IfNotPresent`.
pub fn effective_pull_policy(image: &str, declared: Option<PullPolicy>) -> PullPolicy {
    match declared {
        Some(p) => p,
        None => {
            let (name, digest) = match image.trim().split_once('@') {
                Some((n, d)) => (n, Some(d)),
                None => (image.trim(), None),
            };
            match (written_tag(name), digest) {
                (Some("latest"), _) | (None, None) => PullPolicy::Always,
                _ => PullPolicy::IfNotPresent,
            }
        }
    }
}

/// The tag as written in `name` (no digest): what follows the last `:` after the last `/`.
fn written_tag(name: &str) -> Option<&str> {
    let colon = name.rfind(':')?;
    match name.rfind('/') {
        Some(slash) if slash > colon => None,
        _ => Some(&name[colon + 1..]),
    }
}

/// The image a pin-digest PATCH writes for a container that runs `written` (as the pod spec
/// has it): the same spelling without any digest, then `@digest`, so that the admission
/// policy (`deploy/components/admission-policy`) sees the same repository and tag. A written
/// image without a tag gets `fallback_tag` (the pushed one), so that it stays indexed.
pub fn pinned_image(written: &str, fallback_tag: &str, digest: &str) -> String {
    let base = written
        .trim()
        .split_once('@')
        .map_or(written.trim(), |(n, _)| n);
    match written_tag(base) {
        Some(_) => format!("{base}@{digest}"),
        None => format!("{base}:{fallback_tag}@{digest}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pull_policy_defaulting_follows_kubernetes() {
        use PullPolicy::*;
        let cases = [
            ("nginx", None, Always),
            ("nginx:latest", None, Always),
            ("gcr.io/p/app:latest", None, Always),
            ("localhost:5000/app", None, Always),
            ("localhost:5000/app:v1", None, IfNotPresent),
            ("gcr.io/p/app:v1", None, IfNotPresent),
            ("gcr.io/p/app:v1", Some(""), IfNotPresent),
            ("gcr.io/p/app@sha256:ab", None, IfNotPresent),
            ("gcr.io/p/app:latest@sha256:ab", None, Always),
            ("gcr.io/p/app:v1@sha256:ab", None, IfNotPresent),
            ("gcr.io/p/app:v1", Some("Always"), Always),
            ("gcr.io/p/app:latest", Some("IfNotPresent"), IfNotPresent),
            ("nginx", Some("Never"), Never),
            ("nginx", Some(" Never "), Never),
            ("nginx", Some("Sometimes"), IfNotPresent),
        ];
        for (image, policy, want) in cases {
            assert_eq!(
                effective_pull_policy(image, policy.and_then(PullPolicy::declared)),
                want,
                "{image} {policy:?}"
            );
        }
        assert!(IfNotPresent.may_reuse_cached() && Never.may_reuse_cached());
        assert!(!Always.may_reuse_cached());
    }

    #[test]
    fn pinned_images_keep_the_written_repository_and_tag() {
        let d = "sha256:0123";
        assert_eq!(
            pinned_image("europe-docker.pkg.dev/p/r/app:v1", "v1", d),
            "europe-docker.pkg.dev/p/r/app:v1@sha256:0123"
        );
        // Re-pinning replaces the old digest.
        assert_eq!(
            pinned_image("europe-docker.pkg.dev/p/r/app:v1@sha256:9999", "v1", d),
            "europe-docker.pkg.dev/p/r/app:v1@sha256:0123"
        );
        assert_eq!(
            pinned_image("localhost:5000/app", "latest", d),
            "localhost:5000/app:latest@sha256:0123"
        );
    }

    #[test]
    fn annotation_values() {
        assert_eq!(Strategy::from_annotation("restart"), Ok(Strategy::Restart));
        assert_eq!(
            Strategy::from_annotation(" Pin-Digest "),
            Ok(Strategy::PinDigest)
        );
        assert!(Strategy::from_annotation("pin_digest").is_err());
        assert!(Strategy::from_annotation("").is_err());
    }
}

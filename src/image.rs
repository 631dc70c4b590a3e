//! Image references, normalised with Docker's rules so that a pushed tag and a pod spec's
//! `image:` compare as plain strings.
//!
//! Parsing is delegated to `oci-spec`'s distribution `Reference` (a port of Docker's own
//! `distribution/reference` grammar: `docker.io` default, `library/` prefix, `latest` default,
//! `index.docker.io` folded into `docker.io`). We add the two rules it leaves out: repository
//! names must be lowercase, and a digest beats a tag.

use std::fmt;
use std::str::FromStr;

use oci_spec::distribution::Reference;

/// Longest reference we accept; Docker caps the name at 255 and a tag at 128 characters.
const MAX_REFERENCE_LEN: usize = 512;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageRefError {
    #[error("image reference {0:?} is empty")]
    Empty(String),
    #[error("image reference {input:?} is invalid: {reason}")]
    Invalid { input: String, reason: String },
}

/// What a normalised reference points at.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Tag(String),
    Digest(String),
}

/// A fully normalised image reference, e.g. `docker.io/library/nginx:latest`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    /// `registry/repository`, e.g. `us-west1-docker.pkg.dev/p/r/app`.
    name: String,
    target: Target,
    /// The canonical string, cached because it is the index key on the hot path.
    canonical: String,
}

impl ImageRef {
    pub fn parse(input: &str) -> Result<Self, ImageRefError> {
        let trimmed = input.trim();
        if trimmed.is_empty() {
            return Err(ImageRefError::Empty(input.to_string()));
        }
        let invalid = |reason: &str| ImageRefError::Invalid {
            input: input.to_string(),
            reason: reason.to_string(),
        };
        if trimmed.len() > MAX_REFERENCE_LEN {
            return Err(invalid("longer than 512 characters"));
        }
        let parsed = Reference::from_str(trimmed).map_err(|e| invalid(&e.to_string()))?;
        let repository = parsed.repository();
        if repository.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(invalid("repository name must be lowercase"));
        }
        let name = format!("{}/{}", parsed.registry(), repository);
        let target = match (parsed.digest(), parsed.tag()) {
            (Some(digest), _) => {
                validate_digest(digest).map_err(invalid)?;
                Target::Digest(digest.to_string())
            }
            (None, Some(tag)) => Target::Tag(tag.to_string()),
            (None, None) => Target::Tag("latest".to_string()),
        };
        let canonical = match &target {
            Target::Tag(t) => format!("{name}:{t}"),
            Target::Digest(d) => format!("{name}@{d}"),
        };
        Ok(Self {
            name,
            target,
            canonical,
        })
    }

    /// `registry/repository` without tag or digest.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    pub fn tag(&self) -> Option<&str> {
        match &self.target {
            Target::Tag(t) => Some(t),
            Target::Digest(_) => None,
        }
    }

    pub fn digest(&self) -> Option<&str> {
        match &self.target {
            Target::Digest(d) => Some(d),
            Target::Tag(_) => None,
        }
    }

    /// The normalised string used as the index key.
    pub fn as_str(&self) -> &str {
        &self.canonical
    }
}

/// `oci-spec` accepts any `algo:hex` shape; a push event only ever carries sha256/sha512.
fn validate_digest(digest: &str) -> Result<(), &'static str> {
    let (algo, hex) = digest
        .split_once(':')
        .ok_or("digest has no algorithm prefix")?;
    let want = match algo {
        "sha256" => 64,
        "sha512" => 128,
        _ => return Err("digest algorithm must be sha256 or sha512"),
    };
    if hex.len() != want || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return Err("digest is not lowercase hex of the right length");
    }
    Ok(())
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical)
    }
}

impl FromStr for ImageRef {
    type Err = ImageRefError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn normalisation_table() {
        let cases: &[(&str, &str)] = &[
            ("nginx", "docker.io/library/nginx:latest"),
            ("nginx:1.27", "docker.io/library/nginx:1.27"),
            ("library/nginx", "docker.io/library/nginx:latest"),
            ("docker.io/nginx", "docker.io/library/nginx:latest"),
            ("index.docker.io/nginx:1", "docker.io/library/nginx:1"),
            ("index.docker.io/acme/web", "docker.io/acme/web:latest"),
            ("acme/web:v2", "docker.io/acme/web:v2"),
            ("quay.io/acme/web", "quay.io/acme/web:latest"),
            ("localhost/web", "localhost/web:latest"),
            ("localhost:5000/a/b:c", "localhost:5000/a/b:c"),
            ("registry:5000/web", "registry:5000/web:latest"),
            (
                "us-west1-docker.pkg.dev/p/r/app:1.1",
                "us-west1-docker.pkg.dev/p/r/app:1.1",
            ),
            ("gcr.io/p/app", "gcr.io/p/app:latest"),
            ("  gcr.io/p/app:v1 ", "gcr.io/p/app:v1"),
        ];
        for (input, want) in cases {
            let got = ImageRef::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(got.as_str(), *want, "input {input}");
        }
    }

    #[test]
    fn digest_wins_over_tag() {
        let r = ImageRef::parse(&format!("gcr.io/p/app:v1@{D}")).unwrap();
        assert_eq!(r.as_str(), format!("gcr.io/p/app@{D}"));
        assert_eq!(r.digest(), Some(D));
        assert_eq!(r.tag(), None);
        let r = ImageRef::parse(&format!("nginx@{D}")).unwrap();
        assert_eq!(r.as_str(), format!("docker.io/library/nginx@{D}"));
    }

    #[test]
    fn rejects_invalid_references() {
        for bad in [
            "",
            "   ",
            "UPPER/x",
            "gcr.io/Proj/app:v1",
            "a b",
            "gcr.io/x/y:",
            "gcr.io/x/y@sha256:abc",
            "gcr.io/x/y@md5:0123456789abcdef0123456789abcdef",
            "gcr.io//y",
            ":tag",
            "app:-bad",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad:?} should be rejected");
        }
        let long = format!("gcr.io/{}", "a".repeat(600));
        assert!(ImageRef::parse(&long).is_err());
    }

    #[test]
    fn errors_name_the_input() {
        let e = ImageRef::parse("a b").unwrap_err().to_string();
        assert!(e.contains("\"a b\""), "{e}");
    }
}

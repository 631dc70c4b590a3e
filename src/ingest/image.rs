//! Image references, normalised with Docker's rules so that a pushed tag and a pod spec's
//! `image:` compare as plain strings.
//!
//! The grammar is Docker's `distribution/reference` (domain, lowercase path components with
//! `.`, `_`, `__` or `-` separators, `[\w][\w.-]{0,127}` tags, `algo:hex` digests) and
//! normalisation is its `ParseNormalizedNamed`: no domain means `docker.io`, a single path
//! component under `docker.io` gets `library/`, `index.docker.io` is `docker.io`, no tag means
//! `latest`; we add that a digest beats a tag.
//!
//! Hand-written rather than `oci-spec`'s regex-based `Reference`: that one costs ~30 µs per
//! reference, which alone would miss the per-message budget (2 µs) fifteen-fold. `oci-spec`
//! stays as the test oracle: a differential property test checks that both accept the same
//! references and normalise them the same way.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Docker caps the name (domain + path) at 255 characters.
const MAX_NAME_LEN: usize = 255;
/// Longest input we look at; anything longer is rejected before parsing.
const MAX_REFERENCE_LEN: usize = 512;

/// `input` is held as an [`excerpt::quote`](crate::util::excerpt::quote): the reference may come
/// from a hostile payload, and the error ends up in logs and `dlq_reason`.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageRefError {
    #[error("image reference {0} is empty")]
    Empty(String),
    #[error("image reference {input} is invalid: {reason}")]
    Invalid { input: String, reason: String },
}

/// A fully normalised image reference, e.g. `docker.io/library/nginx:latest`.
///
/// Only the canonical string is stored; name, tag and digest are slices of it. It is shared
/// (`Arc<str>`): the live view holds each reference in the container that runs it and again
/// as its map key, and a clone costs a reference count, not a copy.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    /// `registry/repository` followed by `:tag` or `@digest`: the index key on the hot path.
    canonical: Arc<str>,
    /// Length of `registry/repository`; the separator (`:` or `@`) follows it.
    name_len: usize,
}

impl ImageRef {
    pub fn parse(input: &str) -> Result<Self, ImageRefError> {
        Ok(Parsed::new(input)?.to_image_ref())
    }

    /// `registry/repository` without tag or digest.
    pub fn name(&self) -> &str {
        &self.canonical[..self.name_len]
    }

    /// What the reference points at.
    pub fn target(&self) -> Target<'_> {
        let rest = &self.canonical[self.name_len + 1..];
        if self.canonical.as_bytes()[self.name_len] == b'@' {
            Target::Digest(rest)
        } else {
            Target::Tag(rest)
        }
    }

    pub fn tag(&self) -> Option<&str> {
        self.target().tag()
    }

    pub fn digest(&self) -> Option<&str> {
        self.target().digest()
    }

    /// The normalised string used as the index key.
    pub fn as_str(&self) -> &str {
        &self.canonical
    }
}

/// The tag reference a pod template's `image` is indexed under, or `None`.
///
/// `repo:tag` (or `repo`, meaning `:latest`) is indexed under itself, and so is
/// `repo:tag@sha256:…`: that is what the `pin-digest` strategy writes, and the workload must
/// be found (and re-pinned) by the next push of the tag, though [`ImageRef::parse`] lets the
/// digest win. `repo@sha256:…` names no tag (pinned by hand): never indexed. Invalid: `None`.
pub fn index_key(image: &str) -> Option<ImageRef> {
    let parsed = Parsed::new(image).ok()?;
    if parsed.tag().is_some() {
        return Some(parsed.to_image_ref());
    }
    let (name_and_tag, _) = split_once_byte(image.trim(), b'@')?;
    let colon = rfind_byte(name_and_tag, b':')?;
    if rfind_byte(name_and_tag, b'/').is_some_and(|slash| slash > colon) {
        return None;
    }
    Parsed::new(name_and_tag).ok().map(|p| p.to_image_ref())
}

/// A validated reference still borrowed from its input: its parts are known, nothing is
/// allocated. The parse stage compares a message's tag and digest references through this and
/// builds an [`ImageRef`] only for the one it keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parsed<'a> {
    domain: &'a str,
    /// Docker Hub's implicit `library/` before a single-component path.
    library: bool,
    path: &'a str,
    target: Target<'a>,
}

/// What a normalised reference points at: a tag, or a digest (`sha256:…`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target<'a> {
    Tag(&'a str),
    Digest(&'a str),
}

impl<'a> Target<'a> {
    pub fn tag(self) -> Option<&'a str> {
        match self {
            Target::Tag(t) => Some(t),
            Target::Digest(_) => None,
        }
    }

    pub fn digest(self) -> Option<&'a str> {
        match self {
            Target::Digest(d) => Some(d),
            Target::Tag(_) => None,
        }
    }
}

impl<'a> Parsed<'a> {
    pub fn new(input: &'a str) -> Result<Self, ImageRefError> {
        let trimmed = input.trim();
        if trimmed.is_empty() {
            return Err(ImageRefError::Empty(crate::util::excerpt::quote(input)));
        }
        parse_normalized(trimmed).map_err(|reason| ImageRefError::Invalid {
            input: crate::util::excerpt::quote(input),
            reason: reason.to_string(),
        })
    }

    pub fn tag(&self) -> Option<&'a str> {
        self.target.tag()
    }

    pub fn digest(&self) -> Option<&'a str> {
        self.target.digest()
    }

    /// The normalised repository in two pieces, the implicit `library/` (or nothing) and the
    /// path as written: the one place that knows how the prefix is spelled.
    fn repository(&self) -> (&'static str, &'a str) {
        (if self.library { "library/" } else { "" }, self.path)
    }

    /// Whether both name the same normalised repository (`registry/repository`): `nginx` and
    /// `docker.io/library/nginx` do, though only one of them spells `library/`.
    pub fn same_name(&self, other: &Parsed<'_>) -> bool {
        let (ours, our_path) = self.repository();
        let (theirs, their_path) = other.repository();
        self.domain == other.domain
            && ours
                .bytes()
                .chain(our_path.bytes())
                .eq(theirs.bytes().chain(their_path.bytes()))
    }

    fn name_len(&self) -> usize {
        let (prefix, path) = self.repository();
        self.domain.len() + 1 + prefix.len() + path.len()
    }

    pub fn to_image_ref(&self) -> ImageRef {
        let name_len = self.name_len();
        let (separator, target) = match self.target {
            Target::Tag(t) => (':', t),
            Target::Digest(d) => ('@', d),
        };
        let mut canonical = String::with_capacity(name_len + 1 + target.len());
        let (prefix, path) = self.repository();
        canonical.push_str(self.domain);
        canonical.push('/');
        canonical.push_str(prefix);
        canonical.push_str(path);
        canonical.push(separator);
        canonical.push_str(target);
        ImageRef {
            canonical: Arc::from(canonical),
            name_len,
        }
    }
}

fn parse_normalized(s: &str) -> Result<Parsed<'_>, &'static str> {
    if s.len() > MAX_REFERENCE_LEN {
        return Err("longer than 512 characters");
    }
    let (name_and_tag, digest) = match split_once_byte(s, b'@') {
        Some((n, d)) => (n, Some(d)),
        None => (s, None),
    };
    // A tag follows the last ':' only when that comes after the last '/' (else it is a port).
    let last_slash = rfind_byte(name_and_tag, b'/');
    let (name, tag) = match rfind_byte(name_and_tag, b':') {
        Some(i) if last_slash.is_none_or(|j| i > j) => {
            (&name_and_tag[..i], Some(&name_and_tag[i + 1..]))
        }
        _ => (name_and_tag, None),
    };
    if let Some(t) = tag {
        validate_tag(t)?;
    }
    if let Some(d) = digest {
        validate_digest(d)?;
    }
    let (domain, path) = match split_once_byte(name, b'/') {
        Some((first, rest)) if looks_like_domain(first) => (first, rest),
        _ => ("docker.io", name),
    };
    validate_domain(domain)?;
    validate_path(path)?;
    let domain = if domain == "index.docker.io" {
        "docker.io"
    } else {
        domain
    };
    let library = domain == "docker.io" && !path.as_bytes().contains(&b'/');
    if !library && domain == "docker.io" && path.len() == 64 && is_hex(path) {
        return Err("a 64-character hex string is an image ID, not a repository");
    }
    let target = match (digest, tag) {
        (Some(d), _) => Target::Digest(d),
        (None, Some(t)) => Target::Tag(t),
        (None, None) => Target::Tag("latest"),
    };
    let parsed = Parsed {
        domain,
        library,
        path,
        target,
    };
    if parsed.name_len() > MAX_NAME_LEN {
        return Err("repository name longer than 255 characters");
    }
    Ok(parsed)
}

// Byte searches rather than `str::split_once(char)`: for the ~100-byte references of a push
// event, the char searcher's set-up cost was a quarter of all parse instructions (callgrind,
// BENCHMARKS.md). The separators are ASCII, so byte offsets are char boundaries.
fn split_once_byte(s: &str, sep: u8) -> Option<(&str, &str)> {
    let i = s.bytes().position(|b| b == sep)?;
    Some((&s[..i], &s[i + 1..]))
}

fn rfind_byte(s: &str, sep: u8) -> Option<usize> {
    s.bytes().rposition(|b| b == sep)
}

/// Docker's `splitDockerDomain`: the first component is a registry host if it has a dot or
/// a port, is `localhost`, or has uppercase letters (paths cannot).
fn looks_like_domain(first: &str) -> bool {
    first == "localhost"
        || first
            .bytes()
            .any(|b| b == b'.' || b == b':' || b.is_ascii_uppercase())
}

fn validate_domain(domain: &str) -> Result<(), &'static str> {
    let (host, port) = if let Some(rest) = domain.strip_prefix('[') {
        // [IPv6]:port
        let (inner, after) = rest.split_once(']').ok_or("unterminated IPv6 address")?;
        if inner.is_empty() || !inner.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
            return Err("invalid IPv6 address in registry host");
        }
        match after {
            "" => return Ok(()),
            p => (
                None,
                Some(p.strip_prefix(':').ok_or("invalid registry host")?),
            ),
        }
    } else {
        match split_once_byte(domain, b':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(domain), None),
        }
    };
    if let Some(host) = host {
        let valid = !host.is_empty()
            && host.as_bytes().split(|c| *c == b'.').all(|b| {
                !b.is_empty()
                    && b[0].is_ascii_alphanumeric()
                    && b[b.len() - 1].is_ascii_alphanumeric()
                    && b.iter().all(|x| x.is_ascii_alphanumeric() || *x == b'-')
            });
        if !valid {
            return Err("invalid registry host");
        }
    }
    if let Some(port) = port
        && (port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err("invalid registry port");
    }
    Ok(())
}

/// Path components: `[a-z0-9]+` joined by `.`, `_`, `__` or one or more `-`.
fn validate_path(path: &str) -> Result<(), &'static str> {
    if path.is_empty() {
        return Err("repository name is empty");
    }
    for b in path.as_bytes().split(|c| *c == b'/') {
        if b.is_empty() {
            return Err("repository name has an empty path component");
        }
        let mut i = 0;
        let mut prev_alnum = false;
        while i < b.len() {
            let c = b[i];
            if c.is_ascii_lowercase() || c.is_ascii_digit() {
                prev_alnum = true;
                i += 1;
                continue;
            }
            if c.is_ascii_uppercase() {
                return Err("repository name must be lowercase");
            }
            if !prev_alnum {
                return Err("repository name has a misplaced separator");
            }
            let sep_len = match c {
                b'.' => 1,
                b'_' if b.get(i + 1) == Some(&b'_') => 2,
                b'_' => 1,
                b'-' => b[i..].iter().take_while(|x| **x == b'-').count(),
                _ => return Err("repository name has an invalid character"),
            };
            i += sep_len;
            prev_alnum = false;
        }
        if !prev_alnum {
            return Err("repository name has a misplaced separator");
        }
    }
    Ok(())
}

/// `[\w][\w.-]{0,127}`.
fn validate_tag(tag: &str) -> Result<(), &'static str> {
    let b = tag.as_bytes();
    let word = |c: u8| c.is_ascii_alphanumeric() || c == b'_';
    if b.is_empty()
        || b.len() > 128
        || !word(b[0])
        || !b.iter().all(|c| word(*c) || *c == b'.' || *c == b'-')
    {
        return Err("invalid tag");
    }
    Ok(())
}

/// A push event only ever carries sha256/sha512, in lowercase hex of the right length.
fn validate_digest(digest: &str) -> Result<(), &'static str> {
    let (algo, hex) = split_once_byte(digest, b':').ok_or("digest has no algorithm prefix")?;
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

fn is_hex(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

impl AsRef<str> for ImageRef {
    fn as_ref(&self) -> &str {
        self.as_str()
    }
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

    #[test]
    fn index_keys_keep_the_tag_of_a_pinned_tag() {
        let d = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
        let key = |s: &str| index_key(s).map(|r| r.as_str().to_string());
        assert_eq!(key("gcr.io/p/app:v1").as_deref(), Some("gcr.io/p/app:v1"));
        assert_eq!(
            key("nginx").as_deref(),
            Some("docker.io/library/nginx:latest")
        );
        assert_eq!(
            key(&format!("gcr.io/p/app:v1@{d}")).as_deref(),
            Some("gcr.io/p/app:v1")
        );
        assert_eq!(
            key(&format!("localhost:5000/app:v2@{d}")).as_deref(),
            Some("localhost:5000/app:v2")
        );
        // No tag: pinned by hand, never indexed (a registry port is not a tag).
        assert_eq!(key(&format!("gcr.io/p/app@{d}")), None);
        assert_eq!(key(&format!("localhost:5000/app@{d}")), None);
        assert_eq!(key("gcr.io/p/app:v1@sha256:short"), None);
        assert_eq!(key("Not Valid"), None);
    }
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
            // Uppercase first component: a registry host (paths cannot be uppercase).
            ("Registry/app", "Registry/app:latest"),
            ("[::1]:5000/app:v1", "[::1]:5000/app:v1"),
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
            "docker.io/UPPER/x",
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
    fn same_name_compares_normalised_repositories() {
        let p = |s| Parsed::new(s).unwrap();
        let d = format!("docker.io/library/nginx@{D}");
        assert!(p("nginx:1").same_name(&p(&d)));
        assert!(p("index.docker.io/library/nginx").same_name(&p("nginx")));
        assert!(p("gcr.io/p/app:v1").same_name(&p("gcr.io/p/app")));
        assert!(!p("nginx").same_name(&p("docker.io/acme/nginx")));
        assert!(!p("gcr.io/p/app").same_name(&p("gcr.io/p/app2")));
        assert!(!p("gcr.io/p/app").same_name(&p("quay.io/p/app")));
    }

    #[test]
    fn errors_name_the_input() {
        let e = ImageRef::parse("a b").unwrap_err().to_string();
        assert!(e.contains("\"a b\""), "{e}");
    }

    mod differential {
        use super::*;
        use proptest::prelude::*;

        fn component() -> impl Strategy<Value = String> {
            proptest::string::string_regex("[a-z0-9]{1,6}([._-]{1,2}[a-z0-9]{1,4}){0,2}").unwrap()
        }

        fn reference() -> impl Strategy<Value = String> {
            let domain = prop_oneof![
                Just(String::new()),
                Just("docker.io/".to_string()),
                Just("index.docker.io/".to_string()),
                Just("localhost/".to_string()),
                Just("localhost:5000/".to_string()),
                Just("gcr.io/".to_string()),
                Just("us-west1-docker.pkg.dev/".to_string()),
                Just("Registry.Example.com:443/".to_string()),
            ];
            let path = proptest::collection::vec(component(), 1..4).prop_map(|c| c.join("/"));
            let tag = prop_oneof![
                Just(String::new()),
                proptest::string::string_regex(":[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}").unwrap(),
            ];
            let digest = prop_oneof![
                Just(String::new()),
                proptest::string::string_regex("@sha256:[a-f0-9]{64}").unwrap(),
            ];
            (domain, path, tag, digest).prop_map(|(d, p, t, g)| format!("{d}{p}{t}{g}"))
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(4000))]

            /// Our parser and oci-spec's agree on valid references and on their normal form.
            #[test]
            fn agrees_with_oci_spec(input in reference()) {
                // Docker treats a dotted first component as a host, but its anchored regex
                // then re-reads an invalid host such as `0.0_a` as a path; we reject those.
                let first = input.split('/').next().unwrap_or_default();
                prop_assume!(!(input.contains('/') && first.contains('.') && first.contains('_')));
                let ours = ImageRef::parse(&input);
                let theirs = oci_spec::distribution::Reference::from_str(&input);
                match (ours, theirs) {
                    (Ok(ours), Ok(theirs)) => {
                        prop_assert_eq!(ours.name(), format!("{}/{}", theirs.registry(), theirs.repository()));
                        match theirs.digest() {
                            Some(d) => prop_assert_eq!(ours.digest(), Some(d)),
                            None => prop_assert_eq!(ours.tag(), Some(theirs.tag().unwrap_or("latest"))),
                        }
                    }
                    (Err(e), Ok(_)) => prop_assert!(false, "we reject {input:?} that oci-spec accepts: {e}"),
                    (Ok(_), Err(e)) => prop_assert!(false, "we accept {input:?} that oci-spec rejects: {e}"),
                    (Err(_), Err(_)) => {}
                }
            }

            /// Arbitrary bytes never panic, and whatever is accepted is a fixed point.
            #[test]
            fn arbitrary_input_is_safe(input in "\\PC{0,80}") {
                if let Ok(r) = ImageRef::parse(&input) {
                    let again = ImageRef::parse(r.as_str()).unwrap();
                    prop_assert_eq!(again.as_str(), r.as_str());
                }
            }
        }
    }
}

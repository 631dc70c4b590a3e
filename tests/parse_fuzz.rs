//! Property tests for the two parsers that see untrusted input: the Pub/Sub payload
//! (`event::parse`) and image references (`ImageRef::parse`). Over 10,000 generated cases in
//! all: arbitrary bytes, JSON objects mixing valid and invalid fields, image-ish strings.
//! Neither parser may panic, and whatever they accept must satisfy the invariants the rest of
//! the pipeline relies on.

use gar_restarter::ingest::event::{self, Event, MAX_PAYLOAD_BYTES, ParseError};
use gar_restarter::ingest::image::{ImageRef, Target};
use proptest::prelude::*;
use serde_json::{Map, Value, json};

const HEX64: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

/// The invariants of an accepted reference.
fn check_image_ref(input: &str, r: &ImageRef) -> Result<(), TestCaseError> {
    let canonical = r.as_str();
    prop_assert_eq!(r.to_string(), canonical);
    // Normalising is idempotent: the canonical form parses back to the same reference.
    let again = ImageRef::parse(canonical);
    prop_assert_eq!(
        again.as_ref(),
        Ok(r),
        "{:?} normalised to {:?}, which does not re-parse to itself",
        input,
        canonical
    );
    prop_assert!(
        canonical.starts_with(r.name()),
        "{canonical} vs {}",
        r.name()
    );
    let (registry, repository) = r
        .name()
        .split_once('/')
        .ok_or_else(|| TestCaseError::fail(format!("name {:?} has no registry", r.name())))?;
    prop_assert!(!registry.is_empty() && !repository.is_empty());
    prop_assert!(
        !repository.bytes().any(|b| b.is_ascii_uppercase()),
        "repository of {canonical} is not lowercase"
    );
    match r.target() {
        Target::Tag(t) => {
            prop_assert_eq!(r.tag(), Some(t));
            prop_assert_eq!(r.digest(), None);
            prop_assert!(!t.is_empty());
            prop_assert_eq!(canonical, format!("{}:{t}", r.name()));
        }
        Target::Digest(d) => {
            prop_assert_eq!(r.digest(), Some(d));
            prop_assert_eq!(r.tag(), None);
            check_digest(d)?;
            prop_assert_eq!(canonical, format!("{}@{d}", r.name()));
        }
    }
    Ok(())
}

fn check_digest(d: &str) -> Result<(), TestCaseError> {
    let (algo, hex) = d
        .split_once(':')
        .ok_or_else(|| TestCaseError::fail(format!("digest {d:?} has no algorithm")))?;
    let want = match algo {
        "sha256" => 64,
        "sha512" => 128,
        other => return Err(TestCaseError::fail(format!("algorithm {other:?} in {d:?}"))),
    };
    prop_assert_eq!(hex.len(), want, "{}", d);
    prop_assert!(
        hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')),
        "{d}"
    );
    Ok(())
}

fn check_image_input(input: &str) -> Result<(), TestCaseError> {
    match ImageRef::parse(input) {
        Ok(r) => check_image_ref(input, &r),
        Err(e) => {
            prop_assert!(!e.to_string().is_empty());
            Ok(())
        }
    }
}

/// The invariants of a parsed payload; `fields` is the JSON object when the input was one.
fn check_event(data: &[u8], fields: Option<&Map<String, Value>>) -> Result<(), TestCaseError> {
    let parsed = event::parse(data);
    if data.len() > MAX_PAYLOAD_BYTES {
        prop_assert_eq!(parsed, Err(ParseError::TooLarge(data.len())));
        return Ok(());
    }
    let field = |name: &str| {
        fields
            .and_then(|f| f.get(name))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
    };
    match parsed {
        Err(e) => {
            prop_assert!(!e.to_string().is_empty());
            if let Some(f) = fields {
                let action = f.get("action").and_then(Value::as_str);
                if f.contains_key("action")
                    && !matches!(action, Some("INSERT" | "DELETE"))
                    && f.values().all(|v| v.is_string() || v.is_null())
                {
                    prop_assert!(
                        matches!(e, ParseError::UnknownAction(_) | ParseError::NotJson(_)),
                        "action {action:?} gave {e:?}"
                    );
                }
            }
        }
        Ok(Event::Insert { tag, digest }) => {
            prop_assert!(tag.tag().is_some(), "Insert without a tag: {tag}");
            check_image_ref(tag.as_str(), &tag)?;
            if let Some(f) = fields {
                prop_assert_eq!(f.get("action").and_then(Value::as_str), Some("INSERT"));
                let raw_tag = field("tag")
                    .ok_or_else(|| TestCaseError::fail("Insert from a payload without tag"))?;
                let reparsed = ImageRef::parse(raw_tag);
                prop_assert_eq!(reparsed.as_ref(), Ok(&tag));
                match (&digest, field("digest")) {
                    (Some(d), Some(raw)) => {
                        check_digest(d)?;
                        let r = ImageRef::parse(raw)
                            .map_err(|e| TestCaseError::fail(format!("digest field: {e}")))?;
                        prop_assert_eq!(r.digest(), Some(d.as_str()));
                        prop_assert_eq!(r.name(), tag.name(), "repository mismatch accepted");
                    }
                    (None, None) => {}
                    (d, raw) => {
                        return Err(TestCaseError::fail(format!(
                            "digest {d:?} from field {raw:?}"
                        )));
                    }
                }
            }
        }
        Ok(Event::InsertDigestOnly { digest }) => {
            prop_assert!(digest.digest().is_some(), "{digest}");
            check_image_ref(digest.as_str(), &digest)?;
            if let Some(f) = fields {
                prop_assert_eq!(f.get("action").and_then(Value::as_str), Some("INSERT"));
                prop_assert!(field("tag").is_none());
            }
        }
        Ok(Event::Delete { reference }) => {
            prop_assert!(ImageRef::parse(&reference).is_ok(), "{reference:?}");
            if let Some(f) = fields {
                prop_assert_eq!(f.get("action").and_then(Value::as_str), Some("DELETE"));
                let from_field = field("tag").or(field("digest"));
                prop_assert_eq!(from_field, Some(reference.as_str()));
            }
        }
    }
    Ok(())
}

/// Image-ish strings: mostly close to valid (registry, path, tag, digest, in mixed case and
/// with the odd bad character), plus arbitrary text.
fn image_ish() -> impl Strategy<Value = String> {
    let registry = prop_oneof![
        Just(String::new()),
        Just("gcr.io/".to_string()),
        Just("us-west1-docker.pkg.dev/p/".to_string()),
        Just("docker.io/".to_string()),
        Just("index.docker.io/".to_string()),
        Just("localhost:5000/".to_string()),
        Just("localhost/".to_string()),
        "[a-zA-Z0-9.-]{1,12}(:[0-9]{1,6})?/",
    ];
    let component = prop_oneof![
        4 => "[a-z0-9]{1,8}([._-][a-z0-9]{1,4})?",
        1 => "[A-Za-z0-9._-]{0,8}",
        1 => "library",
    ];
    let path = prop::collection::vec(component, 1..4).prop_map(|c| c.join("/"));
    let tag = prop_oneof![
        Just(String::new()),
        "[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}".prop_map(|t| format!(":{t}")),
        "[^@/]{0,6}".prop_map(|t| format!(":{t}")),
    ];
    let digest = prop_oneof![
        3 => Just(String::new()),
        2 => Just(format!("@sha256:{HEX64}")),
        1 => Just(format!("@sha512:{HEX64}{HEX64}")),
        1 => "[0-9a-fA-F]{0,70}".prop_map(|h| format!("@sha256:{h}")),
        1 => "[a-z0-9]{1,8}:[0-9a-f]{32,64}".prop_map(|d| format!("@{d}")),
    ];
    let structured = (registry, path, tag, digest).prop_map(|(r, p, t, d)| format!("{r}{p}{t}{d}"));
    prop_oneof![
        6 => structured,
        1 => ".{0,80}",
        1 => "[ \t]{0,2}[a-z./:@0-9]{0,40}[ \t]{0,2}",
    ]
}

/// A JSON value for the `tag` or `digest` field: usually an image-ish string, sometimes
/// absent, empty, or not a string at all.
fn field_value() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        6 => image_ish().prop_map(|s| Some(Value::String(s))),
        1 => Just(None),
        1 => Just(Some(json!(""))),
        1 => Just(Some(Value::Null)),
        1 => any::<i64>().prop_map(|n| Some(json!(n))),
        1 => Just(Some(json!(["gcr.io/p/app:v1"]))),
    ]
}

fn payload() -> impl Strategy<Value = Map<String, Value>> {
    let action = prop_oneof![
        4 => Just(Some(json!("INSERT"))),
        2 => Just(Some(json!("DELETE"))),
        1 => Just(None),
        1 => Just(Some(json!("insert"))),
        1 => "[A-Z]{0,8}".prop_map(|a| Some(json!(a))),
        1 => Just(Some(json!(1))),
    ];
    let extra = prop::option::of(("[a-z]{1,6}", ".{0,10}"));
    (action, field_value(), field_value(), extra).prop_map(|(action, tag, digest, extra)| {
        let mut m = Map::new();
        for (k, v) in [("action", action), ("tag", tag), ("digest", digest)] {
            if let Some(v) = v {
                m.insert(k.to_string(), v);
            }
        }
        if let Some((k, v)) = extra {
            m.entry(k).or_insert(json!(v));
        }
        m
    })
}

/// A payload whose tag and digest are valid and agree, with an occasional twist, so that a
/// good share of the cases reach the accepting paths.
fn mostly_valid_payload() -> impl Strategy<Value = Map<String, Value>> {
    let repo = "[a-z][a-z0-9]{0,6}(/[a-z0-9]{1,6}){0,2}";
    (
        repo,
        "[a-z0-9][a-z0-9._-]{0,10}",
        prop::sample::select(vec![
            "gcr.io/p",
            "us-west1-docker.pkg.dev/p/r",
            "docker.io",
            "localhost:5000",
        ]),
        0u8..6,
    )
        .prop_map(|(repo, tag, registry, twist)| {
            let name = format!("{registry}/{repo}");
            let mut m = Map::new();
            m.insert("action".into(), json!("INSERT"));
            m.insert("tag".into(), json!(format!("{name}:{tag}")));
            m.insert("digest".into(), json!(format!("{name}@sha256:{HEX64}")));
            match twist {
                0 => {
                    m.remove("digest");
                }
                1 => {
                    m.remove("tag");
                }
                2 => {
                    m.insert("action".into(), json!("DELETE"));
                }
                3 => {
                    m.insert("digest".into(), json!(format!("other/x@sha256:{HEX64}")));
                }
                _ => {}
            }
            m
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn arbitrary_bytes_never_panic(data in prop::collection::vec(any::<u8>(), 0..600)) {
        check_event(&data, None)?;
    }

    #[test]
    fn json_objects_with_mixed_fields(fields in payload()) {
        let data = serde_json::to_vec(&Value::Object(fields.clone())).expect("serialise");
        check_event(&data, Some(&fields))?;
    }

    #[test]
    fn mostly_valid_json_objects(fields in mostly_valid_payload()) {
        let data = serde_json::to_vec(&Value::Object(fields.clone())).expect("serialise");
        check_event(&data, Some(&fields))?;
    }

    #[test]
    fn image_references_normalise_idempotently(input in image_ish()) {
        check_image_input(&input)?;
    }
}

proptest! {
    // Each case allocates ~64 KiB; a few dozen cover both sides of the limit.
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn payloads_around_the_size_limit(extra in 0usize..64, over in any::<bool>()) {
        let len = if over { MAX_PAYLOAD_BYTES + 1 + extra } else { MAX_PAYLOAD_BYTES - extra };
        let prefix = br#"{"action":"INSERT","tag":"gcr.io/p/app:v1","pad":""#;
        let mut data = prefix.to_vec();
        data.resize(len - 2, b'x');
        data.extend_from_slice(b"\"}");
        prop_assert_eq!(data.len(), len);
        let parsed = event::parse(&data);
        if over {
            prop_assert_eq!(parsed, Err(ParseError::TooLarge(len)));
        } else {
            prop_assert!(matches!(parsed, Ok(Event::Insert { .. })), "{:?}", parsed);
        }
    }
}

/// Representative shapes the generators only hit by chance, checked every run.
#[test]
fn fixed_edge_cases_hold_the_invariants() {
    let inputs = [
        "",
        " ",
        "nginx",
        "NGINX",
        "Gcr.io/p/app",
        "gcr.io/p/app:",
        "gcr.io/p/app:v1@",
        "localhost:5000",
        "localhost:5000/a:b",
        "a/b/c/d/e/f:g",
        "docker.io/library/nginx:latest",
        "index.docker.io/library/nginx",
        "registry:99999999/x",
        "x@sha256:",
        "\u{0}",
        "é/app:v1",
    ];
    for input in inputs {
        check_image_input(input).unwrap_or_else(|e| panic!("{input:?}: {e}"));
    }
    for data in [
        &b"{}"[..],
        b"null",
        b"\"INSERT\"",
        b"{\"action\":null}",
        b"{\"action\":\"INSERT\",\"tag\":\"\",\"digest\":\"\"}",
        b"{\"action\":\"DELETE\",\"digest\":\"gcr.io/p/app\"}",
        b"\xff\xfe",
    ] {
        check_event(data, None).unwrap_or_else(|e| panic!("{data:?}: {e}"));
    }
}

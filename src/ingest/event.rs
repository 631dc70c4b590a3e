//! Parse stage: turns a GAR/GCR Pub/Sub payload into an [`Event`].
//!
//! The payload is `{"action":"INSERT"|"DELETE","digest":"…@sha256:…","tag":"…:v1"}`; `tag` is
//! absent on a digest-only push. Anything else is malformed and must be dead-lettered, so the
//! error says exactly what was wrong.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};

use crate::ingest::image::{ImageRef, ImageRefError, Parsed};
use crate::util::excerpt;
use crate::util::json::BorrowedStr;

/// Pub/Sub allows 10 MB, but a GAR event is a few hundred bytes: anything this big is not one.
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A tag was pushed: restart whatever runs that tag.
    Insert {
        tag: ImageRef,
        /// `sha256:…` of the pushed manifest, when the event carries it.
        digest: Option<String>,
    },
    /// A push by digest only: no running tag can have changed.
    InsertDigestOnly { digest: ImageRef },
    /// An image or tag was deleted: nothing to restart.
    Delete { reference: String },
}

impl Event {
    pub fn action(&self) -> &'static str {
        match self {
            Event::Insert { .. } | Event::InsertDigestOnly { .. } => "INSERT",
            Event::Delete { .. } => "DELETE",
        }
    }
}

/// Every string taken from the payload is held as an [`excerpt::quote`]: quoted, escaped and
/// bounded, so that neither a log line nor `dlq_reason` can echo a hostile payload whole.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("payload is {0} bytes, over the 64 KiB limit")]
    TooLarge(usize),
    #[error("payload is not a JSON object: {0}")]
    NotJson(String),
    /// Valid JSON (or its start) of another type: `what` names it ("an array", "a string"…).
    #[error("payload is {what}, not a JSON object: {excerpt}")]
    NotObject { what: &'static str, excerpt: String },
    #[error("payload has no \"action\" field")]
    MissingAction,
    #[error("unknown action {0} (expected INSERT or DELETE)")]
    UnknownAction(String),
    #[error("{action} event has neither \"tag\" nor \"digest\"")]
    NoReference { action: &'static str },
    #[error("field \"{field}\": {source}")]
    BadReference {
        field: &'static str,
        source: ImageRefError,
    },
    #[error("field \"tag\" is {0}, which is a digest reference, not a tag")]
    TagIsDigest(String),
    #[error("field \"digest\" is {0}, which carries no digest")]
    DigestWithoutDigest(String),
    #[error("tag {tag} and digest {digest} name different repositories")]
    RepositoryMismatch { tag: String, digest: String },
}

/// Borrows from the message bytes when the JSON strings have no escapes: no copies on the
/// hot path.
///
/// Deserialised by hand rather than derived: a derived struct also accepts a JSON *array* of
/// its fields in order (`["INSERT","…@sha256:…","…:v1"]`), which a fuzz run found restarting
/// workloads. [`PayloadVisitor`] implements `visit_map` only, so anything but an object is
/// an error from serde itself, whichever deserializer drives it.
struct Payload<'a> {
    action: Option<BorrowedStr<'a>>,
    digest: Option<BorrowedStr<'a>>,
    tag: Option<BorrowedStr<'a>>,
}

impl<'de: 'a, 'a> Deserialize<'de> for Payload<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(PayloadVisitor(PhantomData))
    }
}

struct PayloadVisitor<'a>(PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for PayloadVisitor<'a> {
    type Value = Payload<'a>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<M: MapAccess<'de>>(self, mut map: M) -> Result<Self::Value, M::Error> {
        let mut payload = Payload {
            action: None,
            digest: None,
            tag: None,
        };
        // Keys are compared after unescaping (`"t\u0061g"` is `tag`), as a derived struct does.
        while let Some(key) = map.next_key::<BorrowedStr<'de>>()? {
            let slot = match &*key.0 {
                "action" => &mut payload.action,
                "digest" => &mut payload.digest,
                "tag" => &mut payload.tag,
                _ => {
                    map.next_value::<IgnoredAny>()?;
                    continue;
                }
            };
            // A second copy of a field is refused, not silently preferred: two readers of one
            // payload (us and a human, or another tool) must not see different events.
            if slot.is_some() {
                return Err(de::Error::custom(format_args!(
                    "duplicate field {}",
                    excerpt::quote(&key.0)
                )));
            }
            *slot = map.next_value::<Option<BorrowedStr<'de>>>()?;
        }
        Ok(payload)
    }
}

/// What the first non-whitespace byte says a JSON text is, when it is not an object.
fn json_kind(data: &[u8]) -> Option<&'static str> {
    let first = data
        .iter()
        .find(|b| !matches!(b, b' ' | b'\t' | b'\n' | b'\r'))?;
    let what = match first {
        b'{' => return None,
        b'[' => "an array",
        b'"' => "a string",
        b'-' | b'0'..=b'9' => "a number",
        b't' | b'f' => "a boolean",
        b'n' => "null",
        _ => return None,
    };
    // Named only when it really is that JSON value (checked off the hot path: an event
    // starts with `{`); broken JSON is left to serde, whose error says where it breaks.
    serde_json::from_slice::<IgnoredAny>(data)
        .is_ok()
        .then_some(what)
}

pub fn parse(data: &[u8]) -> Result<Event, ParseError> {
    if data.len() > MAX_PAYLOAD_BYTES {
        return Err(ParseError::TooLarge(data.len()));
    }
    // Said up front for a clear reason (and without serde quoting a 60 KB string back); the
    // visitor would refuse these anyway.
    if let Some(what) = json_kind(data) {
        return Err(ParseError::NotObject {
            what,
            excerpt: excerpt::quote_bytes(data),
        });
    }
    let payload: Payload = serde_json::from_slice(data).map_err(|e| {
        let message = e.to_string();
        // serde's messages quote offending strings whole; keep a bounded excerpt only.
        ParseError::NotJson(if message.len() > excerpt::EXCERPT_BYTES {
            excerpt::quote(&message)
        } else {
            message
        })
    })?;
    // Registries have been seen to send `"tag": ""` for digest-only pushes; treat as absent.
    let tag = payload.tag.map(|t| t.0).filter(|t| !t.is_empty());
    let digest = payload.digest.map(|d| d.0).filter(|d| !d.is_empty());
    match payload.action.as_ref().map(|a| &*a.0) {
        None => Err(ParseError::MissingAction),
        Some("INSERT") => parse_insert(tag, digest),
        Some("DELETE") => match (tag, digest) {
            (None, None) => Err(ParseError::NoReference { action: "DELETE" }),
            (tag, digest) => {
                // Validated so that garbage is dead-lettered rather than acked as a delete.
                let reference = tag.or(digest).unwrap_or_default().into_owned();
                let field = if reference.contains('@') {
                    "digest"
                } else {
                    "tag"
                };
                Parsed::new(&reference)
                    .map_err(|source| ParseError::BadReference { field, source })?;
                Ok(Event::Delete { reference })
            }
        },
        Some(other) => Err(ParseError::UnknownAction(excerpt::quote(other))),
    }
}

fn parse_insert(
    tag: Option<Cow<'_, str>>,
    digest: Option<Cow<'_, str>>,
) -> Result<Event, ParseError> {
    // Validated borrowed first; only the reference the event keeps is built.
    let digest_ref = digest
        .as_deref()
        .map(|d| {
            let r = Parsed::new(d).map_err(|source| ParseError::BadReference {
                field: "digest",
                source,
            })?;
            if r.digest().is_none() {
                return Err(ParseError::DigestWithoutDigest(excerpt::quote(d)));
            }
            Ok(r)
        })
        .transpose()?;
    let Some(tag) = tag else {
        return match digest_ref {
            Some(digest) => Ok(Event::InsertDigestOnly {
                digest: digest.to_image_ref(),
            }),
            None => Err(ParseError::NoReference { action: "INSERT" }),
        };
    };
    let tag_ref = Parsed::new(&tag).map_err(|source| ParseError::BadReference {
        field: "tag",
        source,
    })?;
    if tag_ref.tag().is_none() {
        return Err(ParseError::TagIsDigest(excerpt::quote(&tag)));
    }
    if let Some(d) = &digest_ref
        && !d.same_name(&tag_ref)
    {
        return Err(ParseError::RepositoryMismatch {
            tag: excerpt::quote(tag_ref.to_image_ref().as_str()),
            digest: excerpt::quote(d.to_image_ref().as_str()),
        });
    }
    Ok(Event::Insert {
        tag: tag_ref.to_image_ref(),
        digest: digest_ref.and_then(|d| d.digest().map(str::to_string)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn gar(path: &str) -> String {
        format!("us-west1-docker.pkg.dev/p/r/{path}")
    }

    #[test]
    fn insert_with_tag_and_digest() {
        let body = format!(
            r#"{{"action":"INSERT","digest":"{}","tag":"{}"}}"#,
            gar(&format!("app@sha256:{HEX}")),
            gar("app:v1")
        );
        let ev = parse(body.as_bytes()).unwrap();
        let Event::Insert { tag, digest } = ev else {
            panic!("{ev:?}")
        };
        assert_eq!(tag.as_str(), gar("app:v1"));
        assert_eq!(digest.as_deref(), Some(format!("sha256:{HEX}").as_str()));
    }

    #[test]
    fn insert_tag_only_and_digest_only() {
        let ev = parse(br#"{"action":"INSERT","tag":"gcr.io/p/app:v2"}"#).unwrap();
        assert!(matches!(ev, Event::Insert { digest: None, .. }));
        let body = format!(r#"{{"action":"INSERT","digest":"gcr.io/p/app@sha256:{HEX}"}}"#);
        assert!(matches!(
            parse(body.as_bytes()).unwrap(),
            Event::InsertDigestOnly { .. }
        ));
        let body =
            format!(r#"{{"action":"INSERT","tag":"","digest":"gcr.io/p/app@sha256:{HEX}"}}"#);
        assert!(matches!(
            parse(body.as_bytes()).unwrap(),
            Event::InsertDigestOnly { .. }
        ));
    }

    #[test]
    fn payload_strings_are_borrowed_unless_escaped() {
        let plain: Payload =
            serde_json::from_slice(br#"{"action":"INSERT","tag":"gcr.io/p/a:v"}"#).unwrap();
        assert!(matches!(
            plain.tag,
            Some(BorrowedStr(Cow::Borrowed("gcr.io/p/a:v")))
        ));
        assert!(matches!(
            plain.action,
            Some(BorrowedStr(Cow::Borrowed("INSERT")))
        ));
        let escaped: Payload =
            serde_json::from_slice(br#"{"action":"INSERT","tag":"gcr.io\/p\/a:v"}"#).unwrap();
        assert!(matches!(&escaped.tag, Some(BorrowedStr(Cow::Owned(t))) if t == "gcr.io/p/a:v"));
        // And an escaped event still parses to the same reference.
        let ev = parse(br#"{"action":"INSERT","tag":"gcr.io\/p\/a:v"}"#).unwrap();
        assert!(matches!(ev, Event::Insert { tag, .. } if tag.as_str() == "gcr.io/p/a:v"));
    }

    #[test]
    fn tag_and_digest_may_spell_one_repository_differently() {
        let body = format!(
            r#"{{"action":"INSERT","tag":"nginx:1.27","digest":"docker.io/library/nginx@sha256:{HEX}"}}"#
        );
        let ev = parse(body.as_bytes()).unwrap();
        assert!(
            matches!(&ev, Event::Insert { tag, digest: Some(_) } if tag.as_str() == "docker.io/library/nginx:1.27"),
            "{ev:?}"
        );
    }

    #[test]
    fn delete_and_unknown_fields() {
        let ev = parse(br#"{"action":"DELETE","tag":"gcr.io/p/app:v2","extra":1}"#).unwrap();
        assert_eq!(ev.action(), "DELETE");
    }

    type Check = fn(&ParseError) -> bool;

    #[test]
    fn malformed_payloads() {
        let digest = format!("gcr.io/p/app@sha256:{HEX}");
        let cases: Vec<(Vec<u8>, Check)> = vec![
            (b"not json".to_vec(), |e| {
                matches!(e, ParseError::NotJson(_))
            }),
            (b"[1,2]".to_vec(), |e| {
                matches!(
                    e,
                    ParseError::NotObject {
                        what: "an array",
                        ..
                    }
                )
            }),
            (b"".to_vec(), |e| matches!(e, ParseError::NotJson(_))),
            (br#"{"tag":"gcr.io/p/a:v"}"#.to_vec(), |e| {
                matches!(e, ParseError::MissingAction)
            }),
            (
                br#"{"action":"UPDATE","tag":"gcr.io/p/a:v"}"#.to_vec(),
                |e| matches!(e, ParseError::UnknownAction(_)),
            ),
            (
                br#"{"action":"insert","tag":"gcr.io/p/a:v"}"#.to_vec(),
                |e| matches!(e, ParseError::UnknownAction(_)),
            ),
            (br#"{"action":"INSERT"}"#.to_vec(), |e| {
                matches!(e, ParseError::NoReference { .. })
            }),
            (br#"{"action":"DELETE"}"#.to_vec(), |e| {
                matches!(e, ParseError::NoReference { .. })
            }),
            (br#"{"action":"INSERT","tag":"Not A Ref"}"#.to_vec(), |e| {
                matches!(e, ParseError::BadReference { field: "tag", .. })
            }),
            (br#"{"action":"INSERT","tag":42}"#.to_vec(), |e| {
                matches!(e, ParseError::NotJson(_))
            }),
            (
                br#"{"action":"INSERT","digest":"gcr.io/p/a:v"}"#.to_vec(),
                |e| matches!(e, ParseError::DigestWithoutDigest(_)),
            ),
            (
                format!(r#"{{"action":"INSERT","tag":"{digest}"}}"#).into_bytes(),
                |e| matches!(e, ParseError::TagIsDigest(_)),
            ),
            (
                format!(r#"{{"action":"INSERT","tag":"gcr.io/p/other:v1","digest":"{digest}"}}"#)
                    .into_bytes(),
                |e| matches!(e, ParseError::RepositoryMismatch { .. }),
            ),
            (vec![b' '; MAX_PAYLOAD_BYTES + 1], |e| {
                matches!(e, ParseError::TooLarge(_))
            }),
        ];
        for (body, check) in cases {
            let err =
                parse(&body).expect_err(&String::from_utf8_lossy(&body[..body.len().min(80)]));
            assert!(check(&err), "unexpected error {err:?}");
            assert!(!err.to_string().is_empty());
        }
    }

    /// The shape a fuzz run found restarting workloads: the derived struct's fields in order.
    #[test]
    fn only_a_json_object_is_an_event() {
        let tag = gar("app:v1");
        let digest = gar(&format!("app@sha256:{HEX}"));
        let array = format!(r#"["INSERT","{digest}","{tag}"]"#);
        let cases: [(&[u8], &str); 7] = [
            (array.as_bytes(), "an array"),
            (b" \n[]", "an array"),
            (br#""INSERT""#, "a string"),
            (b"-1.5e3", "a number"),
            (b"true", "a boolean"),
            (b"null", "null"),
            (b"\t0", "a number"),
        ];
        for (body, what) in cases {
            let err = parse(body).unwrap_err();
            assert!(
                matches!(&err, ParseError::NotObject { what: w, .. } if *w == what),
                "{}: {err:?}",
                String::from_utf8_lossy(body)
            );
            assert!(err.to_string().contains("not a JSON object"), "{err}");
        }
        // The visitor refuses a sequence by itself too, without the first-byte check.
        let direct = serde_json::from_str::<Payload>(&array)
            .err()
            .map(|e| e.to_string());
        assert!(
            direct
                .as_deref()
                .is_some_and(|e| e.contains("expected a JSON object")),
            "{direct:?}"
        );
        // Broken JSON that starts like a scalar is still reported as broken JSON.
        assert!(matches!(parse(b"tru"), Err(ParseError::NotJson(_))));
    }

    #[test]
    fn keys_are_unescaped_and_duplicates_refused() {
        let ev = parse(br#"{"\u0061ction":"INSERT","t\u0061g":"gcr.io/p/a:v"}"#).unwrap();
        assert!(matches!(ev, Event::Insert { tag, .. } if tag.as_str() == "gcr.io/p/a:v"));
        let err =
            parse(br#"{"action":"DELETE","action":"INSERT","tag":"gcr.io/p/a:v"}"#).unwrap_err();
        assert!(
            matches!(&err, ParseError::NotJson(m) if m.contains("duplicate field \"action\"")),
            "{err:?}"
        );
        // `null` stays "absent", as with the derived struct.
        assert_eq!(parse(br#"{"action":null}"#), Err(ParseError::MissingAction));
    }

    /// Item 12 of issue #14: a 60 KB field once produced 121 KB WARN lines.
    #[test]
    fn errors_quote_a_bounded_escaped_excerpt() {
        let limit = crate::util::excerpt::EXCERPT_BYTES + 32;
        let huge = "A".repeat(60_000);
        let bodies = [
            format!(r#"{{"action":"{huge}","tag":"gcr.io/p/a:v"}}"#),
            format!(r#"{{"action":"INSERT","tag":"gcr.io/p/{huge}:v"}}"#),
            format!(r#"{{"action":"INSERT","tag":"{}"}}"#, " ".repeat(60_000)),
            format!(r#"{{"action":"INSERT","tag":"\u001b[31m{huge}"}}"#),
            format!(r#"["{huge}"]"#),
            format!(r#""{huge}""#),
            format!(r#"{{"action":"INSERT","tag":{{"x":"{huge}"}}}}"#),
            format!(
                r#"{{"action":"INSERT","tag":"gcr.io/p/a:v","digest":"gcr.io/p/b:{}"}}"#,
                "v".repeat(60_000)
            ),
        ];
        for body in &bodies {
            let err = parse(body.as_bytes()).unwrap_err();
            let text = err.to_string();
            // One bounded quote plus the fixed wording around it.
            assert!(
                text.len() <= limit + 120,
                "{} bytes: {:?}",
                text.len(),
                &text[..200]
            );
            assert!(!text.contains('\u{1b}'), "raw escape in {text:?}");
        }
    }

    mod generated {
        use super::*;
        use proptest::prelude::*;
        use serde_json::{Value, json};

        /// Leaves that make the fields of a real event, so that arrays and nested values
        /// carry exactly what an object would need to be accepted.
        fn leaf() -> impl Strategy<Value = Value> {
            prop_oneof![
                Just(json!("INSERT")),
                Just(json!("DELETE")),
                Just(json!(gar("app:v1"))),
                Just(json!(gar(&format!("app@sha256:{HEX}")))),
                Just(Value::Null),
                any::<bool>().prop_map(Value::from),
                any::<i64>().prop_map(Value::from),
                "[a-z:/@.]{0,12}".prop_map(Value::from),
            ]
        }

        fn value() -> impl Strategy<Value = Value> {
            let key = prop_oneof![
                Just("action".to_string()),
                Just("tag".to_string()),
                Just("digest".to_string()),
                "[a-z]{1,4}",
            ];
            leaf().prop_recursive(3, 24, 4, move |inner| {
                prop_oneof![
                    prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
                    prop::collection::btree_map(key.clone(), inner, 0..4)
                        .prop_map(|m| Value::Object(m.into_iter().collect())),
                ]
            })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2000))]

            /// Nothing but a well-formed object reaches a restart decision (`Insert`, the
            /// only event that restarts anything) or any other accepted event.
            #[test]
            fn only_well_formed_objects_are_accepted(v in value()) {
                let body = serde_json::to_vec(&v).unwrap();
                let parsed = parse(&body);
                match (&v, &parsed) {
                    (Value::Object(m), Ok(Event::Insert { tag, .. })) => {
                        prop_assert_eq!(m.get("action"), Some(&json!("INSERT")));
                        let raw = m.get("tag").and_then(Value::as_str);
                        prop_assert_eq!(raw.map(|t| ImageRef::parse(t).ok()), Some(Some(tag.clone())));
                    }
                    (Value::Object(m), Ok(ev)) => {
                        prop_assert_eq!(m.get("action").and_then(Value::as_str), Some(ev.action()));
                    }
                    (Value::Object(_), Err(_)) => {}
                    (_, Ok(ev)) => prop_assert!(false, "{} accepted as {:?}", v, ev),
                    (_, Err(e)) => prop_assert!(
                        matches!(e, ParseError::NotObject { .. }),
                        "{} gave {:?}", v, e
                    ),
                }
            }
        }
    }
}

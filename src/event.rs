//! Parse stage: turns a GAR/GCR Pub/Sub payload into an [`Event`].
//!
//! The payload is `{"action":"INSERT"|"DELETE","digest":"…@sha256:…","tag":"…:v1"}`; `tag` is
//! absent on a digest-only push. Anything else is malformed and must be dead-lettered, so the
//! error says exactly what was wrong.

use std::borrow::Cow;

use serde::Deserialize;

use crate::image::{ImageRef, ImageRefError, Parsed};
use crate::json::BorrowedStr;

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

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("payload is {0} bytes, over the 64 KiB limit")]
    TooLarge(usize),
    #[error("payload is not a JSON object: {0}")]
    NotJson(String),
    #[error("payload has no \"action\" field")]
    MissingAction,
    #[error("unknown action {0:?} (expected INSERT or DELETE)")]
    UnknownAction(String),
    #[error("{action} event has neither \"tag\" nor \"digest\"")]
    NoReference { action: &'static str },
    #[error("field \"{field}\": {source}")]
    BadReference {
        field: &'static str,
        source: ImageRefError,
    },
    #[error("field \"tag\" is {0:?}, which is a digest reference, not a tag")]
    TagIsDigest(String),
    #[error("field \"digest\" is {0:?}, which carries no digest")]
    DigestWithoutDigest(String),
    #[error("tag {tag:?} and digest {digest:?} name different repositories")]
    RepositoryMismatch { tag: String, digest: String },
}

/// Borrows from the message bytes when the JSON strings have no escapes: no copies on the
/// hot path.
#[derive(Deserialize)]
struct Payload<'a> {
    #[serde(borrow)]
    action: Option<BorrowedStr<'a>>,
    #[serde(default, borrow)]
    digest: Option<BorrowedStr<'a>>,
    #[serde(default, borrow)]
    tag: Option<BorrowedStr<'a>>,
}

pub fn parse(data: &[u8]) -> Result<Event, ParseError> {
    if data.len() > MAX_PAYLOAD_BYTES {
        return Err(ParseError::TooLarge(data.len()));
    }
    let payload: Payload =
        serde_json::from_slice(data).map_err(|e| ParseError::NotJson(e.to_string()))?;
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
        Some(other) => Err(ParseError::UnknownAction(other.to_string())),
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
                return Err(ParseError::DigestWithoutDigest(d.to_string()));
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
        return Err(ParseError::TagIsDigest(tag.into_owned()));
    }
    if let Some(d) = &digest_ref
        && !d.same_name(&tag_ref)
    {
        return Err(ParseError::RepositoryMismatch {
            tag: tag_ref.to_image_ref().to_string(),
            digest: d.to_image_ref().to_string(),
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
            (b"[1,2]".to_vec(), |e| matches!(e, ParseError::NotJson(_))),
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
}

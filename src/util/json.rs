//! Small serde helpers shared by the JSON readers on the hot paths (the Pub/Sub payload and
//! `cache.json`).

use std::borrow::Cow;

use serde::Deserialize;

/// A JSON string borrowed from the input when it has no escapes, owned when it has.
///
/// serde borrows a `Cow<str>` only when it is a field's whole type; as a map key or inside an
/// `Option` it would always allocate a `String`, so those positions use this newtype.
#[derive(Deserialize)]
pub(crate) struct BorrowedStr<'a>(#[serde(borrow)] pub Cow<'a, str>);

//! Bounded, escaped quotes of untrusted text for logs and `dlq_reason`.
//!
//! A payload may be up to 10 MB. Echoing it whole into a WARN line multiplies a hostile
//! sender's bytes into the log pipeline (a 60 KB payload once made a 121 KB line), so every
//! message, error and reason quotes at most [`EXCERPT_BYTES`] of it. The dead letter keeps
//! the original data whole, so nothing is lost by this.

/// Most bytes of quoted text (escapes included) one excerpt may hold.
pub const EXCERPT_BYTES: usize = 256;

/// `s` as a double-quoted, escaped string (Rust's `{:?}` escapes: control characters and
/// quotes cannot break a log line), cut at [`EXCERPT_BYTES`] of escaped output. A cut quote
/// ends with `…` and says how long the whole input was, so a reader knows it is partial.
pub fn quote(s: &str) -> String {
    quote_limited(s, s.len(), EXCERPT_BYTES)
}

/// [`quote`] for bytes that may not be UTF-8 (invalid sequences show as U+FFFD).
pub fn quote_bytes(b: &[u8]) -> String {
    // Only the head can end up in the excerpt, so only the head is decoded: escaping never
    // shrinks text, so 4 × the limit of input is always more than enough.
    let head = &b[..b.len().min(EXCERPT_BYTES * 4)];
    quote_limited(&String::from_utf8_lossy(head), b.len(), EXCERPT_BYTES)
}

/// Quotes `s`, the start of an input `total` bytes long, in at most `max` bytes plus the
/// length note.
fn quote_limited(s: &str, total: usize, max: usize) -> String {
    let mut out = String::with_capacity(max.min(s.len() + 2) + 2);
    out.push('"');
    let mut cut = total > s.len();
    for c in s.chars() {
        let escaped = c.escape_debug();
        // Keep room for the closing quote.
        if out.len() + escaped.len() + 1 > max {
            cut = true;
            break;
        }
        out.extend(escaped);
    }
    out.push('"');
    if cut {
        out.push_str(&format!("… ({total} bytes)"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_quoted_whole_and_escaped() {
        assert_eq!(quote("app:v1"), "\"app:v1\"");
        assert_eq!(quote("a\"b\nc\u{1b}[31m"), "\"a\\\"b\\nc\\u{1b}[31m\"");
    }

    #[test]
    fn long_text_is_cut_and_says_so() {
        let long = "x".repeat(60_000);
        let q = quote(&long);
        assert!(q.len() <= EXCERPT_BYTES + 32, "{} bytes", q.len());
        assert!(q.ends_with("… (60000 bytes)"), "{q}");
        // Escapes count against the limit too: 10,000 control characters stay short.
        let q = quote(&"\u{1}".repeat(10_000));
        assert!(q.len() <= EXCERPT_BYTES + 32, "{} bytes", q.len());
        // Multi-byte characters are never split.
        let q = quote(&"é".repeat(1_000));
        assert!(q.starts_with("\"éé"), "{q}");
    }

    #[test]
    fn bytes_name_the_whole_length() {
        let q = quote_bytes(&vec![b'y'; 5_000_000]);
        assert!(q.len() <= EXCERPT_BYTES + 32, "{} bytes", q.len());
        assert!(q.ends_with("… (5000000 bytes)"), "{q}");
        assert_eq!(quote_bytes(b"\xffok"), "\"\u{fffd}ok\"");
    }
}

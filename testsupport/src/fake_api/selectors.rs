//! `labelSelector` and the `fieldSelector` subset the fake understands.

use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A parsed `labelSelector` (set-based and equality-based syntax).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct LabelSelector(Vec<Requirement>);

pub(super) fn is_key_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/')
}

pub(super) fn is_value_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

impl LabelSelector {
    pub(super) fn parse(selector: &str) -> Result<Self, String> {
        let selector = selector.trim();
        if selector.is_empty() {
            return Ok(Self(Vec::new()));
        }
        // Split on commas that are not inside a `(...)` value set.
        let mut terms = Vec::new();
        let (mut depth, mut start) = (0usize, 0usize);
        for (i, c) in selector.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => depth = depth.saturating_sub(1),
                ',' if depth == 0 => {
                    terms.push(&selector[start..i]);
                    start = i + 1;
                }
                _ => {}
            }
        }
        terms.push(&selector[start..]);
        terms
            .into_iter()
            .map(Self::parse_term)
            .collect::<Result<_, _>>()
            .map(Self)
    }

    pub(super) fn parse_term(term: &str) -> Result<Requirement, String> {
        let term = term.trim();
        let key_of = |key: &str| -> Result<String, String> {
            if key.is_empty() || !key.chars().all(is_key_char) {
                Err(format!("invalid label key {key:?} in {term:?}"))
            } else {
                Ok(key.to_owned())
            }
        };
        let value_of = |value: &str| -> Result<String, String> {
            let value = value.trim();
            if value.chars().all(is_value_char) {
                Ok(value.to_owned())
            } else {
                Err(format!("invalid label value {value:?} in {term:?}"))
            }
        };
        if let Some(key) = term.strip_prefix('!') {
            return Ok(Requirement::DoesNotExist(key_of(key.trim())?));
        }
        let key_end = term.find(|c| !is_key_char(c)).unwrap_or(term.len());
        let key = key_of(&term[..key_end])?;
        let rest = term[key_end..].trim_start();
        if rest.is_empty() {
            return Ok(Requirement::Exists(key));
        }
        if let Some(value) = rest.strip_prefix("!=") {
            return Ok(Requirement::NotEquals(key, value_of(value)?));
        }
        if let Some(value) = rest.strip_prefix("==").or_else(|| rest.strip_prefix('=')) {
            return Ok(Requirement::Equals(key, value_of(value)?));
        }
        let set_of = |rest: &str| -> Result<Vec<String>, String> {
            let inner = rest
                .trim()
                .strip_prefix('(')
                .and_then(|r| r.strip_suffix(')'))
                .ok_or_else(|| format!("expected a parenthesised value set in {term:?}"))?;
            let values: Vec<String> = inner.split(',').map(value_of).collect::<Result<_, _>>()?;
            if inner.trim().is_empty() {
                return Err(format!("empty value set in {term:?}"));
            }
            Ok(values)
        };
        let op_word = rest.split(|c: char| c.is_whitespace() || c == '(').next();
        match op_word {
            Some("in") => Ok(Requirement::In(key, set_of(&rest[2..])?)),
            Some("notin") => Ok(Requirement::NotIn(key, set_of(&rest[5..])?)),
            _ => Err(format!("unknown operator in {term:?}")),
        }
    }

    pub(super) fn matches(&self, labels: Option<&Map<String, Value>>) -> bool {
        let label = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
        self.0.iter().all(|req| match req {
            Requirement::Equals(k, v) => label(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
            Requirement::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Requirement::NotIn(k, vs) => label(k).is_none_or(|l| vs.iter().all(|v| v != l)),
            Requirement::Exists(k) => label(k).is_some(),
            Requirement::DoesNotExist(k) => label(k).is_none(),
        })
    }
}

/// The subset of `fieldSelector` the fake understands: `metadata.name` and
/// `metadata.namespace` with `=`, `==` and `!=`. Other fields are ignored (match everything).
pub(super) struct FieldSelector(Vec<(&'static str, bool, String)>);

impl FieldSelector {
    pub(super) fn parse(selector: Option<&str>) -> Self {
        let mut terms = Vec::new();
        for term in selector.unwrap_or("").split(',') {
            let (field, equal, value) = if let Some((f, v)) = term.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (f, true, v)
            } else {
                continue;
            };
            let pointer = match field.trim() {
                "metadata.name" => "/metadata/name",
                "metadata.namespace" => "/metadata/namespace",
                _ => continue,
            };
            terms.push((pointer, equal, value.trim().to_owned()));
        }
        Self(terms)
    }

    pub(super) fn matches(&self, obj: &Value) -> bool {
        self.0.iter().all(|(pointer, equal, value)| {
            let actual = obj.pointer(pointer).and_then(Value::as_str).unwrap_or("");
            (actual == value) == *equal
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_label_selectors() {
        use Requirement::*;
        let sel = LabelSelector::parse("a=b, c==d,e!=f,g in (h, i),j notin (k),l,!m,example.com/n")
            .unwrap();
        assert_eq!(
            sel.0,
            vec![
                Equals("a".into(), "b".into()),
                Equals("c".into(), "d".into()),
                NotEquals("e".into(), "f".into()),
                In("g".into(), vec!["h".into(), "i".into()]),
                NotIn("j".into(), vec!["k".into()]),
                Exists("l".into()),
                DoesNotExist("m".into()),
                Exists("example.com/n".into()),
            ]
        );
        assert!(LabelSelector::parse("a in ()").is_err());
        assert!(LabelSelector::parse("a,").is_err());
        assert!(LabelSelector::parse("a < 3").is_err());
        assert!(LabelSelector::parse("").unwrap().matches(None));
    }
}

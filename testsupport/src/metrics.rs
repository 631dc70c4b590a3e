//! Reading the daemon's `/metrics` page (the Prometheus text format) in tests, the demo and
//! the bench.

use std::collections::BTreeMap;
use std::net::SocketAddr;

/// The `/metrics` page at `addr`; empty when nothing answers, so every series reads 0.
pub fn scrape(addr: SocketAddr) -> String {
    crate::http::get(addr, "/metrics")
        .map(|r| r.body)
        .unwrap_or_default()
}

/// One sample line: `name{labels} value [timestamp] [# exemplar]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample<'a> {
    pub name: &'a str,
    /// What stands between the braces, as printed; empty without labels.
    pub labels: &'a str,
    pub value: f64,
}

impl<'a> Sample<'a> {
    /// Parses one line; `None` for comments, blank lines and anything malformed.
    pub fn parse(line: &'a str) -> Option<Sample<'a>> {
        let line = line.trim_start();
        if line.is_empty() || line.starts_with('#') {
            return None;
        }
        let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
        let name = &line[..name_end];
        let (labels, rest) = match line[name_end..].strip_prefix('{') {
            Some(after) => {
                let close = closing_brace(after)?;
                (&after[..close], &after[close + 1..])
            }
            None => ("", &line[name_end..]),
        };
        let value = rest.split_whitespace().next()?.parse().ok()?;
        Some(Sample {
            name,
            labels,
            value,
        })
    }

    /// `name` or `name{labels}`, as the page prints it.
    pub fn series(&self) -> String {
        if self.labels.is_empty() {
            self.name.to_owned()
        } else {
            format!("{}{{{}}}", self.name, self.labels)
        }
    }

    /// The value of label `key`, if the sample has it.
    pub fn label(&self, key: &str) -> Option<&'a str> {
        let mut rest = self.labels;
        while let Some((k, after)) = rest.split_once("=\"") {
            let end = closing_quote(after)?;
            if k.trim().trim_start_matches(',').trim() == key {
                return Some(&after[..end]);
            }
            rest = &after[end + 1..];
        }
        None
    }
}

/// Index of the `}` that closes a label set, skipping quoted values.
fn closing_brace(s: &str) -> Option<usize> {
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            '}' if !quoted => return Some(i),
            _ => {}
        }
    }
    None
}

/// Index of the `"` that ends a label value.
fn closing_quote(s: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => return Some(i),
            _ => {}
        }
    }
    None
}

/// Every sample of a page, in order.
pub fn samples(text: &str) -> impl Iterator<Item = Sample<'_>> {
    text.lines().filter_map(Sample::parse)
}

/// The value of one series, written as the page prints it (e.g.
/// `gar_restarter_events_settled_total{outcome="ack"}`); 0 when the page has no such line.
pub fn value(text: &str, series: &str) -> f64 {
    samples(text)
        .find(|s| s.series() == series)
        .map_or(0.0, |s| s.value)
}

/// The samples of `metric` summed by the value of one label, e.g. `{"ack": 4.0}` for
/// `gar_restarter_events_settled_total{outcome="ack"} 4`.
pub fn by_label(text: &str, metric: &str, label: &str) -> BTreeMap<String, f64> {
    let mut out = BTreeMap::new();
    for sample in samples(text).filter(|s| s.name == metric) {
        if let Some(v) = sample.label(label) {
            *out.entry(v.to_owned()).or_insert(0.0) += sample.value;
        }
    }
    out
}

/// The upper bound of the bucket that holds the `p` quantile of histogram `name`, from its
/// cumulative `_bucket` counts (summed over any other labels).
pub fn histogram_quantile(text: &str, name: &str, p: f64) -> Option<f64> {
    let bucket = format!("{name}_bucket");
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for sample in samples(text).filter(|s| s.name == bucket) {
        let le = match sample.label("le")? {
            "+Inf" => f64::INFINITY,
            le => le.parse().ok()?,
        };
        match buckets.iter_mut().find(|(b, _)| *b == le) {
            Some((_, count)) => *count += sample.value,
            None => buckets.push((le, sample.value)),
        }
    }
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    buckets
        .iter()
        .find(|(_, c)| *c >= total * p)
        .map(|(le, _)| *le)
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: &str = "# HELP gar_restarter_events_settled Settled.\n\
                        # TYPE gar_restarter_events_settled counter\n\
                        gar_restarter_events_settled_total{outcome=\"ack\"} 4\n\
                        gar_restarter_events_settled_total{outcome=\"dead_letter\"} 1 # {a=\"b\"} 1\n\
                        gar_restarter_events_settled_total_other{outcome=\"x\"} 9\n\
                        gar_restarter_events_received_total{action=\"insert\",kind=\"a\"} 2\n\
                        gar_restarter_events_received_total{kind=\"b\",action=\"insert\"} 3\n\
                        gar_restarter_in_flight 7\n\
                        lat_bucket{le=\"0.001\"} 1\n\
                        lat_bucket{le=\"0.01\"} 90\n\
                        lat_bucket{le=\"0.1\"} 99\n\
                        lat_bucket{le=\"+Inf\"} 100\n";

    #[test]
    fn reads_one_series() {
        assert_eq!(value(PAGE, "gar_restarter_in_flight"), 7.0);
        assert_eq!(
            value(PAGE, "gar_restarter_events_settled_total{outcome=\"ack\"}"),
            4.0
        );
        // An exemplar after the value does not hide it.
        assert_eq!(
            value(
                PAGE,
                "gar_restarter_events_settled_total{outcome=\"dead_letter\"}"
            ),
            1.0
        );
        // Neither a prefix of a longer name nor a missing series reads as anything but 0.
        assert_eq!(value(PAGE, "gar_restarter_events_settled_total"), 0.0);
        assert_eq!(value("", "gar_restarter_in_flight"), 0.0);
    }

    #[test]
    fn sums_by_label() {
        let m = by_label(PAGE, "gar_restarter_events_settled_total", "outcome");
        assert_eq!(m.len(), 2);
        assert_eq!(m["ack"], 4.0);
        assert_eq!(m["dead_letter"], 1.0);
        let m = by_label(PAGE, "gar_restarter_events_received_total", "action");
        assert_eq!(m["insert"], 5.0);
    }

    #[test]
    fn quantiles_from_buckets() {
        assert_eq!(histogram_quantile(PAGE, "lat", 0.5), Some(0.01));
        assert_eq!(histogram_quantile(PAGE, "lat", 0.99), Some(0.1));
        assert_eq!(histogram_quantile(PAGE, "lat", 1.0), Some(f64::INFINITY));
        assert_eq!(histogram_quantile(PAGE, "absent", 0.5), None);
    }

    #[test]
    fn labels_with_quotes_and_braces() {
        let s = Sample::parse(r#"x{a="1,}\"b",b="2"} 3 1700000000"#).unwrap();
        assert_eq!(s.name, "x");
        assert_eq!(s.label("a"), Some(r#"1,}\"b"#));
        assert_eq!(s.label("b"), Some("2"));
        assert_eq!(s.value, 3.0);
        assert_eq!(Sample::parse("# TYPE x counter"), None);
        assert_eq!(Sample::parse("x{a=\"1\" 3"), None);
    }
}

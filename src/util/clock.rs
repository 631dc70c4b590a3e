//! Wall-clock formatting in the forms Kubernetes and kubectl use.

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

/// Now as RFC 3339 in UTC with whole seconds, which is what `kubectl rollout restart` writes.
pub fn now_rfc3339() -> String {
    format_rfc3339(OffsetDateTime::now_utc())
}

pub fn format_rfc3339(t: OffsetDateTime) -> String {
    t.replace_nanosecond(0)
        .unwrap_or(t)
        .format(&Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// RFC 3339 in UTC with the full sub-second precision: publish times of pushes a few
/// milliseconds apart must keep their order.
pub fn format_rfc3339_nanos(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_precision_with_z() {
        let t = OffsetDateTime::from_unix_timestamp_nanos(1_764_072_000_123_456_789).unwrap();
        assert_eq!(format_rfc3339(t), "2025-11-25T12:00:00Z");
    }
}

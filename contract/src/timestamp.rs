//! The one timestamp format used in responses and events: RFC 3339 in UTC.

use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Formats an instant as RFC 3339 in UTC, e.g. `2026-11-22T10:15:30.25Z`.
///
/// Sub-second digits are written only as far as they are not zero, which is what
/// RFC 3339 allows and what the `time` crate does.
pub fn format(instant: OffsetDateTime) -> String {
    instant
        .to_offset(time::UtcOffset::UTC)
        .format(&Rfc3339)
        .unwrap_or_else(|_| instant.unix_timestamp().to_string())
}

/// Parses an RFC 3339 timestamp with an offset, its date and time separated by `T`,
/// `t` or a space (RFC 3339 §5.6 lets an application use one).
pub fn parse(text: &str) -> Option<OffsetDateTime> {
    // `time` takes any byte for the separator, so that `2026-11-22110:15:30Z` would
    // read as 10:15:30. The date before it is always ten bytes.
    if !matches!(text.as_bytes().get(10), Some(b'T' | b't' | b' ')) {
        return None;
    }
    OffsetDateTime::parse(text, &Rfc3339).ok()
}

/// Whether [`format()`] writes `instant` as RFC 3339: its year in UTC is 0000 to 9999
/// (`9999-12-31T23:59:59-01:00` is in year 10000 there, and `format` falls back to Unix
/// seconds).
pub fn writable(instant: OffsetDateTime) -> bool {
    instant
        .checked_to_offset(time::UtcOffset::UTC)
        .is_some_and(|utc| (0..=9999).contains(&utc.year()))
}

/// 0000-01-01T00:00:00Z, the earliest instant [`format()`] writes as RFC 3339, in Unix
/// milliseconds.
pub const EARLIEST_WRITABLE_MILLIS: i64 = -62_167_219_200_000;

/// Milliseconds since the Unix epoch, the unit of every instant in the read model.
pub fn unix_millis(instant: OffsetDateTime) -> i64 {
    // The reading rules bound instants to a few days around now, far inside i64 millis.
    (instant.unix_timestamp_nanos() / 1_000_000) as i64
}

/// The inverse of [`unix_millis`]; `None` outside the range `time` can represent.
pub fn from_unix_millis(millis: i64) -> Option<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(millis) * 1_000_000).ok()
}

/// Formats milliseconds since the epoch as RFC 3339, or `None` when out of range.
pub fn format_millis(millis: i64) -> Option<String> {
    from_unix_millis(millis).map(format)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_writable_instants_are_years_0000_to_9999_in_utc() {
        let earliest = from_unix_millis(EARLIEST_WRITABLE_MILLIS).expect("in range");
        assert!(writable(earliest));
        assert_eq!(format(earliest), "0000-01-01T00:00:00Z");
        let before = from_unix_millis(EARLIEST_WRITABLE_MILLIS - 1).expect("in range");
        assert!(!writable(before));
        let last = parse("9999-12-31T23:59:59Z").expect("valid");
        assert!(writable(last));
        let past = parse("9999-12-31T23:59:59-01:00").expect("valid");
        assert!(!writable(past), "year 10000 in UTC");
        assert_eq!(parse(&format(last)), Some(last));
    }

    #[test]
    fn format_round_trips_through_parse_in_utc() {
        let parsed = parse("2026-11-22T11:15:30.250+01:00").expect("valid timestamp");
        assert_eq!(format(parsed), "2026-11-22T10:15:30.25Z");
        assert_eq!(parse(&format(parsed)), Some(parsed));
    }

    #[test]
    fn millis_round_trip() {
        let parsed = parse("2026-11-22T10:15:30.250Z").expect("valid timestamp");
        let millis = unix_millis(parsed);
        assert_eq!(millis % 1000, 250);
        assert_eq!(
            format_millis(millis).as_deref(),
            Some("2026-11-22T10:15:30.25Z")
        );
    }

    #[test]
    fn parse_takes_only_the_separators_rfc_3339_names() {
        let instant = parse("2026-11-22T10:15:30Z").expect("valid timestamp");
        assert_eq!(parse("2026-11-22t10:15:30Z"), Some(instant));
        assert_eq!(parse("2026-11-22 10:15:30Z"), Some(instant));
        for text in [
            "2026-11-22X10:15:30Z",
            "2026-11-22_10:15:30Z",
            // The `1` would be taken for the separator: 10:15:30, not 11:10:15.
            "2026-11-22110:15:30Z",
            "2026-11-22",
        ] {
            assert_eq!(parse(text), None, "{text}");
        }
    }

    #[test]
    fn parse_rejects_timestamps_without_offset() {
        assert_eq!(parse("2026-11-22T10:15:30"), None);
        assert_eq!(parse("yesterday"), None);
    }
}

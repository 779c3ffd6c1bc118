//! Time formatting and parsing shared by the stages. Invariant: every timestamp the sensor writes is UTC.

use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::{OffsetDateTime, PrimitiveDateTime};

/// Formats `t` as RFC 3339 UTC with second precision, e.g. `2026-11-25T10:00:00Z`; as Unix seconds if
/// it has no such form (its UTC date is past year 9999, e.g. a served `9999-12-31T23:00:00-05:00`).
pub fn rfc3339(t: OffsetDateTime) -> String {
    let Some(t) = t.checked_to_offset(time::UtcOffset::UTC) else {
        return t.unix_timestamp().to_string();
    };
    let t = t.replace_nanosecond(0).unwrap_or(t);
    t.format(&Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// Formats `t` as the API's `YYYY-MM-DDTHH:MM:SS` (UTC, no zone).
pub fn api_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    let fmt = format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]");
    t.format(&fmt)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// Parses the API's timestamps: RFC 3339, or a zone-less `YYYY-MM-DDTHH:MM:SS[.fff]` read as UTC.
pub fn parse_api_time(s: &str) -> Option<OffsetDateTime> {
    if let Ok(t) = OffsetDateTime::parse(s, &Rfc3339) {
        return Some(t);
    }
    let trimmed = s.trim_end_matches('Z');
    let fmts = [
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond]"),
        format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]"),
    ];
    fmts.iter().find_map(|f| {
        PrimitiveDateTime::parse(trimmed, f)
            .ok()
            .map(PrimitiveDateTime::assume_utc)
    })
}

/// Parses a `Retry-After` value (delay seconds or HTTP date), clamped to [1 s, 15 min] as the backend
/// protocol asks; the same bounds keep a hostile Microsoft answer from pausing a tenant for days.
pub fn retry_after(value: &str) -> Option<std::time::Duration> {
    use std::time::Duration;
    let v = value.trim();
    let d = match v.parse::<u64>() {
        Ok(s) => Duration::from_secs(s),
        // More seconds than a u64 holds is still a delay: the longest one, not "no value".
        Err(_) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => Duration::MAX,
        Err(_) => httpdate::parse_http_date(v)
            .ok()?
            .duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    };
    Some(d.clamp(Duration::from_secs(1), Duration::from_secs(900)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_zoneless_and_zoned_times_as_utc() {
        let a = parse_api_time("2015-06-29T20:03:19").expect("zone-less");
        let b = parse_api_time("2015-06-29T20:03:19Z").expect("zoned");
        let c = parse_api_time("2015-05-23T17:35:00.000Z").expect("fractional");
        assert_eq!(a, b);
        assert_eq!(c.unix_timestamp(), 1432402500);
        assert_eq!(api_time(a), "2015-06-29T20:03:19");
        assert_eq!(rfc3339(a), "2015-06-29T20:03:19Z");
        assert!(parse_api_time("yesterday").is_none());
    }

    #[test]
    fn times_beyond_utc_year_9999_format_as_unix_seconds() {
        // Found with the content_listing fuzz target (fuzz/fuzz_targets/content_listing.rs): a served
        // contentExpiration whose UTC is in year 10000 panicked ("local datetime out of valid range")
        // when the collector logged the content as lost.
        let t = parse_api_time("9999-12-31T23:59:59-23:59").expect("valid RFC 3339");
        assert_eq!(rfc3339(t), t.unix_timestamp().to_string());
    }

    #[test]
    fn retry_after_takes_seconds_and_dates_and_is_clamped() {
        use std::time::Duration;
        assert_eq!(retry_after("0"), Some(Duration::from_secs(1)));
        assert_eq!(retry_after(" 5 "), Some(Duration::from_secs(5)));
        assert_eq!(retry_after("99999"), Some(Duration::from_secs(900)));
        let date = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(20));
        let d = retry_after(&date).expect("date");
        assert!(
            d >= Duration::from_secs(18) && d <= Duration::from_secs(20),
            "{d:?}"
        );
        assert_eq!(retry_after("soon"), None);
    }

    #[test]
    fn retry_after_beyond_u64_seconds_is_the_longest_wait() {
        // Found by fuzzing (fuzz/fuzz_targets/backend_response.rs): was None, so an overloaded backend
        // asking for a very long pause got retried after about a second.
        use std::time::Duration;
        assert_eq!(
            retry_after("184467440737095516167"),
            Some(Duration::from_secs(900))
        );
        assert_eq!(retry_after(""), None);
        assert_eq!(retry_after("-5"), None);
    }
}

//! Time as the controller writes it for people.

use std::{fmt::Write, time::Duration};

use shoal_proto::UnixMillis;

/// `t` as RFC 3339 in UTC to the second, or "N ms after the Unix epoch" where it cannot be (humantime
/// refuses years past 9999): never a panic, whatever time an agent reported.
pub fn rfc3339(t: UnixMillis) -> String {
    rfc3339_ms(t.0)
}

/// [`rfc3339`] of a time in milliseconds since the Unix epoch.
pub fn rfc3339_ms(ms: u64) -> String {
    let mut out = String::new();
    match std::time::UNIX_EPOCH.checked_add(Duration::from_millis(ms)) {
        Some(st) if write!(out, "{}", humantime::format_rfc3339_seconds(st)).is_ok() => out,
        _ => format!("{ms} ms after the Unix epoch"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_past_year_9999_are_written_as_milliseconds() {
        assert_eq!(rfc3339(UnixMillis(0)), "1970-01-01T00:00:00Z");
        let far = UnixMillis(400_000_000_000_000);
        assert_eq!(rfc3339(far), "400000000000000 ms after the Unix epoch");
    }
}

//! Maintenance windows: when disruptive work (reboots, agent and image upgrades) may start.
//!
//! A window is a schedule, a duration and a time zone, and optionally a `KEY=VALUE` label selector
//! saying which nodes it is meant for. Each time the schedule fires, the window opens for the
//! duration. This module is a sans-IO core: every question takes the instant to answer for; nothing
//! here reads a clock or the store. (Looking a time zone up by name reads the system's tzdb, once,
//! when a window is parsed.)
//!
//! # Schedule language
//!
//! Five-field cron, `MINUTE HOUR DAY-OF-MONTH MONTH DAY-OF-WEEK`, as in Vixie cron and the Open
//! Cron Pattern Specification: `*`, lists (`1,15`), ranges (`1-5`), steps (`*/2`, `8-18/2`), month
//! and weekday names (`JAN`, `MON-FRI`), `L` (last day of month; `5L`, last Friday), `#` (`SAT#1`,
//! first Saturday), `W` (nearest weekday) and the nicknames `@daily`, `@weekly`, `@monthly`,
//! `@yearly`. When both day fields are restricted, either may match (Vixie cron); `+` before the
//! weekday field (`0 2 1-7 * +SAT`) makes both required. Seconds and years are not accepted: a
//! window is minutes to days long. Parsing and occurrence search are [croner]'s, on [jiff]'s time
//! zones.
//!
//! # Time zones and daylight saving time
//!
//! The schedule is read on the wall clock of the window's IANA time zone (default `UTC`).
//! - **Spring forward** (a wall-clock time that does not exist that day, e.g. 02:30 in
//!   Europe/Berlin on the last Sunday of March): the window opens at the first instant after the
//!   gap (03:00 local). It still lasts its full duration.
//! - **Fall back** (a wall-clock time that happens twice): the window opens once, at the first of
//!   the two, and not again an hour later.
//! - The duration is elapsed time, not wall-clock time: a 4 h window opening at 01:00 local closes
//!   at 04:00 local on the fall-back night and at 06:00 local on the spring-forward night, four
//!   real hours either way. A window is never lengthened or shortened by a clock change.
//!
//! # Openness
//!
//! A window is open at `t` when some opening `s` has `s <= t < s + duration`. Openings whose
//! periods overlap or touch form one open period; [`Window::is_open`] reports the earliest opening
//! that covers `t` and the end of the whole period, which is when new work must stop.

use std::{collections::BTreeMap, fmt, time::Duration};

use croner::{parser::CronParser, Cron};
use jiff::{tz::TimeZone, Timestamp, Zoned};
use serde::{Deserialize, Serialize};
use shoal_proto::UnixMillis;

use crate::selector::{parse_selector, Selector, SelectorError};

/// The shortest window: one minute (the schedule's granularity).
pub const MIN_DURATION: Duration = Duration::from_secs(60);

/// The longest window: seven days.
pub const MAX_DURATION: Duration = Duration::from_secs(7 * 24 * 3600);

/// The time zone a window is read in unless `--tz` says otherwise.
pub const DEFAULT_TZ: &str = "UTC";

/// How many consecutive overlapping openings [`Window::is_open`] merges before it stops looking for
/// the end of an open period (a schedule like `* * * * *` with a one-hour duration never closes).
const MAX_MERGE: usize = 4096;

/// Why a window definition was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WindowError {
    /// The name does not fit `[a-z0-9][a-z0-9-]{0,30}`.
    #[error(
        "window name {0:?} is not allowed: use 1 to 31 of a-z, 0-9 and '-', not starting with '-'"
    )]
    BadName(String),
    /// The schedule is not a five-field cron expression croner accepts.
    #[error(
        "schedule {spec:?} is not valid cron (MINUTE HOUR DAY-OF-MONTH MONTH DAY-OF-WEEK): {cause}"
    )]
    BadSchedule {
        /// What was given.
        spec: String,
        /// The parser's complaint.
        cause: String,
    },
    /// The duration is outside [`MIN_DURATION`]..=[`MAX_DURATION`].
    #[error("window duration {}s is out of range: use 1m to 7d", .0.as_secs())]
    BadDuration(Duration),
    /// The time zone is not in the IANA time zone database.
    #[error("unknown time zone {0:?}: use an IANA name such as Europe/Berlin or America/New_York")]
    UnknownTimeZone(String),
    /// The selector does not parse.
    #[error(transparent)]
    BadSelector(#[from] SelectorError),
    /// The schedule never fires (e.g. `0 0 30 2 *`, the 30th of February).
    #[error("schedule {0:?} never fires after the given time")]
    NeverOpens(String),
}

/// A window as the store keeps it and the admin API shows it: the text the operator gave, so that
/// it round-trips exactly. [`Window::from_record`] parses it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowRecord {
    /// Unique name, `[a-z0-9][a-z0-9-]{0,30}`.
    pub name: String,
    /// The cron schedule.
    pub schedule: String,
    /// How long each opening lasts, in seconds.
    pub duration_secs: u64,
    /// IANA time zone name.
    pub tz: String,
    /// The nodes this window is for; `None` for any node. (Compatible form: records of the old
    /// `(key, value)` form read unchanged, see [`crate::selector`].)
    pub selector: Option<Selector>,
}

/// A parsed, validated window.
#[derive(Clone)]
pub struct Window {
    record: WindowRecord,
    cron: Cron,
    tz: TimeZone,
    duration: Duration,
}

impl fmt::Debug for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Window")
            .field("record", &self.record)
            .finish_non_exhaustive()
    }
}

/// Parses a five-field cron schedule.
pub fn parse_schedule(spec: &str) -> Result<Cron, WindowError> {
    CronParser::builder()
        .seconds(croner::parser::Seconds::Disallowed)
        .year(croner::parser::Year::Disallowed)
        .build()
        .parse(spec)
        .map_err(|e| WindowError::BadSchedule {
            spec: spec.to_owned(),
            cause: e.to_string(),
        })
}

/// Looks a time zone up by IANA name.
pub fn parse_tz(name: &str) -> Result<TimeZone, WindowError> {
    TimeZone::get(name.trim()).map_err(|_| WindowError::UnknownTimeZone(name.to_owned()))
}

fn to_timestamp(t: UnixMillis) -> Option<Timestamp> {
    Timestamp::from_millisecond(i64::try_from(t.0).ok()?).ok()
}

fn to_millis(z: &Zoned) -> Option<UnixMillis> {
    u64::try_from(z.timestamp().as_millisecond())
        .ok()
        .map(UnixMillis)
}

/// `t + d`, saturating.
pub(crate) fn add(t: UnixMillis, d: Duration) -> UnixMillis {
    UnixMillis(t.0.saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
}

fn sub(t: UnixMillis, d: Duration) -> UnixMillis {
    UnixMillis(t.0.saturating_sub(u64::try_from(d.as_millis()).unwrap_or(u64::MAX)))
}

impl Window {
    /// Parses and validates a window. `tz` defaults to [`DEFAULT_TZ`]; `selector` is a label
    /// selector ([`crate::selector`]).
    pub fn new(
        name: &str,
        schedule: &str,
        duration: Duration,
        tz: Option<&str>,
        selector: Option<&str>,
    ) -> Result<Window, WindowError> {
        let selector = selector.map(parse_selector).transpose()?;
        // Whole seconds: what the record keeps.
        let record = WindowRecord {
            name: name.to_owned(),
            schedule: schedule.trim().to_owned(),
            duration_secs: duration.as_secs(),
            tz: tz.unwrap_or(DEFAULT_TZ).trim().to_owned(),
            selector,
        };
        Window::from_record(record)
    }

    /// Parses a stored window.
    pub fn from_record(record: WindowRecord) -> Result<Window, WindowError> {
        if !crate::selector::valid_name(&record.name) {
            return Err(WindowError::BadName(record.name));
        }
        let cron = parse_schedule(&record.schedule)?;
        let duration = Duration::from_secs(record.duration_secs);
        if !(MIN_DURATION..=MAX_DURATION).contains(&duration) {
            return Err(WindowError::BadDuration(duration));
        }
        let tz = parse_tz(&record.tz)?;
        Ok(Window {
            record,
            cron,
            tz,
            duration,
        })
    }

    /// Checks that the window opens at least once after `now`; returns that opening. For refusing,
    /// at creation, a schedule that can never fire.
    pub fn check_opens(&self, now: UnixMillis) -> Result<(UnixMillis, UnixMillis), WindowError> {
        self.next_open(now)
            .ok_or_else(|| WindowError::NeverOpens(self.record.schedule.clone()))
    }

    /// The record to store.
    pub fn record(&self) -> &WindowRecord {
        &self.record
    }

    /// The window's name.
    pub fn name(&self) -> &str {
        &self.record.name
    }

    /// How long each opening lasts.
    pub fn duration(&self) -> Duration {
        self.duration
    }

    /// Whether the window is meant for a node with these labels (always, without a selector).
    pub fn applies_to(&self, labels: &BTreeMap<String, String>) -> bool {
        self.record
            .selector
            .as_ref()
            .is_none_or(|s| s.matches(labels))
    }

    /// The selector's canonical text, if any.
    pub fn selector_text(&self) -> Option<String> {
        self.record.selector.as_ref().map(Selector::to_string)
    }

    /// Openings with `from < start`, in order, as Unix milliseconds.
    fn openings_after(&self, from: UnixMillis) -> impl Iterator<Item = UnixMillis> + '_ {
        let start = to_timestamp(from).map(|ts| ts.to_zoned(self.tz.clone()));
        start
            .into_iter()
            .flat_map(move |z| self.cron.iter_after(z))
            .map_while(|z| to_millis(&z))
    }

    /// The end of the open period that begins with the opening at `opened`, following later
    /// openings that start before the period ends.
    fn merged_end(&self, opened: UnixMillis) -> UnixMillis {
        let mut end = add(opened, self.duration);
        for start in self.openings_after(opened).take(MAX_MERGE) {
            if start > end {
                break;
            }
            end = end.max(add(start, self.duration));
        }
        end
    }

    /// If the window is open at `now`: when the earliest opening covering `now` opened, and when
    /// the open period ends (after merging openings that overlap or touch). `None` when closed.
    pub fn is_open(&self, now: UnixMillis) -> Option<(UnixMillis, UnixMillis)> {
        // Openings in (now - duration, now] cover now; an opening exactly `duration` ago has
        // closed.
        let opened = self
            .openings_after(sub(now, self.duration))
            .next()
            .filter(|s| *s <= now)?;
        Some((opened, self.merged_end(opened)))
    }

    /// The next opening that starts strictly after `after`, and when its open period ends. `None`
    /// if the schedule never fires again.
    pub fn next_open(&self, after: UnixMillis) -> Option<(UnixMillis, UnixMillis)> {
        let start = self.openings_after(after).next()?;
        Some((start, self.merged_end(start)))
    }

    /// Open now, or the next opening: what `window list` shows.
    pub fn current_or_next(&self, now: UnixMillis) -> Option<(UnixMillis, UnixMillis)> {
        self.is_open(now).or_else(|| self.next_open(now))
    }
}

/// Answers whether new disruptive work may start at an instant: a [`Window`], or [`AlwaysOpen`] for
/// `--now`. The rollout planner asks through this trait so that it can be tested with any schedule.
pub trait WindowCheck {
    /// If open at `at`: when the open period ends. `None` when closed.
    fn open_until(&self, at: UnixMillis) -> Option<UnixMillis>;
}

impl WindowCheck for Window {
    fn open_until(&self, at: UnixMillis) -> Option<UnixMillis> {
        self.is_open(at).map(|(_, end)| end)
    }
}

/// No window: always open (`--now`).
#[derive(Debug, Clone, Copy, Default)]
pub struct AlwaysOpen;

impl WindowCheck for AlwaysOpen {
    fn open_until(&self, _at: UnixMillis) -> Option<UnixMillis> {
        Some(UnixMillis(u64::MAX))
    }
}

impl<F: Fn(UnixMillis) -> Option<UnixMillis>> WindowCheck for F {
    fn open_until(&self, at: UnixMillis) -> Option<UnixMillis> {
        self(at)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: Duration = Duration::from_secs(3600);

    /// Unix milliseconds of an RFC 3339 instant.
    fn t(s: &str) -> UnixMillis {
        let ts: Timestamp = s.parse().expect("RFC 3339 instant");
        UnixMillis(u64::try_from(ts.as_millisecond()).expect("after 1970"))
    }

    /// RFC 3339 UTC text of Unix milliseconds, for readable assertion failures.
    fn show(m: UnixMillis) -> String {
        to_timestamp(m).expect("in range").to_string()
    }

    fn pair(p: Option<(UnixMillis, UnixMillis)>) -> Option<(String, String)> {
        p.map(|(a, b)| (show(a), show(b)))
    }

    fn some(a: &str, b: &str) -> Option<(String, String)> {
        Some((a.to_owned(), b.to_owned()))
    }

    fn window(schedule: &str, duration: Duration, tz: &str) -> Window {
        Window::new("w", schedule, duration, Some(tz), None).expect("valid window")
    }

    #[test]
    fn bad_definitions_are_refused_with_the_reason() {
        let e = |r: Result<Window, WindowError>| r.expect_err("refused");
        assert!(matches!(
            e(Window::new("w", "0 2 * *", H, None, None)),
            WindowError::BadSchedule { .. }
        ));
        assert!(matches!(
            e(Window::new("w", "61 2 * * *", H, None, None)),
            WindowError::BadSchedule { .. }
        ));
        assert!(
            matches!(
                e(Window::new("w", "0 0 2 * * *", H, None, None)),
                WindowError::BadSchedule { .. }
            ),
            "no seconds"
        );
        assert!(matches!(
            e(Window::new("w", "0 2 * * *", H, Some("Mars/Olympus"), None)),
            WindowError::UnknownTimeZone(_)
        ));
        assert!(matches!(
            e(Window::new(
                "w",
                "0 2 * * *",
                Duration::from_secs(30),
                None,
                None
            )),
            WindowError::BadDuration(_)
        ));
        assert!(matches!(
            e(Window::new("w", "0 2 * * *", 8 * 24 * H, None, None)),
            WindowError::BadDuration(_)
        ));
        assert!(matches!(
            e(Window::new("Nightly", "0 2 * * *", H, None, None)),
            WindowError::BadName(_)
        ));
        assert!(matches!(
            e(Window::new("w", "0 2 * * *", H, None, Some("role in ()"))),
            WindowError::BadSelector(_)
        ));
        let feb30 = window("0 0 30 2 *", H, "UTC");
        assert!(matches!(
            feb30.check_opens(t("2026-01-01T00:00:00Z")),
            Err(WindowError::NeverOpens(_))
        ));
        let err = e(Window::new("w", "0 25 * * *", H, None, None)).to_string();
        assert!(err.contains("0 25 * * *"), "{err}");
    }

    #[test]
    fn a_record_round_trips_and_the_selector_picks_nodes() {
        let w = Window::new(
            "nightly",
            "30 2 * * MON-FRI",
            4 * H,
            Some("Europe/Berlin"),
            Some("role=worker"),
        )
        .expect("valid");
        let back = Window::from_record(w.record().clone()).expect("reparses");
        assert_eq!(back.record(), w.record());
        let bytes = postcard::to_allocvec(w.record()).expect("encode");
        let stored: WindowRecord = postcard::from_bytes(&bytes).expect("decode");
        assert_eq!(&stored, w.record());
        let labels = |k: &str, v: &str| BTreeMap::from([(k.to_owned(), v.to_owned())]);
        assert!(w.applies_to(&labels("role", "worker")));
        assert!(!w.applies_to(&labels("role", "etcd")));
        assert_eq!(w.selector_text().as_deref(), Some("role=worker"));
        assert!(window("@daily", H, "UTC").applies_to(&BTreeMap::new()));
    }

    #[test]
    fn a_multi_term_selector_picks_nodes_and_survives_the_store() {
        let w = Window::new("racks", "@daily", H, None, Some("rack in (r1,r2),role!=db"))
            .expect("valid");
        let bytes = postcard::to_allocvec(w.record()).expect("encode");
        let stored: WindowRecord = postcard::from_bytes(&bytes).expect("decode");
        assert_eq!(&stored, w.record());
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert!(w.applies_to(&labels(&[("rack", "r1"), ("role", "web")])));
        assert!(w.applies_to(&labels(&[("rack", "r2")])));
        assert!(!w.applies_to(&labels(&[("rack", "r1"), ("role", "db")])));
        assert!(!w.applies_to(&labels(&[("rack", "r3")])));
        assert_eq!(
            w.selector_text().as_deref(),
            Some("rack in (r1,r2),role!=db")
        );
    }

    #[test]
    fn daily_window_opens_and_closes_on_the_local_clock() {
        // 02:00 Berlin is 00:00 UTC in summer (CEST, +2) and 01:00 UTC in winter (CET, +1).
        let w = window("0 2 * * *", 3 * H, "Europe/Berlin");
        assert_eq!(
            pair(w.is_open(t("2026-07-01T00:30:00Z"))),
            some("2026-07-01T00:00:00Z", "2026-07-01T03:00:00Z")
        );
        assert_eq!(
            pair(w.is_open(t("2026-01-15T00:30:00Z"))),
            None,
            "01:30 CET: not yet"
        );
        assert_eq!(
            pair(w.is_open(t("2026-01-15T01:00:00Z"))),
            some("2026-01-15T01:00:00Z", "2026-01-15T04:00:00Z")
        );
        assert_eq!(
            pair(w.is_open(t("2026-01-15T04:00:00Z"))),
            None,
            "the end is exclusive"
        );
        assert_eq!(
            pair(w.next_open(t("2026-01-15T01:00:00Z"))),
            some("2026-01-16T01:00:00Z", "2026-01-16T04:00:00Z")
        );
        assert_eq!(
            pair(w.current_or_next(t("2026-01-15T02:00:00Z"))),
            some("2026-01-15T01:00:00Z", "2026-01-15T04:00:00Z")
        );
    }

    #[test]
    fn spring_forward_a_window_in_the_gap_opens_right_after_it_for_its_full_length() {
        // Europe/Berlin, Sunday 2026-03-29: 02:00 CET jumps to 03:00 CEST (01:00 UTC). 02:30 does
        // not exist; the window opens at 03:00 CEST and still lasts 2 h.
        let w = window("30 2 * * *", 2 * H, "Europe/Berlin");
        assert_eq!(
            pair(w.next_open(t("2026-03-28T12:00:00Z"))),
            some("2026-03-29T01:00:00Z", "2026-03-29T03:00:00Z")
        );
        assert_eq!(
            pair(w.is_open(t("2026-03-29T00:59:00Z"))),
            None,
            "01:59 CET: before the gap, closed"
        );
        assert_eq!(
            pair(w.is_open(t("2026-03-29T01:00:00Z"))),
            some("2026-03-29T01:00:00Z", "2026-03-29T03:00:00Z")
        );
        // The day before and the day after are ordinary.
        assert_eq!(
            pair(w.next_open(t("2026-03-27T12:00:00Z"))),
            some("2026-03-28T01:30:00Z", "2026-03-28T03:30:00Z")
        );
        assert_eq!(
            pair(w.next_open(t("2026-03-29T01:00:00Z"))),
            some("2026-03-30T00:30:00Z", "2026-03-30T02:30:00Z")
        );
        // A window that opened before the gap lasts its real duration across it: 01:00 CET + 2 h is
        // 04:00 CEST.
        let early = window("0 1 * * *", 2 * H, "Europe/Berlin");
        assert_eq!(
            pair(early.is_open(t("2026-03-29T01:30:00Z"))),
            some("2026-03-29T00:00:00Z", "2026-03-29T02:00:00Z")
        );
        // America/New_York, Sunday 2026-03-08: 02:00 EST jumps to 03:00 EDT (07:00 UTC).
        let ny = window("30 2 * * *", H, "America/New_York");
        assert_eq!(
            pair(ny.next_open(t("2026-03-07T12:00:00Z"))),
            some("2026-03-08T07:00:00Z", "2026-03-08T08:00:00Z")
        );
    }

    #[test]
    fn fall_back_a_window_in_the_repeated_hour_opens_once() {
        // Europe/Berlin, Sunday 2026-10-25: 03:00 CEST goes back to 02:00 CET; 02:30 happens at
        // 00:30 UTC and again at 01:30 UTC. The window opens at the first only.
        let w = window("30 2 * * *", 30 * Duration::from_secs(60), "Europe/Berlin");
        let first = w.next_open(t("2026-10-24T12:00:00Z"));
        assert_eq!(
            pair(first),
            some("2026-10-25T00:30:00Z", "2026-10-25T01:00:00Z")
        );
        assert_eq!(
            pair(w.next_open(t("2026-10-25T00:30:00Z"))),
            some("2026-10-26T01:30:00Z", "2026-10-26T02:00:00Z")
        );
        assert_eq!(
            pair(w.is_open(t("2026-10-25T01:45:00Z"))),
            None,
            "the second 02:45 is not in a window"
        );
        // The duration is elapsed time across the repeated hour: opened 01:00 CEST (23:00 UTC), 4 h
        // later is 03:00 UTC, which is 04:00 CET on the wall clock.
        let long = window("0 1 * * *", 4 * H, "Europe/Berlin");
        assert_eq!(
            pair(long.is_open(t("2026-10-25T02:30:00Z"))),
            some("2026-10-24T23:00:00Z", "2026-10-25T03:00:00Z")
        );
        // America/New_York, Sunday 2026-11-01: 01:30 happens at 05:30 and 06:30 UTC.
        let ny = window(
            "30 1 * * *",
            30 * Duration::from_secs(60),
            "America/New_York",
        );
        assert_eq!(
            pair(ny.next_open(t("2026-10-31T12:00:00Z"))),
            some("2026-11-01T05:30:00Z", "2026-11-01T06:00:00Z")
        );
        assert_eq!(
            pair(ny.next_open(t("2026-11-01T05:30:00Z"))),
            some("2026-11-02T06:30:00Z", "2026-11-02T07:00:00Z")
        );
    }

    #[test]
    fn a_daily_window_opens_exactly_once_a_day_for_a_whole_year_of_clock_changes() {
        let tz = parse_tz("Europe/Berlin").expect("zone");
        let w = window("30 2 * * *", H, "Europe/Berlin");
        let mut openings = Vec::new();
        let mut after = t("2025-12-31T23:00:00Z");
        while let Some((start, end)) = w.next_open(after) {
            if start >= t("2026-12-31T23:00:00Z") {
                break;
            }
            assert_eq!(end, add(start, H));
            openings.push(start);
            after = start;
        }
        assert_eq!(
            openings.len(),
            365,
            "one opening per local day, none doubled, none lost"
        );
        for start in &openings {
            let local = to_timestamp(*start).expect("in range").to_zoned(tz.clone());
            let wall = (local.hour(), local.minute());
            let gap_day = local.date() == jiff::civil::date(2026, 3, 29);
            assert_eq!(wall, if gap_day { (3, 0) } else { (2, 30) }, "{local}");
        }
        // Every instant of the year agrees with the openings (sampled every 7 minutes).
        let mut now = t("2026-01-01T00:00:00Z");
        while now < t("2026-12-31T00:00:00Z") {
            let covering = openings
                .iter()
                .find(|s| **s <= now && now < add(**s, H))
                .copied();
            assert_eq!(w.is_open(now).map(|(s, _)| s), covering, "at {}", show(now));
            now = add(now, Duration::from_secs(7 * 60));
        }
    }

    #[test]
    fn a_window_spanning_midnight_is_open_on_both_days() {
        // Saturdays 22:00 UTC for 6 h: open until Sunday 04:00.
        let w = window("0 22 * * SAT", 6 * H, "UTC");
        // 2026-06-06 is a Saturday.
        assert_eq!(
            pair(w.is_open(t("2026-06-06T23:59:00Z"))),
            some("2026-06-06T22:00:00Z", "2026-06-07T04:00:00Z")
        );
        assert_eq!(
            pair(w.is_open(t("2026-06-07T03:59:59Z"))),
            some("2026-06-06T22:00:00Z", "2026-06-07T04:00:00Z")
        );
        assert_eq!(pair(w.is_open(t("2026-06-07T04:00:00Z"))), None);
        assert_eq!(pair(w.is_open(t("2026-06-06T21:59:00Z"))), None);
    }

    #[test]
    fn open_because_it_started_before_the_instant_asked_about() {
        // Opened at 01:00 UTC on the 1st of the month; asked at 05:17 on the same day.
        let w = window("0 1 1 * *", 12 * H, "UTC");
        let now = t("2026-05-01T05:17:00Z");
        assert_eq!(
            pair(w.is_open(now)),
            some("2026-05-01T01:00:00Z", "2026-05-01T13:00:00Z")
        );
        assert_eq!(w.open_until(now), Some(t("2026-05-01T13:00:00Z")));
        // next_open skips the current opening.
        assert_eq!(
            pair(w.next_open(now)),
            some("2026-06-01T01:00:00Z", "2026-06-01T13:00:00Z")
        );
    }

    #[test]
    fn overlapping_openings_merge_into_one_open_period() {
        // Every 2 h for 3 h: always open once started; the period end is capped, not infinite.
        let w = window("0 */2 * * *", 3 * H, "UTC");
        let (opened, end) = w.is_open(t("2026-05-01T04:30:00Z")).expect("open");
        assert_eq!(
            show(opened),
            "2026-05-01T02:00:00Z",
            "earliest opening covering 04:30 (02:00 and 04:00 do)"
        );
        let (opened, _) = w.is_open(t("2026-05-01T05:00:00Z")).expect("open");
        assert_eq!(
            show(opened),
            "2026-05-01T04:00:00Z",
            "02:00 + 3 h has closed at 05:00"
        );
        assert!(
            end > t("2026-05-08T00:00:00Z"),
            "merged far ahead: {}",
            show(end)
        );
        // Touching openings merge too: hourly for exactly 1 h.
        let touching = window("0 8-10 * * *", H, "UTC");
        assert_eq!(
            pair(touching.is_open(t("2026-05-01T08:30:00Z"))),
            some("2026-05-01T08:00:00Z", "2026-05-01T11:00:00Z")
        );
    }

    #[test]
    fn always_open_and_closures_answer_the_planner() {
        assert!(AlwaysOpen.open_until(UnixMillis(0)).is_some());
        let closed = |_at: UnixMillis| None;
        assert_eq!(closed.open_until(UnixMillis(5)), None);
    }
}

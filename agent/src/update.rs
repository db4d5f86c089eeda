//! The agent's self-update decisions: when a freshly swapped-in binary has proven itself, when it
//! must give way to the previous one, and what to tell the controller. Sans-IO: the state is a
//! value the updater keeps in the state dir (`update.json`, written before every step it guards),
//! time is passed in, and the outputs are [`Step`]s for the shell (rename files, re-exec, run
//! checks, report).
//!
//! The sequence (see `docs/maintenance-design.md`, section 4):
//! 1. The release is verified ([`crate::release`]) and written as `agent.new`; the running binary
//!    is kept as `agent.prev`. [`UpdateState::trying`] is written, *then* `agent.new` is renamed
//!    over `agent` and the agent re-executes itself.
//! 2. Every start calls [`on_start`] with the version it runs. The new binary counts its start
//!    first (a crash loop shows as attempts), then runs its health checks until the deadline.
//! 3. [`on_checks`] with each round of results: all passed → `succeeded`; the deadline passed →
//!    roll back. [`on_timeout`] when the deadline passes with no result.
//! 4. Roll-back: the shell renames `agent.prev` back over `agent` and re-executes; the old binary's
//!    [`on_start`] sees it runs the previous version and settles the record as `failed
//!    (unhealthy)`. This needs no controller: it is what brings a node back whose new agent cannot
//!    even connect.
//! 5. [`report`] turns the state into the [`UpdateReport`] sent at every session start.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_proto::{CheckResult, UnixMillis, UpdateFailure, UpdateReport};

/// Limits for a new binary to prove itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpdatePolicy {
    /// From the swap, how long the new binary has to pass every health check. Default 2 min.
    pub health_deadline: Duration,
    /// Starts of the new binary (it crashed and was restarted) before it is given up on. Default 3.
    pub max_attempts: u32,
    /// Control sessions a release download may use: a download broken off because the control
    /// connection went away (a controller restart, a network outage) is fetched again, from the
    /// bytes already received, on the next session, at most this many sessions in all. Default 5.
    pub max_download_sessions: u32,
}

impl Default for UpdatePolicy {
    fn default() -> Self {
        Self {
            health_deadline: Duration::from_secs(120),
            max_attempts: 3,
            max_download_sessions: 5,
        }
    }
}

/// The updater's record, kept in the state dir across the swap, re-execs and roll-backs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum UpdateState {
    /// The new binary is installed (or about to be) and has not proven itself yet.
    Trying {
        /// The new version.
        attempted: String,
        /// The version kept as `agent.prev`.
        previous: String,
        /// How many times the new version started.
        attempts: u32,
        /// Healthy by then, or roll back.
        deadline: UnixMillis,
        /// The latest round of checks.
        checks: Vec<CheckResult>,
    },
    /// The new version passed its checks.
    Succeeded {
        /// The version.
        version: String,
        /// How many starts it took.
        attempts: u32,
        /// The checks it passed.
        checks: Vec<CheckResult>,
    },
    /// The update failed; the agent runs (or is going back to) `previous`.
    Failed {
        /// The version that failed.
        attempted: String,
        /// The version running.
        previous: String,
        /// How many times the failed version started.
        attempts: u32,
        /// Its last checks.
        checks: Vec<CheckResult>,
        /// Why.
        failure: UpdateFailure,
    },
}

impl UpdateState {
    /// The record to write just before the new binary is renamed into place.
    pub fn trying(
        attempted: &str,
        previous: &str,
        now: UnixMillis,
        policy: &UpdatePolicy,
    ) -> UpdateState {
        UpdateState::Trying {
            attempted: attempted.to_owned(),
            previous: previous.to_owned(),
            attempts: 0,
            deadline: UnixMillis(now.0.saturating_add(
                u64::try_from(policy.health_deadline.as_millis()).unwrap_or(u64::MAX),
            )),
            checks: Vec::new(),
        }
    }

    /// The record when installing failed before the swap (nothing changed on the node).
    pub fn install_failed(attempted: &str, running: &str, failure: UpdateFailure) -> UpdateState {
        UpdateState::Failed {
            attempted: attempted.to_owned(),
            previous: running.to_owned(),
            attempts: 0,
            checks: Vec::new(),
            failure,
        }
    }
}

/// What the shell does next.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Step {
    /// Nothing to do about updates.
    Nothing,
    /// Write this record, then run the health checks; come back by `deadline` at the latest.
    Check {
        /// The record to write first.
        state: UpdateState,
        /// When to give up.
        deadline: UnixMillis,
    },
    /// Write this record (a settled outcome), then carry on.
    Settle(UpdateState),
    /// Write this record, put `agent.prev` back over `agent`, and re-execute.
    RollBack(UpdateState),
}

/// Decides at start, given the stored record (if any) and the version this binary is.
pub fn on_start(
    state: Option<UpdateState>,
    running: &str,
    now: UnixMillis,
    policy: &UpdatePolicy,
) -> Step {
    let Some(UpdateState::Trying {
        attempted,
        previous,
        attempts,
        deadline,
        checks,
    }) = state
    else {
        return Step::Nothing;
    };
    if running == attempted {
        let attempts = attempts.saturating_add(1);
        if attempts > policy.max_attempts || now >= deadline {
            return Step::RollBack(UpdateState::Trying {
                attempted,
                previous,
                attempts,
                deadline,
                checks,
            });
        }
        return Step::Check {
            state: UpdateState::Trying {
                attempted,
                previous,
                attempts,
                deadline,
                checks,
            },
            deadline,
        };
    }
    if running == previous {
        // Rolled back, or the swap never happened (attempts 0: interrupted between record and
        // rename).
        let failure = if attempts == 0 {
            UpdateFailure::Install("interrupted before the new binary started".into())
        } else {
            UpdateFailure::Unhealthy
        };
        return Step::Settle(UpdateState::Failed {
            attempted,
            previous,
            attempts,
            checks,
            failure,
        });
    }
    // Someone installed another binary by hand: the record is about something else. Forget it.
    Step::Settle(UpdateState::Succeeded {
        version: running.to_owned(),
        attempts: 0,
        checks: Vec::new(),
    })
}

/// Decides after a round of health checks of the new binary.
pub fn on_checks(state: UpdateState, results: Vec<CheckResult>, now: UnixMillis) -> Step {
    let UpdateState::Trying {
        attempted,
        previous,
        attempts,
        deadline,
        ..
    } = state
    else {
        return Step::Nothing;
    };
    if results.iter().all(|c| c.passed) {
        return Step::Settle(UpdateState::Succeeded {
            version: attempted,
            attempts,
            checks: results,
        });
    }
    let trying = UpdateState::Trying {
        attempted,
        previous,
        attempts,
        deadline,
        checks: results,
    };
    if now >= deadline {
        Step::RollBack(trying)
    } else {
        Step::Check {
            state: trying,
            deadline,
        }
    }
}

/// Decides when the deadline passes with no (passing) round of checks.
pub fn on_timeout(state: UpdateState, now: UnixMillis) -> Step {
    match state {
        UpdateState::Trying { deadline, .. } if now >= deadline => Step::RollBack(state),
        UpdateState::Trying { deadline, .. } => Step::Check { state, deadline },
        _ => Step::Nothing,
    }
}

/// How one download attempt (on one control connection) ended.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum DownloadEnd {
    /// Every byte arrived; size and hash match the verified manifest.
    Complete,
    /// The release itself is bad or cannot be had: the controller answered an error, the stream
    /// ended short while the connection was alive, the size or hash does not match, the disk
    /// refused.
    Failed(UpdateFailure),
    /// The control connection went away (closed or lost) before the end: not the release's fault.
    ConnectionLost {
        /// Bytes received and kept so far (the next session resumes there).
        received: u64,
        /// Why the connection ended, for the record.
        cause: String,
    },
}

/// What to do after a download attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FetchStep {
    /// The download is complete: install it.
    Install,
    /// Keep the verified offer, report nothing, and fetch again (from the bytes kept) on the next
    /// control session.
    Retry,
    /// Give up: record and report this failure.
    Fail(UpdateFailure),
}

/// Decides after attempt number `sessions` (1 for the first) of a download ended with `end`. A lost
/// connection is retried on later sessions up to [`UpdatePolicy::max_download_sessions`] in all;
/// then, and for every other end but `Complete`, the update fails.
pub fn on_download_end(sessions: u32, end: DownloadEnd, policy: &UpdatePolicy) -> FetchStep {
    match end {
        DownloadEnd::Complete => FetchStep::Install,
        DownloadEnd::Failed(failure) => FetchStep::Fail(failure),
        DownloadEnd::ConnectionLost { .. } if sessions < policy.max_download_sessions => FetchStep::Retry,
        DownloadEnd::ConnectionLost { received, cause } => FetchStep::Fail(UpdateFailure::Install(format!(
            "download: the control connection was lost {sessions} times while fetching ({received} bytes kept; last: {cause})"
        ))),
    }
}

/// What an offer of the version the agent already runs does to the record: nothing, when the record
/// is about that version (a health check in progress stays in progress, a success stays a success:
/// a repeated offer, e.g. the rollout driver's resend after a controller restart, must not wipe the
/// checks); otherwise the record is about another version and no longer says anything about the
/// node (`None`: the report says "nothing attempted", which the controller reads as settled and
/// healthy on the running version).
pub fn offered_running(state: Option<UpdateState>, running: &str) -> Option<UpdateState> {
    match state {
        Some(UpdateState::Trying { ref attempted, .. })
        | Some(UpdateState::Succeeded {
            version: ref attempted,
            ..
        }) if attempted == running => state,
        _ => None,
    }
}

/// The report for the controller, from the record and the running version.
pub fn report(state: Option<&UpdateState>, running: &str) -> UpdateReport {
    let (attempted, attempts, checks, failure) = match state {
        None => (None, 0, Vec::new(), None),
        Some(UpdateState::Trying {
            attempted,
            attempts,
            checks,
            ..
        }) => (Some(attempted.clone()), *attempts, checks.clone(), None),
        Some(UpdateState::Succeeded {
            version,
            attempts,
            checks,
        }) => (Some(version.clone()), *attempts, checks.clone(), None),
        Some(UpdateState::Failed {
            attempted,
            attempts,
            checks,
            failure,
            ..
        }) => (
            Some(attempted.clone()),
            *attempts,
            checks.clone(),
            Some(failure.clone()),
        ),
    };
    UpdateReport {
        running: running.to_owned(),
        attempted,
        attempts,
        checks,
        failure,
    }
}

/// Whether going from `running` to `offered` is a downgrade the offer must allow: `offered` comes
/// before `running` in semver precedence (build metadata does not count), or either is not a semver
/// version, so the two cannot be ordered and the agent does not guess.
pub fn is_downgrade(running: &str, offered: &str) -> bool {
    match (
        semver::Version::parse(running),
        semver::Version::parse(offered),
    ) {
        (Ok(r), Ok(o)) => o.cmp_precedence(&r) == std::cmp::Ordering::Less,
        _ => true,
    }
}

/// The downgrade rule for an offer: `Err` with the failure to report when `offered` is older than
/// `running` ([`is_downgrade`]) and the offer does not allow that.
pub fn check_downgrade(
    running: &str,
    offered: &str,
    allow_downgrade: bool,
) -> Result<(), UpdateFailure> {
    if allow_downgrade || !is_downgrade(running, offered) {
        Ok(())
    } else {
        Err(UpdateFailure::Downgrade {
            running: running.to_owned(),
            offered: offered.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OLD: &str = "0.1.0";
    const NEW: &str = "0.2.0";

    fn t(secs: u64) -> UnixMillis {
        UnixMillis(1_800_000_000_000 + secs * 1000)
    }

    fn check(name: &str, passed: bool) -> CheckResult {
        CheckResult {
            name: name.into(),
            passed,
            detail: (!passed).then(|| "no Welcome within 30s".into()),
        }
    }

    fn written(step: &Step) -> UpdateState {
        match step {
            Step::Check { state, .. } | Step::Settle(state) | Step::RollBack(state) => {
                state.clone()
            }
            Step::Nothing => panic!("nothing written"),
        }
    }

    #[test]
    fn a_healthy_new_binary_settles_as_succeeded() {
        let policy = UpdatePolicy::default();
        let record = UpdateState::trying(NEW, OLD, t(0), &policy);
        let step = on_start(Some(record), NEW, t(5), &policy);
        let Step::Check { state, deadline } = step else {
            panic!("{step:?}")
        };
        assert_eq!(deadline, t(120));
        let step = on_checks(
            state,
            vec![check("session", true), check("overlay", true)],
            t(20),
        );
        let r = report(Some(&written(&step)), NEW);
        assert_eq!(
            (r.attempted.as_deref(), r.attempts, r.failure),
            (Some(NEW), 1, None)
        );
        assert_eq!(r.checks.len(), 2);
        // Later starts do nothing more.
        assert_eq!(
            on_start(Some(written(&step)), NEW, t(500), &policy),
            Step::Nothing
        );
    }

    #[test]
    fn an_unhealthy_new_binary_rolls_back_by_itself_and_the_old_one_says_why() {
        let policy = UpdatePolicy::default();
        let Step::Check { state, .. } = on_start(
            Some(UpdateState::trying(NEW, OLD, t(0), &policy)),
            NEW,
            t(5),
            &policy,
        ) else {
            panic!()
        };
        let step = on_checks(state, vec![check("session", false)], t(30));
        let Step::Check { state, .. } = step else {
            panic!("{step:?}: retry until the deadline")
        };
        let step = on_checks(state, vec![check("session", false)], t(120));
        let Step::RollBack(state) = step else {
            panic!("{step:?}")
        };
        // The previous binary starts and settles the record.
        let step = on_start(Some(state), OLD, t(125), &policy);
        let Step::Settle(failed) = step else {
            panic!("{step:?}")
        };
        let r = report(Some(&failed), OLD);
        assert_eq!(r.running, OLD);
        assert_eq!(r.attempted.as_deref(), Some(NEW));
        assert_eq!(r.failure, Some(UpdateFailure::Unhealthy));
        assert_eq!(
            r.checks,
            vec![check("session", false)],
            "the controller sees which check failed"
        );
        // No result at all before the deadline: on_timeout rolls back.
        let trying = UpdateState::trying(NEW, OLD, t(0), &policy);
        assert!(matches!(
            on_timeout(trying.clone(), t(119)),
            Step::Check { .. }
        ));
        assert!(matches!(on_timeout(trying, t(120)), Step::RollBack(_)));
    }

    #[test]
    fn a_crash_loop_rolls_back_after_max_attempts() {
        let policy = UpdatePolicy {
            max_attempts: 3,
            ..UpdatePolicy::default()
        };
        let mut record = UpdateState::trying(NEW, OLD, t(0), &policy);
        for i in 1..=3 {
            let step = on_start(Some(record), NEW, t(i), &policy);
            assert!(matches!(step, Step::Check { .. }), "start {i}: {step:?}");
            record = written(&step); // then it crashes before any check
        }
        let step = on_start(Some(record), NEW, t(4), &policy);
        let Step::RollBack(state) = step else {
            panic!("{step:?}")
        };
        let Step::Settle(failed) = on_start(Some(state), OLD, t(5), &policy) else {
            panic!()
        };
        assert_eq!(report(Some(&failed), OLD).attempts, 4);
    }

    #[test]
    fn a_start_after_the_deadline_rolls_back_at_once() {
        let policy = UpdatePolicy::default();
        let step = on_start(
            Some(UpdateState::trying(NEW, OLD, t(0), &policy)),
            NEW,
            t(600),
            &policy,
        );
        assert!(matches!(step, Step::RollBack(_)), "{step:?}");
    }

    #[test]
    fn interrupted_or_failed_installs_leave_the_old_version_and_say_why() {
        let policy = UpdatePolicy::default();
        // Crash between writing the record and the rename: the old binary starts with attempts 0.
        let step = on_start(
            Some(UpdateState::trying(NEW, OLD, t(0), &policy)),
            OLD,
            t(3),
            &policy,
        );
        let r = report(Some(&written(&step)), OLD);
        assert!(
            matches!(r.failure, Some(UpdateFailure::Install(_))),
            "{r:?}"
        );
        // Disk full while writing agent.new: recorded without a swap.
        let failed = UpdateState::install_failed(
            NEW,
            OLD,
            UpdateFailure::Install("No space left on device".into()),
        );
        let r = report(Some(&failed), OLD);
        assert_eq!((r.running.as_str(), r.attempts), (OLD, 0));
        assert!(r
            .failure
            .map(|f| f.to_string())
            .unwrap_or_default()
            .contains("No space left"));
        // A binary replaced by hand: the record is dropped as irrelevant.
        let step = on_start(
            Some(UpdateState::trying(NEW, OLD, t(0), &policy)),
            "0.3.0-dev",
            t(3),
            &policy,
        );
        assert!(
            matches!(step, Step::Settle(UpdateState::Succeeded { .. })),
            "{step:?}"
        );
        assert_eq!(on_start(None, OLD, t(0), &policy), Step::Nothing);
        assert_eq!(report(None, OLD).attempted, None);
    }

    #[test]
    fn a_download_broken_off_by_a_lost_connection_is_retried_a_bounded_number_of_times() {
        let policy = UpdatePolicy::default();
        let lost = || DownloadEnd::ConnectionLost {
            received: 4096,
            cause: "connection lost: reset by peer".into(),
        };
        for session in 1..policy.max_download_sessions {
            assert_eq!(
                on_download_end(session, lost(), &policy),
                FetchStep::Retry,
                "session {session}"
            );
        }
        // The last allowed session: a real failure, which says what happened.
        let step = on_download_end(policy.max_download_sessions, lost(), &policy);
        let FetchStep::Fail(UpdateFailure::Install(why)) = step else {
            panic!("{step:?}")
        };
        assert!(
            why.contains("connection was lost 5 times") && why.contains("reset by peer"),
            "{why}"
        );
        // A resumed download that completes installs, whichever session it took.
        assert_eq!(
            on_download_end(3, DownloadEnd::Complete, &policy),
            FetchStep::Install
        );
        assert_eq!(
            on_download_end(1, DownloadEnd::Complete, &policy),
            FetchStep::Install
        );
        // One session only: no retry at all.
        let once = UpdatePolicy {
            max_download_sessions: 1,
            ..policy
        };
        assert!(matches!(
            on_download_end(1, lost(), &once),
            FetchStep::Fail(_)
        ));
    }

    #[test]
    fn a_short_or_bad_download_on_a_live_connection_fails_at_once() {
        let policy = UpdatePolicy::default();
        // The stream ended cleanly but short (the controller's copy is truncated): no retry.
        let truncated = UpdateFailure::Truncated {
            got: 10,
            expected: 20,
        };
        assert_eq!(
            on_download_end(1, DownloadEnd::Failed(truncated.clone()), &policy),
            FetchStep::Fail(truncated)
        );
        let mismatch = UpdateFailure::HashMismatch {
            expected: "aa".into(),
            actual: "bb".into(),
        };
        assert_eq!(
            on_download_end(2, DownloadEnd::Failed(mismatch.clone()), &policy),
            FetchStep::Fail(mismatch)
        );
        let said = UpdateFailure::Install("download: the controller says: no such release".into());
        assert_eq!(
            on_download_end(1, DownloadEnd::Failed(said.clone()), &policy),
            FetchStep::Fail(said)
        );
    }

    #[test]
    fn offering_the_running_version_keeps_a_check_in_progress_and_a_success() {
        // The new version is being checked (held by a failing check): a repeated offer changes
        // nothing.
        let trying = UpdateState::Trying {
            attempted: NEW.into(),
            previous: OLD.into(),
            attempts: 1,
            deadline: t(120),
            checks: vec![check("session", true), check("check:gate", false)],
        };
        assert_eq!(
            offered_running(Some(trying.clone()), NEW),
            Some(trying.clone())
        );
        let r = report(offered_running(Some(trying), NEW).as_ref(), NEW);
        assert_eq!(
            (r.attempted.as_deref(), r.attempts, r.checks.len()),
            (Some(NEW), 1, 2),
            "still checking: {r:?}"
        );
        // Succeeded with its checks: kept.
        let ok = UpdateState::Succeeded {
            version: NEW.into(),
            attempts: 1,
            checks: vec![check("session", true)],
        };
        assert_eq!(offered_running(Some(ok.clone()), NEW), Some(ok));
        // A record about another version (an old failure), or none: nothing attempted.
        let failed = UpdateState::install_failed(NEW, OLD, UpdateFailure::Unhealthy);
        assert_eq!(offered_running(Some(failed), OLD), None);
        assert_eq!(offered_running(None, OLD), None);
        let r = report(None, OLD);
        assert_eq!((r.attempted, r.failure, r.checks.len()), (None, None, 0));
    }

    #[test]
    fn the_record_survives_its_file_format() {
        let policy = UpdatePolicy::default();
        let s = UpdateState::Failed {
            attempted: NEW.into(),
            previous: OLD.into(),
            attempts: 2,
            checks: vec![check("overlay", false)],
            failure: UpdateFailure::Unhealthy,
        };
        let json = serde_json::to_string(&s).expect("json");
        assert_eq!(
            serde_json::from_str::<UpdateState>(&json).expect("parse"),
            s
        );
        let t0 = UpdateState::trying(NEW, OLD, t(0), &policy);
        assert_eq!(
            serde_json::from_str::<UpdateState>(&serde_json::to_string(&t0).expect("json"))
                .expect("parse"),
            t0
        );
    }

    #[test]
    fn downgrades_need_the_offer_s_permission() {
        assert!(!is_downgrade("0.1.0", "0.2.0"));
        assert!(is_downgrade("0.10.0", "0.9.0"), "numeric, not text, order");
        assert!(!is_downgrade("0.9.0", "0.10.0"));
        assert!(
            is_downgrade("1.0.0", "1.0.0-rc.1"),
            "a pre-release comes before its release"
        );
        assert!(!is_downgrade("0.9.0-good", "0.9.4-roll"));
        assert!(
            !is_downgrade("1.0.0+a", "1.0.0+b") && !is_downgrade("1.0.0+b", "1.0.0+a"),
            "build metadata does not order"
        );
        assert!(
            is_downgrade("0.1.0", "nightly") && is_downgrade("nightly", "0.2.0"),
            "not semver: cannot be ordered"
        );
        assert_eq!(check_downgrade("0.9.4", "0.9.0", true), Ok(()));
        assert_eq!(check_downgrade("0.9.0", "0.9.4", false), Ok(()));
        let refused = check_downgrade("0.9.4", "0.9.0", false).unwrap_err();
        assert_eq!(
            refused,
            UpdateFailure::Downgrade {
                running: "0.9.4".into(),
                offered: "0.9.0".into()
            }
        );
        assert!(
            refused.to_string().contains("--allow-downgrade"),
            "{refused}"
        );
    }
}

//! Deadline-bounded waits for async tests on tokio (the in-process tests of `controller/tests`, and
//! async unit tests): [`eventually`] polls until a check yields a value, [`consistently`] checks
//! that something keeps holding. Both panic with what was awaited, so a test reads top to bottom.
//! They run on tokio's clock, so a test with a paused clock waits in virtual time.

use std::future::Future;
use std::time::Duration;

/// How often [`eventually`] and [`consistently`] re-evaluate their check.
pub const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// Polls `check` every [`POLL_INTERVAL`] until it returns `Some`, and returns that value; panics
/// with `what` if `deadline` passes first (also while a check is still running).
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let poll = async {
        loop {
            if let Some(v) = check().await {
                return v;
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    };
    match tokio::time::timeout(deadline, poll).await {
        Ok(v) => v,
        Err(_) => panic!("not within {deadline:?}: {what}"),
    }
}

/// Checks every [`POLL_INTERVAL`] for the whole of `duration` (at least twice) that `check` holds;
/// panics with `what` at the first check that does not. Use it to assert that something does
/// *not* happen.
pub async fn consistently<F, Fut>(duration: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = tokio::time::Instant::now();
    let mut checks = 0u32;
    loop {
        checks += 1;
        assert!(
            check().await,
            "expected {what} to hold for {duration:?}, but it failed after {:.1?} (check {checks})",
            start.elapsed()
        );
        if start.elapsed() >= duration && checks >= 2 {
            return;
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[tokio::test]
    async fn eventually_returns_the_first_value() {
        let n = AtomicU32::new(0);
        let v = eventually(Duration::from_secs(5), "the third try", || async {
            let i = n.fetch_add(1, Ordering::SeqCst) + 1;
            (i >= 3).then_some(i)
        })
        .await;
        assert_eq!(v, 3);
    }

    #[tokio::test]
    #[should_panic(expected = "not within 300ms: the impossible")]
    async fn eventually_panics_at_the_deadline() {
        eventually(Duration::from_millis(300), "the impossible", || async {
            None::<()>
        })
        .await;
    }

    #[tokio::test]
    async fn consistently_holds_for_the_duration() {
        let start = tokio::time::Instant::now();
        consistently(Duration::from_millis(300), "truth", || async { true }).await;
        assert!(start.elapsed() >= Duration::from_millis(300));
    }

    #[tokio::test]
    #[should_panic(expected = "expected n stays small to hold")]
    async fn consistently_panics_when_it_stops_holding() {
        let n = AtomicU32::new(0);
        consistently(Duration::from_secs(5), "n stays small", || async {
            n.fetch_add(1, Ordering::SeqCst) < 2
        })
        .await;
    }
}

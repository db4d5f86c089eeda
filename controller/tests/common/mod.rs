//! Helpers shared by the controller's in-process integration tests.

use std::{future::Future, time::Duration};

/// Polls `check` until it returns `Some`, failing the test with `what` at the deadline.
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
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    match tokio::time::timeout(deadline, poll).await {
        Ok(v) => v,
        Err(_) => panic!("not within {deadline:?}: {what}"),
    }
}

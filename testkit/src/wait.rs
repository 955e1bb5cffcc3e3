//! Waiting on conditions with a deadline (never a bare sleep).

use std::future::Future;
use std::time::{Duration, Instant};

/// How often a condition is re-checked. Short enough that a waiting test adds little
/// latency, long enough not to busy-spin the 2 shared cores.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Polls `cond` until it returns `Some`, or panics with `why` after `timeout`.
pub fn wait_until<T>(mut cond: impl FnMut() -> Option<T>, why: &str, timeout: Duration) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {why}");
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Async form of [`wait_until`].
pub async fn wait_until_async<T, F, Fut>(mut cond: F, why: &str, timeout: Duration) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = cond().await {
            return v;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for: {why}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

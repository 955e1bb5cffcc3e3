//! Child-process helpers of the lockd benchmarks (the etcd comparison in `bench` and the
//! scale run in `scale`): waiting until a server they started answers. (Their ports come
//! from the one picker, `vha_core::ports::free_port`.)

use std::time::{Duration, Instant};

/// Polls `f` every 50 ms until it says the server `what` is ready, for at most 30 s (a
/// debug-build lockd or etcd on a busy machine starts within a few seconds).
pub(crate) async fn wait_ready<F, Fut>(what: &str, f: F) -> Result<(), String>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if f().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("{what} did not become ready"))
}

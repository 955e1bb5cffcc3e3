//! Child-process helpers of the lockd benchmarks (the etcd comparison in `bench` and the
//! scale run in `scale`): ports for the servers they start, and waiting until one answers.

use std::time::{Duration, Instant};

/// Ports the bench hands its servers: below Linux's ephemeral range (32768-60999), so the
/// kernel never gives one to an outgoing connection between the check here and the server's
/// bind (the same range and rule as the test kit's `free_port`).
const PORT_RANGE: std::ops::Range<u16> = 20_000..32_768;

/// The next candidate port; each port is handed out once per bench process.
static NEXT_PORT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);

/// A port on 127.0.0.1 that was free a moment ago and that this run has not handed out.
pub(crate) fn free_port() -> Result<u16, String> {
    let span = PORT_RANGE.end - PORT_RANGE.start;
    let start = (std::process::id() % u32::from(span)) as u16;
    for _ in 0..span {
        let offset = (start + NEXT_PORT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) % span;
        let port = PORT_RANGE.start + offset;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(format!("no free port on 127.0.0.1 in {PORT_RANGE:?}"))
}

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

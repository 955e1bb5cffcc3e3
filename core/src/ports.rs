//! The one port picker of vha's tooling (the test kit, `vha dev`, the benchmarks): ports on
//! 127.0.0.1 for the servers they start.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU16, Ordering};

/// Ports handed out come from below Linux's default ephemeral range (32768-60999), so the
/// kernel never gives one of them to an outgoing connection or a `bind(0)` between the
/// check here and the bind by the process that gets it.
pub const PORT_RANGE: std::ops::Range<u16> = 20_000..32_768;

/// How many candidates this process has tried: each port is handed out at most once per
/// process (until the range wraps).
static NEXT: AtomicU16 = AtomicU16::new(0);

/// A port on 127.0.0.1 that was free a moment ago and that this process has not handed out
/// before. Parallel callers never get the same port; the start is spread by PID so that
/// consecutive processes do not reuse the ports of one whose sockets may still be in
/// TIME_WAIT.
pub fn free_port() -> Result<u16, String> {
    let span = PORT_RANGE.end - PORT_RANGE.start;
    let start = (std::process::id() % u32::from(span)) as u16;
    for _ in 0..span {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed) % span) % span;
        let port = PORT_RANGE.start + offset;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(format!("no free port on 127.0.0.1 in {PORT_RANGE:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ports from `free_port` are distinct within a process, even from parallel threads, and
    /// all lie outside the kernel's ephemeral range.
    #[test]
    fn free_ports_are_distinct_and_below_the_ephemeral_range() {
        let threads: Vec<_> = (0..4)
            .map(|_| std::thread::spawn(|| (0..100).map(|_| free_port().expect("port")).collect::<Vec<_>>()))
            .collect();
        let mut all: Vec<u16> = threads.into_iter().flat_map(|t| t.join().expect("thread")).collect();
        assert!(all.iter().all(|p| PORT_RANGE.contains(p)));
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n, "a port was handed out twice");
    }
}

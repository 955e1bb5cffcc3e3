//! The proxy's side of the pair's private channel (see `vha_core::local`): follows the
//! node's NDJSON state stream on the unix socket, reconnecting while the node is down, and
//! turns it into [`LocalEvent`]s for the controller ([`crate::advert`]).
//!
//! When the stream ends while the node last said it was active, the proxy looks for proof
//! that the node process is gone and, on proof, releases the node's lock early
//! ([`release_if_dead`]): a kill -9 of the active then fails over in well under a second
//! instead of a lease TTL.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use vha_core::advert::LOCK_KEY;
use vha_core::local::{LocalState, STATE_PATH};
use vha_core::storage::HaBackend;

use crate::error::ProxyError;

/// First reconnect delay after the stream ends; doubled up to [`RECONNECT_MAX`]. Short: a
/// restarting node should be picked up at once (its socket reappears within milliseconds).
const RECONNECT_MIN: Duration = Duration::from_millis(20);
/// Longest reconnect delay while the node stays down.
const RECONNECT_MAX: Duration = Duration::from_millis(500);
/// How long after the stream ended the proxy keeps checking whether the node's process has
/// exited (a SIGKILLed process can close its sockets a moment before it is gone).
const DEATH_PROOF_WINDOW: Duration = Duration::from_secs(2);
/// Re-check interval inside [`DEATH_PROOF_WINDOW`].
const DEATH_PROOF_POLL: Duration = Duration::from_millis(10);
/// Longest state line accepted (a keyring with many terms stays far below this).
const MAX_LINE: usize = 1024 * 1024;

/// What the controller learns from the node.
#[derive(Debug)]
pub enum LocalEvent {
    /// A state line (sent on connect and on every change).
    State(Box<LocalState>),
    /// The stream ended or could not be opened: the node is down.
    Gone,
}

/// Follows the node's state stream forever (until the receiver is dropped).
pub async fn run(socket: PathBuf, tx: mpsc::Sender<LocalEvent>, ha: Option<Arc<dyn HaBackend>>) {
    let mut delay = RECONNECT_MIN;
    let mut was_up = true;
    loop {
        let mut last: Option<LocalState> = None;
        let res = follow(&socket, &tx, &mut last).await;
        if tx.is_closed() {
            return;
        }
        match &res {
            Ok(()) => tracing::info!(socket = %socket.display(), "local node state stream ended"),
            Err(e) if was_up => tracing::info!(socket = %socket.display(), error = %e, "local node not reachable"),
            Err(_) => {}
        }
        if last.is_some() || was_up {
            let _ = tx.send(LocalEvent::Gone).await;
        }
        if let (Some(st), Some(ha)) = (last.as_ref(), ha.as_ref()) {
            if st.role == "active" {
                if let Some(fence) = st.fence.clone() {
                    tokio::spawn(release_if_dead(ha.clone(), st.pid, fence.token));
                }
            }
        }
        if last.is_some() {
            delay = RECONNECT_MIN;
        } else {
            delay = (delay * 2).min(RECONNECT_MAX);
        }
        was_up = last.is_some();
        tokio::time::sleep(delay).await;
    }
}

/// One connection: request the stream and forward every line until it ends.
async fn follow(
    socket: &PathBuf,
    tx: &mpsc::Sender<LocalEvent>,
    last: &mut Option<LocalState>,
) -> Result<(), ProxyError> {
    let stream = UnixStream::connect(socket).await.map_err(ProxyError::LocalSocket)?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| ProxyError::LocalStream(e.to_string()))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::get(STATE_PATH)
        .header(http::header::HOST, "vha-node")
        .body(Empty::<Bytes>::new())
        .map_err(|e| ProxyError::LocalStream(e.to_string()))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| ProxyError::LocalStream(e.to_string()))?;
    if !resp.status().is_success() {
        return Err(ProxyError::LocalStream(format!(
            "state stream answered {}",
            resp.status()
        )));
    }
    let mut body = resp.into_body();
    let mut buf = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ProxyError::LocalStream(e.to_string()))?;
        let Ok(data) = frame.into_data() else { continue };
        buf.extend_from_slice(&data);
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let mut line = buf.split_to(nl + 1);
            let parsed = serde_json::from_slice::<LocalState>(&line[..nl]);
            zeroize::Zeroize::zeroize(&mut line[..]);
            match parsed {
                Ok(st) => {
                    let mut kept = st.clone();
                    kept.keyring = None;
                    *last = Some(kept);
                    if tx.send(LocalEvent::State(Box::new(st))).await.is_err() {
                        return Ok(());
                    }
                }
                Err(e) => tracing::warn!(error = %e, "unparseable local state line"),
            }
        }
        if buf.len() > MAX_LINE {
            return Err(ProxyError::LocalStream("state line too long".into()));
        }
    }
    Ok(())
}

/// Whether process `pid` is provably gone: `kill(pid, 0)` fails with ESRCH, or it is a
/// zombie (it has exited; only its exit status remains for its parent to collect).
pub fn process_gone(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else { return false };
    if raw <= 0 {
        return false;
    }
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None) {
        Err(nix::errno::Errno::ESRCH) => true,
        Err(_) => false,
        Ok(()) => std::fs::read_to_string(format!("/proc/{raw}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(") ").map(|(_, rest)| rest.starts_with('Z')))
            .unwrap_or(false),
    }
}

/// Releases the lock grant `token` of the local node once its process `pid` is provably
/// gone; does nothing if it is not gone within [`DEATH_PROOF_WINDOW`] (the lease TTL then
/// decides, as without a proxy).
///
/// # Safety argument
/// - The proof is local and direct: the node is reached over a unix socket on this host, it
///   reported `pid` and `token` itself while active, and the kernel says that process no
///   longer exists (or is a zombie, which runs no code). A process that does not exist
///   cannot write to storage, so releasing its lock cannot create two writers.
/// - Writes the dead node may have left in flight inside the network carry its fencing
///   token; the next grant has a higher token, so the store rejects them afterwards.
/// - `force_release` is a no-op unless `token` is still the current grant: a late or
///   repeated call can never release a newer holder's lock.
/// - A reused PID makes `kill(pid, 0)` succeed: the proof fails and nothing is released
///   (safe direction). The proof assumes the proxy and node share a PID namespace, which a
///   pair sharing a unix socket on one host does in every supported deployment.
pub async fn release_if_dead(ha: Arc<dyn HaBackend>, pid: u32, token: u64) {
    let deadline = tokio::time::Instant::now() + DEATH_PROOF_WINDOW;
    loop {
        if process_gone(pid) {
            match ha.force_release(LOCK_KEY, token).await {
                Ok(()) => tracing::info!(pid, token, "local active node is gone; released its lock early"),
                Err(e) => tracing::warn!(pid, token, error = %e, "early lock release failed; the lease TTL applies"),
            }
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::info!(
                pid,
                "local node stream ended but the process is still alive; no early release"
            );
            return;
        }
        tokio::time::sleep(DEATH_PROOF_POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our own process is alive; a PID that cannot exist is gone; PID 0 is never "gone".
    #[test]
    fn process_gone_proof() {
        assert!(!process_gone(std::process::id()));
        assert!(process_gone(i32::MAX as u32));
        assert!(!process_gone(0));
    }
}

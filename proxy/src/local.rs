//! The proxy's side of the pair's private channel (see `vha_core::local`): follows the
//! node's NDJSON state stream on the unix socket, reconnecting while the node is down, and
//! turns it into [`LocalEvent`]s for the controller ([`crate::advert`]).
//!
//! Every connection to the socket, the state stream's and each one Pingora opens for API
//! requests ([`CheckedConnect`]), first checks the listening process's credentials
//! ([`NodeSocket::connect`]): a process of another user that took over the socket path gets
//! no request and cannot feed the proxy a keyring or a state.
//!
//! The stream is read as HTTP/1.0 (the node's answer then ends with the connection, no
//! chunked framing) into one fixed-size buffer that is zeroized on drop and never grows
//! ([`LineBuf`]), so the keyring's bytes are left nowhere else in the proxy's memory.
//!
//! When the stream ends while the node last said it was active, the proxy looks for proof
//! that the node process is gone and, on proof, releases the node's lock early
//! ([`release_if_dead`]): a kill -9 of the active then fails over in well under a second
//! instead of a lease TTL.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::mpsc;
use zeroize::{Zeroize, Zeroizing};

use vha_core::advert::LOCK_KEY;
use vha_core::local::{proxy_accepts, LocalState, STATE_PATH};
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
/// Longest response head accepted before the lines (the node's is about 100 bytes).
const MAX_HEAD: usize = 8 * 1024;
/// Bound on the node's answer to the state request (it answers at once; a process that
/// accepts and stays silent must not hold the stream forever).
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// What the controller learns from the node.
#[derive(Debug)]
pub(crate) enum LocalEvent {
    /// A state line (sent on connect and on every change).
    State(Box<LocalState>),
    /// The stream ended or could not be opened: the node is down.
    Gone,
}

/// The node's socket and who must be listening on it.
#[derive(Debug)]
pub(crate) struct NodeSocket {
    pub path: PathBuf,
    /// This proxy's effective user id.
    own_uid: u32,
    /// `proxy { node_uid }`: the node's user when it is not the proxy's.
    node_uid: Option<u32>,
    /// The path the node bound its socket at, as the kernel reports it for a connection
    /// (`getpeername`): the node binds in a private directory and renames the socket into
    /// place, so this differs from `path`. Pingora only pools a unix connection whose peer
    /// name equals the upstream's address, so the local upstream is addressed by this name
    /// once a connection has shown it (every connection still goes through `connect`).
    bound: std::sync::RwLock<Option<String>>,
}

impl NodeSocket {
    pub(crate) fn new(path: PathBuf, node_uid: Option<u32>) -> NodeSocket {
        NodeSocket {
            path,
            own_uid: nix::unistd::geteuid().as_raw(),
            node_uid,
            bound: std::sync::RwLock::new(None),
        }
    }

    /// The name the local upstream's connections are pooled under: the node's bound path
    /// once known, else the configured path.
    pub(crate) fn pool_address(&self) -> String {
        self.bound
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
            .unwrap_or_else(|| self.path.to_string_lossy().into_owned())
    }

    /// The user the node must run as.
    pub(crate) fn expected_uid(&self) -> u32 {
        self.node_uid.unwrap_or(self.own_uid)
    }

    /// Connects, and keeps the connection only if the listening process runs as the
    /// node's user (by the kernel's record of it, `SO_PEERCRED`); nothing has been sent
    /// when it is refused.
    pub(crate) async fn connect(&self) -> Result<UnixStream, ProxyError> {
        let stream = UnixStream::connect(&self.path).await.map_err(ProxyError::LocalSocket)?;
        let cred = stream.peer_cred().map_err(ProxyError::LocalSocket)?;
        if !proxy_accepts(cred.uid(), self.own_uid, self.node_uid) {
            let err = ProxyError::LocalImpostor {
                uid: cred.uid(),
                pid: cred.pid(),
                expected: self.expected_uid(),
            };
            tracing::warn!(socket = %self.path.display(), error = %err, "refusing to talk to the process at the node socket");
            return Err(err);
        }
        if let Some(name) = stream
            .peer_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(|p| p.to_string_lossy().into_owned()))
        {
            let mut bound = self.bound.write().unwrap_or_else(|e| e.into_inner());
            if bound.as_deref() != Some(name.as_str()) {
                *bound = Some(name);
            }
        }
        Ok(stream)
    }
}

/// Pingora's connector for the local node: the peer-checked [`NodeSocket::connect`] under
/// `timeout`, so API requests (tokens, bodies) only ever go to the node.
#[derive(Debug)]
pub(crate) struct CheckedConnect {
    pub socket: Arc<NodeSocket>,
    pub timeout: Duration,
}

#[async_trait::async_trait]
impl pingora::connectors::L4Connect for CheckedConnect {
    async fn connect(
        &self,
        _addr: &pingora::protocols::l4::socket::SocketAddr,
    ) -> pingora::Result<pingora::protocols::l4::stream::Stream> {
        use pingora::{Error, ErrorType};
        match tokio::time::timeout(self.timeout, self.socket.connect()).await {
            Ok(Ok(s)) => Ok(s.into()),
            Ok(Err(e)) => Error::e_because(ErrorType::ConnectRefused, "connecting to the local node", e),
            Err(_) => Error::e_explain(
                ErrorType::ConnectTimedout,
                format!("connecting to the local node took over {:?}", self.timeout),
            ),
        }
    }
}

/// Follows the node's state stream forever (until the receiver is dropped).
pub(crate) async fn run(socket: Arc<NodeSocket>, tx: mpsc::Sender<LocalEvent>, ha: Option<Arc<dyn HaBackend>>) {
    let mut delay = RECONNECT_MIN;
    let mut was_up = true;
    loop {
        let mut last: Option<LocalState> = None;
        let res = follow(&socket, &tx, &mut last).await;
        if tx.is_closed() {
            return;
        }
        let path = socket.path.display();
        match &res {
            Ok(()) => tracing::info!(socket = %path, "local node state stream ended"),
            Err(e) if was_up => tracing::info!(socket = %path, error = %e, "local node not reachable"),
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

/// A fixed-size read buffer, zeroized on drop and never reallocated (a grown buffer would
/// leave its old copy, keyring included, in freed memory). Data is read into its free
/// tail; lines are taken from its front, the rest moved down and the vacated bytes zeroed.
struct LineBuf {
    buf: Zeroizing<Vec<u8>>,
    len: usize,
}

impl LineBuf {
    fn new(capacity: usize) -> LineBuf {
        LineBuf {
            buf: Zeroizing::new(vec![0u8; capacity]),
            len: 0,
        }
    }
    fn filled(&self) -> &[u8] {
        &self.buf[..self.len]
    }
    fn spare(&mut self) -> &mut [u8] {
        &mut self.buf[self.len..]
    }
    fn is_full(&self) -> bool {
        self.len == self.buf.len()
    }
    fn advance(&mut self, n: usize) {
        self.len = (self.len + n).min(self.buf.len());
    }
    /// Drops the first `n` bytes.
    fn consume(&mut self, n: usize) {
        let n = n.min(self.len);
        self.buf.copy_within(n..self.len, 0);
        let kept = self.len - n;
        self.buf[kept..self.len].zeroize();
        self.len = kept;
    }
    /// Reads more; `Ok(0)` at the end of the stream.
    async fn read_from(&mut self, stream: &mut UnixStream) -> std::io::Result<usize> {
        let n = stream.read(self.spare()).await?;
        self.advance(n);
        Ok(n)
    }
}

/// Where the body starts in `buf` once a whole `200` response head is in it (`Ok(None)`
/// until then); an error for any other status or a malformed or oversized head.
fn response_head(buf: &[u8]) -> Result<Option<usize>, String> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD {
            return Err("response head too long".into());
        }
        return Ok(None);
    };
    let status_line = buf[..end].split(|b| *b == b'\r').next().unwrap_or_default();
    let mut parts = status_line.splitn(3, |b| *b == b' ');
    let (version, code) = (parts.next().unwrap_or_default(), parts.next().unwrap_or_default());
    if !version.starts_with(b"HTTP/1.") {
        return Err("not an HTTP/1 response".into());
    }
    if code != b"200" {
        return Err(format!("state stream answered {}", String::from_utf8_lossy(code)));
    }
    Ok(Some(end + 4))
}

/// One connection: request the stream and forward every line until it ends.
async fn follow(
    socket: &NodeSocket,
    tx: &mpsc::Sender<LocalEvent>,
    last: &mut Option<LocalState>,
) -> Result<(), ProxyError> {
    let mut stream = socket.connect().await?;
    let request = format!("GET {STATE_PATH} HTTP/1.0\r\nHost: vha-node\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(ProxyError::LocalSocket)?;
    let mut buf = LineBuf::new(MAX_LINE);
    let head = async {
        loop {
            if let Some(body) = response_head(buf.filled()).map_err(ProxyError::LocalStream)? {
                buf.consume(body);
                return Ok(());
            }
            if buf.read_from(&mut stream).await.map_err(ProxyError::LocalSocket)? == 0 {
                return Err(ProxyError::LocalStream("closed before answering".into()));
            }
        }
    };
    tokio::time::timeout(HEAD_TIMEOUT, head)
        .await
        .map_err(|_| ProxyError::LocalStream("no answer to the state request".into()))??;
    loop {
        while let Some(nl) = buf.filled().iter().position(|b| *b == b'\n') {
            let parsed = LocalState::from_line(&buf.filled()[..nl]);
            buf.consume(nl + 1);
            match parsed {
                Ok(st) => {
                    *last = Some(st.without_keyring());
                    if tx.send(LocalEvent::State(Box::new(st))).await.is_err() {
                        return Ok(());
                    }
                }
                Err(e) => tracing::warn!(error = %e, "unparseable local state line"),
            }
        }
        if buf.is_full() {
            return Err(ProxyError::LocalStream("state line too long".into()));
        }
        if buf.read_from(&mut stream).await.map_err(ProxyError::LocalSocket)? == 0 {
            return Ok(());
        }
    }
}

/// Whether process `pid` is provably gone: `kill(pid, 0)` fails with ESRCH, or it is a
/// zombie (it has exited; only its exit status remains for its parent to collect).
pub(crate) fn process_gone(pid: u32) -> bool {
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
pub(crate) async fn release_if_dead(ha: Arc<dyn HaBackend>, pid: u32, token: u64) {
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

    /// A line buffer takes lines from its front and zeroes what it vacates: after taking a
    /// line nothing of it is left anywhere in the buffer.
    #[test]
    fn line_buffer_zeroes_taken_lines() {
        let mut b = LineBuf::new(16);
        b.spare()[..10].copy_from_slice(b"SECRET\nab\n");
        b.advance(10);
        assert_eq!(b.filled(), b"SECRET\nab\n");
        b.consume(7);
        assert_eq!(b.filled(), b"ab\n");
        assert!(!b.buf.windows(6).any(|w| w == b"SECRET"), "{:?}", &b.buf[..]);
        assert!(b.buf[3..].iter().all(|x| *x == 0));
        b.consume(3);
        assert!(b.buf.iter().all(|x| *x == 0));
        b.advance(100);
        assert!(b.is_full());
    }

    /// The response head: found only when whole, 200 only, bounded.
    #[test]
    fn response_head_rules() {
        let ok = b"HTTP/1.0 200 OK\r\ncontent-type: application/x-ndjson\r\n\r\n{\"a\":1}\n";
        assert_eq!(response_head(ok), Ok(Some(ok.len() - 8)));
        assert_eq!(response_head(b"HTTP/1.1 200 OK\r\n"), Ok(None));
        assert!(response_head(b"HTTP/1.0 404 Not Found\r\n\r\n")
            .unwrap_err()
            .contains("404"));
        assert!(response_head(b"SSH-2.0\r\n\r\n").is_err());
        assert!(response_head(&vec![b'x'; MAX_HEAD + 1]).is_err());
    }

    /// Our own process is alive; a PID that cannot exist is gone; PID 0 is never "gone".
    #[test]
    fn process_gone_proof() {
        assert!(!process_gone(std::process::id()));
        assert!(process_gone(i32::MAX as u32));
        assert!(!process_gone(0));
    }
}

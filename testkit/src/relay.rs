//! A fault-injecting TCP relay for partition tests on loopback: put it between a node and
//! its store, or between standbys and the active's cluster listener, then make the link
//! drop, delay, blackhole, or cut one direction. Faults apply to open connections at once
//! (checked per chunk) and to new ones.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// What the relay does to traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward everything.
    None,
    /// Forward after a delay per chunk.
    Delay(Duration),
    /// Accept and read, forward nothing (both directions): the peer sees silence.
    Blackhole,
    /// Close every connection and refuse (accept-then-close) new ones.
    Drop,
    /// Blackhole only client -> upstream.
    CutUpstream,
    /// Blackhole only upstream -> client.
    CutDownstream,
    /// Forward nothing (both directions) but keep every byte, and deliver it in order once
    /// the fault is lifted: a partition that heals, with TCP retransmitting what was sent
    /// across it (a write sent before the cut arrives after the heal).
    Hold,
}

struct Shared {
    fault: Mutex<Fault>,
    /// Wakes held chunks when the fault changes.
    changed: tokio::sync::Notify,
    conns: Mutex<JoinSet<()>>,
}

impl Shared {
    fn fault(&self) -> Fault {
        *self.fault.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running relay from `addr()` to the upstream address.
pub struct Relay {
    listen: SocketAddr,
    upstream: SocketAddr,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    /// Starts a relay on a free 127.0.0.1 port towards `upstream`.
    pub async fn start(upstream: SocketAddr) -> Relay {
        Self::start_on(0, upstream).await
    }

    /// Starts a relay on a given 127.0.0.1 port (0: any free one), to sit where a process
    /// expects its peer.
    pub async fn start_on(port: u16, upstream: SocketAddr) -> Relay {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.expect("bind relay");
        let listen = listener.local_addr().expect("relay addr");
        let shared = Arc::new(Shared {
            fault: Mutex::new(Fault::None),
            changed: tokio::sync::Notify::new(),
            conns: Mutex::new(JoinSet::new()),
        });
        let task = tokio::spawn(accept_loop(listener, upstream, shared.clone()));
        Relay {
            listen,
            upstream,
            shared,
            task,
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.listen
    }

    pub fn upstream(&self) -> SocketAddr {
        self.upstream
    }

    /// Sets the fault. `Drop` also closes every open connection now.
    pub fn set(&self, fault: Fault) {
        *self.shared.fault.lock().unwrap_or_else(|e| e.into_inner()) = fault;
        self.shared.changed.notify_waiters();
        if fault == Fault::Drop {
            self.shared.conns.lock().unwrap_or_else(|e| e.into_inner()).abort_all();
        }
    }

    /// Back to forwarding everything.
    pub fn heal(&self) {
        self.set(Fault::None);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
        self.shared.conns.lock().unwrap_or_else(|e| e.into_inner()).abort_all();
    }
}

async fn accept_loop(listener: TcpListener, upstream: SocketAddr, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        if shared.fault() == Fault::Drop {
            drop(client);
            continue;
        }
        let s = shared.clone();
        let mut conns = shared.conns.lock().unwrap_or_else(|e| e.into_inner());
        // Reap finished connections.
        while conns.try_join_next().is_some() {}
        conns.spawn(async move {
            let Ok(server) = TcpStream::connect(upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            tokio::select! {
                _ = pump(cr, sw, s.clone(), true) => {}
                _ = pump(sr, cw, s.clone(), false) => {}
            }
        });
    }
}

/// Copies one direction, applying the current fault to each chunk.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    shared: Arc<Shared>,
    upstream_dir: bool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        loop {
            // Registered before the check, so a change in between is not missed.
            let changed = shared.changed.notified();
            if shared.fault() != Fault::Hold {
                break;
            }
            changed.await;
        }
        match shared.fault() {
            Fault::None | Fault::Hold => {}
            Fault::Delay(d) => tokio::time::sleep(d).await,
            Fault::Blackhole => continue,
            Fault::CutUpstream if upstream_dir => continue,
            Fault::CutDownstream if !upstream_dir => continue,
            Fault::CutUpstream | Fault::CutDownstream => {}
            Fault::Drop => return,
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

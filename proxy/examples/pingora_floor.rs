//! Pingora's own floor for the active pair's local hop: a proxy with none of vha's logic
//! (no view, no routing decision, no header rewriting, no metrics, no head deadline), only
//! Pingora's HTTP proxy passing every request to a node's unix socket, with the same
//! allocator (mimalloc), transparent huge pages off, thread count, upstream keep-alive pool
//! and pool idle bound as `vha proxy`.
//!
//! What it is for: measuring how much of the proxy's CPU per request is Pingora's request
//! path itself and how much is vha's work around it. Run it beside a `vha dev` cluster,
//! point `vha bench --target direct=http://ADDR` at it and read its CPU time from `/proc`
//! (README, "Cost per request"). It is a measuring instrument, not a product: it checks
//! nothing the real proxy checks.
//!
//! Usage: `cargo run --release -p vha-proxy --example pingora_floor -- ADDR NODE_SOCKET [THREADS]`

use std::sync::Arc;

use async_trait::async_trait;
use pingora::connectors::L4Connect;
use pingora::prelude::*;
use pingora::protocols::l4::socket::SocketAddr;
use pingora::protocols::l4::stream::Stream;
use pingora::server::configuration::ServerConf;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Floor {
    /// The node's bound socket name: the pool key.
    bound: String,
    /// Dials the configured socket path whatever the peer's address says.
    dial: Arc<Dial>,
}

#[derive(Debug)]
struct Dial {
    path: String,
}

#[async_trait]
impl L4Connect for Dial {
    async fn connect(&self, _addr: &SocketAddr) -> Result<Stream> {
        match tokio::net::UnixStream::connect(&self.path).await {
            Ok(s) => Ok(s.into()),
            Err(e) => Error::e_because(ErrorType::ConnectRefused, "connecting to the node", e),
        }
    }
}

#[async_trait]
impl ProxyHttp for Floor {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(&self, _session: &mut Session, _ctx: &mut ()) -> Result<Box<HttpPeer>> {
        let mut p = HttpPeer::new_uds(&self.bound, false, String::new())?;
        p.options.custom_l4 = Some(self.dial.clone());
        p.options.idle_timeout = Some(vha_proxy::POOL_IDLE_TIMEOUT);
        Ok(Box::new(p))
    }
}

fn main() {
    vha_core::huge_pages::run_without();
    let args: Vec<String> = std::env::args().collect();
    let (Some(addr), Some(socket)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: pingora_floor ADDR NODE_SOCKET [THREADS]");
        std::process::exit(2);
    };
    let threads = match args.get(3).map(|t| t.parse::<usize>()) {
        None => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2),
        Some(Ok(t)) if t > 0 => t,
        Some(_) => {
            eprintln!("THREADS must be a positive number");
            std::process::exit(2);
        }
    };
    let conf = ServerConf {
        threads,
        upstream_keepalive_pool_size: vha_proxy::cli::UPSTREAM_POOL,
        ..ServerConf::default()
    };
    // The node binds its socket under a private name and renames it into place
    // (`node/src/local.rs`), so its connections report that first name as their peer, and
    // Pingora does not reuse a pooled connection whose peer is not the address it was
    // asked for. So, as `vha proxy` does (`NodeSocket::pool_address`): pool under the bound
    // name, dial the configured path.
    let bound = match std::os::unix::net::UnixStream::connect(socket).and_then(|s| s.peer_addr()) {
        Ok(a) => match a.as_pathname() {
            Some(p) => p.to_string_lossy().into_owned(),
            None => socket.clone(),
        },
        Err(e) => {
            eprintln!("{socket}: {e}");
            std::process::exit(2);
        }
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    let mut svc = http_proxy_service(
        &server.configuration,
        Floor {
            bound: bound.clone(),
            dial: Arc::new(Dial { path: socket.clone() }),
        },
    );
    svc.add_tcp(addr);
    server.add_service(svc);
    eprintln!("pingora_floor: {addr} -> {socket} (bound as {bound}; {threads} threads)");
    server.run_forever();
}

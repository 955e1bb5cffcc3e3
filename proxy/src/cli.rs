//! `vha proxy --config FILE`: reads the node's own HCL file, installs aws-lc-rs as the
//! process crypto provider (before Pingora builds any TLS context: ring cannot do P-521),
//! starts the controller (state stream + storage watches) and the metrics listener on a
//! small background runtime, then runs the Pingora server on the `listener "tcp"` address.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use pingora::server::configuration::ServerConf;
use pingora::server::Server;
use pingora::services::listening::Service;
use tokio::sync::watch;

use vha_core::config::{Config, ProcessEnv};
use vha_core::served_cert::ServedCert;

use crate::advert::View;
use crate::daemon::RunFiles;
use crate::error::ProxyError;
use crate::head::HeadDeadlineApp;
use crate::local::NodeSocket;
use crate::metrics::Metrics;
use crate::reload::{Reloader, SetLevel};
use crate::service::{Settings, VhaProxy};
use crate::tls::ForwardProtocol;
use crate::xff::TrustedForwarders;

/// Pingora retries per request. Each retry after a failed connect first waits (bounded by
/// `hold_timeout` overall) for a different advertisement, so this only caps pathological
/// flapping, not the wait.
const MAX_RETRIES: usize = 8;
/// Idle upstream connections kept per process (across the local node and the active).
/// Covers `wrk -c64`-style concurrency on h1 without reconnecting. Public for
/// `examples/pingora_floor.rs`, which measures Pingora with the same pool.
pub const UPSTREAM_POOL: usize = 256;
/// Seconds to finish in-flight requests after SIGTERM.
const SHUTDOWN_TIMEOUT_SECS: u64 = 5;

#[derive(Parser, Debug)]
#[command(name = "vha proxy", about = "the Pingora front of a proxy + node pair")]
struct Args {
    /// The node's HCL config file (must contain a `proxy {}` block).
    #[arg(long)]
    config: PathBuf,
    /// Graceful upgrade: take the listening socket over from the running proxy of this
    /// config (send that one SIGQUIT after starting this), which then drains and exits.
    #[arg(long)]
    upgrade: bool,
    /// Start the proxy as a child, return once it is ready (for a service manager that
    /// follows `vha-proxy.pid`, systemd `Type=forking`; see `daemon`).
    #[arg(long)]
    daemon: bool,
    /// Where the PID file and the upgrade socket live (default: the config file's directory).
    #[arg(long, value_name = "DIR")]
    run_dir: Option<PathBuf>,
}

/// Entry point (`vha proxy ...`).
pub fn main(raw: Vec<String>) -> ExitCode {
    let args = match Args::try_parse_from(std::iter::once("vha proxy".to_string()).chain(raw.iter().cloned())) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(2);
        }
    };
    let cfg = match vha_core::config::load(&args.config, &ProcessEnv) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("Error loading configuration from {}: {e}", args.config.display());
            return ExitCode::from(1);
        }
    };
    let files = RunFiles::in_dir(args.run_dir.as_deref().unwrap_or(cfg.dir()));
    if args.daemon {
        let child_args: Vec<String> = raw.into_iter().filter(|a| a != "--daemon").collect();
        return crate::daemon::start(&child_args, &files, args.upgrade);
    }
    let set_level = vha_core::logging::init(cfg.log_level.as_str(), LIBRARIES);
    match run(cfg, set_level, args.upgrade, files) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vha proxy: {e}");
            ExitCode::from(1)
        }
    }
}

/// The libraries the proxy drives, held at `info` when the proxy itself runs at `debug`.
const LIBRARIES: &[&str] = &["pingora", "pingora_core", "pingora_proxy", "h2", "hyper", "rustls"];

fn run(cfg: Config, set_level: Option<SetLevel>, upgrade: bool, files: RunFiles) -> Result<(), ProxyError> {
    let pcfg = cfg
        .proxy
        .clone()
        .ok_or_else(|| ProxyError::Config(format!("{} has no proxy {{}} block", cfg.path.display())))?;
    // Pooled keep-alive HTTP/1.1 by default: measured equal to h2 in throughput. h2 saves
    // handshakes when a new term starts (one P-521 handshake for every concurrent forward);
    // `VHA_PROXY_FORWARD_PROTOCOL=h2` selects it (both are run by
    // `t93_hostile_proxy::hostile_input_through_*`).
    let forward_protocol = match std::env::var("VHA_PROXY_FORWARD_PROTOCOL").as_deref() {
        Ok("h2") => ForwardProtocol::H2,
        Ok("h1") | Err(std::env::VarError::NotPresent) => ForwardProtocol::H1,
        Ok(other) => {
            return Err(ProxyError::Startup(format!(
                "VHA_PROXY_FORWARD_PROTOCOL: {other:?} is not h1 or h2"
            )))
        }
        Err(std::env::VarError::NotUnicode(_)) => {
            return Err(ProxyError::Startup(
                "VHA_PROXY_FORWARD_PROTOCOL: not UTF-8 (h1 or h2)".into(),
            ))
        }
    };
    // Before anything builds a rustls config (Pingora would install ring otherwise).
    vha_core::cluster_tls::provider();
    let listener = cfg.listener().clone();
    let socket = Arc::new(NodeSocket::new(pcfg.node_socket.clone(), pcfg.node_uid));
    let metrics = Metrics::new();
    let served = if listener.tls_disable {
        None
    } else {
        let (Some(cert), Some(key)) = (listener.tls_cert_file.as_ref(), listener.tls_key_file.as_ref()) else {
            return Err(ProxyError::Config(
                "listener: tls_cert_file and tls_key_file are required unless tls_disable".into(),
            ));
        };
        let s = ServedCert::load(cert, key).map_err(|e| ProxyError::Config(format!("listener: {e}")))?;
        metrics.tls_expiry.with_label_values(&["client"]).set(s.not_after());
        Some(Arc::new(s))
    };
    let (view_tx, view_rx) = watch::channel(Arc::new(View::initial()));
    let xff_trusted = Arc::new(TrustedForwarders::new(
        listener.x_forwarded_for_authorized_addrs.clone(),
    ));

    // Background runtime: controller, state stream, watches, metrics.
    let bg = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("vha-proxy-ctl")
        .enable_all()
        .build()
        .map_err(|e| ProxyError::Startup(e.to_string()))?;
    let opened = {
        let _g = bg.enter();
        vha_core::storage::factory::open_stores(&cfg).map_err(|e| ProxyError::Startup(e.to_string()))?
    };
    let (stores, credentials) = (opened.stores, opened.credentials);
    bg.spawn(crate::advert::run(stores, socket.clone(), view_tx, metrics.clone()));
    if let Some(addr) = pcfg.metrics_address {
        let m = metrics.clone();
        bg.spawn(async move {
            if let Err(e) = crate::metrics::serve(addr, m).await {
                tracing::error!(%addr, error = %e, "metrics listener failed");
            }
        });
    }
    bg.spawn(
        Reloader {
            path: cfg.path.clone(),
            running: cfg.clone(),
            served: served.clone(),
            xff_trusted: xff_trusted.clone(),
            metrics: metrics.clone(),
            set_level,
            credentials,
        }
        .run(),
    );
    let bg_handle = bg.handle().clone();
    std::thread::Builder::new()
        .name("vha-proxy-bg".into())
        .spawn(move || bg.block_on(std::future::pending::<()>()))
        .map_err(|e| ProxyError::Startup(e.to_string()))?;

    let threads = pcfg
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2));
    let conf = ServerConf {
        threads,
        upstream_keepalive_pool_size: UPSTREAM_POOL,
        max_retries: MAX_RETRIES,
        grace_period_seconds: Some(0),
        graceful_shutdown_timeout_seconds: Some(SHUTDOWN_TIMEOUT_SECS),
        pid_file: files.pid_file.to_string_lossy().into_owned(),
        upgrade_sock: files.upgrade_sock.to_string_lossy().into_owned(),
        ..ServerConf::default()
    };
    let opt = pingora::server::configuration::Opt {
        upgrade,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(opt), conf);
    let pid_file = |files: &RunFiles| {
        crate::daemon::write_pid_file(&files.pid_file)
            .map_err(|e| ProxyError::Startup(format!("writing the PID file {}: {e}", files.pid_file.display())))
    };
    // The PID file names this process once it is the service (see `daemon`): an upgrade's
    // successor before it waits for the hand-over, a fresh start once it listens (one that
    // never listens exits 1).
    if upgrade {
        pid_file(&files)?;
    }
    server.bootstrap();
    if !upgrade {
        let files = files.clone();
        crate::daemon::when_listening(listener.address, move || {
            if let Err(e) = pid_file(&files) {
                tracing::error!(error = %e, "the service manager cannot tell this process is the proxy");
            }
        });
    }
    // A graceful upgrade begins: every client connection is closed after its next response
    // (`Connection: close`), so clients reconnect to the successor instead of racing the
    // close of an idle keep-alive connection when this process shuts down.
    let mut phases = server.watch_execution_phase();
    let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
    {
        let draining = draining.clone();
        bg_handle.spawn(async move {
            use pingora::server::ExecutionPhase;
            while let Ok(p) = phases.recv().await {
                if matches!(p, ExecutionPhase::GracefulUpgradeTransferringFds) {
                    tracing::info!("graceful upgrade: handing the listener over; closing client connections after their next response");
                    draining.store(true, std::sync::atomic::Ordering::Relaxed);
                }
            }
        });
    }
    let settings = Settings {
        local_socket: socket.clone(),
        hold_timeout: pcfg.hold_timeout,
        max_request_size: listener.max_request_size,
        max_request_duration: listener.max_request_duration,
        xff_trusted,
        forward_protocol,
        draining,
    };
    let mut app = pingora::proxy::http_proxy(&server.configuration, VhaProxy::new(view_rx, settings, metrics));
    let mut opts = pingora::apps::HttpServerOptions::default();
    // An h2 client connection with no stream open is closed after this (as HTTP/1.1's
    // keep-alive timeout); its preface is bounded by the head deadline below.
    opts.h2_idle_timeout = Some(std::time::Duration::from_secs(60));
    app.server_options = Some(opts);
    let tls = match &served {
        Some(s) => Some(crate::tls::listener_acceptor(s.clone())?),
        None => None,
    };
    let mut svc = Service::new(
        "vha proxy".to_string(),
        HeadDeadlineApp::new(app, vha_core::HEADER_READ_TIMEOUT, tls),
    );
    let addr = listener.address.to_string();
    let node_uid = socket.expected_uid();
    // Plain TCP either way: with TLS the handshake runs in the app, under a deadline.
    svc.add_tcp(&addr);
    server.add_service(svc);
    eprintln!(
        "==> vha proxy started\n    Listener: {addr} (tls: {})\n    Node socket: {} (node uid {})\n    Threads: {threads}\n    Forwarding: {forward_protocol:?}",
        if listener.tls_disable { "disabled" } else { "enabled" },
        pcfg.node_socket.display(),
        node_uid
    );
    server.run_forever();
}

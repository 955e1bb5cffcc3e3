//! `vha server --config FILE`: loads the configuration, opens storage, prints Vault's
//! startup banner, serves the API, and shuts down gracefully on SIGTERM/SIGINT.

use std::process::ExitCode;

use clap::Parser;
use tokio_util::sync::CancellationToken;

use vha_core::config::{self, Config, ProcessEnv};
use vha_core::storage::factory::{open_stores, OpenedStores};

use crate::http::{self, Limits};
use crate::node::Node;

/// Bound on ending the HA side at shutdown: an active drains its term's requests (5 s at
/// most), deletes its advertisement (2 s), releases the lock (one store round trip) and waits
/// for its cluster connections' linger (3 s); generous for a slow store.
const HA_SHUTDOWN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

#[derive(Parser, Debug)]
#[command(name = "vha server", about = "Run a vha node")]
struct ServerArgs {
    /// Path to the HCL configuration file.
    #[arg(long, short = 'c')]
    config: std::path::PathBuf,
    /// Overrides `log_level` from the file.
    #[arg(long)]
    log_level: Option<String>,
}

/// Entry point of `vha server`.
pub fn server(args: Vec<String>) -> ExitCode {
    let args = match ServerArgs::try_parse_from(std::iter::once("vha server".to_string()).chain(args)) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let cfg = match config::load(&args.config, &ProcessEnv) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("Error loading configuration: {e}");
            return ExitCode::from(1);
        }
    };
    let level = args
        .log_level
        .clone()
        .unwrap_or_else(|| cfg.log_level.as_str().to_string());
    // `--log-level` pins the level: a reload does not change it.
    let set_level = vha_core::logging::init(&level, &[]).filter(|_| args.log_level.is_none());
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("Error starting runtime: {e}");
            return ExitCode::from(1);
        }
    };
    rt.block_on(run(cfg, &level, set_level))
}

/// The banner lines, Vault's layout: right-aligned labels.
pub fn banner(cfg: &Config, opened: &OpenedStores, level: &str) -> String {
    let mut lines: Vec<(String, String)> = vec![
        (
            "Api Address".into(),
            cfg.api_addr.to_string().trim_end_matches('/').to_string(),
        ),
        (
            "Cluster Address".into(),
            cfg.cluster_addr.to_string().trim_end_matches('/').to_string(),
        ),
    ];
    for (i, l) in cfg.listeners.iter().enumerate() {
        lines.push((
            format!("Listener {}", i + 1),
            format!(
                "tcp (addr: \"{}\", cluster address: \"{}\", max_request_duration: \"{}\", max_request_size: \"{}\", tls: \"{}\")",
                l.address,
                l.cluster_address,
                l.max_request_duration.map(|d| humantime::format_duration(d).to_string().replace(' ', "")).unwrap_or_else(|| "unlimited".into()),
                l.max_request_size.map(|s| s.to_string()).unwrap_or_else(|| "unlimited".into()),
                if l.tls_disable { "disabled" } else { "enabled" },
            ),
        ));
    }
    if let Some(p) = &cfg.proxy {
        lines.push(("Proxy Socket".into(), p.node_socket.display().to_string()));
        if let Some(a) = p.node_address {
            lines.push(("Node Address".into(), a.to_string()));
        }
    }
    lines.push(("Log Level".into(), level.to_string()));
    lines.push(("Storage".into(), opened.storage_line.clone()));
    if let Some(ha) = &opened.ha_storage_line {
        lines.push(("HA Storage".into(), ha.clone()));
    }
    lines.push(("Version".into(), format!("vha v{}", vha_core::VERSION)));
    let mut out = String::from("==> vha server configuration:\n\n");
    for (k, v) in lines {
        out.push_str(&format!("{k:>24}: {v}\n"));
    }
    out
}

async fn run(cfg: Config, level: &str, set_level: Option<vha_core::logging::SetLevel>) -> ExitCode {
    let opened = match open_stores(&cfg) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("Error initializing storage: {e}");
            return ExitCode::from(1);
        }
    };
    println!("{}", banner(&cfg, &opened, level));
    let listener_cfg = cfg.listener().clone();
    let limits = Limits {
        max_request_size: listener_cfg.max_request_size,
        max_request_duration: listener_cfg.max_request_duration,
    };
    // With a `proxy` block the pair's proxy owns the client-facing listener; the node serves
    // its proxy on the private socket (and optionally on a loopback `node_address`).
    // Without one, the node serves the listener itself (plain HTTP: TLS is the proxy's job).
    let tcp_addr = match &cfg.proxy {
        Some(p) => p.node_address,
        None => {
            if !listener_cfg.tls_disable {
                eprintln!(
                    "Error initializing listener: {}: TLS is served by `vha proxy`; add a `proxy {{}}` block and run \
                     `vha proxy` with this file, or set tls_disable = true",
                    cfg.path.display()
                );
                return ExitCode::from(1);
            }
            Some(listener_cfg.address)
        }
    };
    // The pair socket first: once the TCP listener takes connections (even before it
    // serves them), the proxy must be able to reach the node too.
    let local = match cfg.proxy.as_ref() {
        Some(p) => match crate::local::bind_unix(p.node_socket.clone(), p.allowed_uid) {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!(
                    "Error initializing the proxy socket: {}: {e} (proxy.node_socket in {})",
                    p.node_socket.display(),
                    cfg.path.display()
                );
                return ExitCode::from(1);
            }
        },
        None => None,
    };
    let tcp = match tcp_addr {
        Some(addr) => match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => Some(l),
            Err(e) => {
                eprintln!("Error initializing listener of type tcp: listen tcp {addr}: {e}");
                return ExitCode::from(1);
            }
        },
        None => None,
    };
    let credentials = opened.credentials.clone();
    let node = Node::new(cfg, opened.stores);
    let shutdown = CancellationToken::new();
    let mut servers = Vec::new();
    if let Some(l) = local {
        servers.push(tokio::spawn(crate::local::serve_unix(
            node.clone(),
            l,
            limits,
            shutdown.clone(),
        )));
    }
    if let Some(l) = tcp {
        servers.push(tokio::spawn(http::serve(node.clone(), l, limits, shutdown.clone())));
    }
    println!("==> vha server started! Log data will stream in below:\n");
    let ha_task = tokio::spawn(crate::ha::run::<crate::cluster::ClusterListener>(node.clone()));
    let config_path = node.config().path.clone();
    let mut running = node.config().clone();
    wait_for_signal(|| {
        let outcome = match reload(&config_path, &mut running, &credentials, set_level.as_deref()) {
            Ok(()) => "success",
            Err(e) => {
                tracing::error!(error = %e, "reload failed; the running configuration stays in force");
                "failure"
            }
        };
        node.metrics().config_reloads.with_label_values(&[outcome]).inc();
    })
    .await;
    // Rolling restarts cost no errors: first stop accepting and drain in-flight requests
    // (still as active), then end the term (advertisement deleted, lock released) so a
    // standby takes over at once, then exit.
    tracing::info!("shutdown triggered, draining in-flight requests");
    shutdown.cancel();
    for s in servers {
        let _ = s.await;
    }
    node.shutdown.cancel();
    if tokio::time::timeout(HA_SHUTDOWN_TIMEOUT, ha_task).await.is_err() {
        tracing::warn!("HA shutdown did not finish within {HA_SHUTDOWN_TIMEOUT:?}");
    }
    node.seal();
    tracing::info!("vha server stopped");
    ExitCode::SUCCESS
}

/// Resolves on SIGTERM or SIGINT; calls `on_hup` on every SIGHUP meanwhile.
async fn wait_for_signal(mut on_hup: impl FnMut()) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("install SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("install SIGINT handler");
    let mut hup = signal(SignalKind::hangup()).expect("install SIGHUP handler");
    loop {
        tokio::select! {
            _ = term.recv() => return,
            _ = int.recv() => return,
            _ = hup.recv() => on_hup(),
        }
    }
}

/// SIGHUP: re-reads the file and applies `log_level` (unless `--log-level` or `RUST_LOG`
/// pins it). The node serves no TLS of its own (its proxy does) and reads everything else at
/// start, so other changes are named in the log as needing a restart. A file that does not
/// parse changes nothing.
fn reload(
    path: &std::path::Path,
    running: &mut Config,
    credentials: &vha_core::storage::factory::Credentials,
    set_level: Option<&(dyn Fn(&str) + Send + Sync)>,
) -> Result<(), String> {
    tracing::info!(config = %path.display(), "SIGHUP: reloading the configuration");
    let new =
        config::load(path, &ProcessEnv).map_err(|e| format!("loading configuration from {}: {e}", path.display()))?;
    // First what can fail: a bad credential file leaves everything as it was.
    credentials
        .reload(&new)
        .map_err(|e| format!("lockd credentials: {e}"))?;
    if let Some(set) = set_level {
        set(new.log_level.as_str());
        tracing::info!(log_level = new.log_level.as_str(), "log level set");
    }
    for setting in restart_needed(running, &new) {
        tracing::warn!(setting, "changed in the file; it takes effect only after a restart");
    }
    *running = new;
    Ok(())
}

/// The settings the node reads only at start that differ between `old` and `new`.
fn restart_needed(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut out = vha_core::storage::factory::restart_needed(old, new);
    if old.api_addr != new.api_addr {
        out.push("api_addr");
    }
    if old.cluster_addr != new.cluster_addr {
        out.push("cluster_addr");
    }
    if old.disable_clustering != new.disable_clustering {
        out.push("disable_clustering");
    }
    if old.proxy != new.proxy {
        out.push("proxy");
    }
    let strip = |l: &config::Listener| config::Listener {
        line: None,
        ..l.clone()
    };
    if old.listeners.iter().map(strip).ne(new.listeners.iter().map(strip)) {
        out.push("listener");
    }
    out
}

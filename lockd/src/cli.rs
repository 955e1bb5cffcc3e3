//! `vha lockd ...`: run the daemon, take and restore snapshots. (`vha lockd bench` is
//! operations tooling: `vha_ops::lockd_bench`.)
//!
//! - `vha lockd [--config FILE] [--listen 127.0.0.1:8300] [--data-dir DIR] [--lease-ttl 10s]`
//!   runs until SIGTERM/SIGINT (flags override the file).
//! - `vha lockd snapshot save FILE --address URL` / `snapshot restore FILE --data-dir DIR`
//!   (offline: refuses while a lockd holds the directory).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use vha_core::storage::lockd::{LockdBackend, LockdCredentials};

use crate::config::LockdConfig;

#[derive(Parser, Debug)]
#[command(
    name = "vha lockd",
    about = "vha's embedded HA store (default listen 127.0.0.1:8300)"
)]
struct Args {
    /// HCL configuration file (see `lockd/PROTOCOL.md` and `config.rs` for keys).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Listen address (default 127.0.0.1:8300).
    #[arg(long)]
    listen: Option<String>,
    /// Data directory (log, snapshot); default ./lockd-data.
    #[arg(long)]
    data_dir: Option<String>,
    /// Default lease TTL for acquires that do not ask for one (default 10s).
    #[arg(long)]
    lease_ttl: Option<String>,
    /// Shortest lease TTL a client may ask for (default 100ms).
    #[arg(long)]
    min_lease_ttl: Option<String>,
    /// Longest lease TTL a client may ask for (default 5m).
    #[arg(long)]
    max_lease_ttl: Option<String>,
    /// Log size in bytes that triggers compaction.
    #[arg(long)]
    compact_bytes: Option<String>,
    /// Largest value in bytes a put may carry (default 32 MiB + 4 KiB, at most 1 GiB + 4 KiB).
    #[arg(long)]
    max_value_size: Option<String>,
    /// PEM certificate chain: with --tls-key-file, serve TLS (h2 or http/1.1 via ALPN).
    #[arg(long)]
    tls_cert_file: Option<String>,
    /// PEM private key for --tls-cert-file.
    #[arg(long)]
    tls_key_file: Option<String>,
    /// PEM CA bundle: with TLS, clients must present a certificate signed by it.
    #[arg(long)]
    tls_client_ca_file: Option<String>,
    /// File holding the bearer token clients must send (`Authorization: Bearer <token>`).
    #[arg(long)]
    token_file: Option<String>,
    /// Allow a non-loopback listener without authentication (insecure; warned at every start).
    #[arg(long)]
    insecure_no_auth: bool,
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Snapshots: save from a running lockd, restore into a stopped one's data dir.
    Snapshot {
        #[command(subcommand)]
        op: SnapOp,
    },
}

#[derive(Subcommand, Debug)]
enum SnapOp {
    Save {
        file: PathBuf,
        #[arg(long, default_value = "http://127.0.0.1:8300")]
        address: String,
        #[command(flatten)]
        creds: ClientCreds,
    },
    Restore {
        file: PathBuf,
        #[arg(long)]
        data_dir: PathBuf,
    },
}

/// How a `vha lockd` client command authenticates to a running lockd (the same settings as a
/// node's `storage "lockd"` stanza).
#[derive(clap::Args, Debug, Default)]
pub struct ClientCreds {
    /// File holding lockd's bearer token (else the environment's VHA_LOCKD_TOKEN).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// CA bundle that signs lockd's certificate (https addresses).
    #[arg(long)]
    tls_ca_file: Option<PathBuf>,
    /// Client certificate for mutual TLS (with --tls-key-file).
    #[arg(long)]
    tls_cert_file: Option<PathBuf>,
    #[arg(long)]
    tls_key_file: Option<PathBuf>,
    /// Name to verify lockd's certificate against, when not the address's host.
    #[arg(long)]
    tls_server_name: Option<String>,
}

impl ClientCreds {
    /// A client of the lockd at `address` with these credentials.
    pub fn client(&self, address: &str) -> Result<LockdBackend, String> {
        let mut creds = match &self.token_file {
            Some(p) => LockdCredentials::token_file(p)?,
            None => match std::env::var(vha_core::storage::lockd::TOKEN_ENV) {
                Ok(t) if !t.is_empty() => {
                    LockdCredentials::token(t).map_err(|e| format!("{}: {e}", vha_core::storage::lockd::TOKEN_ENV))?
                }
                _ => LockdCredentials::default(),
            },
        };
        creds.tls_ca_file = self.tls_ca_file.clone();
        creds.tls_cert_file = self.tls_cert_file.clone();
        creds.tls_key_file = self.tls_key_file.clone();
        creds.tls_server_name = self.tls_server_name.clone();
        LockdBackend::connect_with(address, &creds).map_err(|e| e.to_string())
    }
}

/// `vha lockd ...`
pub fn main(args: Vec<String>) -> ExitCode {
    let args = match Args::try_parse_from(std::iter::once("vha lockd".to_string()).chain(args)) {
        Ok(a) => a,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    // lockd's configuration has no log level: info, or RUST_LOG.
    let _ = vha_core::logging::init("info", &[]);
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("vha lockd: starting runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let res = match args.cmd {
        None => rt.block_on(run_daemon(&args)),
        Some(Cmd::Snapshot {
            op:
                SnapOp::Save {
                    ref file,
                    ref address,
                    ref creds,
                },
        }) => creds.client(address).and_then(|c| rt.block_on(snapshot_save(file, &c))),
        Some(Cmd::Snapshot {
            op: SnapOp::Restore { ref file, ref data_dir },
        }) => snapshot_restore(file, data_dir),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("vha lockd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn config_from(args: &Args) -> Result<LockdConfig, String> {
    let mut cfg = match &args.config {
        Some(p) => LockdConfig::load(p).map_err(|e| e.to_string())?,
        None => LockdConfig::default(),
    };
    let flags = [
        ("listen", &args.listen),
        ("data_dir", &args.data_dir),
        ("lease_ttl", &args.lease_ttl),
        ("min_lease_ttl", &args.min_lease_ttl),
        ("max_lease_ttl", &args.max_lease_ttl),
        ("compact_bytes", &args.compact_bytes),
        ("max_value_size", &args.max_value_size),
        ("tls_cert_file", &args.tls_cert_file),
        ("tls_key_file", &args.tls_key_file),
        ("tls_client_ca_file", &args.tls_client_ca_file),
        ("token_file", &args.token_file),
    ];
    for (k, v) in flags {
        if let Some(v) = v {
            cfg.set_flag(k, v).map_err(|e| e.to_string())?;
        }
    }
    if args.insecure_no_auth {
        cfg.set_flag("insecure_no_auth", "true").map_err(|e| e.to_string())?;
    }
    cfg.validate(args.config.as_deref().unwrap_or(std::path::Path::new("<flags>")))
        .map_err(|e| e.to_string())?;
    Ok(cfg)
}

async fn run_daemon(args: &Args) -> Result<(), String> {
    let cfg = config_from(args)?;
    let d = crate::Daemon::start(&cfg).await?;
    let scheme = if cfg.tls_cert_file.is_some() { "https" } else { "http" };
    println!(
        "lockd listening on {scheme}://{} (data dir {})",
        d.addr,
        cfg.data_dir.display()
    );
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(|e| e.to_string())?;
    let mut int = signal(SignalKind::interrupt()).map_err(|e| e.to_string())?;
    let mut hup = signal(SignalKind::hangup()).map_err(|e| e.to_string())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => reload(args, &d),
        }
    }
    tracing::info!("lockd shutting down");
    d.stop().await;
    Ok(())
}

/// SIGHUP: re-reads the file and flags, applies what can change while running (see
/// [`crate::Daemon::reload`]) and counts the outcome in `vha_config_reloads_total`.
fn reload(args: &Args, d: &crate::Daemon) {
    let file = args.config.as_deref().unwrap_or(std::path::Path::new("<flags>"));
    tracing::info!(config = %file.display(), "SIGHUP: reloading the configuration");
    let outcome = match config_from(args).and_then(|cfg| d.reload(&cfg, file)) {
        Ok(restart) => {
            for setting in restart {
                tracing::warn!(
                    setting,
                    "changed in the configuration; it takes effect only after a restart"
                );
            }
            tracing::info!("configuration reloaded");
            "success"
        }
        Err(e) => {
            tracing::error!(error = %e, "reload failed; the running configuration stays in force");
            "failure"
        }
    };
    d.store.metrics().config_reloads.with_label_values(&[outcome]).inc();
}

/// Streams lockd's snapshot into `FILE.tmp`, checks it whole (magic, every frame's checksum,
/// the end record's count) by streaming it back, and only then renames it over `FILE`: a
/// failed or cut-off download never replaces a good backup, and the image is never whole in
/// memory on either side.
async fn snapshot_save(file: &std::path::Path, c: &LockdBackend) -> Result<(), String> {
    let tmp = file.with_extension("tmp");
    let io = |e: std::io::Error| format!("{}: {e}", tmp.display());
    let res = async {
        let mut out = tokio::io::BufWriter::with_capacity(1 << 20, tokio::fs::File::create(&tmp).await.map_err(io)?);
        let size = c.snapshot_into(&mut out).await.map_err(|e| e.to_string())?;
        let f = out.into_inner();
        f.sync_all().await.map_err(io)?;
        let r = std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(&tmp).map_err(io)?);
        crate::log::read_snapshot(r, |_| {}).map_err(|e| format!("lockd sent an invalid snapshot: {e}"))?;
        std::fs::rename(&tmp, file).map_err(|e| format!("{}: {e}", file.display()))?;
        crate::log::sync_dir(file).map_err(|e| e.to_string())?;
        Ok::<u64, String>(size)
    }
    .await;
    match res {
        Ok(size) => {
            println!("saved snapshot ({size} bytes) to {}", file.display());
            Ok(())
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn snapshot_restore(file: &std::path::Path, data_dir: &std::path::Path) -> Result<(), String> {
    let img = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let r = crate::store::restore_snapshot(&img, data_dir).map_err(|e| e.to_string())?;
    println!(
        "restored snapshot (up to record {}) into {}; kept {} higher fence-token mark(s) of the replaced data",
        r.lsn,
        data_dir.display(),
        r.kept_marks
    );
    Ok(())
}

//! The store a scale run fills (`vha lockd bench --entries N --stores lockd,etcd`): lockd, or
//! one etcd member, each a child process on loopback with its data directory on the same
//! disk, behind one interface for the run: store clients for the writers, the fence on
//! every write, a lease to renew, a compaction count, `kill -9` and restart.
//!
//! How the two are driven alike, and where they differ:
//! - **Writes** go through the store's `Backend` in `vha-core`, as a node's do. lockd: one
//!   client (one HTTP/2 connection) per writer. etcd: clones of one client (one gRPC
//!   channel, as a node has), because a fence on etcd is checked against the lock's create
//!   revision only by the client that took the lock (`core/src/storage/etcd/mod.rs`).
//! - **Fence**: lockd: the token of the renewed lease itself (the lease is the lock).
//!   etcd: the HA lock taken through the backend with its default TTL (10 s; the backend
//!   refuses less than 5 s), kept alive by the backend as a node's is.
//! - **Renewals**: lockd: `POST /v1/lock/renew` of the fencing lease. etcd: keep-alives of
//!   a separate lease through etcd's JSON gateway (`/v3/lease/keepalive`), with the TTL etcd
//!   granted (etcd raises a TTL below its minimum). Each is one gateway request, a new
//!   keep-alive stream inside etcd; vha's etcd holder keeps one gRPC stream open instead,
//!   so this column is an upper bound for what a holder sees.
//! - **Compactions**: lockd's `vha_lockd_compactions_total`; etcd's raft snapshots
//!   (`etcd_debugging_snap_save_total_duration_seconds_count`), its counterpart that bounds
//!   the log (etcd keeps no old revisions here: every key is written once).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::{json, Value};
use vha_core::storage::etcd::{CancellationToken, EtcdBackend};
use vha_core::storage::lockd::{LockdBackend, LockdCredentials};
use vha_core::storage::{Backend, HaBackend, LockGuard};

use crate::etcd::{self, Member};
use crate::process::{wait_until, Child};

/// Which store a scale run fills.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ScaleStore {
    Lockd,
    Etcd,
}

impl ScaleStore {
    pub(crate) fn name(self) -> &'static str {
        match self {
            ScaleStore::Lockd => "lockd",
            ScaleStore::Etcd => "etcd",
        }
    }
}

/// How long a store may take to answer after it starts (a debug build of lockd on a busy
/// machine starts within a few seconds, etcd within one).
pub(crate) const START_TIMEOUT: Duration = Duration::from_secs(30);

/// The value of an unlabelled series in Prometheus text exposition.
pub(crate) fn metric_value(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?;
        rest.strip_prefix(' ')?.trim().parse().ok()
    })
}

/// etcd's backend quota for a scale run: the largest etcd accepts (8 GiB), so a big fill is
/// measured rather than stopped by the 2 GiB default's NOSPACE alarm.
const ETCD_QUOTA_BYTES: &str = "8589934592";
/// etcd's counter of raft snapshots saved (one per `--snapshot-count` applied entries,
/// 100000 by default): what bounds its log, as compaction bounds lockd's.
const ETCD_SNAPSHOTS: &str = "etcd_debugging_snap_save_total_duration_seconds_count";
/// Request timeout of the probes that wait for a (re)started store: a probe sent before
/// the store listens must not hold the wait up for the client's default 5 s.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// The lock whose token fences every write of the run.
const FENCE_LOCK: &str = "bench/scale-lock";

/// Raw HTTP to the store (lease calls and metrics), with lockd's bearer token when it has one.
#[derive(Clone)]
pub(crate) struct Http {
    client: Client<HttpConnector, Full<Bytes>>,
    token: Option<LockdCredentials>,
}

impl Http {
    fn new(token: Option<LockdCredentials>) -> Http {
        Http {
            client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
            token,
        }
    }

    fn request(
        &self,
        mut b: hyper::http::request::Builder,
        body: Bytes,
    ) -> Result<hyper_util::client::legacy::ResponseFuture, String> {
        if let Some(t) = self.token.as_ref().and_then(|c| c.token.as_ref()) {
            b = b.header("authorization", format!("Bearer {}", t.as_str()));
        }
        let req = b.body(Full::new(body)).map_err(|e| e.to_string())?;
        Ok(self.client.request(req))
    }

    async fn post(&self, url: &str, body: Value) -> Result<(u16, Value), String> {
        let req = hyper::Request::post(url).header("content-type", "application/json");
        let r = self
            .request(req, Bytes::from(body.to_string()))?
            .await
            .map_err(|e| e.to_string())?;
        let status = r.status().as_u16();
        let b = r.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok((status, serde_json::from_slice(&b).unwrap_or(Value::Null)))
    }

    async fn get_text(&self, url: &str) -> Option<String> {
        let r = self.request(hyper::Request::get(url), Bytes::new()).ok()?.await.ok()?;
        let b = r.into_body().collect().await.ok()?.to_bytes();
        String::from_utf8(b.to_vec()).ok()
    }
}

/// What a renewal got back.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Renewed {
    Yes,
    /// The store says the lease is gone (lockd `lease_expired`/`unknown_lease`; etcd TTL 0,
    /// or a `result` without a TTL).
    Refused,
}

/// A lease the renewer keeps alive: its id (lockd: the lock's token; etcd: the lease ID).
#[derive(Clone)]
pub(crate) struct Lease {
    http: Http,
    base: String,
    kind: ScaleStore,
    /// The TTL the store granted.
    pub ttl: Duration,
}

impl Lease {
    /// Grants a lease of `ttl`; returns its id.
    pub(crate) async fn grant(&mut self, ttl: Duration) -> Result<u64, String> {
        match self.kind {
            ScaleStore::Lockd => {
                let (status, v) = self
                    .http
                    .post(
                        &format!("{}/v1/lock/acquire", self.base),
                        json!({"key": FENCE_LOCK, "value": format!("scale-{}", std::process::id()),
                               "ttl_ms": ttl.as_millis() as u64, "wait_ms": 0}),
                    )
                    .await?;
                match v.get("token").and_then(Value::as_u64) {
                    Some(t) if status == 200 && v["granted"] == true => {
                        self.ttl = ttl;
                        Ok(t)
                    }
                    _ => Err(format!("acquiring {FENCE_LOCK}: {status} {v}")),
                }
            }
            ScaleStore::Etcd => {
                // etcd TTLs are whole seconds: round up, never grant less than asked.
                let secs = ttl.as_millis().div_ceil(1000).max(1) as u64;
                let (status, v) = self
                    .http
                    .post(&format!("{}/v3/lease/grant", self.base), json!({"TTL": secs}))
                    .await?;
                let (id, granted) = etcd_granted(status, &v)?;
                self.ttl = granted;
                Ok(id)
            }
        }
    }

    /// One renewal of lease `id`.
    pub(crate) async fn renew(&self, id: u64) -> Result<Renewed, String> {
        match self.kind {
            ScaleStore::Lockd => {
                let (status, v) = self
                    .http
                    .post(
                        &format!("{}/v1/lock/renew", self.base),
                        json!({"key": FENCE_LOCK, "token": id}),
                    )
                    .await?;
                match status {
                    200 => Ok(Renewed::Yes),
                    409 | 404 => Ok(Renewed::Refused),
                    _ => Err(format!("renew: {status} {v}")),
                }
            }
            ScaleStore::Etcd => {
                let (status, v) = self
                    .http
                    .post(
                        &format!("{}/v3/lease/keepalive", self.base),
                        json!({"ID": id.to_string()}),
                    )
                    .await?;
                etcd_renewed(status, &v)
            }
        }
    }
}

/// The lease ID and TTL in etcd's answer to `/v3/lease/grant` (the gateway writes 64-bit
/// integers as JSON strings).
pub(crate) fn etcd_granted(status: u16, v: &Value) -> Result<(u64, Duration), String> {
    let id = v["ID"].as_str().and_then(|s| s.parse::<u64>().ok());
    let ttl = v["TTL"].as_str().and_then(|s| s.parse::<u64>().ok());
    match (id, ttl) {
        (Some(id), Some(t)) if status == 200 && t > 0 => Ok((id, Duration::from_secs(t))),
        _ => Err(format!("etcd lease grant: {status} {v}")),
    }
}

/// What etcd's answer to `/v3/lease/keepalive` says: the gateway answers a keep-alive
/// stream of one message with one `result`, which has no TTL (or TTL 0) when the lease
/// had expired. Anything else (another status, an `error`, no `result` object, a body that
/// is not JSON) is an error, not a lost lease.
pub(crate) fn etcd_renewed(status: u16, v: &Value) -> Result<Renewed, String> {
    let result = match (status, v.get("result")) {
        (200, Some(r)) if r.is_object() && v.get("error").is_none() => r,
        _ => return Err(format!("etcd lease keepalive: {status} {v}")),
    };
    match result
        .get("TTL")
        .and_then(Value::as_str)
        .and_then(|s| s.parse::<u64>().ok())
    {
        Some(t) if t > 0 => Ok(Renewed::Yes),
        _ => Ok(Renewed::Refused),
    }
}

/// A running store under test (stopped when dropped, so no error path leaves it running).
pub(crate) struct Target {
    /// The client that took etcd's fencing lock (writers clone it) and the lock itself.
    /// Declared first so that it drops (releasing the lock) before the process stops.
    etcd: Option<(EtcdBackend, LockGuard)>,
    child: Child,
    dir: PathBuf,
    /// Restarts it with the same data directory and port.
    start: StartSpec,
    http: Http,
}

enum StartSpec {
    Lockd {
        port: u16,
        compact_bytes: Option<u64>,
        token_file: PathBuf,
        creds: LockdCredentials,
    },
    Etcd {
        bin: String,
        member: Member,
    },
}

impl StartSpec {
    fn spawn(&self, dir: &Path) -> Result<Child, String> {
        match self {
            StartSpec::Lockd {
                port,
                compact_bytes,
                token_file,
                ..
            } => {
                let mut cmd = lockd_command(*port, dir, token_file)?;
                cmd.args(["--min-lease-ttl", "100ms"]);
                if let Some(c) = compact_bytes {
                    cmd.args(["--compact-bytes", &c.to_string()]);
                }
                Child::spawn("lockd", cmd, None)
            }
            StartSpec::Etcd { bin, member } => {
                let mut cmd = etcd::commands(bin, std::slice::from_ref(member), "vha-scale")
                    .pop()
                    .ok_or("no etcd command")?;
                cmd.args(["--quota-backend-bytes", ETCD_QUOTA_BYTES]);
                Child::spawn("etcd", cmd, None).map_err(|e| format!("{e} (is etcd-server installed?)"))
            }
        }
    }

    fn kind(&self) -> ScaleStore {
        match self {
            StartSpec::Lockd { .. } => ScaleStore::Lockd,
            StartSpec::Etcd { .. } => ScaleStore::Etcd,
        }
    }

    fn url(&self) -> String {
        match self {
            StartSpec::Lockd { port, .. } => format!("http://127.0.0.1:{port}"),
            StartSpec::Etcd { member, .. } => member.client_url(),
        }
    }
}

/// `vha lockd` (this executable) serving `dir` on loopback `port` behind the bearer token
/// in `token_file`, as a deployment runs it, logging warnings only: the command both lockd
/// benches start.
pub(crate) fn lockd_command(port: u16, dir: &Path, token_file: &Path) -> Result<Command, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut cmd = Command::new(exe);
    cmd.args(["lockd", "--listen", &format!("127.0.0.1:{port}"), "--data-dir"])
        .arg(dir)
        .arg("--token-file")
        .arg(token_file)
        .env("RUST_LOG", "warn");
    Ok(cmd)
}

impl Target {
    /// Starts `kind` with its data in `dir` and waits until it serves.
    pub(crate) async fn start(
        kind: ScaleStore,
        dir: &Path,
        compact_bytes: Option<u64>,
        etcd_bin: &str,
    ) -> Result<Target, String> {
        let port = vha_core::ports::free_port()?;
        let start = match kind {
            ScaleStore::Lockd => {
                let token_file = dir.with_extension("token");
                let token = crate::cluster::new_lockd_token(&token_file)?;
                StartSpec::Lockd {
                    port,
                    compact_bytes,
                    token_file,
                    creds: LockdCredentials::token(token.as_str())?,
                }
            }
            ScaleStore::Etcd => StartSpec::Etcd {
                bin: etcd_bin.to_string(),
                member: Member {
                    name: "scale".into(),
                    client_port: port,
                    peer_port: vha_core::ports::free_port()?,
                    data_dir: dir.to_path_buf(),
                },
            },
        };
        let http = Http::new(match &start {
            StartSpec::Lockd { creds, .. } => Some(creds.clone()),
            StartSpec::Etcd { .. } => None,
        });
        let mut t = Target {
            child: start.spawn(dir)?,
            dir: dir.to_path_buf(),
            start,
            http,
            etcd: None,
        };
        let probe = t.probe_client()?;
        wait_until(kind.name(), START_TIMEOUT, || async {
            probe.get("bench/ready").await.ok()
        })
        .await?;
        if kind == ScaleStore::Etcd {
            let b = EtcdBackend::connect(&t.start.url()).map_err(|e| e.to_string())?;
            let guard = tokio::time::timeout(START_TIMEOUT, b.acquire(FENCE_LOCK, "scale", CancellationToken::new()))
                .await
                .map_err(|_| "etcd: the fencing lock was not granted in time".to_string())?
                .map_err(|e| e.to_string())?
                .ok_or("etcd: the fencing lock was not granted")?;
            t.etcd = Some((b, guard));
        }
        Ok(t)
    }

    pub(crate) fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    /// The lease the renewer keeps alive (granted by [`Lease::grant`]).
    pub(crate) fn lease(&self) -> Lease {
        Lease {
            http: self.http.clone(),
            base: self.start.url(),
            kind: self.start.kind(),
            ttl: Duration::ZERO,
        }
    }

    /// The fence of every write: on lockd the renewed lease's token (`lease_token`, which
    /// the renewer replaces after a re-grant); on etcd the HA lock's, fixed for the run.
    pub(crate) fn fence(&self, lease_token: &Arc<AtomicU64>) -> (String, Arc<AtomicU64>) {
        match &self.etcd {
            Some((_, g)) => (g.fence().lock.clone(), Arc::new(AtomicU64::new(g.fence().token))),
            None => (FENCE_LOCK.to_string(), lease_token.clone()),
        }
    }

    /// Whether etcd's fencing lock was lost during the run (never on lockd: its lock is the
    /// renewed lease, counted by the renewer).
    pub(crate) fn fence_lost(&self) -> bool {
        self.etcd.as_ref().is_some_and(|(_, g)| g.lost().is_cancelled())
    }

    /// A store client for one writer, with the store client's own request timeout.
    pub(crate) fn writer(&self) -> Result<Arc<dyn Backend>, String> {
        match (&self.etcd, &self.start) {
            (Some((b, _)), _) => Ok(Arc::new(b.clone())),
            (None, StartSpec::Lockd { creds, .. }) => Ok(Arc::new(
                LockdBackend::connect_with(&self.start.url(), creds).map_err(|e| e.to_string())?,
            )),
            (None, StartSpec::Etcd { .. }) => Err("etcd: no fencing lock".into()),
        }
    }

    /// A new store client with a short request timeout, for probes while it starts.
    pub(crate) fn probe_client(&self) -> Result<Arc<dyn Backend>, String> {
        match &self.start {
            StartSpec::Lockd { creds, .. } => Ok(Arc::new(
                LockdBackend::connect_with(&self.start.url(), creds)
                    .map_err(|e| e.to_string())?
                    .with_request_timeout(PROBE_TIMEOUT),
            )),
            StartSpec::Etcd { .. } => Ok(Arc::new(
                EtcdBackend::connect(&self.start.url())
                    .and_then(|b| b.with_config(|c| c.request_timeout = PROBE_TIMEOUT))
                    .map_err(|e| e.to_string())?,
            )),
        }
    }

    /// Its count of compactions (lockd) or raft snapshots (etcd), to read while it runs.
    pub(crate) fn compaction_counter(&self) -> CompactionCounter {
        CompactionCounter {
            http: self.http.clone(),
            url: format!("{}/metrics", self.start.url()),
            name: match self.start.kind() {
                ScaleStore::Lockd => "vha_lockd_compactions_total",
                ScaleStore::Etcd => ETCD_SNAPSHOTS,
            },
        }
    }

    /// `kill -9`, reap, start again on the same directory and port. Returns whether the
    /// killed lockd left a `log.prev` (a compaction was in flight; the file's name is part
    /// of lockd's on-disk layout, `lockd/PROTOCOL.md`); always false for etcd.
    pub(crate) fn kill_and_respawn(&mut self) -> Result<bool, String> {
        self.child.kill();
        let prev_left = self.start.kind() == ScaleStore::Lockd && self.dir.join("log.prev").exists();
        self.child = self.start.spawn(&self.dir)?;
        Ok(prev_left)
    }
}

/// Reads a store's compaction (or raft snapshot) counter from its `/metrics`.
#[derive(Clone)]
pub(crate) struct CompactionCounter {
    http: Http,
    url: String,
    name: &'static str,
}

impl CompactionCounter {
    /// The counter now (0 when the store does not answer).
    pub(crate) async fn get(&self) -> f64 {
        self.http
            .get_text(&self.url)
            .await
            .and_then(|t| metric_value(&t, self.name))
            .unwrap_or(0.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// etcd's lease answers, as etcd 3.4's gateway writes them: a grant gives its ID and the
    /// TTL etcd chose (raised from 1 s to its 2 s minimum here); a live lease's keep-alive
    /// has a TTL, an expired one's has none; anything but 200 or a grant without an ID is an
    /// error, never a renewal.
    #[test]
    fn etcd_lease_answers() {
        let h = json!({"cluster_id": "1", "member_id": "2", "revision": "1", "raft_term": "2"});
        let grant = json!({"header": h, "ID": "7587899395099268614", "TTL": "2"});
        assert_eq!(
            etcd_granted(200, &grant),
            Ok((7587899395099268614, Duration::from_secs(2)))
        );
        assert!(etcd_granted(200, &json!({"header": h, "TTL": "2"})).is_err());
        assert!(etcd_granted(503, &grant).is_err());
        let live = json!({"result": {"header": h, "ID": "7587899395099268614", "TTL": "2"}});
        let gone = json!({"result": {"header": h, "ID": "7587899395099268614"}});
        assert_eq!(etcd_renewed(200, &live), Ok(Renewed::Yes));
        assert_eq!(etcd_renewed(200, &gone), Ok(Renewed::Refused));
        assert_eq!(
            etcd_renewed(200, &json!({"result": {"ID": "1", "TTL": "0"}})),
            Ok(Renewed::Refused)
        );
        assert!(etcd_renewed(500, &live).is_err());
        // A gateway error, a non-JSON body (parsed as null) or no result is not a lost lease.
        let err = json!({"error": {"grpc_code": 14, "message": "unavailable"}});
        assert!(etcd_renewed(200, &err).is_err());
        assert!(etcd_renewed(200, &Value::Null).is_err());
        assert!(etcd_renewed(200, &json!({"header": h})).is_err());
    }

    /// Unlabelled series are found by exact name (not by a longer name sharing the prefix).
    #[test]
    fn prometheus_values() {
        let text = "# HELP vha_lockd_compactions_total x\n# TYPE vha_lockd_compactions_total counter\n\
                    vha_lockd_compactions_total_extra 9\nvha_lockd_compactions_total 4\n";
        assert_eq!(metric_value(text, "vha_lockd_compactions_total"), Some(4.0));
        assert_eq!(metric_value(text, "vha_lockd_log_bytes"), None);
    }
}

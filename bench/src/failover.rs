//! `--failover N`: under steady write load, kill -9 the active node N times and measure what
//! clients see. Per trial:
//!
//! ```text
//!   writers ──► a standby's api_addr (redirects followed) ──► active
//!        |<- 1 s steady ->| kill -9 active node_pid
//!                         |<- downtime: until a write *sent after the kill* is acked ->|
//!                         then 1 s more load, stop, restart + unseal the killed node,
//!                         wait until it is a standby again, next trial
//! ```
//!
//! - time to first acknowledged write: kill -> answer of the first write sent after it;
//! - errors: failed write attempts (clients back off 20 ms after an error, like a client
//!   library's retry would);
//! - held: writes in flight at the kill that were acknowledged later (held by the proxy).
//!
//! Every write uses a unique key; after the last trial every acknowledged write is read back
//! and compared (a missing or different value is a lost acknowledged write).

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Method;
use serde::Serialize;
use tokio::time::Instant;

use vha_ops::process::Child;

use crate::hist::percentile;
use crate::scenario::{find_active, HttpClient, NodeInfo};
use crate::workload::{Req, MOUNT};

/// Steady load before the kill.
const PRE_KILL: Duration = Duration::from_secs(1);
/// Load kept after recovery, to see the steady state again.
const POST_RECOVERY: Duration = Duration::from_secs(1);
/// A trial gives up waiting for recovery after this long (reported as no recovery).
const TRIAL_TIMEOUT: Duration = Duration::from_secs(45);
/// Back-off of a writer after a failed attempt.
const ERROR_BACKOFF: Duration = Duration::from_millis(20);
/// Per-write timeout (a held request longer than this is an error).
const WRITE_TIMEOUT: Duration = Duration::from_secs(15);
/// Restarted node must answer and be unsealed within this.
const RESTART_TIMEOUT: Duration = Duration::from_secs(60);
/// Timeline points kept per trial (around the kill).
const MAX_POINTS: usize = 20_000;

/// Failover results for one system.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct FailoverReport {
    pub system: String,
    pub trials: Vec<Trial>,
    pub downtime_p50_ms: f64,
    pub downtime_p99_ms: f64,
    pub downtime_max_ms: f64,
    pub acked_writes: u64,
    /// Acknowledged writes that could not be read back with their value.
    pub lost_writes: u64,
    /// Read-backs that failed for transport reasons after retries (not counted as lost).
    pub verify_errors: u64,
    pub notes: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Trial {
    pub trial: usize,
    pub killed: String,
    pub killed_pid: u32,
    pub new_active: Option<String>,
    /// Kill -> first acknowledged write sent after the kill (`None`: no recovery in time).
    pub downtime_ms: Option<f64>,
    pub errors: u64,
    pub held: u64,
    pub acked: u64,
    /// Status code (or "transport") -> failed attempts.
    pub error_kinds: std::collections::BTreeMap<String, u64>,
    pub timeline: Vec<TimelinePoint>,
}

#[derive(Clone, Debug, Serialize)]
pub(crate) struct TimelinePoint {
    /// Send time relative to the kill.
    pub t_ms: f64,
    pub latency_ms: f64,
    pub ok: bool,
}

/// Callback after a restart changed a pid (vha: rewrite cluster.json).
pub(crate) type OnRestart = Box<dyn Fn(&[NodeInfo]) + Send + Sync>;

/// How to kill and restart nodes of one system.
pub(crate) struct Control {
    pub system: String,
    pub nodes: Vec<NodeInfo>,
    pub unseal_keys: Vec<String>,
    /// The command that restarts node `i` (same config as before).
    pub restart_cmd: Box<dyn Fn(usize) -> Command + Send + Sync>,
    pub log_dir: PathBuf,
    /// Processes this bench started (restarted nodes), by pid.
    pub children: HashMap<u32, Child>,
    /// Called after a restart changed a pid (vha: rewrite cluster.json).
    pub on_restart: Option<OnRestart>,
}

impl Control {
    fn kill(&mut self, i: usize) -> Result<u32, String> {
        let pid = self.nodes[i]
            .node_pid
            .ok_or_else(|| format!("{}: no node_pid", self.nodes[i].name))?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .map_err(|e| format!("kill -9 {pid}: {e}"))?;
        if let Some(mut c) = self.children.remove(&pid) {
            c.kill();
        }
        Ok(pid)
    }

    async fn restart(&mut self, i: usize, http: &HttpClient, trial: usize) -> Result<(), String> {
        let log = self.log_dir.join(format!("{}.restart-{trial}.log", self.nodes[i].name));
        let name = format!("{} (restart)", self.nodes[i].name);
        let child = Child::spawn(&name, (self.restart_cmd)(i), Some(&log))?;
        let pid = child.pid();
        self.children.insert(pid, child);
        self.nodes[i].node_pid = Some(pid);
        if let Some(f) = &self.on_restart {
            f(&self.nodes);
        }
        let url = self.nodes[i].node_url().to_string();
        let deadline = Instant::now() + RESTART_TIMEOUT;
        // Answering at all.
        loop {
            if let Ok((200, _)) = http.get_json(&format!("{url}/v1/sys/seal-status"), false).await {
                break;
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} did not answer after restart; see {}",
                    self.nodes[i].name,
                    log.display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for k in &self.unseal_keys {
            let body = Bytes::from(serde_json::json!({ "key": k }).to_string());
            let r = Req {
                method: Method::PUT,
                path: String::new(),
                body: Some(body),
                authenticated: false,
            };
            let _ = http.send(&format!("{url}/v1/sys/unseal"), &r, false).await;
        }
        // A standby that knows the active again.
        loop {
            if let Ok((200, v)) = http.get_json(&format!("{url}/v1/sys/leader"), false).await {
                let leader = v["leader_address"].as_str().unwrap_or("");
                if !leader.is_empty() && v["is_self"] == serde_json::Value::Bool(false) {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} did not rejoin as a standby; see {}",
                    self.nodes[i].name,
                    log.display()
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

struct Rec {
    sent: Instant,
    done: Instant,
    ok: bool,
    status: Option<u16>,
}

/// Runs `trials` failover trials with `writers` concurrent writers.
pub(crate) async fn run(
    ctl: &mut Control,
    http: &HttpClient,
    trials: usize,
    writers: usize,
    quiet: bool,
) -> FailoverReport {
    let mut rep = FailoverReport {
        system: ctl.system.clone(),
        ..Default::default()
    };
    let mut acked_keys: Vec<String> = Vec::new();
    let run_id = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    for trial in 0..trials {
        let Some(active) = wait_active(http, &ctl.nodes).await else {
            rep.notes.push(format!("trial {trial}: no active node; stopped"));
            break;
        };
        let Some(standby) = (0..ctl.nodes.len()).find(|&i| i != active) else {
            rep.notes.push("failover needs at least 2 nodes".into());
            break;
        };
        let target: Arc<str> = Arc::from(ctl.nodes[standby].api_addr.trim_end_matches('/'));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for w in 0..writers.max(1) {
            let (http, target, stop) = (http.clone(), target.clone(), stop.clone());
            let prefix = format!("bench/failover/{run_id}/{}/t{trial}/w{w}", ctl.system);
            tasks.push(tokio::spawn(async move {
                let mut recs = Vec::new();
                let mut acked = Vec::new();
                let mut seq = 0u64;
                let hard_end = Instant::now() + TRIAL_TIMEOUT + PRE_KILL + POST_RECOVERY;
                while !stop.load(Ordering::Relaxed) && Instant::now() < hard_end {
                    let key = format!("{prefix}/{seq}");
                    seq += 1;
                    let body = Bytes::from(serde_json::json!({ "data": { "v": key } }).to_string());
                    let r = Req {
                        method: Method::POST,
                        path: format!("/v1/{MOUNT}/data/{key}"),
                        body: Some(body),
                        authenticated: true,
                    };
                    let sent = Instant::now();
                    let res = tokio::time::timeout(WRITE_TIMEOUT, http.send_follow(&target, &r)).await;
                    let done = Instant::now();
                    let status = match &res {
                        Ok((Ok(resp), _)) => Some(resp.status.as_u16()),
                        _ => None,
                    };
                    let ok = status.is_some_and(|s| (200..300).contains(&s));
                    recs.push(Rec { sent, done, ok, status });
                    if ok {
                        acked.push(key);
                    } else {
                        tokio::time::sleep(ERROR_BACKOFF).await;
                    }
                }
                (recs, acked)
            }));
        }
        tokio::time::sleep(PRE_KILL).await;
        let killed_name = ctl.nodes[active].name.clone();
        let kill_at = Instant::now();
        let killed_pid = match ctl.kill(active) {
            Ok(p) => p,
            Err(e) => {
                stop.store(true, Ordering::Relaxed);
                rep.notes.push(format!("trial {trial}: {e}"));
                break;
            }
        };
        if !quiet {
            eprintln!(
                "failover {}: trial {trial}: kill -9 {killed_name} (pid {killed_pid})",
                ctl.system
            );
        }
        // Wait for a new active (by asking the survivors), then keep the load a bit longer.
        let survivors: Vec<NodeInfo> = ctl
            .nodes
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != active)
            .map(|(_, n)| n.clone())
            .collect();
        let deadline = kill_at + TRIAL_TIMEOUT;
        let mut new_active = None;
        while Instant::now() < deadline {
            if let Some(a) = find_active(http, &survivors).await {
                new_active = Some(survivors[a].name.clone());
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Give writers time to get a post-kill write acknowledged, then the steady tail.
        tokio::time::sleep(POST_RECOVERY).await;
        stop.store(true, Ordering::Relaxed);
        let mut recs = Vec::new();
        for t in tasks {
            if let Ok((r, a)) = t.await {
                recs.extend(r);
                acked_keys.extend(a);
            }
        }
        let mut t = Trial {
            trial,
            killed: killed_name,
            killed_pid,
            new_active,
            ..Default::default()
        };
        t.downtime_ms = recs
            .iter()
            .filter(|r| r.ok && r.sent >= kill_at)
            .map(|r| (r.done - kill_at).as_secs_f64() * 1000.0)
            .min_by(|a, b| a.partial_cmp(b).expect("finite"));
        t.acked = recs.iter().filter(|r| r.ok).count() as u64;
        t.errors = recs.iter().filter(|r| !r.ok).count() as u64;
        t.held = recs
            .iter()
            .filter(|r| r.ok && r.sent < kill_at && r.done > kill_at)
            .count() as u64;
        for r in recs.iter().filter(|r| !r.ok) {
            *t.error_kinds
                .entry(r.status.map(|s| s.to_string()).unwrap_or_else(|| "transport".into()))
                .or_default() += 1;
        }
        let lo = kill_at.checked_sub(PRE_KILL).unwrap_or(kill_at);
        t.timeline = recs
            .iter()
            .filter(|r| r.sent >= lo)
            .take(MAX_POINTS)
            .map(|r| TimelinePoint {
                t_ms: signed_ms(r.sent, kill_at),
                latency_ms: (r.done - r.sent).as_secs_f64() * 1000.0,
                ok: r.ok,
            })
            .collect();
        if !quiet {
            eprintln!(
                "failover {}: trial {trial}: first ack after kill {} ms, errors {}, held {}, new active {}",
                ctl.system,
                t.downtime_ms.map(|d| format!("{d:.0}")).unwrap_or_else(|| "-".into()),
                t.errors,
                t.held,
                t.new_active.as_deref().unwrap_or("-")
            );
        }
        rep.trials.push(t);
        if let Err(e) = ctl.restart(active, http, trial).await {
            rep.notes.push(format!("trial {trial}: restart: {e}"));
            break;
        }
    }
    let downs: Vec<f64> = rep.trials.iter().filter_map(|t| t.downtime_ms).collect();
    rep.downtime_p50_ms = percentile(&downs, 0.5).unwrap_or(f64::NAN);
    rep.downtime_p99_ms = percentile(&downs, 0.99).unwrap_or(f64::NAN);
    rep.downtime_max_ms = downs.iter().copied().fold(f64::NAN, f64::max);
    if downs.len() < rep.trials.len() {
        rep.notes.push(format!(
            "{} trial(s) did not recover within {:?}",
            rep.trials.len() - downs.len(),
            TRIAL_TIMEOUT
        ));
    }
    rep.acked_writes = acked_keys.len() as u64;
    let (lost, verr) = verify(http, &ctl.nodes, &acked_keys).await;
    rep.lost_writes = lost;
    rep.verify_errors = verr;
    rep
}

fn signed_ms(t: Instant, zero: Instant) -> f64 {
    if t >= zero {
        (t - zero).as_secs_f64() * 1000.0
    } else {
        -((zero - t).as_secs_f64() * 1000.0)
    }
}

async fn wait_active(http: &HttpClient, nodes: &[NodeInfo]) -> Option<usize> {
    let deadline = Instant::now() + RESTART_TIMEOUT;
    while Instant::now() < deadline {
        if let Some(a) = find_active(http, nodes).await {
            return Some(a);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    None
}

/// Reads every acknowledged key back from the active node; returns (lost, transport errors).
async fn verify(http: &HttpClient, nodes: &[NodeInfo], keys: &[String]) -> (u64, u64) {
    let Some(a) = wait_active(http, nodes).await else {
        return (0, keys.len() as u64);
    };
    let base: Arc<str> = Arc::from(nodes[a].api_addr.trim_end_matches('/'));
    let keys = Arc::new(keys.to_vec());
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..16 {
        let (http, base, keys, next) = (http.clone(), base.clone(), keys.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            let (mut lost, mut errs) = (0u64, 0u64);
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(key) = keys.get(i) else { break };
                let r = Req {
                    method: Method::GET,
                    path: format!("/v1/{MOUNT}/data/{key}"),
                    body: None,
                    authenticated: true,
                };
                let mut verdict = None;
                for _ in 0..3 {
                    match tokio::time::timeout(Duration::from_secs(10), http.send_follow(&base, &r)).await {
                        Ok((Ok(resp), _)) if resp.status.as_u16() == 200 => {
                            let v: serde_json::Value = serde_json::from_slice(&resp.body).unwrap_or_default();
                            verdict = Some(v["data"]["data"]["v"].as_str() == Some(key.as_str()));
                            break;
                        }
                        Ok((Ok(resp), _)) if resp.status.as_u16() == 404 => {
                            verdict = Some(false);
                            break;
                        }
                        _ => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
                match verdict {
                    Some(true) => {}
                    Some(false) => lost += 1,
                    None => errs += 1,
                }
            }
            (lost, errs)
        }));
    }
    let (mut lost, mut errs) = (0, 0);
    for t in tasks {
        if let Ok((l, e)) = t.await {
            lost += l;
            errs += e;
        }
    }
    (lost, errs)
}

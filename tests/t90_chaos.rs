//! Chaos: lockd + 3 proxy+node pairs under a bounded series of faults
//! while writers and readers run through every pair's address. Records every acknowledged
//! write and checks, at the end, that none was lost, that KV versions never went backwards,
//! that the store accepted no write carrying a stale fencing token, and that every request
//! ended within the configured bounds.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use reqwest::StatusCode;
use serde_json::{json, Value};

use vha_core::storage::lockd::LockdBackend;
use vha_core::storage::{Backend, HaBackend};
use vha_testkit::{wait_until_async, TestCluster};

/// Faults injected, in order (one per round).
const ROUNDS: [Chaos; 12] = [
    Chaos::KillActive,
    Chaos::StopActivePastLease,
    Chaos::RestartLockd,
    Chaos::StepDown,
    Chaos::KillActive,
    Chaos::StopActivePastLease,
    Chaos::RestartLockd,
    Chaos::StepDown,
    Chaos::KillActive,
    Chaos::StopActivePastLease,
    Chaos::RestartLockd,
    Chaos::StepDown,
];
/// Hard cap for the fault phase; rounds not started by then are skipped (and reported).
const TIME_CAP: Duration = Duration::from_secs(240);
/// An election or recovery in a debug build on two busy cores.
const ELECTION_BOUND: Duration = Duration::from_secs(40);
/// The configured bound on one request through a proxy: the proxy's `hold_timeout` (10 s)
/// plus its upstream timeouts and slack for a debug build. Longer is a hang.
const REQUEST_BOUND: Duration = Duration::from_secs(20);
/// Each writer/reader does at most this many requests (every load loop is bounded).
const MAX_OPS_PER_CLIENT: usize = 20_000;
/// Successful requests the load must make between two faults.
const LOAD_BETWEEN_FAULTS: u64 = 80;
/// Paths per writer.
const PATHS_PER_WRITER: usize = 4;
const LOCK_KEY: &str = "core/lock";

#[derive(Clone, Copy, Debug)]
enum Chaos {
    KillActive,
    StopActivePastLease,
    RestartLockd,
    StepDown,
}

/// How one request ended.
#[derive(Default)]
struct Outcomes {
    ok: AtomicU64,
    clear_error: AtomicU64,
    hung: AtomicU64,
    max_ms: AtomicU64,
}

impl Outcomes {
    fn record(&self, elapsed: Duration, r: &Result<(StatusCode, Value), reqwest::Error>) {
        self.max_ms.fetch_max(elapsed.as_millis() as u64, Ordering::Relaxed);
        let hung = elapsed > REQUEST_BOUND || matches!(r, Err(e) if e.is_timeout());
        if hung {
            self.hung.fetch_add(1, Ordering::Relaxed);
        } else if matches!(r, Ok((st, _)) if st.is_success()) {
            self.ok.fetch_add(1, Ordering::Relaxed);
        } else {
            // A status with a body, or a refused/reset connection reported at once.
            self.clear_error.fetch_add(1, Ordering::Relaxed);
        }
    }
}

#[derive(Clone, Debug)]
struct Ack {
    path: String,
    version: u64,
    value: String,
}

async fn call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: String,
    token: &str,
    body: Option<Value>,
) -> Result<(StatusCode, Value), reqwest::Error> {
    let mut rb = http.request(method, url).header("X-Vault-Token", token);
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let resp = rb.send().await?;
    let st = resp.status();
    let bytes = resp.bytes().await?;
    Ok((st, serde_json::from_slice(&bytes).unwrap_or(Value::Null)))
}

/// Every key in the store -> (the fencing token it was written with, its value).
type Snapshot = BTreeMap<String, (Option<u64>, Vec<u8>)>;

/// Every key in the store with its fencing token and value (a recursive walk of `list`).
async fn store_snapshot(b: &LockdBackend) -> Option<Snapshot> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![String::new()];
    while let Some(d) = dirs.pop() {
        for k in b.list(&d).await.ok()? {
            let full = format!("{d}{k}");
            if full.ends_with('/') {
                dirs.push(full);
            } else if let Some(e) = b.get(&full).await.ok()? {
                out.insert(full, (e.fence_token, e.value));
            }
        }
    }
    Some(out)
}

/// The lock's current fencing token, retried while lockd restarts.
async fn current_token(b: &LockdBackend) -> u64 {
    wait_until_async(
        || async { b.holder(LOCK_KEY).await.ok().flatten().map(|h| h.token) },
        "a lock holder",
        ELECTION_BOUND,
    )
    .await
}

/// Polls every node but `old` concurrently (short timeouts, so a stopped node's pair cannot
/// slow the measurement) until one says it is active; returns it.
async fn wait_other_active(probe: &reqwest::Client, addrs: &[String], old: usize) -> usize {
    wait_until_async(
        || async {
            let polls = futures::future::join_all(addrs.iter().enumerate().filter(|(i, _)| *i != old).map(
                |(i, addr)| async move {
                    let r = probe.get(format!("{addr}/v1/sys/leader")).send().await.ok()?;
                    let v: Value = r.json().await.ok()?;
                    (v["is_self"] == Value::Bool(true)).then_some(i)
                },
            ))
            .await;
            polls.into_iter().flatten().next()
        },
        "another node reports active",
        ELECTION_BOUND,
    )
    .await
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

/// Under SIGKILL + restart of the active, SIGSTOP/SIGCONT of the active past its lease,
/// lockd restarts and step-downs, with writers and readers on every pair's proxy:
/// - every acknowledged KV v2 write (path, version, value) reads back with that value;
/// - the versions a writer is acknowledged on one path only go up, and readers never see a
///   path's version go down nor a value other than the one acknowledged for that version;
/// - no entry in the store changed after a newer lock grant was observed unless it carries
///   that grant's token or a newer one (snapshots of every key's fencing token taken after
///   each failover), i.e. no write with a stale fencing token was accepted;
/// - every request got a response or a refused connection within `REQUEST_BOUND`.
///
/// Failover durations (fault injected -> another node reports active) are printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_loses_no_acknowledged_write() {
    let started = Instant::now();
    let mut c = TestCluster::builder().nodes(3).lock_ttl("2s").proxies().start().await;
    let a = c.wait_one_active(ELECTION_BOUND).await;
    let token = c.root_token().to_string();
    c.mount_secret(a).await;
    // Keep every version (Vault's default keeps 10), so each acknowledged one stays readable.
    let (st, v) = c.nodes[a]
        .request(
            "POST",
            "secret/config",
            Some(&token),
            Some(json!({"max_versions": 1_000_000})),
        )
        .await;
    assert!(st.is_success(), "kv config: {st} {v}");
    let store = Arc::new(c.lockd.as_ref().expect("lockd").client());

    let http = reqwest::Client::builder()
        .timeout(REQUEST_BOUND + Duration::from_secs(10))
        .build()
        .unwrap();
    let addrs: Vec<String> = c.nodes.iter().map(|n| n.addr.clone()).collect();
    let probe = reqwest::Client::builder()
        .timeout(Duration::from_millis(1500))
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = Arc::new(Outcomes::default());
    let acks: Arc<Mutex<Vec<Ack>>> = Arc::default();
    let read_violations: Arc<Mutex<Vec<String>>> = Arc::default();

    let mut load = tokio::task::JoinSet::new();
    for (w, addr) in addrs.iter().enumerate() {
        // A writer per pair: sequential writes to its own paths, so acknowledged versions
        // per path must strictly increase.
        let (http, addr, token, stop, outcomes, acks) = (
            http.clone(),
            addr.clone(),
            token.clone(),
            stop.clone(),
            outcomes.clone(),
            acks.clone(),
        );
        load.spawn(async move {
            let mut last: HashMap<String, u64> = HashMap::new();
            let mut backwards = Vec::new();
            for seq in 0..MAX_OPS_PER_CLIENT {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let path = format!("chaos/w{w}-{}", seq % PATHS_PER_WRITER);
                let value = format!("w{w}-s{seq}");
                let t0 = Instant::now();
                let r = call(
                    &http,
                    reqwest::Method::POST,
                    format!("{addr}/v1/secret/data/{path}"),
                    &token,
                    Some(json!({"data": {"v": value}})),
                )
                .await;
                outcomes.record(t0.elapsed(), &r);
                match r {
                    Ok((st, v)) if st.is_success() => {
                        let version = v["data"]["version"].as_u64().expect("acknowledged write has a version");
                        if let Some(prev) = last.insert(path.clone(), version) {
                            if version <= prev {
                                backwards.push(format!("{path}: acknowledged v{version} after v{prev}"));
                            }
                        }
                        acks.lock().unwrap().push(Ack { path, version, value });
                    }
                    // Errors during a failover are expected; back off a little.
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
            backwards
        });
    }
    for (r, addr) in addrs.iter().enumerate() {
        // A reader per pair over every writer's paths.
        let (http, addr, token, stop, outcomes, acks, viol) = (
            http.clone(),
            addr.clone(),
            token.clone(),
            stop.clone(),
            outcomes.clone(),
            acks.clone(),
            read_violations.clone(),
        );
        load.spawn(async move {
            let mut seen: HashMap<String, u64> = HashMap::new();
            for seq in 0..MAX_OPS_PER_CLIENT {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let path = format!("chaos/w{}-{}", (seq + r) % 3, seq % PATHS_PER_WRITER);
                let t0 = Instant::now();
                let res = call(
                    &http,
                    reqwest::Method::GET,
                    format!("{addr}/v1/secret/data/{path}"),
                    &token,
                    None,
                )
                .await;
                outcomes.record(t0.elapsed(), &res);
                match res {
                    Ok((st, v)) if st.is_success() => {
                        let version = v["data"]["metadata"]["version"].as_u64().unwrap_or(0);
                        let value = v["data"]["data"]["v"].as_str().unwrap_or("").to_string();
                        if let Some(prev) = seen.insert(path.clone(), version) {
                            if version < prev {
                                viol.lock()
                                    .unwrap()
                                    .push(format!("reader {r}: {path} v{version} after v{prev}"));
                            }
                        }
                        let acked = acks
                            .lock()
                            .unwrap()
                            .iter()
                            .find(|a| a.path == path && a.version == version)
                            .cloned();
                        if let Some(a) = acked {
                            if a.value != value {
                                viol.lock().unwrap().push(format!(
                                    "reader {r}: {path} v{version} = {value:?}, acked {:?}",
                                    a.value
                                ));
                            }
                        }
                    }
                    _ => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
            Vec::new()
        });
    }

    // Grants observed (token -> lock value) and store snapshots taken after each failover.
    let mut grants: BTreeMap<u64, String> = BTreeMap::new();
    let mut snapshots: Vec<(u64, Snapshot)> = Vec::new();
    let mut failovers: Vec<Duration> = Vec::new();
    let mut rounds_run = 0;
    let mut active = a;
    for (round, chaos) in ROUNDS.iter().enumerate() {
        if started.elapsed() > TIME_CAP {
            eprintln!("chaos: time cap reached before round {round}");
            break;
        }
        // Let load run against a settled cluster for a moment between faults.
        let before = outcomes.ok.load(Ordering::Relaxed);
        wait_until_async(
            || async { (outcomes.ok.load(Ordering::Relaxed) >= before + LOAD_BETWEEN_FAULTS).then_some(()) },
            "some successful requests before the next fault",
            ELECTION_BOUND,
        )
        .await;
        let t0 = Instant::now();
        let mut new_active = None;
        match chaos {
            Chaos::KillActive => {
                c.nodes[active].kill();
                new_active = Some(wait_other_active(&probe, &addrs, active).await);
                failovers.push(t0.elapsed());
                c.nodes[active].restart().await;
                c.unseal(active).await;
            }
            Chaos::StopActivePastLease => {
                c.nodes[active].signal(Signal::SIGSTOP);
                let n = wait_other_active(&probe, &addrs, active).await;
                failovers.push(t0.elapsed());
                new_active = Some(n);
                c.nodes[active].signal(Signal::SIGCONT);
            }
            Chaos::RestartLockd => {
                c.lockd.as_mut().expect("lockd").restart();
            }
            Chaos::StepDown => {
                let (st, v) = c.nodes[active]
                    .request("PUT", "sys/step-down", Some(&token), None)
                    .await;
                assert!(st.is_success(), "step-down: {st} {v}");
                let n = wait_other_active(&probe, &addrs, active).await;
                failovers.push(t0.elapsed());
                new_active = Some(n);
            }
        }
        active = c.wait_one_active(ELECTION_BOUND).await;
        if let Some(n) = new_active {
            eprintln!(
                "chaos round {round} {chaos:?}: node {n} active after {:?}",
                failovers.last().unwrap()
            );
        } else {
            eprintln!(
                "chaos round {round} {chaos:?}: node {active} active after {:?}",
                t0.elapsed()
            );
        }
        // The grant now in force, then every key's token: anything that changes later must
        // carry this token or a newer one.
        let tok = current_token(&store).await;
        let holder = store
            .holder(LOCK_KEY)
            .await
            .ok()
            .flatten()
            .map(|h| h.value)
            .unwrap_or_default();
        grants.insert(tok, holder);
        let snap = wait_until_async(|| store_snapshot(&store), "a store snapshot", ELECTION_BOUND).await;
        snapshots.push((tok, snap));
        rounds_run += 1;
    }

    // Let the load see the healed cluster, then stop it.
    let before = outcomes.ok.load(Ordering::Relaxed);
    wait_until_async(
        || async { (outcomes.ok.load(Ordering::Relaxed) >= before + 20).then_some(()) },
        "successful requests after the last fault",
        ELECTION_BOUND,
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let mut backwards = Vec::new();
    while let Some(r) = load.join_next().await {
        backwards.extend(r.expect("load task"));
    }

    // 1. Every acknowledged write reads back with its value, at its version.
    let active = c.wait_one_active(ELECTION_BOUND).await;
    let acks = acks.lock().unwrap().clone();
    let mut lost = Vec::new();
    for ack in &acks {
        let (st, v) = c.nodes[active]
            .request(
                "GET",
                &format!("secret/data/{}?version={}", ack.path, ack.version),
                Some(&token),
                None,
            )
            .await;
        let got = v["data"]["data"]["v"].as_str().unwrap_or("");
        if st != StatusCode::OK || got != ack.value {
            lost.push(format!(
                "{} v{}: wanted {:?}, got {st} {got:?}",
                ack.path, ack.version, ack.value
            ));
        }
    }

    // 2. Stale-token writes: a key that changed after a snapshot must carry at least the
    //    token in force when the snapshot was taken.
    let fin = store_snapshot(&store).await.expect("final snapshot");
    let mut stale = Vec::new();
    for (tok, snap) in &snapshots {
        for (k, (ftok, fval)) in &fin {
            let changed = snap.get(k).is_none_or(|(t, v)| t != ftok || v != fval);
            // An entry written without any fencing token after a grant was in force is as
            // stale as one with an older token: no HA node may write unfenced.
            match ftok {
                Some(ft) if changed && ft < tok => {
                    stale.push(format!("{k}: written with token {ft} after grant {tok} was in force"))
                }
                None if changed => stale.push(format!("{k}: written unfenced after grant {tok} was in force")),
                _ => {}
            }
        }
    }

    let mut fo = failovers.clone();
    fo.sort();
    let ok = outcomes.ok.load(Ordering::Relaxed);
    let errs = outcomes.clear_error.load(Ordering::Relaxed);
    let hung = outcomes.hung.load(Ordering::Relaxed);
    let reads = read_violations.lock().unwrap().clone();
    eprintln!(
        "CHAOS SUMMARY: rounds {rounds_run}/{} in {:?}; failovers {}; failover p50 {:?} p99 {:?} max {:?}; \
         grants seen {:?}; acknowledged writes checked {}; lost {}; stale-token writes accepted {}; \
         requests ok {ok}, clear errors {errs}, hung {hung}, slowest {} ms; version regressions {}; read violations {}",
        ROUNDS.len(),
        started.elapsed(),
        fo.len(),
        percentile(&fo, 0.5),
        percentile(&fo, 0.99),
        fo.last().copied().unwrap_or_default(),
        grants.keys().collect::<Vec<_>>(),
        acks.len(),
        lost.len(),
        stale.len(),
        outcomes.max_ms.load(Ordering::Relaxed),
        backwards.len(),
        reads.len(),
    );
    assert!(rounds_run >= 4, "too few rounds ran within the time cap: {rounds_run}");
    assert!(!acks.is_empty(), "no write was acknowledged");
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:#?}");
    assert!(
        stale.is_empty(),
        "writes with a stale fencing token accepted: {stale:#?}"
    );
    assert!(
        backwards.is_empty(),
        "acknowledged versions went backwards: {backwards:#?}"
    );
    assert!(
        reads.is_empty(),
        "readers saw versions go backwards or unacknowledged values: {reads:#?}"
    );
    assert_eq!(hung, 0, "requests exceeded {REQUEST_BOUND:?}");
}

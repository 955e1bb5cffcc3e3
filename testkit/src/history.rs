//! A checked history: records every client operation on KV v2 keys
//! (client, invoke and completion instants, operation, key, value, outcome) and checks the
//! history for linearizability, key by key, with an existing checker: stateright's
//! [`LinearizabilityTester`].
//!
//! Each KV v2 key is modelled as a versioned register ([`KvKey`]): a write makes the next
//! version, a read returns the current version and value (404: none yet), a check-and-set
//! write with `cas = N` succeeds only while the current version is `N` (0: the key does not
//! exist) and otherwise fails without effect.
//!
//! Outcomes, as Jepsen and Porcupine model them:
//! - [`Outcome::Read`], [`Outcome::Written`], [`Outcome::CasMismatch`]: the operation ran,
//!   with that result; it took effect between its invocation and its completion.
//! - [`Outcome::Failed`]: a definite failure, it did not run (a refused connection, a 4xx
//!   other than a check-and-set mismatch, a 503 that carries the node's not-active header:
//!   refused before anything ran). It is left out of the check.
//! - [`Outcome::Indeterminate`]: a timeout, a reset connection, a 5xx where the write may
//!   have happened. A write or check-and-set then stays in flight until the end of the
//!   history (it may take effect at any point after its invocation, or never); a read is
//!   left out (it changed nothing). The client carries on as a new process: a process has at
//!   most one operation in flight, so its later operations get a new process id.
//!
//! Linearizability is local (a history is linearizable iff every object's sub-history is),
//! so checking per key is exact, and it keeps each search small: stateright's tester is a
//! depth-first search without memoization, exponential in the worst case, so callers keep
//! per-key histories short (many keys, each used for a short while) and [`check`] runs
//! under a deadline: a search that does not end in time is reported as inconclusive,
//! never as a pass.
//!
//! A history is saved and loaded as JSON lines ([`save`], [`load`]); the
//! `check-history` binary of this crate re-checks a saved one.

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use stateright::semantics::{ConsistencyTester, LinearizabilityTester, SequentialSpec};

/// What a client asked for.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Call {
    /// `GET secret/data/<key>`.
    Read,
    /// `POST secret/data/<key>` `{"data":{"v": value}}`.
    Write { value: String },
    /// `POST secret/data/<key>` `{"data":{"v": value},"options":{"cas": expected}}`.
    Cas { expected: u64, value: String },
}

/// How an operation ended (see the module doc for which counts as which).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// A read answered: `Some((version, value))`, or `None` for 404 (no version yet).
    Read(Option<(u64, String)>),
    /// A write or check-and-set was acknowledged as this version.
    Written(u64),
    /// A check-and-set was refused: the current version was not the expected one.
    CasMismatch,
    /// Definitely not run (the reason).
    Failed(String),
    /// May or may not have run (the reason).
    Indeterminate(String),
}

/// One recorded operation. Times are nanoseconds since the history began.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Op {
    /// The client (a sequential caller: one operation at a time).
    pub client: u32,
    pub key: String,
    pub call: Call,
    pub invoke_ns: u64,
    /// When the answer (or the error) arrived; for an indeterminate operation the check
    /// ignores it (the effect may come later).
    pub complete_ns: u64,
    pub outcome: Outcome,
}

/// Counts of a history's operations by outcome.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    pub ok: usize,
    pub failed: usize,
    pub indeterminate: usize,
}

/// The thread-safe recorder the clients of a test share.
pub struct History {
    start: Instant,
    ops: Mutex<Vec<Op>>,
}

impl Default for History {
    fn default() -> Self {
        History::new()
    }
}

impl History {
    pub fn new() -> History {
        History {
            start: Instant::now(),
            ops: Mutex::new(Vec::new()),
        }
    }

    /// Nanoseconds since the history began: take it right before sending a request
    /// (`invoke_ns`) and right after its answer (`complete_ns`).
    pub fn now(&self) -> u64 {
        self.start.elapsed().as_nanos() as u64
    }

    /// Records a finished operation.
    pub fn record(&self, op: Op) {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).push(op);
    }

    /// A copy of every operation recorded so far, in recording order.
    pub fn ops(&self) -> Vec<Op> {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Operations recorded so far.
    pub fn len(&self) -> usize {
        self.ops.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Operations recorded so far that ran with a result (not failed, not indeterminate).
    pub fn ok_count(&self) -> usize {
        counts(&self.ops.lock().unwrap_or_else(|e| e.into_inner())).ok
    }
}

/// Counts `ops` by outcome.
pub fn counts(ops: &[Op]) -> Counts {
    let mut c = Counts::default();
    for op in ops {
        match op.outcome {
            Outcome::Failed(_) => c.failed += 1,
            Outcome::Indeterminate(_) => c.indeterminate += 1,
            _ => c.ok += 1,
        }
    }
    c
}

/// The sequential specification of one KV v2 key: its current version (0: none yet) and
/// value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct KvKey {
    pub version: u64,
    pub value: Option<String>,
}

/// An operation on a [`KvKey`], as the checker sees it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KvOp {
    Read,
    Write(String),
    Cas(u64, String),
}

/// A [`KvKey`] operation's result.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KvRet {
    Read(Option<(u64, String)>),
    Written(u64),
    CasMismatch,
}

impl SequentialSpec for KvKey {
    type Op = KvOp;
    type Ret = KvRet;

    fn invoke(&mut self, op: &KvOp) -> KvRet {
        match op {
            KvOp::Read => KvRet::Read(self.value.clone().map(|v| (self.version, v))),
            KvOp::Write(v) => {
                self.version += 1;
                self.value = Some(v.clone());
                KvRet::Written(self.version)
            }
            KvOp::Cas(expected, v) => {
                if *expected != self.version {
                    return KvRet::CasMismatch;
                }
                self.version += 1;
                self.value = Some(v.clone());
                KvRet::Written(self.version)
            }
        }
    }
}

/// The result of checking a history.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// Operations given to the checker (ran, or writes that may have run).
    pub checked: usize,
    /// Keys checked.
    pub keys: usize,
    /// Keys whose history is not linearizable.
    pub violations: Vec<String>,
    /// Keys whose search did not end within the deadline (neither pass nor fail).
    pub inconclusive: Vec<String>,
}

impl Report {
    /// Linearizable, every key decided.
    pub fn passed(&self) -> bool {
        self.violations.is_empty() && self.inconclusive.is_empty()
    }
}

/// Events of one key's history in real-time order, fed to the tester.
enum Event {
    Invoke((u32, u32), KvOp),
    Return((u32, u32), KvRet),
}

/// Checks one key's operations (all on the same key) with stateright's
/// [`LinearizabilityTester`]. `Err` carries a description of a malformed history.
pub fn check_key(ops: &[Op]) -> Result<bool, String> {
    // Process ids: a client becomes a new process after each indeterminate operation (the
    // tester allows one operation in flight per process, and that one never returns).
    let mut generation: HashMap<u32, u32> = HashMap::new();
    let mut sorted: Vec<&Op> = ops.iter().collect();
    sorted.sort_by_key(|o| (o.client, o.invoke_ns));
    // (time, 0 = invoke before 1 = return at the same instant: equal times are concurrent).
    let mut events: Vec<(u64, u8, Event)> = Vec::new();
    for op in sorted {
        let g = generation.entry(op.client).or_insert(0);
        let pid = (op.client, *g);
        let kop = match &op.call {
            Call::Read => KvOp::Read,
            Call::Write { value } => KvOp::Write(value.clone()),
            Call::Cas { expected, value } => KvOp::Cas(*expected, value.clone()),
        };
        let ret = match &op.outcome {
            Outcome::Failed(_) => continue,
            Outcome::Indeterminate(_) => {
                *g += 1;
                if kop != KvOp::Read {
                    events.push((op.invoke_ns, 0, Event::Invoke(pid, kop)));
                }
                continue;
            }
            Outcome::Read(r) => KvRet::Read(r.clone()),
            Outcome::Written(v) => KvRet::Written(*v),
            Outcome::CasMismatch => KvRet::CasMismatch,
        };
        if op.complete_ns < op.invoke_ns {
            return Err(format!("{op:?} completes before it is invoked"));
        }
        events.push((op.invoke_ns, 0, Event::Invoke(pid, kop)));
        events.push((op.complete_ns, 1, Event::Return(pid, ret)));
    }
    events.sort_by_key(|(t, kind, _)| (*t, *kind));
    let mut tester = LinearizabilityTester::new(KvKey::default());
    for (_, _, e) in events {
        match e {
            Event::Invoke(pid, op) => tester.on_invoke(pid, op).map(|_| ())?,
            Event::Return(pid, ret) => tester.on_return(pid, ret).map(|_| ())?,
        }
    }
    Ok(tester.is_consistent())
}

/// Checks `ops` key by key, each key's search on its own thread, all within `deadline`.
/// A key whose search has not ended by then is reported inconclusive.
pub fn check(ops: &[Op], deadline: Duration) -> Report {
    let mut by_key: BTreeMap<String, Vec<Op>> = BTreeMap::new();
    for op in ops {
        by_key.entry(op.key.clone()).or_default().push(op.clone());
    }
    let mut report = Report {
        keys: by_key.len(),
        ..Report::default()
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let mut pending = std::collections::BTreeSet::new();
    // A few keys at a time: the searches are CPU-bound and the machine has two cores.
    let keys: Vec<(String, Vec<Op>)> = by_key.into_iter().collect();
    report.checked = keys
        .iter()
        .flat_map(|(_, ops)| ops)
        .filter(|o| match o.outcome {
            Outcome::Failed(_) => false,
            Outcome::Indeterminate(_) => o.call != Call::Read,
            _ => true,
        })
        .count();
    let end = Instant::now() + deadline;
    let mut queue = keys.into_iter();
    let mut running = 0;
    loop {
        while running < CHECK_THREADS {
            let Some((key, ops)) = queue.next() else { break };
            let tx = tx.clone();
            pending.insert(key.clone());
            running += 1;
            // Detached: a search still running at the deadline is left to finish on its own
            // (the caller reports the key inconclusive and goes on).
            std::thread::Builder::new()
                .name(format!("check {key}"))
                .stack_size(CHECK_STACK)
                .spawn(move || {
                    let r = check_key(&ops);
                    let _ = tx.send((key, r));
                })
                .expect("spawn checker thread");
        }
        if running == 0 {
            break;
        }
        let left = end.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok((key, r)) => {
                running -= 1;
                pending.remove(&key);
                match r {
                    Ok(true) => {}
                    Ok(false) => report.violations.push(key),
                    Err(e) => report.violations.push(format!("{key}: malformed history: {e}")),
                }
            }
            Err(_) => {
                report.inconclusive.extend(pending.iter().cloned());
                report.inconclusive.extend(queue.map(|(k, _)| k));
                break;
            }
        }
    }
    report
}

/// Searches run at once: the machine has two cores.
const CHECK_THREADS: usize = 2;
/// The tester's search recurses once per operation of a key; 64 MiB covers histories of
/// thousands of operations per key (far more than the tests keep per key).
const CHECK_STACK: usize = 64 << 20;

/// Writes `ops` as JSON lines to `path`.
pub fn save(ops: &[Op], path: &Path) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    for op in ops {
        serde_json::to_writer(&mut f, op)?;
        f.write_all(b"\n")?;
    }
    f.flush()
}

/// Reads a history written by [`save`].
pub fn load(path: &Path) -> std::io::Result<Vec<Op>> {
    let f = std::io::BufReader::new(std::fs::File::open(path)?);
    let mut ops = Vec::new();
    for line in f.lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        ops.push(serde_json::from_str(&line).map_err(std::io::Error::other)?);
    }
    Ok(ops)
}

/// The operations on `key` (a name from a [`Report`], any ": reason" suffix stripped), in
/// invocation order, for printing a violation.
pub fn ops_of<'a>(ops: &'a [Op], key: &str) -> Vec<&'a Op> {
    let key = key.split(": ").next().unwrap_or(key);
    let mut v: Vec<&Op> = ops.iter().filter(|o| o.key == key).collect();
    v.sort_by_key(|o| o.invoke_ns);
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Check deadline for the hand-made histories (they decide in microseconds).
    const DEADLINE: Duration = Duration::from_secs(10);

    fn op(client: u32, call: Call, t: (u64, u64), outcome: Outcome) -> Op {
        Op {
            client,
            key: "k".into(),
            call,
            invoke_ns: t.0,
            complete_ns: t.1,
            outcome,
        }
    }
    fn w(v: &str) -> Call {
        Call::Write { value: v.into() }
    }
    fn cas(e: u64, v: &str) -> Call {
        Call::Cas {
            expected: e,
            value: v.into(),
        }
    }
    fn read(v: u64, s: &str) -> Outcome {
        Outcome::Read(Some((v, s.into())))
    }

    /// A concurrent but linearizable history passes: overlapping writes, a read that sees
    /// the later of two overlapping writes, a check-and-set on the version it read, a
    /// refused check-and-set on a stale version, a definite failure and an indeterminate
    /// write that never shows (it may not have run).
    #[test]
    fn linearizable_history_passes() {
        let h = vec![
            op(0, Call::Read, (0, 5), Outcome::Read(None)),
            op(0, w("a"), (10, 30), Outcome::Written(2)),
            op(1, w("b"), (12, 20), Outcome::Written(1)),
            op(2, Call::Read, (31, 40), read(2, "a")),
            op(2, cas(2, "c"), (41, 50), Outcome::Written(3)),
            op(1, cas(2, "d"), (51, 60), Outcome::CasMismatch),
            op(1, w("e"), (61, 62), Outcome::Failed("connection refused".into())),
            op(0, w("f"), (63, 70), Outcome::Indeterminate("timeout".into())),
            op(0, Call::Read, (71, 80), read(3, "c")),
        ];
        let r = check(&h, DEADLINE);
        assert!(r.passed(), "{r:?}");
        assert_eq!(r.checked, 8);
    }

    /// An indeterminate write that did take effect (a later read sees it) is accepted.
    #[test]
    fn indeterminate_write_may_take_effect_late() {
        let h = vec![
            op(0, w("a"), (0, 10), Outcome::Indeterminate("reset".into())),
            op(1, Call::Read, (20, 30), Outcome::Read(None)),
            op(1, Call::Read, (40, 50), read(1, "a")),
        ];
        assert!(check(&h, DEADLINE).passed());
    }

    /// A stale read after a completed write is caught.
    #[test]
    fn stale_read_after_completed_write_is_caught() {
        let h = vec![
            op(0, w("a"), (0, 10), Outcome::Written(1)),
            op(0, w("b"), (20, 30), Outcome::Written(2)),
            op(1, Call::Read, (40, 50), read(1, "a")),
        ];
        let r = check(&h, DEADLINE);
        assert_eq!(r.violations, vec!["k".to_string()]);
    }

    /// Two check-and-set writes that both succeed on the same version are caught.
    #[test]
    fn two_successful_cas_on_one_version_are_caught() {
        let h = vec![
            op(0, w("a"), (0, 10), Outcome::Written(1)),
            op(1, cas(1, "b"), (20, 40), Outcome::Written(2)),
            op(2, cas(1, "c"), (21, 41), Outcome::Written(2)),
        ];
        assert!(!check(&h, DEADLINE).passed());
    }

    /// A read of a value no write produced (or at the wrong version) is caught, and a
    /// write whose definite failure was reported must not show up later.
    #[test]
    fn phantom_values_are_caught() {
        let h = vec![
            op(0, w("a"), (0, 10), Outcome::Written(1)),
            op(1, Call::Read, (20, 30), read(2, "a")),
        ];
        assert!(!check(&h, DEADLINE).passed());
        let h = vec![
            op(0, w("a"), (0, 10), Outcome::Failed("403".into())),
            op(1, Call::Read, (20, 30), read(1, "a")),
        ];
        assert!(!check(&h, DEADLINE).passed());
    }

    /// A refused check-and-set whose expected version was current all along is caught.
    #[test]
    fn wrong_cas_mismatch_is_caught() {
        let h = vec![
            op(0, w("a"), (0, 10), Outcome::Written(1)),
            op(1, cas(1, "b"), (20, 30), Outcome::CasMismatch),
            op(1, Call::Read, (40, 50), read(1, "a")),
        ];
        assert!(!check(&h, DEADLINE).passed());
    }

    /// Keys are checked separately: a violation on one key names that key only.
    #[test]
    fn violations_name_their_key() {
        let mut h = vec![
            op(0, w("a"), (0, 10), Outcome::Written(1)),
            op(1, Call::Read, (20, 30), Outcome::Read(None)),
        ];
        let mut ok = op(0, w("x"), (0, 10), Outcome::Written(1));
        ok.key = "other".into();
        h.push(ok);
        let r = check(&h, DEADLINE);
        assert_eq!(r.keys, 2);
        assert_eq!(r.violations, vec!["k".to_string()]);
    }

    /// A saved history loads back equal and checks the same.
    #[test]
    fn save_and_load_round_trip() {
        let h = vec![
            op(0, w("a"), (0, 10), Outcome::Written(1)),
            op(1, Call::Read, (20, 30), Outcome::Read(None)),
            op(2, cas(0, "z"), (21, 31), Outcome::Indeterminate("502".into())),
        ];
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("h.jsonl");
        save(&h, &p).unwrap();
        let back = load(&p).unwrap();
        assert_eq!(back, h);
        assert!(!check(&back, DEADLINE).passed());
    }

    /// A simulated history of `clients` concurrent clients doing `n` operations on one key:
    /// each operation takes effect on a real register at a random point inside its
    /// interval, so the history is linearizable by construction; every 25th write is
    /// indeterminate (half of those never take effect).
    fn simulated(clients: u32, n: usize, seed: u64) -> Vec<Op> {
        let mut x = seed;
        let mut rnd = move |m: u64| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % m
        };
        let mut free_at = vec![0u64; clients as usize];
        // (linearization point, op index, applies)
        let mut ops = Vec::new();
        let mut points = Vec::new();
        for i in 0..n {
            let c = rnd(clients as u64) as u32;
            let inv = free_at[c as usize] + rnd(20);
            let comp = inv + 1 + rnd(60);
            free_at[c as usize] = comp + 1;
            let call = match rnd(3) {
                0 => Call::Read,
                1 => w(&format!("v{i}")),
                _ => cas(rnd(4), &format!("v{i}")),
            };
            let indeterminate = call != Call::Read && i % 25 == 0;
            let applies = !indeterminate || rnd(2) == 0;
            points.push((inv + rnd(comp - inv), i, applies));
            ops.push(op(c, call, (inv, comp), Outcome::Failed(String::new())));
            if indeterminate {
                ops[i].outcome = Outcome::Indeterminate("timeout".into());
                // Its client never reuses the process: later ops start after this one.
                free_at[c as usize] = comp + 1;
            }
        }
        points.sort();
        let mut reg = KvKey::default();
        for (_, i, applies) in points {
            if !applies {
                continue;
            }
            let kop = match ops[i].call.clone() {
                Call::Read => KvOp::Read,
                Call::Write { value } => KvOp::Write(value),
                Call::Cas { expected, value } => {
                    // Half aimed at the current version (they succeed), half not.
                    let e = if expected % 2 == 0 {
                        reg.version
                    } else {
                        reg.version + 1
                    };
                    ops[i].call = cas(e, &value);
                    KvOp::Cas(e, value)
                }
            };
            let ret = reg.invoke(&kop);
            if matches!(ops[i].outcome, Outcome::Indeterminate(_)) {
                continue;
            }
            ops[i].outcome = match ret {
                KvRet::Read(r) => Outcome::Read(r),
                KvRet::Written(v) => Outcome::Written(v),
                KvRet::CasMismatch => Outcome::CasMismatch,
            };
        }
        ops
    }

    /// Per-key histories of the size the history tests keep (30 operations of three
    /// overlapping clients, some indeterminate) check as linearizable within the deadline,
    /// and the same history with one read made stale is caught, also within the deadline.
    /// (The tester's search has no memoization: deciding a violation grows exponentially
    /// with the per-key history, from milliseconds at 30 operations to over ten seconds
    /// for some 40-operation histories, measured; hence small keys.)
    #[test]
    fn realistic_sizes_decide_in_time() {
        for seed in 1..=5u64 {
            let h = simulated(3, 30, seed * 7919);
            let t0 = Instant::now();
            let r = check(&h, DEADLINE);
            assert!(r.passed(), "seed {seed}: {r:?}");
            let ok_took = t0.elapsed();
            // Make a read stale: the first acknowledged version `a` (with its value), in a
            // read invoked after a later version `b > a` was acknowledged.
            let mut bad = h.clone();
            let acked: Vec<(u64, &Op)> = h
                .iter()
                .filter_map(|o| match o.outcome {
                    Outcome::Written(v) => Some((v, o)),
                    _ => None,
                })
                .collect();
            let (a, first) = *acked.iter().min_by_key(|(v, _)| *v).expect("an acknowledged write");
            let later = acked
                .iter()
                .filter(|(v, _)| *v > a)
                .map(|(_, o)| o.complete_ns)
                .min()
                .expect("a later acknowledged write");
            let (Call::Write { value } | Call::Cas { value, .. }) = first.call.clone() else {
                unreachable!()
            };
            let i = bad
                .iter()
                .rposition(|o| matches!(o.outcome, Outcome::Read(_)) && o.invoke_ns > later)
                .expect("a read after the later write");
            bad[i].outcome = Outcome::Read(Some((a, value)));
            let t0 = Instant::now();
            let r = check(&bad, DEADLINE);
            assert_eq!(r.violations, vec!["k".to_string()], "seed {seed}: {r:?}");
            eprintln!(
                "seed {seed}: {} ops, linearizable decided in {ok_took:?}, violation in {:?}",
                h.len(),
                t0.elapsed()
            );
        }
    }

    /// An outage on one key: six writes that may have happened (none did), then 24 answered
    /// operations. The search tries every in-flight write at every step; it still decides
    /// within the deadline (well under a second, measured), and a stale read at the end is
    /// still caught.
    #[test]
    fn many_indeterminate_writes_decide_in_time() {
        let mut h: Vec<Op> = (0..6)
            .map(|c| {
                op(
                    c,
                    w(&format!("lost{c}")),
                    (c as u64, 100),
                    Outcome::Indeterminate("timeout".into()),
                )
            })
            .collect();
        let mut t = 200;
        for i in 0..24u64 {
            let c = 10 + (i % 3) as u32;
            let o = if i % 2 == 0 {
                op(c, w(&format!("v{i}")), (t, t + 5), Outcome::Written(i / 2 + 1))
            } else {
                op(c, Call::Read, (t, t + 5), read(i / 2 + 1, &format!("v{}", i - 1)))
            };
            h.push(o);
            t += 10;
        }
        let t0 = Instant::now();
        assert!(check(&h, DEADLINE).passed());
        let mut bad = h.clone();
        bad.push(op(13, Call::Read, (t + 10, t + 20), read(1, "v0")));
        assert_eq!(check(&bad, DEADLINE).violations, vec!["k".to_string()]);
        eprintln!("six in-flight writes: decided both in {:?}", t0.elapsed());
    }

    /// The recorder keeps what the clients record, from several threads.
    #[test]
    fn recorder_is_shared_between_threads() {
        let h = std::sync::Arc::new(History::new());
        let threads: Vec<_> = (0..4)
            .map(|c| {
                let h = h.clone();
                std::thread::spawn(move || {
                    for i in 0..100 {
                        let t0 = h.now();
                        h.record(op(c, w(&format!("{c}-{i}")), (t0, h.now()), Outcome::Written(1)));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(h.len(), 400);
        assert_eq!(h.ok_count(), 400);
    }
}

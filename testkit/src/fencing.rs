//! The end-to-end fencing proof, shared by the lockd, etcd and split-mode tests: another
//! node takes the lock and writes while the old active is out (frozen by SIGSTOP with
//! writes queued at its node listener, or still sure of its lease because its link to the
//! lock store is held while the lock moves); then the old active writes the same keys.
//! What the proof checks is returned
//! as a [`FencingOutcome`] and asserted by [`FencingOutcome::assert_fenced`]: no queued
//! write succeeded, the new active's values stand, and every write the store refused shows
//! in the node's `vha_node_fencing_rejections_total`.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::json;

use crate::node::TestCluster;
use crate::relay::Fault;
use crate::wait::wait_until_async;
use vha_core::advert::LOCK_KEY;
use vha_core::storage::HaBackend;

/// How many writes queue at the frozen active: enough to interleave with its wake-up, few
/// enough to stay far below any connection limit.
pub const QUEUED_WRITES: usize = 8;

/// The KV v1 mount the proof writes under: a KV v1 write is one fenced put (no read of
/// metadata first), so a write held in flight is exactly a write at the store.
const MOUNT: &str = "fencing";

/// The node's answer to a write the store refused as fenced (`ApiError::Fenced`).
const FENCED_MESSAGE: &str = "leadership lost";

/// How the active is taken out while its writes queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Freeze {
    /// SIGSTOP until another node is active, then SIGCONT: the writes wait in the kernel's
    /// socket buffers and race the node's own discovery that its lease ran out.
    Stop,
    /// Its link to the lock store is held (the relay keeps every byte in flight, so its
    /// renewals neither succeed nor fail and its own lease deadline is far away), and its
    /// grant is released at the store as its proxy does when it sees its node's process
    /// exit (`force_release`): another node takes the lock and writes. The old active,
    /// sure it is still active, then writes to the data store with its old fence, and only
    /// the store's fence check stands between those writes and the data. Needs split mode
    /// with the HA lock on lockd and `relay_store()` (the relay on the lock store only).
    LockMoved,
}

/// What happened to the queued writes.
#[derive(Debug, Default)]
pub struct FencingOutcome {
    /// Writes sent to the old active while it was out.
    pub queued: usize,
    /// Answers that are the store's refusal (503 "leadership lost").
    pub fenced: usize,
    /// Other non-2xx answers (the node refused before writing: not active, sealed, ...).
    pub refused: usize,
    /// Those answers, for the report.
    pub refusals: Vec<String>,
    /// Any 2xx answer: a deposed active wrote.
    pub accepted: Vec<String>,
    /// The old active's `vha_node_fencing_rejections_total` after minus before.
    pub counter_delta: f64,
    /// Keys whose value afterwards is not the new active's.
    pub overwritten: Vec<String>,
}

impl FencingOutcome {
    /// The guarantee: nothing queued at the deposed active was written, and the count of
    /// store refusals the node reports equals what its clients were told.
    pub fn assert_fenced(&self) {
        assert!(self.accepted.is_empty(), "a deposed active accepted writes: {self:?}");
        assert!(self.overwritten.is_empty(), "stale writes are visible: {self:?}");
        assert_eq!(
            self.fenced + self.refused,
            self.queued,
            "every queued write answered: {self:?}"
        );
        assert_eq!(
            self.counter_delta, self.fenced as f64,
            "vha_node_fencing_rejections_total moved by the store refusals the clients saw: {self:?}"
        );
    }
}

/// Runs the proof on a started, initialized cluster with no proxies in front of the nodes
/// (the writes go to the active's own node listener); it mounts KV v1 at `fencing/`.
pub async fn deposed_active_writes_fail(c: &TestCluster, freeze: Freeze, bound: Duration) -> FencingOutcome {
    let token = c.root_token().to_string();
    let a = c.wait_one_active(bound).await;
    let key = |i: usize| format!("{MOUNT}/k{i}");
    let write = |node: usize, i: usize, v: String| {
        let token = token.clone();
        async move {
            c.nodes[node]
                .request("POST", &key(i), Some(&token), Some(json!({ "v": v })))
                .await
        }
    };
    c.nodes[a].mount_kv(&token, MOUNT, "1").await;
    for i in 0..QUEUED_WRITES {
        let (st, v) = write(a, i, format!("old-{i}")).await;
        assert!(st.is_success(), "first write through the active: {st} {v}");
    }
    let before = c
        .node_metric(a, "vha_node_fencing_rejections_total")
        .await
        .unwrap_or(0.0);
    match freeze {
        // Only once it is stopped: a write served before the stop took hold would be a
        // legitimate write of the lease holder (overwritten by the new active), not a test
        // of fencing.
        Freeze::Stop => c.nodes[a].freeze(bound),
        Freeze::LockMoved => {
            c.store_relays[a].set(Fault::Hold);
            let ha = c
                .ha_lockd
                .as_ref()
                .or(c.lockd.as_ref())
                .expect("lockd holds the HA lock")
                .client();
            let holder = ha.holder(LOCK_KEY).await.expect("lock holder").expect("a holder");
            ha.force_release(LOCK_KEY, holder.token)
                .await
                .expect("release the active's grant");
        }
    }
    // The queued writes, each on its own connection, in flight from now on; meanwhile
    // another node takes over and writes the same keys, then the old active comes back.
    let queued = futures::future::join_all((0..QUEUED_WRITES).map(|i| write(a, i, format!("stale-{i}"))));
    let takeover = async {
        let n = wait_until_async(
            || async {
                for i in (0..c.nodes.len()).filter(|i| *i != a) {
                    if c.leader_of(i).await.is_some_and(|v| v["is_self"] == true) {
                        return Some(i);
                    }
                }
                None
            },
            "another node takes the lock",
            bound,
        )
        .await;
        for i in 0..QUEUED_WRITES {
            let (st, v) = write(n, i, format!("new-{i}")).await;
            assert!(st.is_success(), "write through the new active: {st} {v}");
        }
        if freeze == Freeze::Stop {
            c.nodes[a].signal(nix::sys::signal::Signal::SIGCONT);
        }
        n
    };
    let (answers, n) = match freeze {
        Freeze::Stop => tokio::join!(queued, takeover),
        // The old active is running and sure of its lease: it writes once the lock moved.
        Freeze::LockMoved => {
            let n = takeover.await;
            let answers = queued.await;
            c.store_relays[a].heal();
            (answers, n)
        }
    };
    let mut out = FencingOutcome {
        queued: QUEUED_WRITES,
        ..Default::default()
    };
    for (st, v) in answers {
        if st.is_success() {
            out.accepted.push(v.to_string());
        } else if st == StatusCode::SERVICE_UNAVAILABLE && v.to_string().contains(FENCED_MESSAGE) {
            out.fenced += 1;
        } else {
            out.refused += 1;
            out.refusals.push(format!("{st} {v}"));
        }
    }
    // The old active steps down and follows the new one.
    wait_until_async(
        || async {
            let v = c.leader_of(a).await?;
            (v["is_self"] == false && v["leader_address"] == c.nodes[n].api_addr.as_str()).then_some(())
        },
        "the deposed active steps down and follows the new one",
        bound,
    )
    .await;
    out.counter_delta = c
        .node_metric(a, "vha_node_fencing_rejections_total")
        .await
        .unwrap_or(0.0)
        - before;
    // Read the keys back through a term that starts after the proof: the new active's read
    // cache holds what it wrote and would hide a stale write that reached the store, so it
    // steps down and the keys are read by the next active, whose cache starts empty.
    let (st, v) = c.nodes[n].request("PUT", "sys/step-down", Some(&token), None).await;
    assert_eq!(st, StatusCode::NO_CONTENT, "step-down of the new active: {v}");
    let r = c.wait_new_active(n, bound).await;
    for i in 0..QUEUED_WRITES {
        let (st, v) = c.nodes[r].request("GET", &key(i), Some(&token), None).await;
        let expect = format!("new-{i}");
        if st != StatusCode::OK || v["data"]["v"] != expect.as_str() {
            out.overwritten.push(format!("{}: {st} {v}", key(i)));
        }
    }
    eprintln!("fencing proof ({freeze:?}): {out:?}");
    out
}

//! Pairs on separate network hosts, deployed as users deploy them: every test here builds a
//! `TestNet` (network namespaces joined by a bridge in a switch namespace, addresses the
//! test assigns on a private /24) and runs each proxy + node pair on its own host with its
//! listeners on that host's address, `api_addr`/`cluster_addr` real and distinct, lockd on a
//! store host, HAProxy on a load balancer host, and the test's HTTP client on a client host
//! (`TestNet::block_on`: the test's runtime threads entered the client's namespace).
//!
//! - The test hosts themselves: reachability only inside the net, exact partitions (symmetric,
//!   one-way, isolation, link down) and heal, removal on drop and after crashed runs.
//! - The direct topology: each pair advertises its own addresses; standbys forward.
//! - Partitions with pairs on separate hosts: the active cut from the store, cut one way
//!   from it, its link down, cut from the standbys, and the store cut from everyone.
//! - The load balancer topology: every node's `api_addr` is HAProxy's address; no redirect
//!   loop; writes and reads through HAProxy across kill -9 and `sys/step-down`, with the
//!   failover as the load balancer's clients see it printed (`--nocapture`).
//!
//! Every test needs root (network namespaces, veth, nftables); CI runs as root. Without
//! root each test fails with a message saying so (never a silent skip or pass).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use reqwest::StatusCode;
use serde_json::{json, Value};

use vha_testkit::haproxy::{HealthCheck, LbFrontend, TestHaproxy};
use vha_testkit::net::{require_root, NETNS_DIR};
use vha_testkit::node::log_time;
use vha_testkit::{wait, wait_until, wait_until_async, Cut, NetHost, TestCluster, TestNet, TestNode};

/// The hosts of every cluster test: the test's client, the store, three pairs, the load
/// balancer.
const HOSTS: [&str; 6] = ["client", "store", "p0", "p1", "p2", "lb"];
/// The pair hosts, pair `i` on `PAIRS[i]`.
const PAIRS: [&str; 3] = ["p0", "p1", "p2"];

/// An election, a restart or a recovery in a debug build on two busy cores: far above the
/// seconds they take, so a slow machine does not fail a test; a hang still does.
const BOUND: Duration = Duration::from_secs(60);
/// The HA lock's TTL in the partition tests (lockd's `lock_ttl`). The holder renews every
/// TTL/10 and gives up at its last renewal sent + TTL - TTL/5; lockd grants the lock again
/// only TTL after the last renewal it received.
const LOCK_TTL: Duration = Duration::from_secs(3);
/// The proxy's hold bound and the listener's `max_request_duration` in the tests that cut
/// a standby from the active: short, so an attempt ends in seconds.
const HOLD: &str = "3s";
const MAX_REQUEST_DURATION: &str = "6s";
/// Any single request in these tests ends within this (the proxy's hold plus
/// `max_request_duration` plus slack); longer is a hang.
const REQUEST_BOUND: Duration = Duration::from_secs(20);

/// The HAProxy frontends: `active` checks plain `sys/health` (only the active is in
/// rotation), `any` checks `sys/health?standbyok=true` (every unsealed pair is, but a standby
/// that lost the active answers 474 and is taken out), `anyhold` checks
/// `sys/health?standbyok=true&haunhealthycode=200` (such a standby stays in). Every node's
/// `api_addr` is the `active` frontend, as Vault's docs describe for a load balancer.
const LB_ACTIVE: &str = "active";
const LB_ANY: &str = "any";
const LB_ANY_HOLD: &str = "anyhold";
const LB_FRONTENDS: [&str; 3] = [LB_ACTIVE, LB_ANY, LB_ANY_HOLD];
const LB_ACTIVE_PORT: u16 = 8200;
const LB_ANY_PORT: u16 = 8300;
const LB_ANY_HOLD_PORT: u16 = 8400;

/// Most 307s a client here follows before calling it a redirect loop. A standby answers a
/// no-forwarding request with one 307 to the load balancer; with every pair in rotation the
/// load balancer may hand it to each standby once before the active.
const MAX_REDIRECTS: usize = 5;

/// Failover trials through the load balancer, per fault kind.
const LB_TRIALS: usize = 4;
/// Pacing of each load balancer client (one request at a time, at most one per tick).
const LB_CLIENT_TICK: Duration = Duration::from_millis(20);
/// Successful writes each client must make after a fault before a trial ends.
const LB_AFTER_FAULT: usize = 10;
/// Most requests one client makes in a trial (every load loop is bounded).
const LB_MAX_OPS: usize = 3_000;

fn now() -> SystemTime {
    SystemTime::now()
}

fn hosts(net: &TestNet, names: &[&str]) -> Vec<NetHost> {
    names.iter().map(|n| net.host(n).clone()).collect()
}

/// The node template of these tests: the defaults, with Vault's `step_down_wait` shortened as
/// in the other HA tests.
fn template() -> vha_testkit::node::TestNodeBuilder {
    TestNode::builder().config_extra("step_down_wait = \"2s\"")
}

/// [`template`] with short hold and request bounds, for the tests that cut standbys from the
/// active (each request there waits out a bound).
fn short_bounds() -> vha_testkit::node::TestNodeBuilder {
    template()
        .listener_extra(format!("max_request_duration = \"{MAX_REQUEST_DURATION}\""))
        .proxy_extra(format!("hold_timeout = \"{HOLD}\""))
}

/// Three pairs on p0..p2 from `template`, lockd on `store`, initialized and unsealed, one
/// active.
async fn cluster(net: &TestNet, template: vha_testkit::node::TestNodeBuilder, api_addr: Option<String>) -> TestCluster {
    let mut b = TestCluster::builder()
        .nodes(3)
        .lock_ttl(&format!("{}ms", LOCK_TTL.as_millis()))
        .template(template)
        .proxies()
        .on_hosts(hosts(net, &PAIRS), hosts(net, &["store"]));
    if let Some(a) = api_addr {
        b = b.api_addr(a);
    }
    let c = b.start().await;
    c.wait_one_active(BOUND).await;
    c
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(REQUEST_BOUND)
        .build()
        .expect("client")
}

/// `sys/health` of pair `i` through its proxy (0 when it does not answer).
async fn health(c: &TestCluster, i: usize) -> u16 {
    c.nodes[i]
        .try_request("GET", "sys/health", None, None)
        .await
        .map_or(0, |(s, _)| s.as_u16())
}

/// `active_time` of node `i` (it must be active).
async fn active_time(c: &TestCluster, i: usize) -> SystemTime {
    let v = c.leader_of(i).await.expect("active answers sys/leader");
    humantime::parse_rfc3339(v["active_time"].as_str().expect("active_time")).expect("rfc3339")
}

/// The inode of a network namespace (`/proc/PID/ns/net` or a bind mount of one).
fn netns_inode(path: &str) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}")).ino()
}

/// Whether a datagram from host `from` reaches host `to` within `within` (sent every 50 ms;
/// each probe carries a fresh token so an old datagram cannot answer a later probe).
fn delivers(from: &NetHost, to: &NetHost, within: Duration) -> bool {
    let rx: UdpSocket = to.run(|| UdpSocket::bind((to.ip, 0)).expect("bind receiver"));
    let tx: UdpSocket = from.run(|| UdpSocket::bind((from.ip, 0)).expect("bind sender"));
    rx.set_read_timeout(Some(Duration::from_millis(50))).expect("timeout");
    let dest = rx.local_addr().expect("addr");
    let token = format!("{:?}", Instant::now());
    let deadline = Instant::now() + within;
    let mut buf = [0u8; 128];
    while Instant::now() < deadline {
        let _ = tx.send_to(token.as_bytes(), dest);
        if let Ok(n) = rx.recv(&mut buf) {
            if &buf[..n] == token.as_bytes() {
                return true;
            }
        }
    }
    false
}

/// How long a datagram is given before it counts as lost: packets between namespaces of one
/// machine arrive in microseconds.
const LOST_AFTER: Duration = Duration::from_millis(500);
/// How long a datagram is given to arrive when it must.
const ARRIVES_WITHIN: Duration = Duration::from_secs(5);

fn assert_links(net: &TestNet, expect: &[(&str, &str, bool)]) {
    for (from, to, open) in expect {
        let got = delivers(
            net.host(from),
            net.host(to),
            if *open { ARRIVES_WITHIN } else { LOST_AFTER },
        );
        assert_eq!(
            got,
            *open,
            "{from} -> {to}: expected {}",
            if *open { "delivered" } else { "lost" }
        );
    }
}

/// The interfaces of the calling thread's namespace.
fn root_links() -> Vec<String> {
    let out = std::process::Command::new(vha_testkit::net::tool("ip"))
        .args(["-o", "link", "show"])
        .output()
        .expect("ip link");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1).map(|s| s.trim().to_string()))
        .collect()
}

/// Needs root. The test hosts: each host reaches every other one (TCP both ways, loopback up
/// inside each), every process started on a host really runs in its namespace, no host has
/// a route beyond the net's /24 (an outside address is unreachable at once: nothing can
/// leave), and the root namespace gains no interface.
#[test]
fn hosts_reach_each_other_and_nothing_else() {
    require_root("hosts_reach_each_other_and_nothing_else");
    let before = root_links();
    let net = TestNet::new(&["a", "b", "c"]);
    assert_eq!(root_links(), before, "the root namespace must gain no interface");
    for h in net.hosts() {
        let routes = String::from_utf8_lossy(
            &std::process::Command::new(vha_testkit::net::tool("ip"))
                .args(["-n", &h.netns, "-4", "route", "show"])
                .output()
                .expect("ip route")
                .stdout,
        )
        .into_owned();
        assert_eq!(
            routes.lines().count(),
            1,
            "{}: only the link route of the /24: {routes}",
            h.name
        );
        assert!(routes.starts_with(&net.subnet()), "{}: {routes}", h.name);
        // TEST-NET-1 (RFC 5737), never assigned: no route, so connect fails at once
        // without a packet leaving.
        let outside: SocketAddr = (Ipv4Addr::new(192, 0, 2, 1), 80).into();
        let e = h
            .run(|| std::net::TcpStream::connect_timeout(&outside, Duration::from_secs(2)))
            .expect_err("no route out");
        assert_eq!(e.kind(), std::io::ErrorKind::NetworkUnreachable, "{}: {e}", h.name);
    }
    // A listener on every host's address and on its loopback; every other host connects
    // to the address, the host itself to its loopback.
    for server in net.hosts() {
        let l = server.run(|| std::net::TcpListener::bind((server.ip, 0)).expect("bind"));
        let lo = server.run(|| std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind lo"));
        let addr = l.local_addr().unwrap();
        for client in net.hosts().iter().filter(|c| c.name != server.name) {
            assert!(
                client.tcp_connects(addr, Duration::from_secs(5)),
                "{} -> {}",
                client.name,
                server.name
            );
        }
        assert!(server.tcp_connects(lo.local_addr().unwrap(), Duration::from_secs(5)));
    }
    // A process started on a host runs in the host's namespace, by its own PID.
    let b = net.host("b");
    let logs = tempfile::tempdir().expect("tempdir");
    let mut p = vha_testkit::ChildProc::spawn(
        "sleeper",
        {
            let mut c = b.command("sleep");
            c.arg("30");
            c
        },
        &logs.path().join("sleeper.log"),
    );
    let pid = p.pid();
    wait_until(
        || {
            (netns_inode(&format!("/proc/{pid}/ns/net")) == netns_inode(&format!("{NETNS_DIR}/{}", b.netns)))
                .then_some(())
        },
        "the child's PID is in host b's namespace (ip netns exec execs)",
        Duration::from_secs(10),
    );
    p.kill();
}

/// Needs root. Partitions cut exactly the links asked for, in the direction asked for, and
/// heal restores them: a symmetric cut loses both directions between two hosts and nothing
/// else; a one-way cut loses only `from -> to`; an isolation cuts one host from a set; a
/// link down cuts a host from everyone; heal (rules removed, links up) delivers everything
/// again and leaves no nftables table behind.
#[test]
fn partitions_cut_exactly_the_chosen_links() {
    require_root("partitions_cut_exactly_the_chosen_links");
    let net = TestNet::new(&["a", "b", "c"]);
    assert_links(
        &net,
        &[("a", "b", true), ("b", "a", true), ("a", "c", true), ("c", "b", true)],
    );

    net.partition(&[Cut::between("a", "b")]);
    assert!(net.ruleset("a").contains("drop"), "{}", net.ruleset("a"));
    assert_links(
        &net,
        &[
            ("a", "b", false),
            ("b", "a", false),
            ("a", "c", true),
            ("c", "a", true),
            ("b", "c", true),
        ],
    );

    // A new partition replaces the old one.
    net.partition(&[Cut::one_way("a", "b")]);
    assert_links(
        &net,
        &[("a", "b", false), ("b", "a", true), ("a", "c", true), ("c", "b", true)],
    );

    net.partition(&[Cut::isolate("c", &["a", "b"])]);
    assert_links(
        &net,
        &[
            ("c", "a", false),
            ("a", "c", false),
            ("c", "b", false),
            ("b", "c", false),
            ("a", "b", true),
        ],
    );

    net.heal();
    for h in ["a", "b", "c"] {
        assert!(!net.ruleset(h).contains("vha_partition"), "{h}: {}", net.ruleset(h));
    }
    assert_links(
        &net,
        &[("a", "b", true), ("b", "a", true), ("c", "a", true), ("b", "c", true)],
    );

    net.link_down("b");
    assert_links(
        &net,
        &[
            ("a", "b", false),
            ("b", "a", false),
            ("b", "c", false),
            ("a", "c", true),
        ],
    );
    net.heal();
    assert_links(&net, &[("a", "b", true), ("b", "c", true)]);
}

/// Needs root. Everything a `TestNet` made is removed when it is dropped, also when the
/// test panics; namespaces and subnet claims of a test process that died without dropping
/// its net (killed, crashed) are removed by the next `TestNet`.
#[test]
fn nets_are_removed_after_panic_and_crash() {
    require_root("nets_are_removed_after_panic_and_crash");
    let ns_exists = |name: &str| std::path::Path::new(NETNS_DIR).join(name).exists();
    let seen: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let net = TestNet::new(&["a", "b"]);
        *seen.lock().unwrap() = net.namespaces().to_vec();
        assert!(net.namespaces().iter().all(|n| ns_exists(n)));
        panic!("test panics while its net exists");
    }));
    assert!(r.is_err());
    let seen = seen.into_inner().unwrap();
    assert_eq!(seen.len(), 3, "two hosts and the switch: {seen:?}");
    for n in &seen {
        assert!(!ns_exists(n), "{n} left behind after a panic");
    }

    // A leftover of a dead process: a namespace and a subnet claim named by its PID.
    let mut dead = std::process::Command::new("true").spawn().expect("spawn true");
    let dead_pid = dead.id();
    dead.wait().expect("reap");
    let stale_ns = format!("vhat{dead_pid}x0-a");
    let out = std::process::Command::new(vha_testkit::net::tool("ip"))
        .args(["netns", "add", &stale_ns])
        .output()
        .expect("ip netns add");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // A claim file nobody holds a lock on (its process died) is removed; one held by a live
    // net stays.
    std::fs::create_dir_all(vha_testkit::net::CLAIM_DIR).unwrap();
    let stale_claim = std::path::Path::new(vha_testkit::net::CLAIM_DIR).join("stale-test");
    std::fs::write(&stale_claim, format!("{dead_pid} vhat{dead_pid}x0\n")).unwrap();
    let first = TestNet::new(&["a"]);
    let second = TestNet::new(&["a"]);
    assert!(!ns_exists(&stale_ns), "the dead process's namespace was removed");
    assert!(!stale_claim.exists(), "the dead process's subnet claim was removed");
    assert_ne!(first.subnet(), second.subnet(), "two live nets never share a subnet");
    assert!(
        first.namespaces().iter().all(|n| ns_exists(n)),
        "a live net is left alone"
    );
    drop((first, second));
}

/// Needs root. Deployed as users deploy: each pair on its own host with its listener and
/// cluster listener on the host's address, `api_addr`/`cluster_addr` the host's own and
/// distinct, lockd on another host, the client on a fourth. Every standby names the
/// active's real addresses, `sys/ha-status` lists every node with its own addresses, a
/// write through a standby pair is forwarded, and every pair reads it back; every node and
/// proxy process runs in its host's namespace.
#[test]
fn pairs_on_separate_hosts_serve_as_deployed() {
    require_root("pairs_on_separate_hosts_serve_as_deployed");
    let net = TestNet::new(&HOSTS);
    net.block_on("client", || async {
        let c = cluster(&net, template(), None).await;
        let a = c.wait_one_active(BOUND).await;
        c.mount_secret(a).await;
        for (i, n) in c.nodes.iter().enumerate() {
            let h = n.host().expect("on a host");
            assert_eq!(h.name, PAIRS[i]);
            assert_eq!(n.addr, format!("http://{}:8200", h.ip));
            assert_eq!(n.api_addr, n.addr);
            let ns = netns_inode(&format!("{NETNS_DIR}/{}", h.netns));
            assert_eq!(netns_inode(&format!("/proc/{}/ns/net", n.pid())), ns, "node {i}");
            assert_eq!(
                netns_inode(&format!("/proc/{}/ns/net", c.proxies[i].pid())),
                ns,
                "proxy {i}"
            );
        }
        let active_ip = c.nodes[a].host().unwrap().ip;
        for i in 0..3 {
            let v = c.leader_of(i).await.expect("sys/leader");
            assert_eq!(v["leader_address"], format!("http://{active_ip}:8200"), "node {i}: {v}");
            assert_eq!(
                v["leader_cluster_address"],
                format!("https://{active_ip}:8201"),
                "node {i}: {v}"
            );
        }
        // Every standby heartbeats to the active over its host's link.
        let status = wait_until_async(
            || async {
                let (st, v) = c.nodes[a]
                    .try_request("GET", "sys/ha-status", Some(c.root_token()), None)
                    .await?;
                (st == StatusCode::OK && v["nodes"].as_array().is_some_and(|n| n.len() == 3)).then_some(v)
            },
            "sys/ha-status lists all three nodes",
            BOUND,
        )
        .await;
        let mut apis: Vec<String> = status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["api_address"].as_str().unwrap().to_string())
            .collect();
        let mut clusters: Vec<String> = status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|n| n["cluster_address"].as_str().unwrap().to_string())
            .collect();
        apis.sort();
        clusters.sort();
        let mut want_api: Vec<String> = c.nodes.iter().map(|n| n.addr.clone()).collect();
        want_api.sort();
        let mut want_cluster: Vec<String> = c
            .nodes
            .iter()
            .map(|n| format!("https://{}:8201", n.host().unwrap().ip))
            .collect();
        want_cluster.sort();
        assert_eq!(apis, want_api);
        assert_eq!(clusters, want_cluster);

        let s = (a + 1) % 3;
        assert_eq!(c.kv_put(s, "deployed", "through-standby").await, Some(StatusCode::OK));
        for i in 0..3 {
            assert_eq!(
                c.kv_get(i, "deployed").await.as_deref(),
                Some("through-standby"),
                "pair {i}"
            );
        }
        for i in 0..3 {
            assert_eq!(health(&c, i).await, if i == a { 200 } else { 429 }, "pair {i}");
        }
    });
}

/// What the tests that cut the active from the store measure.
struct CutFromStore {
    /// From the cut to the new active's `active_time`.
    to_new_active: Duration,
    /// From the cut to the old active's "leadership lost" log line.
    to_step_down: Duration,
}

/// The active's host loses the store (`cut` installs the partition, `heal` lifts it): the
/// old active steps down before the lock could be granted elsewhere (its "leadership lost"
/// precedes the new active's `active_time`), the lock is not granted again before the lease
/// can have run out (at least 0.8 x TTL after the cut: lockd re-grants TTL after the last
/// renewal it received, at most TTL/10 before the cut), a standby takes over, the old
/// active no longer says it is active (`sys/leader`); after heal the cluster has one active that
/// every pair follows and writes succeed.
async fn active_loses_store(
    c: &TestCluster,
    ttl: Duration,
    cut: impl FnOnce(&str),
    heal: impl FnOnce(),
) -> CutFromStore {
    let a = c.wait_one_active(BOUND).await;
    c.mount_secret(a).await;
    assert_eq!(c.kv_put(a, "k", "before").await, Some(StatusCode::OK));
    let t0 = now();
    cut(PAIRS[a]);
    let n = c.wait_new_active(a, BOUND).await;
    let new_at = active_time(c, n).await;
    let lost_line = c.nodes[a].wait_log_line("leadership lost", BOUND).await;
    let lost_at = log_time(&lost_line).expect("timestamp");
    assert!(
        lost_at < new_at,
        "the old active stopped at {lost_at:?}, after the new one became active at {new_at:?}"
    );
    let to_new_active = new_at.duration_since(t0).unwrap_or_default();
    assert!(
        to_new_active >= ttl.mul_f64(0.8),
        "the lock was granted again {to_new_active:?} after the cut, before the lease (TTL {ttl:?}) could have run out"
    );
    // Asked on its own host: with its link down nobody else reaches it.
    let (st, body) = c.nodes[a]
        .get_node_local("sys/leader", None)
        .await
        .expect("the old active answers sys/leader on its host");
    let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    assert_eq!(st, 200, "{body}");
    assert_eq!(v["is_self"], false, "the cut-off node must not say it is active: {v}");
    assert_eq!(c.kv_put(n, "k", "during").await, Some(StatusCode::OK));
    heal();
    let a2 = c.wait_one_active(BOUND).await;
    for i in 0..3 {
        assert_eq!(
            c.kv_get(i, "k").await.as_deref(),
            Some("during"),
            "pair {i} after heal (active {a2})"
        );
    }
    CutFromStore {
        to_new_active,
        to_step_down: lost_at.duration_since(t0).unwrap_or_default(),
    }
}

/// Needs root. The active pair's host cut from the store host (nftables, both ways): the
/// old active steps down before the lock can be granted elsewhere and a standby takes over
/// (see [`active_loses_store`]); prints the time from the cut to the new active and the
/// bound it obeys.
#[test]
fn active_cut_from_store_steps_down_first() {
    require_root("active_cut_from_store_steps_down_first");
    let net = TestNet::new(&HOSTS);
    let m = net.block_on("client", || async {
        let c = cluster(&net, template(), None).await;
        active_loses_store(
            &c,
            LOCK_TTL,
            |active| net.partition(&[Cut::active_from_store(active, &["store"])]),
            || net.heal(),
        )
        .await
    });
    eprintln!(
        "active cut from the store (lock_ttl {LOCK_TTL:?}): old active stepped down {:?} after the cut (bound: last renewal sent + TTL - TTL/5 = at most {:?}), new active {:?} after the cut (lockd re-grants TTL after the last renewal it received: at least {:?})",
        m.to_step_down,
        LOCK_TTL.mul_f64(0.8),
        m.to_new_active,
        LOCK_TTL.mul_f64(0.9),
    );
}

/// Needs root. One-way: the active's host loses every packet from the store host, while its
/// own packets still reach the store (its renewals arrive, the answers never do): the old
/// active still steps down before anyone else is granted the lock, and a standby takes over.
#[test]
fn active_deaf_to_store_one_way_steps_down_first() {
    require_root("active_deaf_to_store_one_way_steps_down_first");
    let net = TestNet::new(&HOSTS);
    let m = net.block_on("client", || async {
        let c = cluster(&net, template(), None).await;
        active_loses_store(
            &c,
            LOCK_TTL,
            |active| net.partition(&[Cut::one_way("store", active)]),
            || net.heal(),
        )
        .await
    });
    eprintln!(
        "active deaf to the store (one-way): stepped down after {:?}, new active after {:?}",
        m.to_step_down, m.to_new_active
    );
}

/// Needs root. The active pair's host loses its link (cable pulled: it reaches nobody and
/// nobody reaches it): a standby takes over only after the old active stepped down; when
/// the link is back the old node rejoins as a standby that follows the new active.
#[test]
fn active_link_down_fails_over_and_rejoins() {
    require_root("active_link_down_fails_over_and_rejoins");
    let net = TestNet::new(&HOSTS);
    let m = net.block_on("client", || async {
        let c = cluster(&net, template(), None).await;
        active_loses_store(&c, LOCK_TTL, |active| net.link_down(active), || net.heal()).await
    });
    eprintln!(
        "active's link down: stepped down after {:?}, new active after {:?}",
        m.to_step_down, m.to_new_active
    );
}

/// Needs root. The active pair's host cut from both standby hosts (the store still reaches
/// everyone): leadership does not move; the standbys report 474 on `sys/health`; a read
/// through a standby pair ends within the configured bounds in Vault's fallback, a 307 to
/// the active's `api_addr` with path and query kept (a read that rode an already open
/// forward connection may instead end in a clear 502/504 at `max_request_duration`); after
/// heal the standbys report 429 and forward again (200).
#[test]
fn active_cut_from_standbys_474_then_307_then_forwards() {
    require_root("active_cut_from_standbys_474_then_307_then_forwards");
    let net = TestNet::new(&HOSTS);
    net.block_on("client", || async {
        let c = cluster(&net, short_bounds(), None).await;
        let a = c.wait_one_active(BOUND).await;
        c.mount_secret(a).await;
        assert_eq!(c.kv_put(a, "p", "v1").await, Some(StatusCode::OK));
        let standbys: Vec<usize> = (0..3).filter(|i| *i != a).collect();
        for s in &standbys {
            assert_eq!(
                c.kv_get(*s, "p").await.as_deref(),
                Some("v1"),
                "forwarded read through {s}"
            );
        }
        let names: Vec<&str> = standbys.iter().map(|s| PAIRS[*s]).collect();
        net.partition(&[Cut::active_from_standbys(PAIRS[a], &names)]);
        for s in &standbys {
            wait_until_async(
                || async { (health(&c, *s).await == 474).then_some(()) },
                "a standby cut from the active answers 474",
                BOUND,
            )
            .await;
        }
        assert_eq!(
            c.actives().await,
            vec![a],
            "cutting the cluster channel must not move leadership"
        );

        let http = client();
        let s = standbys[0];
        let url = format!("{}/v1/secret/data/p?version=1", c.nodes[s].addr);
        let want_location = format!("{}/v1/secret/data/p?version=1", c.nodes[a].api_addr);
        let mut redirects = 0;
        for attempt in 0..4 {
            let t0 = Instant::now();
            let r = http
                .get(&url)
                .header("X-Vault-Token", c.root_token())
                .send()
                .await
                .expect("an answer within the bound");
            let took = t0.elapsed();
            let st = r.status().as_u16();
            let loc = r.headers().get("location").map(|l| l.to_str().unwrap().to_string());
            eprintln!("standby {s} cut from the active, attempt {attempt}: {st} after {took:?}, location {loc:?}");
            assert!(took <= REQUEST_BOUND, "held {took:?}");
            match st {
                307 => {
                    assert_eq!(loc.as_deref(), Some(want_location.as_str()));
                    redirects += 1;
                }
                502..=504 => {}
                other => panic!("a standby cut from the active answered {other}"),
            }
            if redirects >= 2 {
                break;
            }
        }
        assert!(redirects >= 1, "the standby never fell back to Vault's 307");

        net.heal();
        for s in &standbys {
            wait_until_async(
                || async { (health(&c, *s).await == 429).then_some(()) },
                "a standby healthy again (429) after heal",
                BOUND,
            )
            .await;
            wait_until_async(
                || async { (c.kv_get(*s, "p").await.as_deref() == Some("v1")).then_some(()) },
                "the standby forwards again after heal",
                BOUND,
            )
            .await;
        }
        assert_eq!(c.actives().await, vec![a]);
    });
}

/// Needs root. The store host cut from every other host: within the lease no node says it
/// is active any more (`sys/leader`), and no write sent after the cut is acknowledged (through any pair);
/// after heal one node is active again, every pair follows it, data written before the cut
/// is intact and writes succeed.
#[test]
fn store_cut_from_everyone_no_active_no_write_then_recovers() {
    require_root("store_cut_from_everyone_no_active_no_write_then_recovers");
    let net = TestNet::new(&HOSTS);
    net.block_on("client", || async {
        let c = cluster(&net, template(), None).await;
        let a = c.wait_one_active(BOUND).await;
        c.mount_secret(a).await;
        assert_eq!(c.kv_put(a, "k", "before").await, Some(StatusCode::OK));
        let t0 = Instant::now();
        net.partition(&[Cut::store_from_everyone("store", &["client", "p0", "p1", "p2", "lb"])]);
        // Writers through every pair, all sent after the cut, until no node has said it is
        // active for a whole lease.
        let stop = AtomicBool::new(false);
        let writer = |i: usize| {
            let (c, stop) = (&c, &stop);
            async move {
                let mut tick = tokio::time::interval(Duration::from_millis(50));
                let mut acked = Vec::new();
                let mut attempts = 0;
                while !stop.load(Ordering::SeqCst) && attempts < 1_000 {
                    tick.tick().await;
                    attempts += 1;
                    let v = format!("cut-{i}-{attempts}");
                    if let Some(st) = c.kv_put(i, "k", &v).await {
                        if st.is_success() {
                            acked.push((v, st));
                        }
                    }
                }
                (attempts, acked)
            }
        };
        let watcher = async {
            let mut none_since: Option<Instant> = None;
            let mut first_none = None;
            let mut poll = tokio::time::interval(wait::POLL_INTERVAL);
            loop {
                poll.tick().await;
                assert!(t0.elapsed() < BOUND, "a node still says it is active {:?} after the store was cut", t0.elapsed());
                let any_active = !c.actives().await.is_empty();
                match (any_active, none_since) {
                    (true, _) => {
                        none_since = None;
                        first_none = None;
                    }
                    (false, None) => {
                        none_since = Some(Instant::now());
                        first_none.get_or_insert(t0.elapsed());
                    }
                    (false, Some(since)) if since.elapsed() >= LOCK_TTL => break,
                    (false, Some(_)) => {}
                }
            }
            stop.store(true, Ordering::SeqCst);
            first_none.unwrap_or_default()
        };
        let (no_active_after, writes) = tokio::join!(watcher, futures::future::join_all((0..3).map(writer)));
        // What a load balancer's health check meets meanwhile (a figure, not a guarantee).
        let t = Instant::now();
        let h = client()
            .get(format!("{}/v1/sys/health", c.nodes[(a + 1) % 3].addr))
            .send()
            .await
            .map(|r| r.status().as_u16());
        eprintln!("store cut from everyone: sys/health of a standby pair answered {h:?} after {:?}", t.elapsed());
        let attempts: usize = writes.iter().map(|w| w.0).sum();
        let acked: Vec<_> = writes.iter().flat_map(|w| w.1.clone()).collect();
        assert!(attempts >= 3, "every writer sent during the cut");
        assert!(acked.is_empty(), "writes acknowledged while the store was cut off: {acked:?}");
        eprintln!(
            "store cut from everyone: no active {no_active_after:?} after the cut (the active gives up at its last renewal sent + TTL - TTL/5 = at most {:?} after it), {attempts} writes sent during the cut, none acknowledged",
            LOCK_TTL.mul_f64(0.8)
        );
        net.heal();
        let a2 = c.wait_one_active(BOUND).await;
        let after = c.kv_get(a2, "k").await;
        eprintln!("after heal: active pair {a2}, k = {after:?}");
        assert_eq!(after.as_deref(), Some("before"), "no write of the cut landed");
        assert_eq!(c.kv_put(a2, "k", "after").await, Some(StatusCode::OK));
        for i in 0..3 {
            assert_eq!(c.kv_get(i, "k").await.as_deref(), Some("after"), "pair {i}");
        }
    });
}

/// The etcd lease TTL (`lock_timeout`) in the etcd test: etcd's minimum in vha.
const ETCD_TTL: Duration = Duration::from_secs(5);

/// Needs root. On etcd (three members, each on its own host): the active pair's host cut from
/// every member's host steps down before its lease could be granted elsewhere, and a standby
/// takes over (see [`active_loses_store`]; the lease is etcd's, kept alive every TTL/10).
#[test]
fn etcd_active_cut_from_store_steps_down_first() {
    require_root("etcd_active_cut_from_store_steps_down_first");
    let net = TestNet::new(&["client", "e0", "e1", "e2", "p0", "p1", "p2"]);
    let m = net.block_on("client", || async {
        let c = TestCluster::builder()
            .nodes(3)
            .etcd(3)
            .lock_ttl(&format!("{}ms", ETCD_TTL.as_millis()))
            .template(template())
            .proxies()
            .on_hosts(hosts(&net, &PAIRS), hosts(&net, &["e0", "e1", "e2"]))
            .start()
            .await;
        active_loses_store(
            &c,
            ETCD_TTL,
            |active| net.partition(&[Cut::active_from_store(active, &["e0", "e1", "e2"])]),
            || net.heal(),
        )
        .await
    });
    eprintln!(
        "etcd: active cut from all members (lock_timeout {ETCD_TTL:?}): stepped down {:?} after the cut (at most {:?} after its last keep-alive), new active {:?} after the cut",
        m.to_step_down,
        ETCD_TTL.mul_f64(0.8),
        m.to_new_active
    );
}

/// The cluster behind HAProxy: every node's `api_addr` is the `active` frontend.
async fn lb_cluster(net: &TestNet) -> (TestCluster, TestHaproxy) {
    let lb_host = net.host("lb").clone();
    let api_addr = format!("http://{}", lb_host.addr(LB_ACTIVE_PORT));
    let c = cluster(net, template(), Some(api_addr.clone())).await;
    for n in &c.nodes {
        assert_eq!(n.api_addr, api_addr);
    }
    let servers: Vec<(String, SocketAddr)> = c
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (PAIRS[i].to_string(), n.host().unwrap().addr(8200)))
        .collect();
    let lb = TestHaproxy::start(
        &lb_host,
        vec![
            LbFrontend {
                name: LB_ACTIVE.into(),
                port: LB_ACTIVE_PORT,
                check: HealthCheck::ActiveOnly,
            },
            LbFrontend {
                name: LB_ANY.into(),
                port: LB_ANY_PORT,
                check: HealthCheck::StandbyOk,
            },
            LbFrontend {
                name: LB_ANY_HOLD.into(),
                port: LB_ANY_HOLD_PORT,
                check: HealthCheck::StandbyOkHaUnhealthyOk,
            },
        ],
        &servers,
    );
    (c, lb)
}

/// Waits until HAProxy has exactly the active in the `active` backend and every pair in
/// the `any` backend; returns the active's index.
async fn lb_settled(c: &TestCluster, lb: &TestHaproxy) -> usize {
    let a = c.wait_one_active(BOUND).await;
    for i in 0..3 {
        if i != a {
            wait_until_async(
                || async { (health(c, i).await == 429).then_some(()) },
                "a standby answers 429",
                BOUND,
            )
            .await;
        }
    }
    lb.wait_servers_up(LB_ACTIVE, &[PAIRS[a]], BOUND);
    lb.wait_servers_up(LB_ANY, &PAIRS, BOUND);
    lb.wait_servers_up(LB_ANY_HOLD, &PAIRS, BOUND);
    a
}

/// Sends `GET url` with `X-Vault-No-Request-Forwarding` and follows 307s by hand, at most
/// [`MAX_REDIRECTS`]; returns the final status, its body and how many 307s came first.
async fn get_following(http: &reqwest::Client, url: &str, token: &str) -> (u16, Value, usize) {
    let mut url = url.to_string();
    for hops in 0..=MAX_REDIRECTS {
        let r = http
            .get(&url)
            .header("X-Vault-Token", token)
            .header("X-Vault-No-Request-Forwarding", "true")
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        let st = r.status().as_u16();
        if st == 307 {
            url = r
                .headers()
                .get("location")
                .expect("a 307 names its target")
                .to_str()
                .unwrap()
                .to_string();
            continue;
        }
        let v = r.json().await.unwrap_or(Value::Null);
        return (st, v, hops);
    }
    panic!("more than {MAX_REDIRECTS} redirects in a row for {url}: a redirect loop");
}

/// Needs root. Behind HAProxy with every node's `api_addr` set to the load balancer, once the
/// load balancer's checks have settled: the active-only check puts exactly the active in
/// rotation, the standbyok checks every pair; a standby's 307 for a no-forwarding request
/// names the load balancer; and a client sending `X-Vault-No-Request-Forwarding` through any
/// frontend gets its answer (200 with the data): with no 307 through the active-only
/// frontend, and with at most one through the standbyok ones (a standby's 307 names the
/// active-only frontend, which only routes to the active). Never a loop. (Right after a
/// leadership change, before the checks catch up, such a client is bounced: measured in
/// [`load_balancer_failover_kill_and_step_down`].)
#[test]
fn load_balancer_no_redirect_loop() {
    require_root("load_balancer_no_redirect_loop");
    let net = TestNet::new(&HOSTS);
    net.block_on("client", || async {
        let (c, lb) = lb_cluster(&net).await;
        let a = lb_settled(&c, &lb).await;
        c.mount_secret(a).await;
        assert_eq!(c.kv_put(a, "lb", "v").await, Some(StatusCode::OK));
        let http = client();
        let token = c.root_token().to_string();

        // A standby's own 307 names the load balancer (its api_addr).
        let s = (a + 1) % 3;
        let r = http
            .get(format!("{}/v1/secret/data/lb", c.nodes[s].addr))
            .header("X-Vault-Token", &token)
            .header("X-Vault-No-Request-Forwarding", "true")
            .send()
            .await
            .expect("standby answers");
        assert_eq!(r.status().as_u16(), 307);
        assert_eq!(
            r.headers()["location"].to_str().unwrap(),
            format!("{}/v1/secret/data/lb", lb.url(LB_ACTIVE))
        );

        let mut hops_seen = BTreeMap::new();
        for (frontend, max_hops) in [(LB_ACTIVE, 0), (LB_ANY, 1), (LB_ANY_HOLD, 1)] {
            // Enough requests that round robin sends some to every pair in rotation.
            for _ in 0..3 * PAIRS.len() {
                let (st, v, hops) =
                    get_following(&http, &format!("{}/v1/secret/data/lb", lb.url(frontend)), &token).await;
                assert_eq!(st, 200, "{frontend}: {v}");
                assert_eq!(v["data"]["data"]["v"], "v");
                assert!(hops <= max_hops, "{frontend}: {hops} redirects");
                *hops_seen.entry((frontend, hops)).or_insert(0) += 1;
            }
        }
        eprintln!("no-forwarding requests through the load balancer, (frontend, 307s before the answer) -> count: {hops_seen:?}");
        assert!(
            hops_seen.keys().any(|(f, h)| *f == LB_ANY && *h > 0),
            "with standbys in rotation some request must have met a standby's 307 (else this test proves nothing about loops)"
        );
    });
}

/// How a fault is injected in a load balancer trial.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    /// kill -9 of the active's node process (its proxy stays).
    KillNode,
    /// kill -9 of the active's node and proxy (the host's processes crash).
    KillPair,
    /// `sys/step-down` on the active.
    StepDown,
}

/// One client request in a trial.
#[derive(Clone, Debug)]
struct Op {
    start: Instant,
    end: Instant,
    /// HTTP status; 0 for a transport error.
    status: u16,
    /// For writes: the sequence number written.
    seq: u64,
    /// For a failure: the error (body or transport error), shortened.
    error: String,
    /// 307s followed before the final answer (no-forwarding reader).
    hops: usize,
}

/// What a load balancer client does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Client {
    /// Writes its own key with increasing sequence numbers.
    Writer,
    /// Reads a fixed key.
    Reader,
    /// Reads the fixed key with `X-Vault-No-Request-Forwarding`, following up to
    /// [`MAX_REDIRECTS`] 307s (a longer chain ends as a failed 307).
    NoForwardReader,
}

/// A client looping one request at a time through `base` (writer: `secret/data/<key>` with
/// increasing sequence numbers; reader: the fixed key `lb-fixed`) until `stop`, at most
/// [`LB_MAX_OPS`] requests.
async fn lb_client(
    base: String,
    token: String,
    key: String,
    kind: Client,
    stop: Arc<AtomicBool>,
    ops: Arc<Mutex<Vec<Op>>>,
) {
    let http = client();
    let write = kind == Client::Writer;
    let mut tick = tokio::time::interval(LB_CLIENT_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for seq in 1..=LB_MAX_OPS as u64 {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        tick.tick().await;
        let start = Instant::now();
        let mut url = match kind {
            Client::Writer => format!("{base}/v1/secret/data/{key}"),
            Client::Reader | Client::NoForwardReader => format!("{base}/v1/secret/data/lb-fixed"),
        };
        let mut hops = 0;
        let sent = loop {
            let rb = if write {
                http.post(&url).json(&json!({"data": {"seq": seq}}))
            } else {
                http.get(&url)
            };
            let rb = match kind {
                Client::NoForwardReader => rb.header("X-Vault-No-Request-Forwarding", "true"),
                _ => rb,
            };
            let r = rb.header("X-Vault-Token", &token).send().await;
            // The no-forwarding reader follows 307s by hand (the others never get one).
            let location = r.as_ref().ok().filter(|r| r.status().as_u16() == 307).and_then(|r| {
                r.headers()
                    .get("location")
                    .and_then(|l| l.to_str().ok())
                    .map(str::to_string)
            });
            match location {
                Some(next) if kind == Client::NoForwardReader && hops < MAX_REDIRECTS => {
                    hops += 1;
                    url = next;
                }
                _ => break r,
            }
        };
        let (status, error) = match sent {
            Ok(r) => {
                let st = r.status().as_u16();
                let text = r.text().await.unwrap_or_default();
                if !write && st == 200 {
                    let body: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                    assert_eq!(body["data"]["data"]["v"], "fixed", "a read returned wrong data");
                }
                let error = if (200..300).contains(&st) {
                    String::new()
                } else {
                    text.chars().take(120).collect()
                };
                (st, error)
            }
            Err(e) => {
                let cause = std::error::Error::source(&e)
                    .map(|c| format!(": {c}"))
                    .unwrap_or_default();
                (0, format!("{e}{cause}").chars().take(160).collect())
            }
        };
        ops.lock().unwrap().push(Op {
            start,
            end: Instant::now(),
            status,
            seq,
            error,
            hops,
        });
    }
}

/// What one trial showed one frontend's clients.
#[derive(Clone, Debug)]
struct TrialResult {
    fault: Fault,
    frontend: &'static str,
    /// From the fault to the end of the first successful write sent after it.
    first_write: Duration,
    /// From the fault to the end of the last failed request (zero when none failed).
    last_error: Duration,
    errors: usize,
    /// Failed requests by status (0: transport error) and error text -> count.
    error_statuses: BTreeMap<(u16, String), usize>,
    requests: usize,
    /// The slowest request that started after the fault.
    slowest: Duration,
    /// What the no-forwarding reader saw (not counted in `errors`).
    no_forward: NoForwardView,
}

/// What a client sending `X-Vault-No-Request-Forwarding` (following 307s) saw in a trial.
#[derive(Clone, Debug, Default)]
struct NoForwardView {
    requests: usize,
    /// Reads that did not end in a 2xx.
    failed: usize,
    /// Reads still redirected after [`MAX_REDIRECTS`] 307s.
    cut_chains: usize,
    /// From the fault to the end of the last failed read.
    last_failure: Duration,
    /// The longest chain of 307s followed.
    most_hops: usize,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// One trial: clients (a writer and a reader per frontend) run through HAProxy, `fault` hits
/// the active, the trial ends once a new active is in place and every writer made
/// [`LB_AFTER_FAULT`] successful writes sent after the fault; the node is restored
/// afterwards. Checks that the last acknowledged write of each writer is readable.
async fn lb_trial(c: &mut TestCluster, lb: &TestHaproxy, fault: Fault, trial: usize) -> Vec<TrialResult> {
    let a = lb_settled(c, lb).await;
    let token = c.root_token().to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let mut clients = Vec::new();
    let mut logs = Vec::new();
    for frontend in LB_FRONTENDS {
        for kind in [Client::Writer, Client::Reader, Client::NoForwardReader] {
            let ops = Arc::new(Mutex::new(Vec::new()));
            let key = format!("lb-{frontend}-{trial}");
            clients.push(tokio::spawn(lb_client(
                lb.url(frontend),
                token.clone(),
                key,
                kind,
                stop.clone(),
                ops.clone(),
            )));
            logs.push((frontend, kind, ops));
        }
    }
    let ok_after = |ops: &Mutex<Vec<Op>>, since: Instant| {
        ops.lock()
            .unwrap()
            .iter()
            .filter(|o| o.start >= since && (200..300).contains(&o.status))
            .count()
    };
    let warm = Instant::now();
    wait_until_async(
        || async { logs.iter().all(|(_, _, ops)| ok_after(ops, warm) >= 3).then_some(()) },
        "every load balancer client succeeds before the fault",
        BOUND,
    )
    .await;
    let t0 = Instant::now();
    match fault {
        Fault::KillNode => c.nodes[a].kill(),
        Fault::KillPair => {
            // The proxy first: a proxy that outlives its node even briefly proves the node's
            // death and releases the lock, which a crashed host cannot do.
            c.proxies[a].kill();
            c.nodes[a].kill();
        }
        Fault::StepDown => {
            let (st, v) = c.nodes[a].request("PUT", "sys/step-down", Some(&token), None).await;
            assert_eq!(st, StatusCode::NO_CONTENT, "step-down: {v}");
        }
    }
    let n = c.wait_new_active(a, BOUND).await;
    wait_until_async(
        || async {
            logs.iter()
                .all(|(_, kind, ops)| {
                    let want = if *kind == Client::Writer { LB_AFTER_FAULT } else { 3 };
                    ok_after(ops, t0) >= want
                })
                .then_some(())
        },
        "every client succeeds again through the load balancer",
        BOUND,
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    for h in clients {
        h.await.expect("client task");
    }
    let mut out = Vec::new();
    for (frontend, kind, ops) in &logs {
        let ops = ops.lock().unwrap().clone();
        let after: Vec<&Op> = ops.iter().filter(|o| o.end >= t0).collect();
        let failed: Vec<&&Op> = after.iter().filter(|o| !(200..300).contains(&o.status)).collect();
        if *kind == Client::NoForwardReader {
            let m = out
                .iter_mut()
                .find(|r: &&mut TrialResult| r.frontend == *frontend)
                .expect("the writer's result comes first");
            m.no_forward = NoForwardView {
                requests: after.len(),
                failed: failed.len(),
                cut_chains: failed.iter().filter(|o| o.status == 307).count(),
                last_failure: failed.iter().map(|o| o.end - t0).max().unwrap_or_default(),
                most_hops: after.iter().map(|o| o.hops).max().unwrap_or_default(),
            };
            continue;
        }
        let write = *kind == Client::Writer;
        if write {
            let last_acked = ops
                .iter()
                .filter(|o| (200..300).contains(&o.status))
                .map(|o| o.seq)
                .max();
            let (st, v) = c.nodes[n]
                .request("GET", &format!("secret/data/lb-{frontend}-{trial}"), Some(&token), None)
                .await;
            assert_eq!(st, StatusCode::OK, "{v}");
            let stored = v["data"]["data"]["seq"].as_u64().expect("seq");
            assert!(
                Some(stored) >= last_acked,
                "{frontend}: the last acknowledged write (seq {last_acked:?}) is missing, store has {stored}"
            );
        }
        let mut error_statuses = BTreeMap::new();
        for o in &failed {
            *error_statuses.entry((o.status, o.error.clone())).or_insert(0) += 1;
        }
        let prev = out.iter().position(|r: &TrialResult| r.frontend == *frontend);
        let first_write = if write {
            after
                .iter()
                .filter(|o| o.start >= t0 && (200..300).contains(&o.status))
                .map(|o| o.end - t0)
                .min()
                .unwrap_or(BOUND)
        } else {
            Duration::ZERO
        };
        let r = TrialResult {
            fault,
            frontend,
            first_write,
            last_error: failed.iter().map(|o| o.end - t0).max().unwrap_or_default(),
            errors: failed.len(),
            error_statuses,
            requests: after.len(),
            slowest: after
                .iter()
                .filter(|o| o.start >= t0)
                .map(|o| o.end - o.start)
                .max()
                .unwrap_or_default(),
            no_forward: NoForwardView::default(),
        };
        // Merge the writer's and the reader's view of one frontend.
        match prev {
            Some(i) => {
                let m = &mut out[i];
                m.first_write = m.first_write.max(r.first_write);
                m.last_error = m.last_error.max(r.last_error);
                m.errors += r.errors;
                for (k, v) in r.error_statuses {
                    *m.error_statuses.entry(k).or_insert(0) += v;
                }
                m.requests += r.requests;
                m.slowest = m.slowest.max(r.slowest);
            }
            None => out.push(r),
        }
    }
    if matches!(fault, Fault::KillNode | Fault::KillPair) {
        c.nodes[a].restart().await;
        if fault == Fault::KillPair {
            c.proxies[a].restart();
        }
        c.unseal(a).await;
    }
    out
}

/// Needs root. Behind HAProxy, writes and reads run through both frontends while the
/// active's node is killed (-9), the active's node and proxy are killed, or the active steps
/// down: every client succeeds again within the bound (also one sending
/// `X-Vault-No-Request-Forwarding`: any chain of 307s ends), no acknowledged write is lost,
/// no read returns wrong data, a step-down fails no request where standbys are in rotation,
/// and the failover as the load balancer's clients see it is printed per fault and frontend
/// (time to the first successful write after the fault and to the last error, p50/p99 over
/// the trials, errors by status).
#[test]
fn load_balancer_failover_kill_and_step_down() {
    require_root("load_balancer_failover_kill_and_step_down");
    let net = TestNet::new(&HOSTS);
    let results = net.block_on("client", || async {
        let (mut c, lb) = lb_cluster(&net).await;
        let a = lb_settled(&c, &lb).await;
        c.mount_secret(a).await;
        assert_eq!(c.kv_put(a, "lb-fixed", "fixed").await, Some(StatusCode::OK));
        let mut results = Vec::new();
        for trial in 0..LB_TRIALS {
            for fault in [Fault::KillNode, Fault::KillPair, Fault::StepDown] {
                let r = lb_trial(&mut c, &lb, fault, trial).await;
                for x in &r {
                    eprintln!("trial {trial} {x:?}");
                }
                results.extend(r);
            }
        }
        eprintln!(
            "why HAProxy took servers out, (backend, reason) -> count: {:?}",
            lb.down_reasons()
        );
        results
    });
    let mut groups: BTreeMap<(Fault, &str), Vec<TrialResult>> = BTreeMap::new();
    for r in results {
        groups.entry((r.fault, r.frontend)).or_default().push(r);
    }
    for ((fault, frontend), rs) in &groups {
        let mut first: Vec<Duration> = rs.iter().map(|r| r.first_write).collect();
        let mut last: Vec<Duration> = rs.iter().map(|r| r.last_error).collect();
        first.sort();
        last.sort();
        let errors: usize = rs.iter().map(|r| r.errors).sum();
        let requests: usize = rs.iter().map(|r| r.requests).sum();
        let mut statuses = BTreeMap::new();
        for r in rs {
            for (k, v) in &r.error_statuses {
                *statuses.entry(k.clone()).or_insert(0) += v;
            }
        }
        let slowest = rs.iter().map(|r| r.slowest).max().unwrap_or_default();
        let nf_requests: usize = rs.iter().map(|r| r.no_forward.requests).sum();
        let nf_failed: usize = rs.iter().map(|r| r.no_forward.failed).sum();
        let nf_cut: usize = rs.iter().map(|r| r.no_forward.cut_chains).sum();
        let nf_last = rs.iter().map(|r| r.no_forward.last_failure).max().unwrap_or_default();
        let nf_hops = rs.iter().map(|r| r.no_forward.most_hops).max().unwrap_or_default();
        eprintln!(
            "LB failover {fault:?} via '{frontend}' ({} trials): first successful write after the fault p50 {:?} p99 {:?}; last error p50 {:?} p99 {:?}; errors {errors} of {requests} requests {statuses:?}; slowest request {slowest:?}; no-forwarding reads: {nf_failed} of {nf_requests} failed, {nf_cut} still redirected after {MAX_REDIRECTS} 307s, the last failure {nf_last:?} after the fault, longest chain {nf_hops}",
            rs.len(),
            percentile(&first, 0.5),
            percentile(&first, 0.99),
            percentile(&last, 0.5),
            percentile(&last, 0.99),
        );
        if *fault == Fault::StepDown && *frontend != LB_ACTIVE {
            // With every pair in rotation, the deposed active refuses what reaches it ("not
            // active", nothing ran) and its proxy sends that to the new active: a step-down
            // fails no request. (Through the active-only check, the load balancer itself may
            // have no server between taking the old active out and putting the new one in.)
            assert_eq!(
                errors, 0,
                "requests failed across sys/step-down via '{frontend}': {statuses:?}"
            );
        }
    }
}

//! `vha bench` end to end, as a user runs it: the real binary against a real
//! 3-node cluster described by a `cluster.json` in the `vha dev` format. Checks the JSON
//! report's structure, that the client's request counts agree with what the servers counted
//! (`vault_core_handle_request_count`), and a failover trial with read-back of every
//! acknowledged write.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};

use vha_testkit::{vha_binary, ChildProc, TestCluster};

/// Upper bound for one bench invocation in these tests (debug build, 2 busy cores).
const BENCH_TIMEOUT: Duration = Duration::from_secs(180);

/// Writes `cluster.json` for a TestCluster in the format `vha dev` uses (plus each node's
/// config path, since TestCluster keeps configs in per-node temp dirs).
fn write_cluster_json(c: &TestCluster, dir: &Path) -> std::path::PathBuf {
    let keys = c.keys.as_ref().expect("initialized");
    let nodes: Vec<Value> = c
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| {
            json!({
                "name": format!("node-{i}"),
                "api_addr": n.addr,
                "cluster_addr": format!("https://127.0.0.1:{}", n.cluster_port),
                "node_addr": n.node_addr,
                "node_pid": n.pid(),
                "proxy_pid": Value::Null,
                "config": n.config_path,
            })
        })
        .collect();
    let cj = json!({
        "root_token": keys.root_token,
        "unseal_keys_b64": keys.keys_base64,
        "lockd": { "addr": c.lockd.as_ref().map(|l| l.address()), "pid": c.lockd.as_ref().map(|l| l.pid()) },
        "nodes": nodes,
    });
    let p = dir.join("cluster.json");
    std::fs::write(&p, serde_json::to_string_pretty(&cj).unwrap()).unwrap();
    p
}

async fn mount_kv(c: &TestCluster) {
    let a = c.wait_one_active(Duration::from_secs(30)).await;
    c.mount_secret(a).await;
}

/// Runs `vha bench ARGS` to completion (bounded) and returns the parsed JSON report.
async fn bench(dir: &Path, args: &[&str]) -> Value {
    let json_path = dir.join("report.json");
    let html_path = dir.join("report.html");
    let mut cmd = Command::new(vha_binary());
    // Relative paths in `args` (`--peer-dir`) are under `dir`.
    cmd.current_dir(dir)
        .arg("bench")
        .args(args)
        .arg("--json")
        .arg(&json_path)
        .arg("--html")
        .arg(&html_path)
        .arg("--quiet");
    let mut p = ChildProc::spawn("vha bench", cmd, &dir.join("bench.log"));
    let deadline = tokio::time::Instant::now() + BENCH_TIMEOUT;
    while p.is_running() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "vha bench did not finish in {BENCH_TIMEOUT:?}:\n{}",
            p.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let text =
        std::fs::read_to_string(&json_path).unwrap_or_else(|e| panic!("no report ({e}); output:\n{}", p.output()));
    let html = std::fs::read_to_string(&html_path).expect("html report");
    assert!(
        html.contains("<svg") && !html.contains("<script"),
        "html report is self-contained"
    );
    serde_json::from_str(&text).expect("report is JSON")
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Each of the five scenarios runs ~2 s against a 3-node cluster, interleaved over two
/// rounds. Proves: the report has every scenario with per-round HDR percentiles
/// (p50 <= p90 <= p99 <= p99.9 <= max), ratios to `direct` per round with their median, and
/// timelines; the success rules hold on this cluster (`direct`, `node` and `redirect-follow`
/// succeed, `redirect` returns the 307 itself, a proxy-less standby answers `forward` with
/// 307); and for every round the requests the client sent (warm-up included) match the
/// servers' own `vault_core_handle_request_count` deltas within 2 % + 5; and the cost view
/// reports CPU per request and memory of the nodes, the store and the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenarios_report_and_server_counts_agree() {
    let c = TestCluster::builder().nodes(3).start().await;
    mount_kv(&c).await;
    let dir = tempfile::tempdir().unwrap();
    let cj = write_cluster_json(&c, dir.path());
    let rep = bench(
        dir.path(),
        &[
            "--cluster",
            cj.to_str().unwrap(),
            "--rounds",
            "2",
            "--duration",
            "2s",
            "--warmup",
            "300ms",
            "--concurrency",
            "4",
            "--workload",
            "kv-read",
            "--keys",
            "10",
        ],
    )
    .await;
    assert_eq!(rep["version"], 1);
    assert!(rep["machine"]["cpus"].as_u64().unwrap() >= 1);
    let scs = rep["scenarios"].as_array().expect("scenarios");
    let names: Vec<&str> = scs.iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["direct", "forward", "redirect", "redirect-follow", "node"]);
    for sc in scs {
        let name = sc["name"].as_str().unwrap();
        let rounds = sc["rounds"].as_array().unwrap();
        assert_eq!(rounds.len(), 2, "{name}");
        for r in rounds {
            let l = &r["latency"];
            let ps: Vec<f64> = ["p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms"]
                .iter()
                .map(|k| num(&l[k]))
                .collect();
            assert!(
                ps.windows(2).all(|w| w[0] <= w[1]),
                "{name}: percentiles not ordered: {l}"
            );
            assert!(ps[0] > 0.0, "{name}: {l}");
            let ok = r["ok"].as_u64().unwrap();
            let errors = r["errors"].as_u64().unwrap();
            assert_eq!(num(&l["count"]) as u64, ok + errors, "{name}");
            assert!(ok + errors > 20, "{name}: too few requests in 2 s: {r}");
            assert!(!r["timeline"].as_array().unwrap().is_empty(), "{name}");
            match name {
                "forward" => assert_eq!(
                    r["statuses"]["307"].as_u64(),
                    Some(errors),
                    "{name}: a proxy-less standby 307s: {r}"
                ),
                _ => assert_eq!(errors, 0, "{name}: {r}"),
            }
            if name == "redirect" {
                assert_eq!(r["statuses"]["307"].as_u64(), Some(ok), "{r}");
            }
            let client = r["http_requests"].as_u64().unwrap() + r["warmup_http_requests"].as_u64().unwrap();
            if name == "redirect-follow" {
                assert!(
                    r["http_requests"].as_u64().unwrap() >= 2 * ok,
                    "each op is a 307 plus the real request: {r}"
                );
            }
            let server = r["server_requests"]
                .as_u64()
                .unwrap_or_else(|| panic!("{name}: no server count: {r}"));
            let tol = client as f64 * 0.02 + 5.0;
            assert!(
                (server as f64 - client as f64).abs() <= tol,
                "{name}: client sent {client}, servers counted {server}"
            );
        }
        if name != "direct" {
            let ratio = &sc["ratio_to_direct"];
            assert_eq!(ratio["baseline"], "direct");
            assert_eq!(ratio["per_round"].as_array().unwrap().len(), 2);
            assert!(num(&ratio["median"]) > 0.0 || name == "forward", "{name}: {ratio}");
        }
        assert!(!sc["cdf"].as_array().unwrap().is_empty());
        // The cost view: the nodes (all three, read from /proc) and the bench's client did
        // work for these requests and hold memory; the store is watched too.
        let cost = sc["cost"].as_array().expect("cost");
        let role = |r: &str| {
            cost.iter()
                .find(|c| c["role"] == r)
                .unwrap_or_else(|| panic!("{name}: no {r} in {cost:?}"))
        };
        assert_eq!(role("vha node")["processes"], 3, "{name}");
        assert!(num(&role("vha node")["cpu_us_per_request"]) > 0.0, "{name}: {cost:?}");
        assert!(num(&role("vha node")["rss_mb"]) > 1.0, "{name}: {cost:?}");
        assert_eq!(role("vha store")["processes"], 1, "{name}");
        assert!(
            num(&role("bench client")["cpu_us_per_request"]) > 0.0,
            "{name}: {cost:?}"
        );
        // Each role's kernel part is a part: present, never negative, never above the total.
        for c in cost {
            let (all, sys) = (num(&c["cpu_us_per_request"]), num(&c["sys_us_per_request"]));
            assert!((0.0..=all).contains(&sys), "{name}: kernel part {sys} of {all}: {c}");
        }
        for r in sc["rounds"].as_array().unwrap() {
            assert!(!r["cost"].as_array().unwrap().is_empty(), "{name}: {r}");
        }
    }
    assert!(rep["http_requests_total"].as_u64().unwrap() > 0);
}

/// The nginx peer (Debian's nginx, an mTLS front and terminator) started from a relative
/// `--peer-dir`, as the default `.vha-bench` is: nginx reads `-c` against its `-p` prefix,
/// so a relative directory must not be joined to itself. Proves the peer starts, both its
/// scenarios (`nginx:forward` through the mTLS front and terminator, `nginx:direct` through
/// the plain local hop) carry every request to the active node (no errors), and the cost
/// view measures nginx's processes in each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nginx_peer_forwards_from_a_relative_peer_dir() {
    let c = TestCluster::builder().nodes(1).start().await;
    mount_kv(&c).await;
    let dir = tempfile::tempdir().unwrap();
    let cj = write_cluster_json(&c, dir.path());
    let rep = bench(
        dir.path(),
        &[
            "--cluster",
            cj.to_str().unwrap(),
            "--scenarios",
            "node",
            "--peer",
            "nginx",
            "--peer-dir",
            "peers",
            "--rounds",
            "1",
            "--duration",
            "1s",
            "--warmup",
            "200ms",
            "--concurrency",
            "2",
            "--workload",
            "kv-read",
            "--keys",
            "5",
        ],
    )
    .await;
    let scs = rep["scenarios"].as_array().expect("scenarios");
    for name in ["nginx:forward", "nginx:direct"] {
        let sc = scs
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no {name} scenario in {scs:?}"));
        let r = &sc["rounds"][0];
        assert!(r["ok"].as_u64().unwrap() > 10, "{name} served too few: {r}");
        assert_eq!(r["errors"].as_u64(), Some(0), "{name}: {r}");
        let cost = sc["cost"].as_array().expect("cost");
        let nginx = cost
            .iter()
            .find(|c| c["system"] == "nginx")
            .unwrap_or_else(|| panic!("nginx not in {name}'s cost view: {cost:?}"));
        assert!(num(&nginx["cpu_us_per_request"]) > 0.0, "{name}: {cost:?}");
    }
    assert!(dir.path().join("peers/nginx/nginx.conf").exists());
}

/// One failover trial under write load: the bench kills the active node with SIGKILL,
/// measures the time to the first acknowledged write sent after the kill, restarts and
/// unseals the node from its config, and reads back every acknowledged write. Proves the
/// trial completes with a recovery time, no lost acknowledged writes, and a restarted node
/// that rejoined as a standby (its new pid is written back to cluster.json).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failover_trial_loses_no_acknowledged_write() {
    let mut c = TestCluster::builder().nodes(3).lock_ttl("2s").start().await;
    mount_kv(&c).await;
    let dir = tempfile::tempdir().unwrap();
    let cj = write_cluster_json(&c, dir.path());
    let before: Vec<u32> = c.nodes.iter().map(|n| n.pid()).collect();
    let rep = bench(
        dir.path(),
        &[
            "--cluster",
            cj.to_str().unwrap(),
            "--scenarios",
            "direct",
            "--rounds",
            "1",
            "--duration",
            "500ms",
            "--warmup",
            "0s",
            "--concurrency",
            "2",
            "--workload",
            "kv-write",
            "--failover",
            "1",
            "--failover-writers",
            "4",
        ],
    )
    .await;
    // Stop the node the bench restarted (it is not a TestCluster child).
    let after: Value = serde_json::from_str(&std::fs::read_to_string(&cj).unwrap()).unwrap();
    let mut restarted = Vec::new();
    for n in after["nodes"].as_array().unwrap() {
        let pid = n["node_pid"].as_u64().unwrap() as u32;
        if !before.contains(&pid) {
            restarted.push(pid);
        }
    }
    for pid in &restarted {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(*pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    for n in c.nodes.iter_mut() {
        n.kill();
    }
    let fo = &rep["failover"][0];
    assert_eq!(fo["system"], "vha", "{rep}");
    let trials = fo["trials"].as_array().unwrap();
    assert_eq!(trials.len(), 1, "{fo}");
    let t = &trials[0];
    let down = num(&t["downtime_ms"]);
    assert!(down > 0.0 && down < 20_000.0, "{t}");
    assert!(t["acked"].as_u64().unwrap() > 0, "{t}");
    assert!(t["new_active"].is_string(), "{t}");
    assert!(fo["acked_writes"].as_u64().unwrap() > 0);
    assert_eq!(fo["lost_writes"], 0, "{fo}");
    assert_eq!(fo["verify_errors"], 0, "{fo}");
    assert_eq!(restarted.len(), 1, "exactly the killed node was restarted: {after}");
    assert!(fo["notes"].as_array().unwrap().is_empty(), "{fo}");
}

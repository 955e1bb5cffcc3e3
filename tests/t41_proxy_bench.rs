//! Proxy throughput, side by side in one run (a benchmark, not a test: `#[ignore]`d).
//! lockd + 3 pairs; `wrk` against: the active node itself (`node_address`), the active's
//! proxy (direct), a standby's proxy (forwarded over mTLS), and a standby's proxy with
//! `X-Vault-No-Request-Forwarding` (307). Prints req/s and the forward/direct ratio.
//!
//! Run with a release binary: `cargo build --release && VHA_BIN=target/release/vha cargo
//! test --release --test t41_proxy_bench -- --ignored --nocapture`. Knobs: `BENCH_DURATION`
//! (default 10s), `BENCH_CONNS` (64), `BENCH_PATH` (`secret/data/bench`),
//! `VHA_PROXY_FORWARD_PROTOCOL` (`h1` default, or `h2`), inherited by the proxies.

use std::process::Command;

use serde_json::json;
use vha_testkit::TestCluster;

fn wrk(url: &str, token: &str, extra: &[&str]) -> (f64, String) {
    let duration = std::env::var("BENCH_DURATION").unwrap_or_else(|_| "10s".into());
    let conns = std::env::var("BENCH_CONNS").unwrap_or_else(|_| "64".into());
    let mut cmd = Command::new("wrk");
    cmd.args([
        "-t2",
        "-c",
        &conns,
        "-d",
        &duration,
        "--latency",
        "-H",
        &format!("X-Vault-Token: {token}"),
    ]);
    for h in extra {
        cmd.args(["-H", h]);
    }
    let out = cmd.arg(url).output().expect("wrk (apt-get install -y wrk)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let rps = text
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("Requests/sec:")
                .map(|v| v.trim().parse::<f64>().unwrap_or(0.0))
        })
        .unwrap_or(0.0);
    (rps, text)
}

/// Direct vs forwarded vs redirected throughput through the proxies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run explicitly with --ignored"]
async fn proxy_throughput() {
    let c = TestCluster::builder().nodes(3).proxies().lock_ttl("10s").start().await;
    let a = c.wait_one_active(std::time::Duration::from_secs(30)).await;
    let s = (a + 1) % 3;
    let t = c.root_token().to_string();
    let (st, v) = c.nodes[a]
        .request(
            "POST",
            "sys/mounts/secret",
            Some(&t),
            Some(json!({"type": "kv", "options": {"version": "2"}})),
        )
        .await;
    assert!(st.is_success(), "{v}");
    let (st, v) = c.nodes[a]
        .request("POST", "secret/data/bench", Some(&t), Some(json!({"data": {"k": "v"}})))
        .await;
    assert!(st.is_success(), "{v}");
    let path = std::env::var("BENCH_PATH").unwrap_or_else(|_| "secret/data/bench".into());
    let runs = [
        (
            "node (active, no proxy)",
            format!("{}/v1/{path}", c.nodes[a].node_addr),
            vec![],
        ),
        (
            "direct (active's proxy)",
            format!("{}/v1/{path}", c.nodes[a].addr),
            vec![],
        ),
        (
            "forward (standby's proxy, mTLS)",
            format!("{}/v1/{path}", c.nodes[s].addr),
            vec![],
        ),
        (
            "redirect (standby's proxy, 307)",
            format!("{}/v1/{path}", c.nodes[s].addr),
            vec!["X-Vault-No-Request-Forwarding: 1"],
        ),
    ];
    let mut results = Vec::new();
    for (name, url, extra) in &runs {
        // Warm-up: fills the pools (TLS handshakes are not what we measure).
        let _ = Command::new("wrk")
            .args(["-t2", "-c64", "-d1s", "-H", &format!("X-Vault-Token: {t}"), url])
            .output();
        let (rps, text) = wrk(url, &t, extra);
        eprintln!("== {name}: {rps:.0} req/s\n{text}");
        results.push((*name, rps));
    }
    let direct = results[1].1;
    eprintln!("\nSUMMARY ({path})");
    for (name, rps) in &results {
        eprintln!(
            "  {name:<34} {rps:>10.0} req/s  {:>5.2} x direct",
            rps / direct.max(1.0)
        );
    }
    eprintln!("  forward/direct = {:.2}", results[2].1 / direct.max(1.0));
    eprintln!(
        "{}",
        c.proxies[s]
            .metrics()
            .await
            .lines()
            .filter(|l| l.starts_with("vha_proxy_forward_errors") || l.starts_with("vha_proxy_requests"))
            .collect::<Vec<_>>()
            .join("\n")
    );
}

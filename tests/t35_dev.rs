//! `vha dev` end to end: it starts lockd and three proxy+node pairs, writes a
//! complete 0600 `cluster.json`, leaves exactly one active with KV v2 at `secret/`, and
//! stops every process it started on Ctrl-C.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::{json, Value};
use vha_testkit::{pid_alive, vha_binary, TestDev};

/// The dev cluster comes up complete and valid, serves KV v2 through its active node, and
/// Ctrl-C stops lockd and every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_cluster_end_to_end() {
    let mut dev = TestDev::start(&["--nodes", "3", "--lock-ttl", "2s"], Duration::from_secs(60));
    let path = dev.cluster_json();
    let cluster = dev.cluster.clone();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "cluster.json holds secrets: 0600");
    let token = cluster["root_token"].as_str().expect("root_token").to_string();
    assert_eq!(cluster["unseal_keys_b64"].as_array().map(Vec::len), Some(1));
    let lockd_pid = cluster["lockd"]["pid"].as_u64().expect("lockd pid");
    assert!(cluster["lockd"]["addr"]
        .as_str()
        .is_some_and(|a| a.starts_with("http://127.0.0.1:")));
    assert!(pid_alive(lockd_pid));
    let nodes = cluster["nodes"].as_array().expect("nodes").clone();
    assert_eq!(nodes.len(), 3);
    let http = reqwest::Client::new();
    // lockd runs with authentication: a 0600 token file, requests without it refused.
    let lockd_addr = cluster["lockd"]["addr"].as_str().unwrap();
    let token_file = cluster["lockd"]["token_file"].as_str().expect("lockd token_file");
    let mode = std::fs::metadata(token_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the lockd token file is private");
    let lockd_token = std::fs::read_to_string(token_file).unwrap().trim().to_string();
    for auth in [None, Some("Bearer not-the-token-0123456789")] {
        let mut rb = http.post(format!("{lockd_addr}/v1/kv/list")).body(r#"{"prefix":""}"#);
        if let Some(a) = auth {
            rb = rb.header("authorization", a);
        }
        assert_eq!(
            rb.send().await.unwrap().status(),
            401,
            "lockd without its token: {auth:?}"
        );
    }
    let r = http
        .post(format!("{lockd_addr}/v1/kv/list"))
        .bearer_auth(&lockd_token)
        .body(r#"{"prefix":""}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "lockd with its token");
    // "Up" means ready for a load balancer, with no polling here: every standby answers
    // 429 on sys/health and the active's sys/ha-status lists all three nodes already.
    let mut health = Vec::new();
    for n in &nodes {
        let url = format!("{}/v1/sys/health", n["api_addr"].as_str().unwrap());
        health.push(http.get(url).send().await.unwrap().status().as_u16());
    }
    health.sort_unstable();
    assert_eq!(health, [200, 429, 429], "sys/health of the three pairs right after up");
    let mut actives = Vec::new();
    for n in &nodes {
        for f in ["name", "api_addr", "cluster_addr", "node_addr", "node_pid"] {
            assert!(!n[f].is_null(), "node entry lacks {f}: {n}");
        }
        assert!(pid_alive(n["node_pid"].as_u64().unwrap()));
        assert!(pid_alive(
            n["proxy_pid"].as_u64().expect("proxy_pid: each pair runs its proxy")
        ));
        assert_ne!(
            n["node_addr"], n["api_addr"],
            "the proxy owns api_addr, the node sits behind it"
        );
        let v: Value = http
            .get(format!("{}/v1/sys/leader", n["api_addr"].as_str().unwrap()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if v["is_self"] == true {
            actives.push(n["api_addr"].as_str().unwrap().to_string());
        }
    }
    assert_eq!(actives.len(), 1, "exactly one active");
    let active = &actives[0];
    let v: Value = http
        .get(format!("{active}/v1/sys/ha-status"))
        .header("X-Vault-Token", &token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        v["nodes"].as_array().map(Vec::len),
        Some(3),
        "sys/ha-status lists every node right after up: {v}"
    );
    let r = http
        .post(format!("{active}/v1/secret/data/dev"))
        .header("X-Vault-Token", &token)
        .json(&json!({"data": {"hello": "world"}}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "KV v2 mounted at secret/: {}", r.status());
    let v: Value = http
        .get(format!("{active}/v1/secret/data/dev"))
        .header("X-Vault-Token", &token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["data"]["data"]["hello"], "world");

    // `vha status` / `vha operator` against the cluster it started.
    let vha = |args: &[&str]| {
        let out = Command::new(vha_binary())
            .args(args)
            .env("VAULT_TOKEN", &token)
            .env_remove("VAULT_ADDR")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, out, err) = vha(&["status", &format!("-address={active}")]);
    assert_eq!(code, Some(0), "{out}{err}");
    for line in [
        "Seal Type",
        "Initialized",
        "Sealed",
        "Total Shares",
        "Threshold",
        "Version",
        "Storage Type",
        "HA Enabled",
        "HA Cluster",
        "Active Since",
    ] {
        assert!(out.contains(line), "status lacks {line}:\n{out}");
    }
    assert!(
        out.lines()
            .any(|l| l.starts_with("HA Mode") && l.trim_end().ends_with("active")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("Storage Type") && l.trim_end().ends_with("lockd")),
        "{out}"
    );
    let standby = nodes
        .iter()
        .map(|n| n["api_addr"].as_str().unwrap().to_string())
        .find(|a| a != active)
        .unwrap();
    let (code, out, _) = vha(&["status", "-address", &standby, "-format=json"]);
    assert_eq!(code, Some(0));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["sealed"].clone(), v["is_self"].clone()),
        (json!(false), json!(false)),
        "{v}"
    );
    let (code, out, err) = vha(&["operator", "members", &format!("-address={standby}")]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("Host Name"), "{out}");
    let (code, out, _) = vha(&["operator", "members", &format!("-address={active}"), "-format=json"]);
    assert_eq!(code, Some(0));
    let v: Value = serde_json::from_str(&out).unwrap();
    assert!(!v["nodes"].as_array().unwrap().is_empty());
    let (code, out, err) = vha(&["operator", "step-down", &format!("-address={active}")]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.starts_with("Success! Stepped down"), "{out}");
    let (code, _, err) = vha(&["operator", "init", &format!("-address={active}")]);
    assert_eq!(code, Some(1), "init of an initialized cluster fails");
    assert!(err.contains("already initialized"), "{err}");

    dev.proc.signal(Signal::SIGINT);
    let status = dev
        .proc
        .wait_exit(Duration::from_secs(60))
        .expect("vha dev exits after Ctrl-C");
    assert!(status.success(), "clean exit: {status:?}");
    let mut pids: Vec<u64> = nodes.iter().map(|n| n["node_pid"].as_u64().unwrap()).collect();
    pids.extend(nodes.iter().map(|n| n["proxy_pid"].as_u64().unwrap()));
    pids.push(lockd_pid);
    for pid in pids {
        assert!(!pid_alive(pid), "process {pid} still running after vha dev stopped");
    }
}

/// `vha operator init|unseal|seal` and `vha status` exit codes on a fresh node: init prints
/// Vault's JSON, unseal reports progress, status exits 2 while sealed and 0 unsealed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_init_unseal_seal() {
    let node = vha_testkit::TestNode::builder().start().await;
    let addr = node.addr.clone();
    let vha = |args: &[&str], token: Option<&str>| {
        let mut cmd = Command::new(vha_binary());
        cmd.args(args).env("VAULT_ADDR", &addr).env_remove("VAULT_TOKEN");
        if let Some(t) = token {
            cmd.env("VAULT_TOKEN", t);
        }
        let out = cmd.output().unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).to_string(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let (code, out, _) = vha(&["status"], None);
    assert_eq!(code, Some(2), "sealed (uninitialized) exits 2: {out}");
    let (code, out, err) = vha(
        &["operator", "init", "-key-shares=3", "-key-threshold=2", "-format=json"],
        None,
    );
    assert_eq!(code, Some(0), "{err}");
    let init: Value = serde_json::from_str(&out).unwrap();
    let keys: Vec<String> = init["unseal_keys_b64"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap().to_string())
        .collect();
    assert_eq!(keys.len(), 3);
    let root = init["root_token"].as_str().unwrap().to_string();
    let (code, out, _) = vha(&["operator", "unseal", &keys[0]], None);
    assert_eq!(code, Some(0));
    assert!(
        out.lines()
            .any(|l| l.starts_with("Unseal Progress") && l.trim_end().ends_with("1/2")),
        "{out}"
    );
    let (code, out, _) = vha(&["operator", "unseal", &keys[2]], None);
    assert_eq!(code, Some(0));
    assert!(
        out.lines()
            .any(|l| l.starts_with("Sealed") && l.trim_end().ends_with("false")),
        "{out}"
    );
    let (code, _, _) = vha(&["status"], None);
    assert_eq!(code, Some(0), "unsealed exits 0");
    let (code, _, err) = vha(&["operator", "seal"], None);
    assert_eq!(code, Some(1), "seal without a token fails");
    assert!(err.contains("permission denied"), "{err}");
    let (code, out, _) = vha(&["operator", "seal"], Some(&root));
    assert_eq!(code, Some(0));
    assert_eq!(out.trim(), "Success! Vault is sealed.");
    let (code, _, _) = vha(&["status"], None);
    assert_eq!(code, Some(2));
}

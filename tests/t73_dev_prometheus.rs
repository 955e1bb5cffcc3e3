//! `vha dev` writes `DIR/prometheus.yml` for the cluster it started; the file
//! passes `promtool check config`, and with `--prometheus` the Prometheus it starts scrapes
//! every node and lockd successfully (all targets up, exactly one active node).

use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;

use vha_testkit::prometheus::promtool_check_config;
use vha_testkit::{wait_until, wait_until_async, TestDev};

const BOUND: Duration = Duration::from_secs(60);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_writes_a_working_prometheus_config() {
    let mut dev = TestDev::start(&["--nodes", "3", "--lock-ttl", "2s", "--prometheus"], BOUND);
    let yml = dev.dir.join("prometheus.yml");
    let prom_addr = wait_until(
        || {
            assert!(dev.proc.is_running(), "vha dev exited early:\n{}", dev.proc.output());
            dev.proc
                .output()
                .lines()
                .find_map(|l| l.trim().strip_prefix("prometheus: ").map(str::to_string))
        },
        "vha dev up with its Prometheus",
        BOUND,
    );
    let cluster = dev.cluster.clone();
    let text = std::fs::read_to_string(&yml).expect("prometheus.yml written");
    if let Err(out) = promtool_check_config(&yml) {
        panic!("promtool rejects the dev config:\n{out}\n{text}");
    }
    for n in cluster["nodes"].as_array().unwrap() {
        let a = n["api_addr"].as_str().unwrap().trim_start_matches("http://");
        assert!(text.contains(a), "node {a} not scraped:\n{text}");
    }
    assert!(
        text.contains("job_name: vha-lockd")
            && text.contains("job_name: vha-node")
            && text.contains("job_name: vha-proxy"),
        "{text}"
    );

    let http = reqwest::Client::new();
    wait_until_async(
        || async {
            let v: Value = http
                .get(format!("{prom_addr}/api/v1/targets"))
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            let t = v["data"]["activeTargets"].as_array()?;
            (t.len() == 7 && t.iter().all(|t| t["health"] == "up")).then_some(())
        },
        "Prometheus scraping 3 nodes, 3 proxies and lockd, all up",
        BOUND,
    )
    .await;
    let active = wait_until_async(
        || async {
            let v: Value = http
                .get(format!("{prom_addr}/api/v1/query"))
                .query(&[("query", "sum(vault_core_active{job=\"vha-node\"})")])
                .send()
                .await
                .ok()?
                .json()
                .await
                .ok()?;
            v["data"]["result"][0]["value"][1].as_str().map(str::to_string)
        },
        "vault_core_active in Prometheus",
        BOUND,
    )
    .await;
    assert_eq!(active, "1", "exactly one active node");

    dev.proc.signal(Signal::SIGINT);
    assert!(
        dev.proc.wait_exit(BOUND).is_some(),
        "vha dev stops (with its Prometheus) on Ctrl-C"
    );
}

//! The Grafana dashboards checked against a live Prometheus. A real `prometheus`
//! scrapes (every second) a running cluster of 3 proxy + node pairs on lockd under a short
//! bounded load with one failover (kill -9 of the active node) and one step-down; then every
//! PromQL expression of every dashboard, with Grafana's variables substituted, is evaluated
//! through Prometheus' HTTP API. A parse error, an empty result, or a metric name Prometheus
//! never scraped fails the test. The etcd dashboard gets the same check against a cluster
//! on a 3-member etcd. `promtool check config` passes on the shipped scrape config.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;

use vha_testkit::node::TestNodeBuilder;
use vha_testkit::prometheus::dashboards::{self, builtins, expressions, metric_names, substitute, variables};
use vha_testkit::prometheus::{promtool_check_config, ScrapeJob, TestPrometheus};
use vha_testkit::{wait_until_async, TestCluster};

/// Scrape interval in these tests: short, so a few seconds of load give many samples.
const SCRAPE: Duration = Duration::from_secs(1);
/// Bound for a failover, for Prometheus to see an event, or for an expression to return
/// data (a few scrape intervals; the margin covers debug builds on two busy cores).
const BOUND: Duration = Duration::from_secs(30);
/// Wall-clock cap on the background load, whatever happens to the test.
const LOAD_CAP: Duration = Duration::from_secs(120);

/// Dashboards checked by [`dashboards_evaluate_on_live_prometheus`] (lockd) and by
/// [`etcd_dashboard_evaluates_on_live_prometheus`]; together they must be all of them.
const LOCKD_DASHBOARDS: [&str; 1] = ["vha-overview"];
const ETCD_DASHBOARDS: [&str; 1] = ["vha-etcd"];

/// The node template: metrics without a token (Vault's listener `telemetry` option).
fn template() -> TestNodeBuilder {
    TestNodeBuilder::default()
        .config_extra("step_down_wait = \"2s\"")
        .listener_extra("telemetry {\n    unauthenticated_metrics_access = true\n  }")
}

/// Scrape jobs for everything the cluster runs, named as in `grafana/prometheus.example.yml`.
fn scrape_jobs(c: &TestCluster) -> Vec<ScrapeJob> {
    let mut jobs = vec![
        ScrapeJob::new("vha-node", "/v1/sys/metrics", c.nodes.iter().map(|n| n.addr.clone()))
            .param("format", "prometheus"),
    ];
    let proxies: Vec<String> = c.proxies.iter().filter_map(|p| p.metrics_addr.clone()).collect();
    if !proxies.is_empty() {
        jobs.push(ScrapeJob::new("vha-proxy", "/metrics", proxies));
    }
    for (name, l) in [("vha-lockd", &c.lockd), ("vha-lockd-ha", &c.ha_lockd)] {
        if let Some(l) = l {
            jobs.push(ScrapeJob::new(name, "/metrics", [l.address()]).bearer_token_file(l.token_file()));
        }
    }
    if let Some(e) = &c.etcd {
        jobs.push(ScrapeJob::new("etcd", "/metrics", e.endpoints()));
    }
    jobs
}

/// Bounded background load on every pair: KV writes and reads (local on the active's pair,
/// forwarded on the others) and every fifth read with `X-Vault-No-Request-Forwarding` (a 307
/// from a standby's proxy). Errors are expected during the failover and ignored.
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(addrs: Vec<String>, token: String) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (stop2, sent2) = (stop.clone(), sent.clone());
        let task = tokio::spawn(async move {
            let http = reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(Duration::from_secs(10))
                .build()
                .expect("client");
            let started = Instant::now();
            let mut n: u64 = 0;
            while !stop2.load(Ordering::Relaxed) && started.elapsed() < LOAD_CAP {
                let a = &addrs[(n as usize) % addrs.len()];
                let url = format!("{a}/v1/secret/data/load-{}", n % 16);
                let req = match n % 5 {
                    0 => http.get(&url).header("X-Vault-No-Request-Forwarding", "true"),
                    1 | 3 => http.post(&url).json(&json!({"data": {"n": n}})),
                    _ => http.get(&url),
                };
                let _ = req.header("X-Vault-Token", &token).send().await;
                sent2.fetch_add(1, Ordering::Relaxed);
                n += 1;
            }
        });
        Load { stop, sent, task }
    }

    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        self.sent.load(Ordering::Relaxed)
    }
}

/// Waits until Prometheus has scraped `expr` with a positive value.
async fn wait_positive(p: &TestPrometheus, expr: &str) {
    wait_until_async(
        || async {
            let r = p.query(expr).await.ok()?;
            r.iter()
                .any(|s| vha_testkit::prometheus::sample_value(s) > 0.0)
                .then_some(())
        },
        &format!("Prometheus to see {expr} > 0"),
        BOUND,
    )
    .await;
}

/// Evaluates every expression of the dashboards with uid in `uids` against `p`, over the
/// range since `since`: instant query first (a parse error fails), then a range query
/// polled until it returns data (bounded), and every metric name read must be known to
/// Prometheus. Returns how many expressions were checked; panics listing every failure.
async fn check_dashboards(p: &TestPrometheus, uids: &[&str], since: Instant) -> usize {
    let all = dashboards::load(&dashboards::dir());
    let known = p.metric_names().await;
    let range = since.elapsed() + SCRAPE;
    let mut failures = Vec::new();
    let mut checked = 0;
    for (name, d) in all.iter().filter(|(_, d)| uids.iter().any(|u| d["uid"] == *u)) {
        let mut vars = variables(d);
        vars.extend(builtins(SCRAPE, range));
        for e in expressions(name, d) {
            checked += 1;
            let expr = match substitute(&e.expr, &vars) {
                Ok(s) => s,
                Err(err) => {
                    failures.push(format!("{name} {}: {err}", e.origin));
                    continue;
                }
            };
            for m in metric_names(&expr) {
                if !known.contains(&m) {
                    failures.push(format!("{name} {}: metric {m} never scraped (expr {expr})", e.origin));
                }
            }
            if let Err(err) = p.query(&expr).await {
                failures.push(format!("{name} {}: {err} (expr {expr})", e.origin));
                continue;
            }
            let deadline = Instant::now() + BOUND;
            loop {
                match p.query_range(&expr, range, SCRAPE).await {
                    Ok(r) if !r.is_empty() => break,
                    Ok(_) if Instant::now() < deadline => tokio::time::sleep(SCRAPE / 2).await,
                    Ok(_) => {
                        failures.push(format!(
                            "{name} {}: empty result over {range:?} (expr {expr})",
                            e.origin
                        ));
                        break;
                    }
                    Err(err) => {
                        failures.push(format!("{name} {}: {err} (expr {expr})", e.origin));
                        break;
                    }
                }
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {checked} dashboard expressions failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    checked
}

/// Every dashboard is checked by one of the two live tests.
#[test]
fn every_dashboard_is_covered_by_a_live_test() {
    for (name, d) in dashboards::load(&dashboards::dir()) {
        let uid = d["uid"].as_str().unwrap_or_default();
        assert!(
            LOCKD_DASHBOARDS.contains(&uid) || ETCD_DASHBOARDS.contains(&uid),
            "{name} (uid {uid}) is not evaluated by any live Prometheus test"
        );
    }
}

/// `promtool check config` accepts the shipped example scrape config and the config the
/// tests generate. The example names lockd's credentials under /etc/prometheus, which
/// promtool opens: they are made (a token, a CA and a client certificate) in a temporary
/// directory that stands in for it.
#[test]
fn shipped_scrape_config_passes_promtool() {
    let example = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("grafana/prometheus.example.yml");
    let dir = tempfile::tempdir().expect("tempdir");
    let etc = dir.path().join("etc-prometheus");
    let ca = vha_testkit::pki::TestCa::new(&etc, "lockd");
    let client = ca.client("client", "prometheus");
    std::fs::copy(&client.cert, etc.join("prometheus-lockd-client.pem")).expect("client certificate");
    std::fs::copy(&client.key, etc.join("prometheus-lockd-client-key.pem")).expect("client key");
    std::fs::write(etc.join("lockd.token"), "0123456789abcdef0123456789abcdef\n").expect("token");
    let text = std::fs::read_to_string(&example).expect("read the example");
    assert!(
        text.contains("/etc/prometheus/"),
        "the example's credential paths moved"
    );
    let copy = dir.path().join("prometheus.example.yml");
    std::fs::write(&copy, text.replace("/etc/prometheus/", &format!("{}/", etc.display()))).expect("write");
    if let Err(out) = promtool_check_config(&copy) {
        panic!("promtool rejects {}:\n{out}", example.display());
    }
    let generated = dir.path().join("prometheus.yml");
    let jobs = [
        ScrapeJob::new("vha-node", "/v1/sys/metrics", ["http://127.0.0.1:8200".to_string()])
            .param("format", "prometheus"),
        ScrapeJob::new("vha-lockd", "/metrics", ["http://127.0.0.1:8300".to_string()]),
    ];
    std::fs::write(&generated, vha_testkit::prometheus::config_yaml(&jobs, "1s")).expect("write");
    if let Err(out) = promtool_check_config(&generated) {
        panic!("promtool rejects the generated test config:\n{out}");
    }
}

/// The property: on a live 3-pair cluster that went through a kill -9 failover and a
/// step-down under load, every expression of the overview dashboard parses and returns data
/// in Prometheus, reading only metric names that were really scraped. So no panel of the
/// overview is blank for a misspelt metric, a wrong label or a broken PromQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboards_evaluate_on_live_prometheus() {
    let mut c = TestCluster::builder()
        .nodes(3)
        .lock_ttl("2s")
        .proxies()
        .template(template())
        .start()
        .await;
    assert_eq!(c.proxies.len(), 3, "a 3-pair cluster");
    let a = c.wait_one_active(BOUND).await;
    let token = c.root_token().to_string();
    c.mount_secret(a).await;

    let since = Instant::now();
    let prom = TestPrometheus::start(&scrape_jobs(&c), "1s").await;
    prom.wait_all_up(BOUND).await;
    let load = Load::start(c.nodes.iter().map(|n| n.addr.clone()).collect(), token.clone());
    wait_positive(&prom, "sum(vha_proxy_requests_total{route=\"forward\"})").await;
    wait_positive(&prom, "sum(vha_proxy_redirects_total)").await;

    // One failover: kill -9 of the active node (its proxy stays up). Its proxy proves the
    // death and releases the lock early, so the gap is short: a request through each other
    // pair right away is sure to meet the stale advertisement (a forward error, then a hold
    // until the new active is advertised).
    c.nodes[a].kill();
    let during = futures::future::join_all(
        (0..3)
            .filter(|i| *i != a)
            .map(|i| c.nodes[i].try_request("GET", "sys/mounts", Some(&token), None)),
    )
    .await;
    assert!(
        during.iter().flatten().any(|(st, _)| st.is_success()),
        "held requests answered: {during:?}"
    );
    let n = c.wait_new_active(a, BOUND).await;
    wait_positive(&prom, "sum(vha_proxy_forward_errors_total)").await;
    wait_positive(&prom, "sum(vha_proxy_holds_total)").await;

    // One step-down of the new active, so the step-down series have data too.
    let (st, v) = c.nodes[n].request("PUT", "sys/step-down", Some(&token), None).await;
    assert!(st.is_success(), "step-down: {st} {v}");
    c.wait_new_active(n, BOUND).await;
    wait_positive(&prom, "sum(vault_core_step_down_count)").await;
    wait_positive(&prom, "sum(vha_lockd_ops_total{op=\"release\"})").await;
    wait_positive(&prom, "sum(vault_core_active)").await;
    let sent = load.finish().await;
    assert!(sent > 0, "the load sent requests");

    let checked = check_dashboards(&prom, &LOCKD_DASHBOARDS, since).await;
    assert!(checked >= 20, "only {checked} expressions checked");
}

/// The etcd dashboard on a live cluster whose data and HA lock live in a 3-member etcd:
/// every expression parses and returns data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_dashboard_evaluates_on_live_prometheus() {
    let c = TestCluster::builder()
        .nodes(3)
        .etcd(3)
        .template(template())
        .start()
        .await;
    let a = c.wait_one_active(BOUND).await;
    let token = c.root_token().to_string();
    c.mount_secret(a).await;

    let since = Instant::now();
    let prom = TestPrometheus::start(&scrape_jobs(&c), "1s").await;
    prom.wait_all_up(BOUND).await;
    let load = Load::start(vec![c.nodes[a].addr.clone()], token);
    wait_positive(&prom, "sum(etcd_debugging_lease_renewed_total)").await;
    wait_positive(&prom, "count(etcd_network_peer_round_trip_time_seconds_count > 0)").await;
    load.finish().await;

    let checked = check_dashboards(&prom, &ETCD_DASHBOARDS, since).await;
    assert!(checked >= 10, "only {checked} expressions checked");
}

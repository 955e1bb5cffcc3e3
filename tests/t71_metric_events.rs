//! Each metric moves when its event happens, on real processes. Every test scrapes
//! the real endpoints (a node's `/v1/sys/metrics?format=prometheus`, a proxy's metrics
//! listener, lockd's `/metrics`) before and after the event: a forward, a redirect, a hold
//! during a kill -9 failover, a step-down, and a leadership loss (the active cut from its
//! store). Also: the endpoint needs a token unless the listener's `telemetry` allows
//! token-less scrapes, and no label carries a path or a token. Every proxy metric
//! (requests, forward latency, upstream connections, redirects, forward errors, holds and
//! hold time, advertisement term and age) moves with its event.

use std::time::Duration;

use reqwest::StatusCode;

use vha_testkit::node::TestNodeBuilder;
use vha_testkit::prometheus::{parse_exposition, series_value};
use vha_testkit::{wait_until_async, Fault, TestCluster};

/// Bound for a failover or for a metric to move (lock TTL 2-3 s plus debug-build slack).
const BOUND: Duration = Duration::from_secs(30);

fn template() -> TestNodeBuilder {
    TestNodeBuilder::default()
        .config_extra("step_down_wait = \"2s\"")
        .listener_extra("telemetry {\n    unauthenticated_metrics_access = true\n  }")
}

async fn get_text(url: &str, token: Option<&str>) -> (StatusCode, String) {
    let mut rb = reqwest::Client::new().get(url).timeout(Duration::from_secs(10));
    if let Some(t) = token {
        rb = rb.header("X-Vault-Token", t);
    }
    let r = rb.send().await.unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let st = r.status();
    (st, r.text().await.unwrap_or_default())
}

/// Node `i`'s own metrics (straight from the node process, not through its proxy).
async fn node_metrics(c: &TestCluster, i: usize) -> String {
    let (st, body) = get_text(
        &format!("{}/v1/sys/metrics?format=prometheus", c.nodes[i].node_addr),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK, "node {i} metrics: {body}");
    body
}

/// lockd's metrics, with its bearer token (lockd's `/metrics` needs authentication).
async fn lockd_metrics(c: &TestCluster) -> String {
    let l = c.lockd.as_ref().expect("lockd");
    let r = reqwest::Client::new()
        .get(format!("{}/metrics", l.address()))
        .bearer_auth(l.token().expect("test lockd has a token"))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("GET lockd /metrics");
    assert_eq!(r.status(), StatusCode::OK);
    r.text().await.unwrap_or_default()
}

/// Waits until node `i`'s metrics satisfy `pred`; returns them.
async fn wait_node(c: &TestCluster, i: usize, why: &str, pred: impl Fn(&str) -> bool) -> String {
    wait_until_async(
        || async {
            let (st, body) = get_text(
                &format!("{}/v1/sys/metrics?format=prometheus", c.nodes[i].node_addr),
                None,
            )
            .await;
            (st == StatusCode::OK && pred(&body)).then_some(body)
        },
        why,
        BOUND,
    )
    .await
}

fn v(text: &str, name: &str) -> f64 {
    series_value(text, name, &[])
}

/// Label names every exported series may carry: a fixed, bounded set (no path, no token,
/// no client address).
const ALLOWED_LABELS: [&str; 11] = [
    "le", "route", "class", "kind", "reason", "outcome", "op", "quantile", "reused", "upstream", "role",
];

fn assert_bounded_labels(what: &str, text: &str, token: &str) {
    for s in parse_exposition(text) {
        for (k, val) in &s.labels {
            assert!(
                ALLOWED_LABELS.contains(&k.as_str()),
                "{what}: {} has unexpected label {k}={val}",
                s.name
            );
            assert!(
                !val.contains('/') && !val.contains(token),
                "{what}: {} label {k}={val} looks like a path or token",
                s.name
            );
        }
    }
}

/// A request through a standby's pair is forwarded: that proxy counts one more
/// `vha_proxy_requests_total{route="forward",class="2xx"}` and one more forward-latency
/// observation, and the active node handles it (`vault_core_handle_request`). The same
/// request with `X-Vault-No-Request-Forwarding` is a 307 counted as a redirect by reason
/// `header`; a request through the active's pair is `local`. Labels stay bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_redirect_and_local_move_metrics() {
    let c = TestCluster::builder()
        .nodes(3)
        .proxies()
        .template(template())
        .start()
        .await;
    let a = c.wait_one_active(BOUND).await;
    let s = (a + 1) % 3;
    let token = c.root_token().to_string();
    let fwd = [("route", "forward"), ("class", "2xx")];

    let p0 = c.proxies[s].metrics().await;
    let n0 = node_metrics(&c, a).await;
    let (st, body) = c.nodes[s].request("GET", "sys/mounts", Some(&token), None).await;
    assert_eq!(st, StatusCode::OK, "forwarded read: {body}");
    let p1 = c.proxies[s].metrics_after(&p0, 1).await;
    let n1 = node_metrics(&c, a).await;
    assert_eq!(
        series_value(&p1, "vha_proxy_requests_total", &fwd) - series_value(&p0, "vha_proxy_requests_total", &fwd),
        1.0
    );
    assert_eq!(
        v(&p1, "vha_proxy_forward_duration_seconds_count") - v(&p0, "vha_proxy_forward_duration_seconds_count"),
        1.0
    );
    // Vault's name for the same observation, exported by the forwarding proxy.
    assert_eq!(
        v(&p1, "vault_ha_rpc_client_forward_count") - v(&p0, "vault_ha_rpc_client_forward_count"),
        1.0
    );
    assert!(
        v(&n1, "vault_core_handle_request_count") > v(&n0, "vault_core_handle_request_count"),
        "active handled it"
    );

    let (st, hdrs, _) = c.nodes[s]
        .request_full(
            "GET",
            "sys/mounts",
            Some(&token),
            None,
            &[("X-Vault-No-Request-Forwarding", "true")],
        )
        .await;
    assert_eq!(st, StatusCode::TEMPORARY_REDIRECT);
    assert!(hdrs.contains_key("location"));
    let p2 = c.proxies[s].metrics_after(&p1, 1).await;
    let hdr = [("reason", "header")];
    assert_eq!(
        series_value(&p2, "vha_proxy_redirects_total", &hdr) - series_value(&p1, "vha_proxy_redirects_total", &hdr),
        1.0
    );
    let red = [("route", "redirect"), ("class", "3xx")];
    assert_eq!(
        series_value(&p2, "vha_proxy_requests_total", &red) - series_value(&p1, "vha_proxy_requests_total", &red),
        1.0
    );

    let l0 = c.proxies[a].metrics().await;
    let (st, _) = c.nodes[a].request("GET", "sys/mounts", Some(&token), None).await;
    assert_eq!(st, StatusCode::OK);
    let l1 = c.proxies[a].metrics_after(&l0, 1).await;
    let loc = [("route", "local"), ("class", "2xx")];
    assert_eq!(
        series_value(&l1, "vha_proxy_requests_total", &loc) - series_value(&l0, "vha_proxy_requests_total", &loc),
        1.0
    );

    for i in 0..3 {
        assert_bounded_labels(&format!("proxy {i}"), &c.proxies[i].metrics().await, &token);
        assert_bounded_labels(&format!("node {i}"), &node_metrics(&c, i).await, &token);
    }
    assert_bounded_labels("lockd", &lockd_metrics(&c).await, &token);
}

/// kill -9 of the active node, then a request through a standby's pair: the forward to the
/// dead active fails (`vha_proxy_forward_errors_total{kind="unreachable"}`), the request is
/// held until a new active is advertised (`vha_proxy_holds_total{outcome="resolved"}`) and
/// answered 200. The dead node's own proxy releases its lock early (lockd counts a
/// `release`), and the new active's `vault_core_active` is 1 with a larger `vha_node_term`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_and_failover_move_metrics() {
    let mut c = TestCluster::builder()
        .nodes(3)
        .lock_ttl("2s")
        .proxies()
        .template(template())
        .start()
        .await;
    let a = c.wait_one_active(BOUND).await;
    let s = (a + 1) % 3;
    let token = c.root_token().to_string();
    let old_term = v(&node_metrics(&c, a).await, "vha_node_term");
    assert!(old_term > 0.0, "the active reports its term");
    let p0 = c.proxies[s].metrics().await;
    let l0 = lockd_metrics(&c).await;

    c.nodes[a].kill();
    let (st, body) = c.nodes[s].request("GET", "sys/mounts", Some(&token), None).await;
    assert_eq!(
        st,
        StatusCode::OK,
        "held request answered once a new active is known: {body}"
    );
    let p1 = c.proxies[s].metrics_after(&p0, 1).await;
    let unreachable = [("kind", "unreachable")];
    assert!(
        series_value(&p1, "vha_proxy_forward_errors_total", &unreachable)
            > series_value(&p0, "vha_proxy_forward_errors_total", &unreachable),
        "forward error counted:\n{p1}"
    );
    let resolved = [("outcome", "resolved")];
    assert!(
        series_value(&p1, "vha_proxy_holds_total", &resolved) > series_value(&p0, "vha_proxy_holds_total", &resolved),
        "hold counted:\n{p1}"
    );

    let n = c.wait_new_active(a, BOUND).await;
    let m = wait_node(&c, n, "new active reports active", |t| v(t, "vault_core_active") == 1.0).await;
    assert!(
        v(&m, "vha_node_term") > old_term,
        "term grows: {} -> {}",
        old_term,
        v(&m, "vha_node_term")
    );
    assert!(v(&m, "vha_node_lock_acquire_seconds_count") >= 1.0);
    let release = [("op", "release"), ("outcome", "ok")];
    let l1 = lockd_metrics(&c).await;
    assert!(
        series_value(&l1, "vha_lockd_ops_total", &release) > series_value(&l0, "vha_lockd_ops_total", &release),
        "early release counted by lockd"
    );
}

/// kill -9 of the active node without a proxy: nobody releases its lock, so lockd ends the
/// lease by TTL (`vha_lockd_lease_expiries_total` + 1, `vha_lockd_active_leases` back to 1
/// once the next node holds it), and the new active reports `vault_core_active` 1, a larger
/// `vha_node_term` and one lock acquisition.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_expiry_on_kill_without_proxy() {
    let mut c = TestCluster::builder()
        .nodes(3)
        .lock_ttl("2s")
        .template(template())
        .start()
        .await;
    let a = c.wait_one_active(BOUND).await;
    let old_term = v(&node_metrics(&c, a).await, "vha_node_term");
    let l0 = lockd_metrics(&c).await;
    assert_eq!(v(&l0, "vha_lockd_active_leases"), 1.0, "{l0}");
    c.nodes[a].kill();
    let n = c.wait_new_active(a, BOUND).await;
    let m = wait_node(&c, n, "new active reports active", |t| v(t, "vault_core_active") == 1.0).await;
    assert!(v(&m, "vha_node_term") > old_term);
    assert_eq!(v(&m, "vha_node_lock_acquire_seconds_count"), 1.0);
    let l1 = lockd_metrics(&c).await;
    assert_eq!(
        v(&l1, "vha_lockd_lease_expiries_total"),
        v(&l0, "vha_lockd_lease_expiries_total") + 1.0,
        "{l1}"
    );
    assert_eq!(v(&l1, "vha_lockd_active_leases"), 1.0);
}

/// `sys/step-down` on the active: its `vault_core_step_down` histogram counts one, its
/// `vault_core_active` and `vha_node_term` drop to 0, and `vault_core_leadership_lost` does
/// not move (a step-down is not a loss); another node becomes active with a larger term.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_down_moves_metrics() {
    let c = TestCluster::builder().nodes(3).template(template()).start().await;
    let a = c.wait_one_active(BOUND).await;
    let m0 = node_metrics(&c, a).await;
    assert_eq!(v(&m0, "vault_core_active"), 1.0);
    assert_eq!(v(&m0, "vault_core_unsealed"), 1.0);
    let term = v(&m0, "vha_node_term");
    let (st, body) = c.nodes[a]
        .request("PUT", "sys/step-down", Some(c.root_token()), None)
        .await;
    assert!(st.is_success(), "step-down: {st} {body}");
    let m1 = wait_node(&c, a, "step-down observed", |t| {
        v(t, "vault_core_step_down_count") > v(&m0, "vault_core_step_down_count")
    })
    .await;
    assert_eq!(v(&m1, "vault_core_active"), 0.0);
    assert_eq!(v(&m1, "vha_node_term"), 0.0);
    assert_eq!(
        v(&m1, "vault_core_leadership_lost_count"),
        v(&m0, "vault_core_leadership_lost_count")
    );
    let n = c.wait_new_active(a, BOUND).await;
    let mn = wait_node(&c, n, "new active", |t| v(t, "vault_core_active") == 1.0).await;
    assert!(v(&mn, "vha_node_term") > term);
}

/// The active node cut from its store (fault relay blackholed) loses its lease: its
/// `vault_core_leadership_lost` histogram counts one term, `vault_core_active` and
/// `vha_node_term` drop to 0, and the step-down histogram does not move.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leadership_lost_moves_metrics() {
    let c = TestCluster::builder()
        .nodes(3)
        .lock_ttl("3s")
        .relay_store()
        .template(template())
        .start()
        .await;
    let a = c.wait_one_active(BOUND).await;
    let m0 = node_metrics(&c, a).await;
    assert_eq!(v(&m0, "vault_core_active"), 1.0);
    c.store_relays[a].set(Fault::Blackhole);
    let m1 = wait_node(&c, a, "leadership lost observed", |t| {
        v(t, "vault_core_leadership_lost_count") > v(&m0, "vault_core_leadership_lost_count")
    })
    .await;
    assert_eq!(v(&m1, "vault_core_active"), 0.0);
    assert_eq!(v(&m1, "vha_node_term"), 0.0);
    assert!(v(&m1, "vault_core_leadership_lost_sum") > 0.0, "term length recorded");
    assert_eq!(
        v(&m1, "vault_core_step_down_count"),
        v(&m0, "vault_core_step_down_count")
    );
    c.wait_new_active(a, BOUND).await;
    c.store_relays[a].heal();
}

/// Without `telemetry { unauthenticated_metrics_access = true }` the endpoint wants a token
/// (as in Vault); with the root token it serves the Prometheus text. With the option it is
/// token-less.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_endpoint_token_rules() {
    let c = TestCluster::builder().nodes(1).start().await;
    let url = format!("{}/v1/sys/metrics?format=prometheus", c.nodes[0].node_addr);
    let (st, _) = get_text(&url, None).await;
    assert!(st.is_client_error(), "no token, no telemetry option: {st}");
    let (st, body) = get_text(&url, Some(c.root_token())).await;
    assert_eq!(st, StatusCode::OK);
    assert_eq!(v(&body, "vault_core_unsealed"), 1.0, "{body}");
    assert_eq!(v(&body, "vault_core_active"), 1.0);

    let open = TestCluster::builder().nodes(1).template(template()).start().await;
    let (st, body) = get_text(
        &format!("{}/v1/sys/metrics?format=prometheus", open.nodes[0].node_addr),
        None,
    )
    .await;
    assert_eq!(st, StatusCode::OK, "{body}");
    assert!(body.contains("# TYPE vault_core_handle_request histogram"), "{body}");
}

/// Proxy `i`'s metrics once they satisfy `pred`.
/// Waits until proxy `i` uses the advertisement of `term`, and checks that its age is
/// within the time elapsed since `since` (it was accepted after that). Returns the scrape.
async fn wait_advertisement(c: &TestCluster, i: usize, term: f64, since: std::time::Instant) -> String {
    let m = wait_proxy(c, i, "proxy uses the advertisement of the term", |m| {
        v(m, "vha_proxy_advertisement_term") == term
    })
    .await;
    let age = v(&m, "vha_proxy_advertisement_age_seconds");
    assert!(
        (0.0..=since.elapsed().as_secs_f64()).contains(&age),
        "proxy {i}: advertisement age {age} not within {:?}:\n{m}",
        since.elapsed()
    );
    m
}

async fn wait_proxy(c: &TestCluster, i: usize, why: &str, pred: impl Fn(&str) -> bool) -> String {
    wait_until_async(
        || async {
            let m = c.proxies[i].metrics().await;
            (!m.is_empty() && pred(&m)).then_some(m)
        },
        why,
        BOUND,
    )
    .await
}

/// The sum over every label set of `name` (0 if absent).
fn total(text: &str, name: &str) -> f64 {
    series_value(text, name, &[])
}

/// Each proxy metric moves when its event happens, on two proxy + node pairs.
/// - a forward through the standby's pair: `vha_proxy_requests_total{route="forward"}`, the
///   forward-latency count and `vha_proxy_upstream_connections_total{upstream="active"}`
///   grow by one, and an upstream connection to the active is open
///   (`vha_proxy_upstream_open_connections{upstream="active"}`); the second forward reuses a
///   pooled connection. A request through the active's pair counts a local connection, and
///   later ones reuse pooled connections to the node.
/// - `X-Vault-No-Request-Forwarding`: a redirect by reason `header`.
/// - every proxy reports the advertisement in use: `vha_proxy_advertisement_term` equal to
///   the active's `vha_node_term` (its fencing token), `vha_proxy_advertisement_age_seconds`
///   between 0 and the test's age.
/// - kill -9 of the active's proxy and node (so its lock lasts until the TTL), then a request
///   through the standby's pair: `vha_proxy_forward_errors_total{kind="unreachable"}` grows,
///   the request is held until its own node takes over (`holds_total{outcome="resolved"}`
///   and one `vha_proxy_hold_seconds` observation with a positive sum), the connections to
///   the dead active are no longer counted open, and the term grows to the new active's
///   with a fresh age.
/// - `vha_proxy_local_role` has one series at 1, the role its node last reported: standby
///   for a restarted standby, active for the new active, restarting for a node restarted
///   and still sealed (its proxy keeps the keyring it had), down after kill -9 of its node.
/// - a proxy whose node is down while no node holds the lock knows no active: a request
///   through it is held (`vha_proxy_holding` 1) until a node is unsealed and takes the lock,
///   then forwarded: `holds_total{outcome="resolved"}` + 1, `hold_seconds` count + 1, sum
///   grows by the time held, `vha_proxy_holding` back to 0, term grows again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_metrics_move_with_their_events() {
    let began = std::time::Instant::now();
    let mut c = TestCluster::builder()
        .nodes(2)
        .lock_ttl("3s")
        .proxies()
        .template(template())
        .start()
        .await;
    let a = c.wait_one_active(BOUND).await;
    let s = 1 - a;
    let token = c.root_token().to_string();

    // The advertisement in use: the active's term, accepted within the test's lifetime.
    let term1 = v(
        &wait_node(&c, a, "active reports its term", |t| v(t, "vha_node_term") > 0.0).await,
        "vha_node_term",
    );
    for i in [a, s] {
        let m = wait_advertisement(&c, i, term1, began).await;
        assert_eq!(v(&m, "vha_proxy_holding"), 0.0);
    }

    // Forward: requests, latency, a new then a reused upstream connection to the active.
    let fwd = [("route", "forward"), ("class", "2xx")];
    let active_up = [("upstream", "active")];
    let p0 = c.proxies[s].metrics().await;
    let (st, body) = c.nodes[s].request("GET", "sys/mounts", Some(&token), None).await;
    assert_eq!(st, StatusCode::OK, "forwarded read: {body}");
    let p1 = c.proxies[s].metrics_after(&p0, 1).await;
    assert_eq!(
        series_value(&p1, "vha_proxy_requests_total", &fwd) - series_value(&p0, "vha_proxy_requests_total", &fwd),
        1.0
    );
    assert_eq!(
        v(&p1, "vha_proxy_forward_duration_seconds_count") - v(&p0, "vha_proxy_forward_duration_seconds_count"),
        1.0
    );
    assert_eq!(
        series_value(&p1, "vha_proxy_upstream_connections_total", &active_up)
            - series_value(&p0, "vha_proxy_upstream_connections_total", &active_up),
        1.0,
        "one request sent to the active:\n{p1}"
    );
    assert!(
        series_value(&p1, "vha_proxy_upstream_open_connections", &active_up) >= 1.0,
        "the forward's connection is open (pooled):\n{p1}"
    );
    let (st, _) = c.nodes[s].request("GET", "sys/mounts", Some(&token), None).await;
    assert_eq!(st, StatusCode::OK);
    let p2 = c.proxies[s].metrics_after(&p1, 1).await;
    let reused = [("reused", "true"), ("upstream", "active")];
    assert!(
        series_value(&p2, "vha_proxy_upstream_connections_total", &reused)
            > series_value(&p1, "vha_proxy_upstream_connections_total", &reused),
        "the second forward reuses a pooled connection:\n{p2}"
    );

    // Local: the active's pair sends to its node over the pair's socket.
    let local_up = [("upstream", "local")];
    let l0 = c.proxies[a].metrics().await;
    let (st, _) = c.nodes[a].request("GET", "sys/mounts", Some(&token), None).await;
    assert_eq!(st, StatusCode::OK);
    let l1 = c.proxies[a].metrics_after(&l0, 1).await;
    assert_eq!(
        series_value(&l1, "vha_proxy_upstream_connections_total", &local_up)
            - series_value(&l0, "vha_proxy_upstream_connections_total", &local_up),
        1.0,
        "{l1}"
    );
    assert!(
        series_value(&l1, "vha_proxy_upstream_open_connections", &local_up) >= 1.0,
        "{l1}"
    );
    // The pair socket's connections are pooled: of ten more requests through the active's
    // pair, at most one opens a new connection to the node (a pooled one may have gone idle).
    let local_new = [("reused", "false"), ("upstream", "local")];
    for _ in 0..10 {
        let (st, _) = c.nodes[a].request("GET", "sys/mounts", Some(&token), None).await;
        assert_eq!(st, StatusCode::OK);
    }
    let l2 = c.proxies[a].metrics_after(&l1, 10).await;
    assert!(
        series_value(&l2, "vha_proxy_upstream_connections_total", &local_new)
            - series_value(&l1, "vha_proxy_upstream_connections_total", &local_new)
            <= 1.0,
        "the active's proxy opened a new node connection per request: {l2}"
    );

    // Redirect.
    let (st, _, _) = c.nodes[s]
        .request_full(
            "GET",
            "sys/mounts",
            Some(&token),
            None,
            &[("X-Vault-No-Request-Forwarding", "true")],
        )
        .await;
    assert_eq!(st, StatusCode::TEMPORARY_REDIRECT);
    let p3 = c.proxies[s].metrics_after(&p2, 1).await;
    let hdr = [("reason", "header")];
    assert_eq!(
        series_value(&p3, "vha_proxy_redirects_total", &hdr) - series_value(&p2, "vha_proxy_redirects_total", &hdr),
        1.0
    );

    // Forward error and a hold after it: the active's proxy and node die by kill -9, so
    // nobody releases the lock and the standby's proxy still forwards to the dead active
    // until the lease ends.
    let unreachable = [("kind", "unreachable")];
    let resolved = [("outcome", "resolved")];
    c.proxies[a].kill();
    c.nodes[a].kill();
    let killed = std::time::Instant::now();
    let (st, body) = c.nodes[s].request("GET", "sys/mounts", Some(&token), None).await;
    assert_eq!(
        st,
        StatusCode::OK,
        "held request answered once the standby takes over: {body}"
    );
    let p4 = c.proxies[s].metrics_after(&p3, 1).await;
    assert!(
        series_value(&p4, "vha_proxy_forward_errors_total", &unreachable)
            > series_value(&p3, "vha_proxy_forward_errors_total", &unreachable),
        "forward error counted:\n{p4}"
    );
    assert!(
        series_value(&p4, "vha_proxy_holds_total", &resolved) > series_value(&p3, "vha_proxy_holds_total", &resolved),
        "hold counted:\n{p4}"
    );
    let holds = total(&p4, "vha_proxy_holds_total") - total(&p3, "vha_proxy_holds_total");
    assert!(holds >= 1.0);
    assert_eq!(
        v(&p4, "vha_proxy_hold_seconds_count") - v(&p3, "vha_proxy_hold_seconds_count"),
        holds,
        "one hold_seconds observation per hold:\n{p4}"
    );
    assert!(v(&p4, "vha_proxy_hold_seconds_sum") > v(&p3, "vha_proxy_hold_seconds_sum"));
    assert_eq!(v(&p4, "vha_proxy_holding"), 0.0);

    // The new term: the standby is active now; its proxy uses its advertisement.
    let n = c.wait_new_active(a, BOUND).await;
    assert_eq!(n, s);
    let term2 = v(
        &wait_node(&c, s, "new active reports its term", |t| v(t, "vha_node_term") > term1).await,
        "vha_node_term",
    );
    wait_advertisement(&c, s, term2, killed).await;
    wait_proxy(&c, s, "connections to the dead active no longer open", |m| {
        series_value(m, "vha_proxy_upstream_open_connections", &active_up) == 0.0
    })
    .await;

    // A hold while no active is known: node a back as a standby (its proxy learns the
    // keyring and the advertisement), then node a down and the active restarted sealed: no
    // node can take the lock, and proxy a (its node down) knows no active.
    c.nodes[a].restart().await;
    c.proxies[a].restart();
    c.unseal(a).await;
    let role = |m: &str, r: &str| series_value(m, "vha_proxy_local_role", &[("role", r)]);
    wait_proxy(
        &c,
        a,
        "proxy a uses the current advertisement, its node a standby",
        |m| {
            v(m, "vha_proxy_advertisement_term") == term2
                && v(m, "vha_proxy_active_known") == 1.0
                && role(m, "standby") == 1.0
        },
    )
    .await;
    assert_eq!(
        role(&c.proxies[s].metrics().await, "active"),
        1.0,
        "proxy s: its node is active"
    );
    c.nodes[a].kill();
    c.nodes[s].restart().await;
    wait_proxy(&c, s, "proxy s sees its node restarted, still sealed", |m| {
        role(m, "restarting") == 1.0 && role(m, "sealed") == 0.0
    })
    .await;
    let q0 = wait_proxy(&c, a, "proxy a knows no active, its node down", |m| {
        v(m, "vha_proxy_active_known") == 0.0 && role(m, "down") == 1.0
    })
    .await;
    assert_eq!(
        ["sealed", "restarting", "standby", "active", "disabled"].map(|r| role(&q0, r)),
        [0.0; 5],
        "one role at a time:\n{q0}"
    );
    assert_eq!(
        v(&q0, "vha_proxy_advertisement_term"),
        0.0,
        "no advertisement in use:\n{q0}"
    );
    assert!(
        !q0.contains("\nvha_proxy_advertisement_age_seconds "),
        "no age without an advertisement:\n{q0}"
    );
    let url = format!("{}/v1/sys/mounts", c.nodes[a].addr);
    let held = tokio::spawn({
        let token = token.clone();
        async move {
            let r = reqwest::Client::new()
                .get(url)
                .header("X-Vault-Token", token)
                .timeout(Duration::from_secs(30))
                .send()
                .await
                .expect("held request");
            (r.status(), r.text().await.unwrap_or_default())
        }
    });
    wait_proxy(&c, a, "the request is held", |m| v(m, "vha_proxy_holding") == 1.0).await;
    c.unseal(s).await;
    let (st, body) = held.await.expect("join");
    assert_eq!(st, StatusCode::OK, "held request forwarded to the new active: {body}");
    let q1 = c.proxies[a].metrics_after(&q0, 1).await;
    assert_eq!(
        series_value(&q1, "vha_proxy_holds_total", &resolved) - series_value(&q0, "vha_proxy_holds_total", &resolved),
        1.0,
        "{q1}"
    );
    assert_eq!(
        v(&q1, "vha_proxy_hold_seconds_count") - v(&q0, "vha_proxy_hold_seconds_count"),
        1.0
    );
    assert!(
        v(&q1, "vha_proxy_hold_seconds_sum") > v(&q0, "vha_proxy_hold_seconds_sum"),
        "time held recorded:\n{q1}"
    );
    assert_eq!(v(&q1, "vha_proxy_holding"), 0.0);
    assert_eq!(
        series_value(&q1, "vha_proxy_requests_total", &fwd) - series_value(&q0, "vha_proxy_requests_total", &fwd),
        1.0
    );
    let term3 = v(&q1, "vha_proxy_advertisement_term");
    assert!(
        term3 > term2,
        "term grows after the new acquisition: {term2} -> {term3}"
    );
    assert_eq!(term3, v(&node_metrics(&c, s).await, "vha_node_term"));
    assert_bounded_labels("proxy a", &q1, &token);
}

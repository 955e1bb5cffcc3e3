//! Prometheus metrics of the proxy (`vha_proxy_*`), served as text on
//! `proxy.metrics_address`: requests by route decision and status class, forward latency,
//! forward errors by kind, redirects by reason, holds by outcome and how long each held
//! request waited, requests held right now, the advertisement in use (term and age),
//! upstream connections (established or reused, and open now), rejected advertisements
//! whether an active node is known, and the role the local node last reported.
//!
//! Values that are a function of time or of the process's file descriptors (advertisement
//! age, open upstream connections) are computed when scraped ([`ScrapeTime`]), not by a
//! ticking task.
//!
//! Pingora's connection pool exposes no statistics, so the proxy observes its upstream
//! connections from the outside: Pingora calls `connected_to_upstream` with `reused` and the
//! connection's file descriptor for every request sent upstream, which gives
//! `vha_proxy_upstream_connections_total{reused,upstream}`; a connection seen new is
//! remembered by (fd, socket inode), and at scrape time those whose fd still names the same
//! socket are counted in `vha_proxy_upstream_open_connections{upstream}` (idle in the pool
//! or in use; Linux `/proc/self/fd`).
//!
//! Why our own listener and not Pingora's Prometheus service: in Pingora 0.9 that service
//! lives in the separate `pingora-prometheus` crate (not in our dependency graph) and serves
//! only the process-global default registry, whereas [`Metrics`] owns its registry (several
//! can coexist, e.g. in unit tests). It would also run inside the Pingora server, so metrics
//! would only answer once the proxy service is up and would share its worker threads; this
//! listener runs on the controller's small runtime and answers even while the proxy is
//! saturated.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use vha_core::pair::PairRole;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus::core::{Collector, Desc};
use prometheus::proto::MetricFamily;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

use crate::route::LocalRole;

/// Every role, one `vha_proxy_local_role` series each (bounded).
const LOCAL_ROLES: [LocalRole; 6] = [
    LocalRole::Down,
    LocalRole::Sealed,
    LocalRole::Restarting,
    LocalRole::Standby,
    LocalRole::Active,
    LocalRole::Disabled,
];

fn role_label(role: LocalRole) -> &'static str {
    match role {
        LocalRole::Down => "down",
        LocalRole::Sealed => PairRole::Sealed.as_str(),
        LocalRole::Restarting => "restarting",
        LocalRole::Standby => PairRole::Standby.as_str(),
        LocalRole::Active => PairRole::Active.as_str(),
        LocalRole::Disabled => PairRole::Disabled.as_str(),
    }
}

/// The proxy's metric handles (cheap to clone).
#[derive(Clone)]
pub(crate) struct Metrics {
    pub registry: Registry,
    /// `route` = local | forward | redirect | sealed | unavailable | rejected; `class` = 2xx..5xx.
    pub requests: IntCounterVec,
    pub forward_latency: Histogram,
    /// `kind` = tls | unreachable | not_active | broken.
    pub forward_errors: IntCounterVec,
    /// `reason` = header | disable_clustering | tls_fallback | hold_bound.
    pub redirects: IntCounterVec,
    /// `outcome` = resolved | no_active | same_active | sealed.
    pub holds: IntCounterVec,
    /// Seconds each held request waited (observed when its hold ends, any outcome).
    pub hold_seconds: Histogram,
    /// Requests held right now.
    pub holding: IntGauge,
    /// `reused` = true | false; `upstream` = local | active.
    pub upstream_connections: IntCounterVec,
    pub advert_rejected: IntCounter,
    pub active_known: IntGauge,
    /// 1 on the `role` the local node last reported (down | sealed | standby | active |
    /// disabled), 0 on the others: which pair a proxy treats as the active one.
    pub local_role: IntGaugeVec,
    /// Vault's names for the same forwarding observations (in Vault the standby node
    /// forwards; in vha its proxy does, so the proxy exports them).
    pub vault_forward: Histogram,
    pub vault_forward_errors: IntCounter,
    /// `outcome` = success | failure: SIGHUP reloads of the configuration.
    pub config_reloads: IntCounterVec,
    /// notAfter (Unix seconds) of each certificate served, by `listener` (= client).
    pub tls_expiry: IntGaugeVec,
    scrape: ScrapeTime,
}

/// The advertisement in use, as the scrape-time gauges report it.
#[derive(Clone, Copy, Debug)]
struct InUse {
    term: u64,
    accepted: Instant,
}

/// Gauges computed when scraped: the advertisement's term and age, and the upstream
/// connections still open.
#[derive(Clone)]
pub(crate) struct ScrapeTime {
    advert: Arc<Mutex<Option<InUse>>>,
    /// fd -> (socket inode, upstream label) of upstream connections seen established.
    conns: Arc<Mutex<HashMap<i32, (u64, &'static str)>>>,
    term: IntGauge,
    age: Gauge,
    open: IntGaugeVec,
}

impl ScrapeTime {
    fn new() -> ScrapeTime {
        ScrapeTime {
            advert: Arc::default(),
            conns: Arc::default(),
            term: IntGauge::new(
                "vha_proxy_advertisement_term",
                "Term (fencing token of the lock holder) of the active node advertisement in use; 0 when none",
            )
            .expect("metric"),
            age: Gauge::new(
                "vha_proxy_advertisement_age_seconds",
                "Seconds since this proxy accepted the advertisement in use (absent when none is in use)",
            )
            .expect("metric"),
            open: IntGaugeVec::new(
                Opts::new(
                    "vha_proxy_upstream_open_connections",
                    "Upstream connections this proxy established that are still open (pooled or in use)",
                ),
                &["upstream"],
            )
            .expect("metric"),
        }
    }

    /// Counts the remembered connections whose fd still names the same socket, forgetting
    /// the others.
    fn open_counts(&self) -> [(&'static str, i64); 2] {
        let mut conns = self.conns.lock().unwrap_or_else(|e| e.into_inner());
        conns.retain(|fd, (inode, _)| socket_inode(*fd) == Some(*inode));
        let mut out = [("local", 0), ("active", 0)];
        for (_, up) in conns.values() {
            if let Some(slot) = out.iter_mut().find(|(l, _)| l == up) {
                slot.1 += 1;
            }
        }
        out
    }
}

impl Collector for ScrapeTime {
    fn desc(&self) -> Vec<&Desc> {
        let mut d = self.term.desc();
        d.extend(self.age.desc());
        d.extend(self.open.desc());
        d
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let in_use = *self.advert.lock().unwrap_or_else(|e| e.into_inner());
        self.term
            .set(in_use.map(|a| i64::try_from(a.term).unwrap_or(i64::MAX)).unwrap_or(0));
        let mut out = self.term.collect();
        if let Some(a) = in_use {
            self.age.set(a.accepted.elapsed().as_secs_f64());
            out.extend(self.age.collect());
        }
        for (up, n) in self.open_counts() {
            self.open.with_label_values(&[up]).set(n);
        }
        out.extend(self.open.collect());
        out
    }
}

/// The inode of the socket `fd` names in this process, if it names a socket.
fn socket_inode(fd: i32) -> Option<u64> {
    let link = std::fs::read_link(format!("/proc/self/fd/{fd}")).ok()?;
    let s = link.to_str()?;
    s.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
}

/// A hold in progress: counted in `vha_proxy_holding` until dropped; [`Hold::end`] records
/// its outcome and how long it waited.
pub(crate) struct Hold {
    metrics: Metrics,
    started: Instant,
}

impl Hold {
    /// The hold ended with `outcome` (resolved | no_active | same_active | sealed).
    pub(crate) fn end(self, outcome: &str) {
        self.metrics.holds.with_label_values(&[outcome]).inc();
        self.metrics.hold_seconds.observe(self.started.elapsed().as_secs_f64());
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        self.metrics.holding.dec();
    }
}

impl Metrics {
    pub(crate) fn new() -> Metrics {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "vha_proxy_requests_total",
                "Requests by route decision and status class",
            ),
            &["route", "class"],
        )
        .expect("metric");
        let forward_latency = Histogram::with_opts(
            HistogramOpts::new(
                "vha_proxy_forward_duration_seconds",
                "Latency of requests forwarded to the active node",
            )
            .buckets(forward_latency_buckets()),
        )
        .expect("metric");
        let forward_errors = IntCounterVec::new(
            Opts::new("vha_proxy_forward_errors_total", "Forward failures by kind"),
            &["kind"],
        )
        .expect("metric");
        let redirects = IntCounterVec::new(
            Opts::new("vha_proxy_redirects_total", "307 redirects by reason"),
            &["reason"],
        )
        .expect("metric");
        let holds = IntCounterVec::new(
            Opts::new(
                "vha_proxy_holds_total",
                "Requests held waiting for an active node, by outcome",
            ),
            &["outcome"],
        )
        .expect("metric");
        let hold_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "vha_proxy_hold_seconds",
                "Seconds each held request waited for an active node (any outcome)",
            )
            .buckets(hold_buckets()),
        )
        .expect("metric");
        let holding = IntGauge::new(
            "vha_proxy_holding",
            "Requests held right now waiting for an active node",
        )
        .expect("metric");
        let upstream_connections = IntCounterVec::new(
            Opts::new(
                "vha_proxy_upstream_connections_total",
                "Requests sent upstream, by whether their connection was reused from the pool and by upstream",
            ),
            &["reused", "upstream"],
        )
        .expect("metric");
        let advert_rejected = IntCounter::new(
            "vha_proxy_advertisement_rejected_total",
            "Advertisements ignored because they did not authenticate or were unusable",
        )
        .expect("metric");
        let active_known =
            IntGauge::new("vha_proxy_active_known", "1 when an authenticated active node is known").expect("metric");
        let local_role = IntGaugeVec::new(
            Opts::new(
                "vha_proxy_local_role",
                "1 on the role the local node last reported to this proxy (down, sealed, standby, active, disabled)",
            ),
            &["role"],
        )
        .expect("metric");
        let vault_forward = Histogram::with_opts(
            HistogramOpts::new(
                "vault_ha_rpc_client_forward",
                "Time (seconds) of requests forwarded by this standby to the active (Vault's name)",
            )
            .buckets(forward_latency_buckets()),
        )
        .expect("metric");
        let vault_forward_errors = IntCounter::new(
            "vault_ha_rpc_client_forward_errors",
            "Requests this standby failed to forward to the active (Vault's name)",
        )
        .expect("metric");
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "vha_config_reloads_total",
                "Configuration reloads (SIGHUP) by outcome (success, failure)",
            ),
            &["outcome"],
        )
        .expect("metric");
        let tls_expiry = IntGaugeVec::new(
            Opts::new(
                "vha_tls_certificate_expiry_seconds",
                "When the certificate served on a listener expires (its notAfter, Unix seconds)",
            ),
            &["listener"],
        )
        .expect("metric");
        let scrape = ScrapeTime::new();
        for c in [
            Box::new(config_reloads.clone()) as Box<dyn Collector>,
            Box::new(tls_expiry.clone()),
            Box::new(vault_forward.clone()),
            Box::new(vault_forward_errors.clone()),
            Box::new(requests.clone()),
            Box::new(forward_latency.clone()),
            Box::new(forward_errors.clone()),
            Box::new(redirects.clone()),
            Box::new(holds.clone()),
            Box::new(hold_seconds.clone()),
            Box::new(holding.clone()),
            Box::new(upstream_connections.clone()),
            Box::new(advert_rejected.clone()),
            Box::new(active_known.clone()),
            Box::new(local_role.clone()),
            Box::new(scrape.clone()),
        ] {
            registry.register(c).expect("register metric");
        }
        let m = Metrics {
            registry,
            requests,
            forward_latency,
            forward_errors,
            redirects,
            holds,
            hold_seconds,
            holding,
            upstream_connections,
            advert_rejected,
            active_known,
            local_role,
            vault_forward,
            vault_forward_errors,
            config_reloads,
            tls_expiry,
            scrape,
        };
        // Nothing heard from the local node yet.
        m.set_local_role(LocalRole::Down);
        // Every series with a known label exists at 0 from the start, so a dashboard shows 0
        // rather than "No data" and a rate or an alert works before the first event.
        for outcome in ["success", "failure"] {
            m.config_reloads.with_label_values(&[outcome]);
        }
        for kind in FORWARD_ERROR_KINDS {
            m.forward_errors.with_label_values(&[kind]);
        }
        for reason in crate::route::RedirectReason::ALL {
            m.redirects.with_label_values(&[reason.label()]);
        }
        for outcome in crate::route::Step::HOLD_OUTCOMES {
            m.holds.with_label_values(&[outcome]);
        }
        m
    }

    /// A forwarded request finished after `secs`.
    pub(crate) fn observe_forward(&self, secs: f64) {
        self.forward_latency.observe(secs);
        self.vault_forward.observe(secs);
    }

    /// A forward failed (`kind`: one of [`FORWARD_ERROR_KINDS`]).
    pub(crate) fn forward_error(&self, kind: &'static str) {
        debug_assert!(FORWARD_ERROR_KINDS.contains(&kind), "unknown forward error kind {kind}");
        self.forward_errors.with_label_values(&[kind]).inc();
        self.vault_forward_errors.inc();
    }

    pub(crate) fn set_active_known(&self, known: bool) {
        self.active_known.set(i64::from(known));
    }

    /// The local node's role as the route decision now sees it.
    pub(crate) fn set_local_role(&self, role: LocalRole) {
        for r in LOCAL_ROLES {
            self.local_role
                .with_label_values(&[role_label(r)])
                .set(i64::from(r == role));
        }
    }

    /// A request starts waiting for an active node.
    pub(crate) fn hold_started(&self) -> Hold {
        self.holding.inc();
        Hold {
            metrics: self.clone(),
            started: Instant::now(),
        }
    }

    /// The advertisement now in use: its term (fencing token) and when it was accepted;
    /// `None` when no active node is known.
    pub(crate) fn set_advertisement(&self, in_use: Option<(u64, Instant)>) {
        *self.scrape.advert.lock().unwrap_or_else(|e| e.into_inner()) =
            in_use.map(|(term, accepted)| InUse { term, accepted });
    }

    /// A request is about to be sent on an upstream connection (`upstream`: local |
    /// active); `fd` is the connection's file descriptor, remembered when it is new.
    pub(crate) fn upstream_connection(&self, upstream: &'static str, reused: bool, fd: i32) {
        self.upstream_connections
            .with_label_values(&[if reused { "true" } else { "false" }, upstream])
            .inc();
        if !reused {
            if let Some(inode) = socket_inode(fd) {
                self.scrape
                    .conns
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(fd, (inode, upstream));
            }
        }
    }

    /// The text exposition.
    pub(crate) fn render(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Forward latency buckets (seconds): 0.5 ms .. 10 s, sub-millisecond loopback hops to
/// multi-second waits behind a failover.
fn forward_latency_buckets() -> Vec<f64> {
    vec![
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
    ]
}

/// Hold time buckets (seconds): an advertisement change seen within milliseconds up to the
/// default 10 s hold bound and beyond (a configured `hold_timeout` may be longer).
fn hold_buckets() -> Vec<f64> {
    vec![
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ]
}

/// The `kind` labels of `vha_proxy_forward_errors_total`: the TLS handshake with the active
/// failed, it could not be reached, it answered that it is not active, or the connection
/// broke mid-request.
pub(crate) const FORWARD_ERROR_KINDS: [&str; 4] = ["tls", "unreachable", "not_active", "broken"];

/// The status class label of a status code.
pub(crate) fn class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "none",
    }
}

/// How long the metrics address may stay taken before the listener gives up: during a
/// graceful upgrade (`vha proxy --upgrade`) the old process holds it until it exits, which
/// is its close timeout (5 s) plus its shutdown timeout (5 s) at most.
const METRICS_BIND_WAIT: std::time::Duration = std::time::Duration::from_secs(30);
/// Retry interval while the address is taken.
const METRICS_BIND_RETRY: std::time::Duration = std::time::Duration::from_millis(100);

/// Binds `addr`, retrying while another process (the one being upgraded) still has it.
async fn bind_when_free(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let deadline = tokio::time::Instant::now() + METRICS_BIND_WAIT;
    loop {
        match tokio::net::TcpListener::bind(addr).await {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(METRICS_BIND_RETRY).await;
            }
            r => return r,
        }
    }
}

/// Serves `GET /metrics` (any path) on `addr` until the process ends.
pub(crate) async fn serve(addr: SocketAddr, metrics: Metrics) -> std::io::Result<()> {
    let listener = bind_when_free(addr).await?;
    tracing::info!(%addr, "serving proxy metrics");
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let m = metrics.clone();
        let svc = hyper::service::service_fn(move |_req| {
            let body = m.render();
            async move {
                let mut r = http::Response::new(Full::new(Bytes::from(body)));
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                Ok::<_, Infallible>(r)
            }
        });
        tokio::spawn(async move {
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsRawFd;

    use super::*;

    fn text(m: &Metrics) -> String {
        String::from_utf8(m.render()).expect("utf-8")
    }

    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
            .map(|v| v.parse().expect("number"))
    }

    /// Every forward-error kind, redirect reason and hold outcome is exported at 0 before
    /// its first event.
    #[test]
    fn labelled_counters_exist_at_zero() {
        let t = text(&Metrics::new());
        let mut want: Vec<String> = FORWARD_ERROR_KINDS
            .iter()
            .map(|k| format!("vha_proxy_forward_errors_total{{kind=\"{k}\"}}"))
            .collect();
        want.extend(
            crate::route::RedirectReason::ALL
                .iter()
                .map(|r| format!("vha_proxy_redirects_total{{reason=\"{}\"}}", r.label())),
        );
        want.extend(
            crate::route::Step::HOLD_OUTCOMES
                .iter()
                .map(|o| format!("vha_proxy_holds_total{{outcome=\"{o}\"}}")),
        );
        for series in want {
            assert_eq!(value(&t, &series), Some(0.0), "{series} in:\n{t}");
        }
    }

    #[test]
    fn hold_counts_while_held_and_records_its_time() {
        let m = Metrics::new();
        let h = m.hold_started();
        assert_eq!(value(&text(&m), "vha_proxy_holding"), Some(1.0));
        h.end("resolved");
        let t = text(&m);
        assert_eq!(value(&t, "vha_proxy_holding"), Some(0.0));
        assert_eq!(value(&t, "vha_proxy_holds_total{outcome=\"resolved\"}"), Some(1.0));
        assert_eq!(value(&t, "vha_proxy_hold_seconds_count"), Some(1.0));
        // A hold dropped without an outcome (request abandoned) is no longer in progress.
        drop(m.hold_started());
        assert_eq!(value(&text(&m), "vha_proxy_holding"), Some(0.0));
    }

    /// Exactly one `vha_proxy_local_role` series is 1, the role last set ("down" before
    /// the local node has said anything).
    #[test]
    fn local_role_has_one_series_set() {
        let m = Metrics::new();
        let ones = |t: &str| -> Vec<String> {
            LOCAL_ROLES
                .map(role_label)
                .into_iter()
                .filter(|r| value(t, &format!("vha_proxy_local_role{{role=\"{r}\"}}")) == Some(1.0))
                .map(str::to_string)
                .collect()
        };
        assert_eq!(ones(&text(&m)), ["down"]);
        m.set_local_role(LocalRole::Active);
        assert_eq!(ones(&text(&m)), ["active"]);
        m.set_local_role(LocalRole::Sealed);
        let t = text(&m);
        assert_eq!(ones(&t), ["sealed"]);
        assert_eq!(value(&t, "vha_proxy_local_role{role=\"active\"}"), Some(0.0));
    }

    #[test]
    fn advertisement_term_and_age_follow_the_one_in_use() {
        let m = Metrics::new();
        let t = text(&m);
        assert_eq!(value(&t, "vha_proxy_advertisement_term"), Some(0.0));
        assert_eq!(value(&t, "vha_proxy_advertisement_age_seconds"), None, "{t}");
        let accepted = Instant::now() - std::time::Duration::from_secs(5);
        m.set_advertisement(Some((42, accepted)));
        let t = text(&m);
        assert_eq!(value(&t, "vha_proxy_advertisement_term"), Some(42.0));
        let age = value(&t, "vha_proxy_advertisement_age_seconds").expect("age");
        assert!((5.0..60.0).contains(&age), "{age}");
        m.set_advertisement(None);
        assert_eq!(value(&text(&m), "vha_proxy_advertisement_age_seconds"), None);
    }

    #[test]
    fn open_connections_count_sockets_still_open() {
        let m = Metrics::new();
        let (a, b) = std::os::unix::net::UnixStream::pair().expect("pair");
        m.upstream_connection("active", false, a.as_raw_fd());
        m.upstream_connection("active", true, a.as_raw_fd());
        let t = text(&m);
        assert_eq!(
            value(
                &t,
                "vha_proxy_upstream_connections_total{reused=\"false\",upstream=\"active\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            value(
                &t,
                "vha_proxy_upstream_connections_total{reused=\"true\",upstream=\"active\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            value(&t, "vha_proxy_upstream_open_connections{upstream=\"active\"}"),
            Some(1.0)
        );
        assert_eq!(
            value(&t, "vha_proxy_upstream_open_connections{upstream=\"local\"}"),
            Some(0.0)
        );
        drop(a);
        drop(b);
        assert_eq!(
            value(&text(&m), "vha_proxy_upstream_open_connections{upstream=\"active\"}"),
            Some(0.0)
        );
    }
}

//! Prometheus metrics of the proxy (`vha_proxy_*`), served as text on
//! `proxy.metrics_address`: requests by route decision and status class, forward latency,
//! forward errors by kind, redirects by reason, holds by outcome, rejected advertisements
//! and whether an active node is known.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

/// The proxy's metric handles (cheap to clone).
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// `route` = local | forward | redirect | sealed | unavailable; `class` = 2xx..5xx.
    pub requests: IntCounterVec,
    pub forward_latency: Histogram,
    /// `kind` = tls | unreachable | not_active | broken.
    pub forward_errors: IntCounterVec,
    /// `reason` = header | disable_clustering | tls_fallback | hold_bound.
    pub redirects: IntCounterVec,
    /// `outcome` = resolved | no_active | same_active.
    pub holds: IntCounterVec,
    pub advert_rejected: IntCounter,
    pub active_known: IntGauge,
    /// Vault's names for the same forwarding observations (in Vault the standby node
    /// forwards; in vha its proxy does, so the proxy exports them).
    pub vault_forward: Histogram,
    pub vault_forward_errors: IntCounter,
}

impl Metrics {
    pub fn new() -> Metrics {
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
        let advert_rejected = IntCounter::new(
            "vha_proxy_advertisement_rejected_total",
            "Advertisements ignored because they did not authenticate or were unusable",
        )
        .expect("metric");
        let active_known =
            IntGauge::new("vha_proxy_active_known", "1 when an authenticated active node is known").expect("metric");
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
        for c in [
            Box::new(vault_forward.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(vault_forward_errors.clone()),
            Box::new(requests.clone()),
            Box::new(forward_latency.clone()),
            Box::new(forward_errors.clone()),
            Box::new(redirects.clone()),
            Box::new(holds.clone()),
            Box::new(advert_rejected.clone()),
            Box::new(active_known.clone()),
        ] {
            registry.register(c).expect("register metric");
        }
        Metrics {
            registry,
            requests,
            forward_latency,
            forward_errors,
            redirects,
            holds,
            advert_rejected,
            active_known,
            vault_forward,
            vault_forward_errors,
        }
    }

    /// A forwarded request finished after `secs`.
    pub fn observe_forward(&self, secs: f64) {
        self.forward_latency.observe(secs);
        self.vault_forward.observe(secs);
    }

    /// A forward failed (`kind`: tls | unreachable | not_active | broken).
    pub fn forward_error(&self, kind: &str) {
        self.forward_errors.with_label_values(&[kind]).inc();
        self.vault_forward_errors.inc();
    }

    pub fn set_active_known(&self, known: bool) {
        self.active_known.set(i64::from(known));
    }

    /// The text exposition.
    pub fn render(&self) -> Vec<u8> {
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

/// The status class label of a status code.
pub fn class(status: u16) -> &'static str {
    match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "none",
    }
}

/// Serves `GET /metrics` (any path) on `addr` until the process ends.
pub async fn serve(addr: SocketAddr, metrics: Metrics) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
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

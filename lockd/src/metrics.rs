//! lockd's Prometheus series (`vha_lockd_*`), served at `GET /metrics`.
//!
//! Ops by kind and outcome, fsync latency and batch size (group commit at work), active
//! leases, lease expiries, open watches, and the log size that compaction keeps bounded.
//! One private registry per server, so tests can run several servers in one process.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// fsync latency buckets: 50 µs (a battery-backed or tmpfs device) doubling-ish up to 5 s
/// (a disk stalled by writeback), so both a fast NVMe and a saturated laptop disk show shape.
pub(crate) const FSYNC_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// Group-commit batch sizes (records per fsync): 1 = no batching, up to a 64-client burst.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];

pub struct Metrics {
    registry: Registry,
    pub ops: IntCounterVec,
    pub fsync_seconds: Histogram,
    pub batch_records: Histogram,
    pub request_seconds: HistogramVec,
    pub active_leases: IntGauge,
    pub lease_expiries: IntCounter,
    pub watches: IntGauge,
    pub log_bytes: IntGauge,
    pub compactions: IntCounter,
    /// Refused clients by reason (`crate::auth::Refusal` labels, all present from start).
    pub auth_failures: IntCounterVec,
    /// `outcome` = success | failure: SIGHUP reloads.
    pub config_reloads: IntCounterVec,
    /// notAfter (Unix seconds) of the served certificate (`listener` = lockd).
    pub tls_expiry: IntGaugeVec,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let ops = IntCounterVec::new(
            Opts::new("vha_lockd_ops_total", "lockd operations by kind and outcome"),
            &["op", "outcome"],
        )
        .expect("static metric definition");
        let fsync_seconds = Histogram::with_opts(
            HistogramOpts::new("vha_lockd_fsync_seconds", "log fsync latency").buckets(FSYNC_BUCKETS.to_vec()),
        )
        .expect("static metric definition");
        let batch_records = Histogram::with_opts(
            HistogramOpts::new(
                "vha_lockd_fsync_batch_records",
                "records made durable per fsync (group commit)",
            )
            .buckets(BATCH_BUCKETS.to_vec()),
        )
        .expect("static metric definition");
        let request_seconds = HistogramVec::new(
            HistogramOpts::new("vha_lockd_request_seconds", "request latency by operation")
                .buckets(FSYNC_BUCKETS.to_vec()),
            &["op"],
        )
        .expect("static metric definition");
        let active_leases = IntGauge::new("vha_lockd_active_leases", "leases currently held").expect("static");
        let lease_expiries =
            IntCounter::new("vha_lockd_lease_expiries_total", "leases that ended by TTL expiry").expect("static");
        let watches = IntGauge::new("vha_lockd_watches", "open watch streams").expect("static");
        let log_bytes = IntGauge::new("vha_lockd_log_bytes", "size of the append-only log").expect("static");
        let compactions =
            IntCounter::new("vha_lockd_compactions_total", "snapshots taken to compact the log").expect("static");
        let auth_failures = IntCounterVec::new(
            Opts::new(
                "vha_lockd_auth_failures_total",
                "clients refused for missing or wrong credentials, by reason",
            ),
            &["reason"],
        )
        .expect("static metric definition");
        for r in crate::auth::Refusal::ALL {
            auth_failures.with_label_values(&[r.label()]);
        }
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "vha_config_reloads_total",
                "Configuration reloads (SIGHUP) by outcome (success, failure)",
            ),
            &["outcome"],
        )
        .expect("static metric definition");
        for outcome in ["success", "failure"] {
            config_reloads.with_label_values(&[outcome]);
        }
        let tls_expiry = IntGaugeVec::new(
            Opts::new(
                "vha_tls_certificate_expiry_seconds",
                "When the certificate served on a listener expires (its notAfter, Unix seconds)",
            ),
            &["listener"],
        )
        .expect("static metric definition");
        for c in [
            Box::new(ops.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(config_reloads.clone()),
            Box::new(tls_expiry.clone()),
            Box::new(auth_failures.clone()),
            Box::new(fsync_seconds.clone()),
            Box::new(batch_records.clone()),
            Box::new(request_seconds.clone()),
            Box::new(active_leases.clone()),
            Box::new(lease_expiries.clone()),
            Box::new(watches.clone()),
            Box::new(log_bytes.clone()),
            Box::new(compactions.clone()),
        ] {
            registry.register(c).expect("unique metric names");
        }
        Metrics {
            registry,
            ops,
            fsync_seconds,
            batch_records,
            request_seconds,
            active_leases,
            lease_expiries,
            watches,
            log_bytes,
            compactions,
            auth_failures,
            config_reloads,
            tls_expiry,
        }
    }

    /// Counts one operation.
    pub fn op(&self, op: &str, outcome: &str) {
        self.ops.with_label_values(&[op, outcome]).inc();
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

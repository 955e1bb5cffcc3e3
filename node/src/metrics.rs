//! The node's Prometheus metrics, with Vault's names where the meaning is the same
//! (`vault_core_*`, `vault_ha_*`, as Vault's telemetry reference names them) and `vha_node_*` for our own. Served by `sys/metrics`. The node
//! never forwards (its proxy does), so `vault_ha_rpc_client_forward{,_errors}` are the
//! proxy's.
//! Histograms stand where Vault has summaries; buckets span sub-millisecond request handling
//! to multi-minute terms. No label carries a path or a token.

use prometheus::{Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

/// Latency buckets (seconds): 100 µs .. 10 s, for request handling, echoes, lock waits.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Term-length buckets (seconds): 1 s .. 1 day, for `vault_core_leadership_lost`.
const TERM_BUCKETS: &[f64] = &[1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0];

/// Every metric the node exports.
pub struct NodeMetrics {
    registry: Registry,
    pub core_active: IntGauge,
    pub core_unsealed: IntGauge,
    /// Term length (seconds) observed when a term ends by losing the lock.
    pub leadership_lost: Histogram,
    pub leadership_setup_failed: IntCounter,
    /// Time (seconds) a step-down took.
    pub step_down: Histogram,
    pub handle_request: Histogram,
    /// Round-trip (seconds) of a standby's heartbeat to the active.
    pub rpc_client_echo: Histogram,
    pub rpc_client_echo_errors: IntCounter,
    pub lock_acquire: Histogram,
    pub term: IntGauge,
    pub fencing_rejections: IntCounter,
    /// Cluster-listener TLS handshakes refused, by reason (bounded set).
    pub cluster_handshake_failures: IntCounterVec,
    /// Connections to the pair socket refused by their peer credentials, by reason:
    /// `uid` (another user), `no_credentials` (the kernel gave none).
    pub local_socket_refused: IntCounterVec,
    /// `outcome` = success | failure: SIGHUP reloads.
    pub config_reloads: IntCounterVec,
    /// The active's read cache (Vault's `vault.cache.hit` / `vault.cache.miss`), copied from
    /// the cache's own counters at each scrape.
    cache_hit: IntCounter,
    cache_miss: IntCounter,
    cache_entries: IntGauge,
    /// One scrape copies the cache counters at a time (each adds only what it has not seen).
    cache_copy: std::sync::Mutex<()>,
}

/// The reasons of `vha_node_local_socket_refused_total`, all exported from the start.
pub(crate) const LOCAL_SOCKET_REFUSED_REASONS: [&str; 2] = ["uid", "no_credentials"];

fn hist(name: &str, help: &str, buckets: &[f64]) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec())).expect("valid histogram")
}

impl NodeMetrics {
    pub fn new() -> NodeMetrics {
        let m = NodeMetrics {
            registry: Registry::new(),
            core_active: IntGauge::new("vault_core_active", "1 while this node is the active node").expect("gauge"),
            core_unsealed: IntGauge::new("vault_core_unsealed", "1 while this node is unsealed").expect("gauge"),
            leadership_lost: hist(
                "vault_core_leadership_lost",
                "Length of a term (seconds) that ended by losing leadership",
                TERM_BUCKETS,
            ),
            leadership_setup_failed: IntCounter::new(
                "vault_core_leadership_setup_failed",
                "Times becoming active failed after the lock was won",
            )
            .expect("counter"),
            step_down: hist(
                "vault_core_step_down",
                "Time (seconds) taken to step down",
                LATENCY_BUCKETS,
            ),
            handle_request: hist(
                "vault_core_handle_request",
                "Time (seconds) to handle an API request",
                LATENCY_BUCKETS,
            ),
            rpc_client_echo: hist(
                "vault_ha_rpc_client_echo",
                "Round-trip time (seconds) of standby heartbeats to the active",
                LATENCY_BUCKETS,
            ),
            rpc_client_echo_errors: IntCounter::new(
                "vault_ha_rpc_client_echo_errors",
                "Standby heartbeats to the active that failed",
            )
            .expect("counter"),
            lock_acquire: hist(
                "vha_node_lock_acquire_seconds",
                "Time from starting to contend for the HA lock to holding it",
                &[0.001, 0.01, 0.1, 0.5, 1.0, 2.5, 5.0, 15.0, 60.0, 300.0, 3600.0],
            ),
            term: IntGauge::new(
                "vha_node_term",
                "Fencing token of this node's current term (0 when not active)",
            )
            .expect("gauge"),
            fencing_rejections: IntCounter::new(
                "vha_node_fencing_rejections_total",
                "Writes the store rejected because this node's fencing token was stale",
            )
            .expect("counter"),
            cluster_handshake_failures: IntCounterVec::new(
                Opts::new(
                    "vha_node_cluster_handshake_failures_total",
                    "Refused cluster-listener TLS handshakes",
                ),
                &["reason"],
            )
            .expect("counter vec"),
            local_socket_refused: IntCounterVec::new(
                Opts::new(
                    "vha_node_local_socket_refused_total",
                    "Connections to the pair socket refused because the peer is not this node's proxy user",
                ),
                &["reason"],
            )
            .expect("counter vec"),
            config_reloads: IntCounterVec::new(
                Opts::new(
                    "vha_config_reloads_total",
                    "Configuration reloads (SIGHUP) by outcome (success, failure)",
                ),
                &["outcome"],
            )
            .expect("counter vec"),
            cache_hit: IntCounter::new("vault_cache_hit", "Reads the active node's cache answered").expect("counter"),
            cache_miss: IntCounter::new(
                "vault_cache_miss",
                "Reads the active node's cache could not answer (read from the store)",
            )
            .expect("counter"),
            cache_entries: IntGauge::new(
                "vha_node_cache_entries",
                "Entries in the active node's read cache (0 on a standby or sealed node)",
            )
            .expect("gauge"),
            cache_copy: std::sync::Mutex::new(()),
        };
        for outcome in ["success", "failure"] {
            m.config_reloads.with_label_values(&[outcome]);
        }
        // At 0 from the start, so a rate or an alert works before the first refusal.
        for reason in LOCAL_SOCKET_REFUSED_REASONS {
            m.local_socket_refused.with_label_values(&[reason]);
        }
        for c in [
            Box::new(m.core_active.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.core_unsealed.clone()),
            Box::new(m.leadership_lost.clone()),
            Box::new(m.leadership_setup_failed.clone()),
            Box::new(m.step_down.clone()),
            Box::new(m.handle_request.clone()),
            Box::new(m.rpc_client_echo.clone()),
            Box::new(m.rpc_client_echo_errors.clone()),
            Box::new(m.lock_acquire.clone()),
            Box::new(m.term.clone()),
            Box::new(m.fencing_rejections.clone()),
            Box::new(m.cluster_handshake_failures.clone()),
            Box::new(m.local_socket_refused.clone()),
            Box::new(m.config_reloads.clone()),
            Box::new(m.cache_hit.clone()),
            Box::new(m.cache_miss.clone()),
            Box::new(m.cache_entries.clone()),
        ] {
            m.registry.register(c).expect("unique metric names");
        }
        m
    }

    /// Brings the cache metrics up to the cache's own counters (called before a scrape).
    pub fn observe_cache(&self, s: vha_core::barrier::cache::CacheStats) {
        let _one = self.cache_copy.lock().unwrap_or_else(|e| e.into_inner());
        self.cache_hit.inc_by(s.hits.saturating_sub(self.cache_hit.get()));
        self.cache_miss.inc_by(s.misses.saturating_sub(self.cache_miss.get()));
        self.cache_entries.set(i64::try_from(s.entries).unwrap_or(i64::MAX));
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for NodeMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pair-socket refusal counter is exported at 0 for every reason before any refusal.
    #[test]
    fn local_socket_refused_exists_at_zero() {
        let text = NodeMetrics::new().render();
        for reason in LOCAL_SOCKET_REFUSED_REASONS {
            let series = format!("vha_node_local_socket_refused_total{{reason=\"{reason}\"}} 0");
            assert!(text.lines().any(|l| l == series), "{series} missing from:\n{text}");
        }
    }
}

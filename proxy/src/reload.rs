//! SIGHUP for `vha proxy`: re-reads the config file and applies what can change while the
//! proxy runs: the client listener's certificate and key (new handshakes get the new pair,
//! open connections keep theirs), the lockd client credentials (`token_file`, `tls_*` of a
//! lockd `storage`/`ha_storage`), `x_forwarded_for_authorized_addrs` and `log_level`. A file that does not parse, or a pair that
//! does not load, changes nothing: the error (file, line, key) is logged and counted as
//! `vha_config_reloads_total{outcome="failure"}`. Settings that only a restart applies are
//! named in the log ([`restart_needed`]).

use std::path::PathBuf;
use std::sync::Arc;

use vha_core::config::{Config, ProcessEnv};
use vha_core::served_cert::ServedCert;
use vha_core::storage::factory::Credentials;

use crate::metrics::Metrics;
use crate::xff::TrustedForwarders;

pub(crate) use vha_core::logging::SetLevel;

/// What a reload changes, and where.
pub(crate) struct Reloader {
    pub path: PathBuf,
    pub running: Config,
    /// The client listener's pair (absent with `tls_disable`).
    pub served: Option<Arc<ServedCert>>,
    /// The listener's authorized `X-Forwarded-For` peers.
    pub xff_trusted: Arc<TrustedForwarders>,
    pub metrics: Metrics,
    pub set_level: Option<SetLevel>,
    /// The lockd clients the proxy reads the advertisement through.
    pub credentials: Credentials,
}

impl Reloader {
    /// Reloads on every SIGHUP, forever.
    pub(crate) async fn run(mut self) {
        use tokio::signal::unix::{signal, SignalKind};
        let mut hup = match signal(SignalKind::hangup()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot handle SIGHUP; reloads are off");
                return;
            }
        };
        while hup.recv().await.is_some() {
            tracing::info!(config = %self.path.display(), "SIGHUP: reloading the configuration");
            let outcome = match self.reload() {
                Ok(()) => "success",
                Err(e) => {
                    tracing::error!(error = %e, "reload failed; the running configuration stays in force");
                    "failure"
                }
            };
            self.metrics.config_reloads.with_label_values(&[outcome]).inc();
        }
    }

    /// One reload; on error nothing has changed.
    pub(crate) fn reload(&mut self) -> Result<(), String> {
        let new = vha_core::config::load(&self.path, &ProcessEnv)
            .map_err(|e| format!("loading configuration from {}: {e}", self.path.display()))?;
        // What can fail first: an error leaves everything as it was.
        let listener = new.listener();
        let prepared = match (
            &self.served,
            listener.tls_cert_file.as_ref(),
            listener.tls_key_file.as_ref(),
        ) {
            (Some(_), Some(cert), Some(key)) => {
                Some(ServedCert::prepare(cert, key).map_err(|e| format!("listener: {e}"))?)
            }
            _ => None,
        };
        self.credentials
            .reload(&new)
            .map_err(|e| format!("lockd credentials: {e}"))?;
        if let (Some(served), Some(pair)) = (&self.served, prepared) {
            let not_after = served.install(pair);
            self.metrics.tls_expiry.with_label_values(&["client"]).set(not_after);
            tracing::info!(not_after, "listener certificate reloaded");
        }
        if listener.x_forwarded_for_authorized_addrs != self.running.listener().x_forwarded_for_authorized_addrs {
            self.xff_trusted.set(listener.x_forwarded_for_authorized_addrs.clone());
            tracing::info!(
                authorized = ?listener.x_forwarded_for_authorized_addrs,
                "x_forwarded_for_authorized_addrs reloaded"
            );
        }
        if let Some(set) = &self.set_level {
            set(new.log_level.as_str());
        }
        for setting in restart_needed(&self.running, &new) {
            tracing::warn!(setting, "changed in the file; it takes effect only after a restart");
        }
        self.running = new;
        Ok(())
    }
}

/// The settings the proxy uses that differ between `old` and `new` and that a reload does
/// not apply.
pub(crate) fn restart_needed(old: &Config, new: &Config) -> Vec<&'static str> {
    let (o, n) = (old.listener(), new.listener());
    let mut out = Vec::new();
    if o.address != n.address {
        out.push("listener.address");
    }
    if o.tls_disable != n.tls_disable {
        out.push("listener.tls_disable");
    }
    if o.max_request_size != n.max_request_size {
        out.push("listener.max_request_size");
    }
    if o.max_request_duration != n.max_request_duration {
        out.push("listener.max_request_duration");
    }
    if old.proxy != new.proxy {
        out.push("proxy");
    }
    out.extend(vha_core::storage::factory::restart_needed(old, new));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;
    use vha_core::config::{parse_str, MapEnv};

    fn cfg(extra_listener: &str, top: &str) -> Config {
        let src = format!(
            "{}storage \"file\" {{\n  path = \"/var/lib/vha\"\n}}\nlistener \"tcp\" {{\n  address = \"127.0.0.1:8200\"\n  tls_disable = true\n{extra_listener}}}\n{top}",
            if top == "moved" { "\n\n" } else { "" }
        );
        let src = src.replace("moved", "");
        parse_str(&src, Path::new("t.hcl"), &MapEnv::default()).expect("config")
    }

    /// Property: only settings that a reload does not apply are named, and a stanza that
    /// merely moved to another line of the file is not a change.
    #[test]
    fn names_only_what_a_reload_cannot_apply() {
        let base = cfg("", "");
        assert!(restart_needed(&base, &cfg("", "log_level = \"trace\"")).is_empty());
        let moved = cfg("", "moved");
        assert_ne!(moved.storage.line, base.storage.line);
        assert!(restart_needed(&base, &moved).is_empty(), "moved lines");
        let mut elsewhere = base.clone();
        elsewhere.storage.options.get_mut("path").expect("path").value = "/elsewhere".into();
        assert_eq!(restart_needed(&base, &elsewhere), vec!["storage"]);
        assert!(
            restart_needed(&base, &cfg("  x_forwarded_for_authorized_addrs = \"10.0.0.0/8\"\n", "")).is_empty(),
            "reloaded, not named"
        );
        assert_eq!(
            restart_needed(&base, &cfg("  max_request_size = 10\n", "")),
            vec!["listener.max_request_size"]
        );
    }
}

//! Structure of the shipped Grafana dashboards, without any process: every file
//! parses, panel ids are unique, every panel and target names a datasource, grid positions
//! are valid and do not overlap, every expression's variables are known, every vha/Vault
//! metric an expression reads is one the code registers, the panels the issue asks for
//! exist, and the provisioning files and example scrape config agree with the dashboards.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

use vha_testkit::prometheus::dashboards::{self, builtins, expressions, metric_names, panels, substitute, variables};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The metric names our code registers: every string literal in the three metrics modules.
fn registered_names() -> HashSet<String> {
    let mut out = HashSet::new();
    for f in ["node/src/metrics.rs", "lockd/src/metrics.rs", "proxy/src/metrics.rs"] {
        let text = read(f);
        for (i, part) in text.split('"').enumerate() {
            if i % 2 == 1 && (part.starts_with("vha_") || part.starts_with("vault_")) && !part.contains(' ') {
                out.insert(part.to_string());
            }
        }
    }
    out
}

/// `x_bucket` / `x_count` / `x_sum` of a histogram `x` -> `x`.
fn base_name(series: &str, registered: &HashSet<String>) -> String {
    if registered.contains(series) {
        return series.to_string();
    }
    for suffix in ["_bucket", "_count", "_sum"] {
        if let Some(b) = series.strip_suffix(suffix) {
            return b.to_string();
        }
    }
    series.to_string()
}

/// Every panel id is unique within its dashboard, every dashboard uid is unique, every
/// non-row panel and every target carries a datasource, every target has an expression and
/// a unique refId, and grid positions fit the 24-column grid without overlapping.
#[test]
fn panel_ids_datasources_and_grid_are_valid() {
    let all = dashboards::load(&dashboards::dir());
    assert!(
        all.len() >= 2,
        "expected the overview and etcd dashboards, found {}",
        all.len()
    );
    let mut uids = HashSet::new();
    for (name, d) in &all {
        let uid = d["uid"].as_str().unwrap_or_else(|| panic!("{name}: no uid"));
        assert!(uids.insert(uid.to_string()), "{name}: duplicate dashboard uid {uid}");
        assert!(d["title"].as_str().is_some_and(|t| !t.is_empty()), "{name}: no title");
        assert!(d["schemaVersion"].as_u64().is_some(), "{name}: no schemaVersion");
        let var_names: HashSet<String> = variables(d).into_iter().map(|(k, _)| k).collect();

        let mut ids = HashSet::new();
        let mut rects: Vec<(String, i64, i64, i64, i64)> = Vec::new();
        for p in panels(d) {
            let id = p["id"]
                .as_i64()
                .unwrap_or_else(|| panic!("{name}: panel without id: {}", p["title"]));
            assert!(ids.insert(id), "{name}: duplicate panel id {id}");
            let title = p["title"].as_str().unwrap_or_default().to_string();
            assert!(!title.is_empty(), "{name}: panel {id} has no title");
            let g = &p["gridPos"];
            let (x, y, w, h) = (g["x"].as_i64(), g["y"].as_i64(), g["w"].as_i64(), g["h"].as_i64());
            let (Some(x), Some(y), Some(w), Some(h)) = (x, y, w, h) else {
                panic!("{name}: panel {id} {title:?}: incomplete gridPos {g}");
            };
            assert!(
                x >= 0 && y >= 0 && w >= 1 && h >= 1 && x + w <= 24,
                "{name}: panel {id} {title:?}: bad gridPos {g}"
            );
            for (other, ox, oy, ow, oh) in &rects {
                let overlap = x < ox + ow && ox < &(x + w) && y < oy + oh && oy < &(y + h);
                assert!(!overlap, "{name}: panel {id} {title:?} overlaps {other:?}");
            }
            rects.push((title.clone(), x, y, w, h));

            if p["type"] == "row" {
                continue;
            }
            let check_ds = |ds: &Value, what: &str| {
                let uid = ds["uid"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{name}: {what}: no datasource uid"));
                assert_eq!(ds["type"], "prometheus", "{name}: {what}: datasource type");
                if let Some(var) = uid.strip_prefix("${").and_then(|u| u.strip_suffix('}')) {
                    assert!(
                        var_names.contains(var),
                        "{name}: {what}: datasource variable {var} is not defined"
                    );
                }
            };
            check_ds(&p["datasource"], &format!("panel {id} {title:?}"));
            let targets = p["targets"]
                .as_array()
                .unwrap_or_else(|| panic!("{name}: panel {id} {title:?}: no targets"));
            assert!(!targets.is_empty(), "{name}: panel {id} {title:?}: no targets");
            let mut refs = HashSet::new();
            for t in targets {
                let r = t["refId"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{name}: panel {id}: target without refId"));
                assert!(refs.insert(r.to_string()), "{name}: panel {id}: duplicate refId {r}");
                check_ds(&t["datasource"], &format!("panel {id} {title:?} target {r}"));
                assert!(
                    t["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
                    "{name}: panel {id} {r}: empty expr"
                );
            }
        }
    }
}

/// Every expression's variables are defined (dashboard variables or Grafana's built-ins),
/// and every vha_/vault_ metric it reads is registered by node, lockd or proxy code.
#[test]
fn expressions_use_known_variables_and_registered_metrics() {
    let registered = registered_names();
    assert!(registered.contains("vault_core_active") && registered.contains("vha_lockd_ops_total"));
    for (name, d) in dashboards::load(&dashboards::dir()) {
        let mut vars = variables(&d);
        vars.extend(builtins(Duration::from_secs(15), Duration::from_secs(3600)));
        let exprs = expressions(&name, &d);
        assert!(!exprs.is_empty(), "{name}: no expressions");
        for e in exprs {
            let s = substitute(&e.expr, &vars).unwrap_or_else(|err| panic!("{name} {}: {err}", e.origin));
            let names = metric_names(&s);
            assert!(!names.is_empty(), "{name} {}: reads no metric: {s}", e.origin);
            for n in names {
                if n.starts_with("vha_") || n.starts_with("vault_") {
                    let b = base_name(&n, &registered);
                    assert!(
                        registered.contains(&b),
                        "{name} {}: {n} is not a registered metric",
                        e.origin
                    );
                }
            }
        }
    }
}

/// The overview has a panel for each thing an operator watches in an HA cluster (the
/// active node and its changes, routes, forwarding, holds, the lock's renewals, lockd and
/// its fsync), and the etcd dashboard exists for etcd stores.
#[test]
fn dashboards_cover_what_operators_watch() {
    let all = dashboards::load(&dashboards::dir());
    let find = |uid: &str| {
        all.iter()
            .find(|(_, d)| d["uid"] == uid)
            .map(|(_, d)| d.clone())
            .expect(uid)
    };
    let titles = |d: &Value| -> BTreeSet<String> {
        panels(d)
            .iter()
            .filter_map(|p| p["title"].as_str().map(str::to_string))
            .collect()
    };
    let ov = titles(&find("vha-overview"));
    for want in [
        "Active node",
        "Active node over time",
        "Time without an active node",
        "Leadership events",
        "Requests by route",
        "Forward latency",
        "Forward errors by kind",
        "Redirects by reason",
        "Holds during failover",
        "Lease renew latency",
        "lockd operations",
        "fsync latency",
    ] {
        assert!(ov.contains(want), "overview lacks panel {want:?}; has {ov:?}");
    }
    let et = titles(&find("vha-etcd"));
    for want in ["Members with a leader", "WAL fsync latency", "Lease keep-alives"] {
        assert!(et.contains(want), "etcd dashboard lacks panel {want:?}; has {et:?}");
    }
}

/// The provisioning files and the example scrape config match the dashboards: the
/// datasource uid is the dashboards' default, the provider loads a directory, and the job
/// names are the dashboards' job variables' defaults.
#[test]
fn provisioning_and_scrape_config_match_dashboards() {
    let ds = read("grafana/provisioning/datasources/vha.yml");
    let prov = read("grafana/provisioning/dashboards/vha.yml");
    let scrape = read("grafana/prometheus.example.yml");
    assert!(
        prov.contains("type: file") && prov.contains("path:"),
        "dashboard provider: {prov}"
    );
    for (name, d) in dashboards::load(&dashboards::dir()) {
        for (k, v) in variables(&d) {
            if k == "datasource" {
                assert!(
                    ds.contains(&format!("uid: {v}")),
                    "{name}: datasource default {v} not provisioned"
                );
            } else if k.ends_with("_job") && k != "etcd_job" {
                assert!(
                    scrape.contains(&format!("job_name: {v}")),
                    "{name}: job {v} not in prometheus.example.yml"
                );
            } else if k == "etcd_job" {
                assert!(
                    scrape.contains(&format!("job_name: {v}")),
                    "{name}: etcd job {v} not even commented in the example"
                );
            }
        }
    }
}

/// The shipped alerting rules read only metrics the code registers (so a renamed metric
/// cannot leave an alert silently watching nothing), and every alert the operations docs
/// promise is there: no active, more than one active, failover, forwarding errors, slow
/// lease renewals, slow fsync, lockd auth failures. (`scripts/test.sh` also runs
/// `promtool check rules` and the rules' unit tests.)
#[test]
fn alert_rules_read_registered_metrics() {
    let registered = registered_names();
    let text = read("grafana/alerts/vha-alerts.yml");
    let mut alerts = BTreeSet::new();
    let mut exprs = Vec::new();
    let mut lines = text.lines().peekable();
    while let Some(l) = lines.next() {
        let t = l.trim();
        if let Some(a) = t.strip_prefix("- alert: ") {
            alerts.insert(a.to_string());
        } else if let Some(e) = t.strip_prefix("expr: ") {
            let mut e = e.trim_start_matches('|').to_string();
            while lines.peek().is_some_and(|n| n.starts_with("          ")) {
                e.push(' ');
                e.push_str(lines.next().unwrap_or_default().trim());
            }
            exprs.push(e);
        }
    }
    for want in [
        "VhaNoActiveNode",
        "VhaMoreThanOneActiveNode",
        "VhaFailover",
        "VhaForwardingErrors",
        "VhaLeaseRenewalsSlow",
        "VhaLockdFsyncSlow",
        "VhaLockdAuthFailures",
    ] {
        assert!(alerts.contains(want), "missing alert {want}: {alerts:?}");
    }
    assert_eq!(exprs.len(), alerts.len(), "one expression per alert");
    for e in exprs {
        let names = metric_names(&e);
        assert!(!names.is_empty(), "alert reads no metric: {e}");
        for n in names
            .iter()
            .filter(|n| n.starts_with("vha_") || n.starts_with("vault_"))
        {
            assert!(
                registered.contains(&base_name(n, &registered)),
                "{n} is not a registered metric: {e}"
            );
        }
    }
}

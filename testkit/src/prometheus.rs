//! `TestPrometheus`: a real `prometheus` (Debian's 2.x, installed by `scripts/install-deps.sh`)
//! on a free 127.0.0.1 port with a temp storage dir, scraping the jobs a test describes.
//! Waits on `/-/ready` (polling, never sleeping blind) and answers PromQL through the HTTP
//! API: instant queries (`/api/v1/query`), range queries (`/api/v1/query_range`), target
//! health and known metric names. Also runs `promtool check config` on a file.
//!
//! Prometheus' own errors come back as `Err(PromError)` with its `errorType` ("bad_data" for
//! a PromQL parse error), so a test can tell a bad expression from an empty result.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::process::{free_port, ChildProc};
use crate::wait::wait_until_async;

/// How long Prometheus may take to answer `/-/ready` (TSDB head creation on an empty dir:
/// well under a second; the margin covers two busy cores).
pub const PROMETHEUS_START_TIMEOUT: Duration = Duration::from_secs(30);

/// One scrape job: `targets` are `host:port`; `params` become URL query parameters.
#[derive(Clone, Debug)]
pub struct ScrapeJob {
    pub name: String,
    pub metrics_path: String,
    pub params: Vec<(String, String)>,
    pub targets: Vec<String>,
    /// A file holding a bearer token Prometheus sends (lockd's `/metrics` needs one).
    pub bearer_token_file: Option<std::path::PathBuf>,
}

impl ScrapeJob {
    /// A job scraping `path` on every target.
    pub fn new(name: &str, path: &str, targets: impl IntoIterator<Item = String>) -> ScrapeJob {
        ScrapeJob {
            name: name.into(),
            metrics_path: path.into(),
            params: Vec::new(),
            targets: targets.into_iter().map(|t| strip_scheme(&t).to_string()).collect(),
            bearer_token_file: None,
        }
    }

    /// Sends `Authorization: Bearer <content of file>` (when `file` is `Some`).
    pub fn bearer_token_file(mut self, file: Option<&Path>) -> ScrapeJob {
        self.bearer_token_file = file.map(Path::to_path_buf);
        self
    }

    /// Adds a URL query parameter (`format=prometheus` for the node).
    pub fn param(mut self, k: &str, v: &str) -> ScrapeJob {
        self.params.push((k.into(), v.into()));
        self
    }
}

/// `http://127.0.0.1:8200` -> `127.0.0.1:8200` (Prometheus targets carry no scheme).
pub fn strip_scheme(addr: &str) -> &str {
    let a = addr.split_once("://").map_or(addr, |(_, rest)| rest);
    a.trim_end_matches('/')
}

/// A Prometheus configuration (YAML) scraping `jobs` every `interval` (e.g. "1s").
pub fn config_yaml(jobs: &[ScrapeJob], interval: &str) -> String {
    let mut y = format!("global:\n  scrape_interval: {interval}\n  scrape_timeout: {interval}\n  evaluation_interval: {interval}\nscrape_configs:\n");
    for j in jobs {
        y.push_str(&format!(
            "  - job_name: {}\n    metrics_path: {}\n",
            j.name, j.metrics_path
        ));
        if let Some(f) = &j.bearer_token_file {
            y.push_str(&format!(
                "    authorization:\n      type: Bearer\n      credentials_file: \"{}\"\n",
                f.display()
            ));
        }
        if !j.params.is_empty() {
            y.push_str("    params:\n");
            for (k, v) in &j.params {
                y.push_str(&format!("      {k}: [{v}]\n"));
            }
        }
        let targets = j
            .targets
            .iter()
            .map(|t| format!("\"{t}\""))
            .collect::<Vec<_>>()
            .join(", ");
        y.push_str(&format!("    static_configs:\n      - targets: [{targets}]\n"));
    }
    y
}

/// An error answer of the Prometheus HTTP API (or a transport failure: `error_type` "http").
#[derive(Clone, Debug)]
pub struct PromError {
    pub error_type: String,
    pub error: String,
}

impl std::fmt::Display for PromError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.error_type, self.error)
    }
}

/// A running `prometheus`.
pub struct TestPrometheus {
    /// `http://127.0.0.1:<port>`.
    pub addr: String,
    pub port: u16,
    pub config_path: std::path::PathBuf,
    proc: ChildProc,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
}

/// `promtool check config FILE`: `Ok(stdout)` or `Err(stdout + stderr)`.
pub fn promtool_check_config(path: &Path) -> Result<String, String> {
    let out = Command::new("promtool")
        .arg("check")
        .arg("config")
        .arg(path)
        .output()
        .map_err(|e| format!("running promtool (install it with scripts/install-deps.sh): {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

impl TestPrometheus {
    /// Starts Prometheus scraping `jobs` every `interval`.
    pub async fn start(jobs: &[ScrapeJob], interval: &str) -> TestPrometheus {
        TestPrometheus::start_with_config(&config_yaml(jobs, interval)).await
    }

    /// Starts Prometheus with a given configuration text; panics (with its log) if it does
    /// not become ready.
    pub async fn start_with_config(yaml: &str) -> TestPrometheus {
        let dir = tempfile::Builder::new()
            .prefix("vha-prometheus-")
            .tempdir()
            .expect("tempdir");
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, yaml).expect("write prometheus.yml");
        let port = free_port();
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--storage.tsdb.retention.time=1h")
            .arg("--log.level=warn");
        let proc = ChildProc::spawn("prometheus", cmd, &dir.path().join("prometheus.log"));
        let p = TestPrometheus {
            addr: format!("http://127.0.0.1:{port}"),
            port,
            config_path,
            proc,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("http client"),
            _dir: dir,
        };
        let ready = format!("{}/-/ready", p.addr);
        let deadline = tokio::time::Instant::now() + PROMETHEUS_START_TIMEOUT;
        loop {
            if let Ok(r) = p.http.get(&ready).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            if !p.proc.is_running_shared() || tokio::time::Instant::now() >= deadline {
                panic!("prometheus did not become ready; log:\n{}", p.proc.output());
            }
            tokio::time::sleep(crate::wait::POLL_INTERVAL).await;
        }
        p
    }

    /// Prometheus' own log so far.
    pub fn output(&self) -> String {
        self.proc.output()
    }

    async fn api(&self, path: &str, form: &[(&str, String)]) -> Result<Value, PromError> {
        let http_err = |e: String| PromError {
            error_type: "http".into(),
            error: e,
        };
        let resp = self
            .http
            .post(format!("{}/api/v1/{path}", self.addr))
            .form(form)
            .send()
            .await
            .map_err(|e| http_err(e.to_string()))?;
        let v: Value = resp.json().await.map_err(|e| http_err(e.to_string()))?;
        if v["status"] == "success" {
            Ok(v["data"].clone())
        } else {
            Err(PromError {
                error_type: v["errorType"].as_str().unwrap_or("unknown").into(),
                error: v["error"].as_str().unwrap_or_default().into(),
            })
        }
    }

    /// An instant query at the current time: the result array (`data.result`; a scalar or
    /// string result comes back as a one-element array).
    pub async fn query(&self, expr: &str) -> Result<Vec<Value>, PromError> {
        let d = self.api("query", &[("query", expr.to_string())]).await?;
        Ok(match &d["result"] {
            Value::Array(a) => a.clone(),
            other => vec![other.clone()],
        })
    }

    /// A range query over the last `range` ending now, at `step`: the matrix of series.
    pub async fn query_range(&self, expr: &str, range: Duration, step: Duration) -> Result<Vec<Value>, PromError> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs_f64();
        let start = now - range.as_secs_f64();
        let d = self
            .api(
                "query_range",
                &[
                    ("query", expr.to_string()),
                    ("start", format!("{start:.3}")),
                    ("end", format!("{now:.3}")),
                    ("step", format!("{}", step.as_secs_f64())),
                ],
            )
            .await?;
        Ok(d["result"].as_array().cloned().unwrap_or_default())
    }

    /// Every metric name Prometheus has stored.
    pub async fn metric_names(&self) -> Vec<String> {
        let url = format!("{}/api/v1/label/__name__/values", self.addr);
        let v: Value = match self.http.get(url).send().await {
            Ok(r) => r.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        };
        v["data"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_string))
            .collect()
    }

    /// The active targets: (job, scrapeUrl, health) per target.
    pub async fn targets(&self) -> Vec<(String, String, String)> {
        let url = format!("{}/api/v1/targets?state=active", self.addr);
        let v: Value = match self.http.get(url).send().await {
            Ok(r) => r.json().await.unwrap_or(Value::Null),
            Err(_) => Value::Null,
        };
        v["data"]["activeTargets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                let s = |k: &str| t[k].as_str().unwrap_or_default().to_string();
                (
                    t["labels"]["job"].as_str().unwrap_or_default().to_string(),
                    s("scrapeUrl"),
                    s("health"),
                )
            })
            .collect()
    }

    /// Waits until every configured target has been scraped successfully at least once.
    pub async fn wait_all_up(&self, timeout: Duration) {
        wait_until_async(
            || async {
                let t = self.targets().await;
                (!t.is_empty() && t.iter().all(|(_, _, h)| h == "up")).then_some(())
            },
            "every Prometheus target up",
            timeout,
        )
        .await;
    }

    /// Waits until `expr` returns a non-empty instant vector; returns it.
    pub async fn wait_for_data(&self, expr: &str, timeout: Duration) -> Vec<Value> {
        wait_until_async(
            || async { self.query(expr).await.ok().filter(|r| !r.is_empty()) },
            &format!("PromQL {expr} returning data"),
            timeout,
        )
        .await
    }
}

/// The numeric value of one instant-vector sample (`[ts, "value"]`); NaN if unparsable.
pub fn sample_value(sample: &Value) -> f64 {
    sample["value"][1]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::NAN)
}

/// One sample of a Prometheus text exposition: name, labels, value.
#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub value: f64,
}

/// Parses the text exposition format (comments skipped; label values unescaped).
pub fn parse_exposition(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(i) => (&line[..i], &line[i..]),
            None => continue,
        };
        let mut labels = std::collections::BTreeMap::new();
        let mut rest = rest;
        if let Some(body) = rest.strip_prefix('{') {
            // key="value",... with \" \\ \n escapes inside values.
            let mut chars = body.char_indices().peekable();
            let mut key = String::new();
            let mut end = body.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '}' => {
                        end = i + 1;
                        break;
                    }
                    ',' | ' ' => {}
                    '=' => {
                        let mut val = String::new();
                        let _ = chars.next(); // opening quote
                        while let Some((_, c)) = chars.next() {
                            match c {
                                '\\' => match chars.next().map(|(_, c)| c) {
                                    Some('n') => val.push('\n'),
                                    Some(o) => val.push(o),
                                    None => {}
                                },
                                '"' => break,
                                o => val.push(o),
                            }
                        }
                        labels.insert(std::mem::take(&mut key), val);
                    }
                    o => key.push(o),
                }
            }
            rest = &body[end..];
        }
        let value = rest.split_whitespace().next().and_then(|v| v.parse::<f64>().ok());
        if let Some(value) = value {
            out.push(Sample {
                name: name.to_string(),
                labels,
                value,
            });
        }
    }
    out
}

/// The sum of every sample named `name` whose labels include all of `labels` (0 if none).
pub fn series_value(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    parse_exposition(text)
        .into_iter()
        .filter(|s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

/// Grafana dashboards as the tests see them: every PromQL expression (panel targets, nested
/// panels of collapsed rows, annotation queries) and its variables.
pub mod dashboards {
    use std::path::{Path, PathBuf};

    use serde_json::Value;

    /// One PromQL expression of a dashboard, with where it came from.
    #[derive(Clone, Debug)]
    pub struct DashExpr {
        pub dashboard: String,
        /// "panel <id> <title> / <refId>" or "annotation <name>".
        pub origin: String,
        pub expr: String,
    }

    /// `grafana/dashboards` of the workspace.
    pub fn dir() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join("grafana")
            .join("dashboards")
    }

    /// Every `*.json` under `dir`, parsed: (file name, dashboard). Panics on invalid JSON.
    pub fn load(dir: &Path) -> Vec<(String, Value)> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        files.sort();
        files
            .into_iter()
            .map(|p| {
                let text = std::fs::read_to_string(&p).expect("read dashboard");
                let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                (p.file_name().unwrap_or_default().to_string_lossy().into_owned(), v)
            })
            .collect()
    }

    /// Every panel, including those nested in (collapsed) rows.
    pub fn panels(dash: &Value) -> Vec<&Value> {
        let mut out = Vec::new();
        for p in dash["panels"].as_array().into_iter().flatten() {
            out.push(p);
            for n in p["panels"].as_array().into_iter().flatten() {
                out.push(n);
            }
        }
        out
    }

    /// Every PromQL expression of `dash`.
    pub fn expressions(name: &str, dash: &Value) -> Vec<DashExpr> {
        let mut out = Vec::new();
        for p in panels(dash) {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push(DashExpr {
                        dashboard: name.into(),
                        origin: format!(
                            "panel {} {:?} / {}",
                            p["id"],
                            p["title"].as_str().unwrap_or_default(),
                            t["refId"].as_str().unwrap_or_default()
                        ),
                        expr: e.into(),
                    });
                }
            }
        }
        for a in dash["annotations"]["list"].as_array().into_iter().flatten() {
            if let Some(e) = a["expr"].as_str().or_else(|| a["target"]["expr"].as_str()) {
                out.push(DashExpr {
                    dashboard: name.into(),
                    origin: format!("annotation {:?}", a["name"].as_str().unwrap_or_default()),
                    expr: e.into(),
                });
            }
        }
        out
    }

    /// The dashboard's template variables with their default (current) values.
    pub fn variables(dash: &Value) -> Vec<(String, String)> {
        dash["templating"]["list"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| {
                let name = v["name"].as_str()?.to_string();
                let cur = &v["current"]["value"];
                let val = match cur {
                    Value::String(s) => s.clone(),
                    Value::Array(a) => a.iter().filter_map(Value::as_str).collect::<Vec<_>>().join("|"),
                    _ => v["query"].as_str().unwrap_or_default().to_string(),
                };
                Some((name, val))
            })
            .collect()
    }

    /// What Grafana substitutes for its built-in interval variables, for a dashboard shown
    /// over `range` with data scraped every `scrape`.
    pub fn builtins(scrape: std::time::Duration, range: std::time::Duration) -> Vec<(String, String)> {
        let s = scrape.as_secs().max(1);
        // Grafana: $__rate_interval = max($__interval + scrape interval, 4 * scrape interval).
        let interval = s;
        let rate = (interval + s).max(4 * s);
        let r = range.as_secs().max(1);
        vec![
            ("__rate_interval".into(), format!("{rate}s")),
            ("__interval_ms".into(), format!("{}", interval * 1000)),
            ("__interval".into(), format!("{interval}s")),
            ("__range_ms".into(), format!("{}", r * 1000)),
            ("__range_s".into(), format!("{r}")),
            ("__range".into(), format!("{r}s")),
        ]
    }

    /// Substitutes `${name}`, `${name:fmt}`, `[[name]]` and `$name` (longest names first, so
    /// `$__interval_ms` is not read as `$__interval`). Returns an error naming any variable
    /// left over.
    pub fn substitute(expr: &str, vars: &[(String, String)]) -> Result<String, String> {
        let mut vars = vars.to_vec();
        vars.sort_by_key(|(k, _)| std::cmp::Reverse(k.len()));
        let mut s = expr.to_string();
        for (k, v) in &vars {
            s = s.replace(&format!("${{{k}}}"), v).replace(&format!("[[{k}]]"), v);
            // ${name:format}
            while let Some(i) = s.find(&format!("${{{k}:")) {
                let Some(j) = s[i..].find('}') else { break };
                s.replace_range(i..i + j + 1, v);
            }
            s = s.replace(&format!("${k}"), v);
        }
        let b = s.as_bytes();
        for (i, c) in b.iter().enumerate() {
            if *c == b'$'
                && b.get(i + 1)
                    .is_some_and(|n| n.is_ascii_alphabetic() || *n == b'_' || *n == b'{')
            {
                return Err(format!("unknown variable at {:?} in {expr}", &s[i..]));
            }
        }
        Ok(s)
    }

    /// Metric names an expression reads: identifiers outside string literals and outside
    /// `by (...)`/`without (...)`/`on (...)`/`ignoring (...)` lists and label matchers that
    /// start with one of vha's, Vault's, etcd's or Prometheus' prefixes (or are `up`).
    pub fn metric_names(expr: &str) -> Vec<String> {
        const PREFIXES: [&str; 5] = ["vha_", "vault_", "etcd_", "grpc_", "process_"];
        const LABEL_LISTS: [&str; 6] = ["by", "without", "on", "ignoring", "group_left", "group_right"];
        let mut out: Vec<String> = Vec::new();
        let (mut in_str, mut braces, mut pending, mut in_list) = (false, 0i32, false, false);
        let mut ident = String::new();
        for c in expr.chars().chain(std::iter::once(' ')) {
            if in_str {
                in_str = c != '"';
                continue;
            }
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                ident.push(c);
                continue;
            }
            if !ident.is_empty() {
                if LABEL_LISTS.contains(&ident.as_str()) {
                    pending = true;
                } else if braces == 0
                    && !in_list
                    && (ident == "up" || PREFIXES.iter().any(|p| ident.starts_with(p)))
                    && !out.contains(&ident)
                {
                    out.push(ident.clone());
                }
                ident.clear();
            }
            match c {
                '"' => in_str = true,
                '{' => braces += 1,
                '}' => braces -= 1,
                '(' if pending => {
                    in_list = true;
                    pending = false;
                }
                ')' if in_list => in_list = false,
                c if c.is_whitespace() => {}
                _ => pending = false,
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::dashboards::{metric_names, substitute};
    use super::*;

    #[test]
    fn parses_exposition_with_labels_and_escapes() {
        let text = "# HELP x y\n# TYPE x counter\nvha_a_total{kind=\"tls\",route=\"a\\\"b\"} 3\nvha_b 1.5\nvha_c_bucket{le=\"+Inf\"} 7\n";
        let s = parse_exposition(text);
        assert_eq!(s.len(), 3);
        assert_eq!(s[0].labels["route"], "a\"b");
        assert_eq!(series_value(text, "vha_a_total", &[("kind", "tls")]), 3.0);
        assert_eq!(series_value(text, "vha_a_total", &[("kind", "other")]), 0.0);
        assert_eq!(series_value(text, "vha_b", &[]), 1.5);
        assert_eq!(series_value(text, "vha_c_bucket", &[("le", "+Inf")]), 7.0);
    }

    #[test]
    fn substitutes_longest_variable_first_and_rejects_unknown() {
        let vars = vec![
            ("__interval".to_string(), "1s".to_string()),
            ("__interval_ms".to_string(), "1000".to_string()),
            ("job".to_string(), "vha-node".to_string()),
        ];
        assert_eq!(
            substitute("x[$__interval] * $__interval_ms", &vars).unwrap(),
            "x[1s] * 1000"
        );
        assert_eq!(
            substitute("up{job=~\"${job}\"} + [[job]] + ${job:regex}", &vars).unwrap(),
            "up{job=~\"vha-node\"} + vha-node + vha-node"
        );
        assert!(substitute("rate(x[$__rate_interval])", &vars).is_err());
        assert_eq!(substitute("x{a=~\"b$\"}", &vars).unwrap(), "x{a=~\"b$\"}");
    }

    #[test]
    fn finds_metric_names_but_not_labels_or_strings() {
        let e = "histogram_quantile(0.99, sum by (grpc_method, le) (rate(vha_x_bucket{op=\"vha_y\",job=~\"a\"}[5s]))) / on (instance) group_left up";
        assert_eq!(metric_names(e), vec!["vha_x_bucket".to_string(), "up".to_string()]);
        assert_eq!(
            metric_names("sum(vault_core_active) or vector(0)"),
            vec!["vault_core_active".to_string()]
        );
    }

    #[test]
    fn config_yaml_lists_jobs_params_and_targets() {
        let y = config_yaml(
            &[
                ScrapeJob::new("vha-node", "/v1/sys/metrics", ["http://127.0.0.1:1/".to_string()])
                    .param("format", "prometheus"),
            ],
            "1s",
        );
        assert!(
            y.contains("job_name: vha-node") && y.contains("format: [prometheus]") && y.contains("\"127.0.0.1:1\""),
            "{y}"
        );
    }
}

//! Scenarios: which address a request goes to and what answer counts as success.
//!
//! | scenario          | target                          | success                       |
//! |-------------------|---------------------------------|-------------------------------|
//! | `direct`          | the active pair's `api_addr`    | 2xx                           |
//! | `forward`         | a standby pair's `api_addr`     | 2xx (the pair forwards)       |
//! | `redirect`        | a standby, `X-Vault-No-Request-Forwarding: 1` | the 307 itself  |
//! | `redirect-follow` | a standby; the 307 is followed  | 2xx after at most 3 hops      |
//! | `node`            | the active node's `node_addr`   | 2xx (bypasses the proxy)      |
//!
//! Targets come from `cluster.json` (`vha dev`) or from `--target NAME=URL`. Without proxies
//! (`proxy_pid` null) a standby node answers 307 itself, so `forward` then shows those 307s
//! as errors: the report says what the cluster did, it does not paper over it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;

use crate::load::{OpFn, Outcome};
use crate::workload::{Req, Workload};

/// Redirect hops `redirect-follow` (and failover clients) follow at most.
const MAX_HOPS: u32 = 3;

/// What kind of path a scenario measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Kind {
    Direct,
    Forward,
    Redirect,
    RedirectFollow,
    Node,
}

impl Kind {
    pub(crate) const ALL: [Kind; 5] = [
        Kind::Direct,
        Kind::Forward,
        Kind::Redirect,
        Kind::RedirectFollow,
        Kind::Node,
    ];

    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::Forward => "forward",
            Kind::Redirect => "redirect",
            Kind::RedirectFollow => "redirect-follow",
            Kind::Node => "node",
        }
    }
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Kind, String> {
        Kind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("unknown scenario {s:?} (direct, forward, redirect, redirect-follow, node)"))
    }
}

/// One scenario of a run: a name (`forward`, `openbao:forward`, `nginx:forward`), a kind
/// and a base URL.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Scenario {
    pub name: String,
    pub kind: Kind,
    pub target: String,
    /// Which system this measures (`vha`, `openbao`, `nginx`).
    pub system: String,
}

pub(crate) use vha_ops::cluster::{ClusterFile, NodeInfo};

/// The benchmark HTTP client: hyper's pooled client (keep-alive, HTTP/1.1 or h2 with prior
/// knowledge), counting every request it sends.
#[derive(Clone)]
pub(crate) struct HttpClient {
    inner: Client<HttpConnector, Full<Bytes>>,
    sent: Arc<AtomicU64>,
    pub token: Arc<str>,
}

/// One response: status, `Location` header, body.
#[derive(Debug)]
pub(crate) struct Resp {
    pub status: StatusCode,
    pub location: Option<String>,
    pub body: Bytes,
}

impl HttpClient {
    pub(crate) fn new(token: &str, http2: bool, pool: usize) -> HttpClient {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        conn.set_keepalive(Some(Duration::from_secs(30)));
        conn.set_connect_timeout(Some(Duration::from_secs(2)));
        let mut b = Client::builder(TokioExecutor::new());
        b.pool_max_idle_per_host(pool.max(1))
            .pool_idle_timeout(Duration::from_secs(30));
        if http2 {
            b.http2_only(true);
        }
        HttpClient {
            inner: b.build(conn),
            sent: Arc::new(AtomicU64::new(0)),
            token: Arc::from(token),
        }
    }

    /// HTTP requests sent so far (all requests through this client and its clones).
    pub(crate) fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Sends one request to `url` (absolute) and reads the whole body.
    pub(crate) async fn send(&self, url: &str, r: &Req, no_forward: bool) -> Result<Resp, String> {
        let mut b = Request::builder().method(r.method.clone()).uri(url);
        if r.authenticated {
            b = b.header("X-Vault-Token", &*self.token);
        }
        if no_forward {
            b = b.header("X-Vault-No-Request-Forwarding", "1");
        }
        if r.body.is_some() {
            b = b.header("content-type", "application/json");
        }
        let req = b
            .body(Full::new(r.body.clone().unwrap_or_default()))
            .map_err(|e| e.to_string())?;
        self.sent.fetch_add(1, Ordering::Relaxed);
        let resp = self.inner.request(req).await.map_err(|e| format!("{url}: {e}"))?;
        let status = resp.status();
        let location = resp
            .headers()
            .get(http::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{url}: body: {e}"))?
            .to_bytes();
        Ok(Resp { status, location, body })
    }

    /// Sends and follows 307/308 redirects (same method and body), at most [`MAX_HOPS`].
    /// Returns the last response and the number of HTTP requests sent.
    pub(crate) async fn send_follow(&self, base: &str, r: &Req) -> (Result<Resp, String>, u32) {
        let mut url = format!("{base}{}", r.path);
        let mut sent = 0;
        loop {
            sent += 1;
            let res = self.send(&url, r, false).await;
            match &res {
                Ok(resp) if matches!(resp.status.as_u16(), 307 | 308) && sent <= MAX_HOPS => match &resp.location {
                    Some(loc) if loc.starts_with("http") => url = loc.clone(),
                    Some(loc) => url = format!("{}{loc}", origin(&url)),
                    None => return (res, sent),
                },
                _ => return (res, sent),
            }
        }
    }

    /// GET helper returning status and JSON.
    pub(crate) async fn get_json(&self, url: &str, authenticated: bool) -> Result<(u16, serde_json::Value), String> {
        let r = Req {
            method: Method::GET,
            path: String::new(),
            body: None,
            authenticated,
        };
        let resp = tokio::time::timeout(Duration::from_secs(5), self.send(url, &r, false))
            .await
            .map_err(|_| format!("{url}: timed out"))??;
        let v = serde_json::from_slice(&resp.body).unwrap_or(serde_json::Value::Null);
        Ok((resp.status.as_u16(), v))
    }
}

/// `http://host:port` of an absolute URL.
fn origin(url: &str) -> &str {
    let after = url.find("://").map(|i| i + 3).unwrap_or(0);
    match url[after..].find('/') {
        Some(j) => &url[..after + j],
        None => url,
    }
}

/// Index of the node whose `sys/leader` says `is_self` (asked on each node's own listener).
pub(crate) async fn find_active(http: &HttpClient, nodes: &[NodeInfo]) -> Option<usize> {
    for (i, n) in nodes.iter().enumerate() {
        if let Ok((200, v)) = http.get_json(&format!("{}/v1/sys/leader", n.node_url()), false).await {
            if v["is_self"] == serde_json::Value::Bool(true) {
                return Some(i);
            }
        }
    }
    None
}

/// The vha scenarios for a cluster whose active node is `active`.
pub(crate) fn vha_scenarios(nodes: &[NodeInfo], active: usize, kinds: &[Kind], system: &str) -> Vec<Scenario> {
    let standby = (0..nodes.len()).find(|&i| i != active);
    let mut out = Vec::new();
    for &k in kinds {
        let target = match k {
            Kind::Direct => Some(nodes[active].api_addr.clone()),
            Kind::Node => Some(nodes[active].node_url().to_string()),
            Kind::Forward | Kind::Redirect | Kind::RedirectFollow => standby.map(|s| nodes[s].api_addr.clone()),
        };
        if let Some(target) = target {
            let name = if system == "vha" {
                k.name().to_string()
            } else {
                format!("{system}:{}", k.name())
            };
            out.push(Scenario {
                name,
                kind: k,
                target: target.trim_end_matches('/').to_string(),
                system: system.into(),
            });
        }
    }
    out
}

/// Whether a final status counts as success for this scenario and workload.
pub(crate) fn success(kind: Kind, health: bool, status: u16) -> bool {
    match kind {
        Kind::Redirect if !health => status == 307,
        // sys/health answers 429/473 on standbys by design: any health answer is a success.
        _ if health => matches!(status, 200 | 429 | 472 | 473),
        _ => (200..300).contains(&status),
    }
}

/// Builds the operation a scenario runs.
pub(crate) fn op(http: &HttpClient, sc: &Scenario, w: &Workload) -> OpFn {
    let (http, w, kind, base) = (
        http.clone(),
        Arc::new(w.clone()),
        sc.kind,
        Arc::<str>::from(sc.target.as_str()),
    );
    let health = matches!(w.kind, crate::workload::Kind::Health);
    Arc::new(move |seq| {
        let (http, w, base) = (http.clone(), w.clone(), base.clone());
        Box::pin(async move {
            let r = w.request(seq);
            let (res, n) = match kind {
                Kind::RedirectFollow => http.send_follow(&base, &r).await,
                Kind::Redirect => (http.send(&format!("{base}{}", r.path), &r, true).await, 1),
                _ => (http.send(&format!("{base}{}", r.path), &r, false).await, 1),
            };
            match res {
                Ok(resp) => {
                    let s = resp.status.as_u16();
                    Outcome {
                        ok: success(kind, health, s),
                        status: Some(s),
                        http_requests: n,
                    }
                }
                Err(_) => Outcome {
                    ok: false,
                    status: None,
                    http_requests: n,
                },
            }
        })
    })
}

/// Sum of `vault_core_handle_request_count` over the given node URLs (each scrape is itself
/// counted by the node, in the *next* scrape). `None` if any node did not answer.
pub(crate) async fn server_request_count(http: &HttpClient, node_urls: &[String]) -> Option<u64> {
    let mut total = 0u64;
    for u in node_urls {
        let r = Req {
            method: Method::GET,
            path: String::new(),
            body: None,
            authenticated: true,
        };
        let resp = http
            .send(&format!("{u}/v1/sys/metrics?format=prometheus"), &r, false)
            .await
            .ok()?;
        if resp.status != StatusCode::OK {
            return None;
        }
        total += parse_metric(&String::from_utf8_lossy(&resp.body), "vault_core_handle_request_count")? as u64;
    }
    Some(total)
}

/// The value of an unlabelled sample `name` in Prometheus text.
pub(crate) fn parse_metric(text: &str, name: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Success rules: `redirect` wants the 307 itself, the others a 2xx; health accepts the
    /// standby codes. Prometheus parsing finds the unlabelled sample only.
    #[test]
    fn success_rules_and_metric_parsing() {
        assert!(success(Kind::Redirect, false, 307));
        assert!(!success(Kind::Redirect, false, 200));
        assert!(!success(Kind::Forward, false, 307));
        assert!(success(Kind::Forward, false, 204));
        assert!(success(Kind::Forward, true, 429));
        let text = "# HELP x\nvault_core_handle_request_bucket{le=\"0.1\"} 3\nvault_core_handle_request_count 42\n";
        assert_eq!(parse_metric(text, "vault_core_handle_request_count"), Some(42.0));
        assert_eq!(parse_metric(text, "vault_core_handle_request"), None);
        assert_eq!(origin("http://127.0.0.1:8200/v1/x"), "http://127.0.0.1:8200");
    }

    /// Scenario targets: direct/node on the active, the standby kinds on another node.
    #[test]
    fn targets_from_cluster_nodes() {
        let n = |i: u16, node: Option<&str>| NodeInfo {
            node_addr: node.map(str::to_string),
            ..NodeInfo::new(&format!("node-{i}"), &format!("http://127.0.0.1:{}", 8200 + i))
        };
        let nodes = vec![n(0, None), n(1, Some("http://127.0.0.1:9201")), n(2, None)];
        let s = vha_scenarios(&nodes, 1, &Kind::ALL, "vha");
        let t: Vec<(&str, &str)> = s.iter().map(|s| (s.name.as_str(), s.target.as_str())).collect();
        assert_eq!(
            t,
            vec![
                ("direct", "http://127.0.0.1:8201"),
                ("forward", "http://127.0.0.1:8200"),
                ("redirect", "http://127.0.0.1:8200"),
                ("redirect-follow", "http://127.0.0.1:8200"),
                ("node", "http://127.0.0.1:9201"),
            ]
        );
        assert_eq!(
            vha_scenarios(&nodes, 0, &[Kind::Forward], "openbao")[0].name,
            "openbao:forward"
        );
    }
}

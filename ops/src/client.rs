//! A small client of the Vault API, shared by `vha status`/`vha operator` and `vha dev` (and
//! by the lockd and etcd health probes, which speak JSON over HTTP too).
//!
//! It follows up to five 307s from standbys, keeping method, body and token, as Vault's CLI
//! does; answers are the status and the JSON body (`null` when empty or not JSON).

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

pub(crate) use reqwest::Method;

/// Redirect hops followed at most (Vault's CLI follows standbys' 307s to the active).
const MAX_REDIRECTS: usize = 5;

/// How to verify a server's TLS certificate.
#[derive(Clone, Debug, Default)]
pub(crate) struct Tls {
    /// A CA bundle (PEM) that signs the server's certificate, beside the system's roots.
    pub ca_cert: Option<PathBuf>,
    /// Accept any certificate (Vault's `-tls-skip-verify`; tests only).
    pub skip_verify: bool,
}

/// A Vault API client with an optional token; cheap to clone.
#[derive(Clone)]
pub(crate) struct Client {
    http: reqwest::Client,
    token: Option<String>,
}

impl Client {
    /// A client whose every request (redirects included) is bounded by `timeout`.
    pub(crate) fn new(tls: &Tls, timeout: Duration) -> Result<Client, String> {
        let mut b = reqwest::Client::builder()
            .timeout(timeout)
            .redirect(reqwest::redirect::Policy::limited(MAX_REDIRECTS))
            .danger_accept_invalid_certs(tls.skip_verify);
        if let Some(ca) = &tls.ca_cert {
            let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
            let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| format!("{}: {e}", ca.display()))?;
            b = b.add_root_certificate(cert);
        }
        Ok(Client {
            http: b.build().map_err(|e| e.to_string())?,
            token: None,
        })
    }

    /// The same client sending `token` as `X-Vault-Token`.
    pub(crate) fn with_token(&self, token: Option<String>) -> Client {
        Client {
            http: self.http.clone(),
            token,
        }
    }

    /// Sends `method url` with `body` as JSON; the status and the JSON answer.
    pub(crate) async fn call(&self, method: Method, url: &str, body: Option<&Value>) -> Result<(u16, Value), String> {
        let mut rb = self.http.request(method.clone(), url);
        if let Some(t) = &self.token {
            rb = rb.header("X-Vault-Token", t);
        }
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let resp = rb.send().await.map_err(|e| format!("{method} {url}: {e}"))?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|e| format!("{method} {url}: {e}"))?;
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        Ok((status, v))
    }

    /// `GET url`.
    pub(crate) async fn get(&self, url: &str) -> Result<(u16, Value), String> {
        self.call(Method::GET, url, None).await
    }
}

/// The `errors` of a Vault error answer, joined.
pub(crate) fn errors(v: &Value) -> String {
    v["errors"]
        .as_array()
        .map(|a| a.iter().filter_map(|e| e.as_str()).collect::<Vec<_>>().join("; "))
        .unwrap_or_default()
}

//! Bounded client load for tests that change a running cluster (upgrades, restarts,
//! credential rotation): a loop that writes a new KV v2 key through one address and reads it
//! back, until told to stop or until its bounds, recording what was acknowledged and every
//! failure. One loop per address; tests start several.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bound on each request (a hold inside the proxy is at most its `hold_timeout`).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The loop's hard caps, whatever happens to the test.
#[derive(Clone, Copy, Debug)]
pub struct LoadBounds {
    pub max_writes: u64,
    pub max_time: Duration,
}

/// What one loop saw.
#[derive(Debug, Default)]
pub struct LoadResult {
    /// Keys whose write was acknowledged (2xx), in order.
    pub acked: Vec<String>,
    /// Every failure: a non-2xx, a transport error, or a read that did not return the value
    /// just written.
    pub errors: Vec<String>,
}

/// Writes `secret/data/<name>-<n>` (a new key each time, the key as value) through `base`
/// with `token` and reads it back, until `stop` or `bounds`; counts acknowledged writes in
/// `done` (so a test can wait for load to flow).
pub async fn kv_writes(
    base: String,
    token: String,
    name: String,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicU64>,
    bounds: LoadBounds,
) -> LoadResult {
    let http = reqwest::Client::builder()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("client");
    let mut r = LoadResult::default();
    let start = Instant::now();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) && n < bounds.max_writes && start.elapsed() < bounds.max_time {
        n += 1;
        let key = format!("{name}-{n}");
        let url = format!("{base}/v1/secret/data/{key}");
        let put = http
            .put(&url)
            .header("X-Vault-Token", &token)
            .json(&serde_json::json!({"data": {"v": key}}))
            .send()
            .await;
        match put {
            Ok(resp) if resp.status().is_success() => {
                r.acked.push(key.clone());
                done.fetch_add(1, Ordering::Relaxed);
            }
            Ok(resp) => {
                let st = resp.status();
                r.errors
                    .push(format!("PUT {key}: {st}: {}", resp.text().await.unwrap_or_default()));
                continue;
            }
            Err(e) => {
                r.errors.push(format!("PUT {key}: {e}"));
                continue;
            }
        }
        match http.get(&url).header("X-Vault-Token", &token).send().await {
            Ok(resp) if resp.status().is_success() => {
                let v: serde_json::Value = resp.json().await.unwrap_or_default();
                if v["data"]["data"]["v"] != serde_json::Value::String(key.clone()) {
                    r.errors.push(format!("GET {key} read {v}"));
                }
            }
            Ok(resp) => {
                let st = resp.status();
                r.errors
                    .push(format!("GET {key}: {st}: {}", resp.text().await.unwrap_or_default()));
            }
            Err(e) => r.errors.push(format!("GET {key}: {e}")),
        }
    }
    r
}

/// Tells the loops to stop, waits for each, and merges what they saw (acknowledged keys
/// and failures, in loop order).
pub async fn finish(stop: &AtomicBool, loops: Vec<tokio::task::JoinHandle<LoadResult>>) -> LoadResult {
    stop.store(true, Ordering::Relaxed);
    let mut all = LoadResult::default();
    for l in loops {
        let r = l.await.expect("load loop");
        all.acked.extend(r.acked);
        all.errors.extend(r.errors);
    }
    all
}

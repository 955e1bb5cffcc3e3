//! What each operation asks for: `sys/health`, a KV v2 read, a KV v2 write, or a mix
//! (`--read-pct`), with a configurable value size. Reads go to a fixed set of keys seeded
//! before the run; writes cycle over a bounded key set so a long run does not grow storage
//! without bound (KV v2 keeps a bounded number of versions per key).

use bytes::Bytes;
use http::Method;

/// The request mix.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub(crate) enum Kind {
    /// `GET /v1/sys/health` (unauthenticated; always answered locally, even by a standby).
    Health,
    /// `GET /v1/secret/data/bench/k<i>`.
    KvRead,
    /// `POST /v1/secret/data/bench/w<i>` with a `payload`-byte value.
    KvWrite,
    /// `read_pct` % reads, the rest writes (deterministic by sequence number).
    Mixed { read_pct: u8 },
}

impl std::str::FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Kind, String> {
        match s {
            "health" | "sys/health" => Ok(Kind::Health),
            "kv-read" | "read" => Ok(Kind::KvRead),
            "kv-write" | "write" => Ok(Kind::KvWrite),
            "mixed" => Ok(Kind::Mixed { read_pct: 90 }),
            other => Err(format!("unknown workload {other:?} (health, kv-read, kv-write, mixed)")),
        }
    }
}

/// One request, ready to send.
#[derive(Clone, Debug)]
pub(crate) struct Req {
    pub method: Method,
    /// Path and query, starting with `/v1/`.
    pub path: String,
    pub body: Option<Bytes>,
    pub authenticated: bool,
}

/// A workload: kind, value size, key-space size.
#[derive(Clone, Debug)]
pub(crate) struct Workload {
    pub kind: Kind,
    pub payload: usize,
    pub keys: u64,
    /// Body every write sends (built once; cloning `Bytes` is cheap).
    body: Bytes,
}

/// KV v2 mount the workloads use (`vha dev` mounts it at `secret/`).
pub(crate) const MOUNT: &str = "secret";

impl Workload {
    pub(crate) fn new(kind: Kind, payload: usize, keys: u64) -> Workload {
        let body = Bytes::from(serde_json::json!({ "data": { "v": "x".repeat(payload) } }).to_string());
        Workload {
            kind,
            payload,
            keys: keys.max(1),
            body,
        }
    }

    /// The request for operation `seq`.
    pub(crate) fn request(&self, seq: u64) -> Req {
        let read = match self.kind {
            Kind::Health => {
                return Req {
                    method: Method::GET,
                    path: "/v1/sys/health".into(),
                    body: None,
                    authenticated: false,
                }
            }
            Kind::KvRead => true,
            Kind::KvWrite => false,
            Kind::Mixed { read_pct } => (seq % 100) < u64::from(read_pct),
        };
        if read {
            Req {
                method: Method::GET,
                path: self.read_path(seq % self.keys),
                body: None,
                authenticated: true,
            }
        } else {
            Req {
                method: Method::POST,
                path: format!("/v1/{MOUNT}/data/bench/w{}", seq % self.keys),
                body: Some(self.body.clone()),
                authenticated: true,
            }
        }
    }

    pub(crate) fn read_path(&self, key: u64) -> String {
        format!("/v1/{MOUNT}/data/bench/k{key}")
    }

    /// Requests that seed the keys reads need (one write per key); empty if nothing reads.
    pub(crate) fn seed_requests(&self) -> Vec<Req> {
        if matches!(self.kind, Kind::Health | Kind::KvWrite) {
            return Vec::new();
        }
        (0..self.keys)
            .map(|k| Req {
                method: Method::POST,
                path: format!("/v1/{MOUNT}/data/bench/k{k}"),
                body: Some(self.body.clone()),
                authenticated: true,
            })
            .collect()
    }

    pub(crate) fn label(&self) -> String {
        match self.kind {
            Kind::Health => "sys/health".into(),
            Kind::KvRead => format!("kv-read {} B", self.payload),
            Kind::KvWrite => format!("kv-write {} B", self.payload),
            Kind::Mixed { read_pct } => format!("mixed {read_pct}% read {} B", self.payload),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The mixed workload is deterministic by sequence number and honours the ratio; paths
    /// stay inside the bounded key space.
    #[test]
    fn mixed_ratio_and_bounded_keys() {
        let w = Workload::new(Kind::Mixed { read_pct: 70 }, 16, 10);
        let reads = (0..1000).filter(|&i| w.request(i).method == Method::GET).count();
        assert_eq!(reads, 700);
        let w = Workload::new(Kind::KvWrite, 1024, 5);
        assert_eq!(w.request(7).path, "/v1/secret/data/bench/w2");
        let body = w.request(0).body.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["data"]["v"].as_str().unwrap().len(), 1024);
        assert!(w.seed_requests().is_empty());
        assert_eq!(Workload::new(Kind::KvRead, 1, 3).seed_requests().len(), 3);
        assert!(!Workload::new(Kind::Health, 1, 3).request(0).authenticated);
    }
}

//! lockd's wire types: the JSON bodies of every endpoint, defined once and shared by the
//! server (`vha-lockd`) and the client ([`super::client`]).
//!
//! Every operation is `POST /v1/<group>/<op>` with a JSON body (keys need no URL escaping);
//! values travel base64-encoded (standard alphabet, padded). Errors are Vault-shaped,
//! `{"errors":["..."]}`, plus a machine-readable `code` and, for fencing, the token numbers.
//! See `lockd/PROTOCOL.md` for the full contract, status codes and limits.

use serde::{Deserialize, Serialize};

use crate::storage::Fence;

/// Paths of the endpoints.
pub mod paths {
    pub const KV_GET: &str = "/v1/kv/get";
    pub const KV_PUT: &str = "/v1/kv/put";
    pub const KV_BATCH: &str = "/v1/kv/batch";
    pub const KV_DELETE: &str = "/v1/kv/delete";
    pub const KV_LIST: &str = "/v1/kv/list";
    pub const LOCK_ACQUIRE: &str = "/v1/lock/acquire";
    pub const LOCK_RENEW: &str = "/v1/lock/renew";
    pub const LOCK_RELEASE: &str = "/v1/lock/release";
    pub const LOCK_HOLDER: &str = "/v1/lock/holder";
    pub const LOCK_CANCEL: &str = "/v1/lock/cancel";
    pub const WATCH: &str = "/v1/watch";
    pub const SNAPSHOT: &str = "/v1/snapshot";
    pub const HEALTH: &str = "/v1/health";
    pub const METRICS: &str = "/metrics";
}

/// Longest a blocking acquire may wait server-side before answering `granted: false`; the
/// client then asks again. Bounds how long a request a vanished HTTP/1.1 client left behind
/// can linger (h2 clients cancel at once with RST_STREAM).
pub const MAX_ACQUIRE_WAIT_MS: u64 = 30_000;

/// How often an idle watch stream carries a `ping` line, so a client notices a dead
/// connection within [`WATCH_DEAD_AFTER_MS`] instead of waiting forever.
pub const WATCH_PING_MS: u64 = 2_000;
/// A watch stream that delivered nothing (not even a ping) for this long is considered dead
/// and re-established: three missed pings, tolerant of a saturated machine.
pub const WATCH_DEAD_AFTER_MS: u64 = 3 * WATCH_PING_MS;

/// Base64 (standard, padded) for values.
pub mod b64 {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&STANDARD.encode(v))
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        STANDARD.decode(s.as_bytes()).map_err(serde::de::Error::custom)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct KeyRequest {
    pub key: String,
}

/// `kv/put`: write `value` at `key`. With `fence`, rejected when the lock has seen a higher
/// token. With `prev_revision`, a compare-and-put: applied only when the key's current
/// revision equals it (0 = the key must not exist).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PutRequest {
    pub key: String,
    #[serde(with = "b64")]
    pub value: Vec<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<Fence>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_revision: Option<u64>,
}

/// One entry of a `kv/batch`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BatchPut {
    pub key: String,
    #[serde(with = "b64")]
    pub value: Vec<u8>,
}

/// `kv/batch`: write every entry of `puts` in order, under one fence check and one durable
/// commit (1 to `MAX_BATCH` entries). With a refused fence nothing is written.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BatchRequest {
    pub puts: Vec<BatchPut>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<Fence>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PutResponse {
    /// The revision the write got (a store-wide, strictly increasing number).
    pub revision: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DeleteRequest {
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fence: Option<Fence>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeleteResponse {
    /// Whether the key existed.
    pub deleted: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct WireEntry {
    pub key: String,
    #[serde(with = "b64")]
    pub value: Vec<u8>,
    /// The fencing token the entry was written with, if the write carried one.
    pub fence_token: Option<u64>,
    pub revision: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct GetResponse {
    pub entry: Option<WireEntry>,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ListRequest {
    pub prefix: String,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ListResponse {
    pub keys: Vec<String>,
}

/// `lock/acquire`: take the lock on `key` with `value`. `wait_ms` = 0 is a try; otherwise the
/// server holds the request up to `min(wait_ms, MAX_ACQUIRE_WAIT_MS)`. Acquiring again with
/// the current holder's value renews that lease and returns its token (so a client whose
/// answer was lost can retry safely).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AcquireRequest {
    pub key: String,
    pub value: String,
    /// Lease TTL; the server's default when absent; must lie within the server's bounds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    #[serde(default)]
    pub wait_ms: u64,
    /// A random id the client gives every request of one acquire call, so it can cancel them
    /// all (`lock/cancel`), including one lockd has not yet seen or is about to grant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u64>,
}

/// `lock/cancel`: the client gave up the acquire call `attempt` on `key`. lockd refuses every
/// later request of that attempt and releases a grant the attempt already got (whose answer
/// the client never used), so a cancelled acquire never keeps the lock.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CancelRequest {
    pub key: String,
    pub attempt: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct CancelResponse {
    /// Whether a grant made to the attempt was released.
    pub released: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AcquireResponse {
    pub granted: bool,
    /// The fencing token of the grant (when granted).
    #[serde(default)]
    pub token: u64,
    /// The TTL the lease runs with (when granted).
    #[serde(default)]
    pub ttl_ms: u64,
    /// How long lockd waited (from receiving the request) before granting, rounded down.
    /// The lease runs from the grant, so the holder's deadline is
    /// `sent + waited_ms + ttl - margin`: still never later than lockd's own.
    #[serde(default)]
    pub waited_ms: u64,
}

/// `lock/renew` and `lock/release`: identify a lease by lock key and token.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LeaseRequest {
    pub key: String,
    pub token: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RenewResponse {
    pub ttl_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct WireHolder {
    pub value: String,
    pub token: u64,
    /// Time left on the lease as lockd sees it.
    pub remaining_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct HolderResponse {
    pub holder: Option<WireHolder>,
}

/// `watch`: exactly one of `prefix` (KV keys starting with it) or `lock` (one lock key).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WatchRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock: Option<String>,
}

/// One line of a watch stream (NDJSON).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum WireEvent {
    Put {
        key: String,
    },
    Delete {
        key: String,
    },
    /// Events were dropped (the watcher fell behind): re-read.
    Resync,
    /// Keep-alive on an idle stream.
    Ping,
}

/// The error body: Vault's `errors` plus a typed `code` (see [`codes`]).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub errors: Vec<String>,
    pub code: String,
    /// For `fenced`: the rejected token and the highest seen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub highest: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock: Option<String>,
}

/// Machine-readable error codes.
pub mod codes {
    pub const MALFORMED: &str = "malformed";
    pub const INVALID: &str = "invalid";
    pub const TOO_LARGE: &str = "too_large";
    pub const NOT_FOUND: &str = "not_found";
    pub const FENCED: &str = "fenced";
    pub const CAS_MISMATCH: &str = "cas_mismatch";
    pub const LOCK_HELD: &str = "lock_held";
    pub const LEASE_EXPIRED: &str = "lease_expired";
    pub const UNKNOWN_LEASE: &str = "unknown_lease";
    pub const UNAVAILABLE: &str = "unavailable";
    pub const INTERNAL: &str = "internal";
    /// 401: no credentials, or wrong ones (see `PROTOCOL.md`, Authentication).
    pub const UNAUTHORIZED: &str = "unauthorized";
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values survive the base64 JSON encoding byte for byte, and events are tagged lines.
    #[test]
    fn round_trips() {
        let p = PutRequest {
            key: "a".into(),
            value: (0..=255).collect(),
            fence: None,
            prev_revision: Some(0),
        };
        let s = serde_json::to_string(&p).unwrap();
        assert_eq!(serde_json::from_str::<PutRequest>(&s).unwrap(), p);
        let e = serde_json::to_string(&WireEvent::Put { key: "k".into() }).unwrap();
        assert_eq!(e, r#"{"type":"put","key":"k"}"#);
        assert!(serde_json::from_str::<PutRequest>(r#"{"key":"a","value":"!!"}"#).is_err());
    }
}

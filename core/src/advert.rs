//! The active node's advertisement: what it writes (through the barrier) at
//! `core/leader/<uuid>` so standbys and proxies can redirect to it or forward to it.
//!
//! Only the entry whose UUID equals the current value of the `core/lock` holder is believed;
//! because it is barrier-encrypted with the storage path as associated data, it is also
//! authenticated: nobody without the barrier key can forge or move one.

use serde::{Deserialize, Serialize};

/// Storage key of the HA lock (Vault's `core/lock`).
pub const LOCK_KEY: &str = "core/lock";
/// Prefix under which advertisements live (Vault's `core/leader/`).
pub const LEADER_PREFIX: &str = "core/leader/";

/// The storage path of the advertisement written by the holder with lock value `uuid`.
pub fn leader_path(uuid: &str) -> String {
    format!("{LEADER_PREFIX}{uuid}")
}

/// The P-521 private key parameters, as Vault's `clusterKeyParams` (big-endian scalars,
/// base64 in JSON).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterKeyParams {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(with = "b64")]
    pub x: Vec<u8>,
    #[serde(with = "b64")]
    pub y: Vec<u8>,
    #[serde(with = "b64")]
    pub d: Vec<u8>,
}

/// The advertisement JSON (Vault's `activeAdvertisement`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Advertisement {
    /// The active node's `api_addr` (where 307s point).
    pub redirect_addr: String,
    /// The active node's cluster address (`https://host:port`).
    pub cluster_addr: String,
    /// The self-signed cluster certificate, DER.
    #[serde(with = "b64")]
    pub cluster_cert: Vec<u8>,
    pub cluster_key_params: Option<ClusterKeyParams>,
}

mod b64 {
    use base64::Engine;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(v))
    }
    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(serde::de::Error::custom)
    }
}

//! The active node's advertisement: what it writes (through the barrier) at
//! `core/leader/<uuid>` so standbys and proxies can redirect to it or forward to it.
//!
//! Only the entry whose UUID equals the current value of the `core/lock` holder is believed;
//! because it is barrier-encrypted with the storage path as associated data, it is also
//! authenticated: nobody without the barrier key can forge or move one.

use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

/// Storage key of the HA lock (Vault's `core/lock`).
pub const LOCK_KEY: &str = "core/lock";
/// Prefix under which advertisements live (Vault's `core/leader/`).
pub const LEADER_PREFIX: &str = "core/leader/";

/// The storage path of the advertisement written by the holder with lock value `uuid`.
pub fn leader_path(uuid: &str) -> String {
    format!("{LEADER_PREFIX}{uuid}")
}

/// The P-521 private key parameters, as Vault's `clusterKeyParams` (big-endian scalars,
/// base64 in JSON). The private scalar `d` is zeroized on drop and never shown by `Debug`.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterKeyParams {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(with = "b64")]
    pub x: Vec<u8>,
    #[serde(with = "b64")]
    pub y: Vec<u8>,
    #[serde(with = "b64_secret")]
    pub d: Zeroizing<Vec<u8>>,
}

impl std::fmt::Debug for ClusterKeyParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterKeyParams")
            .field("kind", &self.kind)
            .field("x_len", &self.x.len())
            .field("y_len", &self.y.len())
            .field("d", &format_args!("<redacted>"))
            .finish()
    }
}

/// The advertisement JSON (Vault's `activeAdvertisement`). It carries the term's private
/// key: it is stored only through the barrier, and `Debug` redacts the key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
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

impl std::fmt::Debug for Advertisement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Advertisement")
            .field("redirect_addr", &self.redirect_addr)
            .field("cluster_addr", &self.cluster_addr)
            .field("cluster_cert_len", &self.cluster_cert.len())
            .field("cluster_key_params", &self.cluster_key_params)
            .finish()
    }
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

/// Base64 for secret bytes: the encoded and decoded forms live only in zeroizing buffers.
mod b64_secret {
    use base64::Engine;
    use serde::{Deserializer, Serializer};
    use zeroize::Zeroizing;

    pub(super) fn serialize<S: Serializer>(v: &Zeroizing<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        let enc = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(v.as_slice()));
        s.serialize_str(&enc)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Zeroizing<Vec<u8>>, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Zeroizing<Vec<u8>>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a base64 string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Zeroizing<Vec<u8>>, E> {
                let mut out = Zeroizing::new(vec![0u8; base64::decoded_len_estimate(v.len())]);
                let n = base64::engine::general_purpose::STANDARD
                    .decode_slice(v.as_bytes(), &mut out[..])
                    .map_err(E::custom)?;
                out.truncate(n);
                Ok(out)
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Zeroizing<Vec<u8>>, E> {
                let v = Zeroizing::new(v);
                self.visit_str(&v)
            }
        }
        d.deserialize_str(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `Debug` of an advertisement (and of its key params) never shows the private scalar,
    /// in any form; the addresses stay readable. The JSON round trip keeps the scalar.
    #[test]
    fn debug_redacts_the_private_key() {
        let d = Zeroizing::new(vec![0xC7u8; 66]);
        let d_b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, d.as_slice());
        let adv = Advertisement {
            redirect_addr: "http://127.0.0.1:8200".into(),
            cluster_addr: "https://127.0.0.1:8201".into(),
            cluster_cert: vec![1, 2, 3],
            cluster_key_params: Some(ClusterKeyParams {
                kind: "p521".into(),
                x: vec![5; 66],
                y: vec![6; 66],
                d,
            }),
        };
        for dbg in [
            format!("{adv:?}"),
            format!("{adv:#?}"),
            format!("{:?}", adv.cluster_key_params),
        ] {
            assert!(!dbg.contains("199"), "{dbg}");
            assert!(!dbg.to_lowercase().contains("c7"), "{dbg}");
            assert!(!dbg.contains(&d_b64[..12]), "{dbg}");
            assert!(dbg.contains("<redacted>"), "{dbg}");
        }
        assert!(format!("{adv:?}").contains("https://127.0.0.1:8201"));
        let json = serde_json::to_vec(&adv).unwrap();
        assert!(String::from_utf8_lossy(&json).contains(&d_b64));
        let back: Advertisement = serde_json::from_slice(&json).unwrap();
        assert_eq!(back, adv);
        assert!(serde_json::from_str::<ClusterKeyParams>(r#"{"type":"p521","x":"","y":"","d":"@"}"#).is_err());
    }
}

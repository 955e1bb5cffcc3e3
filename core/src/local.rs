//! The pair's private channel: what a node tells its own proxy over the unix socket they
//! share. `GET` [`STATE_PATH`] on the socket streams [`LocalState`] as newline-delimited
//! JSON: one line at connect, one on every change (seal, unseal, role, term). The stream
//! ending means the node went away (crash, restart): the proxy keeps its last authenticated
//! advertisement and keeps watching storage.
//!
//! Both ends check who is on the other side, by the credentials the kernel records for a
//! unix socket (`SO_PEERCRED`), before a byte crosses: the node serves only its own user or
//! `proxy { allowed_uid }` ([`node_accepts`]); the proxy talks only to a node of its own
//! user or `proxy { node_uid }` ([`proxy_accepts`]).
//!
//! The keyring travels only here, only while the node is unsealed, as a [`WireKeyring`]
//! (zeroized on drop, redacted in `Debug`); the proxy holds it in memory and drops it when a
//! line says `sealed`.

use base64::Engine;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zeroize::Zeroizing;

use crate::barrier::Keyring;
use crate::error::BarrierError;
use crate::storage::Fence;

/// The state stream's path on the node's unix socket.
pub const STATE_PATH: &str = "/vha/local/state";

/// Room for everything of a state line but the keyring (role, fence, pid, flags: about
/// 200 bytes), with a wide margin so that [`LocalState::to_line`] serializes in one pass.
const LINE_OVERHEAD: usize = 1024;

/// One line of the state stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalState {
    pub initialized: bool,
    pub sealed: bool,
    /// A [`crate::pair::PairRole`]'s wire string: `disabled` (no HA: serves when unsealed),
    /// `sealed`, `standby` or `active`.
    pub role: String,
    /// The barrier keyring, present only while unsealed.
    pub keyring: Option<WireKeyring>,
    /// The node's fencing token while active: lets the proxy release the lock early on
    /// proof that the node process is gone.
    pub fence: Option<Fence>,
    /// The node's process id (for that proof).
    pub pid: u32,
    /// A random number drawn once per node process ([`instance_id`]): when it changes, a
    /// new process is speaking (the node restarted), not the same one sealed by request.
    /// Process ids do not tell this apart (a node in a container is pid 1 every time).
    #[serde(default)]
    pub instance: u64,
    /// `disable_clustering` from the config: 307 instead of forwarding.
    pub disable_clustering: bool,
}

impl LocalState {
    /// The line as sent: JSON and a newline, in a buffer that is zeroized on drop. The
    /// buffer is sized up front and written in place (never grown by reallocation), so no
    /// unzeroized partial copy of the keyring is left behind in freed memory.
    pub fn to_line(&self) -> Result<Zeroizing<Vec<u8>>, serde_json::Error> {
        let mut cap = LINE_OVERHEAD + self.keyring.as_ref().map_or(0, |k| k.0.len());
        loop {
            let mut buf = Zeroizing::new(vec![0u8; cap]);
            let room = {
                let mut w: &mut [u8] = &mut buf[..];
                match serde_json::to_writer(&mut w, self) {
                    Ok(()) => Some(w.len()),
                    // The only I/O error writing to a slice: it is full.
                    Err(e) if e.is_io() => None,
                    Err(e) => return Err(e),
                }
            };
            match room {
                Some(room) if room > 0 => {
                    let len = cap - room;
                    buf[len] = b'\n';
                    buf.truncate(len + 1);
                    return Ok(buf);
                }
                _ => cap *= 2,
            }
        }
    }

    /// Parses one line (without its newline).
    pub fn from_line(line: &[u8]) -> Result<LocalState, serde_json::Error> {
        serde_json::from_slice(line)
    }

    /// The same state without the keyring (what the proxy keeps after handing the keyring
    /// on): no copy of the keyring is made.
    pub fn without_keyring(&self) -> LocalState {
        LocalState {
            initialized: self.initialized,
            sealed: self.sealed,
            role: self.role.clone(),
            keyring: None,
            fence: self.fence.clone(),
            pid: self.pid,
            instance: self.instance,
            disable_clustering: self.disable_clustering,
        }
    }
}

/// This process's [`LocalState::instance`]: drawn on first use, the same afterwards.
pub fn instance_id() -> u64 {
    static ID: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    // Never 0: a state line from a node that predates the field parses as 0.
    *ID.get_or_init(|| rand::random::<u64>().max(1))
}

/// The barrier keyring as it crosses the pair socket: base64 of `Keyring::to_bytes`, a
/// JSON string. Zeroized on drop, `<redacted>` in `Debug`; encoded and decoded through
/// zeroizing buffers only.
#[derive(Clone, PartialEq, Eq)]
pub struct WireKeyring(Zeroizing<String>);

impl WireKeyring {
    pub fn encode(keyring: &Keyring) -> WireKeyring {
        let bytes = keyring.to_bytes();
        WireKeyring(Zeroizing::new(
            base64::engine::general_purpose::STANDARD.encode(bytes.as_slice()),
        ))
    }

    /// The keyring, or why this is not one.
    pub fn decode(&self) -> Result<Keyring, BarrierError> {
        let b64 = self.0.as_bytes();
        let mut bytes = Zeroizing::new(vec![0u8; base64::decoded_len_estimate(b64.len())]);
        let n = base64::engine::general_purpose::STANDARD
            .decode_slice(b64, &mut bytes[..])
            .map_err(|e| BarrierError::InvalidKey(format!("keyring: {e}")))?;
        bytes.truncate(n);
        Keyring::from_bytes(&bytes)
    }
}

impl std::fmt::Debug for WireKeyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WireKeyring(<redacted>)")
    }
}

impl Serialize for WireKeyring {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for WireKeyring {
    /// Copies the string once, straight into a zeroizing buffer (no intermediate `String`).
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<WireKeyring, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = WireKeyring;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a base64 keyring string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<WireKeyring, E> {
                Ok(WireKeyring(Zeroizing::new(v.to_owned())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<WireKeyring, E> {
                Ok(WireKeyring(Zeroizing::new(v)))
            }
        }
        d.deserialize_str(Visitor)
    }
}

/// Whether the node serves a connection whose peer runs as `peer_uid`: its own user
/// (`node_uid`, the proxy of a single-user pair) or the configured `allowed_uid` (a proxy
/// run as another user). Anyone else, root included, is refused: root needs no socket to
/// read the node's memory, and nobody else may have the keyring.
pub fn node_accepts(peer_uid: u32, node_uid: u32, allowed_uid: Option<u32>) -> bool {
    peer_uid == node_uid || Some(peer_uid) == allowed_uid
}

/// Whether the proxy believes the process listening on the socket is its node: it must run
/// as the configured `node_uid`, or as the proxy's own user when none is configured. A
/// process that replaced the socket path under another user can then neither feed the
/// proxy a keyring and state nor receive its clients' requests.
pub fn proxy_accepts(peer_uid: u32, proxy_uid: u32, node_uid: Option<u32>) -> bool {
    peer_uid == node_uid.unwrap_or(proxy_uid)
}

/// The socket file's mode. 0600 when only the node's own user may connect. With another
/// `allowed_uid` it is 0666: a file mode cannot name one other user, so the peer-credential
/// check ([`node_accepts`]) is the gate, and the permissions of the directory around the
/// socket can add a filesystem gate (e.g. a directory only the pair's users may enter).
pub fn socket_mode(node_uid: u32, allowed_uid: Option<u32>) -> u32 {
    match allowed_uid {
        Some(uid) if uid != node_uid => 0o666,
        _ => 0o600,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A keyring whose key bytes and base64 form are recognisable in any output.
    fn known_keyring() -> (Keyring, String) {
        let k = Keyring::from_key(7, &[0xAB; 32]);
        let b64 = base64::engine::general_purpose::STANDARD.encode(k.to_bytes().as_slice());
        (k, b64)
    }

    fn state(keyring: Option<WireKeyring>) -> LocalState {
        LocalState {
            initialized: true,
            sealed: false,
            role: "active".into(),
            keyring,
            fence: Some(Fence {
                lock: "core/lock".into(),
                token: 42,
            }),
            pid: 1234,
            instance: 99,
            disable_clustering: false,
        }
    }

    /// The wire keyring round-trips through a state line into the same keyring (it opens
    /// what the original sealed), and serializes as the plain base64 string the node has
    /// always sent.
    #[test]
    fn wire_keyring_round_trip() {
        let (k, b64) = known_keyring();
        let st = state(Some(WireKeyring::encode(&k)));
        let line = st.to_line().unwrap();
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        let text = std::str::from_utf8(&line).unwrap();
        assert!(text.contains(&format!("\"keyring\":\"{b64}\"")), "{text}");
        let back = LocalState::from_line(&line[..line.len() - 1]).unwrap();
        assert_eq!(back, st);
        let k2 = back.keyring.as_ref().unwrap().decode().unwrap();
        let ct = k.encrypt("p", b"v");
        assert_eq!(k2.decrypt("p", &ct).unwrap(), b"v");
        assert_eq!(k2.active_term(), 7);
        // Without a keyring, and with one not made of base64 or not a keyring.
        let none = state(None);
        let line = none.to_line().unwrap();
        assert_eq!(LocalState::from_line(&line[..line.len() - 1]).unwrap(), none);
        let bad: LocalState = serde_json::from_str(
            r#"{"initialized":true,"sealed":false,"role":"x","keyring":"@@@","fence":null,"pid":1,"disable_clustering":false}"#,
        )
        .unwrap();
        assert!(bad.keyring.unwrap().decode().is_err());
        assert!(
            WireKeyring(Zeroizing::new("e30=".into())).decode().is_err(),
            "{{}} is no keyring"
        );
    }

    /// A line longer than the first guess of its size (a keyring with many terms) is still
    /// written whole.
    #[test]
    fn long_line_grows_to_fit() {
        let mut st = state(None);
        st.role = "r".repeat(3 * LINE_OVERHEAD);
        let line = st.to_line().unwrap();
        assert_eq!(LocalState::from_line(&line[..line.len() - 1]).unwrap(), st);
    }

    /// `Debug` of the wire keyring, of a state line carrying it, and of the state without
    /// it never shows the keyring; the rest stays readable.
    #[test]
    fn debug_redacts_the_keyring() {
        let (k, b64) = known_keyring();
        let st = state(Some(WireKeyring::encode(&k)));
        let dbg = format!("{st:?} {:?} {:?}", st.keyring, st.without_keyring());
        assert!(!dbg.contains(&b64), "{dbg}");
        assert!(!dbg.contains(&b64[..16]), "{dbg}");
        assert!(
            dbg.contains("<redacted>") && dbg.contains("active") && dbg.contains("1234"),
            "{dbg}"
        );
        assert_eq!(st.without_keyring().keyring, None);
        assert_eq!(st.without_keyring().fence, st.fence);
    }

    /// The node accepts its own user and the configured one only; the proxy accepts only the
    /// expected node user; the socket is 0600 unless another user must reach it.
    #[test]
    fn peer_rules() {
        assert!(node_accepts(1000, 1000, None));
        assert!(!node_accepts(0, 1000, None), "root is not the node's proxy");
        assert!(!node_accepts(1001, 1000, None));
        assert!(node_accepts(1001, 1000, Some(1001)));
        assert!(node_accepts(1000, 1000, Some(1001)));
        assert!(!node_accepts(1002, 1000, Some(1001)));
        assert!(proxy_accepts(1000, 1000, None));
        assert!(!proxy_accepts(1001, 1000, None));
        assert!(!proxy_accepts(0, 1000, None));
        assert!(proxy_accepts(999, 1000, Some(999)));
        assert!(!proxy_accepts(1000, 1000, Some(999)));
        assert_eq!(socket_mode(1000, None), 0o600);
        assert_eq!(socket_mode(1000, Some(1000)), 0o600);
        assert_eq!(socket_mode(1000, Some(1001)), 0o666);
    }
}

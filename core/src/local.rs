//! The pair's private channel: what a node tells its own proxy over the unix socket
//! (mode 0600) they share. `GET` [`STATE_PATH`] on the socket streams [`LocalState`] as
//! newline-delimited JSON: one line at connect, one on every change (seal, unseal, role,
//! term). The stream ending means the node went away (crash, restart): the proxy keeps its
//! last authenticated advertisement and keeps watching storage.
//!
//! The keyring travels only here, only while the node is unsealed; the proxy holds it in
//! memory and drops it when a line says `sealed`.

use serde::{Deserialize, Serialize};

use crate::storage::Fence;

/// The state stream's path on the node's unix socket.
pub const STATE_PATH: &str = "/vha/local/state";

/// One line of the state stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalState {
    pub initialized: bool,
    pub sealed: bool,
    /// `disabled` (no HA: serves when unsealed), `sealed`, `standby` or `active`.
    pub role: String,
    /// The barrier keyring (base64 of `Keyring::to_bytes`), present only while unsealed.
    pub keyring: Option<String>,
    /// The node's fencing token while active: lets the proxy release the lock early on
    /// proof that the node process is gone.
    pub fence: Option<Fence>,
    /// The node's process id (for that proof).
    pub pid: u32,
    /// `disable_clustering` from the config: 307 instead of forwarding.
    pub disable_clustering: bool,
}

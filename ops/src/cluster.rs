//! `cluster.json`: what `vha dev` started, typed once for the tools that read it (`vha
//! bench`, the tests' dev harness, and people with `jq`). It holds the root token and the
//! unseal key of a dev cluster, so it is written with mode 0600.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One pair (node and, unless `--no-proxy`, its proxy).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct NodeInfo {
    pub name: String,
    /// The address clients use: the proxy's listener, or the node's without proxies.
    pub api_addr: String,
    #[serde(default)]
    pub cluster_addr: Option<String>,
    /// Where the node itself answers on loopback (the bench's `node` scenario).
    #[serde(default)]
    pub node_addr: Option<String>,
    #[serde(default)]
    pub node_pid: Option<u32>,
    #[serde(default)]
    pub proxy_pid: Option<u32>,
    /// The proxy's PID file and upgrade socket directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_run_dir: Option<String>,
    /// The proxy's metrics listener (`host:port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub proxy_metrics_addr: Option<String>,
    /// The node's config file (default: `node-<i>.hcl` beside cluster.json).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    /// Fields this version does not know, kept when the file is written back.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl NodeInfo {
    /// A node known only by its name and address (a peer system's node, a `--target`).
    pub fn new(name: &str, api_addr: &str) -> NodeInfo {
        NodeInfo {
            name: name.to_string(),
            api_addr: api_addr.to_string(),
            cluster_addr: None,
            node_addr: None,
            node_pid: None,
            proxy_pid: None,
            proxy_run_dir: None,
            proxy_metrics_addr: None,
            config: None,
            extra: Default::default(),
        }
    }

    /// Where the node process itself answers (its own listener, never the proxy).
    pub fn node_url(&self) -> &str {
        self.node_addr.as_deref().unwrap_or(&self.api_addr)
    }
}

/// The cluster's lockd.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct LockdInfo {
    pub addr: String,
    /// Its PID, when the file's writer started it.
    #[serde(default)]
    pub pid: Option<u32>,
    /// The bearer token file lockd and the nodes read.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

/// One member of the cluster's etcd (`vha dev --storage etcd`).
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct EtcdMember {
    /// Its client URL.
    pub addr: String,
    /// Its PID, when the file's writer started it.
    #[serde(default)]
    pub pid: Option<u32>,
}

/// `cluster.json` as `vha dev` writes it.
#[derive(Clone, Debug, Deserialize, Serialize)]
pub struct ClusterFile {
    pub root_token: String,
    #[serde(default)]
    pub unseal_keys_b64: Vec<String>,
    /// The lockd, when lockd is the store (`null` on etcd).
    #[serde(default)]
    pub lockd: Option<LockdInfo>,
    /// The etcd members, when etcd is the store.
    #[serde(default)]
    pub etcd: Vec<EtcdMember>,
    pub nodes: Vec<NodeInfo>,
    /// Fields this version does not know, kept when the file is written back.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
    /// Where it was read from or is written to (not in the file).
    #[serde(skip)]
    pub path: Option<PathBuf>,
}

impl ClusterFile {
    pub fn load(path: &Path) -> Result<ClusterFile, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut c: ClusterFile = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        if c.nodes.is_empty() {
            return Err(format!("{}: no nodes", path.display()));
        }
        c.path = Some(path.to_path_buf());
        Ok(c)
    }

    /// Config file of node `i` (for restarts after a kill).
    pub fn config_of(&self, i: usize) -> PathBuf {
        if let Some(c) = &self.nodes[i].config {
            return PathBuf::from(c);
        }
        let dir = self.path.as_deref().and_then(Path::parent).unwrap_or(Path::new("."));
        dir.join(format!("node-{i}.hcl"))
    }

    /// Writes the file to its path (mode 0600: it holds the root token and unseal keys).
    pub fn save(&self) -> Result<(), String> {
        let Some(path) = &self.path else { return Ok(()) };
        let text = serde_json::to_string_pretty(self).map_err(|e| e.to_string())?;
        write_private(path, text.as_bytes()).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// The proxies are running (`proxy_pid` set on every node).
    pub fn has_proxies(&self) -> bool {
        self.nodes.iter().all(|n| n.proxy_pid.is_some())
    }
}

/// Writes `bytes` to `path`, created or truncated, with mode 0600 (also when the file
/// existed with a wider mode: the mode of `open` applies only to a file it creates).
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(bytes)
}

/// A fresh random lockd bearer token (32 random bytes, hex), written to `path` (0600) for
/// lockd's `--token-file`; returned for the clients.
pub fn new_lockd_token(path: &Path) -> Result<zeroize::Zeroizing<String>, String> {
    let token = zeroize::Zeroizing::new(hex::encode(rand::random::<[u8; 32]>()));
    write_private(path, format!("{}\n", token.as_str()).as_bytes()).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file written by `save` loads back the same, fields this version does not know
    /// survive the round trip, and the file is private (0600).
    #[test]
    fn the_cluster_file_round_trips_privately_and_keeps_unknown_fields() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.json");
        let text = r#"{"root_token":"r","unseal_keys_b64":["k"],"lockd":{"addr":"http://127.0.0.1:1","pid":7,"token_file":"/t"},
            "nodes":[{"name":"node-0","api_addr":"http://127.0.0.1:2","node_pid":8,"proxy_pid":null,"later":1}],"future":true}"#;
        std::fs::write(&path, text).unwrap();
        let mut c = ClusterFile::load(&path).unwrap();
        assert_eq!(c.lockd.as_ref().and_then(|l| l.pid), Some(7));
        assert!(c.etcd.is_empty() && !c.has_proxies());
        assert_eq!(c.config_of(0), dir.path().join("node-0.hcl"));
        c.nodes[0].node_pid = Some(9);
        c.save().unwrap();
        let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(v["future"], true);
        assert_eq!(v["nodes"][0]["later"], 1);
        assert_eq!(v["nodes"][0]["node_pid"], 9);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    }

    /// A file from another writer, which did not start lockd (no PID) and names no etcd,
    /// loads.
    #[test]
    fn a_cluster_file_without_pids_loads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cluster.json");
        let text = r#"{"root_token":"r","lockd":{"addr":"http://127.0.0.1:1","pid":null},"nodes":[{"name":"n","api_addr":"http://127.0.0.1:2"}]}"#;
        std::fs::write(&path, text).unwrap();
        let c = ClusterFile::load(&path).unwrap();
        assert_eq!(c.lockd.map(|l| l.pid), Some(None));
    }
}

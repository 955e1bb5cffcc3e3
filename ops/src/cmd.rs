//! Vault-style client commands: `vha status` and `vha operator init|unseal|seal|step-down|
//! members`. They honour `VAULT_ADDR`, `VAULT_TOKEN`, `VAULT_CACERT` and
//! `VAULT_SKIP_VERIFY`, follow 307s from standbys (keeping method, body and token), and print
//! `vault`'s tables or, with `-format=json`, the API's JSON.
//!
//! Exit codes as `vault status`: 0 ok (unsealed), 2 sealed, 1 error.

use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde_json::{json, Value};

use crate::client::{errors, Client, Method, Tls};

/// Default server address, as Vault's CLI.
const DEFAULT_ADDR: &str = "https://127.0.0.1:8200";
/// Bound on one CLI request (including redirects).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Args, Debug, Clone)]
struct Common {
    /// Server address (default: $VAULT_ADDR or https://127.0.0.1:8200).
    #[arg(long)]
    address: Option<String>,
    /// Output format: table or json.
    #[arg(long, default_value = "table")]
    format: String,
    /// CA certificate (PEM) to verify the server (default: $VAULT_CACERT).
    #[arg(long)]
    ca_cert: Option<std::path::PathBuf>,
    /// Skip TLS verification (default: $VAULT_SKIP_VERIFY); for tests only.
    #[arg(long)]
    tls_skip_verify: bool,
}

#[derive(Parser, Debug)]
#[command(name = "vha status", about = "Print the seal and HA status of a server")]
struct StatusArgs {
    #[command(flatten)]
    common: Common,
}

#[derive(Parser, Debug)]
#[command(name = "vha operator", about = "Operate a vha cluster")]
struct OperatorArgs {
    #[command(subcommand)]
    cmd: OperatorCmd,
}

/// `Debug` never shows an unseal key given on the command line.
#[derive(Subcommand)]
enum OperatorCmd {
    /// Initialize the barrier and print the unseal keys and root token.
    Init {
        #[command(flatten)]
        common: Common,
        #[arg(long, default_value_t = 5)]
        key_shares: u64,
        #[arg(long, default_value_t = 3)]
        key_threshold: u64,
    },
    /// Submit one unseal key (or `-reset`).
    Unseal {
        #[command(flatten)]
        common: Common,
        /// The key (hex or base64); read from standard input when omitted.
        key: Option<String>,
        #[arg(long)]
        reset: bool,
    },
    /// Seal the active node (needs a token with sudo on sys/seal).
    Seal {
        #[command(flatten)]
        common: Common,
    },
    /// Make the active node give up the lock.
    StepDown {
        #[command(flatten)]
        common: Common,
    },
    /// List the cluster's nodes (sys/ha-status).
    Members {
        #[command(flatten)]
        common: Common,
    },
}

impl std::fmt::Debug for OperatorCmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OperatorCmd::Init {
                common,
                key_shares,
                key_threshold,
            } => f
                .debug_struct("Init")
                .field("common", common)
                .field("key_shares", key_shares)
                .field("key_threshold", key_threshold)
                .finish(),
            OperatorCmd::Unseal { common, key, reset } => f
                .debug_struct("Unseal")
                .field("common", common)
                .field("key", &key.as_ref().map(|_| format_args!("<redacted>")))
                .field("reset", reset)
                .finish(),
            OperatorCmd::Seal { common } => f.debug_struct("Seal").field("common", common).finish(),
            OperatorCmd::StepDown { common } => f.debug_struct("StepDown").field("common", common).finish(),
            OperatorCmd::Members { common } => f.debug_struct("Members").field("common", common).finish(),
        }
    }
}

/// The server a command talks to, with the environment's token.
struct Server {
    api: Client,
    addr: String,
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl Server {
    fn new(c: &Common) -> Result<Server, String> {
        let addr = c
            .address
            .clone()
            .or_else(|| env("VAULT_ADDR"))
            .unwrap_or_else(|| DEFAULT_ADDR.to_string());
        let tls = Tls {
            ca_cert: c.ca_cert.clone().or_else(|| env("VAULT_CACERT").map(Into::into)),
            skip_verify: c.tls_skip_verify
                || env("VAULT_SKIP_VERIFY")
                    .and_then(|v| vha_core::config::parse_bool(&v))
                    .unwrap_or(false),
        };
        Ok(Server {
            api: Client::new(&tls, REQUEST_TIMEOUT)?.with_token(env("VAULT_TOKEN")),
            addr: addr.trim_end_matches('/').to_string(),
        })
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Result<(u16, Value), String> {
        self.api
            .call(method, &format!("{}/v1/{path}", self.addr), body.as_ref())
            .await
            .map_err(|e| format!("error contacting {}: {e}", self.addr))
    }

    /// A call that must succeed (2xx), else the server's errors.
    async fn must(&self, method: Method, path: &str, body: Option<Value>) -> Result<Value, String> {
        let (st, v) = self.call(method, path, body).await?;
        if (200..300).contains(&st) {
            Ok(v)
        } else {
            Err(format!("Error: {} (code {st}): {}", path, errors(&v)))
        }
    }
}

fn table(rows: &[(&str, String)]) -> String {
    let w = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(3).max(3);
    let mut out = format!("{:<w$}    Value\n{:<w$}    -----\n", "Key", "---");
    for (k, v) in rows {
        out.push_str(&format!("{k:<w$}    {v}\n"));
    }
    out
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "n/a".into(),
        other => other.to_string(),
    }
}

fn run<F: std::future::Future<Output = Result<ExitCode, String>>>(f: F) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(f) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(1)
        }
    }
}

fn parse<T: Parser>(name: &str, args: Vec<String>) -> Result<T, ExitCode> {
    T::try_parse_from(std::iter::once(name.to_string()).chain(args)).map_err(|e| {
        let _ = e.print();
        ExitCode::from(if e.use_stderr() { 1 } else { 0 })
    })
}

/// `vha status`.
pub fn status(args: Vec<String>) -> ExitCode {
    let a: StatusArgs = match parse("vha status", args) {
        Ok(a) => a,
        Err(c) => return c,
    };
    run(async move {
        let c = Server::new(&a.common)?;
        let (_, seal) = c.call(Method::GET, "sys/seal-status", None).await?;
        if seal.is_null() {
            return Err(format!("Error checking seal status: no answer from {}", c.addr));
        }
        let sealed = seal["sealed"] == true;
        let leader = if sealed {
            Value::Null
        } else {
            c.call(Method::GET, "sys/leader", None).await?.1
        };
        if a.common.format == "json" {
            let mut out = seal.clone();
            if !leader.is_null() {
                out["ha_enabled"] = leader["ha_enabled"].clone();
                out["is_self"] = leader["is_self"].clone();
                out["active_time"] = leader["active_time"].clone();
                out["leader_address"] = leader["leader_address"].clone();
                out["leader_cluster_address"] = leader["leader_cluster_address"].clone();
            }
            println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
        } else {
            let mut rows = vec![
                ("Seal Type", s(&seal["type"])),
                ("Initialized", s(&seal["initialized"])),
                ("Sealed", s(&seal["sealed"])),
                ("Total Shares", s(&seal["n"])),
                ("Threshold", s(&seal["t"])),
            ];
            if sealed {
                rows.push(("Unseal Progress", format!("{}/{}", s(&seal["progress"]), s(&seal["t"]))));
                rows.push(("Unseal Nonce", s(&seal["nonce"])));
            }
            rows.push(("Version", s(&seal["version"])));
            rows.push(("Storage Type", s(&seal["storage_type"])));
            if !sealed {
                rows.push(("Cluster Name", s(&seal["cluster_name"])));
                rows.push(("Cluster ID", s(&seal["cluster_id"])));
            }
            rows.push((
                "HA Enabled",
                if leader.is_null() {
                    "n/a".into()
                } else {
                    s(&leader["ha_enabled"])
                },
            ));
            if leader["ha_enabled"] == true {
                rows.push(("HA Cluster", s(&leader["leader_cluster_address"])));
                rows.push((
                    "HA Mode",
                    if leader["is_self"] == true {
                        "active".into()
                    } else {
                        "standby".into()
                    },
                ));
                if leader["is_self"] == true {
                    rows.push(("Active Since", s(&leader["active_time"])));
                } else {
                    rows.push(("Active Node Address", s(&leader["leader_address"])));
                }
            }
            print!("{}", table(&rows));
        }
        Ok(if sealed { ExitCode::from(2) } else { ExitCode::SUCCESS })
    })
}

/// `vha operator ...`.
pub fn operator(args: Vec<String>) -> ExitCode {
    let a: OperatorArgs = match parse("vha operator", args) {
        Ok(a) => a,
        Err(c) => return c,
    };
    run(async move {
        match a.cmd {
            OperatorCmd::Init {
                common,
                key_shares,
                key_threshold,
            } => {
                let c = Server::new(&common)?;
                let v = c
                    .must(
                        Method::PUT,
                        "sys/init",
                        Some(json!({"secret_shares": key_shares, "secret_threshold": key_threshold})),
                    )
                    .await?;
                if common.format == "json" {
                    let out = json!({
                        "unseal_keys_b64": v["keys_base64"],
                        "unseal_keys_hex": v["keys"],
                        "unseal_shares": key_shares,
                        "unseal_threshold": key_threshold,
                        "root_token": v["root_token"],
                    });
                    println!("{}", serde_json::to_string_pretty(&out).unwrap_or_default());
                } else {
                    for (i, k) in v["keys_base64"].as_array().into_iter().flatten().enumerate() {
                        println!("Unseal Key {}: {}", i + 1, s(k));
                    }
                    println!("\nInitial Root Token: {}\n", s(&v["root_token"]));
                    println!(
                        "Vault initialized with {key_shares} key shares and a key threshold of {key_threshold}. Please\n\
                         securely distribute the key shares printed above. When the Vault is re-sealed,\n\
                         restarted, or stopped, you must supply at least {key_threshold} of these keys to unseal it\n\
                         before it can start servicing requests."
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
            OperatorCmd::Unseal { common, key, reset } => {
                let c = Server::new(&common)?;
                let body = if reset {
                    json!({"reset": true})
                } else {
                    let key = match key {
                        Some(k) => k,
                        None => {
                            let mut line = String::new();
                            std::io::stdin().read_line(&mut line).map_err(|e| e.to_string())?;
                            line.trim().to_string()
                        }
                    };
                    json!({ "key": key })
                };
                let v = c.must(Method::PUT, "sys/unseal", Some(body)).await?;
                if common.format == "json" {
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                } else {
                    let mut rows = vec![
                        ("Seal Type", s(&v["type"])),
                        ("Initialized", s(&v["initialized"])),
                        ("Sealed", s(&v["sealed"])),
                        ("Total Shares", s(&v["n"])),
                        ("Threshold", s(&v["t"])),
                    ];
                    if v["sealed"] == true {
                        rows.push(("Unseal Progress", format!("{}/{}", s(&v["progress"]), s(&v["t"]))));
                        rows.push(("Unseal Nonce", s(&v["nonce"])));
                    }
                    rows.push(("Version", s(&v["version"])));
                    rows.push(("Storage Type", s(&v["storage_type"])));
                    print!("{}", table(&rows));
                }
                Ok(ExitCode::SUCCESS)
            }
            OperatorCmd::Seal { common } => {
                let c = Server::new(&common)?;
                c.must(Method::PUT, "sys/seal", None).await?;
                println!("Success! Vault is sealed.");
                Ok(ExitCode::SUCCESS)
            }
            OperatorCmd::StepDown { common } => {
                let c = Server::new(&common)?;
                c.must(Method::PUT, "sys/step-down", None).await?;
                println!("Success! Stepped down: {}", c.addr);
                Ok(ExitCode::SUCCESS)
            }
            OperatorCmd::Members { common } => {
                let c = Server::new(&common)?;
                let v = c.must(Method::GET, "sys/ha-status", None).await?;
                if common.format == "json" {
                    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
                } else {
                    let cols = [
                        "Host Name",
                        "API Address",
                        "Cluster Address",
                        "Active Node",
                        "Version",
                        "Last Echo",
                    ];
                    let keys = [
                        "hostname",
                        "api_address",
                        "cluster_address",
                        "active_node",
                        "version",
                        "last_echo",
                    ];
                    let rows: Vec<Vec<String>> = v["nodes"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|n| keys.iter().map(|k| s(&n[*k])).collect())
                        .collect();
                    let widths: Vec<usize> = (0..cols.len())
                        .map(|i| {
                            rows.iter()
                                .map(|r| r[i].len())
                                .chain([cols[i].len()])
                                .max()
                                .unwrap_or(0)
                        })
                        .collect();
                    let line = |cells: Vec<String>| {
                        cells
                            .iter()
                            .zip(&widths)
                            .map(|(c, w)| format!("{c:<w$}"))
                            .collect::<Vec<_>>()
                            .join("    ")
                    };
                    println!("{}", line(cols.iter().map(|c| c.to_string()).collect()).trim_end());
                    println!(
                        "{}",
                        line(cols.iter().map(|c| "-".repeat(c.len())).collect()).trim_end()
                    );
                    for r in rows {
                        println!("{}", line(r).trim_end());
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An unseal key typed on the command line never shows in `Debug` of the parsed command
    /// (of the subcommand, nor of the whole arguments).
    #[test]
    fn debug_redacts_the_unseal_key() {
        let args = OperatorArgs::try_parse_from(["vha operator", "unseal", "UNSEALKEYSECRET"]).unwrap();
        let dbg = format!("{args:?} {:#?}", args.cmd);
        assert!(!dbg.contains("UNSEALKEYSECRET"), "{dbg}");
        assert!(dbg.contains("Unseal") && dbg.contains("<redacted>"), "{dbg}");
    }
}

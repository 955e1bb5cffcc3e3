//! `TestHaproxy`: a real HAProxy (Debian's `haproxy`) on a test host in front of the pairs,
//! as users put a load balancer in front of Vault. Each frontend has its own backend with
//! every pair as a server and one of the health checks Vault documents for load balancers
//! (`GET /v1/sys/health`: 200 on the active, 429 on a standby by default, 200 on any unsealed
//! node with `standbyok=true`). The config is the pure [`config`]; server states are read on
//! HAProxy's admin socket (a unix socket: reachable from any namespace).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use crate::net::{tool, NetHost};
use crate::process::ChildProc;
use crate::wait::wait_until;

/// How often HAProxy checks each server. HAProxy's default is 2 s; a quarter of that keeps a
/// failover trial short on the test machine. Failover figures measured through the load
/// balancer include up to `CHECK_FALL` of these to take a failed server out and
/// `CHECK_RISE` to put the new active in.
pub const CHECK_INTER: Duration = Duration::from_millis(500);
/// Failed checks before a server is taken out (HAProxy's default is 3): two, so a single
/// slow answer on a busy machine does not flap a healthy server.
pub const CHECK_FALL: u32 = 2;
/// Passed checks before a server is put (back) in (HAProxy's default is 2): one, so the new
/// active gets traffic at its first 200.
pub const CHECK_RISE: u32 = 1;

/// How long HAProxy may take to listen and to report its servers (start-up is milliseconds;
/// the margin covers a loaded machine).
pub const HAPROXY_START_TIMEOUT: Duration = Duration::from_secs(30);

/// The health check of a frontend's backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HealthCheck {
    /// `GET /v1/sys/health`, healthy on 200 only: only the active pair gets traffic (Vault's
    /// recommendation when the load balancer can check status codes).
    ActiveOnly,
    /// `GET /v1/sys/health?standbyok=true`, healthy on 200: every unsealed pair gets traffic
    /// (standbys forward to the active; Vault's option for load balancers that only take
    /// 200s). A standby that has lost the active answers 474 and is taken out.
    StandbyOk,
    /// `GET /v1/sys/health?standbyok=true&haunhealthycode=200`: like `StandbyOk`, but a
    /// standby that has lost the active stays in (Vault's `haunhealthycode` parameter), so it
    /// can hold requests while a new active is elected.
    StandbyOkHaUnhealthyOk,
}

impl HealthCheck {
    /// The checked path.
    pub fn uri(self) -> &'static str {
        match self {
            HealthCheck::ActiveOnly => "/v1/sys/health",
            HealthCheck::StandbyOk => "/v1/sys/health?standbyok=true",
            HealthCheck::StandbyOkHaUnhealthyOk => "/v1/sys/health?standbyok=true&haunhealthycode=200",
        }
    }
}

/// One frontend (port on the load balancer's host) and the check of its backend.
#[derive(Clone, Debug)]
pub struct LbFrontend {
    /// Frontend and backend name (`[a-z_]+`).
    pub name: String,
    pub port: u16,
    pub check: HealthCheck,
}

/// The HAProxy configuration (`option redispatch`: a request whose connection to a server
/// failed, so was never sent, is retried on another server at the last retry): for each frontend, a listener on `bind_ip:port` and a backend
/// with every server of `servers` (`(name, address)`), checked per the frontend's
/// [`HealthCheck`] every [`CHECK_INTER`]; the admin socket at `admin_socket`.
pub fn config(
    bind_ip: std::net::Ipv4Addr,
    frontends: &[LbFrontend],
    servers: &[(String, SocketAddr)],
    admin_socket: &std::path::Path,
) -> String {
    let inter = CHECK_INTER.as_millis();
    let mut s = format!(
        "global\n  stats socket {} mode 600 level admin\n  log stderr format raw local0 notice\n\
         defaults\n  mode http\n  log global\n  option redispatch\n  timeout connect 2s\n  timeout client 60s\n  timeout server 60s\n  timeout check 2s\n",
        admin_socket.display()
    );
    for f in frontends {
        s.push_str(&format!(
            "frontend {name}\n  bind {bind_ip}:{port}\n  default_backend {name}\n\
             backend {name}\n  balance roundrobin\n  option httpchk\n  http-check send meth GET uri {uri} ver HTTP/1.1 hdr Host lb\n  http-check expect status 200\n  default-server inter {inter}ms fall {CHECK_FALL} rise {CHECK_RISE}\n",
            name = f.name,
            port = f.port,
            uri = f.check.uri(),
        ));
        for (name, addr) in servers {
            s.push_str(&format!("  server {name} {addr} check\n"));
        }
    }
    s
}

/// A running HAProxy on a test host.
pub struct TestHaproxy {
    pub host: NetHost,
    pub frontends: Vec<LbFrontend>,
    /// The config file it runs with.
    pub config_path: PathBuf,
    admin: PathBuf,
    proc: Option<ChildProc>,
    _dir: tempfile::TempDir,
}

impl TestHaproxy {
    /// Starts `haproxy` on `host` with [`config`]; returns once every frontend accepts
    /// connections and the admin socket answers.
    pub fn start(host: &NetHost, frontends: Vec<LbFrontend>, servers: &[(String, SocketAddr)]) -> TestHaproxy {
        let dir = tempfile::Builder::new()
            .prefix("vha-haproxy-")
            .tempdir()
            .expect("tempdir");
        let admin = dir.path().join("admin.sock");
        let config_path = dir.path().join("haproxy.cfg");
        std::fs::write(&config_path, config(host.ip, &frontends, servers, &admin)).expect("write haproxy.cfg");
        let mut cmd = host.command(tool("haproxy"));
        // -db: foreground, no daemon (the PID is the process's own).
        cmd.arg("-db").arg("-f").arg(&config_path);
        let mut proc = ChildProc::spawn("haproxy", cmd, &dir.path().join("haproxy.log"));
        let ports: Vec<u16> = frontends.iter().map(|f| f.port).collect();
        wait_until(
            || {
                if !proc.is_running() {
                    panic!("haproxy exited during start:\n{}", proc.output());
                }
                let listening = ports
                    .iter()
                    .all(|p| host.tcp_connects(host.addr(*p), Duration::from_millis(200)));
                (listening && admin_command(&admin, "show info").is_some()).then_some(())
            },
            "haproxy listens and answers on its admin socket",
            HAPROXY_START_TIMEOUT,
        );
        TestHaproxy {
            host: host.clone(),
            frontends,
            config_path,
            admin,
            proc: Some(proc),
            _dir: dir,
        }
    }

    /// `http://<lb address>:<port>` of frontend `name`.
    pub fn url(&self, name: &str) -> String {
        let f = self
            .frontends
            .iter()
            .find(|f| f.name == name)
            .unwrap_or_else(|| panic!("no frontend {name:?}"));
        format!("http://{}", self.host.addr(f.port))
    }

    pub fn pid(&self) -> u32 {
        self.proc.as_ref().map(|p| p.pid()).unwrap_or(0)
    }

    /// HAProxy's output (its log: server state changes).
    pub fn output(&self) -> String {
        self.proc.as_ref().map(|p| p.output()).unwrap_or_default()
    }

    /// Why servers were taken out so far, from HAProxy's log: `(backend, reason) -> count`
    /// (reason as HAProxy states it, e.g. `Layer7 wrong status, code: 474`).
    pub fn down_reasons(&self) -> std::collections::BTreeMap<(String, String), usize> {
        down_reasons(&self.output())
    }

    /// The servers of backend `backend` that HAProxy counts as up now (`UP`, or `UP n/m`
    /// while it is going down), in config order.
    pub fn servers_up(&self, backend: &str) -> Vec<String> {
        let Some(csv) = admin_command(&self.admin, "show stat") else {
            return Vec::new();
        };
        servers_up(&csv, backend)
    }

    /// Waits until exactly `servers` of `backend` are up.
    pub fn wait_servers_up(&self, backend: &str, servers: &[&str], timeout: Duration) {
        let want: Vec<String> = servers.iter().map(|s| s.to_string()).collect();
        wait_until(
            || (self.servers_up(backend) == want).then_some(()),
            &format!("haproxy backend {backend} has exactly {want:?} up"),
            timeout,
        );
    }
}

/// One command on HAProxy's admin socket; its answer, `None` if it does not answer.
fn admin_command(socket: &std::path::Path, cmd: &str) -> Option<String> {
    let mut s = UnixStream::connect(socket).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(format!("{cmd}\n").as_bytes()).ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    Some(out)
}

/// From HAProxy's log lines `Server BACKEND/SERVER is DOWN, reason: REASON, info: ...`:
/// `(backend, reason) -> count`.
fn down_reasons(log: &str) -> std::collections::BTreeMap<(String, String), usize> {
    let mut out = std::collections::BTreeMap::new();
    for line in log.lines() {
        let Some(rest) = line.split("Server ").nth(1) else {
            continue;
        };
        let Some((server, rest)) = rest.split_once(" is DOWN, reason: ") else {
            continue;
        };
        let backend = server.split('/').next().unwrap_or_default().to_string();
        let reason = rest.split(", info:").next().unwrap_or(rest);
        let reason = reason
            .split(", check duration")
            .next()
            .unwrap_or(reason)
            .trim()
            .to_string();
        *out.entry((backend, reason)).or_insert(0) += 1;
    }
    out
}

/// From `show stat` CSV: the servers of `backend` whose status starts with `UP`.
fn servers_up(csv: &str, backend: &str) -> Vec<String> {
    let mut lines = csv.lines();
    let Some(header) = lines.next().and_then(|h| h.strip_prefix("# ")) else {
        return Vec::new();
    };
    let cols: Vec<&str> = header.split(',').collect();
    let col = |name: &str| cols.iter().position(|c| *c == name);
    let (Some(px), Some(sv), Some(st)) = (col("pxname"), col("svname"), col("status")) else {
        return Vec::new();
    };
    lines
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter(|f| f.get(px) == Some(&backend))
        .filter(|f| !matches!(f.get(sv), Some(&"FRONTEND") | Some(&"BACKEND")))
        .filter(|f| f.get(st).is_some_and(|s| s.starts_with("UP")))
        .filter_map(|f| f.get(sv).map(|s| s.to_string()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each frontend gets its own backend with every server and its own check: the
    /// active-only check expects 200 from plain `sys/health`, the standbyok one from
    /// `sys/health?standbyok=true`; the listener is on the load balancer's address.
    #[test]
    fn config_checks_as_vault_documents() {
        let servers = vec![
            ("p0".to_string(), "10.200.1.12:8200".parse().unwrap()),
            ("p1".to_string(), "10.200.1.13:8200".parse().unwrap()),
        ];
        let fe = vec![
            LbFrontend {
                name: "active".into(),
                port: 8200,
                check: HealthCheck::ActiveOnly,
            },
            LbFrontend {
                name: "any".into(),
                port: 8300,
                check: HealthCheck::StandbyOk,
            },
        ];
        let c = config(
            "10.200.1.11".parse().unwrap(),
            &fe,
            &servers,
            std::path::Path::new("/tmp/x.sock"),
        );
        let active = c
            .split("\nbackend active\n")
            .nth(1)
            .unwrap()
            .split("frontend")
            .next()
            .unwrap();
        let any = c.split("\nbackend any\n").nth(1).unwrap();
        assert!(
            c.contains("bind 10.200.1.11:8200") && c.contains("bind 10.200.1.11:8300"),
            "{c}"
        );
        assert!(active.contains("uri /v1/sys/health ver"), "{active}");
        assert!(any.contains("uri /v1/sys/health?standbyok=true ver"), "{any}");
        for b in [active, any] {
            assert!(b.contains("http-check expect status 200"), "{b}");
            assert!(b.contains("server p0 10.200.1.12:8200 check"), "{b}");
            assert!(b.contains("server p1 10.200.1.13:8200 check"), "{b}");
        }
        assert!(c.contains("stats socket /tmp/x.sock"), "{c}");
    }

    /// Reasons are read from HAProxy's "is DOWN" log lines, per backend; other lines are
    /// ignored.
    #[test]
    fn down_reasons_reads_the_log() {
        let log = "[WARNING]  (1) : Server any/p1 is DOWN, reason: Layer7 wrong status, code: 474, check duration: 1ms. 2 active and 0 backup servers left.\n\
                   Server any/p2 is DOWN, reason: Layer7 wrong status, code: 474, info: \"x\", check duration: 1ms.\n\
                   Server active/p0 is DOWN, reason: Layer4 connection problem, info: \"Connection refused\", check duration: 0ms.\n\
                   Server active/p0 is UP, reason: Layer7 check passed\n";
        let r = down_reasons(log);
        assert_eq!(r[&("any".to_string(), "Layer7 wrong status, code: 474".to_string())], 2);
        assert_eq!(r[&("active".to_string(), "Layer4 connection problem".to_string())], 1);
        assert_eq!(r.len(), 2);
    }

    /// Only servers of the asked backend whose status is UP (also "UP 1/2" while going down)
    /// count; the frontend/backend summary rows never do.
    #[test]
    fn servers_up_reads_show_stat() {
        let csv = "# pxname,svname,qcur,status,weight\n\
                   active,FRONTEND,,OPEN,\n\
                   active,p0,0,UP,1\n\
                   active,p1,0,DOWN,1\n\
                   active,p2,0,UP 1/2,1\n\
                   active,BACKEND,0,UP,2\n\
                   any,p1,0,UP,1\n";
        assert_eq!(servers_up(csv, "active"), vec!["p0", "p2"]);
        assert_eq!(servers_up(csv, "any"), vec!["p1"]);
        assert!(servers_up("garbage", "active").is_empty());
    }
}

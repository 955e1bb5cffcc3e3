//! Starting an etcd cluster on loopback, for `vha dev --storage etcd` (three members) and the
//! lockd benchmark's comparison (one member), from Debian's `etcd-server`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::client::Client;
use crate::process::{wait_until, Child};

/// How long the members may take to elect a leader and answer healthy (a debug build of the
/// tooling starts them on a busy 2-core machine; etcd itself takes about a second).
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(60);

/// One member to start.
#[derive(Clone, Debug)]
pub(crate) struct Member {
    /// Its name in `--initial-cluster`.
    pub name: String,
    pub client_port: u16,
    pub peer_port: u16,
    pub data_dir: PathBuf,
}

impl Member {
    /// Its client URL on 127.0.0.1.
    pub(crate) fn client_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    fn peer_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.peer_port)
    }
}

/// The command line of each of `members` as one new cluster named `token`.
pub(crate) fn commands(bin: &str, members: &[Member], token: &str) -> Vec<Command> {
    let initial = members
        .iter()
        .map(|m| format!("{}={}", m.name, m.peer_url()))
        .collect::<Vec<_>>()
        .join(",");
    members
        .iter()
        .map(|m| {
            let (c, p) = (m.client_url(), m.peer_url());
            let mut cmd = Command::new(bin);
            cmd.args(["--name", &m.name])
                .arg("--data-dir")
                .arg(&m.data_dir)
                .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
                .args(["--listen-peer-urls", &p, "--initial-advertise-peer-urls", &p])
                .args(["--initial-cluster", &initial, "--initial-cluster-token", token])
                .args([
                    "--initial-cluster-state",
                    "new",
                    "--logger",
                    "zap",
                    "--log-outputs",
                    "stderr",
                ]);
            cmd
        })
        .collect()
}

/// Starts `members` (etcd's output into `log_dir/<name>.log`, or discarded) and waits until
/// each answers healthy (it has a leader). The members stop when their handles drop.
pub(crate) async fn start(
    bin: &str,
    members: &[Member],
    token: &str,
    log_dir: Option<&Path>,
) -> Result<Vec<Child>, String> {
    let mut procs = Vec::new();
    for (m, cmd) in members.iter().zip(commands(bin, members, token)) {
        let log = log_dir.map(|d| d.join(format!("etcd-{}.log", m.name)));
        let p = Child::spawn(&format!("etcd {}", m.name), cmd, log.as_deref())
            .map_err(|e| format!("{e} (is etcd-server installed? scripts/install-deps.sh)"))?;
        procs.push(p);
    }
    let api = Client::new(&Default::default(), Duration::from_secs(5))?;
    for m in members {
        let url = format!("{}/health", m.client_url());
        wait_until(
            &format!("etcd member {} to be healthy", m.name),
            HEALTHY_TIMEOUT,
            || async {
                let (st, v) = api.get(&url).await.ok()?;
                (st == 200 && v["health"] == "true").then_some(())
            },
        )
        .await?;
    }
    Ok(procs)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every member names all peers in one `--initial-cluster`, listens where it advertises,
    /// and keeps its own data directory.
    #[test]
    fn members_form_one_cluster() {
        let m = |i: u16| Member {
            name: format!("m{i}"),
            client_port: 2000 + i,
            peer_port: 3000 + i,
            data_dir: PathBuf::from(format!("/d/m{i}")),
        };
        let cmds = commands("etcd", &[m(0), m(1)], "t");
        let args: Vec<Vec<String>> = cmds
            .iter()
            .map(|c| c.get_args().map(|a| a.to_string_lossy().into_owned()).collect())
            .collect();
        let after = |a: &[String], flag: &str| a[a.iter().position(|x| x == flag).unwrap() + 1].clone();
        for (i, a) in args.iter().enumerate() {
            assert_eq!(
                after(a, "--initial-cluster"),
                "m0=http://127.0.0.1:3000,m1=http://127.0.0.1:3001"
            );
            assert_eq!(after(a, "--listen-client-urls"), after(a, "--advertise-client-urls"));
            assert_eq!(
                after(a, "--listen-client-urls"),
                format!("http://127.0.0.1:{}", 2000 + i)
            );
            assert_eq!(after(a, "--data-dir"), format!("/d/m{i}"));
        }
    }
}

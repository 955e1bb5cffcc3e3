//! `vha proxy --daemon`: the start a service manager that follows a PID file expects
//! (systemd `Type=forking` with `PIDFile=`). The invoked process starts the proxy as a child
//! (same arguments without `--daemon`, its own process group, stdin from /dev/null, output
//! inherited), returns 0 once the child is ready and exits 1 if it is not. The PID file is
//! what tells the manager which process is the service, so the child writes it (see
//! [`write_pid_file`]) and readiness includes it ([`ready`]):
//! - a fresh start is ready when the PID file names the child, written once its client
//!   listener accepts connections ([`when_listening`]);
//! - an upgrade (`--upgrade`) is ready when, in addition, the child waits for the listener on
//!   the upgrade socket: the caller then sends the running proxy SIGQUIT (systemd: the next
//!   `ExecReload=` line). The child wrote the PID file before it waits, so the file already
//!   names the successor when the old process exits, which is when systemd re-reads it.
//!
//! No `fork(2)`: the proxy runs threads from its start (storage clients, metrics), and a
//! forked child keeps only the thread that forked.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// The PID file's name in the run directory.
pub(crate) const PID_FILE: &str = "vha-proxy.pid";
/// The upgrade socket's name in the run directory (Pingora's `upgrade_sock`).
pub(crate) const UPGRADE_SOCK: &str = "vha-proxy-upgrade.sock";
/// How long the child may take to be ready: it opens its stores (a lockd or etcd connect)
/// before Pingora's bootstrap, and a store that is down is retried, not fatal; well under
/// systemd's default start timeout (90 s).
const READY_BOUND: Duration = Duration::from_secs(60);
/// How long a started proxy may take to listen before it gives up and exits 1: longer than
/// Pingora's own bind retries (30 tries a second apart while the address is in use, after
/// which it panics in its service thread and the process would run on without a listener),
/// shorter than [`READY_BOUND`] so `--daemon` reports the exit.
const LISTEN_BOUND: Duration = Duration::from_secs(45);
/// How often readiness is checked.
const POLL: Duration = Duration::from_millis(20);

/// The run directory's files.
#[derive(Clone, Debug)]
pub(crate) struct RunFiles {
    pub pid_file: PathBuf,
    pub upgrade_sock: PathBuf,
}

impl RunFiles {
    pub(crate) fn in_dir(dir: &Path) -> RunFiles {
        RunFiles {
            pid_file: dir.join(PID_FILE),
            upgrade_sock: dir.join(UPGRADE_SOCK),
        }
    }
}

/// The pure readiness rule (see the module header): the PID file names `child`, and for
/// an upgrade the child also waits on the upgrade socket.
pub(crate) fn ready(pid_in_file: Option<u32>, child: u32, upgrade: bool, upgrade_sock_exists: bool) -> bool {
    pid_in_file == Some(child) && (!upgrade || upgrade_sock_exists)
}

/// Writes this process's PID to `path` atomically (a temporary file renamed over it): a
/// reader sees the old PID or the new one, never a partial line.
pub(crate) fn write_pid_file(path: &Path) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("pid.{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        writeln!(f, "{}", std::process::id())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Starts a thread that waits until this process listens on `listen`'s port (Pingora binds
/// its listeners as its services start, after bootstrap, with nothing to tell when), then
/// runs `then`. Read from /proc, not by connecting: a probe connection would show in the
/// listener's log as a failed handshake. Not listening after [`LISTEN_BOUND`], the process
/// exits 1 (the PID file never written), rather than run on without a listener.
pub(crate) fn when_listening(listen: std::net::SocketAddr, then: impl FnOnce() + Send + 'static) {
    let spawned = std::thread::Builder::new()
        .name("vha-proxy-ready".into())
        .spawn(move || {
            let started = Instant::now();
            while started.elapsed() < LISTEN_BOUND {
                if listens(listen.port()) {
                    then();
                    return;
                }
                std::thread::sleep(POLL);
            }
            tracing::error!(%listen, "not listening within {LISTEN_BOUND:?} (see the errors above); exiting");
            eprintln!("vha proxy: not listening on {listen} within {LISTEN_BOUND:?}; exiting");
            std::process::exit(1);
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the readiness check");
    }
}

/// Whether one of this process's sockets is in LISTEN state on TCP `port`.
fn listens(port: u16) -> bool {
    let ours: std::collections::HashSet<u64> = std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
        })
        .collect();
    ["/proc/self/net/tcp", "/proc/self/net/tcp6"].iter().any(|t| {
        std::fs::read_to_string(t)
            .map(|table| listening_inodes(&table, port).iter().any(|i| ours.contains(i)))
            .unwrap_or(false)
    })
}

/// The socket inodes of a /proc/net/tcp(6) table in LISTEN state (`0A`) on `port`.
fn listening_inodes(table: &str, port: u16) -> Vec<u64> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let local_port = u16::from_str_radix(f.get(1)?.rsplit(':').next()?, 16).ok()?;
            (local_port == port && *f.get(3)? == "0A").then(|| f.get(9)?.parse().ok())?
        })
        .collect()
}

/// The PID a PID file names (`None`: absent or not a PID yet).
pub(crate) fn read_pid_file(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// Runs in the invoked process: starts the proxy child with `args` (the `vha proxy`
/// arguments without `--daemon`) and waits until it is ready.
pub(crate) fn start(args: &[String], files: &RunFiles, upgrade: bool) -> ExitCode {
    if upgrade {
        // A socket left by a failed earlier upgrade must not pass for the child's.
        let _ = std::fs::remove_file(&files.upgrade_sock);
    }
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("vha proxy --daemon: cannot find the vha binary: {e}");
            return ExitCode::from(1);
        }
    };
    let mut child = match Command::new(&exe)
        .arg("proxy")
        .args(args)
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("vha proxy --daemon: starting {}: {e}", exe.display());
            return ExitCode::from(1);
        }
    };
    let started = Instant::now();
    loop {
        match child.try_wait() {
            Ok(Some(status)) => {
                eprintln!("vha proxy --daemon: the proxy exited before it was ready ({status})");
                return ExitCode::from(1);
            }
            Ok(None) => {}
            Err(e) => eprintln!("vha proxy --daemon: waiting for the proxy: {e}"),
        }
        if ready(
            read_pid_file(&files.pid_file),
            child.id(),
            upgrade,
            files.upgrade_sock.exists(),
        ) {
            return ExitCode::SUCCESS;
        }
        if started.elapsed() > READY_BOUND {
            eprintln!(
                "vha proxy --daemon: the proxy (pid {}) was not ready within {READY_BOUND:?}; stopping it",
                child.id()
            );
            let _ = child.kill();
            let _ = child.wait();
            return ExitCode::from(1);
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Ready only when the PID file names the child; an upgrade also needs the socket.
    #[test]
    fn readiness_rule() {
        assert!(ready(Some(7), 7, false, false));
        assert!(!ready(Some(6), 7, false, true), "the old process's PID");
        assert!(!ready(None, 7, false, true));
        assert!(!ready(Some(7), 7, true, false), "not yet waiting for the hand-over");
        assert!(ready(Some(7), 7, true, true));
    }

    /// Only LISTEN rows on the port count, with their inode (the table's 10th column).
    #[test]
    fn listening_inodes_of_a_table() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4242 1 0 100 0 0 10 0
   1: 0100007F:1F90 0100007F:C350 01 00000000:00000000 00:00000000 00000000     0        0 4343 1 0 20 4 30 10 -1
   2: 00000000:1F91 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 4444 1 0 100 0 0 10 0
";
        assert_eq!(listening_inodes(table, 0x1F90), vec![4242]);
        assert_eq!(listening_inodes(table, 0x1F91), vec![4444]);
        assert!(listening_inodes(table, 80).is_empty());
        assert!(listening_inodes("header only\n", 0x1F90).is_empty());
    }

    /// This process listens on a port it bound, and not on one it did not.
    #[test]
    fn sees_its_own_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let port = l.local_addr().expect("addr").port();
        assert!(listens(port));
        drop(l);
        assert!(!listens(port));
    }

    /// The PID file holds this process's PID after a write, replacing what was there.
    #[test]
    fn pid_file_round_trip() {
        let dir = tempfile::tempdir().expect("dir");
        let p = dir.path().join(PID_FILE);
        std::fs::write(&p, "123\n").expect("old");
        write_pid_file(&p).expect("write");
        assert_eq!(read_pid_file(&p), Some(std::process::id()));
        assert_eq!(
            std::fs::read_dir(dir.path()).expect("ls").count(),
            1,
            "no temporary left"
        );
    }
}

//! The one handle on a child process the tooling starts (`vha dev`'s servers, the lockd
//! benchmarks' lockd and etcd, `vha bench`'s peers), and the one wait for a server to answer.
//!
//! A [`Child`] is stopped when it is dropped (SIGTERM, a grace period, then SIGKILL, always
//! reaped), so no error path leaves a server running; [`Child::detach`] is the one way to let
//! a process outlive its handle.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long a stopped process gets to exit on SIGTERM before SIGKILL: a node steps down and
/// releases its lock, lockd syncs its log, well within this on a busy machine.
pub const STOP_GRACE: Duration = Duration::from_secs(5);
/// How often waits poll.
const POLL: Duration = Duration::from_millis(50);

/// A child process, stopped on drop.
pub struct Child {
    child: Option<std::process::Child>,
    name: String,
    grace: Duration,
}

impl Child {
    /// Starts `cmd` as `name` with stdin closed and stdout and stderr into `log` (created or
    /// truncated), or discarded when `log` is `None`.
    pub fn spawn(name: &str, mut cmd: Command, log: Option<&Path>) -> Result<Child, String> {
        cmd.stdin(Stdio::null());
        match log {
            Some(log) => {
                let out = std::fs::File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
                let err = out.try_clone().map_err(|e| format!("{}: {e}", log.display()))?;
                cmd.stdout(out).stderr(err);
            }
            None => {
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        let child = cmd.spawn().map_err(|e| format!("starting {name}: {e}"))?;
        Ok(Child {
            child: Some(child),
            name: name.to_string(),
            grace: STOP_GRACE,
        })
    }

    /// The same process with another grace period for SIGTERM.
    pub fn with_grace(mut self, grace: Duration) -> Child {
        self.grace = grace;
        self
    }

    /// Its PID (0 once it was stopped or detached).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// The name it was started under.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether it has exited (and is reaped).
    pub fn exited(&mut self) -> bool {
        match &mut self.child {
            Some(c) => !matches!(c.try_wait(), Ok(None)),
            None => true,
        }
    }

    /// SIGTERM, up to the grace period, then SIGKILL; reaped either way.
    pub fn stop(&mut self) {
        let Some(mut c) = self.child.take() else { return };
        let pid = nix::unistd::Pid::from_raw(c.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + self.grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                return;
            }
            std::thread::sleep(POLL);
        }
        let _ = c.kill();
        let _ = c.wait();
    }

    /// `kill -9` and reap (a crash, for the benchmarks that restart a server).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Lets the process run on after this handle is gone; returns its PID.
    pub fn detach(mut self) -> u32 {
        let pid = self.pid();
        self.child = None;
        pid
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Polls `f` every 50 ms until it gives a value, for at most `timeout`; the error names
/// `what` was awaited.
pub async fn wait_until<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<T, String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out waiting for {what}"));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// A `kB` field of `/proc/<pid>/status` (`VmHWM`, `VmRSS`), in bytes.
pub fn status_bytes(status: &str, field: &str) -> Option<u64> {
    status.lines().find_map(|l| {
        let rest = l.strip_prefix(field)?.strip_prefix(':')?;
        let mut it = rest.split_whitespace();
        let n: u64 = it.next()?.parse().ok()?;
        (it.next() == Some("kB")).then_some(n * 1024)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dropping a handle stops its process (and reaps it); a detached process runs on.
    #[test]
    fn a_dropped_handle_stops_its_process_and_a_detached_one_runs_on() {
        let alive = |pid: u32| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), None).is_ok();
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let c = Child::spawn("sleep", cmd, None).unwrap();
        let pid = c.pid();
        assert!(alive(pid));
        drop(c);
        assert!(!alive(pid), "the process outlived its handle");

        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let pid = Child::spawn("sleep", cmd, None).unwrap().detach();
        assert!(alive(pid), "a detached process was stopped");
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = nix::sys::wait::waitpid(nix::unistd::Pid::from_raw(pid as i32), None);
    }

    /// `VmHWM`/`VmRSS` are read in bytes from a real-looking status file; a missing or
    /// malformed field is `None`, and a field is not matched by a longer name's prefix.
    #[test]
    fn proc_status_fields() {
        let status = "Name:\tvha\nVmPeak:\t 2097152 kB\nVmHWM:\t  812340 kB\nVmRSS:\t  500000 kB\nVmHWMx:\t1 kB\n";
        assert_eq!(status_bytes(status, "VmHWM"), Some(812_340 * 1024));
        assert_eq!(status_bytes(status, "VmRSS"), Some(500_000 * 1024));
        assert_eq!(status_bytes(status, "VmSwap"), None);
        assert_eq!(status_bytes("VmHWM:\tlots kB\n", "VmHWM"), None);
        assert_eq!(status_bytes("VmHWM:\t12 MB\n", "VmHWM"), None);
    }
}

//! Child processes the tests start: spawned with captured logs, signalled and reaped by PID,
//! killed on drop so a failing test leaves nothing running.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// The `vha` binary under test: `$VHA_BIN`, or `target/<profile>/vha` next to the test
/// executable (cargo builds it for integration tests of the root package).
pub fn vha_binary() -> PathBuf {
    if let Ok(p) = std::env::var("VHA_BIN") {
        return PathBuf::from(p);
    }
    if let Some(p) = option_env!("CARGO_BIN_EXE_vha") {
        return PathBuf::from(p);
    }
    // target/<profile>/deps/<test> -> target/<profile>/vha
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = profile_dir.join("vha");
    assert!(
        p.exists(),
        "vha binary not found at {} (run `cargo build` first or set VHA_BIN)",
        p.display()
    );
    p
}

/// A port on 127.0.0.1 that was free a moment ago and that this process has not handed out
/// before (the one picker in `vha_core::ports`, below the kernel's ephemeral range).
pub fn free_port() -> u16 {
    vha_core::ports::free_port().expect("a free port on 127.0.0.1")
}

/// The state letter of a `/proc/.../stat` line (`R`, `S`, `T`, `Z`, ...): the field after
/// the command name, which is in parentheses and may itself hold spaces and parentheses.
fn stat_state(stat: &str) -> Option<char> {
    stat.rsplit_once(") ")?.1.chars().next()
}

/// Whether process `pid` exists and is not a zombie (a zombie still accepts signal 0, so
/// its /proc state is checked too). For processes the test did not spawn itself.
pub fn pid_alive(pid: u64) -> bool {
    let Ok(raw) = i32::try_from(pid) else { return false };
    kill(Pid::from_raw(raw), None).is_ok()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| stat_state(&s) != Some('Z'))
            .unwrap_or(false)
}

/// Whether every thread of `pid` is in the stopped state (`T` in `/proc/<pid>/task/*/stat`).
fn all_threads_stopped(pid: u32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    let mut any = false;
    for t in tasks.flatten() {
        let Ok(stat) = std::fs::read_to_string(t.path().join("stat")) else {
            return false;
        };
        if stat_state(&stat) != Some('T') {
            return false;
        }
        any = true;
    }
    any
}

/// A running child process with its output captured to `log`.
pub struct ChildProc {
    pub name: String,
    child: Option<Child>,
    pub log: PathBuf,
}

impl ChildProc {
    /// Spawns `cmd`, sending stdout and stderr to `log`.
    pub fn spawn(name: &str, mut cmd: Command, log: &Path) -> ChildProc {
        let out = std::fs::File::create(log).expect("create log file");
        let err = out.try_clone().expect("clone log handle");
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        ChildProc {
            name: name.to_string(),
            child: Some(child),
            log: log.to_path_buf(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// Whether the process is still alive (without reaping it): signal 0 by PID.
    pub fn is_running_shared(&self) -> bool {
        match &self.child {
            Some(c) => pid_alive(u64::from(c.id())),
            None => false,
        }
    }

    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Sends `sig` to the process by PID.
    pub fn signal(&self, sig: Signal) {
        if let Some(c) = &self.child {
            let _ = kill(Pid::from_raw(c.id() as i32), sig);
        }
    }

    /// SIGSTOP, then waits until every thread of the process is stopped. `kill` returns
    /// before the stop takes hold: a thread already on a CPU runs on until the thread that
    /// takes the signal kicks it, which on loaded cores can be long enough to serve a request.
    pub fn freeze(&self, bound: Duration) {
        self.signal(Signal::SIGSTOP);
        let pid = self.pid();
        crate::wait::wait_until(
            || all_threads_stopped(pid).then_some(()),
            &format!("{} stops (SIGSTOP)", self.name),
            bound,
        );
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGCONT);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, wait up to `grace` for exit (returning its status), then SIGKILL.
    pub fn terminate(&mut self, grace: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGCONT);
        let _ = kill(Pid::from_raw(c.id() as i32), Signal::SIGTERM);
        let deadline = std::time::Instant::now() + grace;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                return Some(st);
            }
            if std::time::Instant::now() >= deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(crate::wait::POLL_INTERVAL);
        }
    }

    /// Waits for the process to exit by itself, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let c = self.child.as_mut()?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = c.try_wait() {
                self.child = None;
                return Some(st);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(crate::wait::POLL_INTERVAL);
        }
    }

    /// The captured output so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ChildProc {
    fn drop(&mut self) {
        self.kill();
    }
}

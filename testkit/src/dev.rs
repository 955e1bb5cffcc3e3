//! `TestDev`: a real `vha dev` in its own temp dir with `--port-base 0`, handed back once it
//! wrote `cluster.json`. The process is killed by PID on drop ([`ChildProc`]); tests that
//! check the Ctrl-C path signal `proc` and wait for its exit themselves.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::process::{vha_binary, ChildProc};
use crate::wait::wait_until;

/// A running `vha dev`.
pub struct TestDev {
    pub proc: ChildProc,
    /// Its `--dir`: cluster.json, prometheus.yml, the processes' data and logs.
    pub dir: PathBuf,
    /// `cluster.json` as first written.
    pub cluster: Value,
    // Dropped after `proc`: the process stops before its directory goes.
    _tmp: tempfile::TempDir,
}

impl TestDev {
    /// Starts `vha dev --port-base 0 --dir <temp> ARGS` and waits up to `timeout` for its
    /// `cluster.json` (panicking with the output if `vha dev` exits first).
    pub fn start(args: &[&str], timeout: Duration) -> TestDev {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("dev");
        let mut cmd = Command::new(vha_binary());
        cmd.arg("dev").args(args).args(["--port-base", "0", "--dir"]).arg(&dir);
        let mut proc = ChildProc::spawn("vha dev", cmd, &tmp.path().join("dev.log"));
        let path = dir.join("cluster.json");
        let cluster = wait_until(
            || {
                assert!(proc.is_running(), "vha dev exited early:\n{}", proc.output());
                std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok())
            },
            "cluster.json written",
            timeout,
        );
        TestDev {
            proc,
            dir,
            cluster,
            _tmp: tmp,
        }
    }

    pub fn cluster_json(&self) -> PathBuf {
        self.dir.join("cluster.json")
    }
}

//! The cost view: what each request costs each process role (vha's proxies, nodes and
//! store; OpenBao's nodes; nginx's master and workers; the bench's own client), as CPU time
//! per request (and the part of it spent in the kernel) and memory, read from `/proc`
//! before and after every measured run. On shared cores throughput mostly shows who got the
//! CPU; CPU time per request is the steadier figure. The kernel's part separates what a
//! hop's syscalls and sockets cost, which any proxy pays, from its own user-space work.
//!
//! The parsing and the arithmetic are pure (unit-tested below); [`sample`] is the only
//! function that reads `/proc`.

use std::collections::BTreeMap;

use serde::Serialize;
use vha_ops::process::status_bytes;

/// One process the bench watches, and the role it is reported under.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Watched {
    pub pid: u32,
    /// `vha proxy`, `vha node`, `vha store`, `openbao`, `nginx`, `bench client`.
    pub role: String,
    /// Which system the role belongs to (`vha`, `openbao`, `nginx`, `bench`).
    pub system: String,
    /// Also count the process's children (nginx's workers), found at each sample.
    pub children: bool,
}

impl Watched {
    pub(crate) fn new(pid: u32, system: &str, role: &str) -> Watched {
        Watched {
            pid,
            role: role.into(),
            system: system.into(),
            children: false,
        }
    }
}

/// One process at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ProcSample {
    /// User + system CPU time, in clock ticks.
    pub ticks: u64,
    /// System (kernel) CPU time alone, in clock ticks.
    pub sys_ticks: u64,
    pub rss_bytes: u64,
    pub hwm_bytes: u64,
}

/// Every watched process (and child) at one moment, by pid, with its role.
#[derive(Clone, Debug, Default)]
pub(crate) struct Sample {
    pub procs: BTreeMap<u32, (usize, ProcSample)>,
}

/// What one role cost during one run.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub(crate) struct RoleCost {
    pub role: String,
    pub system: String,
    /// Processes seen in both samples.
    pub processes: usize,
    /// CPU time of all the role's processes during the run, divided by the requests sent.
    pub cpu_us_per_request: f64,
    /// The kernel's part of `cpu_us_per_request` (system time: syscalls, sockets, the
    /// network stack, scheduling).
    pub sys_us_per_request: f64,
    /// The role's resident memory after the run (sum over its processes).
    pub rss_mb: f64,
    /// The role's peak resident memory so far (sum of each process's high-water mark).
    pub peak_rss_mb: f64,
}

/// `(utime, stime)` (clock ticks) from a `/proc/PID/stat` line. The command name in
/// parentheses may contain spaces and parentheses, so fields are counted after its last `)`.
pub(crate) fn stat_times(stat: &str) -> Option<(u64, u64)> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After the name: state(3) ppid(4) ... utime(14) stime(15); `rest` starts at field 3.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some((utime, stime))
}

/// The parent pid from a `/proc/PID/stat` line.
pub(crate) fn stat_ppid(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// Clock ticks per second (`sysconf(_SC_CLK_TCK)`; Linux's 100 when it cannot be read).
pub(crate) fn clock_ticks() -> u64 {
    use nix::unistd::{sysconf, SysconfVar};
    sysconf(SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|t| u64::try_from(t).ok())
        .filter(|t| *t > 0)
        .unwrap_or(100)
}

fn read_proc(pid: u32) -> Option<(String, String)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    Some((stat, status))
}

/// Children of `parent` (one scan of `/proc`).
fn children_of(parent: u32) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| stat_ppid(&s))
                == Some(parent)
        })
        .collect()
}

/// Reads every watched process (and the children of those that ask for it) now. A process
/// that is gone is left out.
pub(crate) fn sample(watched: &[Watched]) -> Sample {
    let mut out = Sample::default();
    for (i, w) in watched.iter().enumerate() {
        let mut pids = vec![w.pid];
        if w.children {
            pids.extend(children_of(w.pid));
        }
        for pid in pids {
            if let Some((stat, status)) = read_proc(pid) {
                let (utime, stime) = stat_times(&stat).unwrap_or((0, 0));
                let s = ProcSample {
                    ticks: utime + stime,
                    sys_ticks: stime,
                    rss_bytes: status_bytes(&status, "VmRSS").unwrap_or(0),
                    hwm_bytes: status_bytes(&status, "VmHWM").unwrap_or(0),
                };
                out.procs.insert(pid, (i, s));
            }
        }
    }
    out
}

/// What each role cost between `before` and `after`, over `requests` requests, in roles'
/// first-seen order. A process must be in both samples to count (one that started or
/// exited in between has no defined share).
pub(crate) fn costs(
    watched: &[Watched],
    before: &Sample,
    after: &Sample,
    requests: u64,
    ticks_per_s: u64,
) -> Vec<RoleCost> {
    const MB: f64 = 1024.0 * 1024.0;
    let mut out: Vec<RoleCost> = Vec::new();
    for (pid, (i, a)) in &after.procs {
        let Some((_, b)) = before.procs.get(pid) else {
            continue;
        };
        let w = &watched[*i];
        let idx = match out.iter().position(|c| c.role == w.role && c.system == w.system) {
            Some(x) => x,
            None => {
                out.push(RoleCost {
                    role: w.role.clone(),
                    system: w.system.clone(),
                    ..RoleCost::default()
                });
                out.len() - 1
            }
        };
        let c = &mut out[idx];
        c.processes += 1;
        let per_request = |ticks: u64| {
            let us = ticks as f64 * 1e6 / ticks_per_s.max(1) as f64;
            if requests > 0 {
                us / requests as f64
            } else {
                0.0
            }
        };
        c.cpu_us_per_request += per_request(a.ticks.saturating_sub(b.ticks));
        c.sys_us_per_request += per_request(a.sys_ticks.saturating_sub(b.sys_ticks));
        c.rss_mb += a.rss_bytes as f64 / MB;
        c.peak_rss_mb += a.hwm_bytes as f64 / MB;
    }
    out.sort_by_key(|c| {
        watched
            .iter()
            .position(|w| w.role == c.role && w.system == c.system)
            .unwrap_or(usize::MAX)
    });
    for c in &mut out {
        c.cpu_us_per_request = (c.cpu_us_per_request * 100.0).round() / 100.0;
        c.sys_us_per_request = (c.sys_us_per_request * 100.0).round() / 100.0;
        c.rss_mb = (c.rss_mb * 10.0).round() / 10.0;
        c.peak_rss_mb = (c.peak_rss_mb * 10.0).round() / 10.0;
    }
    out
}

/// Per role, the median CPU per request (and the median of its kernel part) over rounds,
/// the last round's memory and the largest peak.
pub(crate) fn over_rounds(rounds: &[Vec<RoleCost>]) -> Vec<RoleCost> {
    let mut out: Vec<RoleCost> = Vec::new();
    for round in rounds {
        for c in round {
            if !out.iter().any(|o| o.role == c.role && o.system == c.system) {
                out.push(RoleCost {
                    role: c.role.clone(),
                    system: c.system.clone(),
                    ..RoleCost::default()
                });
            }
        }
    }
    for o in &mut out {
        let mine: Vec<&RoleCost> = rounds
            .iter()
            .filter_map(|r| r.iter().find(|c| c.role == o.role && c.system == o.system))
            .collect();
        let cpu: Vec<f64> = mine.iter().map(|c| c.cpu_us_per_request).collect();
        o.cpu_us_per_request = crate::hist::median(&cpu).unwrap_or(0.0);
        let sys: Vec<f64> = mine.iter().map(|c| c.sys_us_per_request).collect();
        o.sys_us_per_request = crate::hist::median(&sys).unwrap_or(0.0);
        if let Some(last) = mine.last() {
            o.processes = last.processes;
            o.rss_mb = last.rss_mb;
        }
        o.peak_rss_mb = mine.iter().map(|c| c.peak_rss_mb).fold(0.0, f64::max);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// utime and stime are fields 14 and 15 even when the command name holds spaces and
    /// parentheses; the parent pid is field 4; a truncated line is `None`, never a panic.
    #[test]
    fn stat_fields_after_the_command_name() {
        let line = "4242 (vha (proxy) x) S 17 4242 4242 0 -1 4194560 913 0 0 0 150 37 0 0 20 0 9 0 12345 0 0";
        assert_eq!(stat_times(line), Some((150, 37)));
        assert_eq!(stat_ppid(line), Some(17));
        assert_eq!(stat_times("4242 (vha) S 1 2"), None);
        assert_eq!(stat_times("no parenthesis"), None);
        let own = std::fs::read_to_string("/proc/self/stat").unwrap();
        assert!(stat_times(&own).is_some(), "{own}");
    }

    /// `ticks` in all, a quarter of them in the kernel.
    fn s(ticks: u64, rss_mb: u64) -> ProcSample {
        ProcSample {
            ticks,
            sys_ticks: ticks / 4,
            rss_bytes: rss_mb << 20,
            hwm_bytes: (rss_mb + 1) << 20,
        }
    }

    /// CPU per request is the ticks a role's processes used between the samples, in µs,
    /// divided by the requests, and its kernel part the system ticks alike; memory sums over
    /// the role; a process missing from either sample is not counted; roles keep the watch
    /// list's order. Over rounds, the CPU and its kernel part are each their own median (not
    /// the kernel part of the median round) and the peak is the largest.
    #[test]
    fn cost_arithmetic() {
        let watched = vec![
            Watched::new(10, "vha", "vha proxy"),
            Watched::new(11, "vha", "vha proxy"),
            Watched::new(20, "vha", "vha node"),
            Watched::new(30, "nginx", "nginx"),
        ];
        let mut before = Sample::default();
        let mut after = Sample::default();
        before.procs.insert(10, (0, s(100, 30)));
        before.procs.insert(11, (1, s(50, 30)));
        before.procs.insert(20, (2, s(0, 20)));
        after.procs.insert(10, (0, s(150, 31)));
        after.procs.insert(11, (1, s(60, 29)));
        after.procs.insert(20, (2, s(30, 25)));
        // Started during the run: not counted.
        after.procs.insert(30, (3, s(999, 5)));
        // 100 ticks/s: 60 ticks = 600 ms over 10 000 requests = 60 µs each; of them in the
        // kernel (a quarter of each sample, rounded down) 12 + 3 ticks = 15 µs.
        let c = costs(&watched, &before, &after, 10_000, 100);
        assert_eq!(c.len(), 2);
        assert_eq!(
            (
                c[0].role.as_str(),
                c[0].processes,
                c[0].cpu_us_per_request,
                c[0].rss_mb,
                c[0].peak_rss_mb
            ),
            ("vha proxy", 2, 60.0, 60.0, 62.0)
        );
        assert_eq!(c[0].sys_us_per_request, 15.0);
        assert_eq!(
            (c[1].role.as_str(), c[1].cpu_us_per_request, c[1].sys_us_per_request),
            ("vha node", 30.0, 7.0)
        );
        assert_eq!(costs(&watched, &before, &after, 0, 100)[0].cpu_us_per_request, 0.0);

        let r1 = c.clone();
        let mut r2 = c.clone();
        r2[0].cpu_us_per_request = 80.0;
        r2[0].sys_us_per_request = 20.0;
        r2[0].peak_rss_mb = 70.0;
        let mut r3 = c;
        r3[0].cpu_us_per_request = 40.0;
        r3[0].sys_us_per_request = 40.0;
        let m = over_rounds(&[r1, r2, r3]);
        assert_eq!(
            (m[0].cpu_us_per_request, m[0].sys_us_per_request, m[0].peak_rss_mb),
            (60.0, 20.0, 70.0)
        );
    }

    /// A live sample of this process finds it with some memory; a pid that does not exist is
    /// left out.
    #[test]
    fn sample_reads_proc() {
        let me = std::process::id();
        let w = vec![
            Watched::new(me, "bench", "bench client"),
            Watched::new(u32::MAX - 1, "x", "gone"),
        ];
        let smp = sample(&w);
        let (_, mine) = smp.procs.get(&me).expect("own process");
        assert!(mine.rss_bytes > 0 && mine.hwm_bytes >= mine.rss_bytes);
        assert_eq!(smp.procs.len(), 1);
        assert!(clock_ticks() > 0);
    }
}

//! What a run produces: the live progress bar (indicatif: rate, errors), the summary table,
//! the JSON report (`--json`: HDR percentiles per scenario and round, ratios, failover
//! trials) and a self-contained HTML page (`--html`: inline SVG, no scripts, no network)
//! with latency-over-time and distribution plots per scenario and the failover timeline.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::hist::{median, LatencyHist, Percentiles};
use crate::load::{Live, RunResult};
use crate::scenario::Scenario;

/// The whole report (`--json`).
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Report {
    pub version: u32,
    pub started_unix: u64,
    pub machine: Machine,
    pub command: String,
    pub config: serde_json::Value,
    pub scenarios: Vec<ScenarioReport>,
    /// `--sweep`: each scenario at each concurrency level.
    pub sweep: Vec<SweepPoint>,
    /// Every HTTP request the bench sent (setup, warm-up, measured, metrics scrapes).
    pub http_requests_total: u64,
    pub failover: Vec<crate::failover::FailoverReport>,
    /// Each role's resident memory before the first measured run (after the bench seeded its
    /// keys): `rss_mb` and `peak_rss_mb`; the CPU field is 0.
    pub idle_memory: Vec<crate::cost::RoleCost>,
    pub notes: Vec<String>,
}

/// One scenario at one concurrency level of `--sweep`.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct SweepPoint {
    pub scenario: String,
    pub connections: usize,
    pub throughput: f64,
    pub p99_ms: f64,
    pub errors: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Machine {
    pub cpus: usize,
    pub os: String,
    pub kernel: String,
    pub cpu_model: String,
}

impl Machine {
    pub(crate) fn detect() -> Machine {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu_model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .unwrap_or("")
            .trim()
            .to_string();
        Machine {
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            os: std::env::consts::OS.into(),
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .unwrap_or_default()
                .trim()
                .into(),
            cpu_model,
        }
    }
}

/// One scenario over all rounds.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct ScenarioReport {
    pub name: String,
    pub system: String,
    pub kind: String,
    pub target: String,
    pub rounds: Vec<RoundReport>,
    /// All rounds merged.
    pub total: Total,
    /// Throughput / the same system's `direct` (vha's `direct` for nginx), per round.
    pub ratio_to_direct: Option<Ratio>,
    /// Throughput / vha's `direct`, per round (peers only).
    pub ratio_to_vha_direct: Option<Ratio>,
    /// Latency CDF over all rounds: `[ms, fraction]`.
    pub cdf: Vec<(f64, f64)>,
    /// What a request cost each process role: median CPU per request over rounds, memory.
    pub cost: Vec<crate::cost::RoleCost>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Total {
    pub ok: u64,
    pub errors: u64,
    pub http_requests: u64,
    pub throughput_median: f64,
    pub latency: Percentiles,
}

#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Ratio {
    pub baseline: String,
    pub per_round: Vec<f64>,
    pub median: f64,
}

/// One scenario in one round.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct RoundReport {
    pub round: usize,
    /// Successful operations per second.
    pub throughput: f64,
    pub ok: u64,
    pub errors: u64,
    pub timeouts: u64,
    pub http_requests: u64,
    pub warmup_http_requests: u64,
    /// Requests the servers counted during warm-up + measured run (`vault_core_handle_request`
    /// deltas, minus the bench's own scrapes), when the servers expose them.
    pub server_requests: Option<u64>,
    pub statuses: BTreeMap<String, u64>,
    pub elapsed_s: f64,
    /// Latency as clients saw it (open loop: coordinated-omission corrected).
    pub latency: Percentiles,
    /// Send-to-answer time.
    pub service: Percentiles,
    pub timeline: Vec<Point>,
    /// What the run (warm-up included) cost each process role, per request sent.
    pub cost: Vec<crate::cost::RoleCost>,
}

/// One time window of a round.
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Point {
    pub t_s: f64,
    pub rps: f64,
    pub errors: u64,
    pub p50_ms: f64,
    pub p99_ms: f64,
}

impl RoundReport {
    pub(crate) fn from_run(round: usize, r: &RunResult, server_requests: Option<u64>) -> RoundReport {
        let w = r.window.as_secs_f64();
        RoundReport {
            round,
            throughput: r.throughput(),
            ok: r.ok,
            errors: r.errors,
            timeouts: r.timeouts,
            http_requests: r.http_requests,
            warmup_http_requests: r.warmup_http_requests,
            server_requests,
            statuses: r.statuses.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            elapsed_s: r.elapsed.as_secs_f64(),
            latency: r.latency.summary(),
            service: r.service.summary(),
            timeline: r
                .windows
                .iter()
                .enumerate()
                .map(|(i, win)| {
                    let s = win.hist.summary();
                    Point {
                        t_s: i as f64 * w,
                        rps: win.ok as f64 / w,
                        errors: win.errors,
                        p50_ms: s.p50_ms,
                        p99_ms: s.p99_ms,
                    }
                })
                .collect(),
            cost: Vec::new(),
        }
    }
}

/// Accumulates rounds per scenario, then computes totals and ratios.
#[derive(Default)]
pub(crate) struct Collector {
    pub scenarios: Vec<(Scenario, Vec<RoundReport>, LatencyHist)>,
}

impl Collector {
    pub(crate) fn add(&mut self, sc: &Scenario, round: RoundReport, hist: &LatencyHist) {
        if let Some(e) = self.scenarios.iter_mut().find(|(s, _, _)| s.name == sc.name) {
            e.1.push(round);
            e.2.add(hist);
        } else {
            self.scenarios.push((sc.clone(), vec![round], hist.clone()));
        }
    }

    pub(crate) fn finish(&self) -> Vec<ScenarioReport> {
        let tput = |name: &str| -> Option<Vec<f64>> {
            self.scenarios
                .iter()
                .find(|(s, _, _)| s.name == name)
                .map(|(_, r, _)| r.iter().map(|x| x.throughput).collect())
        };
        let ratio = |mine: &[f64], base_name: &str| -> Option<Ratio> {
            let base = tput(base_name)?;
            let per_round: Vec<f64> = mine
                .iter()
                .zip(base.iter())
                .map(|(a, b)| if *b > 0.0 { a / b } else { f64::NAN })
                .collect();
            let m = median(&per_round)?;
            Some(Ratio {
                baseline: base_name.into(),
                per_round: per_round.into_iter().map(round4).collect(),
                median: round4(m),
            })
        };
        self.scenarios
            .iter()
            .map(|(sc, rounds, hist)| {
                let mine: Vec<f64> = rounds.iter().map(|r| r.throughput).collect();
                let own_direct = if sc.system == "vha" || sc.system == "nginx" {
                    "direct".to_string()
                } else {
                    format!("{}:direct", sc.system)
                };
                ScenarioReport {
                    name: sc.name.clone(),
                    system: sc.system.clone(),
                    kind: sc.kind.name().into(),
                    target: sc.target.clone(),
                    total: Total {
                        ok: rounds.iter().map(|r| r.ok).sum(),
                        errors: rounds.iter().map(|r| r.errors).sum(),
                        http_requests: rounds.iter().map(|r| r.http_requests).sum(),
                        throughput_median: median(&mine).unwrap_or(0.0),
                        latency: hist.summary(),
                    },
                    ratio_to_direct: ratio(&mine, &own_direct),
                    ratio_to_vha_direct: if sc.system == "vha" {
                        None
                    } else {
                        ratio(&mine, "direct")
                    },
                    cdf: hist.cdf_points(200),
                    cost: crate::cost::over_rounds(&rounds.iter().map(|r| r.cost.clone()).collect::<Vec<_>>()),
                    rounds: rounds.clone(),
                }
            })
            .collect()
    }
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

/// A live progress bar for one run; finishes (and clears) on drop of the returned guard.
pub(crate) struct Progress {
    bar: ProgressBar,
    task: tokio::task::JoinHandle<()>,
}

impl Progress {
    /// `label` is shown left of the bar; the bar fills with elapsed time over `duration`.
    pub(crate) fn start(label: &str, duration: Duration, live: Arc<Live>, quiet: bool) -> Progress {
        let bar = if quiet {
            ProgressBar::with_draw_target(Some(duration.as_millis() as u64), ProgressDrawTarget::hidden())
        } else {
            ProgressBar::new(duration.as_millis() as u64)
        };
        bar.set_style(
            ProgressStyle::with_template("{prefix:>24} [{bar:30}] {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(label.to_string());
        let b = bar.clone();
        let task = tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let (mut last_ok, mut last_t) = (0u64, start);
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let now = tokio::time::Instant::now();
                let ok = live.ok.load(Ordering::Relaxed);
                let err = live.errors.load(Ordering::Relaxed);
                let rate = (ok - last_ok) as f64 / (now - last_t).as_secs_f64().max(1e-3);
                (last_ok, last_t) = (ok, now);
                b.set_position((now - start).as_millis() as u64);
                b.set_message(format!("{rate:>8.0} req/s  ok {ok}  errors {err}"));
            }
        });
        Progress { bar, task }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.task.abort();
        self.bar.finish_and_clear();
    }
}

/// The summary table (plain text).
pub(crate) fn table(scenarios: &[ScenarioReport]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{:<24} {:>10} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>8} {:>12}",
        "scenario", "req/s", "ratio", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "errors", "rounds"
    );
    for sc in scenarios {
        let ratio = sc
            .ratio_to_direct
            .as_ref()
            .map(|r| format!("{:.3}", r.median))
            .unwrap_or_else(|| "-".into());
        let l = &sc.total.latency;
        let _ = writeln!(
            s,
            "{:<24} {:>10.0} {:>8} {:>8.2} {:>8.2} {:>8.2} {:>9.2} {:>9.2} {:>8} {:>12}",
            sc.name,
            sc.total.throughput_median,
            ratio,
            l.p50_ms,
            l.p90_ms,
            l.p99_ms,
            l.p999_ms,
            l.max_ms,
            sc.total.errors,
            sc.rounds.len()
        );
    }
    s
}

/// What the cost table calls the memory taken before the first run.
const IDLE_ROW: &str = "(before load)";

/// The cost table (plain text): each role's memory before load, then per scenario each
/// role's CPU per request and memory.
pub(crate) fn cost_table(idle: &[crate::cost::RoleCost], scenarios: &[ScenarioReport]) -> String {
    let mut s = String::new();
    if scenarios.iter().all(|sc| sc.cost.is_empty()) {
        return s;
    }
    let _ = writeln!(
        s,
        "{:<24} {:<14} {:>6} {:>14} {:>12} {:>9} {:>10}",
        "scenario", "role", "procs", "CPU us/req", "of it kernel", "RSS MB", "peak MB"
    );
    for c in idle {
        let _ = writeln!(
            s,
            "{:<24} {:<14} {:>6} {:>14} {:>12} {:>9.1} {:>10.1}",
            IDLE_ROW, c.role, c.processes, "", "", c.rss_mb, c.peak_rss_mb
        );
    }
    for sc in scenarios {
        for c in &sc.cost {
            let _ = writeln!(
                s,
                "{:<24} {:<14} {:>6} {:>14.1} {:>12.1} {:>9.1} {:>10.1}",
                sc.name, c.role, c.processes, c.cpu_us_per_request, c.sys_us_per_request, c.rss_mb, c.peak_rss_mb
            );
        }
    }
    let _ = writeln!(
        s,
        "(CPU time of the role's processes from /proc during warm-up + run, per HTTP request sent, and its kernel (system) part; median over rounds)"
    );
    s
}

/// The sweep table (plain text): req/s and p99 per scenario and level.
pub(crate) fn sweep_table(points: &[SweepPoint]) -> String {
    let mut s = String::new();
    if points.is_empty() {
        return s;
    }
    let _ = writeln!(
        s,
        "{:<24} {:>6} {:>10} {:>9} {:>8}",
        "scenario", "conns", "req/s", "p99 ms", "errors"
    );
    for p in points {
        let _ = writeln!(
            s,
            "{:<24} {:>6} {:>10.0} {:>9.2} {:>8}",
            p.scenario, p.connections, p.throughput, p.p99_ms, p.errors
        );
    }
    s
}

/// A horizontal bar chart (inline SVG) of `bars` (label, value).
fn svg_bars(title: &str, unit: &str, bars: &[(String, f64)]) -> String {
    let (w, row, left) = (900.0, 22.0, 220.0);
    let h = 40.0 + row * bars.len() as f64;
    let max = bars.iter().map(|b| b.1).fold(0.0, f64::max).max(1e-9);
    let mut s = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-size=\"12\"><text x=\"4\" y=\"16\" font-weight=\"bold\">{}</text>", esc(title));
    for (i, (label, v)) in bars.iter().enumerate() {
        let y = 28.0 + row * i as f64;
        let len = (w - left - 90.0) * v / max;
        let _ = write!(
            s,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text><rect x=\"{left}\" y=\"{y}\" width=\"{len:.1}\" height=\"{}\" fill=\"{}\"/><text x=\"{:.1}\" y=\"{}\">{} {}</text>",
            left - 6.0,
            y + 14.0,
            esc(label),
            row - 6.0,
            COLORS[i % COLORS.len()],
            left + len + 4.0,
            y + 14.0,
            fmt_num(*v),
            esc(unit)
        );
    }
    s.push_str("</svg>");
    s
}

// ---------------------------------------------------------------------------------------
// HTML / SVG

const COLORS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// One series of a chart.
pub(crate) struct Series<'a> {
    pub name: &'a str,
    pub color: &'a str,
    pub points: Vec<(f64, f64)>,
    /// Draw dots instead of a line.
    pub dots: bool,
}

/// A line/scatter chart as inline SVG. `log_y` plots log10(y) (values <= 0 are clamped).
pub(crate) fn svg_chart(
    title: &str,
    xlabel: &str,
    ylabel: &str,
    series: &[Series<'_>],
    log_y: bool,
    vlines: &[(f64, &str)],
) -> String {
    let (w, h, ml, mr, mt, mb) = (760.0, 300.0, 64.0, 150.0, 28.0, 40.0);
    let ty = |y: f64| if log_y { y.max(1e-3).log10() } else { y };
    let all = series.iter().flat_map(|s| s.points.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in all {
        if x.is_finite() && y.is_finite() {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(ty(y));
            y1 = y1.max(ty(y));
        }
    }
    for &(x, _) in vlines {
        x0 = x0.min(x);
        x1 = x1.max(x);
    }
    if !x0.is_finite() {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if !log_y {
        y0 = y0.min(0.0);
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    if y1 <= y0 {
        y1 = y0 + 1.0;
    }
    let px = |x: f64| ml + (x - x0) / (x1 - x0) * (w - ml - mr);
    let py = |y: f64| mt + (1.0 - (ty(y) - y0) / (y1 - y0)) * (h - mt - mb);
    let mut s = String::new();
    let _ = write!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">"#
    );
    let _ = write!(
        s,
        r#"<rect width="{w}" height="{h}" fill="white"/><text x="{ml}" y="16" font-size="13" font-weight="bold">{}</text>"#,
        esc(title)
    );
    let _ = write!(
        s,
        r##"<rect x="{ml}" y="{mt}" width="{}" height="{}" fill="none" stroke="#999"/>"##,
        w - ml - mr,
        h - mt - mb
    );
    for i in 0..=4 {
        let fx = x0 + (x1 - x0) * i as f64 / 4.0;
        let fy = y0 + (y1 - y0) * i as f64 / 4.0;
        let yl = if log_y { 10f64.powf(fy) } else { fy };
        let _ = write!(
            s,
            r##"<text x="{:.1}" y="{:.1}" text-anchor="middle" fill="#444">{}</text>"##,
            px(fx),
            h - mb + 14.0,
            fmt_num(fx)
        );
        let gy = mt + (1.0 - i as f64 / 4.0) * (h - mt - mb);
        let _ = write!(
            s,
            r##"<line x1="{ml}" x2="{:.1}" y1="{gy:.1}" y2="{gy:.1}" stroke="#eee"/><text x="{:.1}" y="{:.1}" text-anchor="end" fill="#444">{}</text>"##,
            w - mr,
            ml - 4.0,
            gy + 4.0,
            fmt_num(yl)
        );
    }
    let _ = write!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        ml + (w - ml - mr) / 2.0,
        h - 6.0,
        esc(xlabel)
    );
    let _ = write!(
        s,
        r#"<text x="12" y="{:.1}" transform="rotate(-90 12 {:.1})" text-anchor="middle">{}{}</text>"#,
        mt + (h - mt - mb) / 2.0,
        mt + (h - mt - mb) / 2.0,
        esc(ylabel),
        if log_y { " (log)" } else { "" }
    );
    for &(x, label) in vlines {
        let _ = write!(
            s,
            r##"<line x1="{:.1}" x2="{:.1}" y1="{mt}" y2="{:.1}" stroke="#000" stroke-dasharray="4 3"/><text x="{:.1}" y="{:.1}" fill="#000">{}</text>"##,
            px(x),
            px(x),
            h - mb,
            px(x) + 3.0,
            mt + 12.0,
            esc(label)
        );
    }
    for (i, se) in series.iter().enumerate() {
        let pts: Vec<(f64, f64)> = se
            .points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        if se.dots {
            for (x, y) in &pts {
                let _ = write!(
                    s,
                    r#"<circle cx="{:.1}" cy="{:.1}" r="1.6" fill="{}" fill-opacity="0.6"/>"#,
                    px(*x),
                    py(*y),
                    se.color
                );
            }
        } else if !pts.is_empty() {
            let d: Vec<String> = pts
                .iter()
                .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
                .collect();
            let _ = write!(
                s,
                r#"<polyline fill="none" stroke="{}" stroke-width="1.5" points="{}"/>"#,
                se.color,
                d.join(" ")
            );
        }
        let ly = mt + 14.0 * i as f64 + 8.0;
        let _ = write!(
            s,
            r#"<rect x="{:.1}" y="{:.1}" width="10" height="10" fill="{}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            w - mr + 8.0,
            ly - 8.0,
            se.color,
            w - mr + 22.0,
            ly + 1.0,
            esc(se.name)
        );
    }
    s.push_str("</svg>");
    s
}

/// `-log10(1 - q)`: spreads the tail of a distribution (p90 -> 1, p99 -> 2, p99.9 -> 3),
/// capped at 5 so the maximum (q = 1) stays on the chart.
fn nines(q: f64) -> f64 {
    (-(1.0 - q).max(1e-5).log10()).max(0.0)
}

fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 1000.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 0.1 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

/// The self-contained HTML page.
pub(crate) fn html(r: &Report) -> String {
    let mut s = String::new();
    s.push_str("<!doctype html><html><head><meta charset=\"utf-8\"><title>vha bench</title><style>body{font-family:sans-serif;margin:24px;max-width:1000px}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#f4f4f4}td:first-child{text-align:left}pre{background:#f8f8f8;padding:8px}</style></head><body>");
    let _ = write!(
        s,
        "<h1>vha bench</h1><p>Machine: {} CPUs, {} ({}) kernel {}</p><pre>{}</pre>",
        r.machine.cpus,
        esc(&r.machine.cpu_model),
        r.machine.os,
        esc(&r.machine.kernel),
        esc(&r.command)
    );
    let _ = write!(
        s,
        "<pre>{}</pre>",
        esc(&serde_json::to_string_pretty(&r.config).unwrap_or_default())
    );
    s.push_str("<h2>Summary</h2><table><tr><th>scenario</th><th>target</th><th>req/s (median)</th><th>ratio to direct</th><th>p50 ms</th><th>p90 ms</th><th>p99 ms</th><th>p99.9 ms</th><th>max ms</th><th>errors</th></tr>");
    for sc in &r.scenarios {
        let l = &sc.total.latency;
        let ratio = sc
            .ratio_to_direct
            .as_ref()
            .map(|x| format!("{:.3} ({})", x.median, esc(&x.baseline)))
            .unwrap_or_else(|| "-".into());
        let _ = write!(s, "<tr><td>{}</td><td>{}</td><td>{:.0}</td><td>{ratio}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{:.2}</td><td>{}</td></tr>", esc(&sc.name), esc(&sc.target), sc.total.throughput_median, l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms, sc.total.errors);
    }
    s.push_str("</table>");
    if !r.scenarios.is_empty() {
        let bars: Vec<(String, f64)> = r
            .scenarios
            .iter()
            .map(|sc| (sc.name.clone(), sc.total.throughput_median))
            .collect();
        s.push_str(&svg_bars(
            "throughput across systems (median over rounds)",
            "req/s",
            &bars,
        ));
    }
    if r.scenarios.iter().any(|sc| !sc.cost.is_empty()) {
        s.push_str("<h2>Cost per request</h2><p>CPU time of each role's processes (from /proc, warm-up included) per HTTP request sent, and its kernel (system time) part, median over rounds; resident memory after the last round and its peak; first, each role's memory before load.</p><table><tr><th>scenario</th><th>role</th><th>processes</th><th>CPU µs/request</th><th>of it kernel</th><th>RSS MB</th><th>peak RSS MB</th></tr>");
        for c in &r.idle_memory {
            let _ = write!(
                s,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td></td><td></td><td>{:.1}</td><td>{:.1}</td></tr>",
                esc(IDLE_ROW),
                esc(&c.role),
                c.processes,
                c.rss_mb,
                c.peak_rss_mb
            );
        }
        let mut bars = Vec::new();
        for sc in &r.scenarios {
            for c in &sc.cost {
                let _ = write!(
                    s,
                    "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.1}</td><td>{:.1}</td><td>{:.1}</td><td>{:.1}</td></tr>",
                    esc(&sc.name),
                    esc(&c.role),
                    c.processes,
                    c.cpu_us_per_request,
                    c.sys_us_per_request,
                    c.rss_mb,
                    c.peak_rss_mb
                );
                if c.system != "bench" {
                    bars.push((format!("{} / {}", sc.name, c.role), c.cpu_us_per_request));
                }
            }
        }
        s.push_str("</table>");
        s.push_str(&svg_bars("CPU per request by role", "µs", &bars));
    }
    if !r.sweep.is_empty() {
        s.push_str(
            "<h2>Concurrency sweep</h2><p>Each scenario once per level (closed loop): where each system saturates.</p>",
        );
        let names: Vec<&str> = r.scenarios.iter().map(|sc| sc.name.as_str()).collect();
        let series = |f: fn(&SweepPoint) -> f64| -> Vec<Series<'_>> {
            names
                .iter()
                .enumerate()
                .map(|(i, n)| Series {
                    name: n,
                    color: COLORS[i % COLORS.len()],
                    points: r
                        .sweep
                        .iter()
                        .filter(|p| p.scenario == *n)
                        .map(|p| ((p.connections.max(1) as f64).log2(), f(p)))
                        .collect(),
                    dots: false,
                })
                .collect()
        };
        s.push_str(&svg_chart(
            "throughput against connections",
            "log2(connections)",
            "req/s",
            &series(|p| p.throughput),
            false,
            &[],
        ));
        s.push_str(&svg_chart(
            "p99 latency against connections",
            "log2(connections)",
            "p99 ms",
            &series(|p| p.p99_ms),
            true,
            &[],
        ));
        s.push_str("<table><tr><th>scenario</th><th>connections</th><th>req/s</th><th>p99 ms</th><th>errors</th></tr>");
        for p in &r.sweep {
            let _ = write!(
                s,
                "<tr><td>{}</td><td>{}</td><td>{:.0}</td><td>{:.2}</td><td>{}</td></tr>",
                esc(&p.scenario),
                p.connections,
                p.throughput,
                p.p99_ms,
                p.errors
            );
        }
        s.push_str("</table>");
    }
    if !r.scenarios.is_empty() {
        s.push_str("<h2>Latency distribution</h2>");
        let series: Vec<Series<'_>> = r
            .scenarios
            .iter()
            .enumerate()
            .map(|(i, sc)| Series {
                name: &sc.name,
                color: COLORS[i % COLORS.len()],
                points: sc.cdf.iter().map(|(ms, f)| (nines(*f), *ms)).collect(),
                dots: false,
            })
            .collect();
        s.push_str(&svg_chart(
            "latency by percentile, all rounds",
            "percentile as nines: 1 = p90, 2 = p99, 3 = p99.9, 4 = p99.99",
            "latency ms",
            &series,
            true,
            &[],
        ));
        s.push_str("<h2>Latency over time</h2>");
        for (i, sc) in r.scenarios.iter().enumerate() {
            let mut p50 = Vec::new();
            let mut p99 = Vec::new();
            let mut vl = Vec::new();
            let mut t0 = 0.0;
            for rd in &sc.rounds {
                vl.push((t0, "round"));
                for p in &rd.timeline {
                    p50.push((t0 + p.t_s, p.p50_ms));
                    p99.push((t0 + p.t_s, p.p99_ms));
                }
                t0 += rd.elapsed_s;
            }
            let _ = i;
            let series = [
                Series {
                    name: "p50",
                    color: COLORS[0],
                    points: p50,
                    dots: false,
                },
                Series {
                    name: "p99",
                    color: COLORS[1],
                    points: p99,
                    dots: false,
                },
            ];
            let vl: Vec<(f64, &str)> = vl.into_iter().skip(1).collect();
            s.push_str(&svg_chart(
                &format!("{} ({} rounds back to back)", sc.name, sc.rounds.len()),
                "s (measured time)",
                "latency ms",
                &series,
                true,
                &vl,
            ));
        }
    }
    for f in &r.failover {
        let _ = write!(s, "<h2>Failover: {}</h2>", esc(&f.system));
        let _ = write!(s, "<p>{} trials; time to first acknowledged write after kill -9: p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; acknowledged writes {}, lost {}; client errors {}.</p>", f.trials.len(), f.downtime_p50_ms, f.downtime_p99_ms, f.downtime_max_ms, f.acked_writes, f.lost_writes, f.trials.iter().map(|t| t.errors).sum::<u64>());
        s.push_str("<table><tr><th>trial</th><th>killed</th><th>new active</th><th>first ack after kill ms</th><th>errors</th><th>held</th><th>acked</th></tr>");
        for t in &f.trials {
            let _ = write!(
                s,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{:.0}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                t.trial,
                esc(&t.killed),
                esc(t.new_active.as_deref().unwrap_or("-")),
                t.downtime_ms.unwrap_or(f64::NAN),
                t.errors,
                t.held,
                t.acked
            );
        }
        s.push_str("</table>");
        let mut ok = Vec::new();
        let mut bad = Vec::new();
        for t in &f.trials {
            for p in &t.timeline {
                if p.ok {
                    ok.push((p.t_ms / 1000.0, p.latency_ms));
                } else {
                    bad.push((p.t_ms / 1000.0, p.latency_ms));
                }
            }
        }
        let series = [
            Series {
                name: "acknowledged",
                color: COLORS[2],
                points: ok,
                dots: true,
            },
            Series {
                name: "error",
                color: COLORS[1],
                points: bad,
                dots: true,
            },
        ];
        s.push_str(&svg_chart(
            "writes around the kill (all trials overlaid; x = send time)",
            "s since kill -9",
            "latency ms",
            &series,
            true,
            &[(0.0, "kill -9")],
        ));
    }
    if !r.notes.is_empty() {
        s.push_str("<h2>Notes</h2><ul>");
        for n in &r.notes {
            let _ = write!(s, "<li>{}</li>", esc(n));
        }
        s.push_str("</ul>");
    }
    s.push_str("</body></html>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The HTML is self-contained: inline SVG, no scripts and no external URL in any `src`
    /// or `href`, and user-provided text is escaped; the cost table (HTML and plain text)
    /// shows memory before load and each role's CPU per request with its kernel part.
    #[test]
    fn html_is_self_contained_and_escaped() {
        let mut r = Report {
            command: "vha bench <x>".into(),
            ..Default::default()
        };
        r.scenarios.push(ScenarioReport {
            name: "direct".into(),
            cdf: vec![(1.0, 0.5), (2.0, 1.0)],
            cost: vec![crate::cost::RoleCost {
                role: "<proxy>".into(),
                system: "vha".into(),
                processes: 3,
                cpu_us_per_request: 12.5,
                sys_us_per_request: 4.75,
                rss_mb: 30.0,
                peak_rss_mb: 31.0,
            }],
            ..Default::default()
        });
        for c in [1, 4] {
            r.sweep.push(SweepPoint {
                scenario: "direct".into(),
                connections: c,
                throughput: 100.0 * c as f64,
                p99_ms: 2.0,
                errors: 0,
            });
        }
        r.idle_memory.push(crate::cost::RoleCost {
            role: "<node>".into(),
            system: "vha".into(),
            processes: 3,
            rss_mb: 17.25,
            peak_rss_mb: 18.0,
            ..Default::default()
        });
        let h = html(&r);
        assert!(h.contains("<svg"));
        assert!(!h.contains("<script"));
        assert!(!h.contains("src=") && !h.contains("href="));
        assert!(h.contains("vha bench &lt;x&gt;"));
        // The cost table (memory before load first) and its bars, the sweep's charts and
        // table, the throughput bars.
        assert!(h.contains("Cost per request") && h.contains("&lt;proxy&gt;") && h.contains("12.5"));
        assert!(h.contains("of it kernel") && h.contains("<td>4.8</td>"));
        assert!(h.contains("Concurrency sweep") && h.contains("p99 latency against connections"));
        assert!(h.contains("throughput across systems"));
        assert!(h.contains("&lt;node&gt;") && h.contains("17.2"));
        let t = cost_table(&r.idle_memory, &r.scenarios);
        assert!(t.contains("<proxy>") && t.contains("(before load)") && t.contains("<node>"));
        assert!(t.contains("of it kernel") && t.contains(" 4.8 "), "{t}");
        assert!(sweep_table(&r.sweep).lines().count() == 3);
    }

    /// Ratios are per round against the baseline's same round, with their median.
    #[test]
    fn ratios_per_round_and_median() {
        let mut c = Collector::default();
        let sc = |name: &str| Scenario {
            name: name.into(),
            kind: crate::scenario::Kind::Direct,
            target: String::new(),
            system: "vha".into(),
        };
        let rr = |t: f64| RoundReport {
            throughput: t,
            ..Default::default()
        };
        let h = LatencyHist::new();
        for (d, f) in [(100.0, 90.0), (200.0, 100.0), (100.0, 80.0)] {
            c.add(&sc("direct"), rr(d), &h);
            c.add(&sc("forward"), rr(f), &h);
        }
        let out = c.finish();
        let fwd = out.iter().find(|s| s.name == "forward").unwrap();
        let r = fwd.ratio_to_direct.as_ref().unwrap();
        assert_eq!(r.per_round, vec![0.9, 0.5, 0.8]);
        assert_eq!(r.median, 0.8);
        assert_eq!(fwd.total.throughput_median, 90.0);
    }
}

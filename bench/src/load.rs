//! The load engine: closed loop (`--concurrency` workers, each sends its next request when
//! the previous one is answered) and open loop (`--rate` requests per second on a fixed
//! schedule, wrk2-style). In the open loop a request's latency is measured from the moment
//! the schedule said it should be sent, not from when a free worker got to it: a stall then
//! shows up in the latencies of every request that queued behind it (coordinated-omission
//! correction). The uncorrected service time is kept beside it.
//!
//! Every run is bounded twice: by `duration` (and optionally a request count) and by a
//! per-request timeout, so a wedged server ends the run instead of hanging it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tokio::time::Instant;

use crate::hist::LatencyHist;

/// What one logical operation ended as.
#[derive(Clone, Debug, Default)]
pub(crate) struct Outcome {
    /// The operation did what the scenario expects (2xx, or the 307 for `redirect`).
    pub ok: bool,
    /// Final HTTP status, if a response came back.
    pub status: Option<u16>,
    /// HTTP requests this operation sent (2 for a followed redirect).
    pub http_requests: u32,
}

/// One operation: called with a sequence number, resolves to its outcome.
pub(crate) type OpFn = Arc<dyn Fn(u64) -> BoxFuture<'static, Outcome> + Send + Sync>;

/// How requests are issued.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Mode {
    /// `workers` concurrent request loops.
    Closed { workers: usize },
    /// `rate` requests/s on a fixed schedule, at most `max_inflight` at once.
    Open { rate: f64, max_inflight: usize },
}

/// One measured run.
#[derive(Clone, Debug)]
pub(crate) struct RunSpec {
    pub mode: Mode,
    pub duration: Duration,
    /// Stop after this many operations (besides `duration`).
    pub requests: Option<u64>,
    /// Unmeasured warm-up before the run (closed loop with the same concurrency).
    pub warmup: Duration,
    /// Per-operation timeout (counts as an error).
    pub timeout: Duration,
}

/// Live counters the progress bar reads.
#[derive(Debug, Default)]
pub(crate) struct Live {
    pub ok: AtomicU64,
    pub errors: AtomicU64,
}

/// Per-window aggregates for latency-over-time plots.
#[derive(Clone, Debug, Default)]
pub(crate) struct Window {
    pub ok: u64,
    pub errors: u64,
    pub hist: LatencyHist,
}

/// The result of one run.
#[derive(Clone, Debug, Default)]
pub(crate) struct RunResult {
    /// Latencies (open loop: corrected, from the intended send time).
    pub latency: LatencyHist,
    /// Service time: from the actual send to the answer.
    pub service: LatencyHist,
    pub ok: u64,
    pub errors: u64,
    /// Operations that timed out (included in `errors`).
    pub timeouts: u64,
    /// HTTP requests sent in the measured part (for server-side cross-checks).
    pub http_requests: u64,
    /// HTTP requests sent during warm-up.
    pub warmup_http_requests: u64,
    /// Status code -> operations.
    pub statuses: std::collections::BTreeMap<u16, u64>,
    pub elapsed: Duration,
    /// Width of each entry of `windows`.
    pub window: Duration,
    pub windows: Vec<Window>,
}

impl RunResult {
    /// Successful operations per second.
    pub(crate) fn throughput(&self) -> f64 {
        let s = self.elapsed.as_secs_f64();
        if s > 0.0 {
            self.ok as f64 / s
        } else {
            0.0
        }
    }

    fn merge(&mut self, o: WorkerAcc) {
        self.latency.add(&o.latency);
        self.service.add(&o.service);
        self.ok += o.ok;
        self.errors += o.errors;
        self.timeouts += o.timeouts;
        self.http_requests += o.http_requests;
        for (k, v) in o.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        if self.windows.len() < o.windows.len() {
            self.windows.resize_with(o.windows.len(), Window::default);
        }
        for (i, w) in o.windows.into_iter().enumerate() {
            self.windows[i].ok += w.ok;
            self.windows[i].errors += w.errors;
            self.windows[i].hist.add(&w.hist);
        }
    }
}

/// The send time the open-loop schedule gives operation `i` at `rate` per second.
pub(crate) fn intended_offset(i: u64, rate: f64) -> Duration {
    Duration::from_secs_f64(i as f64 / rate)
}

/// Coordinated-omission-corrected latency: from the intended send time to the answer. An
/// operation sent on time has `corrected == service`; one that waited for a worker is
/// charged the wait.
pub(crate) fn corrected_latency(intended: Instant, done: Instant) -> Duration {
    done.saturating_duration_since(intended)
}

/// Window width for a run of `duration`: about 200 windows, never under 100 ms.
pub(crate) fn window_for(duration: Duration) -> Duration {
    (duration / 200).max(Duration::from_millis(100))
}

#[derive(Default)]
struct WorkerAcc {
    latency: LatencyHist,
    service: LatencyHist,
    ok: u64,
    errors: u64,
    timeouts: u64,
    http_requests: u64,
    statuses: std::collections::BTreeMap<u16, u64>,
    windows: Vec<Window>,
}

impl WorkerAcc {
    fn record(
        &mut self,
        o: &Outcome,
        latency: Duration,
        service: Duration,
        at: Duration,
        window: Duration,
        live: &Live,
    ) {
        self.http_requests += u64::from(o.http_requests);
        if let Some(s) = o.status {
            *self.statuses.entry(s).or_default() += 1;
        }
        let wi = (at.as_nanos() / window.as_nanos().max(1)) as usize;
        if self.windows.len() <= wi {
            self.windows.resize_with(wi + 1, Window::default);
        }
        let w = &mut self.windows[wi];
        if o.ok {
            self.ok += 1;
            w.ok += 1;
            live.ok.fetch_add(1, Ordering::Relaxed);
        } else {
            self.errors += 1;
            w.errors += 1;
            live.errors.fetch_add(1, Ordering::Relaxed);
        }
        // Failed operations are timed too: a fast 503 is part of what clients saw.
        self.latency.record(latency);
        self.service.record(service);
        w.hist.record(latency);
    }
}

async fn timed(op: &OpFn, seq: u64, timeout: Duration) -> (Outcome, bool) {
    match tokio::time::timeout(timeout, op(seq)).await {
        Ok(o) => (o, false),
        Err(_) => (
            Outcome {
                ok: false,
                status: None,
                http_requests: 1,
            },
            true,
        ),
    }
}

/// Runs the warm-up and then the measured load; `live` is updated as operations finish.
pub(crate) async fn run(spec: &RunSpec, op: OpFn, live: Arc<Live>) -> RunResult {
    let mut warmup_http = 0u64;
    if !spec.warmup.is_zero() {
        let workers = match spec.mode {
            Mode::Closed { workers } => workers,
            Mode::Open { max_inflight, rate } => max_inflight.min((rate / 100.0).ceil().max(1.0) as usize),
        };
        let warm = RunSpec {
            mode: Mode::Closed { workers },
            duration: spec.warmup,
            requests: None,
            warmup: Duration::ZERO,
            timeout: spec.timeout,
        };
        let r = Box::pin(run(&warm, op.clone(), Arc::new(Live::default()))).await;
        warmup_http = r.http_requests;
    }
    let window = window_for(spec.duration);
    let start = Instant::now();
    let deadline = start + spec.duration;
    let limit = spec.requests.unwrap_or(u64::MAX);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    match spec.mode {
        Mode::Closed { workers } => {
            for _ in 0..workers.max(1) {
                let (op, next, live, timeout) = (op.clone(), next.clone(), live.clone(), spec.timeout);
                tasks.push(tokio::spawn(async move {
                    let mut acc = WorkerAcc::default();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let t0 = Instant::now();
                        if i >= limit || t0 >= deadline {
                            break;
                        }
                        let (o, to) = timed(&op, i, timeout).await;
                        let done = Instant::now();
                        acc.timeouts += u64::from(to);
                        let d = done - t0;
                        acc.record(&o, d, d, done - start, window, &live);
                    }
                    acc
                }));
            }
        }
        Mode::Open { rate, max_inflight } => {
            let rate = rate.max(0.001);
            for _ in 0..max_inflight.max(1) {
                let (op, next, live, timeout) = (op.clone(), next.clone(), live.clone(), spec.timeout);
                tasks.push(tokio::spawn(async move {
                    let mut acc = WorkerAcc::default();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let intended = start + intended_offset(i, rate);
                        if i >= limit || intended >= deadline {
                            break;
                        }
                        tokio::time::sleep_until(intended).await;
                        let sent = Instant::now();
                        let (o, to) = timed(&op, i, timeout).await;
                        let done = Instant::now();
                        acc.timeouts += u64::from(to);
                        acc.record(
                            &o,
                            corrected_latency(intended, done),
                            done - sent,
                            done - start,
                            window,
                            &live,
                        );
                    }
                    acc
                }));
            }
        }
    }
    let mut res = RunResult {
        window,
        warmup_http_requests: warmup_http,
        ..Default::default()
    };
    for t in tasks {
        if let Ok(acc) = t.await {
            res.merge(acc);
        }
    }
    res.elapsed = Instant::now() - start;
    res
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op_with(service: impl Fn(u64) -> Duration + Send + Sync + 'static) -> OpFn {
        let service = Arc::new(service);
        Arc::new(move |i| {
            let d = service(i);
            Box::pin(async move {
                tokio::time::sleep(d).await;
                Outcome {
                    ok: true,
                    status: Some(200),
                    http_requests: 1,
                }
            })
        })
    }

    /// The schedule is linear in the sequence number, and an on-time request's corrected
    /// latency equals its service time while a late one is charged its wait.
    #[test]
    fn schedule_and_correction_math() {
        assert_eq!(intended_offset(0, 100.0), Duration::ZERO);
        assert_eq!(intended_offset(250, 100.0), Duration::from_millis(2500));
        assert_eq!(intended_offset(3, 4.0), Duration::from_millis(750));
        let t0 = Instant::now();
        assert_eq!(
            corrected_latency(t0, t0 + Duration::from_millis(7)),
            Duration::from_millis(7)
        );
        // Scheduled at t0+10ms, sent late at t0+500ms, answered at t0+501ms: 491 ms charged.
        assert_eq!(
            corrected_latency(t0 + Duration::from_millis(10), t0 + Duration::from_millis(501)),
            Duration::from_millis(491)
        );
        assert_eq!(corrected_latency(t0 + Duration::from_secs(1), t0), Duration::ZERO);
        assert_eq!(window_for(Duration::from_secs(2)), Duration::from_millis(100));
        assert_eq!(window_for(Duration::from_secs(60)), Duration::from_millis(300));
    }

    /// Coordinated omission, known input: 100 req/s for 10 s through one worker, 1 ms
    /// service, but the first request stalls 1 s. Requests 1..=110 queue behind it; request
    /// k is sent at 1000+(k-1) ms and answered at 1000+k ms while intended at 10k ms, so its
    /// corrected latency is 1000-9k ms. The corrected p99 (990th of 1000 samples: k = 10)
    /// is therefore ~910 ms and p90 (k = 100) ~100 ms, while the uncorrected service time
    /// hides the stall everywhere but the max.
    #[tokio::test(start_paused = true)]
    async fn open_loop_charges_queued_requests_for_a_stall() {
        let op = op_with(|i| {
            if i == 0 {
                Duration::from_secs(1)
            } else {
                Duration::from_millis(1)
            }
        });
        let spec = RunSpec {
            mode: Mode::Open {
                rate: 100.0,
                max_inflight: 1,
            },
            duration: Duration::from_secs(10),
            requests: None,
            warmup: Duration::ZERO,
            timeout: Duration::from_secs(5),
        };
        let r = run(&spec, op, Arc::new(Live::default())).await;
        assert_eq!(r.ok, 1000);
        assert_eq!(r.errors, 0);
        let c = r.latency.summary();
        let s = r.service.summary();
        assert!((c.p99_ms - 910.0).abs() <= 10.0, "corrected {c:?}");
        assert!((c.p90_ms - 100.0).abs() <= 10.0, "corrected {c:?}");
        assert!((c.max_ms - 1000.0).abs() <= 2.0, "corrected {c:?}");
        assert!(c.p50_ms <= 1.1, "corrected {c:?}");
        assert!(s.p99_ms <= 1.1, "service {s:?}");
        assert!((s.max_ms - 1000.0).abs() <= 2.0, "service {s:?}");
        // 111 of 1000 requests (the stalled one and 110 queued) took at least 10 ms.
        let slow = r.latency.quantile_us(1.0 - 111.0 / 1000.0 + 0.0005);
        assert!(slow >= 9_900, "{slow}");
    }

    /// With enough workers the open loop keeps its schedule: corrected == service, and the
    /// achieved rate is the requested one.
    #[tokio::test(start_paused = true)]
    async fn open_loop_on_schedule_has_no_correction() {
        let op = op_with(|_| Duration::from_millis(5));
        let spec = RunSpec {
            mode: Mode::Open {
                rate: 200.0,
                max_inflight: 8,
            },
            duration: Duration::from_secs(5),
            requests: None,
            warmup: Duration::ZERO,
            timeout: Duration::from_secs(5),
        };
        let r = run(&spec, op, Arc::new(Live::default())).await;
        assert_eq!(r.ok, 1000);
        assert!(
            (r.latency.summary().max_ms - 5.0).abs() < 0.1,
            "{:?}",
            r.latency.summary()
        );
        assert!((r.throughput() - 200.0).abs() < 2.0, "{}", r.throughput());
    }

    /// The closed loop is bounded by the request count and by the duration, whichever comes
    /// first, and counts timeouts as errors.
    #[tokio::test(start_paused = true)]
    async fn closed_loop_bounds_and_timeouts() {
        let spec = RunSpec {
            mode: Mode::Closed { workers: 4 },
            duration: Duration::from_secs(60),
            requests: Some(100),
            warmup: Duration::ZERO,
            timeout: Duration::from_secs(1),
        };
        let r = run(&spec, op_with(|_| Duration::from_millis(10)), Arc::new(Live::default())).await;
        assert_eq!(r.ok, 100);
        assert_eq!(r.http_requests, 100);
        assert!(r.elapsed <= Duration::from_millis(260), "{:?}", r.elapsed);
        let spec = RunSpec {
            requests: None,
            duration: Duration::from_secs(3),
            ..spec
        };
        let r = run(
            &spec,
            op_with(|i| {
                if i % 2 == 0 {
                    Duration::from_secs(30)
                } else {
                    Duration::from_millis(1)
                }
            }),
            Arc::new(Live::default()),
        )
        .await;
        assert!(r.timeouts > 0 && r.timeouts == r.errors, "{} {}", r.timeouts, r.errors);
        assert!(r.elapsed <= Duration::from_secs(5), "{:?}", r.elapsed);
    }
}

//! Latency histograms: an HDR histogram in microseconds (1 µs .. 10 min, 3 significant
//! digits, so every percentile is within 0.1 % of the recorded value) and the percentile
//! summary the reports print (p50/p90/p99/p99.9/max, in milliseconds).

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Highest trackable latency (µs): 10 minutes. Larger values are clamped, never dropped.
const MAX_US: u64 = 600_000_000;
/// Significant decimal digits kept by the histogram.
const SIGFIG: u8 = 3;

/// A latency histogram in microseconds.
#[derive(Clone, Debug)]
pub(crate) struct LatencyHist {
    h: Histogram<u64>,
}

impl Default for LatencyHist {
    fn default() -> Self {
        Self::new()
    }
}

impl LatencyHist {
    pub(crate) fn new() -> LatencyHist {
        LatencyHist {
            h: Histogram::new_with_bounds(1, MAX_US, SIGFIG).expect("valid histogram bounds"),
        }
    }

    /// Records one latency in microseconds (clamped to 1 µs .. 10 min).
    pub(crate) fn record_us(&mut self, us: u64) {
        let _ = self.h.record(us.clamp(1, MAX_US));
    }

    pub(crate) fn record(&mut self, d: std::time::Duration) {
        self.record_us(d.as_micros().min(u64::MAX as u128) as u64);
    }

    pub(crate) fn add(&mut self, other: &LatencyHist) {
        let _ = self.h.add(&other.h);
    }

    pub(crate) fn count(&self) -> u64 {
        self.h.len()
    }

    /// The value (µs) at quantile `q` in 0..=1 (0 when empty).
    pub(crate) fn quantile_us(&self, q: f64) -> u64 {
        if self.h.is_empty() {
            0
        } else {
            self.h.value_at_quantile(q)
        }
    }

    pub(crate) fn summary(&self) -> Percentiles {
        let ms = |us: u64| us as f64 / 1000.0;
        Percentiles {
            count: self.count(),
            mean_ms: if self.h.is_empty() { 0.0 } else { self.h.mean() / 1000.0 },
            p50_ms: ms(self.quantile_us(0.50)),
            p90_ms: ms(self.quantile_us(0.90)),
            p99_ms: ms(self.quantile_us(0.99)),
            p999_ms: ms(self.quantile_us(0.999)),
            max_ms: ms(if self.h.is_empty() { 0 } else { self.h.max() }),
        }
    }

    /// `(latency_ms, cumulative fraction)` points for a distribution plot, one per distinct
    /// recorded bucket (bounded by the histogram's resolution).
    pub(crate) fn cdf_points(&self, max_points: usize) -> Vec<(f64, f64)> {
        let total = self.count();
        if total == 0 {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut seen = 0u64;
        for v in self.h.iter_recorded() {
            seen += v.count_at_value();
            out.push((
                self.h.highest_equivalent(v.value_iterated_to()) as f64 / 1000.0,
                seen as f64 / total as f64,
            ));
        }
        if out.len() > max_points && max_points > 1 {
            let step = out.len() as f64 / max_points as f64;
            let last = *out.last().expect("non-empty");
            out = (0..max_points).map(|i| out[(i as f64 * step) as usize]).collect();
            out.push(last);
        }
        out
    }
}

/// The percentiles every report shows.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub(crate) struct Percentiles {
    pub count: u64,
    pub mean_ms: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

/// Median of a list (mean of the middle two for an even length); `None` when empty.
pub(crate) fn median(xs: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Nearest-rank percentile of raw samples (used for failover trials, where there are few).
pub(crate) fn percentile(xs: &[f64], q: f64) -> Option<f64> {
    let mut v: Vec<f64> = xs.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    let rank = (q * v.len() as f64).ceil().max(1.0) as usize;
    Some(v[rank.min(v.len()) - 1])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn within(got: f64, want: f64, rel: f64) -> bool {
        (got - want).abs() <= want.abs() * rel
    }

    /// Percentiles of the uniform sequence 1..=10000 µs are the matching ranks (p50 = 5 ms,
    /// p99 = 9.9 ms, p99.9 = 9.99 ms, max = 10 ms), within the histogram's 0.1 % precision.
    #[test]
    fn percentiles_of_a_uniform_sequence() {
        let mut h = LatencyHist::new();
        for us in 1..=10_000 {
            h.record_us(us);
        }
        let s = h.summary();
        assert_eq!(s.count, 10_000);
        assert!(within(s.p50_ms, 5.0, 0.001), "{s:?}");
        assert!(within(s.p90_ms, 9.0, 0.001), "{s:?}");
        assert!(within(s.p99_ms, 9.9, 0.001), "{s:?}");
        assert!(within(s.p999_ms, 9.99, 0.001), "{s:?}");
        assert!(within(s.max_ms, 10.0, 0.001), "{s:?}");
        assert!(within(s.mean_ms, 5.0005, 0.001), "{s:?}");
    }

    /// A single outlier among 999 fast samples sits above p99.9 only: p99 stays at the fast
    /// value, max is the outlier. Merging two histograms adds their counts.
    #[test]
    fn outlier_only_moves_the_tail_and_merge_adds() {
        let mut h = LatencyHist::new();
        for _ in 0..999 {
            h.record_us(1_000);
        }
        h.record_us(2_000_000);
        let s = h.summary();
        assert!(within(s.p99_ms, 1.0, 0.001), "{s:?}");
        assert!(within(s.p999_ms, 1.0, 0.001), "{s:?}");
        assert!(within(s.max_ms, 2000.0, 0.001), "{s:?}");
        let mut m = LatencyHist::new();
        m.add(&h);
        m.add(&h);
        assert_eq!(m.count(), 2000);
        assert!(within(m.summary().max_ms, 2000.0, 0.001));
    }

    /// Empty histograms summarize to zeros; out-of-range values are clamped, not dropped.
    #[test]
    fn empty_and_clamped() {
        let h = LatencyHist::new();
        assert_eq!(h.summary(), Percentiles::default());
        let mut h = LatencyHist::new();
        h.record_us(0);
        h.record_us(u64::MAX);
        assert_eq!(h.count(), 2);
        assert!(h.summary().max_ms >= 599_000.0);
    }

    /// Median and nearest-rank percentile of small lists.
    #[test]
    fn median_and_rank_percentile() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
        let xs: Vec<f64> = (1..=10).map(|x| x as f64).collect();
        assert_eq!(percentile(&xs, 0.5), Some(5.0));
        assert_eq!(percentile(&xs, 0.99), Some(10.0));
        assert_eq!(percentile(&xs, 0.0), Some(1.0));
    }

    /// The CDF ends at fraction 1.0 at the maximum and is non-decreasing.
    #[test]
    fn cdf_is_monotone_and_complete() {
        let mut h = LatencyHist::new();
        for us in [100, 200, 200, 5_000, 90_000] {
            h.record_us(us);
        }
        let pts = h.cdf_points(1000);
        assert!(pts.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
        let last = pts.last().unwrap();
        assert!((last.1 - 1.0).abs() < 1e-9);
        assert!(within(last.0, 90.0, 0.001));
    }
}

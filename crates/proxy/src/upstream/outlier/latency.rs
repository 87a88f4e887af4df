//! Latency outliers (opt-in, beyond Envoy, whose latency detector was never built): an
//! endpoint whose recent p99 is several times the median p99 of its peers is ejected like a
//! failing one.
//!
//! Every answered attempt's time to the response head is recorded per endpoint (a per-try
//! timeout counts as its elapsed time), keeping the last `KEPT` (512) samples. Once per
//! `interval` the detector compares the p99 of each endpoint in service over the last
//! interval: an endpoint with at least [`MIN_SAMPLES`] samples whose p99 is at least `ratio`
//! times the median p99 of the others (and at least [`FLOOR`]: sub-10 ms spreads are noise,
//! not outliers) is an outlier. The worst go first; `maxEjectionPercent`, the growing
//! ejection time and "never all" apply as to every ejection. An ejected endpoint's samples
//! are dropped, so it returns with a clean slate.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Fewest samples in the window for an endpoint's p99 to count (as a candidate or a peer).
pub const MIN_SAMPLES: usize = 20;
/// An outlier's p99 is at least this long, whatever its peers'.
pub const FLOOR: Duration = Duration::from_millis(10);
/// Samples kept per endpoint (the most recent).
const KEPT: usize = 512;

/// One endpoint's samples: (milliseconds since the detector's epoch, latency in
/// microseconds), oldest first.
type Window = VecDeque<(u64, u32)>;

/// The recent latencies of a cluster's endpoints (by index).
pub struct LatencyWindows {
    samples: Box<[Mutex<Window>]>,
    /// When the next comparison is due (milliseconds since the epoch).
    next_check: AtomicU64,
}

impl LatencyWindows {
    /// Windows for `n` endpoints; the first comparison after `interval_ms`.
    pub fn new(n: usize, interval_ms: u64) -> Self {
        Self {
            samples: (0..n).map(|_| Mutex::default()).collect(),
            next_check: AtomicU64::new(interval_ms),
        }
    }

    fn window(&self, i: usize) -> Option<std::sync::MutexGuard<'_, Window>> {
        let m = self.samples.get(i)?;
        Some(m.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Records one latency of endpoint `i` at `now_ms`.
    pub fn record(&self, i: usize, now_ms: u64, latency: Duration) {
        let Some(mut w) = self.window(i) else { return };
        if w.len() == KEPT {
            w.pop_front();
        }
        let us = u32::try_from(latency.as_micros()).unwrap_or(u32::MAX);
        w.push_back((now_ms, us));
    }

    /// Whether a comparison is due at `now_ms`; claims it (the next one is an interval on).
    pub fn due(&self, now_ms: u64, interval_ms: u64) -> bool {
        let next = self.next_check.load(Ordering::Acquire);
        now_ms >= next
            && self
                .next_check
                .compare_exchange(
                    next,
                    now_ms + interval_ms.max(1),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
    }

    /// Forgets endpoint `i`'s samples.
    pub fn clear(&self, i: usize) {
        if let Some(mut w) = self.window(i) {
            w.clear();
        }
    }

    /// The p99 of endpoint `i`'s samples since `since_ms`, with enough of them.
    fn p99(&self, i: usize, since_ms: u64) -> Option<u32> {
        let w = self.window(i)?;
        let mut recent: Vec<u32> = w
            .iter()
            .filter(|(t, _)| *t >= since_ms)
            .map(|(_, us)| *us)
            .collect();
        drop(w);
        if recent.len() < MIN_SAMPLES {
            return None;
        }
        recent.sort_unstable();
        let rank = (recent.len() * 99).div_ceil(100);
        Some(recent[rank.saturating_sub(1)])
    }

    /// The endpoints (other than those `out`) whose p99 since `since_ms` is at least `ratio`
    /// times their peers' median p99, and at least [`FLOOR`]; the worst first.
    pub fn outliers(&self, since_ms: u64, ratio: f64, out: impl Fn(usize) -> bool) -> Vec<usize> {
        let p99s: Vec<(usize, u32)> = (0..self.samples.len())
            .filter(|&i| !out(i))
            .filter_map(|i| Some((i, self.p99(i, since_ms)?)))
            .collect();
        if p99s.len() < 2 {
            return Vec::new();
        }
        let floor = FLOOR.as_micros() as f64;
        let mut found: Vec<(usize, f64)> = p99s
            .iter()
            .filter_map(|&(i, p99)| {
                let mut peers: Vec<u32> = p99s
                    .iter()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, p)| *p)
                    .collect();
                peers.sort_unstable();
                let mid = peers.len() / 2;
                let median = if peers.len() % 2 == 1 {
                    f64::from(peers[mid])
                } else {
                    (f64::from(peers[mid - 1]) + f64::from(peers[mid])) / 2.0
                };
                let p99 = f64::from(p99);
                (p99 >= floor && p99 >= ratio * median).then(|| (i, p99 / median.max(1.0)))
            })
            .collect();
        found.sort_by(|a, b| b.1.total_cmp(&a.1));
        found.into_iter().map(|(i, _)| i).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(w: &LatencyWindows, i: usize, at: u64, ms: &[u64]) {
        for (k, m) in ms.iter().enumerate() {
            w.record(i, at + k as u64, Duration::from_millis(*m));
        }
    }

    #[test]
    fn a_slow_endpoint_among_fast_peers_is_an_outlier() {
        let w = LatencyWindows::new(4, 1000);
        for i in 0..3 {
            fill(&w, i, 0, &[5; 30]);
        }
        fill(&w, 3, 0, &[40; 30]);
        assert_eq!(w.outliers(0, 3.0, |_| false), [3]);
        // Not 10x slower: kept.
        assert!(w.outliers(0, 10.0, |_| false).is_empty());
        // Already out: not compared, and not a peer.
        assert!(w.outliers(0, 3.0, |i| i == 3).is_empty());
    }

    #[test]
    fn few_samples_old_samples_and_fast_spreads_are_not_outliers() {
        let w = LatencyWindows::new(3, 1000);
        fill(&w, 0, 0, &[1; 30]);
        fill(&w, 1, 0, &[1; 30]);
        // 8x its peers, but under the 10 ms floor.
        fill(&w, 2, 0, &[8; 30]);
        assert!(w.outliers(0, 3.0, |_| false).is_empty());
        // Slow, but too few samples to tell.
        w.clear(2);
        fill(&w, 2, 0, &[100; MIN_SAMPLES - 1]);
        assert!(w.outliers(0, 3.0, |_| false).is_empty());
        // Slow long ago (before the window): not counted.
        w.clear(2);
        fill(&w, 2, 0, &[100; 30]);
        fill(&w, 2, 5_000, &[1; 30]);
        fill(&w, 0, 5_000, &[1; 30]);
        fill(&w, 1, 5_000, &[1; 30]);
        assert!(w.outliers(5_000, 3.0, |_| false).is_empty());
    }

    #[test]
    fn p99_ignores_a_single_spike_and_only_the_latest_samples_are_kept() {
        let w = LatencyWindows::new(3, 1000);
        fill(&w, 0, 0, &[5; 200]);
        fill(&w, 1, 0, &[5; 200]);
        let mut spiky = vec![5; 199];
        spiky.push(500);
        fill(&w, 2, 0, &spiky);
        assert!(
            w.outliers(0, 3.0, |_| false).is_empty(),
            "one spike in 200 is past the p99"
        );
        fill(&w, 2, 0, &[50; KEPT]);
        assert_eq!(w.outliers(0, 3.0, |_| false), [2]);
        assert_eq!(w.window(2).unwrap().len(), KEPT);
    }

    #[test]
    fn one_comparison_per_interval() {
        let w = LatencyWindows::new(2, 1000);
        assert!(!w.due(999, 1000));
        assert!(w.due(1000, 1000));
        assert!(!w.due(1500, 1000), "claimed until 2000");
        assert!(w.due(2000, 1000));
    }
}

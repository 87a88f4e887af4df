//! Per-endpoint load: requests in flight and a peak-EWMA latency estimate.
//!
//! The estimate follows latency up at once (a sample above it replaces it) and down slowly
//! (smaller samples blend in with a weight that grows with the time since the last sample,
//! time constant [`DECAY`]). With no samples it decays towards zero, so an endpoint that
//! was slow once and then passed over is eventually tried again. Everything is a relaxed
//! atomic: these are hints for picking, and a lost race costs one sample's precision.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Time constant of the latency estimate: after this long, the old estimate weighs 1/e.
pub const DECAY: Duration = Duration::from_secs(10);

const DECAY_NS: f64 = DECAY.as_nanos() as f64;

/// The `ewma` value before the first sample (a NaN pattern our arithmetic never produces).
const NO_DATA: u64 = u64::MAX;

/// The load of one endpoint, owned by it and shared by every balancer that lists it.
///
/// Hot-path cost: [`start`](Self::start) is an `Arc` clone, an atomic increment and a clock
/// read; recording is a clock read, an `exp` and two atomic updates; reading the cost is
/// two loads, a clock read and an `exp`. No locks, no allocation.
#[derive(Debug)]
pub struct EndpointStats {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    in_flight: AtomicUsize,
    /// `f64` nanoseconds, or [`NO_DATA`].
    ewma: AtomicU64,
    /// Nanoseconds since `epoch` of the last sample.
    updated: AtomicU64,
    epoch: Instant,
}

impl Default for EndpointStats {
    fn default() -> Self {
        Self::new()
    }
}

impl EndpointStats {
    /// No requests in flight and no latency data.
    pub fn new() -> Self {
        Self {
            inner: Arc::new(Inner {
                in_flight: AtomicUsize::new(0),
                ewma: AtomicU64::new(NO_DATA),
                updated: AtomicU64::new(0),
                epoch: Instant::now(),
            }),
        }
    }

    /// Counts a request as in flight until the returned guard is finished or dropped.
    pub fn start(&self) -> InFlight {
        self.inner.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight {
            stats: Some(self.inner.clone()),
            started: Instant::now(),
            timed: true,
        }
    }

    /// Counts something as in flight until the returned guard is finished or dropped, and
    /// never records a latency for it: an opaque TCP connection or a `CONNECT` tunnel, whose
    /// lifetime says nothing about how fast the endpoint answers. It still weighs in the
    /// load-aware policies' in-flight counts.
    pub fn start_untimed(&self) -> InFlight {
        let mut guard = self.start();
        guard.timed = false;
        guard
    }

    /// Requests started and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.inner.in_flight.load(Ordering::Relaxed)
    }

    /// Records a latency sample taken outside a request guard (a probe, say).
    pub fn record(&self, latency: Duration) {
        self.inner.record_at(latency, Instant::now());
    }

    /// The latency estimate now; `None` before the first sample.
    pub fn latency(&self) -> Option<Duration> {
        self.inner
            .estimate_at(Instant::now())
            .map(|ns| Duration::from_nanos(ns as u64))
    }

    /// The estimate in nanoseconds at `now` (decayed since the last sample).
    pub(super) fn estimate_ns_at(&self, now: Instant) -> Option<f64> {
        self.inner.estimate_at(now)
    }

    #[cfg(test)]
    fn record_at(&self, latency: Duration, now: Instant) {
        self.inner.record_at(latency, now);
    }
}

impl Inner {
    fn nanos_at(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    fn estimate_at(&self, now: Instant) -> Option<f64> {
        let bits = self.ewma.load(Ordering::Relaxed);
        if bits == NO_DATA {
            return None;
        }
        let idle = self
            .nanos_at(now)
            .saturating_sub(self.updated.load(Ordering::Relaxed));
        Some(f64::from_bits(bits) * (-(idle as f64) / DECAY_NS).exp())
    }

    fn record_at(&self, latency: Duration, now: Instant) {
        let sample = latency.as_nanos() as f64;
        let now_ns = self.nanos_at(now);
        // Claim the interval since the previous sample; concurrent recorders claim disjoint
        // intervals, so the total weight given to new samples matches the time that passed.
        let prev = self.updated.fetch_max(now_ns, Ordering::Relaxed);
        let keep = (-(now_ns.saturating_sub(prev) as f64) / DECAY_NS).exp();
        let _ = self
            .ewma
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| {
                let current = f64::from_bits(bits) * keep;
                let next = if bits == NO_DATA || sample >= current {
                    sample
                } else {
                    current + sample * (1.0 - keep)
                };
                Some(next.to_bits())
            });
    }
}

/// A request in flight on an endpoint. [`finish`](Self::finish) records its latency;
/// dropping it unfinished (an error, a cancelled or timed-out request) records the time since
/// it started, so a request that hangs counts as slow.
#[derive(Debug)]
#[must_use = "dropping the guard ends the request at once"]
pub struct InFlight {
    stats: Option<Arc<Inner>>,
    started: Instant,
    /// Whether ending it records a latency sample ([`EndpointStats::start_untimed`]: no).
    timed: bool,
}

impl InFlight {
    /// Ends the request, recording `latency` (e.g. time to response headers).
    pub fn finish(mut self, latency: Duration) {
        self.end(latency, Instant::now());
    }

    /// When the request started.
    pub fn started(&self) -> Instant {
        self.started
    }

    fn end(&mut self, latency: Duration, now: Instant) {
        if let Some(stats) = self.stats.take() {
            stats.in_flight.fetch_sub(1, Ordering::Relaxed);
            if self.timed {
                stats.record_at(latency, now);
            }
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let now = Instant::now();
        self.end(now.saturating_duration_since(self.started), now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn ms(ns: Option<f64>) -> f64 {
        ns.expect("has data") / 1e6
    }

    #[test]
    fn guards_count_in_flight_requests() {
        let s = EndpointStats::new();
        let a = s.start();
        let b = s.start();
        assert_eq!(s.in_flight(), 2);
        a.finish(MS);
        assert_eq!(s.in_flight(), 1);
        drop(b);
        assert_eq!(s.in_flight(), 0);
        assert!(s.latency().is_some(), "a dropped guard records too");
    }

    #[test]
    fn untimed_guards_count_but_never_record() {
        let s = EndpointStats::new();
        let a = s.start_untimed();
        let b = s.start_untimed();
        assert_eq!(s.in_flight(), 2);
        a.finish(MS);
        drop(b);
        assert_eq!(s.in_flight(), 0);
        assert_eq!(s.latency(), None);
    }

    #[test]
    fn no_data_until_the_first_sample_which_is_taken_whole() {
        let s = EndpointStats::new();
        assert_eq!(s.latency(), None);
        s.record(5 * MS);
        let l = s.latency().unwrap();
        assert!(l <= 5 * MS && l > 4 * MS, "{l:?}");
    }

    #[test]
    fn a_peak_replaces_the_estimate_at_once() {
        let s = EndpointStats::new();
        let t = Instant::now();
        s.record_at(MS, t);
        s.record_at(100 * MS, t + MS);
        assert!((ms(s.estimate_ns_at(t + MS)) - 100.0).abs() < 1e-9);
    }

    #[test]
    fn smaller_samples_decay_in_with_the_time_constant() {
        let s = EndpointStats::new();
        let t = Instant::now();
        s.record_at(100 * MS, t);
        // One time constant later, a 0 ms sample leaves 1/e of the old estimate.
        s.record_at(Duration::ZERO, t + DECAY);
        let e = ms(s.estimate_ns_at(t + DECAY));
        assert!((e - 100.0 / std::f64::consts::E).abs() < 0.01, "{e}");
        // Samples in quick succession barely move it.
        s.record_at(Duration::ZERO, t + DECAY + MS);
        let e2 = ms(s.estimate_ns_at(t + DECAY + MS));
        assert!(e - e2 < 0.01, "{e} -> {e2}");
        // A steady 10 ms stream pulls it to 10 ms over a few time constants.
        for i in 1..=900 {
            s.record_at(10 * MS, t + DECAY + i * 100 * MS);
        }
        let e3 = ms(s.estimate_ns_at(t + DECAY + 900 * 100 * MS));
        assert!((e3 - 10.0).abs() < 0.1, "{e3}");
    }

    #[test]
    fn an_idle_estimate_decays_towards_zero() {
        let s = EndpointStats::new();
        let t = Instant::now();
        s.record_at(50 * MS, t);
        let later = ms(s.estimate_ns_at(t + 3 * DECAY));
        assert!((later - 50.0 * (-3f64).exp()).abs() < 0.01, "{later}");
        assert_eq!(ms(s.estimate_ns_at(t)), 50.0, "reads do not change it");
    }

    #[test]
    fn out_of_order_samples_do_not_rewind_time() {
        let s = EndpointStats::new();
        let t = Instant::now() + DECAY;
        s.record_at(10 * MS, t);
        s.record_at(MS, t - DECAY);
        let e = ms(s.estimate_ns_at(t));
        assert!(
            (e - 10.0).abs() < 1e-9,
            "a late, smaller sample gets no weight: {e}"
        );
    }
}

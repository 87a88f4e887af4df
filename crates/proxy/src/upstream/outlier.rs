//! Outlier detection: ejecting the endpoints of a cluster that keep failing (Istio's
//! DestinationRule `outlierDetection`, Envoy's consecutive-error detectors).
//!
//! Every exchange's result is reported ([`OutlierDetector::report`]): a response status, or
//! a local-origin failure (no connection could be had). An endpoint whose consecutive 5xx
//! (`consecutive5xxErrors`) or 502/503/504 (`consecutiveGatewayErrors`) reach the threshold
//! is ejected for `baseEjectionTime` times the number of times it has been ejected (capped at
//! [`MAX_EJECTION_TIME`], or the base time when that is longer). Local-origin failures count
//! as 503s, unless `splitExternalLocalOriginErrors` counts them apart
//! (`consecutiveLocalOriginFailures`). The multiplier goes down by one for every `interval`
//! the endpoint spends back in service.
//!
//! At most `maxEjectionPercent` of the endpoints are out at once (an ejection is allowed
//! while fewer than that share are out, as in Envoy, so one of two endpoints can be ejected
//! under the default 10%), and never all of them. Ejected endpoints are skipped when picking
//! ([`OutlierDetector::choose`]) until their time is up (checked lazily on pick), unless
//! fewer than `minHealthPercent` of the endpoints are in service: then every endpoint is
//! used (Envoy's panic mode).
//!
//! Opt-in, [`latency`] outliers: an endpoint whose recent p99 is several times its peers'
//! median p99 is ejected the same way (see there).

pub mod latency;

use latency::LatencyWindows;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use trellis_api::resources::traffic_policy::OutlierDetection;

/// Longest ejection (Envoy's default `max_ejection_time`).
pub const MAX_EJECTION_TIME: Duration = Duration::from_secs(300);

/// Outlier detection settings, with Istio's defaults filled in.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutlierConfig {
    /// Consecutive 5xx before ejection (0: off).
    pub consecutive_5xx: u32,
    /// Consecutive 502/503/504 before ejection (0: off).
    pub consecutive_gateway: u32,
    /// Count local-origin failures apart from responses.
    pub split_local_origin: bool,
    /// Consecutive local-origin failures before ejection, when split (0: off).
    pub consecutive_local_origin: u32,
    /// How often the ejection multiplier of an endpoint in service goes down.
    pub interval: Duration,
    /// Ejection time of a first ejection.
    pub base_ejection_time: Duration,
    /// Most endpoints out at once, in percent.
    pub max_ejection_percent: u32,
    /// Below this share of endpoints in service, ejections are ignored, in percent.
    pub min_health_percent: u32,
    /// Latency outliers: eject an endpoint whose p99 is this many hundredths of its peers'
    /// median p99 (300: three times). `None`: off (the default).
    pub latency_ratio_percent: Option<u32>,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_5xx: 5,
            consecutive_gateway: 0,
            split_local_origin: false,
            consecutive_local_origin: 5,
            interval: Duration::from_secs(10),
            base_ejection_time: Duration::from_secs(30),
            max_ejection_percent: 10,
            min_health_percent: 0,
            latency_ratio_percent: None,
        }
    }
}

impl From<&OutlierDetection> for OutlierConfig {
    fn from(od: &OutlierDetection) -> Self {
        let d = Self::default();
        let nonzero = |v: Option<trellis_api::duration::Duration>, default: Duration| {
            v.map(|v| v.0).filter(|v| !v.is_zero()).unwrap_or(default)
        };
        Self {
            consecutive_5xx: od.consecutive_5xx_errors.unwrap_or(d.consecutive_5xx),
            consecutive_gateway: od.consecutive_gateway_errors.unwrap_or(0),
            split_local_origin: od.split_external_local_origin_errors.unwrap_or(false),
            consecutive_local_origin: od
                .consecutive_local_origin_failures
                .unwrap_or(d.consecutive_local_origin),
            interval: nonzero(od.interval, d.interval),
            base_ejection_time: nonzero(od.base_ejection_time, d.base_ejection_time),
            max_ejection_percent: od
                .max_ejection_percent
                .unwrap_or(d.max_ejection_percent)
                .min(100),
            min_health_percent: od.min_health_percent.unwrap_or(0).min(100),
            latency_ratio_percent: None,
        }
    }
}

/// The result of one exchange with an endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A response head with this status.
    Status(u16),
    /// No connection: refused, unreachable, timed out, TLS handshake failed.
    LocalFailure,
    /// Nothing to hold against the endpoint (the client's request was bad).
    Ignored,
}

/// An attempt as forwarding sees it (`None`: the client's fault, not the endpoint's).
/// A reset counts as a 502 and a per-try timeout as a 504 (as Envoy counts them); a
/// refused HTTP/2 stream is the peer shedding load, not an error.
impl From<Option<crate::resilience::retry::Outcome>> for Outcome {
    fn from(o: Option<crate::resilience::retry::Outcome>) -> Self {
        use crate::resilience::retry::Outcome as Attempt;
        match o {
            None | Some(Attempt::RefusedStream) => Self::Ignored,
            Some(Attempt::ConnectFailure) => Self::LocalFailure,
            Some(Attempt::Reset) => Self::Status(502),
            Some(Attempt::PerTryTimeout) => Self::Status(504),
            Some(Attempt::Response(status, _)) => Self::Status(status.as_u16()),
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The length of an endpoint's `times`-th ejection (1-based).
pub fn ejection_time(base: Duration, times: u32) -> Duration {
    base.saturating_mul(times.max(1))
        .min(MAX_EJECTION_TIME.max(base))
}

/// Whether one more of `n` endpoints may be ejected while `ejected` are out.
pub fn may_eject(ejected: usize, n: usize, max_percent: u32) -> bool {
    ejected + 1 < n && ejected * 100 < n * max_percent as usize
}

#[derive(Default)]
struct Health {
    consecutive_5xx: AtomicU32,
    consecutive_gateway: AtomicU32,
    consecutive_local: AtomicU32,
    /// Milliseconds since the detector's epoch until which it is out (0: never ejected).
    ejected_until: AtomicU64,
    /// The current ejection multiplier.
    ejections: AtomicU32,
}

/// The outlier state of one cluster's endpoints (by index in the cluster).
pub struct OutlierDetector {
    cfg: OutlierConfig,
    epoch: Instant,
    health: Box<[Health]>,
    /// Serializes ejection decisions (rare), so the ejected share is counted exactly.
    ejecting: Mutex<()>,
    /// Recent latencies, when latency outliers are on.
    latency: Option<LatencyWindows>,
}

impl OutlierDetector {
    /// A detector for `n` endpoints.
    pub fn new(cfg: OutlierConfig, n: usize) -> Self {
        let latency = cfg
            .latency_ratio_percent
            .map(|_| LatencyWindows::new(n, millis(cfg.interval)));
        Self {
            cfg,
            epoch: Instant::now(),
            health: (0..n).map(|_| Health::default()).collect(),
            ejecting: Mutex::new(()),
            latency,
        }
    }

    /// Records how long endpoint `i` took to answer (latency outliers only); returns the
    /// endpoints this got ejected, when the periodic comparison ran.
    pub fn record_latency(&self, i: usize, latency: Duration) -> Vec<usize> {
        let (Some(windows), Some(ratio)) = (&self.latency, self.cfg.latency_ratio_percent) else {
            return Vec::new();
        };
        let now = self.now_ms();
        windows.record(i, now, latency);
        let interval = millis(self.cfg.interval);
        if !windows.due(now, interval) {
            return Vec::new();
        }
        let since = now.saturating_sub(interval);
        let ratio = f64::from(ratio) / 100.0;
        windows
            .outliers(since, ratio, |j| self.ejected_at(j, now))
            .into_iter()
            .filter(|&j| {
                let ejected = self.eject(j);
                if ejected {
                    windows.clear(j);
                }
                ejected
            })
            .collect()
    }

    /// The settings.
    pub fn config(&self) -> &OutlierConfig {
        &self.cfg
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn ejected_at(&self, i: usize, now: u64) -> bool {
        self.health
            .get(i)
            .is_some_and(|h| h.ejected_until.load(Ordering::Acquire) > now)
    }

    /// Whether endpoint `i` is ejected now.
    pub fn is_ejected(&self, i: usize) -> bool {
        self.ejected_at(i, self.now_ms())
    }

    /// Endpoints ejected now.
    pub fn ejected(&self) -> usize {
        let now = self.now_ms();
        (0..self.health.len())
            .filter(|&i| self.ejected_at(i, now))
            .count()
    }

    /// Records an exchange with endpoint `i`; `true` when it got the endpoint ejected.
    pub fn report(&self, i: usize, outcome: Outcome) -> bool {
        let Some(h) = self.health.get(i) else {
            return false;
        };
        let bump = |c: &AtomicU32| c.fetch_add(1, Ordering::AcqRel).saturating_add(1);
        let reached = |n: u32, limit: u32| limit > 0 && n >= limit;
        let trip = match outcome {
            Outcome::Ignored => false,
            Outcome::Status(s) if s < 500 => {
                h.consecutive_5xx.store(0, Ordering::Release);
                h.consecutive_gateway.store(0, Ordering::Release);
                h.consecutive_local.store(0, Ordering::Release);
                false
            }
            Outcome::LocalFailure if self.cfg.split_local_origin => reached(
                bump(&h.consecutive_local),
                self.cfg.consecutive_local_origin,
            ),
            Outcome::Status(_) | Outcome::LocalFailure => {
                let status = match outcome {
                    Outcome::Status(s) => s,
                    _ => 503,
                };
                if outcome != Outcome::LocalFailure {
                    h.consecutive_local.store(0, Ordering::Release);
                }
                let n5xx = bump(&h.consecutive_5xx);
                let ngw = if matches!(status, 502..=504) {
                    bump(&h.consecutive_gateway)
                } else {
                    h.consecutive_gateway.store(0, Ordering::Release);
                    0
                };
                reached(n5xx, self.cfg.consecutive_5xx)
                    || reached(ngw, self.cfg.consecutive_gateway)
            }
        };
        trip && self.eject(i)
    }

    fn eject(&self, i: usize) -> bool {
        let _one = self.ejecting.lock().unwrap_or_else(|e| e.into_inner());
        let now = self.now_ms();
        let h = &self.health[i];
        for c in [
            &h.consecutive_5xx,
            &h.consecutive_gateway,
            &h.consecutive_local,
        ] {
            c.store(0, Ordering::Release);
        }
        let until = h.ejected_until.load(Ordering::Acquire);
        if until > now {
            return false; // already out (reports of requests sent before the ejection)
        }
        let ejected = (0..self.health.len())
            .filter(|&j| self.ejected_at(j, now))
            .count();
        if !may_eject(ejected, self.health.len(), self.cfg.max_ejection_percent) {
            return false;
        }
        // The multiplier went down by one for every interval back in service.
        let interval = millis(self.cfg.interval).max(1);
        let served = now.saturating_sub(until) / interval;
        let before = h.ejections.load(Ordering::Acquire);
        let times = before
            .saturating_sub(u32::try_from(served).unwrap_or(u32::MAX))
            .saturating_add(1);
        h.ejections.store(times, Ordering::Release);
        let out = ejection_time(self.cfg.base_ejection_time, times);
        let out = u64::try_from(out.as_millis()).unwrap_or(u64::MAX);
        h.ejected_until
            .store(now.saturating_add(out).max(1), Ordering::Release);
        true
    }

    /// The endpoint to use instead of `first` (the balancer's pick) when it is ejected:
    /// another pick of the balancer (`repick`, tried twice), else the next endpoint in
    /// service after it. `first` itself when none is in service or the cluster is below
    /// `minHealthPercent` in service.
    pub fn choose(&self, first: usize, mut repick: impl FnMut() -> Option<usize>) -> usize {
        let now = self.now_ms();
        if !self.ejected_at(first, now) {
            return first;
        }
        let n = self.health.len();
        if self.cfg.min_health_percent > 0 {
            let in_service = (0..n).filter(|&j| !self.ejected_at(j, now)).count();
            if in_service * 100 < n * self.cfg.min_health_percent as usize {
                return first;
            }
        }
        for _ in 0..2 {
            match repick() {
                Some(j) if !self.ejected_at(j, now) => return j,
                _ => {}
            }
        }
        (1..n)
            .map(|k| (first + k) % n)
            .find(|&j| !self.ejected_at(j, now))
            .unwrap_or(first)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(yaml: &str) -> OutlierConfig {
        let od: OutlierDetection = serde_yaml_ng::from_str(yaml).unwrap();
        OutlierConfig::from(&od)
    }

    #[test]
    fn istio_defaults_fill_in() {
        let c = cfg("{}");
        assert_eq!(c, OutlierConfig::default());
        assert_eq!(c.consecutive_5xx, 5);
        assert_eq!(c.max_ejection_percent, 10);
        let c = cfg("{ consecutive5xxErrors: 3, baseEjectionTime: 2s, maxEjectionPercent: 50, interval: 1s }");
        assert_eq!(c.consecutive_5xx, 3);
        assert_eq!(c.base_ejection_time, Duration::from_secs(2));
        assert_eq!(c.interval, Duration::from_secs(1));
        assert_eq!(c.max_ejection_percent, 50);
    }

    #[test]
    fn ejection_time_grows_with_ejections_and_is_capped() {
        let base = Duration::from_secs(30);
        assert_eq!(ejection_time(base, 0), base);
        assert_eq!(ejection_time(base, 1), base);
        assert_eq!(ejection_time(base, 3), Duration::from_secs(90));
        assert_eq!(ejection_time(base, 100), MAX_EJECTION_TIME);
        let long = Duration::from_secs(600);
        assert_eq!(ejection_time(long, 2), long, "a base over the cap is kept");
    }

    #[test]
    fn the_ejected_share_is_bounded_and_never_everything() {
        assert!(may_eject(0, 2, 10), "one of two under 10%, as in Envoy");
        assert!(!may_eject(1, 2, 100), "never the last endpoint");
        assert!(!may_eject(0, 1, 100), "never a lone endpoint");
        assert!(may_eject(1, 4, 50));
        assert!(!may_eject(2, 4, 50));
        assert!(may_eject(0, 10, 10));
        assert!(!may_eject(1, 10, 10));
        assert!(!may_eject(0, 10, 0), "0% ejects nothing");
    }

    fn detector(n: usize, yaml: &str) -> OutlierDetector {
        OutlierDetector::new(cfg(yaml), n)
    }

    #[test]
    fn consecutive_5xx_eject_and_a_success_resets_the_count() {
        let d = detector(3, "{ consecutive5xxErrors: 3, maxEjectionPercent: 50 }");
        assert!(!d.report(0, Outcome::Status(500)));
        assert!(!d.report(0, Outcome::Status(503)));
        assert!(!d.report(0, Outcome::Status(200)), "reset");
        assert!(!d.report(0, Outcome::Status(500)));
        assert!(
            !d.report(0, Outcome::Ignored),
            "ignored: no reset, no count"
        );
        assert!(!d.report(0, Outcome::LocalFailure));
        assert!(d.report(0, Outcome::Status(500)), "third in a row");
        assert!(d.is_ejected(0));
        assert_eq!(d.ejected(), 1);
        // 1 of 3 is 33% out: under 50%, a second may go; then 66%: no third.
        for _ in 0..3 {
            d.report(1, Outcome::Status(502));
        }
        assert!(d.is_ejected(1));
        for _ in 0..3 {
            assert!(!d.report(2, Outcome::Status(502)));
        }
        assert!(!d.is_ejected(2), "never all endpoints");
    }

    #[test]
    fn gateway_errors_count_only_502_to_504() {
        let d = detector(
            2,
            "{ consecutive5xxErrors: 0, consecutiveGatewayErrors: 2, maxEjectionPercent: 50 }",
        );
        assert!(!d.report(0, Outcome::Status(502)));
        assert!(
            !d.report(0, Outcome::Status(500)),
            "500 resets the gateway count"
        );
        assert!(!d.report(0, Outcome::Status(504)));
        assert!(
            d.report(0, Outcome::LocalFailure),
            "a connect failure is a 503"
        );
    }

    #[test]
    fn split_local_origin_failures_count_apart() {
        let d = detector(
            2,
            "{ consecutive5xxErrors: 2, splitExternalLocalOriginErrors: true, consecutiveLocalOriginFailures: 3, maxEjectionPercent: 50 }",
        );
        assert!(!d.report(0, Outcome::LocalFailure));
        assert!(!d.report(0, Outcome::LocalFailure));
        assert!(
            !d.report(0, Outcome::Status(500)),
            "5xx counted apart; the connection worked: local count reset"
        );
        assert!(!d.report(0, Outcome::LocalFailure));
        assert!(!d.report(0, Outcome::LocalFailure));
        assert!(d.report(0, Outcome::LocalFailure));
    }

    #[test]
    fn ejected_endpoints_are_skipped_and_come_back_with_a_longer_ejection() {
        let d = detector(
            2,
            "{ consecutive5xxErrors: 1, baseEjectionTime: 0.1s, interval: 10s, maxEjectionPercent: 50 }",
        );
        assert_eq!(d.choose(0, || Some(0)), 0);
        assert!(d.report(0, Outcome::Status(500)));
        assert_eq!(d.choose(0, || Some(0)), 1, "the next one in service");
        assert_eq!(d.choose(1, || Some(0)), 1);
        std::thread::sleep(Duration::from_millis(120));
        assert!(!d.is_ejected(0), "back after the base ejection time");
        assert_eq!(d.choose(0, || None), 0);
        assert!(d.report(0, Outcome::Status(500)));
        std::thread::sleep(Duration::from_millis(120));
        assert!(d.is_ejected(0), "second ejection: twice as long");
        std::thread::sleep(Duration::from_millis(100));
        assert!(!d.is_ejected(0));
    }

    #[test]
    fn below_min_health_ejections_are_ignored() {
        let d = detector(
            2,
            "{ consecutive5xxErrors: 1, maxEjectionPercent: 50, minHealthPercent: 60 }",
        );
        assert!(d.report(0, Outcome::Status(500)));
        assert_eq!(
            d.choose(0, || Some(0)),
            0,
            "50% in service < 60%: panic mode"
        );
    }
}

#[cfg(test)]
mod latency_tests {
    use super::*;

    #[test]
    fn a_latency_outlier_is_ejected_through_the_detector() {
        let cfg = OutlierConfig {
            interval: Duration::from_millis(50),
            max_ejection_percent: 50,
            latency_ratio_percent: Some(300),
            ..OutlierConfig::default()
        };
        let d = OutlierDetector::new(cfg, 3);
        let mut ejected = Vec::new();
        let start = Instant::now();
        while ejected.is_empty() && start.elapsed() < Duration::from_secs(2) {
            for i in 0..3 {
                let ms = if i == 2 { 60 } else { 2 };
                ejected.extend(d.record_latency(i, Duration::from_millis(ms)));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(ejected, [2]);
        assert!(d.is_ejected(2));
        assert!(!d.is_ejected(0));
        assert_eq!(d.choose(2, || Some(2)), 0);
    }
}

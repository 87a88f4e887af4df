//! Power of two choices: sample two distinct endpoints at random and keep the cheaper.
//!
//! Sampling two avoids both herding (every proxy sending to the one best endpoint) and the
//! cost of scanning all n; it needs no shared state beyond each endpoint's own counters.
//! Callers guarantee at least two endpoints.

use super::Endpoint;
use std::sync::Arc;
use std::time::Instant;

/// Added to every latency estimate (in ns) so that requests in flight still weigh when an
/// estimate has decayed to about zero (an endpoint whose requests hang sends no samples).
const LATENCY_FLOOR_NS: f64 = 100_000.0;

/// Peak-EWMA P2C: cost is `(latency + 100 µs) * (in_flight + 1)`; ties go either way. An
/// endpoint with no latency data yet is given its rival's estimate (both none: equal), so
/// it competes on requests in flight alone and new endpoints are tried at once.
pub(super) fn peak_ewma<E: Endpoint>(endpoints: &[Arc<E>]) -> usize {
    let (a, b) = two_distinct(endpoints.len());
    let (sa, sb) = (endpoints[a].stats(), endpoints[b].stats());
    let now = Instant::now();
    let (la, lb) = match (sa.estimate_ns_at(now), sb.estimate_ns_at(now)) {
        (Some(x), Some(y)) => (x, y),
        (Some(x), None) => (x, x),
        (None, Some(y)) => (y, y),
        (None, None) => (0.0, 0.0),
    };
    let cost =
        |latency: f64, in_flight: usize| (latency + LATENCY_FLOOR_NS) * (in_flight as f64 + 1.0);
    cheaper(a, cost(la, sa.in_flight()), b, cost(lb, sb.in_flight()))
}

/// Envoy-style least request with a choice count of 2: fewer requests in flight wins.
pub(super) fn least_request<E: Endpoint>(endpoints: &[Arc<E>]) -> usize {
    let (a, b) = two_distinct(endpoints.len());
    let (ca, cb) = (
        endpoints[a].stats().in_flight(),
        endpoints[b].stats().in_flight(),
    );
    cheaper(a, ca, b, cb)
}

/// Two different indices below `n` (n >= 2), uniformly.
fn two_distinct(n: usize) -> (usize, usize) {
    let a = fastrand::usize(..n);
    let b = fastrand::usize(..n - 1);
    (a, if b >= a { b + 1 } else { b })
}

fn cheaper<C: PartialOrd>(a: usize, ca: C, b: usize, cb: C) -> usize {
    if ca < cb {
        a
    } else if cb < ca || fastrand::bool() {
        b
    } else {
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn two_distinct_covers_every_ordered_pair() {
        let mut seen = [[0u32; 4]; 4];
        for _ in 0..20_000 {
            let (a, b) = two_distinct(4);
            assert_ne!(a, b);
            seen[a][b] += 1;
        }
        for (a, row) in seen.iter().enumerate() {
            for (b, &count) in row.iter().enumerate() {
                assert!(
                    a == b || count > 1_200,
                    "pair ({a}, {b}) seen {count} times"
                );
            }
        }
    }

    #[test]
    fn ties_go_either_way() {
        let firsts = (0..1_000).filter(|_| cheaper(0, 1, 1, 1) == 0).count();
        assert!((350..650).contains(&firsts), "{firsts}");
        assert_eq!(cheaper(0, 1, 1, 2), 0);
        assert_eq!(cheaper(0, 2, 1, 1), 1);
    }
}

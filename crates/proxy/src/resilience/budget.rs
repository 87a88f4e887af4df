//! The retry budget of a destination cluster (Linkerd/Finagle style).
//!
//! Retries may add at most [`RATIO`] (20%) of the requests to the cluster plus
//! [`MIN_PER_SECOND`] (10) per second, both over a sliding window of [`WINDOW_SECS`] (10 s):
//! every request that may be retried deposits, every retry withdraws, and a retry is allowed
//! while `retries < RATIO * requests + MIN_PER_SECOND * seconds` over the window, where
//! `seconds` is the window's length (shorter while the budget is younger than a window, so
//! that a fresh budget does not allow a burst of 100 retries at once). An exhausted budget
//! stops retries, never first attempts: a failing cluster sees at most ~1.2x its load.
//!
//! The window is ten one-second buckets behind a small mutex: an uncontended lock per
//! request, no allocation.

use std::sync::Mutex;
use std::time::Instant;

/// Share of the requests in the window that may be retried.
pub const RATIO: f64 = 0.2;
/// Retries per second allowed whatever the request rate (low-traffic clusters).
pub const MIN_PER_SECOND: u32 = 10;
/// Length of the sliding window, in seconds (one bucket per second).
pub const WINDOW_SECS: u64 = 10;

#[derive(Clone, Copy, Default)]
struct Bucket {
    /// The second (since the budget's creation) this bucket counts.
    second: u64,
    requests: u32,
    retries: u32,
}

/// Retries allowed to one cluster; see the module docs.
pub struct RetryBudget {
    created: Instant,
    buckets: Mutex<[Bucket; WINDOW_SECS as usize]>,
}

impl Default for RetryBudget {
    fn default() -> Self {
        Self::new()
    }
}

impl RetryBudget {
    /// A full-window budget with no requests yet.
    pub fn new() -> Self {
        Self {
            created: Instant::now(),
            buckets: Mutex::new([Bucket::default(); WINDOW_SECS as usize]),
        }
    }

    fn second(&self) -> u64 {
        self.created.elapsed().as_secs()
    }

    /// Counts a request that may be retried.
    pub fn deposit(&self) {
        self.deposit_at(self.second());
    }

    /// Takes one retry from the budget; `false` (nothing taken) when it is exhausted.
    pub fn try_withdraw(&self) -> bool {
        self.try_withdraw_at(self.second())
    }

    fn deposit_at(&self, second: u64) {
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let bucket = current(&mut b, second);
        bucket.requests = bucket.requests.saturating_add(1);
    }

    fn try_withdraw_at(&self, second: u64) -> bool {
        let mut b = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
        let (mut requests, mut retries) = (0u64, 0u64);
        for bucket in b.iter() {
            if bucket.second + WINDOW_SECS > second && bucket.second <= second {
                requests += u64::from(bucket.requests);
                retries += u64::from(bucket.retries);
            }
        }
        let seconds = (second + 1).min(WINDOW_SECS);
        let allowed = RATIO * requests as f64 + f64::from(MIN_PER_SECOND) * seconds as f64;
        if (retries as f64) + 1.0 > allowed {
            return false;
        }
        let bucket = current(&mut b, second);
        bucket.retries = bucket.retries.saturating_add(1);
        true
    }
}

/// The bucket of `second`, emptied if it last counted an older second.
fn current(buckets: &mut [Bucket; WINDOW_SECS as usize], second: u64) -> &mut Bucket {
    let bucket = &mut buckets[(second % WINDOW_SECS) as usize];
    if bucket.second != second {
        *bucket = Bucket {
            second,
            ..Bucket::default()
        };
    }
    bucket
}

#[cfg(test)]
mod tests {
    use super::*;

    fn withdrawals(b: &RetryBudget, second: u64, tries: u32) -> u32 {
        (0..tries).filter(|_| b.try_withdraw_at(second)).count() as u32
    }

    #[test]
    fn allows_the_minimum_per_second_without_traffic() {
        let b = RetryBudget::new();
        assert_eq!(withdrawals(&b, 0, 100), MIN_PER_SECOND);
        // One second later the window holds two seconds' worth.
        assert_eq!(withdrawals(&b, 1, 100), MIN_PER_SECOND);
    }

    #[test]
    fn allows_a_fifth_of_the_requests_plus_the_minimum() {
        let b = RetryBudget::new();
        for _ in 0..500 {
            b.deposit_at(0);
        }
        assert_eq!(withdrawals(&b, 0, 1000), 100 + MIN_PER_SECOND);
    }

    #[test]
    fn the_window_slides() {
        let b = RetryBudget::new();
        for s in 0..WINDOW_SECS {
            for _ in 0..100 {
                b.deposit_at(s);
            }
        }
        // 1000 requests in the window: 200 + 10/s * 10 s.
        assert_eq!(withdrawals(&b, 9, 1000), 300);
        // After the window has passed with no traffic, only the minimum remains, and the
        // retries taken earlier have slid out with it.
        assert_eq!(withdrawals(&b, 9 + WINDOW_SECS, 1000), 100);
        // Half a window later: the 100 retries of second 19 still count.
        assert_eq!(withdrawals(&b, 24, 1000), 0);
        assert_eq!(withdrawals(&b, 30, 1000), 100);
    }
}

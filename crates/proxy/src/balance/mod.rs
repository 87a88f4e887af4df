//! Load balancing: which endpoint of a service gets the next request.
//!
//! A [`Balancer`] is built from a [`Policy`] and a service's endpoints whenever its config
//! changes, and picked from on every request. It is generic over the endpoint type (anything
//! that is an [`Endpoint`]: has [`EndpointStats`] and a stable key), so it is tested without
//! sockets. Endpoints own their [`EndpointStats`]; a request holds an [`InFlight`] guard from
//! [`EndpointStats::start`] until it ends, which feeds the load-aware policies.
//!
//! Pick costs (n endpoints): [`Policy::P2cPeakEwma`] two random numbers, one clock read,
//! two `exp`s and a few atomic loads; [`Policy::LeastRequest`] two random numbers and two
//! atomic loads; [`Policy::RoundRobin`] one atomic add; [`Policy::Random`] one random number;
//! [`Policy::RingHash`] a binary search over the ring, O(log n); [`Policy::Maglev`] one table
//! load, O(1). None of them locks or allocates. See docs/load-balancing.md for why the default
//! is what it is and how Istio's `loadBalancer` settings map here ([`policy_from`]).

mod hash;
mod maglev;
mod p2c;
mod ring;
mod settings;
mod stats;

pub use hash::{hash_ip, hash_key};
pub use maglev::{DEFAULT_TABLE_SIZE as DEFAULT_MAGLEV_TABLE_SIZE, MAX_TABLE_SIZE};
pub use ring::{DEFAULT_MIN_RING_SIZE, MAX_RING_SIZE};
pub use settings::{policy_from, HashOn, LbConfigError};
pub use stats::{EndpointStats, InFlight, DECAY};

use maglev::Maglev;
use ring::Ring;
use std::borrow::Cow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// What a balancer needs of an endpoint.
pub trait Endpoint {
    /// The endpoint's load, read by the load-aware policies.
    fn stats(&self) -> &EndpointStats;

    /// A stable identity for consistent hashing, e.g. `"10.0.0.7:8080"`: the same endpoint
    /// must have the same key in every proxy and across restarts. Read only when a balancer
    /// is built.
    fn key(&self) -> Cow<'_, str>;
}

/// A load-balancing algorithm.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Policy {
    /// Power of two choices over peak-EWMA latency times requests in flight (the default):
    /// prefers fast and unloaded endpoints with no shared state.
    #[default]
    P2cPeakEwma,
    /// Each endpoint in turn.
    RoundRobin,
    /// Power of two choices over requests in flight (Envoy's least request, choice count 2).
    LeastRequest,
    /// A uniformly random endpoint.
    Random,
    /// Consistent hashing on a ring with at least this many points (clamped to
    /// 1..=[`MAX_RING_SIZE`]).
    RingHash {
        /// Minimum number of points on the ring; [`DEFAULT_MIN_RING_SIZE`] is usual.
        min_ring_size: usize,
    },
    /// Maglev consistent hashing with a lookup table of this many slots (rounded up to a
    /// prime, at most [`MAX_TABLE_SIZE`]).
    Maglev {
        /// Table size; [`DEFAULT_MAGLEV_TABLE_SIZE`] is usual.
        table_size: usize,
    },
}

impl Policy {
    /// Ring hash with the default ring size.
    pub const RING_HASH: Self = Self::RingHash {
        min_ring_size: DEFAULT_MIN_RING_SIZE,
    };

    /// Maglev with the default table size.
    pub const MAGLEV: Self = Self::Maglev {
        table_size: DEFAULT_MAGLEV_TABLE_SIZE,
    };

    /// Whether the policy uses the request's hash key.
    pub fn is_consistent_hash(&self) -> bool {
        matches!(self, Self::RingHash { .. } | Self::Maglev { .. })
    }
}

enum Algorithm {
    P2cPeakEwma,
    RoundRobin(AtomicUsize),
    LeastRequest,
    Random,
    Ring(Ring),
    Maglev(Maglev),
}

/// A policy over a fixed list of endpoints. Rebuild it when the endpoints or the policy
/// change (hash tables are built here, once); share it behind an `Arc` between requests.
pub struct Balancer<E> {
    endpoints: Arc<[Arc<E>]>,
    policy: Policy,
    algorithm: Algorithm,
}

impl<E: Endpoint> Balancer<E> {
    /// A balancer over `endpoints` (a `Vec<Arc<E>>` or an `Arc<[Arc<E>]>`). Building a ring
    /// costs O(R log R) for R points, a Maglev table O(M log M) for M slots; the others are
    /// free.
    pub fn new(policy: Policy, endpoints: impl Into<Arc<[Arc<E>]>>) -> Self {
        let endpoints = endpoints.into();
        let keys = || endpoints.iter().map(|e| e.key()).collect::<Vec<_>>();
        let algorithm = match policy {
            Policy::P2cPeakEwma => Algorithm::P2cPeakEwma,
            // Start at a random place so proxies restarted together do not move in lockstep.
            Policy::RoundRobin => {
                Algorithm::RoundRobin(AtomicUsize::new(fastrand::usize(..=endpoints.len())))
            }
            Policy::LeastRequest => Algorithm::LeastRequest,
            Policy::Random => Algorithm::Random,
            Policy::RingHash { min_ring_size } => {
                Algorithm::Ring(Ring::build(&keys(), min_ring_size))
            }
            Policy::Maglev { table_size } => Algorithm::Maglev(Maglev::build(&keys(), table_size)),
        };
        Self {
            endpoints,
            policy,
            algorithm,
        }
    }

    /// The index into [`endpoints`](Self::endpoints) of the endpoint for the next request;
    /// `None` when there are no endpoints. `hash_key` (from [`hash_key`] or [`hash_ip`]) is
    /// used by the consistent-hash policies, which pick at random without one; the others
    /// ignore it.
    pub fn pick(&self, hash_key: Option<u64>) -> Option<usize> {
        let n = self.endpoints.len();
        if n <= 1 {
            return (n == 1).then_some(0);
        }
        let i = match &self.algorithm {
            Algorithm::P2cPeakEwma => p2c::peak_ewma(&self.endpoints),
            Algorithm::LeastRequest => p2c::least_request(&self.endpoints),
            Algorithm::RoundRobin(next) => next.fetch_add(1, Ordering::Relaxed) % n,
            Algorithm::Random => fastrand::usize(..n),
            // Mixed again so that keys that are not well-distributed hashes spread evenly too.
            Algorithm::Ring(ring) => match hash_key {
                Some(h) => ring.pick(hash::fmix64(h))?,
                None => fastrand::usize(..n),
            },
            Algorithm::Maglev(table) => match hash_key {
                Some(h) => table.pick(hash::fmix64(h))?,
                None => fastrand::usize(..n),
            },
        };
        Some(i)
    }

    /// The endpoint [`pick`](Self::pick) chooses.
    pub fn pick_endpoint(&self, hash_key: Option<u64>) -> Option<&Arc<E>> {
        self.pick(hash_key).and_then(|i| self.endpoints.get(i))
    }

    /// The endpoints, in the order given.
    pub fn endpoints(&self) -> &Arc<[Arc<E>]> {
        &self.endpoints
    }

    /// The policy it was built with.
    pub fn policy(&self) -> Policy {
        self.policy
    }
}

#[cfg(test)]
mod tests;

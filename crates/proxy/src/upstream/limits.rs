//! Circuit breaking: the `connectionPool` limits of a cluster (Istio's DestinationRule).
//!
//! A [`Limiter`] lives on each cluster ([`super::Service`]). Every request asks it for a
//! [`Permit`] before an endpoint is picked ([`Limiter::admit`]) and holds it until its
//! response ends (the permit rides in the exchange's telemetry record). Over a limit the request is answered 503 at once
//! with `x-trellis-error: overflow-<kind>`:
//!
//! - `requests`: `http.http2MaxRequests` requests are already active in the cluster;
//! - `pending`: all `tcp.maxConnections` connections are in use and
//!   `http.http1MaxPendingRequests` requests already wait for one;
//! - `connections`: a request waited for a free connection longer than the connect timeout
//!   (`tcp.connectTimeout`, default 10s).
//!
//! A request in flight holds one connection of the cluster (exactly so on HTTP/1; on an
//! HTTP/2 hop, where requests share a connection, each request still counts as one, which
//! makes `maxConnections` a concurrency bound there too). A limit of 0 means no limit, as in
//! Istio. Without limits, admission costs nothing (no atomics). A TCP connection or
//! `CONNECT` tunnel holds a connection for its lifetime ([`Limiter::admit_connection`]):
//! over `tcp.maxConnections` it is closed (a tunnel answered 503) at once.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// How long a request waits for a connection without a `tcp.connectTimeout`.
pub const DEFAULT_PENDING_WAIT: Duration = Duration::from_secs(10);

/// A cluster's `connectionPool` settings, as enforced (`None`: no limit / the default).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ClusterLimits {
    /// `tcp.maxConnections`: connections in use by the cluster, across its endpoints.
    pub max_connections: Option<u32>,
    /// `http.http1MaxPendingRequests`: requests waiting for a connection.
    pub max_pending: Option<u32>,
    /// `http.http2MaxRequests`: requests active in the cluster.
    pub max_requests: Option<u32>,
    /// `http.maxRequestsPerConnection`: a connection is closed after this many requests.
    pub max_requests_per_connection: Option<u32>,
    /// `tcp.connectTimeout`.
    pub connect_timeout: Option<Duration>,
    /// `http.idleTimeout` (else `tcp.idleTimeout`): pooled connections idle longer close.
    pub idle_timeout: Option<Duration>,
}

impl ClusterLimits {
    /// Whether any admission limit is set.
    fn limits_admission(&self) -> bool {
        self.max_connections.is_some() || self.max_requests.is_some()
    }
}

/// Which limit turned a request away.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Overflow {
    /// No connection freed up within the connect timeout.
    #[error("no connection of the cluster became free in time (tcp.maxConnections)")]
    Connections,
    /// The queue of requests waiting for a connection is full.
    #[error("too many requests wait for a connection (http.http1MaxPendingRequests)")]
    Pending,
    /// Too many requests are active.
    #[error("too many requests are active (http.http2MaxRequests)")]
    Requests,
}

impl Overflow {
    /// The `kind` label of `trellis_overflow_total`.
    pub fn kind(self) -> &'static str {
        match self {
            Self::Connections => "connections",
            Self::Pending => "pending",
            Self::Requests => "requests",
        }
    }

    /// The `x-trellis-error` value of the 503.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Connections => "overflow-connections",
            Self::Pending => "overflow-pending",
            Self::Requests => "overflow-requests",
        }
    }
}

#[derive(Default)]
struct Counters {
    requests: AtomicU32,
    pending: AtomicU32,
}

/// The admission state of one cluster.
#[derive(Default)]
pub struct Limiter {
    limits: ClusterLimits,
    counters: Arc<Counters>,
    connections: Option<Arc<Semaphore>>,
}

/// A request's admission: frees its request slot and connection when dropped.
#[derive(Default)]
pub struct Permit {
    request: Option<Arc<Counters>>,
    _connection: Option<OwnedSemaphorePermit>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(c) = &self.request {
            c.requests.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

/// Decrements the pending count when a waiting request stops waiting.
struct Waiting<'a>(&'a AtomicU32);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Adds one to `n` unless that passes `max`.
fn take(n: &AtomicU32, max: u32) -> bool {
    n.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| {
        (v < max).then_some(v + 1)
    })
    .is_ok()
}

impl Limiter {
    /// A limiter enforcing `limits`.
    pub fn new(limits: ClusterLimits) -> Self {
        let connections = limits
            .max_connections
            .map(|n| Arc::new(Semaphore::new(n as usize)));
        Self {
            limits,
            counters: Arc::default(),
            connections,
        }
    }

    /// The settings enforced.
    pub fn limits(&self) -> &ClusterLimits {
        &self.limits
    }

    /// Admits a request, or says which limit it overflows. Waits only for a connection
    /// (at most the connect timeout), and only when the pending queue has room.
    pub async fn admit(&self) -> Result<Permit, Overflow> {
        let mut permit = Permit::default();
        if !self.limits.limits_admission() {
            return Ok(permit);
        }
        if let Some(max) = self.limits.max_requests {
            if !take(&self.counters.requests, max) {
                return Err(Overflow::Requests);
            }
            permit.request = Some(self.counters.clone());
        }
        let Some(conns) = &self.connections else {
            return Ok(permit);
        };
        if let Ok(c) = conns.clone().try_acquire_owned() {
            permit._connection = Some(c);
            return Ok(permit);
        }
        let max_pending = self.limits.max_pending.unwrap_or(u32::MAX);
        if !take(&self.counters.pending, max_pending) {
            return Err(Overflow::Pending);
        }
        let _waiting = Waiting(&self.counters.pending);
        let wait = self.limits.connect_timeout.unwrap_or(DEFAULT_PENDING_WAIT);
        match tokio::time::timeout(wait, conns.clone().acquire_owned()).await {
            Ok(Ok(c)) => {
                permit._connection = Some(c);
                Ok(permit)
            }
            _ => Err(Overflow::Connections),
        }
    }

    /// Admits a TCP connection (or `CONNECT` tunnel): it holds one of `tcp.maxConnections`
    /// while it lasts. Never waits: over the limit the connection is turned away at once, as
    /// Envoy's TCP proxy does (the HTTP limits do not apply to opaque bytes).
    pub fn admit_connection(&self) -> Result<Permit, Overflow> {
        let mut permit = Permit::default();
        if let Some(conns) = &self.connections {
            permit._connection = Some(
                conns
                    .clone()
                    .try_acquire_owned()
                    .map_err(|_| Overflow::Connections)?,
            );
        }
        Ok(permit)
    }

    /// Requests active now (admitted under `http2MaxRequests`), for tests.
    pub fn active(&self) -> u32 {
        self.counters.requests.load(Ordering::Acquire)
    }

    /// Requests waiting for a connection now, for tests.
    pub fn pending(&self) -> u32 {
        self.counters.pending.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn without_limits_everything_is_admitted() {
        let l = Limiter::new(ClusterLimits::default());
        let permits: Vec<_> = futures_admit(&l, 100).await;
        assert!(permits.iter().all(Result::is_ok));
        assert_eq!(l.active(), 0, "nothing is counted without limits");
    }

    async fn futures_admit(l: &Limiter, n: usize) -> Vec<Result<Permit, Overflow>> {
        let mut out = Vec::new();
        for _ in 0..n {
            out.push(l.admit().await);
        }
        out
    }

    #[tokio::test]
    async fn tcp_connections_share_max_connections_and_never_wait() {
        let l = Limiter::new(ClusterLimits {
            max_connections: Some(1),
            max_pending: Some(10),
            max_requests: Some(1),
            ..Default::default()
        });
        let tunnel = l.admit_connection().unwrap();
        // Another connection is turned away at once, and an HTTP request cannot have one
        // within the (short) wait either.
        assert_eq!(l.admit_connection().err(), Some(Overflow::Connections));
        drop(tunnel);
        let again = l.admit_connection().unwrap();
        // http2MaxRequests does not count TCP connections.
        assert_eq!(l.active(), 0);
        drop(again);
        assert!(Limiter::new(ClusterLimits::default())
            .admit_connection()
            .is_ok());
    }

    #[tokio::test]
    async fn max_requests_overflows_and_frees_on_drop() {
        let l = Limiter::new(ClusterLimits {
            max_requests: Some(2),
            ..Default::default()
        });
        let a = l.admit().await.unwrap();
        let _b = l.admit().await.unwrap();
        assert_eq!(l.admit().await.err(), Some(Overflow::Requests));
        assert_eq!(l.active(), 2);
        drop(a);
        assert_eq!(l.active(), 1);
        assert!(l.admit().await.is_ok());
    }

    #[tokio::test]
    async fn full_connections_queue_then_overflow_pending() {
        let l = Arc::new(Limiter::new(ClusterLimits {
            max_connections: Some(1),
            max_pending: Some(1),
            connect_timeout: Some(Duration::from_secs(5)),
            ..Default::default()
        }));
        let first = l.admit().await.unwrap();
        let waiter = {
            let l = l.clone();
            tokio::spawn(async move { l.admit().await.map(|_| ()) })
        };
        while l.pending() == 0 {
            tokio::task::yield_now().await;
        }
        let t = std::time::Instant::now();
        assert_eq!(l.admit().await.err(), Some(Overflow::Pending));
        assert!(t.elapsed() < Duration::from_millis(50), "refused at once");
        drop(first);
        assert_eq!(
            waiter.await.unwrap(),
            Ok(()),
            "the queued request gets the connection"
        );
        assert_eq!(l.pending(), 0);
    }

    #[tokio::test]
    async fn a_queued_request_gives_up_after_the_connect_timeout() {
        let l = Limiter::new(ClusterLimits {
            max_connections: Some(1),
            connect_timeout: Some(Duration::from_millis(50)),
            ..Default::default()
        });
        let _first = l.admit().await.unwrap();
        assert_eq!(l.admit().await.err(), Some(Overflow::Connections));
        assert_eq!(l.pending(), 0);
    }

    #[test]
    fn kinds_and_reasons() {
        for (o, kind) in [
            (Overflow::Connections, "connections"),
            (Overflow::Pending, "pending"),
            (Overflow::Requests, "requests"),
        ] {
            assert_eq!(o.kind(), kind);
            assert_eq!(o.reason(), format!("overflow-{kind}"));
        }
    }
}

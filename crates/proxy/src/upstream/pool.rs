//! Connections to upstream endpoints, kept for reuse.
//!
//! Each endpoint address has one [`EndpointConns`]: a stack of idle HTTP/1 connections (the
//! most recently used first, so few stay warm) and one shared HTTP/2 connection multiplexing
//! every stream. A reaper closes connections idle longer than the idle timeout. Opaque TCP
//! connects go through [`EndpointConns::connect`] for the same connect timeout. Endpoints of
//! services with a known identity are reached over mTLS: the same address with and without
//! an expected identity gets separate entries, so connections are never shared between them.

use crate::balance::{Endpoint, EndpointStats};
use crate::http::body::RequestBody;
use crate::tls::{UpstreamTls, UpstreamUse};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::borrow::Cow;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_util::either::Either;
use trellis_identity::SpiffeId;

/// A connection to an endpoint: plain TCP, or mTLS over it.
pub type UpstreamIo = Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;

/// Why no connection to an endpoint could be had.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The TCP connect did not finish within the connect timeout.
    #[error("connect to {0} timed out")]
    Timeout(SocketAddr),
    /// The TCP connect failed (refused, unreachable, ...).
    #[error("connect to {addr}: {source}")]
    Io {
        /// The endpoint.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The mTLS handshake failed (wrong identity, unknown CA, ...).
    #[error("mTLS handshake with {addr}: {source}")]
    Tls {
        /// The endpoint.
        addr: SocketAddr,
        /// Why.
        source: io::Error,
    },
    /// The HTTP handshake failed.
    #[error("HTTP handshake with {addr}: {source}")]
    Handshake {
        /// The endpoint.
        addr: SocketAddr,
        /// Why.
        source: hyper::Error,
    },
}

/// Pool settings.
#[derive(Clone)]
pub struct PoolConfig {
    /// Where failed mTLS handshakes to endpoints are counted.
    pub metrics: Arc<crate::telemetry::Metrics>,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Idle connections are closed after this.
    pub idle_timeout: Duration,
}

/// All endpoints' connections. One per proxy.
pub struct Pool {
    cfg: Arc<PoolConfig>,
    endpoints: Mutex<HashMap<EndpointKey, Weak<EndpointConns>>>,
}

/// An endpoint address and the identity it must present (none: plaintext).
type EndpointKey = (SocketAddr, Option<SpiffeId>);

impl Pool {
    /// An empty pool.
    pub fn new(cfg: PoolConfig) -> Arc<Self> {
        Arc::new(Self {
            cfg: Arc::new(cfg),
            endpoints: Mutex::new(HashMap::new()),
        })
    }

    /// The connections of `addr`, shared by every service that lists it with the same
    /// expected identity; `tls` makes them mTLS.
    pub fn endpoint(&self, addr: SocketAddr, tls: Option<Arc<UpstreamTls>>) -> Arc<EndpointConns> {
        let key = (addr, tls.as_ref().map(|t| t.expected.clone()));
        let mut map = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(ep) = map.get(&key).and_then(Weak::upgrade) {
            return ep;
        }
        let ep = Arc::new(EndpointConns {
            addr,
            tls,
            cfg: self.cfg.clone(),
            h1_idle: Mutex::new(Vec::new()),
            h2: Mutex::new(None),
            h2_connecting: tokio::sync::Mutex::new(()),
            stats: EndpointStats::new(),
            tuning: Tuning::default(),
        });
        map.insert(key, Arc::downgrade(&ep));
        ep
    }

    /// Closes idle connections past the idle timeout, forever. Spawn once.
    pub async fn reap(self: Arc<Self>) {
        let period =
            (self.cfg.idle_timeout / 4).clamp(Duration::from_millis(250), Duration::from_secs(5));
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            let live: Vec<Arc<EndpointConns>> = {
                let mut map = self.endpoints.lock().unwrap_or_else(|e| e.into_inner());
                map.retain(|_, w| w.strong_count() > 0);
                map.values().filter_map(Weak::upgrade).collect()
            };
            for ep in live {
                ep.close_idle();
            }
        }
    }
}

struct IdleH1 {
    tx: http1::SendRequest<RequestBody>,
    since: Instant,
    /// Requests sent on it so far.
    requests: u32,
}

struct SharedH2 {
    tx: http2::SendRequest<RequestBody>,
    last_used: Instant,
    /// Streams opened on it so far.
    requests: u32,
}

/// Per-endpoint overrides of the pool settings, from the `connectionPool` of the cluster
/// listing it (0: the pool's setting / no limit). Set whenever a config builds its clusters.
#[derive(Default)]
struct Tuning {
    connect_timeout_ms: AtomicU64,
    idle_timeout_ms: AtomicU64,
    max_requests_per_connection: AtomicU32,
}

/// Millisecond value of an override (0: none; a non-zero duration is at least 1 ms).
fn millis(d: Option<Duration>) -> u64 {
    d.map_or(0, |d| {
        u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
    })
}

/// The pooled connections of one endpoint address.
pub struct EndpointConns {
    addr: SocketAddr,
    tls: Option<Arc<UpstreamTls>>,
    cfg: Arc<PoolConfig>,
    h1_idle: Mutex<Vec<IdleH1>>,
    h2: Mutex<Option<SharedH2>>,
    /// Held while dialing a new HTTP/2 connection so concurrent requests share one.
    h2_connecting: tokio::sync::Mutex<()>,
    /// Requests in flight and latency, for the load balancers of every cluster listing it.
    stats: EndpointStats,
    tuning: Tuning,
}

/// An HTTP/1 connection checked out of the pool. Hand it back with [`H1Conn::release`] once
/// its response has been read to the end; dropping it closes the connection.
pub struct H1Conn {
    /// The request sender.
    pub tx: http1::SendRequest<RequestBody>,
    /// Whether it came from the idle stack (and so may have been closed by the peer).
    pub reused: bool,
    endpoint: Arc<EndpointConns>,
    /// Requests sent on it, this one included.
    requests: u32,
}

impl H1Conn {
    /// Returns the connection to its endpoint's idle stack.
    pub fn release(self) {
        if self.tx.is_closed() || self.endpoint.used_up(self.requests) {
            return;
        }
        let mut idle = self
            .endpoint
            .h1_idle
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        idle.push(IdleH1 {
            tx: self.tx,
            since: Instant::now(),
            requests: self.requests,
        });
    }
}

impl EndpointConns {
    /// The endpoint's address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Its load: requests in flight and latency. Hold [`EndpointStats::start`]'s guard
    /// around an exchange (or [`EndpointStats::start_untimed`]'s around a tunnel).
    pub fn stats(&self) -> &EndpointStats {
        &self.stats
    }

    /// Applies a cluster's `connectionPool` settings to this endpoint's connections:
    /// connect timeout, idle timeout and requests per connection (`None`: the pool's
    /// settings, no limit). An endpoint listed by several clusters takes the last applied.
    pub fn tune(
        &self,
        connect_timeout: Option<Duration>,
        idle_timeout: Option<Duration>,
        max_requests_per_connection: Option<u32>,
    ) {
        let t = &self.tuning;
        t.connect_timeout_ms
            .store(millis(connect_timeout), Ordering::Relaxed);
        t.idle_timeout_ms
            .store(millis(idle_timeout), Ordering::Relaxed);
        t.max_requests_per_connection
            .store(max_requests_per_connection.unwrap_or(0), Ordering::Relaxed);
    }

    fn connect_timeout(&self) -> Duration {
        match self.tuning.connect_timeout_ms.load(Ordering::Relaxed) {
            0 => self.cfg.connect_timeout,
            ms => Duration::from_millis(ms),
        }
    }

    fn idle_timeout(&self) -> Duration {
        match self.tuning.idle_timeout_ms.load(Ordering::Relaxed) {
            0 => self.cfg.idle_timeout,
            ms => Duration::from_millis(ms),
        }
    }

    /// Whether a connection that carried `requests` requests may carry no more.
    fn used_up(&self, requests: u32) -> bool {
        let max = self
            .tuning
            .max_requests_per_connection
            .load(Ordering::Relaxed);
        max > 0 && requests >= max
    }

    /// Whether connections to this endpoint are mTLS.
    pub fn is_mtls(&self) -> bool {
        self.tls.is_some()
    }

    /// A new connection within the connect timeout, mTLS when the endpoint has an identity.
    pub async fn connect(&self, usage: UpstreamUse) -> Result<UpstreamIo, ConnectError> {
        let addr = self.addr;
        let tcp = match tokio::time::timeout(self.connect_timeout(), TcpStream::connect(addr)).await
        {
            Err(_) => return Err(ConnectError::Timeout(addr)),
            Ok(Err(source)) => return Err(ConnectError::Io { addr, source }),
            Ok(Ok(s)) => s,
        };
        let _ = tcp.set_nodelay(true);
        match &self.tls {
            None => Ok(Either::Left(tcp)),
            Some(tls) => match tls.connect(tcp, usage).await {
                Ok(io) => Ok(Either::Right(io)),
                Err(source) => {
                    let reason = trellis_identity::tls::failure_reason(&source);
                    self.cfg.metrics.tls_handshake_failed(reason);
                    tracing::info!(endpoint = %addr, reason, error = %source, "mTLS handshake with an upstream failed");
                    Err(ConnectError::Tls { addr, source })
                }
            },
        }
    }

    /// An HTTP/1 connection: an idle one if any is still usable, else a new one.
    pub async fn h1(self: &Arc<Self>) -> Result<H1Conn, ConnectError> {
        loop {
            let popped = self.h1_idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let Some(mut idle) = popped else { break };
            if idle.tx.is_closed() || idle.since.elapsed() >= self.idle_timeout() {
                continue;
            }
            if idle.tx.ready().await.is_ok() {
                return Ok(H1Conn {
                    tx: idle.tx,
                    reused: true,
                    endpoint: self.clone(),
                    requests: idle.requests.saturating_add(1),
                });
            }
        }
        self.h1_new().await
    }

    /// A new HTTP/1 connection (with upgrades enabled), bypassing the idle stack.
    pub async fn h1_new(self: &Arc<Self>) -> Result<H1Conn, ConnectError> {
        // Dialing (TCP, TLS, handshake) is a large future; boxed, it is not part of every
        // request's state machine, only allocated when a connection is made.
        Box::pin(self.dial_h1()).await
    }

    async fn dial_h1(self: &Arc<Self>) -> Result<H1Conn, ConnectError> {
        let io = self.connect(UpstreamUse::Http1).await?;
        let (tx, conn) = http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|source| ConnectError::Handshake {
                addr: self.addr,
                source,
            })?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream HTTP/1 connection ended");
            }
        });
        Ok(H1Conn {
            tx,
            reused: false,
            endpoint: self.clone(),
            requests: 1,
        })
    }

    /// The shared HTTP/2 connection, dialed on first use or after it closed.
    pub async fn h2(&self) -> Result<http2::SendRequest<RequestBody>, ConnectError> {
        if let Some(tx) = self.live_h2() {
            return Ok(tx);
        }
        // Boxed for the same reason as `h1_new`'s dial.
        Box::pin(self.dial_h2()).await
    }

    async fn dial_h2(&self) -> Result<http2::SendRequest<RequestBody>, ConnectError> {
        let _dialing = self.h2_connecting.lock().await;
        if let Some(tx) = self.live_h2() {
            return Ok(tx);
        }
        let io = self.connect(UpstreamUse::H2).await?;
        let (tx, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .handshake(TokioIo::new(io))
            .await
            .map_err(|source| ConnectError::Handshake {
                addr: self.addr,
                source,
            })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream HTTP/2 connection ended");
            }
        });
        *self.h2.lock().unwrap_or_else(|e| e.into_inner()) = Some(SharedH2 {
            tx: tx.clone(),
            last_used: Instant::now(),
            requests: 1,
        });
        Ok(tx)
    }

    fn live_h2(&self) -> Option<http2::SendRequest<RequestBody>> {
        let mut slot = self.h2.lock().unwrap_or_else(|e| e.into_inner());
        match slot.as_mut() {
            // A connection that carried its `maxRequestsPerConnection` is dropped from the
            // pool; it closes once its last stream ends.
            Some(h2) if !h2.tx.is_closed() && !self.used_up(h2.requests) => {
                h2.last_used = Instant::now();
                h2.requests = h2.requests.saturating_add(1);
                Some(h2.tx.clone())
            }
            _ => {
                *slot = None;
                None
            }
        }
    }

    fn close_idle(&self) {
        let idle_timeout = self.idle_timeout();
        self.h1_idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|c| !c.tx.is_closed() && c.since.elapsed() < idle_timeout);
        let mut h2 = self.h2.lock().unwrap_or_else(|e| e.into_inner());
        if h2
            .as_ref()
            .is_some_and(|c| c.tx.is_closed() || c.last_used.elapsed() >= idle_timeout)
        {
            *h2 = None;
        }
    }

    /// Idle HTTP/1 connections held right now (for tests and `/config`).
    pub fn idle_h1(&self) -> usize {
        self.h1_idle.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// Balanced by address: the key `ip:port` is the same in every proxy, so consistent hashing
/// agrees mesh-wide. (The same address with and without mTLS has two entries, one key.)
impl Endpoint for EndpointConns {
    fn stats(&self) -> &EndpointStats {
        &self.stats
    }

    fn key(&self) -> Cow<'_, str> {
        Cow::Owned(self.addr.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::{BodyExt, Full};

    /// An HTTP/1 server on loopback answering 200 "ok" to everything.
    async fn server() -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                            bytes::Bytes::from_static(b"ok"),
                        )))
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(s), svc)
                        .await;
                });
            }
        });
        addr
    }

    async fn get(conn: &mut H1Conn) {
        let req = http::Request::get("/").body(RequestBody::empty()).unwrap();
        let resp = conn.tx.send_request(req).await.unwrap();
        assert_eq!(resp.into_body().collect().await.unwrap().to_bytes(), "ok");
    }

    #[tokio::test]
    async fn released_connections_are_reused_then_closed_when_idle() {
        let pool = Pool::new(PoolConfig {
            metrics: Arc::default(),
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_millis(200),
        });
        let ep = pool.endpoint(server().await, None);
        let mut c = ep.h1().await.unwrap();
        assert!(!c.reused);
        get(&mut c).await;
        c.release();
        assert_eq!(ep.idle_h1(), 1);
        let mut c = ep.h1().await.unwrap();
        assert!(c.reused, "the idle connection is reused");
        get(&mut c).await;
        c.release();
        tokio::time::sleep(Duration::from_millis(250)).await;
        ep.close_idle();
        assert_eq!(ep.idle_h1(), 0, "idle past the timeout: closed");
        assert!(!ep.h1().await.unwrap().reused);
    }

    #[tokio::test]
    async fn a_connection_is_retired_after_max_requests_per_connection() {
        let pool = Pool::new(PoolConfig {
            metrics: Arc::default(),
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(60),
        });
        let ep = pool.endpoint(server().await, None);
        ep.tune(None, Some(Duration::from_millis(100)), Some(2));
        assert_eq!(ep.idle_timeout(), Duration::from_millis(100));
        let mut c = ep.h1().await.unwrap();
        get(&mut c).await;
        c.release();
        let mut c = ep.h1().await.unwrap();
        assert!(c.reused);
        get(&mut c).await;
        c.release();
        assert_eq!(ep.idle_h1(), 0, "two requests: retired, not pooled");
        assert!(!ep.h1().await.unwrap().reused);
        ep.tune(None, None, None);
        assert_eq!(
            ep.idle_timeout(),
            Duration::from_secs(60),
            "back to the pool's"
        );
        assert!(!ep.used_up(1000));
    }

    #[tokio::test]
    async fn refused_and_unreachable_endpoints_fail_fast() {
        let pool = Pool::new(PoolConfig {
            metrics: Arc::default(),
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(60),
        });
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let ep = pool.endpoint(addr, None);
        assert!(matches!(ep.h1().await, Err(ConnectError::Io { .. })));
        assert!(
            Arc::ptr_eq(&ep, &pool.endpoint(addr, None)),
            "one entry per address"
        );
    }
}

//! Accepting connections: one accept loop per listener, detection, then HTTP or TCP.

use crate::config::Protocol;
use crate::detect::{self, Detected, PrefixedIo};
use crate::http::forward::{ClientConn, Forwarder};
use crate::http::{self, ServerConfig};
use crate::io::MeteredIo;
use crate::telemetry::metrics::{Metrics, Peer};
use crate::upstream::Service;
use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// One listener's behaviour.
pub struct Listener {
    /// Where it came from in the config (for logs).
    pub name: String,
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// Detection or a fixed protocol.
    pub protocol: Protocol,
    /// Handles HTTP requests.
    pub forwarder: Arc<Forwarder>,
    /// Where opaque TCP goes; `None` refuses it (the HTTP proxy listener).
    pub tcp_target: Option<Arc<Service>>,
    /// The caller as metrics see it.
    pub source: Peer,
    /// `peer_service` label of the TCP metrics.
    pub peer_label: Arc<str>,
}

/// What every connection handler needs.
pub struct Context {
    /// Metrics registry.
    pub metrics: Arc<Metrics>,
    /// HTTP server limits.
    pub server: ServerConfig,
    /// How long detection waits for the client to speak.
    pub detect_timeout: Duration,
    /// Fires when the proxy starts draining.
    pub shutdown: CancellationToken,
    /// Every connection task, so a drain can wait for them.
    pub tracker: TaskTracker,
}

/// Accepts until shutdown, then drops the socket so new connections are refused.
pub async fn accept_loop(tcp: TcpListener, listener: Arc<Listener>, ctx: Arc<Context>) {
    loop {
        let accepted = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            r = tcp.accept() => r,
        };
        match accepted {
            Ok((stream, addr)) => {
                let (l, c) = (listener.clone(), ctx.clone());
                ctx.tracker.spawn(handle(stream, addr, l, c));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(listener = %listener.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    tracing::debug!(listener = %listener.name, "listener closed");
}

async fn handle(stream: TcpStream, addr: SocketAddr, l: Arc<Listener>, ctx: Arc<Context>) {
    let _ = stream.set_nodelay(true);
    let metrics = ctx.metrics.tcp_open(l.direction, &l.peer_label);
    let mut io = MeteredIo::new(stream, metrics);
    let (detected, prefix) = match l.protocol {
        Protocol::Http1 => (Detected::Http1, Bytes::new()),
        Protocol::Http2 | Protocol::Grpc => (Detected::Http2, Bytes::new()),
        Protocol::Tcp => (Detected::Opaque, Bytes::new()),
        Protocol::Auto => {
            // A client still silent when the drain starts has nothing in flight: close it.
            let detected = tokio::select! {
                d = detect::detect(&mut io, ctx.detect_timeout) => d,
                _ = ctx.shutdown.cancelled() => return,
            };
            match detected {
                Ok(Some(d)) => d,
                Ok(None) => return,
                Err(e) => {
                    tracing::debug!(error = %e, "read failed during detection");
                    return;
                }
            }
        }
    };
    let io = PrefixedIo::new(prefix, io);
    match detected {
        Detected::Http1 | Detected::Http2 => {
            let client = Arc::new(ClientConn {
                addr,
                source: l.source.clone(),
                tls: false,
            });
            let h2 = detected == Detected::Http2;
            http::serve(
                io,
                h2,
                l.forwarder.clone(),
                client,
                &ctx.server,
                ctx.shutdown.clone(),
            )
            .await;
        }
        Detected::Tls | Detected::Opaque => match &l.tcp_target {
            Some(service) => crate::tcp::forward(io, service).await,
            None => {
                tracing::debug!(listener = %l.name, client = %addr, "closing non-HTTP connection on the HTTP proxy listener");
            }
        },
    }
}

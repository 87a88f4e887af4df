//! Accepting connections: one accept loop per listener, detection, mTLS termination on
//! inbound, then HTTP or TCP.

use crate::config::{MtlsMode, Protocol};
use crate::detect::{self, Detected, PrefixedIo};
use crate::http::forward::{ClientConn, Destination, Forwarder};
use crate::http::{self, ServerConfig};
use crate::io::MeteredIo;
use crate::telemetry::metrics::{Metrics, Peer};
use crate::tls::{peer_of, Alpn, InboundTls};
use arc_swap::ArcSwap;
use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// One listener's behaviour.
pub struct Listener {
    /// Where it came from in the config (for logs).
    pub name: String,
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// Detection or a fixed protocol (inside mTLS, for inbound listeners with mTLS).
    pub protocol: Protocol,
    /// Handles HTTP requests.
    pub forwarder: Arc<Forwarder>,
    /// Where opaque TCP goes; `None` refuses it (the HTTP proxy listener).
    pub tcp_target: Option<Destination>,
    /// The caller as metrics see it when the connection carries no identity.
    pub source: Peer,
    /// `peer_service` label of the TCP metrics.
    pub peer_label: Arc<str>,
    /// mTLS termination (inbound, STRICT or PERMISSIVE).
    pub tls: Option<InboundTls>,
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

/// Accepts until shutdown, then drops the socket so new connections are refused. Each
/// connection gets the listener's behaviour as configured when it was accepted.
pub async fn accept_loop(tcp: TcpListener, current: Arc<ArcSwap<Listener>>, ctx: Arc<Context>) {
    loop {
        let accepted = tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            r = tcp.accept() => r,
        };
        // Loaded after the accept: the connection gets the config current when it arrived.
        let listener = current.load_full();
        match accepted {
            Ok((stream, addr)) => {
                ctx.tracker
                    .spawn(handle(stream, addr, listener, ctx.clone()));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(listener = %listener.name, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    tracing::debug!(listener = %current.load().name, "listener closed");
}

/// Reads the first bytes unless the drain starts first. `None`: close the connection.
async fn detect_or_drain<I: AsyncRead + Unpin>(
    io: &mut I,
    ctx: &Context,
) -> Option<(Detected, Bytes)> {
    // A client still silent when the drain starts has nothing in flight: close it.
    let detected = tokio::select! {
        d = detect::detect(io, ctx.detect_timeout) => d,
        _ = ctx.shutdown.cancelled() => return None,
    };
    match detected {
        Ok(d) => d,
        Err(e) => {
            tracing::debug!(error = %e, "read failed during detection");
            None
        }
    }
}

fn fixed(protocol: Protocol) -> Option<Detected> {
    match protocol {
        Protocol::Auto => None,
        Protocol::Http1 => Some(Detected::Http1),
        Protocol::Http2 | Protocol::Grpc => Some(Detected::Http2),
        Protocol::Tcp => Some(Detected::Opaque),
    }
}

async fn handle(stream: TcpStream, addr: SocketAddr, l: Arc<Listener>, ctx: Arc<Context>) {
    let local = stream.local_addr().ok();
    let _ = stream.set_nodelay(true);
    let metrics = ctx.metrics.tcp_open(l.direction, &l.peer_label);
    let mut io = MeteredIo::new(stream, metrics);
    let plaintext_client = ClientConn {
        addr,
        source: l.source.clone(),
        tls: false,
        identity: None,
        local,
        principal: Default::default(),
    };

    // Without mTLS a fixed protocol skips detection; with it, we must look for a ClientHello.
    let Some(tls) = &l.tls else {
        let (detected, prefix) = match fixed(l.protocol) {
            Some(d) => (d, Bytes::new()),
            None => match detect_or_drain(&mut io, &ctx).await {
                Some(d) => d,
                None => return,
            },
        };
        dispatch(
            PrefixedIo::new(prefix, io),
            detected,
            plaintext_client,
            &l,
            &ctx,
        )
        .await;
        return;
    };
    let Some((detected, prefix)) = detect_or_drain(&mut io, &ctx).await else {
        return;
    };
    let io = PrefixedIo::new(prefix, io);
    if detected != Detected::Tls {
        if tls.mode == MtlsMode::Strict {
            ctx.metrics.tls_handshake_failed("plaintext_refused");
            tracing::debug!(listener = %l.name, client = %addr, "plaintext refused (mTLS STRICT)");
            return;
        }
        let detected = fixed(l.protocol).unwrap_or(detected);
        dispatch(io, detected, plaintext_client, &l, &ctx).await;
        return;
    }
    let accepted = match tls.accept(io).await {
        Ok(a) => a,
        Err(e) => {
            let reason = trellis_identity::tls::failure_reason(&e);
            ctx.metrics.tls_handshake_failed(reason);
            tracing::info!(listener = %l.name, client = %addr, reason, error = %e, "mTLS handshake failed");
            return;
        }
    };
    let client = ClientConn {
        addr,
        source: accepted.peer.as_ref().map_or_else(Peer::unknown, peer_of),
        tls: true,
        identity: accepted.peer.clone(),
        local,
        principal: Default::default(),
    };
    let mut io = accepted.io;
    let (detected, prefix) = match (accepted.alpn, fixed(l.protocol)) {
        (Alpn::H2, _) => (Detected::Http2, Bytes::new()),
        (Alpn::Http1, _) => (Detected::Http1, Bytes::new()),
        (Alpn::None, Some(d)) => (d, Bytes::new()),
        (Alpn::None, None) => match detect_or_drain(&mut io, &ctx).await {
            Some(d) => d,
            None => return,
        },
    };
    dispatch(PrefixedIo::new(prefix, io), detected, client, &l, &ctx).await;
}

/// Serves a connection whose protocol is known.
async fn dispatch<I>(io: I, detected: Detected, client: ClientConn, l: &Listener, ctx: &Context)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match detected {
        Detected::Http1 | Detected::Http2 => {
            let h2 = detected == Detected::Http2;
            http::serve(
                io,
                h2,
                l.forwarder.clone(),
                Arc::new(client),
                &ctx.server,
                ctx.shutdown.clone(),
            )
            .await;
        }
        Detected::Tls | Detected::Opaque => match &l.tcp_target {
            _ if l.forwarder.inbound
                && !l
                    .forwarder
                    .shared
                    .inbound
                    .load()
                    .check_connection(&client, &ctx.metrics) => {}
            Some(target) => match target.host(&l.forwarder.shared.services.load()) {
                Ok(host) => {
                    let port = client.local.map(|a| a.port());
                    let shared = &l.forwarder.shared;
                    crate::tcp::forward(io, &host, port, &shared.source()).await
                }
                Err(e) => {
                    tracing::info!(listener = %l.name, client = %client.addr, error = %e, "TCP connection closed");
                }
            },
            None => {
                tracing::debug!(listener = %l.name, client = %client.addr, "closing non-HTTP connection on the HTTP proxy listener");
            }
        },
    }
}

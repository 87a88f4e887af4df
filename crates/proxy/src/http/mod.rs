//! HTTP on accepted connections: the server side (HTTP/1.1 and HTTP/2) and forwarding.

pub mod body;
pub mod exchange;
pub mod forward;
pub mod headers;
pub mod mirror;
pub mod respond;

use forward::{ClientConn, Forwarder};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

/// Replaces the path of `uri`, keeping its scheme and authority; `query` (without `?`) is
/// kept when given and non-empty. A path that is not a valid request target leaves `uri` as
/// it was.
pub fn set_path(uri: &mut http::Uri, path: &str, query: Option<&str>) {
    let pq = match query {
        Some(q) if !q.is_empty() => format!("{path}?{q}"),
        _ => path.to_string(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = http::uri::PathAndQuery::try_from(pq).ok();
    if let Ok(u) = http::Uri::from_parts(parts) {
        *uri = u;
    }
}

/// Server-side limits.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Largest request head; larger gets 431.
    pub max_header_bytes: usize,
    /// Time allowed to receive a request head.
    pub header_read_timeout: Duration,
}

/// Serves one client connection until it closes. When `shutdown` fires, HTTP/1 finishes the
/// request in flight with `Connection: close` and HTTP/2 sends GOAWAY and lets open streams
/// finish.
pub async fn serve<I>(
    io: I,
    h2: bool,
    forwarder: Arc<Forwarder>,
    client: Arc<ClientConn>,
    cfg: &ServerConfig,
    shutdown: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let svc = service_fn(move |req| forwarder.clone().serve(client.clone(), req));
    let io = TokioIo::new(io);
    let result = if h2 {
        let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        b.timer(TokioTimer::new())
            .max_header_list_size(cfg.max_header_bytes as u32)
            .max_concurrent_streams(1024);
        let conn = b.serve_connection(io, svc);
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r,
            _ = shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    } else {
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(TokioTimer::new())
            .header_read_timeout(cfg.header_read_timeout)
            .max_buf_size(cfg.max_header_bytes);
        let conn = b.serve_connection(io, svc).with_upgrades();
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => r,
            _ = shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "client connection ended with an error");
    }
}

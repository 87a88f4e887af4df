//! The admin server: `/live`, `/ready`, `/metrics`, `/config`, `/certs`, `POST /shutdown`.

use crate::telemetry::Metrics;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Proxy state the admin server reports and controls.
pub struct AdminState {
    /// Metrics to expose.
    pub metrics: Arc<Metrics>,
    /// Config loaded and listeners bound.
    pub ready: AtomicBool,
    /// Draining: `/ready` answers 503.
    pub draining: AtomicBool,
    /// Builds the effective config as JSON (`GET /config`).
    pub config_json: Box<dyn Fn() -> String + Send + Sync>,
    /// The workload identity, when the proxy has one.
    pub identity: Option<Arc<trellis_identity::IdentityStore>>,
    /// Cancelled by `POST /shutdown` to start a drain.
    pub shutdown_requested: CancellationToken,
}

/// Serves the admin API on `listener` until the process exits.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(route(&state, peer, req)) }
            });
            let mut b = hyper::server::conn::http1::Builder::new();
            b.timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10));
            if let Err(e) = b.serve_connection(TokioIo::new(stream), svc).await {
                tracing::debug!(error = %e, "admin connection ended");
            }
        });
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json(body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn route(state: &AdminState, peer: SocketAddr, req: Request<Incoming>) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
        (&Method::GET, "/ready") => {
            if state.draining.load(Ordering::Acquire) {
                text(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
            } else if state.ready.load(Ordering::Acquire) {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        (&Method::GET, "/metrics") => {
            let mut r = text(StatusCode::OK, state.metrics.encode());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static(
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                ),
            );
            r
        }
        (&Method::GET, "/config") => json((state.config_json)()),
        (&Method::GET, "/certs") => json(certs_json(state.identity.as_deref()).to_string()),
        (&Method::POST, "/shutdown") => {
            if !peer.ip().is_loopback() {
                return text(
                    StatusCode::FORBIDDEN,
                    "shutdown is only accepted from loopback\n",
                );
            }
            state.shutdown_requested.cancel();
            text(StatusCode::ACCEPTED, "draining\n")
        }
        (_, "/live" | "/ready" | "/metrics" | "/config" | "/certs" | "/shutdown") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "not found: try /live /ready /metrics /config /certs or POST /shutdown\n",
        ),
    }
}

fn certs_json(store: Option<&trellis_identity::IdentityStore>) -> serde_json::Value {
    match store.and_then(|s| s.info().map(|i| (i, s.rotations()))) {
        Some((info, rotations)) => serde_json::json!({
            "identity": info.identity.to_string(),
            "serial": info.serial,
            "not_after": info.not_after,
            "not_after_rfc3339": crate::telemetry::time::rfc3339(
                std::time::UNIX_EPOCH + Duration::from_secs(info.not_after)
            ),
            "rotations": rotations,
            "trust_roots": info.trust_roots,
            "issuer": info.issuer,
        }),
        None => serde_json::json!({
            "identity": null,
            "note": "this proxy has no workload identity (no identity files, no control plane)",
        }),
    }
}

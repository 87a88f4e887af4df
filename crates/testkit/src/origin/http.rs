//! HTTP origin: HTTP/1.1 (keep-alive, upgrades) and h2c prior knowledge on one port.
//!
//! Routes:
//! - `/echo...` (any method): 200 JSON describing the request as received (see [`HttpOrigin`]).
//! - `/status/{code}`: that status with body `status {code}`.
//! - `/slow/{ms}`: sleeps, then 200 `slow`.
//! - `/fail-first/{key}/{n}/{code}`: status `code` for the first `n` requests with that `key`
//!   (counted per origin), then 200 `ok`; for retry tests.
//! - `/stream/{bytes}`: 200 with exactly that many `x` bytes, streamed in 64 KiB chunks.
//! - `/drip/{chunks}/{ms}`: 200 headers at once, then `chunks` lines `tick\n`, one every `ms`.
//! - `/upload`: reads the body and answers 200 with its byte count as text.
//! - `/trailers`: 200 `ok` followed by the trailer `x-trailer: yes` (HTTP/1.1 needs `TE: trailers`).
//! - `/ws`: WebSocket echo (HTTP/1.1 upgrade).
//! - anything else: 404.

use std::collections::HashMap;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{stream, SinkExt, StreamExt};
use http::header::{
    CONNECTION, CONTENT_TYPE, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY, TRAILER, UPGRADE,
};
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Version};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use hyper_util::server::conn::auto;
use serde_json::{json, Map, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::{Message, Role};
use tokio_tungstenite::WebSocketStream;
use tokio_util::sync::DropGuard;

use super::tasks::{bind_loopback, Tasks};

/// Response header naming the origin that answered (set by [`HttpOrigin::start_with_name`]).
pub const ORIGIN_HEADER: &str = "x-origin";

/// Size of the chunks `/stream/{bytes}` writes.
const STREAM_CHUNK: usize = 64 * 1024;
static STREAM_BYTES: [u8; STREAM_CHUNK] = [b'x'; STREAM_CHUNK];

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// A running HTTP origin; stops when dropped.
///
/// `/echo` answers `{"method", "path", "authority", "headers", "body_len", "version"}`, where
/// `path` is path and query as received, `authority` the request URI's authority (HTTP/2's
/// `:authority`, or null), `headers` maps each name to its values joined with `", "`, and
/// `version` is `"HTTP/1.1"` or `"HTTP/2.0"`.
#[derive(Debug)]
pub struct HttpOrigin {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    _tasks: DropGuard,
}

impl HttpOrigin {
    /// Binds an ephemeral loopback port and starts serving.
    pub async fn start() -> io::Result<Self> {
        Self::start_inner(None, Duration::ZERO, None).await
    }

    /// Like [`HttpOrigin::start`], but every response carries `x-origin: {name}` so tests can
    /// tell which endpoint answered.
    pub async fn start_with_name(name: &str) -> io::Result<Self> {
        let name = HeaderValue::from_str(name)
            .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
        Self::start_inner(Some(name), Duration::ZERO, None).await
    }

    /// Like [`HttpOrigin::start_with_name`], but every response (any route) is delayed by
    /// `delay` before it is sent: a slow endpoint for load-balancing tests.
    pub async fn start_with_delay(name: &str, delay: Duration) -> io::Result<Self> {
        let name = HeaderValue::from_str(name)
            .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
        Self::start_inner(Some(name), delay, None).await
    }

    /// Like [`HttpOrigin::start_with_name`], but it answers `status` (body `failing`) to
    /// every request, whatever the route: a broken endpoint for outlier-detection tests.
    pub async fn start_failing(name: &str, status: u16) -> io::Result<Self> {
        let name = HeaderValue::from_str(name)
            .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
        let status = StatusCode::from_u16(status)
            .map_err(|err| io::Error::new(io::ErrorKind::InvalidInput, err))?;
        Self::start_inner(Some(name), Duration::ZERO, Some(status)).await
    }

    async fn start_inner(
        name: Option<HeaderValue>,
        delay: Duration,
        fail_with: Option<StatusCode>,
    ) -> io::Result<Self> {
        let (listener, addr) = bind_loopback().await?;
        let (tasks, guard) = Tasks::new();
        let requests = Arc::new(AtomicU64::new(0));
        let origin = Arc::new(Origin {
            name,
            delay,
            fail_with,
            requests: Arc::clone(&requests),
            tasks: tasks.clone(),
            fail_first: Mutex::new(HashMap::new()),
        });
        tasks.accept_loop(listener, move |stream| {
            serve_connection(stream, Arc::clone(&origin))
        });
        Ok(Self {
            addr,
            requests,
            _tasks: guard,
        })
    }

    /// The address the origin listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// How many requests the origin has received so far (all routes, including 404s).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }
}

/// State shared by all connections of one origin.
struct Origin {
    name: Option<HeaderValue>,
    /// Added before every response.
    delay: Duration,
    /// Answered to every request instead of its route.
    fail_with: Option<StatusCode>,
    requests: Arc<AtomicU64>,
    tasks: Tasks,
    /// Requests seen per `/fail-first/{key}/..` key.
    fail_first: Mutex<HashMap<String, u64>>,
}

async fn serve_connection(stream: TcpStream, origin: Arc<Origin>) {
    let _ = stream.set_nodelay(true);
    let builder = auto::Builder::new(origin.tasks.clone());
    let service = service_fn(move |req| {
        let origin = Arc::clone(&origin);
        async move { Ok::<_, Infallible>(origin.respond(req).await) }
    });
    if let Err(err) = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .await
    {
        tracing::debug!(error = %err, "http origin connection failed");
    }
}

impl Origin {
    async fn respond(&self, req: Request<Incoming>) -> Response<Body> {
        self.requests.fetch_add(1, Ordering::SeqCst);
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        let mut response = match self.fail_with {
            Some(code) => text(code, "failing"),
            None => self.route(req).await,
        };
        if let Some(name) = &self.name {
            response
                .headers_mut()
                .insert(HeaderName::from_static(ORIGIN_HEADER), name.clone());
        }
        response
    }

    async fn route(&self, req: Request<Incoming>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        if path.starts_with("/echo") {
            return echo(req).await;
        }
        if let Some(code) = path.strip_prefix("/status/") {
            return status(code);
        }
        if let Some(ms) = path.strip_prefix("/slow/") {
            return slow(ms).await;
        }
        if let Some(spec) = path.strip_prefix("/fail-first/") {
            return self.fail_first(spec);
        }
        if let Some(len) = path.strip_prefix("/stream/") {
            return stream_bytes(len);
        }
        if let Some(spec) = path.strip_prefix("/drip/") {
            return drip(spec);
        }
        match path.as_str() {
            "/upload" => upload(req).await,
            "/trailers" => trailers(),
            "/ws" => self.websocket(req),
            _ => text(StatusCode::NOT_FOUND, "not found"),
        }
    }

    /// `{key}/{n}/{code}`: `code` while fewer than `n` requests with `key` came before.
    fn fail_first(&self, spec: &str) -> Response<Body> {
        let mut parts = spec.splitn(3, '/');
        let (Some(key), Some(Ok(n)), Some(code)) = (
            parts.next(),
            parts.next().map(str::parse::<u64>),
            parts.next(),
        ) else {
            return text(
                StatusCode::BAD_REQUEST,
                "expected /fail-first/{key}/{n}/{code}",
            );
        };
        let seen = {
            let mut map = self.fail_first.lock().unwrap_or_else(|e| e.into_inner());
            let seen = map.entry(key.to_owned()).or_insert(0);
            *seen += 1;
            *seen
        };
        if seen <= n {
            status(code)
        } else {
            text(StatusCode::OK, "ok")
        }
    }

    /// Answers 101 and runs the echo on the upgraded connection in the origin's task group.
    fn websocket(&self, mut req: Request<Incoming>) -> Response<Body> {
        let headers = req.headers();
        let is_upgrade = req.version() == Version::HTTP_11
            && has_token(headers, &UPGRADE, "websocket")
            && has_token(headers, &CONNECTION, "upgrade");
        let accept = match headers.get(SEC_WEBSOCKET_KEY) {
            Some(key) if is_upgrade => derive_accept_key(key.as_bytes()),
            _ => return text(StatusCode::BAD_REQUEST, "expected a websocket upgrade"),
        };
        let Ok(accept) = HeaderValue::from_str(&accept) else {
            return text(StatusCode::INTERNAL_SERVER_ERROR, "bad accept key");
        };
        let on_upgrade = hyper::upgrade::on(&mut req);
        self.tasks.spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => echo_websocket(upgraded).await,
                Err(err) => tracing::debug!(error = %err, "websocket upgrade failed"),
            }
        });
        let mut response = Response::new(Empty::new().boxed_unsync());
        *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let headers = response.headers_mut();
        headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(SEC_WEBSOCKET_ACCEPT, accept);
        response
    }
}

async fn echo(req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let Ok(body_len) = count_body(body).await else {
        return text(StatusCode::BAD_REQUEST, "failed to read request body");
    };
    let mut headers = Map::new();
    for name in parts.headers.keys() {
        let joined = parts
            .headers
            .get_all(name)
            .iter()
            .map(|value| String::from_utf8_lossy(value.as_bytes()))
            .collect::<Vec<_>>()
            .join(", ");
        headers.insert(name.as_str().to_owned(), Value::String(joined));
    }
    let path = parts
        .uri
        .path_and_query()
        .map_or_else(|| parts.uri.path(), |pq| pq.as_str());
    let report = json!({
        "method": parts.method.as_str(),
        "path": path,
        "authority": parts.uri.authority().map(|a| a.as_str()),
        "headers": headers,
        "body_len": body_len,
        "version": format!("{:?}", parts.version),
    });
    let mut response = full(StatusCode::OK, report.to_string());
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn status(code: &str) -> Response<Body> {
    match code
        .parse::<u16>()
        .ok()
        .filter(|code| (200..=599).contains(code))
        .and_then(|code| StatusCode::from_u16(code).ok())
    {
        Some(status) => text(status, format!("status {}", status.as_u16())),
        None => text(StatusCode::BAD_REQUEST, "status must be 200..=599"),
    }
}

async fn slow(ms: &str) -> Response<Body> {
    let Ok(ms) = ms.parse::<u64>() else {
        return text(StatusCode::BAD_REQUEST, "bad delay");
    };
    tokio::time::sleep(Duration::from_millis(ms)).await;
    text(StatusCode::OK, "slow")
}

/// Streams exactly `len` bytes without buffering them; hyper sends it chunked (HTTP/1.1).
fn stream_bytes(len: &str) -> Response<Body> {
    let Ok(len) = len.parse::<u64>() else {
        return text(StatusCode::BAD_REQUEST, "bad length");
    };
    let chunks = stream::unfold(len, |left| async move {
        if left == 0 {
            return None;
        }
        let n = usize::try_from(left).map_or(STREAM_CHUNK, |left| left.min(STREAM_CHUNK));
        let chunk = Bytes::from_static(&STREAM_BYTES[..n]);
        Some((Ok(Frame::data(chunk)), left - n as u64))
    });
    let mut response = Response::new(StreamBody::new(chunks).boxed_unsync());
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    response
}

/// `{chunks}/{ms}`: a line every `ms` milliseconds after the headers.
fn drip(spec: &str) -> Response<Body> {
    let Some((Ok(chunks), Ok(ms))) = spec
        .split_once('/')
        .map(|(c, m)| (c.parse::<u32>(), m.parse::<u64>()))
    else {
        return text(StatusCode::BAD_REQUEST, "expected /drip/{chunks}/{ms}");
    };
    let lines = stream::unfold(chunks, move |left| async move {
        if left == 0 {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(ms)).await;
        Some((Ok(Frame::data(Bytes::from_static(b"tick\n"))), left - 1))
    });
    Response::new(StreamBody::new(lines).boxed_unsync())
}

async fn upload(req: Request<Incoming>) -> Response<Body> {
    match count_body(req.into_body()).await {
        Ok(len) => text(StatusCode::OK, len.to_string()),
        Err(_) => text(StatusCode::BAD_REQUEST, "failed to read request body"),
    }
}

fn trailers() -> Response<Body> {
    let mut trailers = HeaderMap::new();
    trailers.insert("x-trailer", HeaderValue::from_static("yes"));
    let frames = stream::iter([
        Ok(Frame::data(Bytes::from_static(b"ok"))),
        Ok(Frame::trailers(trailers)),
    ]);
    let mut response = Response::new(StreamBody::new(frames).boxed_unsync());
    // HTTP/1.1 only sends trailers that the response declares up front.
    response
        .headers_mut()
        .insert(TRAILER, HeaderValue::from_static("x-trailer"));
    response
}

async fn echo_websocket(upgraded: Upgraded) {
    let mut ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
    while let Some(message) = ws.next().await {
        match message {
            Ok(message @ (Message::Text(_) | Message::Binary(_))) => {
                if ws.send(message).await.is_err() {
                    break;
                }
            }
            // Pings and closes are answered by tungstenite itself on the next poll.
            Ok(_) => {}
            Err(err) => {
                tracing::debug!(error = %err, "websocket echo ended");
                break;
            }
        }
    }
}

/// Reads a body frame by frame, counting data bytes without keeping them.
async fn count_body(mut body: Incoming) -> Result<u64, hyper::Error> {
    let mut len = 0;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            len += data.len() as u64;
        }
    }
    Ok(len)
}

/// Whether a comma-separated header contains `token` (case-insensitive).
fn has_token(headers: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|item| item.trim().eq_ignore_ascii_case(token))
}

fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Full::new(body.into()).boxed_unsync());
    *response.status_mut() = status;
    response
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = full(status, body);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    response
}

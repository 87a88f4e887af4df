//! Request and response bodies as they pass through the proxy.
//!
//! Bodies are streamed frame by frame, never buffered whole. The response body carries the
//! exchange's telemetry ([`Exchange`]) and, for HTTP/1, the pooled upstream connection: when
//! the last frame has passed, the exchange is recorded and the connection returns to the
//! pool. A body dropped early (client gone) records the exchange and closes the connection.

use super::exchange::Exchange;
use crate::resilience::replay::{BoxError, ReplayBody};
use crate::upstream::pool::H1Conn;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

/// A request body forwarded upstream, counting its bytes when someone wants to know.
pub struct RequestBody {
    inner: Option<Incoming>,
    bytes: Option<Arc<AtomicU64>>,
    /// One attempt's view of a body kept for retries (then `inner` is `None`).
    replay: Option<ReplayBody>,
}

impl RequestBody {
    /// Wraps a received body; `bytes`, when given, accumulates the data bytes that pass.
    pub fn new(inner: Incoming, bytes: Option<Arc<AtomicU64>>) -> Self {
        Self {
            inner: Some(inner),
            bytes,
            replay: None,
        }
    }

    /// An attempt's body of a request that may be retried (see [`crate::resilience::replay`]).
    pub fn replay(body: ReplayBody) -> Self {
        Self {
            inner: None,
            bytes: None,
            replay: Some(body),
        }
    }

    /// No body (requests the proxy makes itself).
    pub fn empty() -> Self {
        Self {
            inner: None,
            bytes: None,
            replay: None,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(replay) = self.replay.as_mut() {
            return replay.poll_next(cx);
        }
        let Some(inner) = self.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let res = ready!(Pin::new(inner).poll_frame(cx));
        if let (Some(Ok(frame)), Some(bytes)) = (&res, &self.bytes) {
            if let Some(data) = frame.data_ref() {
                bytes.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        Poll::Ready(res.map(|r| r.map_err(BoxError::from)))
    }

    fn is_end_stream(&self) -> bool {
        if let Some(replay) = &self.replay {
            return replay.is_end();
        }
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        if let Some(replay) = &self.replay {
            return replay.size_hint();
        }
        self.inner
            .as_ref()
            .map_or_else(|| SizeHint::with_exact(0), Body::size_hint)
    }
}

enum Inner {
    Upstream(Incoming),
    Full(Option<Bytes>),
}

/// A response body sent downstream: the upstream's, or one the proxy made up.
pub struct ResponseBody {
    inner: Inner,
    exchange: Option<Box<Exchange>>,
    pooled: Option<H1Conn>,
}

impl ResponseBody {
    /// The upstream's body, with the exchange to record and the connection to release.
    pub fn upstream(
        body: Incoming,
        exchange: Option<Box<Exchange>>,
        pooled: Option<H1Conn>,
    ) -> Self {
        let mut b = Self {
            inner: Inner::Upstream(body),
            exchange,
            pooled,
        };
        if b.inner_end() {
            b.complete(true);
        }
        b
    }

    /// A complete body made by the proxy (errors, admin pages).
    pub fn full(data: impl Into<Bytes>, exchange: Option<Box<Exchange>>) -> Self {
        let data = data.into();
        let mut b = Self {
            inner: Inner::Full((!data.is_empty()).then_some(data)),
            exchange,
            pooled: None,
        };
        if b.inner_end() {
            b.complete(true);
        }
        b
    }

    /// An empty body.
    pub fn empty() -> Self {
        Self::full(Bytes::new(), None)
    }

    fn inner_end(&self) -> bool {
        match &self.inner {
            Inner::Upstream(b) => b.is_end_stream(),
            Inner::Full(d) => d.is_none(),
        }
    }

    fn complete(&mut self, clean: bool) {
        if let Some(ex) = self.exchange.take() {
            (*ex).finish();
        }
        if let Some(conn) = self.pooled.take() {
            if clean {
                conn.release();
            }
        }
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let res = match &mut this.inner {
            Inner::Upstream(b) => ready!(Pin::new(b).poll_frame(cx)),
            Inner::Full(d) => d.take().map(|d| Ok(Frame::data(d))),
        };
        match &res {
            Some(Ok(frame)) => {
                if let Some(ex) = this.exchange.as_mut() {
                    if let Some(data) = frame.data_ref() {
                        ex.bytes_out += data.len() as u64;
                    } else if let Some(trailers) = frame.trailers_ref() {
                        if let Some(code) = super::headers::grpc_status(trailers) {
                            ex.grpc_status = Some(code);
                        }
                    }
                }
                if this.inner_end() {
                    this.complete(true);
                }
            }
            Some(Err(_)) => this.complete(false),
            None => this.complete(true),
        }
        Poll::Ready(res)
    }

    fn is_end_stream(&self) -> bool {
        self.inner_end()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Upstream(b) => b.size_hint(),
            Inner::Full(d) => SizeHint::with_exact(d.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // Not read to the end: record what we know; the connection is not reusable.
        self.complete(false);
    }
}

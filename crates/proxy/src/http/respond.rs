//! Responses the proxy makes itself (errors), always with a body saying why.

use super::body::ResponseBody;
use super::exchange::Exchange;
use http::{header, HeaderValue, Response, StatusCode};

/// Header naming which part of the proxy produced an error response.
pub const PROXY_ERROR_HEADER: &str = "x-trellis-error";

/// A plain-text response from the proxy, recorded in the exchange's telemetry when given.
pub fn error(
    status: StatusCode,
    reason: &'static str,
    message: String,
    exchange: Option<Box<Exchange>>,
) -> Response<ResponseBody> {
    let exchange = exchange.map(|mut ex| {
        ex.status = status.as_u16();
        ex
    });
    let mut body = message.into_bytes();
    body.push(b'\n');
    let mut resp = Response::new(ResponseBody::full(body, exchange));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    h.insert(PROXY_ERROR_HEADER, HeaderValue::from_static(reason));
    resp
}

/// A trailers-only gRPC error from the proxy (HTTP 200, `grpc-status` and a percent-encoded
/// `grpc-message` in the headers), recorded in the exchange's telemetry when given.
pub fn grpc_error(
    code: u32,
    message: &'static str,
    reason: &'static str,
    exchange: Option<Box<Exchange>>,
) -> Response<ResponseBody> {
    let exchange = exchange.map(|mut ex| {
        ex.status = 200;
        ex.grpc_status = u16::try_from(code).ok();
        ex
    });
    let mut resp = Response::new(ResponseBody::full(Vec::new(), exchange));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert("grpc-status", HeaderValue::from(code));
    h.insert("grpc-message", HeaderValue::from_static(message));
    h.insert(PROXY_ERROR_HEADER, HeaderValue::from_static(reason));
    resp
}

/// Whether a request is gRPC (its errors must be gRPC statuses).
pub fn is_grpc<B>(req: &http::Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/grpc"))
}

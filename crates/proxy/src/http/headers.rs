//! Header rules a forwarding proxy must apply: hop-by-hop headers (RFC 9110 §7.6.1),
//! `x-request-id` and the W3C trace id.

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// The request id header generated when absent and propagated upstream.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Set by the sending proxy when it carries an HTTP/1.1 request over the HTTP/2 mesh hop, so
/// the receiving proxy gives the app HTTP/1.1 again. Never reaches an app.
pub static ORIG_PROTO: HeaderName = HeaderName::from_static("trellis-orig-proto");

/// Marks a request as originally HTTP/1.1.
pub fn mark_orig_proto_h1(headers: &mut HeaderMap) {
    headers.insert(ORIG_PROTO.clone(), HeaderValue::from_static("HTTP/1.1"));
}

/// Removes the original-protocol mark; true when it said HTTP/1.1 and came from a mesh peer
/// (`trusted`): a plaintext client cannot choose the app's protocol with it.
pub fn take_orig_proto_h1(headers: &mut HeaderMap, trusted: bool) -> bool {
    headers
        .remove(&ORIG_PROTO)
        .is_some_and(|v| trusted && v == "HTTP/1.1")
}

/// The header telling the app who called (Envoy's and Istio's format).
pub static XFCC: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// On inbound requests: drops any client-supplied `x-forwarded-client-cert` (so it cannot be
/// spoofed) and, for an mTLS caller, sets `By=<this workload>;URI=<caller>`.
pub fn set_forwarded_client_cert(
    headers: &mut HeaderMap,
    local: Option<&str>,
    peer: Option<&trellis_identity::SpiffeId>,
) {
    headers.remove(&XFCC);
    if let Some(peer) = peer {
        let value = match local {
            Some(by) => format!("By={by};URI={peer}"),
            None => format!("URI={peer}"),
        };
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(XFCC.clone(), v);
        }
    }
}

static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// Whether `name` describes one connection and is never forwarded (RFC 9110 §7.6.1).
fn is_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::TRANSFER_ENCODING
        || name == header::UPGRADE
        || name == header::TE
        || name == header::PROXY_AUTHENTICATE
        || name == header::PROXY_AUTHORIZATION
        || name == PROXY_CONNECTION
        || name == KEEP_ALIVE
}

/// Whether an HTTP/1 request asks for a protocol upgrade (e.g. WebSocket).
pub fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_has(headers, "upgrade")
}

fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop headers and every header named in `Connection`.
///
/// `TE: trailers` survives (gRPC over HTTP/2 requires it). With `keep_upgrade` the
/// `Upgrade` header and `Connection: upgrade` are kept so an upgrade can pass through.
/// The common case, no such header at all, costs one pass over the names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    if !keep_upgrade && !headers.keys().any(is_hop_by_hop) {
        return;
    }
    let te_trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
    // Usually one Connection line: take it without collecting; several are all honoured.
    let lines: Vec<HeaderValue> = if headers.get_all(header::CONNECTION).iter().nth(1).is_some() {
        headers
            .get_all(header::CONNECTION)
            .iter()
            .cloned()
            .collect()
    } else {
        Vec::new()
    };
    let single = headers.remove(header::CONNECTION);
    for value in single.iter().chain(lines.iter()) {
        let Ok(value) = value.to_str() else { continue };
        for token in value.split(',') {
            match HeaderName::from_bytes(token.trim().as_bytes()) {
                Ok(name) if !(keep_upgrade && name == header::UPGRADE) => {
                    headers.remove(name);
                }
                _ => {}
            }
        }
    }
    for name in [
        &header::TRANSFER_ENCODING,
        &header::TE,
        &header::PROXY_AUTHENTICATE,
        &header::PROXY_AUTHORIZATION,
        &PROXY_CONNECTION,
        &KEEP_ALIVE,
    ] {
        headers.remove(name);
    }
    if !keep_upgrade {
        headers.remove(header::UPGRADE);
    }
    if te_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Returns the request's `x-request-id`, generating and inserting one when absent or empty.
pub fn ensure_request_id(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(v) = headers.get(&X_REQUEST_ID) {
        if !v.is_empty() {
            return v.clone();
        }
    }
    let id = uuid::Uuid::new_v4();
    let mut buf = uuid::Uuid::encode_buffer();
    let v = HeaderValue::from_str(id.hyphenated().encode_lower(&mut buf))
        .unwrap_or_else(|_| HeaderValue::from_static("invalid"));
    headers.insert(X_REQUEST_ID.clone(), v.clone());
    v
}

/// The trace id of a W3C `traceparent` header (`00-<trace id>-<span id>-<flags>`).
pub fn trace_id(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(&TRACEPARENT)?.to_str().ok()?;
    let mut parts = v.split('-');
    let _version = parts.next()?;
    let id = parts.next()?;
    (id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())).then_some(id)
}

/// The `grpc-status` code in a header map (response headers or trailers).
pub fn grpc_status(headers: &HeaderMap) -> Option<u16> {
    headers
        .get(&GRPC_STATUS)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_headers() {
        let mut h = map(&[
            ("connection", "keep-alive, x-private"),
            ("keep-alive", "timeout=5"),
            ("x-private", "1"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic x"),
            ("te", "gzip"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn every_connection_line_is_honoured() {
        let mut h = map(&[
            ("connection", "close"),
            ("connection", "x-secret"),
            ("x-secret", "1"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
    }

    #[test]
    fn keeps_te_trailers_and_upgrade_when_asked() {
        let mut h = map(&[
            ("te", "trailers"),
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
        ]);
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    #[test]
    fn request_id_is_kept_or_generated() {
        let mut h = map(&[("x-request-id", "abc")]);
        assert_eq!(ensure_request_id(&mut h), "abc");
        let mut h = HeaderMap::new();
        let id = ensure_request_id(&mut h);
        assert_eq!(id.len(), 36);
        assert_eq!(h[&X_REQUEST_ID], id);
    }

    #[test]
    fn parses_trace_and_grpc_status() {
        let h = map(&[
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("grpc-status", "14"),
        ]);
        assert_eq!(trace_id(&h), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(grpc_status(&h), Some(14));
        assert_eq!(trace_id(&map(&[("traceparent", "garbage")])), None);
    }
}

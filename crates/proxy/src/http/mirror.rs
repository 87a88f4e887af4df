//! Traffic mirroring (Istio `mirror` / `mirrorPercentage` / `mirrors`): fire-and-forget
//! copies of a route's requests to another destination.
//!
//! Each mirror of the matched route is drawn by its share. A drawn mirror gets the request's
//! head as forwarded (after the route's rewrites and header edits) with `-shadow` appended to
//! the authority's host, and its body: none, or the copy the replay buffer keeps
//! ([`Replay::copy_when_done`](crate::resilience::replay::Replay::copy_when_done), sent once the client's body has arrived whole). A body too
//! large for that buffer (over 64 KiB) is not mirrored, nor are upgrades and `CONNECT`.
//!
//! Copies go out from a task of their own that is not tracked: the client's exchange never
//! waits for them, nor does a drain. The whole copy (waiting for the body, connecting,
//! response head and body) is bounded by [`MIRROR_TIMEOUT`]; its response is read and
//! discarded, and failures are only logged at debug level. `trellis_mirrored_requests_total`
//! counts the copies sent, by mirror destination.

use super::body::RequestBody;
use super::forward::{send, set_upstream_target};
use super::headers;
use crate::resilience::replay::Copied;
use crate::route::{shadow_authority, Route};
use crate::upstream::Service;
use http::{header, Request};
use http_body_util::BodyExt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// The longest a copy may take, from the request's arrival to its response's end.
pub const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

/// The mirrors of `route` drawn for this request (none for upgrades).
pub(super) fn draw(route: Option<&Route>, upgrade: bool) -> Vec<Arc<Service>> {
    match route {
        Some(r) if !upgrade => r
            .mirrors
            .iter()
            .filter(|m| m.draw())
            .map(|m| m.cluster.clone())
            .collect(),
        _ => Vec::new(),
    }
}

/// The body a copy carries.
pub(super) enum MirrorBody {
    /// No body.
    Empty,
    /// The client's body, once it has all arrived (`None`: it cannot be copied).
    Kept(Pin<Box<dyn Future<Output = Option<Copied>> + Send>>),
}

/// Sends a copy of the request (`head`, `body`) to each of `mirrors`, in the background.
/// `was_h1`: the client spoke HTTP/1 (plaintext hops keep its version).
pub(super) fn spawn(
    mirrors: Vec<Arc<Service>>,
    head: &http::request::Parts,
    body: MirrorBody,
    was_h1: bool,
) {
    if mirrors.is_empty() {
        return;
    }
    let mut head = head.clone();
    let authority = head
        .uri
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            head.headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .map(|a| shadow_authority(&a));
    if let Some(v) = authority
        .as_deref()
        .and_then(|a| http::HeaderValue::from_str(a).ok())
    {
        if head.headers.contains_key(header::HOST) {
            head.headers.insert(header::HOST, v);
        }
    }
    tokio::spawn(async move {
        let copies = async {
            let body = match body {
                MirrorBody::Empty => None,
                MirrorBody::Kept(copy) => match copy.await {
                    Some(b) => Some(b),
                    None => {
                        tracing::debug!("request body not mirrored: not kept whole");
                        return;
                    }
                },
            };
            let sends = mirrors.into_iter().map(|cluster| {
                let head = head.clone();
                let body = body.clone();
                let authority = authority.as_deref();
                async move {
                    if let Err(e) = copy(&cluster, head, body, authority, was_h1).await {
                        tracing::debug!(mirror = %cluster.key, error = %e, "mirrored request failed");
                    }
                }
            });
            futures_util::future::join_all(sends).await;
        };
        if tokio::time::timeout(MIRROR_TIMEOUT, copies).await.is_err() {
            tracing::debug!("mirrored request timed out");
        }
    });
}

/// Sends one copy to an endpoint of `cluster` and reads its response to the end.
async fn copy(
    cluster: &Service,
    head: http::request::Parts,
    body: Option<Copied>,
    authority: Option<&str>,
    was_h1: bool,
) -> Result<(), String> {
    let _admitted = cluster.admit().await.map_err(|o| o.to_string())?;
    let mut req = Request::from_parts(head, ());
    let endpoint = cluster
        .pick(cluster.hash_key(&req, None))
        .cloned()
        .ok_or("no endpoints")?;
    let h2 = endpoint.is_mtls() || !was_h1;
    if endpoint.is_mtls() && was_h1 {
        headers::mark_orig_proto_h1(req.headers_mut());
    }
    set_upstream_target(&mut req, authority, endpoint.addr(), h2)?;
    let body = body.map_or_else(RequestBody::empty, |b| RequestBody::replay(b.body()));
    let req = req.map(|()| body);
    cluster.stats.mirrored();
    let in_flight = endpoint.stats().start();
    let (resp, pooled) = send(&endpoint, req, h2).await.map_err(|e| e.to_string())?;
    let latency = in_flight.started().elapsed();
    in_flight.finish(latency);
    let mut body = resp.into_body();
    while let Some(frame) = body.frame().await {
        frame.map_err(|e| e.to_string())?;
    }
    if let Some(conn) = pooled {
        conn.release();
    }
    Ok(())
}

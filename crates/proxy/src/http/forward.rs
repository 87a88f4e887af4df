//! Forwarding one HTTP request to an upstream service.
//!
//! Resolve the destination (fixed per listener, or by host on the HTTP proxy listener),
//! apply the header rules, pick an endpoint, send over a pooled connection of the same HTTP
//! version as the client's, and stream the response back wrapped in telemetry. `CONNECT`
//! tunnels and HTTP/1 upgrades (WebSocket) become byte pipes once both sides agree.

use super::body::{RequestBody, ResponseBody};
use super::exchange::{Exchange, LogFields};
use super::headers;
use super::mirror;
use super::respond;
use crate::resilience::replay::Replay;
use crate::resilience::retry::Outcome;
use crate::route::cors::Preflight;
use crate::route::matcher::{MatchContext, Source};
use crate::route::{Abort, Action, Decision, RedirectPort, Route, VirtualHost};
use crate::telemetry::metrics::{Metrics, Peer};
use crate::telemetry::AccessLog;
use crate::tls::UpstreamUse;
use crate::upstream::pool::{ConnectError, EndpointConns, H1Conn};
use crate::upstream::{Service, ServiceTable};
use arc_swap::ArcSwap;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{header, HeaderValue, Method, Request, Response, StatusCode, Uri, Version};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Instant, SystemTime};
use tokio_util::task::TaskTracker;
use trellis_api::names::ServiceKey;

/// Where a listener's requests go.
pub enum Destination {
    /// Always this host (the local app of an inbound port).
    Fixed(Arc<VirtualHost>),
    /// This upstream service, as the current config knows it (a per-upstream port).
    Upstream(ServiceKey),
    /// The service named by the request's host (the outbound HTTP proxy listener).
    ByHost,
}

impl Destination {
    /// The virtual host of a fixed or upstream destination in the current `services`.
    pub fn host(&self, services: &ServiceTable) -> Result<Arc<VirtualHost>, String> {
        match self {
            Destination::Fixed(s) => Ok(s.clone()),
            Destination::Upstream(key) => services
                .get(key)
                .cloned()
                .ok_or_else(|| format!("no upstream service {key} is configured")),
            Destination::ByHost => Err("this listener routes by host".into()),
        }
    }
}

/// What the forwarder knows about the client connection.
pub struct ClientConn {
    /// Client socket address.
    pub addr: SocketAddr,
    /// The calling service, when known.
    pub source: Peer,
    /// Whether the connection is mTLS.
    pub tls: bool,
    /// The peer's verified identity (mTLS).
    pub identity: Option<trellis_identity::SpiffeId>,
    /// The local address the client connected to.
    pub local: Option<SocketAddr>,
    /// The Istio principal of `identity`, made once per connection (for authorization).
    pub principal: std::sync::OnceLock<Option<Box<str>>>,
}

impl ClientConn {
    /// The Istio principal of the peer (`<trust domain>/ns/<ns>/sa/<sa>`), if mTLS.
    pub fn principal(&self) -> Option<&str> {
        self.principal
            .get_or_init(|| {
                self.identity
                    .as_ref()
                    .map(|id| id.principal().into_boxed_str())
            })
            .as_deref()
    }
}

/// Proxy-wide parts the forwarder uses.
pub struct Shared {
    /// Access log sink.
    pub access_log: AccessLog,
    /// Metrics (for tunnels' TCP counters).
    pub metrics: Arc<Metrics>,
    /// Tracks tunnels so a drain waits for them.
    pub tracker: TaskTracker,
    /// The upstream services of the current config (swapped when a new config arrives).
    pub services: ArcSwap<ServiceTable>,
    /// This workload's namespace and labels (route `sourceNamespace` / `sourceLabels`).
    pub workload: (String, std::collections::BTreeMap<String, String>),
    /// JWKS of the RequestAuthentication issuers, kept across config versions.
    pub jwks: crate::policy::jwt::JwksCache,
    /// The workload's identity and inbound policies (swapped when a new config arrives).
    pub inbound: ArcSwap<crate::policy::inbound::Inbound>,
}

impl Shared {
    /// This workload as routes' `sourceLabels` / `sourceNamespace` see it.
    pub fn source(&self) -> Source<'_> {
        Source {
            labels: &self.workload.1,
            namespace: &self.workload.0,
        }
    }
}

/// Forwards the requests of one listener.
pub struct Forwarder {
    /// Where requests go.
    pub destination: Destination,
    /// Whether this is an inbound listener: the workload's current identity and policies
    /// (`Shared::inbound`) apply to every request, on old connections too.
    pub inbound: bool,
    /// Proxy-wide parts.
    pub shared: Arc<Shared>,
}

/// Why an upstream exchange failed before a response head arrived.
#[derive(Debug, thiserror::Error)]
pub(super) enum SendError {
    #[error(transparent)]
    Connect(#[from] ConnectError),
    #[error("upstream {0}: {1}")]
    Upstream(SocketAddr, hyper::Error),
}

/// The host the request names: its URI authority, else its `Host` header.
pub(crate) fn authority_of<B>(req: &Request<B>) -> Option<&str> {
    req.uri()
        .authority()
        .map(Authority::as_str)
        .or_else(|| req.headers().get(header::HOST)?.to_str().ok())
}

impl Forwarder {
    /// Handles one request; never fails (errors become responses).
    pub async fn serve(
        self: Arc<Self>,
        client: Arc<ClientConn>,
        mut req: Request<Incoming>,
    ) -> Result<Response<ResponseBody>, Infallible> {
        let start = Instant::now();
        let inbound = self.inbound.then(|| self.shared.inbound.load_full());
        if let Some(inbound) = &inbound {
            if let Err(denied) = inbound.check_request(&mut req, &client, &self.shared.metrics) {
                return Ok(denied);
            }
        }
        let vhost = match &self.destination {
            Destination::Fixed(s) => s.clone(),
            Destination::Upstream(_) => match self.destination.host(&self.shared.services.load()) {
                Ok(s) => s,
                Err(e) => {
                    return Ok(respond::error(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "unknown-service",
                        format!("trellis: {e}"),
                        None,
                    ))
                }
            },
            Destination::ByHost => {
                let table = self.shared.services.load();
                let Some(host) = authority_of(&req) else {
                    return Ok(respond::error(
                        StatusCode::BAD_REQUEST,
                        "no-host",
                        "request names no host".into(),
                        None,
                    ));
                };
                match table.resolve(host) {
                    Ok(s) => s.clone(),
                    Err(e) => {
                        return Ok(respond::error(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "unknown-service",
                            format!("trellis: {e}"),
                            None,
                        ))
                    }
                }
            }
        };
        if req.method() == Method::CONNECT {
            let port = authority_of(&req).and_then(|a| split_host_port(a).1);
            let Some((cluster, _)) = vhost.tcp_cluster(port, &self.shared.source()) else {
                return Ok(respond::error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "no-route",
                    format!(
                        "trellis: the TCP route for {} has no reachable destination",
                        vhost.key
                    ),
                    None,
                ));
            };
            let cluster = cluster.clone();
            return Ok(self.tunnel(cluster, req).await);
        }
        Ok(self.route(vhost, client, req, start).await)
    }

    /// Routes the request (VirtualService routes of its host), then forwards it or answers.
    async fn route(
        &self,
        vhost: Arc<VirtualHost>,
        client: Arc<ClientConn>,
        req: Request<Incoming>,
        start: Instant,
    ) -> Response<ResponseBody> {
        if vhost.routes.is_empty() {
            return self
                .forward(&vhost.cluster, None, None, client, req, start)
                .await;
        }
        let authority = authority_of(&req).unwrap_or_default().to_string();
        let (mut parts, body) = req.into_parts();
        let (host, port) = split_host_port(&authority);
        let path = parts.uri.path().to_string();
        let cx = MatchContext {
            path: &path,
            authority: host,
            port,
            source: self.shared.source(),
        };
        let decision = vhost.decide(&parts, &cx);
        // CORS (the route's `corsPolicy`): preflights from allowed origins are answered
        // here; responses to allowed origins get their headers at the end.
        let cors = match &decision {
            Decision::Forward { route, .. } => route.and_then(|r| r.cors.as_ref()),
            Decision::Answer(r) => r.cors.as_ref(),
            Decision::NoRoute => None,
        };
        if let Some(c) = cors {
            if let Preflight::Answer(headers) = c.preflight(&parts.method, &parts.headers) {
                let mut ex = local_exchange(&vhost.cluster, &client, start);
                ex.status = 200;
                let mut resp = Response::new(ResponseBody::full(Vec::new(), Some(ex)));
                resp.headers_mut().extend(headers);
                return resp;
            }
        }
        // Only the allowed origin is kept for the response, not the request's headers.
        let cors = cors.and_then(|c| Some((c, c.allowed_origin(&parts.headers)?.clone())));
        let decorate = |mut resp: Response<ResponseBody>| {
            if let Some((c, origin)) = &cors {
                c.decorate(origin, resp.headers_mut());
            }
            resp
        };
        let (cluster, route, backend_headers) = match decision {
            Decision::NoRoute => {
                return respond::error(
                    StatusCode::NOT_FOUND,
                    "no-route",
                    format!("trellis: no route of {} matches", vhost.key),
                    Some(local_exchange(&vhost.cluster, &client, start)),
                )
            }
            Decision::Answer(route) => {
                let ex = local_exchange(&vhost.cluster, &client, start);
                return decorate(answer(route, &parts, &cx, &authority, ex));
            }
            Decision::Forward {
                cluster,
                route,
                backend_headers,
            } => (cluster.clone(), route, backend_headers),
        };
        let Some(route) = route else {
            return self
                .forward(
                    &cluster,
                    None,
                    None,
                    client,
                    Request::from_parts(parts, body),
                    start,
                )
                .await;
        };
        if let Some(fault) = &route.fault {
            if let Some(d) = fault.delay() {
                tokio::time::sleep(d).await;
            }
            if let Some(abort) = fault.abort() {
                return decorate(aborted(abort, local_exchange(&cluster, &client, start)));
            }
        }
        if let Some(new_path) = route.rewritten_path(&path, &parts, &cx) {
            let query = parts.uri.query().map(str::to_string);
            super::set_path(&mut parts.uri, &new_path, query.as_deref());
        }
        if let Some(a) = route.rewrite.as_ref().and_then(|r| r.authority.clone()) {
            if parts.uri.authority().is_some() {
                let mut uri = parts.uri.clone().into_parts();
                uri.authority = Authority::try_from(a.as_bytes()).ok();
                if let Ok(u) = Uri::from_parts(uri) {
                    parts.uri = u;
                }
            }
            parts.headers.insert(header::HOST, a);
        }
        route.headers.request.apply(&mut parts.headers);
        if let Some(h) = backend_headers {
            h.request.apply(&mut parts.headers);
        }
        let response_edits = [
            Some(&route.headers.response),
            backend_headers.map(|h| &h.response),
        ];
        let mut resp = self
            .forward(
                &cluster,
                Some(route),
                route.timeout,
                client,
                Request::from_parts(parts, body),
                start,
            )
            .await;
        for e in response_edits.into_iter().flatten() {
            e.apply(resp.headers_mut());
        }
        decorate(resp)
    }

    async fn forward(
        &self,
        service: &Arc<Service>,
        route: Option<&Route>,
        route_timeout: Option<std::time::Duration>,
        client: Arc<ClientConn>,
        mut req: Request<Incoming>,
        start: Instant,
    ) -> Response<ResponseBody> {
        // Circuit breaking: over a connectionPool limit, 503 at once.
        let admitted = match service.admit().await {
            Ok(permit) => permit,
            Err(o) => {
                let msg = format!("trellis: service {}: {o}", service.key);
                return respond::error(StatusCode::SERVICE_UNAVAILABLE, o.reason(), msg, None);
            }
        };
        let request_id = headers::ensure_request_id(req.headers_mut());
        if self.inbound {
            let inbound = self.shared.inbound.load();
            headers::set_forwarded_client_cert(
                req.headers_mut(),
                inbound.identity.as_deref(),
                client.identity.as_ref(),
            );
        }
        let upgrade = req.version() < Version::HTTP_2 && headers::is_upgrade(req.headers());
        let downstream_version = req.version();
        let authority = authority_of(&req).map(str::to_string);
        let crate::upstream::Picked {
            endpoint,
            set_cookie,
        } = service.pick_for(&req, client.addr.ip());

        let mut exchange = Box::new(Exchange {
            stats: service.stats.clone(),
            source: client.source.clone(),
            tls: client.tls,
            start,
            status: 0,
            grpc_status: None,
            bytes_out: 0,
            bytes_in: None,
            log: None,
            admission: admitted,
        });
        if self.shared.access_log.enabled() {
            exchange.log = Some(Box::new(LogFields {
                log: self.shared.access_log.clone(),
                ts: SystemTime::now(),
                source: if client.source.service.as_ref() == crate::telemetry::metrics::UNKNOWN {
                    client.addr.to_string()
                } else {
                    format!("{}.{}", client.source.service, client.source.namespace)
                },
                method: req.method().to_string(),
                authority: authority.clone().unwrap_or_default(),
                path: req
                    .uri()
                    .path_and_query()
                    .map_or_else(|| "/".into(), |p| p.to_string()),
                request_id: request_id.to_str().unwrap_or_default().to_string(),
                trace_id: headers::trace_id(req.headers())
                    .unwrap_or_default()
                    .to_string(),
                upstream: endpoint
                    .as_ref()
                    .map(|e| e.addr().to_string())
                    .unwrap_or_default(),
                route: route.map(|r| r.name.to_string()).unwrap_or_default(),
            }));
        }

        let Some(endpoint) = endpoint else {
            return respond::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "no-endpoints",
                format!("trellis: service {} has no endpoints", service.key),
                Some(exchange),
            );
        };

        let on_client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        headers::strip_hop_by_hop(req.headers_mut(), upgrade);
        // The mesh hop is HTTP/2 (one multiplexed mTLS connection) except for upgrades; the
        // receiving proxy restores HTTP/1.1 for the app when the client spoke it.
        let was_h1 = headers::take_orig_proto_h1(req.headers_mut(), client.tls)
            || downstream_version < Version::HTTP_2;
        // Request bytes are only reported in the access log: count them only then.
        let bytes_in = exchange.log.is_some().then(|| Arc::new(AtomicU64::new(0)));
        exchange.bytes_in = bytes_in.clone();

        // Retries: never for upgrades, nor for bodies too large to keep for replay.
        let retry = route
            .and_then(|r| r.retry.as_ref())
            .filter(|_| !upgrade && Replay::fits(&http_body::Body::size_hint(req.body())));
        let (head, body) = req.into_parts();
        let method = head.method.clone();
        let grpc = head
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        // Mirrors get the body kept for replay: bodies too large for it are not mirrored.
        let mirrors = mirror::draw(route, upgrade);
        let empty = http_body::Body::is_end_stream(&body);
        let mirror_kept =
            !mirrors.is_empty() && !empty && Replay::fits(&http_body::Body::size_hint(&body));
        let (replay, mut body) = match retry {
            Some(_) => {
                service.retry_budget.deposit();
                (Some(Replay::new(body, bytes_in.clone())), None)
            }
            None if mirror_kept => (Some(Replay::new(body, bytes_in.clone())), None),
            None => (None, Some(body)),
        };
        let mirror_body = match &replay {
            _ if empty => Some(mirror::MirrorBody::Empty),
            Some(r) => Some(mirror::MirrorBody::Kept(Box::pin(r.copy_when_done()))),
            None => None,
        };
        if let Some(b) = mirror_body.filter(|_| !mirrors.is_empty()) {
            mirror::spawn(mirrors, &head, b, was_h1);
        }
        let mut head = Some(head);
        let deadline = route_timeout
            .or(service.timeout)
            .map(|t| (t, tokio::time::Instant::now() + t));
        let mut endpoint = endpoint;
        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut retries = 0u32;
        let last = loop {
            // Each attempt sends a copy of the head (the original when there is no retry).
            let parts = if replay.is_some() {
                head.clone()
            } else {
                head.take()
            };
            let (Some(parts), body) = (
                parts,
                match (&replay, body.take()) {
                    (Some(r), _) => RequestBody::replay(r.attempt()),
                    (None, Some(b)) => RequestBody::new(b, bytes_in.clone()),
                    (None, None) => RequestBody::empty(),
                },
            ) else {
                break Attempt::Failed(None);
            };
            let mut req = Request::from_parts(parts, body);
            let h2 = if endpoint.is_mtls() {
                !upgrade
            } else {
                !was_h1
            };
            if endpoint.is_mtls() && h2 && was_h1 {
                headers::mark_orig_proto_h1(req.headers_mut());
            }
            exchange.tls = client.tls || endpoint.is_mtls();
            if let Err(msg) =
                set_upstream_target(&mut req, authority.as_deref(), endpoint.addr(), h2)
            {
                return respond::error(StatusCode::BAD_REQUEST, "bad-target", msg, Some(exchange));
            }
            tried.push(endpoint.addr());

            // Time to the response head feeds the balancer; an exchange that fails or times
            // out drops the guard, which records the time it took.
            let in_flight = endpoint.stats().start();
            let sent = send(&endpoint, req, h2);
            let per_try = retry
                .and_then(|p| p.per_try_timeout)
                .map(|t| tokio::time::Instant::now() + t);
            let until = match (deadline.map(|(_, d)| d), per_try) {
                (Some(d), Some(p)) => Some(d.min(p)),
                (d, p) => d.or(p),
            };
            let result = match until {
                Some(u) => tokio::time::timeout_at(u, sent).await.ok(),
                None => Some(sent.await),
            };
            let mut latency = None;
            let (attempt, outcome) = match result {
                Some(Ok((resp, pooled))) => {
                    let took = in_flight.started().elapsed();
                    in_flight.finish(took);
                    latency = Some(took);
                    let outcome =
                        Outcome::Response(resp.status(), headers::grpc_status(resp.headers()));
                    (Attempt::Answered(resp, pooled), Some(outcome))
                }
                Some(Err(e)) => {
                    let outcome = outcome_of(&e);
                    (Attempt::Failed(Some(e)), outcome)
                }
                None => match deadline {
                    Some((t, d)) if tokio::time::Instant::now() >= d => {
                        return respond::error(
                            StatusCode::GATEWAY_TIMEOUT,
                            "upstream-timeout",
                            format!(
                                "trellis: service {} did not answer within {:?}",
                                service.key, t
                            ),
                            Some(exchange),
                        )
                    }
                    _ => {
                        latency = Some(in_flight.started().elapsed());
                        (Attempt::TimedOut, Some(Outcome::PerTryTimeout))
                    }
                },
            };
            service.report(&endpoint, outcome.into(), latency);
            let (Some(policy), Some(replay), Some(outcome)) = (retry, &replay, outcome) else {
                break attempt;
            };
            if retries >= policy.retries
                || !policy.retries_on(&method, grpc, outcome)
                || !replay.replayable()
            {
                break attempt;
            }
            if !service.retry_budget.try_withdraw() {
                service.stats.retry_budget_exhausted();
                break attempt;
            }
            let pause = policy.backoff(retries + 1);
            if deadline.is_some_and(|(_, d)| tokio::time::Instant::now() + pause >= d) {
                break attempt;
            }
            drop(attempt);
            tokio::time::sleep(pause).await;
            retries += 1;
            service.stats.retried();
            let next = head
                .as_ref()
                .and_then(|h| repick(service, h, client.addr.ip(), &tried));
            if let Some(next) = next {
                endpoint = next;
            }
            if let Some(log) = exchange.log.as_mut() {
                log.upstream = endpoint.addr().to_string();
            }
        };
        let (mut resp, pooled) = match last {
            Attempt::Answered(resp, pooled) => (resp, pooled),
            Attempt::Failed(Some(e)) => return upstream_error(service, e, Some(exchange)),
            Attempt::Failed(None) => {
                return respond::error(
                    StatusCode::BAD_GATEWAY,
                    "upstream-reset",
                    "trellis: request could not be sent".into(),
                    Some(exchange),
                )
            }
            Attempt::TimedOut => {
                return respond::error(
                    StatusCode::GATEWAY_TIMEOUT,
                    "upstream-timeout",
                    format!(
                        "trellis: service {} did not answer within the per-try timeout",
                        service.key
                    ),
                    Some(exchange),
                )
            }
        };

        let status = resp.status();
        exchange.status = status.as_u16();
        exchange.grpc_status = headers::grpc_status(resp.headers());
        let pooled = if status == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(on_client) = on_client_upgrade {
                let on_upstream = hyper::upgrade::on(&mut resp);
                self.shared.tracker.spawn(async move {
                    let (client, upstream) = tokio::join!(on_client, on_upstream);
                    if let (Ok(c), Ok(u)) = (client, upstream) {
                        let _ = tokio::io::copy_bidirectional(
                            &mut TokioIo::new(c),
                            &mut TokioIo::new(u),
                        )
                        .await;
                    }
                });
            }
            None // the connection now belongs to the upgrade
        } else {
            headers::strip_hop_by_hop(resp.headers_mut(), false);
            pooled
        };
        if status != StatusCode::SWITCHING_PROTOCOLS {
            *resp.version_mut() = downstream_version;
        }
        if let Some(cookie) = set_cookie {
            resp.headers_mut().append(header::SET_COOKIE, cookie);
        }
        resp.map(|b| ResponseBody::upstream(b, Some(exchange), pooled))
    }

    /// `CONNECT host:port`: answer 200, then pipe bytes to an endpoint of the service.
    async fn tunnel(
        &self,
        service: Arc<Service>,
        mut req: Request<Incoming>,
    ) -> Response<ResponseBody> {
        let permit = match service.admit_connection() {
            Ok(p) => p,
            Err(o) => {
                return respond::error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    o.reason(),
                    format!("trellis: service {}: {o}", service.key),
                    None,
                )
            }
        };
        // Hashes the CONNECT request's header, cookie or query; not the client's address,
        // which is not at hand here (source-IP affinity picks at random for tunnels).
        let Some(endpoint) = service.pick(service.hash_key(&req, None)).cloned() else {
            return respond::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "no-endpoints",
                format!("trellis: service {} has no endpoints", service.key),
                None,
            );
        };
        // In flight while the tunnel lasts; its lifetime is no latency sample.
        let in_flight = endpoint.stats().start_untimed();
        let mut upstream = match endpoint.connect(UpstreamUse::Opaque).await {
            Ok(s) => s,
            Err(e) => return upstream_error(&service, SendError::Connect(e), None),
        };
        let on_upgrade = hyper::upgrade::on(&mut req);
        let metrics = self.shared.metrics.clone();
        let peer = service.peer.service.clone();
        self.shared.tracker.spawn(async move {
            let _conn = metrics.tcp_open("outbound", &peer);
            let _in_flight = in_flight;
            let _permit = permit;
            if let Ok(client) = on_upgrade.await {
                let _ =
                    tokio::io::copy_bidirectional(&mut TokioIo::new(client), &mut upstream).await;
            }
        });
        Response::new(ResponseBody::empty())
    }
}

/// Rewrites the request target for the upstream hop: origin-form plus `Host` for HTTP/1,
/// an absolute URI (authority kept) for HTTP/2.
pub(super) fn set_upstream_target<B>(
    req: &mut Request<B>,
    authority: Option<&str>,
    endpoint: SocketAddr,
    h2: bool,
) -> Result<(), String> {
    let path = req
        .uri()
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| PathAndQuery::from_static("/"));
    let authority = authority.map_or_else(|| endpoint.to_string(), str::to_string);
    if h2 {
        let uri = Uri::builder()
            .scheme(Scheme::HTTP)
            .authority(authority.as_str())
            .path_and_query(path)
            .build()
            .map_err(|e| format!("trellis: invalid request target: {e}"))?;
        *req.uri_mut() = uri;
        req.headers_mut().remove(header::HOST);
    } else {
        let absolute = req.uri().authority().is_some();
        *req.uri_mut() = Uri::from(path);
        if absolute || !req.headers().contains_key(header::HOST) {
            let host = HeaderValue::from_str(&authority)
                .map_err(|_| "trellis: invalid host".to_string())?;
            req.headers_mut().insert(header::HOST, host);
        }
        *req.version_mut() = Version::HTTP_11;
    }
    Ok(())
}

/// Sends on a pooled connection. A reused HTTP/1 connection that the peer closed before
/// our request went out is replaced by a fresh one, once.
pub(super) async fn send(
    endpoint: &Arc<EndpointConns>,
    req: Request<RequestBody>,
    h2: bool,
) -> Result<(Response<Incoming>, Option<H1Conn>), SendError> {
    let addr = endpoint.addr();
    if h2 {
        let mut tx = endpoint.h2().await?;
        let resp = tx
            .send_request(req)
            .await
            .map_err(|e| SendError::Upstream(addr, e))?;
        return Ok((resp, None));
    }
    let mut conn = endpoint.h1().await?;
    match conn.tx.try_send_request(req).await {
        Ok(resp) => Ok((resp, Some(conn))),
        Err(mut e) => match e.take_message() {
            Some(req) if conn.reused => {
                let mut fresh = endpoint.h1_new().await?;
                let resp = fresh
                    .tx
                    .send_request(req)
                    .await
                    .map_err(|e| SendError::Upstream(addr, e))?;
                Ok((resp, Some(fresh)))
            }
            _ => Err(SendError::Upstream(addr, e.into_error())),
        },
    }
}

/// How one attempt of a request ended.
enum Attempt {
    /// A response head arrived.
    Answered(Response<Incoming>, Option<H1Conn>),
    /// No response head (`None`: the request could not even be built).
    Failed(Option<SendError>),
    /// The per-try timeout passed.
    TimedOut,
}

/// The retry condition a failed exchange meets; `None` when the client's own request body
/// failed (never retried).
fn outcome_of(e: &SendError) -> Option<Outcome> {
    match e {
        SendError::Connect(_) => Some(Outcome::ConnectFailure),
        SendError::Upstream(_, e) if e.is_user() => None,
        SendError::Upstream(_, e) => {
            // hyper keeps h2's reason private; its text names REFUSED_STREAM.
            let mut source: Option<&dyn std::error::Error> = Some(e);
            while let Some(err) = source {
                if err.to_string().contains("refused stream") {
                    return Some(Outcome::RefusedStream);
                }
                source = err.source();
            }
            Some(Outcome::Reset)
        }
    }
}

/// An endpoint for a retry, preferring one not `tried` yet when the service has several.
fn repick(
    service: &Service,
    head: &http::request::Parts,
    source: std::net::IpAddr,
    tried: &[SocketAddr],
) -> Option<Arc<EndpointConns>> {
    let mut req = Request::new(());
    *req.method_mut() = head.method.clone();
    *req.uri_mut() = head.uri.clone();
    *req.headers_mut() = head.headers.clone();
    let mut picked = None;
    for _ in 0..3 {
        let e = service.pick_for(&req, source).endpoint?;
        let fresh = !tried.contains(&e.addr());
        picked = Some(e);
        if fresh || service.endpoints().len() < 2 {
            break;
        }
    }
    picked
}

fn upstream_error(
    service: &Service,
    err: SendError,
    exchange: Option<Box<Exchange>>,
) -> Response<ResponseBody> {
    let (status, reason) = match &err {
        SendError::Connect(ConnectError::Timeout(_)) => {
            (StatusCode::GATEWAY_TIMEOUT, "connect-timeout")
        }
        SendError::Connect(ConnectError::Tls { .. }) => {
            (StatusCode::SERVICE_UNAVAILABLE, "tls-handshake-failed")
        }
        SendError::Connect(_) => (StatusCode::SERVICE_UNAVAILABLE, "connect-failed"),
        // Our side of the exchange failed: the client's request body was malformed or cut.
        SendError::Upstream(_, e) if e.is_user() => (StatusCode::BAD_REQUEST, "bad-request-body"),
        SendError::Upstream(..) => (StatusCode::BAD_GATEWAY, "upstream-reset"),
    };
    respond::error(
        status,
        reason,
        format!("trellis: service {}: {err}", service.key),
        exchange,
    )
}

/// `host[:port]` split; IPv6 literals keep their brackets.
fn split_host_port(authority: &str) -> (&str, Option<u16>) {
    match authority.rsplit_once(':') {
        Some((h, p))
            if !h.is_empty() && !h.ends_with(':') && p.bytes().all(|b| b.is_ascii_digit()) =>
        {
            (h, p.parse().ok())
        }
        _ => (authority, None),
    }
}

/// The answer of a redirect or direct-response route.
fn answer(
    route: &Route,
    parts: &http::request::Parts,
    cx: &MatchContext<'_>,
    authority: &str,
    mut exchange: Box<Exchange>,
) -> Response<ResponseBody> {
    let status = match &route.action {
        Action::Direct { status, .. } => *status,
        Action::Redirect(rd) => rd.status,
        Action::Forward(_) => StatusCode::OK,
    };
    exchange.status = status.as_u16();
    let mut resp = match &route.action {
        Action::Direct { status, body } => {
            let mut r = Response::new(ResponseBody::full(body.to_vec(), Some(exchange)));
            *r.status_mut() = *status;
            r
        }
        Action::Redirect(rd) => {
            let (host, port) = split_host_port(authority);
            let host = rd.authority.as_deref().unwrap_or(host);
            let port = match rd.port {
                RedirectPort::Keep => port,
                RedirectPort::Set(p) => Some(p),
                RedirectPort::Omit => None,
            };
            let scheme = rd
                .scheme
                .as_deref()
                .or(parts.uri.scheme_str())
                .unwrap_or("http");
            let path = match &rd.uri {
                Some(edit) => {
                    let new = route.edited_path(edit, cx.path, parts, cx);
                    match parts.uri.query() {
                        Some(q) if !new.contains('?') => format!("{new}?{q}"),
                        _ => new,
                    }
                }
                None => parts
                    .uri
                    .path_and_query()
                    .map_or_else(|| "/".into(), |p| p.to_string()),
            };
            let location = match port {
                Some(p) => format!("{scheme}://{host}:{p}{path}"),
                None => format!("{scheme}://{host}{path}"),
            };
            let mut r = Response::new(ResponseBody::full(Vec::new(), Some(exchange)));
            *r.status_mut() = rd.status;
            if let Ok(v) = HeaderValue::from_str(&location) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            r
        }
        Action::Forward(_) => Response::new(ResponseBody::empty()),
    };
    route.headers.response.apply(resp.headers_mut());
    resp
}

/// Telemetry for an answer the proxy makes itself (route answers, aborts, no route),
/// counted against the cluster the host names.
fn local_exchange(cluster: &Service, client: &ClientConn, start: Instant) -> Box<Exchange> {
    Box::new(Exchange {
        stats: cluster.stats.clone(),
        source: client.source.clone(),
        tls: client.tls,
        start,
        status: 0,
        grpc_status: None,
        bytes_out: 0,
        bytes_in: None,
        log: None,
        admission: Default::default(),
    })
}

/// The response of an injected abort.
fn aborted(abort: Abort, exchange: Box<Exchange>) -> Response<ResponseBody> {
    match abort {
        Abort::Http(status) => respond::error(
            status,
            "fault-injected",
            "trellis: fault injected by the route".into(),
            Some(exchange),
        ),
        Abort::Grpc(code) => respond::grpc_error(
            code,
            "fault%20injected%20by%20the%20route",
            "fault-injected",
            Some(exchange),
        ),
    }
}

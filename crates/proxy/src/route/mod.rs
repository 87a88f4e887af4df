//! Outbound routing: what a request to a service does, from Istio VirtualService `http`
//! routes (first match wins) and DestinationRule subsets; and where a TCP connection to it
//! goes, from the VirtualService's `tcp` routes.
//!
//! A [`VirtualHost`] is what a host name resolves to: the service's own cluster (every
//! endpoint) and, when VirtualServices name the host, its compiled [`Route`]s. A route either
//! forwards to weighted backends (clusters: a service, or a subset of its endpoints by
//! labels), redirects, or answers directly; it may rewrite the path and authority, edit
//! headers, inject faults and bound the whole exchange with a timeout. Everything is compiled
//! when a config arrives ([`compile`]); a request only evaluates matchers and draws a weight.

pub mod compile;
pub mod cors;
mod gateway;
mod index;
pub mod matcher;

use crate::resilience::retry::RetryPolicy;
use crate::upstream::Service;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use index::RouteIndex;
use matcher::{ConnMatch, HttpMatch, MatchContext, Source};
use std::sync::Arc;
use std::time::Duration;
use trellis_api::names::ServiceKey;

/// A host's routing.
pub struct VirtualHost {
    /// The service the host names.
    pub key: ServiceKey,
    /// All its endpoints: where requests go without routes, and TCP.
    pub cluster: Arc<Service>,
    /// Compiled routes, in order; empty: everything goes to `cluster`.
    pub routes: Vec<Route>,
    /// Compiled TCP routes, in order; a connection none of them matches goes to `cluster`.
    pub tcp_routes: Vec<TcpRoute>,
    /// `routes` by literal path, for long tables.
    index: RouteIndex,
}

/// One compiled TCP route (VirtualService `tcp`): connections that match go to one of the
/// backends, drawn by weight.
pub struct TcpRoute {
    /// `<vs namespace>/<vs name>#tcp<index>`, for logs and `/config`.
    pub name: Arc<str>,
    /// Any of these (none: every connection).
    pub matches: Vec<ConnMatch>,
    /// Where matching connections go (no header edits on TCP).
    pub backends: Vec<Backend>,
}

/// One compiled HTTP route.
pub struct Route {
    /// `name` of the route (for the access log), else `<vs namespace>/<vs name>#<index>`.
    pub name: Arc<str>,
    /// Any of these (none: every request).
    pub matches: Vec<HttpMatch>,
    /// What to do.
    pub action: Action,
    /// Bound on the whole exchange (504 past it).
    pub timeout: Option<Duration>,
    /// Header edits on the request and the response.
    pub headers: HeaderOps,
    /// Path and authority rewrite.
    pub rewrite: Option<Rewrite>,
    /// Injected delay and abort.
    pub fault: Option<Fault>,
    /// Retries of failed attempts (`retries`); `timeout` bounds them all.
    pub retry: Option<RetryPolicy>,
    /// Copies of requests sent elsewhere, answers discarded (`mirror`, `mirrors`).
    pub mirrors: Vec<Mirror>,
    /// Cross-origin resource sharing (`corsPolicy`).
    pub cors: Option<cors::Cors>,
}

/// A destination that gets a copy of a share of the route's requests (Istio `mirror` with
/// `mirrorPercentage`, or one of `mirrors`); its responses are discarded.
pub struct Mirror {
    /// Where copies go.
    pub cluster: Arc<Service>,
    /// Share of requests copied (0..=1).
    pub fraction: f64,
}

impl Mirror {
    /// Whether this request is copied.
    pub fn draw(&self) -> bool {
        self.fraction >= 1.0 || fastrand::f64() < self.fraction
    }
}

/// The authority of a mirrored request: `-shadow` appended to the host, before any port
/// (as Envoy does): `reviews:9080` becomes `reviews-shadow:9080`.
pub fn shadow_authority(authority: &str) -> String {
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p))
            if !h.is_empty() && !h.ends_with(':') && p.bytes().all(|b| b.is_ascii_digit()) =>
        {
            (h, Some(p))
        }
        _ => (authority, None),
    };
    match port {
        Some(p) => format!("{host}-shadow:{p}"),
        None => format!("{host}-shadow"),
    }
}

/// What a matched route does.
pub enum Action {
    /// Forward to one of these, drawn by weight.
    Forward(Vec<Backend>),
    /// Answer with a redirect.
    Redirect(Redirect),
    /// Answer with this status and body.
    Direct {
        /// Status.
        status: StatusCode,
        /// Body.
        body: bytes::Bytes,
    },
}

/// A weighted destination of a route.
pub struct Backend {
    /// The cluster (service or subset).
    pub cluster: Arc<Service>,
    /// Relative weight (Istio: percent).
    pub weight: u32,
    /// Header edits for requests sent here.
    pub headers: HeaderOps,
}

/// A new path for a request.
pub enum PathEdit {
    /// Replaces the whole path.
    Whole(String),
    /// Replaces the prefix the route's `prefix` match matched (the whole path when the route
    /// matched otherwise), as Istio's `rewrite.uri` and Gateway API's `ReplacePrefixMatch` do.
    Prefix(String),
    /// Replaces every match of the regex with the replacement (`${1}` for groups), as
    /// Istio's `rewrite.uriRegexRewrite`.
    Regex(regex::Regex, String),
}

/// `rewrite` (Istio) or `URLRewrite` (Gateway API).
pub struct Rewrite {
    /// New path or prefix.
    pub uri: Option<PathEdit>,
    /// New authority.
    pub authority: Option<HeaderValue>,
}

/// `redirect` (Istio) or `RequestRedirect` (Gateway API).
pub struct Redirect {
    /// New path or prefix (the query is kept unless the new path has one).
    pub uri: Option<PathEdit>,
    /// New authority.
    pub authority: Option<String>,
    /// New scheme.
    pub scheme: Option<String>,
    /// The port in `Location`.
    pub port: RedirectPort,
    /// 301 by default (Istio), 302 (Gateway API).
    pub status: StatusCode,
}

/// The port of a redirect's `Location`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RedirectPort {
    /// The request's (Istio without `port`).
    Keep,
    /// This one.
    Set(u16),
    /// None: the scheme's well-known port (Gateway API when the scheme changes).
    Omit,
}

/// `fault`.
pub struct Fault {
    /// Delay this long, for this fraction of requests.
    pub delay: Option<(Duration, f64)>,
    /// Abort with this status, for this fraction.
    pub abort: Option<(Abort, f64)>,
}

/// How a fault aborts.
#[derive(Clone, Copy)]
pub enum Abort {
    /// An HTTP status.
    Http(StatusCode),
    /// A gRPC status code (HTTP 200 with `grpc-status`).
    Grpc(u32),
}

/// Header edits: set (replace), add (append), remove.
#[derive(Default)]
pub struct HeaderOps {
    /// On the request.
    pub request: Edits,
    /// On the response.
    pub response: Edits,
}

/// One direction's edits.
#[derive(Default)]
pub struct Edits {
    set: Vec<(HeaderName, HeaderValue)>,
    add: Vec<(HeaderName, HeaderValue)>,
    remove: Vec<HeaderName>,
}

impl Edits {
    /// Whether there is nothing to do.
    pub fn is_empty(&self) -> bool {
        self.set.is_empty() && self.add.is_empty() && self.remove.is_empty()
    }

    /// Applies the edits: remove, then set, then add (Istio's order).
    pub fn apply(&self, headers: &mut HeaderMap) {
        for name in &self.remove {
            headers.remove(name);
        }
        for (name, value) in &self.set {
            headers.insert(name.clone(), value.clone());
        }
        for (name, value) in &self.add {
            headers.append(name.clone(), value.clone());
        }
    }
}

/// What routing decided for one request.
pub enum Decision<'a> {
    /// Forward to this cluster, as this route (if any).
    Forward {
        /// Where.
        cluster: &'a Arc<Service>,
        /// The route that matched (`None`: the host has no routes).
        route: Option<&'a Route>,
        /// The backend's own header edits.
        backend_headers: Option<&'a HeaderOps>,
    },
    /// Answer without forwarding (redirect, direct response).
    Answer(&'a Route),
    /// The host has routes and none matched: 404, as Istio does.
    NoRoute,
}

impl VirtualHost {
    /// A host without routes.
    pub fn plain(cluster: Arc<Service>) -> Self {
        Self::new(cluster.key.clone(), cluster, Vec::new(), Vec::new())
    }

    /// A host with these routes (indexed here).
    pub fn new(
        key: ServiceKey,
        cluster: Arc<Service>,
        routes: Vec<Route>,
        tcp_routes: Vec<TcpRoute>,
    ) -> Self {
        Self {
            key,
            cluster,
            index: RouteIndex::build(&routes),
            routes,
            tcp_routes,
        }
    }

    /// Every cluster this host can send to: its service, route backends and mirrors.
    pub fn clusters(&self) -> impl Iterator<Item = &Arc<Service>> {
        let routes = self.routes.iter().flat_map(|r| {
            let backends: &[Backend] = match &r.action {
                Action::Forward(b) => b,
                _ => &[],
            };
            backends
                .iter()
                .map(|b| &b.cluster)
                .chain(r.mirrors.iter().map(|m| &m.cluster))
        });
        let tcp = self
            .tcp_routes
            .iter()
            .flat_map(|r| r.backends.iter().map(|b| &b.cluster));
        std::iter::once(&self.cluster).chain(routes).chain(tcp)
    }

    /// Where a TCP connection (or `CONNECT` tunnel) to `port` goes: the first TCP route that
    /// matches draws one of its backends; without a matching route, the service itself.
    /// `None`: the matching route has no destination this proxy can reach.
    pub fn tcp_cluster(
        &self,
        port: Option<u16>,
        source: &Source<'_>,
    ) -> Option<(&Arc<Service>, Option<&TcpRoute>)> {
        let route = self
            .tcp_routes
            .iter()
            .find(|r| r.matches.is_empty() || r.matches.iter().any(|m| m.matches(port, source)));
        match route {
            None => Some((&self.cluster, None)),
            Some(r) => pick_weighted(&r.backends).map(|b| (&b.cluster, Some(r))),
        }
    }

    /// Routes a request.
    pub fn decide(&self, head: &http::request::Parts, cx: &MatchContext<'_>) -> Decision<'_> {
        if self.routes.is_empty() {
            return Decision::Forward {
                cluster: &self.cluster,
                route: None,
                backend_headers: None,
            };
        }
        let matches =
            |r: &&Route| r.matches.is_empty() || r.matches.iter().any(|m| m.matches(head, cx));
        let route = match self.index.candidates(cx.path) {
            Some(could) => could
                .iter()
                .map(|&i| &self.routes[i as usize])
                .find(matches),
            None => self.routes.iter().find(matches),
        };
        let Some(route) = route else {
            return Decision::NoRoute;
        };
        match &route.action {
            Action::Forward(backends) => match pick_weighted(backends) {
                Some(b) => Decision::Forward {
                    cluster: &b.cluster,
                    route: Some(route),
                    backend_headers: Some(&b.headers),
                },
                None => Decision::NoRoute,
            },
            _ => Decision::Answer(route),
        }
    }
}

/// Draws a backend with probability proportional to its weight.
fn pick_weighted(backends: &[Backend]) -> Option<&Backend> {
    match backends {
        [] => None,
        [only] => Some(only),
        _ => {
            let total: u32 = backends.iter().map(|b| b.weight).sum();
            if total == 0 {
                return backends.first();
            }
            let mut draw = fastrand::u32(..total);
            for b in backends {
                if draw < b.weight {
                    return Some(b);
                }
                draw -= b.weight;
            }
            backends.last()
        }
    }
}

impl Route {
    /// The path after `rewrite.uri`, if the route rewrites it.
    pub fn rewritten_path(
        &self,
        path: &str,
        head: &http::request::Parts,
        cx: &MatchContext<'_>,
    ) -> Option<String> {
        let edit = self.rewrite.as_ref()?.uri.as_ref()?;
        Some(self.edited_path(edit, path, head, cx))
    }

    /// `path` after `edit`: a prefix edit replaces the prefix the matching `prefix` match
    /// matched. Gateway API prefixes match whole segments and are joined without doubling
    /// the slash (`/api` to `/` makes `/api/users` `/users`, and `/api` itself `/`).
    pub fn edited_path(
        &self,
        edit: &PathEdit,
        path: &str,
        head: &http::request::Parts,
        cx: &MatchContext<'_>,
    ) -> String {
        let new = match edit {
            PathEdit::Whole(new) => return new.clone(),
            PathEdit::Regex(re, with) => return re.replace_all(path, with.as_str()).into_owned(),
            PathEdit::Prefix(new) => new,
        };
        let prefix = self
            .matches
            .iter()
            .find(|m| m.matches(head, cx))
            .and_then(|m| m.uri_prefix());
        match prefix {
            Some((p, false)) if path.starts_with(p) => format!("{new}{}", &path[p.len()..]),
            Some((p, true)) if path.starts_with(p) => {
                let mut rest = &path[p.len()..];
                if new.ends_with('/') {
                    rest = rest.strip_prefix('/').unwrap_or(rest);
                }
                let joined = format!("{new}{rest}");
                if joined.is_empty() {
                    "/".into()
                } else {
                    joined
                }
            }
            _ => new.clone(),
        }
    }
}

impl Fault {
    /// Whether to delay this request, and how long.
    pub fn delay(&self) -> Option<Duration> {
        self.delay
            .filter(|(_, fraction)| fastrand::f64() < *fraction)
            .map(|(d, _)| d)
    }

    /// Whether to abort this request, and how.
    pub fn abort(&self) -> Option<Abort> {
        self.abort
            .filter(|(_, fraction)| fastrand::f64() < *fraction)
            .map(|(a, _)| a)
    }
}

/// A cluster as the admin `/config` shows it.
fn describe_cluster(c: &Service) -> serde_json::Value {
    serde_json::json!({
        "service": c.key.to_string(),
        "subset": c.subset.as_deref(),
        "load_balancer": format!("{:?}", c.policy()),
        "timeout_ms": c.timeout.map(|t| t.as_millis() as u64),
        "endpoints": c.endpoints().iter().map(|e| serde_json::json!({
            "address": e.addr().to_string(),
            "mtls": e.is_mtls(),
            "ejected": c.is_ejected(e),
        })).collect::<Vec<_>>(),
    })
}

/// Weighted backends as the admin `/config` shows them.
fn describe_backends(backends: &[Backend]) -> serde_json::Value {
    backends
        .iter()
        .map(|b| serde_json::json!({ "weight": b.weight, "cluster": describe_cluster(&b.cluster) }))
        .collect()
}

impl VirtualHost {
    /// The host's routes and clusters as the admin `/config` shows them.
    pub fn describe(&self) -> serde_json::Value {
        let routes: Vec<serde_json::Value> = self
            .routes
            .iter()
            .map(|r| {
                let action = match &r.action {
                    Action::Forward(backends) => {
                        serde_json::json!({ "forward": describe_backends(backends) })
                    }
                    Action::Redirect(rd) => serde_json::json!({ "redirect": rd.status.as_u16() }),
                    Action::Direct { status, .. } => {
                        serde_json::json!({ "direct_response": status.as_u16() })
                    }
                };
                serde_json::json!({
                    "name": &*r.name,
                    "matches": r.matches.len(),
                    "timeout_ms": r.timeout.map(|t| t.as_millis() as u64),
                    "retries": r.retry.is_some(),
                    "fault": r.fault.is_some(),
                    "mirrors": r.mirrors.iter().map(|m| serde_json::json!({
                        "fraction": m.fraction,
                        "cluster": describe_cluster(&m.cluster),
                    })).collect::<Vec<_>>(),
                    "action": action,
                })
            })
            .collect();
        let tcp_routes: Vec<serde_json::Value> = self
            .tcp_routes
            .iter()
            .map(|r| {
                serde_json::json!({
                    "name": &*r.name,
                    "matches": r.matches.len(),
                    "forward": describe_backends(&r.backends),
                })
            })
            .collect();
        serde_json::json!({
            "host": self.key.to_string(),
            "cluster": describe_cluster(&self.cluster),
            "routes": routes,
            "tcp_routes": tcp_routes,
        })
    }
}

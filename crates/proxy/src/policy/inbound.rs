//! The inbound policy step of the request path: normalize the path, decide with the
//! workload's AuthorizationPolicies, count and log the decision, and answer denials.
//!
//! HTTP: a path that cannot be normalized is 400; a denied request is 403 (gRPC:
//! `PERMISSION_DENIED`). The normalized path is what the application receives, so a policy
//! means what the backend sees. TCP: a denied connection is closed.
//!
//! After authorization, the workload's `RateLimit`s: a request over a limit is 429 with
//! `retry-after` (gRPC: `RESOURCE_EXHAUSTED`). TCP connections are not rate limited.

use super::authz::{Authz, Decision, HttpAttrs, JwtAttrs, RequestAttrs};
use super::jwt::{Authn, JwtAuthn};
use super::path;
use super::ratelimit::{Limited, RateLimits};
use crate::http::body::ResponseBody;
use crate::http::forward::{authority_of, ClientConn};
use crate::http::respond;
use crate::telemetry::Metrics;
use http::{header, HeaderValue, Request, Response, StatusCode};
use prometheus_client::metrics::counter::Counter;
use std::sync::OnceLock;

/// What the inbound listeners enforce.
#[derive(Default)]
pub struct Inbound {
    /// This workload's identity (`By=` of `x-forwarded-client-cert`), if it has one.
    pub identity: Option<std::sync::Arc<str>>,
    /// Its compiled authorization policies.
    pub authz: Authz,
    /// Its request authentication (JWT) rules.
    pub jwt: std::sync::Arc<JwtAuthn>,
    /// The Mesh's `authorization.defaultDeny`: with no ALLOW policy for the workload,
    /// requests are denied instead of allowed.
    pub default_deny: bool,
    /// Its rate limits (checked after authorization).
    pub ratelimits: RateLimits,
    /// Its decision counters, kept per policy (`Inbound::default()` for none yet).
    pub counters: DecisionCounters,
}

/// The `trellis_authz_decisions_total` counter of each possible decision, made on first use:
/// one atomic increment per request instead of a labelled lookup in the metric family.
#[derive(Default)]
pub struct DecisionCounters(OnceLock<Box<[OnceLock<Counter>]>>);

impl DecisionCounters {
    /// Slots before the policies': the default allow, the default deny, the Mesh's
    /// default-deny switch.
    const FIXED: usize = 3;

    /// Counts `d`, `authz` having decided it.
    fn count(&self, authz: &Authz, d: &Decision, metrics: &Metrics) {
        let slot = match (d.slot, d.allowed, &d.policy) {
            (Some(i), ..) => Self::FIXED + i,
            (None, true, _) => 0,
            (None, false, None) => 1,
            (None, false, Some(_)) => 2,
        };
        let slots = self.0.get_or_init(|| {
            (0..Self::FIXED + authz.len())
                .map(|_| OnceLock::new())
                .collect()
        });
        match slots.get(slot) {
            Some(counter) => {
                counter
                    .get_or_init(|| metrics.authz_counter(d.action_label(), d.policy.as_ref()))
                    .inc();
            }
            None => metrics.authz_decision(d.action_label(), d.policy.as_ref()),
        }
    }
}

/// The policy label of a denial by the Mesh's default-deny switch.
const DEFAULT_DENY: &str = "mesh/default-deny";

impl Inbound {
    /// Checks an HTTP request; on success the request carries the normalized path.
    #[allow(clippy::result_large_err)]
    pub fn check_request<B>(
        &self,
        req: &mut Request<B>,
        client: &ClientConn,
        metrics: &Metrics,
    ) -> Result<(), Response<ResponseBody>> {
        let normalized = match path::normalize(req.uri().path()) {
            Ok(p) => p,
            Err(e) => {
                return Err(respond::error(
                    StatusCode::BAD_REQUEST,
                    "bad-path",
                    format!("trellis: {e}"),
                    None,
                ))
            }
        };
        if normalized != req.uri().path() {
            let query = req.uri().query().map(str::to_string);
            crate::http::set_path(req.uri_mut(), &normalized, query.as_deref());
        }
        let jwt = self.authenticate(req)?;
        // Policies and limits match without `;` path parameters, which many servers ignore
        // (`/admin;x` is `/admin` to a servlet container): a DENY on `/admin` must cover it.
        let matched = without_path_params(&normalized);
        if self.authz.is_empty() && !self.default_deny {
            return self.rate_limit(req, &matched, metrics);
        }
        let host = match self.authz.reads_host() {
            true => super::authz::normalize_host(authority_of(req).unwrap_or_default()),
            false => std::borrow::Cow::Borrowed(""),
        };
        let principal = client.principal();
        let http = HttpAttrs {
            method: req.method().as_str(),
            host: &host,
            path: &matched,
            headers: req.headers(),
        };
        let d = self.decide(&attrs(client, principal, Some(http), jwt.as_ref()), metrics);
        for audit in &d.audit {
            metrics.authz_decision("audit", Some(audit));
            tracing::info!(target: "trellis::authz", action = "audit", policy = %audit, source = principal.unwrap_or("-"), method = %req.method(), path = %normalized, "authorization audit");
        }
        if d.allowed {
            return self.rate_limit(req, &matched, metrics);
        }
        tracing::info!(target: "trellis::authz", action = "deny", policy = d.policy_label(), source = principal.unwrap_or("-"), method = %req.method(), path = %normalized, "request denied");
        Err(denied(req))
    }

    /// Takes the request's tokens from the workload's rate limits: 429 (gRPC:
    /// `RESOURCE_EXHAUSTED`) when a bucket is empty.
    #[allow(clippy::result_large_err)]
    fn rate_limit<B>(
        &self,
        req: &Request<B>,
        path: &str,
        metrics: &Metrics,
    ) -> Result<(), Response<ResponseBody>> {
        if self.ratelimits.is_empty() {
            return Ok(());
        }
        let now = std::time::Instant::now();
        match self.ratelimits.check(req.method().as_str(), path, now) {
            Ok(()) => Ok(()),
            Err(limited) => {
                metrics.ratelimited(&limited.limit);
                tracing::debug!(target: "trellis::ratelimit", limit = %limited.limit, method = %req.method(), path = %path, "request rate limited");
                Err(rate_limited(req, &limited))
            }
        }
    }

    /// Verifies the request's JWT, if it carries one: 401 when invalid; when valid, applies
    /// the rule's effects (token removed unless forwarded, payload and claim headers) and
    /// returns what authorization sees of it.
    #[allow(clippy::result_large_err)]
    fn authenticate<B>(
        &self,
        req: &mut Request<B>,
    ) -> Result<Option<JwtAttrs>, Response<ResponseBody>> {
        if self.jwt.is_empty() {
            return Ok(None);
        }
        match self.jwt.authenticate(req.headers(), req.uri().query()) {
            Authn::NoToken => {
                self.jwt.strip_output_headers(req.headers_mut());
                Ok(None)
            }
            Authn::Invalid(e) => {
                tracing::info!(target: "trellis::authn", error = %e, method = %req.method(), path = %req.uri().path(), "JWT refused");
                let mut resp = respond::error(
                    StatusCode::UNAUTHORIZED,
                    "jwt-invalid",
                    format!("Jwt verification fails: {e}"),
                    None,
                );
                resp.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
                Err(resp)
            }
            Authn::Valid(attrs, effects) => {
                super::jwt::apply(&effects, req.headers_mut());
                if let Some(q) = req.uri().query().and_then(|q| effects.rewrite_query(q)) {
                    let path = req.uri().path().to_string();
                    crate::http::set_path(req.uri_mut(), &path, Some(&q));
                }
                Ok(Some(attrs))
            }
        }
    }

    /// Decides with the workload's policies and the Mesh's default-deny switch, and counts
    /// the decision.
    fn decide(&self, attrs: &RequestAttrs<'_>, metrics: &Metrics) -> Decision {
        let mut d = self.authz.decide(attrs);
        if self.default_deny && d.allowed && d.policy.is_none() {
            d.allowed = false;
            d.policy = Some(std::sync::Arc::from(DEFAULT_DENY));
        }
        self.counters.count(&self.authz, &d, metrics);
        d
    }

    /// Checks a TCP connection (no HTTP attributes): `false` closes it.
    pub fn check_connection(&self, client: &ClientConn, metrics: &Metrics) -> bool {
        if self.authz.is_empty() && !self.default_deny {
            return true;
        }
        let principal = client.principal();
        let d = self.decide(&attrs(client, principal, None, None), metrics);
        if !d.allowed {
            tracing::info!(target: "trellis::authz", action = "deny", policy = d.policy_label(), source = principal.unwrap_or("-"), client = %client.addr, "connection denied");
        }
        d.allowed
    }
}

/// What authorization sees of a client (and, for HTTP, of its request).
fn attrs<'a>(
    client: &ClientConn,
    principal: Option<&'a str>,
    http: Option<HttpAttrs<'a>>,
    jwt: Option<&'a JwtAttrs>,
) -> RequestAttrs<'a> {
    RequestAttrs {
        source_principal: principal,
        source_namespace: principal.and_then(super::authz::principal_namespace),
        source_ip: client.addr.ip(),
        remote_ip: client.addr.ip(),
        destination_ip: client.local.map(|a| a.ip()),
        destination_port: client.local.map_or(0, |a| a.port()),
        http,
        jwt,
    }
}

/// 429 with `retry-after`, or for gRPC a trailers-only `RESOURCE_EXHAUSTED`.
fn rate_limited<B>(req: &Request<B>, limited: &Limited) -> Response<ResponseBody> {
    let retry_after = HeaderValue::from(limited.retry_after_secs());
    let mut r = if respond::is_grpc(req) {
        respond::grpc_error(8, "rate%20limited", "rate-limited", None)
    } else {
        respond::error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            format!("trellis: rate limited by {}", limited.limit),
            None,
        )
    };
    r.headers_mut().insert(header::RETRY_AFTER, retry_after);
    r
}

/// 403, or for gRPC a trailers-only `PERMISSION_DENIED`.
fn denied<B>(req: &Request<B>) -> Response<ResponseBody> {
    if respond::is_grpc(req) {
        return respond::grpc_error(7, "RBAC%3A%20access%20denied", "authz-denied", None);
    }
    respond::error(
        StatusCode::FORBIDDEN,
        "authz-denied",
        "RBAC: access denied".into(),
        None,
    )
}

/// `path` with every segment's `;parameters` removed.
fn without_path_params(path: &str) -> std::borrow::Cow<'_, str> {
    if !path.contains(';') {
        return std::borrow::Cow::Borrowed(path);
    }
    let stripped: Vec<&str> = path
        .split('/')
        .map(|seg| seg.split(';').next().unwrap_or(""))
        .collect();
    std::borrow::Cow::Owned(stripped.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Request;
    use std::time::Duration;

    #[test]
    fn rate_limited_answers_429_or_resource_exhausted() {
        let limited = Limited {
            limit: "ns/rl".into(),
            retry_after: Duration::from_millis(1500),
        };
        let r = rate_limited(&Request::new(()), &limited);
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["x-trellis-error"], "rate-limited");
        assert_eq!(r.headers()["retry-after"], "2");
        let grpc = Request::builder()
            .header("content-type", "application/grpc+proto")
            .body(())
            .unwrap();
        let r = rate_limited(&grpc, &limited);
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["grpc-status"], "8");
        assert_eq!(r.headers()["x-trellis-error"], "rate-limited");
    }

    /// The policies of `yaml` (in namespace `app`), compiled for a workload there.
    fn authz(yaml: &str) -> Authz {
        let (loaded, errors) = trellis_api::resources::parse(std::path::Path::new("t"), yaml);
        assert!(errors.is_empty(), "{errors:?}");
        let policies: Vec<_> = loaded
            .into_iter()
            .filter_map(|l| match l.resource {
                trellis_api::resources::Resource::AuthorizationPolicy(p) => Some(p),
                _ => None,
            })
            .collect();
        Authz::compile(&policies, "app", &Default::default(), "istio-system")
    }

    fn plaintext_client() -> ClientConn {
        ClientConn {
            addr: "127.0.0.1:1000".parse().unwrap(),
            source: crate::telemetry::metrics::Peer::new("unknown", "unknown"),
            tls: false,
            identity: None,
            local: Some("127.0.0.1:8080".parse().unwrap()),
            principal: Default::default(),
        }
    }

    /// Each decision lands on its own `(action, policy)` series, including the defaults.
    #[test]
    fn decisions_are_counted_per_policy() {
        let authz = authz(
            "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: d, namespace: app }
spec: { action: DENY, rules: [{ to: [{ operation: { paths: [/admin] } }] }] }
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: a, namespace: app }
spec: { action: ALLOW, rules: [{ to: [{ operation: { methods: [GET] } }] }] }
",
        );
        let metrics = Metrics::new();
        let client = plaintext_client();
        let check = |inbound: &Inbound, method: &str, path: &str| {
            let mut req = Request::builder()
                .method(method)
                .uri(path)
                .body(())
                .unwrap();
            inbound.check_request(&mut req, &client, &metrics).is_ok()
        };
        let inbound = Inbound {
            authz,
            ..Inbound::default()
        };
        for (method, path, allowed) in [
            ("GET", "/", true),
            ("GET", "/x", true),
            ("POST", "/", false),
            ("GET", "/admin", false),
            ("GET", "/admin", false),
            ("GET", "/admin", false),
        ] {
            assert_eq!(check(&inbound, method, path), allowed, "{method} {path}");
        }
        let strict = Inbound {
            default_deny: true,
            ..Inbound::default()
        };
        assert!(!check(&strict, "GET", "/"));
        let text = metrics.encode();
        for series in [
            r#"trellis_authz_decisions_total{action="allow",policy="app/a"} 2"#,
            r#"trellis_authz_decisions_total{action="deny",policy=""} 1"#,
            r#"trellis_authz_decisions_total{action="deny",policy="app/d"} 3"#,
            r#"trellis_authz_decisions_total{action="deny",policy="mesh/default-deny"} 1"#,
        ] {
            assert!(text.contains(series), "{series} not in\n{text}");
        }
    }

    /// Policies on hosts see the request's host (Host header or absolute URI), normalized.
    #[test]
    fn host_policies_see_the_normalized_host() {
        let inbound = Inbound {
            authz: authz(
                "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: a, namespace: app }
spec:
  action: ALLOW
  rules:
  - to: [{ operation: { hosts: [api.example.com] } }]
  - when: [{ key: 'request.headers[:authority]', values: ['*.internal'] }]
",
            ),
            ..Inbound::default()
        };
        let (metrics, client) = (Metrics::new(), plaintext_client());
        for (uri, host, allowed) in [
            ("/", "API.Example.com.:8080", true),
            ("http://api.example.com/", "", true),
            ("/", "db.internal", true),
            ("/", "example.com", false),
            ("/", "", false),
        ] {
            let mut req = Request::builder().uri(uri);
            if !host.is_empty() {
                req = req.header("host", host);
            }
            let mut req = req.body(()).unwrap();
            let ok = inbound.check_request(&mut req, &client, &metrics).is_ok();
            assert_eq!(ok, allowed, "{uri} host {host:?}");
        }
    }

    #[test]
    fn path_parameters_do_not_hide_a_path_from_policies() {
        assert_eq!(without_path_params("/admin;x"), "/admin");
        assert_eq!(without_path_params("/a;b=c/admin;jsessionid=1"), "/a/admin");
        assert_eq!(without_path_params("/plain"), "/plain");
    }
}

//! Istio's `VirtualService`: how requests to a set of hosts are routed (matches, weighted
//! destinations, redirects, rewrites, timeouts, retries, fault injection, mirroring).
//!
//! HTTP and TCP routes are read; `tls` routes and `delegate` are refused as not supported yet.
//! The HTTP route's policies (retries, faults, CORS, ...) live in [`super::http_policy`].

use super::common::{check_non_empty, check_port, Invalid, Percent, PortSelector};
use super::http_match::HttpMatchRequest;
use super::http_policy::{
    CorsPolicy, Headers, HttpDirectResponse, HttpFaultInjection, HttpMirrorPolicy, HttpRedirect,
    HttpRetry, HttpRewrite,
};
use super::{ObjectMeta, Unsupported};
use crate::duration::Duration;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// apiVersions accepted for this kind.
pub const API_VERSIONS: [&str; 3] = [
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];

/// The resource.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualService {
    /// `networking.istio.io/v1` (or `v1beta1`, `v1alpha3`).
    pub api_version: String,
    /// `VirtualService`.
    pub kind: String,
    /// Name and namespace.
    pub metadata: ObjectMeta,
    /// The routes.
    #[serde(default)]
    pub spec: VirtualServiceSpec,
    /// Server-written status (as in `kubectl get -o yaml`): accepted and ignored.
    #[serde(default, skip_serializing)]
    pub status: Option<serde_yaml_ng::Value>,
}

/// `spec` of a VirtualService.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VirtualServiceSpec {
    /// Hosts the routes apply to (`reviews`, `reviews.prod.svc.cluster.local`, `*.example.com`).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Gateways and sidecars the routes apply to (`mesh`, the default, means all sidecars).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    /// HTTP routes, first match wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub http: Vec<HttpRoute>,
    /// TLS (SNI) routes: not supported yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Unsupported>,
    /// Opaque TCP routes, first match wins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tcp: Vec<TcpRoute>,
    /// Namespaces this is visible to (`.` own namespace, `*` all).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub export_to: Vec<String>,
}

/// One HTTP route: conditions and what to do with a matching request.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRoute {
    /// Name (for logs and metrics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Any one of these must match (absent: every request matches).
    #[serde(default, rename = "match", skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<HttpMatchRequest>,
    /// Weighted destinations.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub route: Vec<HttpRouteDestination>,
    /// Answer with a redirect instead of forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect: Option<HttpRedirect>,
    /// Answer directly instead of forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_response: Option<HttpDirectResponse>,
    /// Delegation to another VirtualService: not supported yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delegate: Option<Unsupported>,
    /// Rewrite path or authority before forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewrite: Option<HttpRewrite>,
    /// Timeout of the whole request, retries included (`0s`: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Retry policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<HttpRetry>,
    /// Fault injection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fault: Option<HttpFaultInjection>,
    /// Mirror (shadow) traffic to this destination.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror: Option<Destination>,
    /// Share of requests mirrored to `mirror` (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mirror_percentage: Option<Percent>,
    /// Several mirrors, each with its own share.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mirrors: Vec<HttpMirrorPolicy>,
    /// CORS policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors_policy: Option<CorsPolicy>,
    /// Header changes for the request and the response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Headers>,
}

/// A weighted destination of an HTTP route.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteDestination {
    /// Where to send.
    pub destination: Destination,
    /// Share of traffic, 0..=100 (a single destination gets everything).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Header changes when this destination is chosen.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Headers>,
}

/// A service (and optionally a DestinationRule subset and port).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Destination {
    /// The service host.
    pub host: String,
    /// A subset named in the host's DestinationRule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subset: Option<String>,
    /// The port, when the service has several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<PortSelector>,
}

impl Destination {
    /// Checks host and port.
    pub fn validate(&self, path: &str) -> Result<(), Invalid> {
        check_non_empty(&self.host, &format!("{path}.host"), "host")?;
        if let Some(p) = &self.port {
            check_port(p.number, &format!("{path}.port.number"))?;
        }
        Ok(())
    }
}

/// One TCP route.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TcpRoute {
    /// Any one of these must match (absent: every connection).
    #[serde(default, rename = "match", skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<L4MatchAttributes>,
    /// Weighted destinations.
    #[serde(default)]
    pub route: Vec<RouteDestination>,
}

/// Conditions on a TCP connection.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct L4MatchAttributes {
    /// Destination IPs or CIDRs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_subnets: Vec<String>,
    /// The port connected to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    /// Labels of the calling workload.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub source_labels: BTreeMap<String, String>,
    /// Gateways this match applies to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    /// Namespace of the calling workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_namespace: Option<String>,
}

/// A weighted destination of a TCP route.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RouteDestination {
    /// Where to send.
    pub destination: Destination,
    /// Share of connections, 0..=100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
}

fn check_weight(weight: Option<u32>, path: &str) -> Result<(), Invalid> {
    match weight {
        Some(w) if w > 100 => Err((
            format!("{path}.weight"),
            format!("weight {w} is not in 0..=100"),
        )),
        _ => Ok(()),
    }
}

impl VirtualService {
    /// Checks what serde cannot: string matches, regexes, weights, ports, percentages, and
    /// the combinations Istio forbids.
    pub fn validate(&self) -> Result<(), Invalid> {
        let spec = &self.spec;
        if spec.hosts.is_empty() {
            return Err(("spec.hosts".into(), "at least one host is required".into()));
        }
        for (i, h) in spec.hosts.iter().enumerate() {
            check_non_empty(h, &format!("spec.hosts[{i}]"), "host")?;
        }
        for (i, r) in spec.http.iter().enumerate() {
            validate_http(r, &format!("spec.http[{i}]"))?;
        }
        for (i, r) in spec.tcp.iter().enumerate() {
            let path = format!("spec.tcp[{i}]");
            for (j, m) in r.matches.iter().enumerate() {
                if let Some(p) = m.port {
                    check_port(p, &format!("{path}.match[{j}].port"))?;
                }
            }
            if r.route.is_empty() {
                return Err((
                    format!("{path}.route"),
                    "at least one destination is required".into(),
                ));
            }
            for (j, d) in r.route.iter().enumerate() {
                d.destination
                    .validate(&format!("{path}.route[{j}].destination"))?;
                check_weight(d.weight, &format!("{path}.route[{j}]"))?;
            }
        }
        Ok(())
    }
}

fn validate_http(r: &HttpRoute, path: &str) -> Result<(), Invalid> {
    for (j, m) in r.matches.iter().enumerate() {
        m.validate(&format!("{path}.match[{j}]"))?;
    }
    let actions = [
        !r.route.is_empty(),
        r.redirect.is_some(),
        r.direct_response.is_some(),
    ];
    match actions.iter().filter(|a| **a).count() {
        0 => {
            return Err((
                path.into(),
                "one of route, redirect or directResponse is required".into(),
            ))
        }
        1 => {}
        _ => {
            return Err((
                path.into(),
                "route, redirect and directResponse are exclusive".into(),
            ))
        }
    }
    for (j, d) in r.route.iter().enumerate() {
        let p = format!("{path}.route[{j}]");
        d.destination.validate(&format!("{p}.destination"))?;
        check_weight(d.weight, &p)?;
        if let Some(h) = &d.headers {
            h.validate(&format!("{p}.headers"))?;
        }
    }
    if let Some(h) = &r.headers {
        h.validate(&format!("{path}.headers"))?;
    }
    if let Some(x) = &r.redirect {
        x.validate(&format!("{path}.redirect"))?;
    }
    if let Some(x) = &r.direct_response {
        x.validate(&format!("{path}.directResponse"))?;
    }
    if let Some(x) = &r.rewrite {
        x.validate(&format!("{path}.rewrite"))?;
    }
    if let Some(x) = &r.retries {
        x.validate(&format!("{path}.retries"))?;
    }
    if let Some(x) = &r.fault {
        x.validate(&format!("{path}.fault"))?;
    }
    if let Some(m) = &r.mirror {
        if !r.mirrors.is_empty() {
            return Err((
                format!("{path}.mirror"),
                "mirror and mirrors are exclusive".into(),
            ));
        }
        m.validate(&format!("{path}.mirror"))?;
    }
    if let Some(p) = &r.mirror_percentage {
        p.validate(&format!("{path}.mirrorPercentage"))?;
    }
    for (j, m) in r.mirrors.iter().enumerate() {
        m.validate(&format!("{path}.mirrors[{j}]"))?;
    }
    if let Some(c) = &r.cors_policy {
        c.validate(&format!("{path}.corsPolicy"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{parse, Resource};
    use std::path::Path;

    const CANARY: &str = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  namespace: bookinfo
spec:
  hosts: [reviews, reviews.bookinfo.svc.cluster.local]
  http:
  - name: beta-testers
    match:
    - headers:
        end-user: { exact: jason }
        x-canary: {}
      uri: { prefix: /api/ }
      ignoreUriCase: true
    - queryParams: { beta: { regex: "^(1|true)$" } }
    route:
    - destination: { host: reviews, subset: v2 }
    fault:
      delay: { percentage: { value: 0.1 }, fixedDelay: 5s }
  - name: canary
    route:
    - destination: { host: reviews, subset: v1, port: { number: 9080 } }
      weight: 90
    - destination: { host: reviews, subset: v2, port: { number: 9080 } }
      weight: 10
      headers: { response: { set: { x-canary: "true" }, remove: [x-internal] } }
    timeout: 0.5s
    retries: { attempts: 3, perTryTimeout: 100ms, retryOn: "5xx,reset,connect-failure" }
    mirror: { host: reviews-shadow }
    mirrorPercentage: { value: 5.0 }
    corsPolicy:
      allowOrigins: [{ exact: "https://example.com" }]
      allowMethods: [GET, POST]
      maxAge: 24h
  - match: [{ uri: { exact: /old } }]
    redirect: { uri: /new, redirectCode: 301 }
  - match: [{ uri: { exact: /health } }]
    directResponse: { status: 200, body: { string: ok } }
  tcp:
  - match: [{ port: 3306 }]
    route: [{ destination: { host: mysql } }]
status:
  observedGeneration: 1
"#;

    #[test]
    fn canary_with_subsets_and_retries_loads() {
        let (ok, errors) = parse(Path::new("x.yaml"), CANARY);
        assert!(errors.is_empty(), "{errors:?}");
        let Resource::VirtualService(vs) = &ok[0].resource else {
            panic!("{ok:?}")
        };
        let canary = &vs.spec.http[1];
        assert_eq!(canary.route[1].weight, Some(10));
        assert_eq!(canary.timeout.map(|t| t.0.as_millis()), Some(500));
        assert_eq!(canary.retries.as_ref().map(|r| r.attempts), Some(3));
    }

    #[test]
    fn errors_name_line_and_field() {
        let cases = [
            ("weight: 10", "weight: 110", "x.yaml:26: VirtualService/reviews: spec.http[1].route[1].weight: weight 110"),
            ("{ exact: jason }", "{ exact: jason, prefix: j }", "x.yaml:12: VirtualService/reviews: spec.http[0].match[0].headers.end-user: set exactly one"),
            ("\"^(1|true)$\"", "\"(unclosed\"", "x.yaml:16: VirtualService/reviews: spec.http[0].match[1].queryParams.beta.regex: invalid regex"),
            ("timeout: 0.5s", "timeout: soon", "x.yaml:28: VirtualService/reviews: spec.http[1].timeout: invalid duration"),
            ("ignoreUriCase: true", "ignoreUriCase: true\n      sourceLabel: {}", "x.yaml:16: VirtualService/reviews: spec.http[0].match[0].sourceLabel: unknown field `sourceLabel`"),
            ("  tcp:", "  tls: []\n  tcp:", "x.yaml:40: VirtualService/reviews: spec.tls: not supported"),
        ];
        for (from, to, want) in cases {
            let (_, errors) = parse(Path::new("x.yaml"), &CANARY.replace(from, to));
            let msg = errors.first().map(|e| e.to_string()).unwrap_or_default();
            assert!(msg.starts_with(want), "{msg}\nwant: {want}");
        }
    }
}

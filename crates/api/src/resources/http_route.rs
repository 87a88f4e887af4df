//! Gateway API `HTTPRoute` (`gateway.networking.k8s.io`): routes attached to parents (a
//! Service for mesh routing, or a Gateway), with matches, filters and weighted backends.
//! Experimental fields (`retry`, `sessionPersistence`, backend-level filters) and the
//! `ExtensionRef` filter are refused as not supported yet.

use super::common::{check_non_empty, check_regex, Invalid};
use super::http_route_filter::{check_backend, FilterType, HttpRouteFilter};
use super::{ObjectMeta, Unsupported};
use crate::duration::Duration;
use serde::{Deserialize, Serialize};

/// apiVersions accepted for this kind.
pub const API_VERSIONS: [&str; 2] = [
    "gateway.networking.k8s.io/v1",
    "gateway.networking.k8s.io/v1beta1",
];

/// The resource.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRoute {
    /// `gateway.networking.k8s.io/v1` (or `v1beta1`).
    pub api_version: String,
    /// `HTTPRoute`.
    pub kind: String,
    /// Name and namespace.
    pub metadata: ObjectMeta,
    /// The route.
    #[serde(default)]
    pub spec: HttpRouteSpec,
    /// Server-written status: accepted and ignored.
    #[serde(default, skip_serializing)]
    pub status: Option<serde_yaml_ng::Value>,
}

/// `spec` of an HTTPRoute.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteSpec {
    /// What the route attaches to (a Service: mesh traffic to it; a Gateway: ingress).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub parent_refs: Vec<ParentReference>,
    /// Hosts (Host header) the route applies to; empty: all.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
    /// Rules; the most specific match wins (Gateway API precedence).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<HttpRouteRule>,
}

/// A parent of the route.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParentReference {
    /// API group (`gateway.networking.k8s.io` by default; `""` or `core` for a Service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// `Gateway` (default) or `Service`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Namespace (default: the route's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Name.
    pub name: String,
    /// A listener (Gateway) or port name (Service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub section_name: Option<String>,
    /// A port of the parent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
}

impl ParentReference {
    /// Whether the parent is a Service (`group: ""` or `core`, `kind: Service`): the route
    /// is for the mesh (GAMMA), not for a Gateway (the default kind).
    pub fn is_service(&self) -> bool {
        self.kind.as_deref() == Some("Service")
            && matches!(self.group.as_deref(), None | Some("") | Some("core"))
    }
}

/// One rule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteRule {
    /// Name of the rule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Any one must match (absent: path prefix `/`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub matches: Vec<HttpRouteMatch>,
    /// Applied in order to matching requests.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filters: Vec<HttpRouteFilter>,
    /// Weighted backends (none: 500 unless a filter answers).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backend_refs: Vec<HttpBackendRef>,
    /// Timeouts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeouts: Option<HttpRouteTimeouts>,
    /// Experimental retry policy: not supported yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Unsupported>,
    /// Experimental session persistence: not supported yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_persistence: Option<Unsupported>,
}

/// Conditions; all the given ones must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteMatch {
    /// The path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<HttpPathMatch>,
    /// Headers (all must match).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HttpValueMatch>,
    /// Query parameters (all must match).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_params: Vec<HttpValueMatch>,
    /// The method (`GET`, `POST`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

/// `{ type: Exact|PathPrefix|RegularExpression, value }`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpPathMatch {
    /// How to compare (default `PathPrefix`).
    #[serde(default, rename = "type")]
    pub kind: PathMatchType,
    /// The path (default `/`).
    #[serde(default = "slash")]
    pub value: String,
}

fn slash() -> String {
    "/".into()
}

/// Path match types.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PathMatchType {
    /// Equal.
    Exact,
    /// Prefix by whole segments (`/foo` matches `/foo/bar`, not `/foobar`).
    #[default]
    PathPrefix,
    /// Regex.
    RegularExpression,
}

/// A header or query parameter match: `{ type: Exact|RegularExpression, name, value }`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpValueMatch {
    /// How to compare (default `Exact`).
    #[serde(default, rename = "type")]
    pub kind: ValueMatchType,
    /// Header or parameter name.
    pub name: String,
    /// The value.
    pub value: String,
}

/// Header and query parameter match types.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum ValueMatchType {
    /// Equal.
    #[default]
    Exact,
    /// Regex.
    RegularExpression,
}

/// A weighted backend.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpBackendRef {
    /// API group (`""` for a Service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// `Service` by default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    /// Name.
    pub name: String,
    /// Namespace (default: the route's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Port (required for a Service).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    /// Relative weight (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Backend-level filters: not supported yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub filters: Option<Unsupported>,
}

/// `{ request, backendRequest }`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteTimeouts {
    /// The whole request, retries included (`0s`: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<Duration>,
    /// One try to the backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend_request: Option<Duration>,
}

impl HttpRoute {
    /// Checks what the Gateway API CRD validation checks: paths, regexes, filter fields,
    /// redirect codes, prefix replacement, backends, weights and timeouts.
    pub fn validate(&self) -> Result<(), Invalid> {
        for (i, p) in self.spec.parent_refs.iter().enumerate() {
            check_non_empty(
                &p.name,
                &format!("spec.parentRefs[{i}].name"),
                "parent name",
            )?;
        }
        for (i, rule) in self.spec.rules.iter().enumerate() {
            validate_rule(rule, &format!("spec.rules[{i}]"))?;
        }
        Ok(())
    }
}

fn validate_rule(rule: &HttpRouteRule, path: &str) -> Result<(), Invalid> {
    for (j, m) in rule.matches.iter().enumerate() {
        let p = format!("{path}.matches[{j}]");
        if let Some(pm) = &m.path {
            if pm.kind == PathMatchType::RegularExpression {
                check_regex(&pm.value, &format!("{p}.path.value"))?;
            } else if !pm.value.starts_with('/') {
                return Err((format!("{p}.path.value"), "path must start with /".into()));
            }
        }
        for (field, list) in [("headers", &m.headers), ("queryParams", &m.query_params)] {
            for (k, v) in list.iter().enumerate() {
                check_non_empty(&v.name, &format!("{p}.{field}[{k}].name"), "name")?;
                if v.kind == ValueMatchType::RegularExpression {
                    check_regex(&v.value, &format!("{p}.{field}[{k}].value"))?;
                }
            }
        }
    }
    // Gateway API's default match is `{ path: { type: PathPrefix, value: / } }`.
    let prefix_matches = rule.matches.len() <= 1
        && !rule
            .matches
            .first()
            .and_then(|m| m.path.as_ref())
            .is_some_and(|p| p.kind != PathMatchType::PathPrefix);
    let has = |t: FilterType| rule.filters.iter().any(|f| f.kind == t);
    if has(FilterType::RequestRedirect) && has(FilterType::UrlRewrite) {
        return Err((
            format!("{path}.filters"),
            "RequestRedirect and URLRewrite are exclusive".into(),
        ));
    }
    for (j, f) in rule.filters.iter().enumerate() {
        f.validate(&format!("{path}.filters[{j}]"), prefix_matches)?;
    }
    for (j, b) in rule.backend_refs.iter().enumerate() {
        let p = format!("{path}.backendRefs[{j}]");
        check_backend(&b.kind, &b.name, b.port, &p)?;
        if b.weight.is_some_and(|w| w > 1_000_000) {
            return Err((format!("{p}.weight"), "weight must be 0..=1000000".into()));
        }
    }
    if let Some(HttpRouteTimeouts {
        request: Some(r),
        backend_request: Some(b),
    }) = &rule.timeouts
    {
        if r.0 > std::time::Duration::ZERO && b > r {
            return Err((
                format!("{path}.timeouts.backendRequest"),
                "backendRequest must not exceed request".into(),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{parse, Resource};
    use super::PathMatchType;
    use std::path::Path;

    const ROUTE: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: reviews, namespace: bookinfo }
spec:
  parentRefs:
  - { group: "", kind: Service, name: reviews, port: 9080 }
  - { name: ingress, namespace: infra, sectionName: https }
  hostnames: [reviews.example.com]
  rules:
  - matches:
    - path: { type: PathPrefix, value: /api }
      headers: [{ name: x-canary, value: "true" }]
      method: GET
    - queryParams: [{ type: RegularExpression, name: v, value: "^2" }]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{ name: x-route, value: canary }]
        remove: [x-debug]
    - type: RequestMirror
      requestMirror: { backendRef: { name: reviews-shadow, port: 9080 } }
    backendRefs:
    - { name: reviews-v1, port: 9080, weight: 90 }
    - { name: reviews-v2, port: 9080, weight: 10 }
    timeouts: { request: 10s, backendRequest: 2s }
  - matches: [{ path: { type: PathPrefix, value: /old } }]
    filters:
    - type: URLRewrite
      urlRewrite: { path: { type: ReplacePrefixMatch, replacePrefixMatch: /new } }
    backendRefs: [{ name: reviews-v1, port: 9080 }]
  - matches: [{ path: { type: Exact, value: /legacy } }]
    filters:
    - type: RequestRedirect
      requestRedirect: { scheme: https, statusCode: 301 }
status:
  parents: []
"#;

    #[test]
    fn canary_route_with_filters_loads() {
        let (ok, errors) = parse(Path::new("x.yaml"), ROUTE);
        assert!(errors.is_empty(), "{errors:?}");
        let Resource::HttpRoute(r) = &ok[0].resource else {
            panic!("{ok:?}")
        };
        let rule = &r.spec.rules[0];
        assert_eq!(rule.backend_refs[1].weight, Some(10));
        let path = rule.matches[0].path.as_ref().unwrap();
        assert_eq!(path.kind, PathMatchType::PathPrefix);
        assert_eq!(
            rule.timeouts.as_ref().unwrap().request.unwrap().0.as_secs(),
            10
        );
    }

    #[test]
    fn errors_name_line_and_field() {
        let cases = [
            ("value: /api", "value: api", "x.yaml:11: HTTPRoute/reviews: spec.rules[0].matches[0].path.value: path must start with /"),
            ("type: RequestRedirect", "type: URLRewrite", "x.yaml:33: HTTPRoute/reviews: spec.rules[2].filters[0]: set exactly the field of type UrlRewrite"),
            ("{ name: reviews-v2, port: 9080, weight: 10 }", "{ name: reviews-v2, weight: 10 }", "x.yaml:24: HTTPRoute/reviews: spec.rules[0].backendRefs[1]: port is required"),
            ("type: PathPrefix, value: /old", "type: Exact, value: /old", "x.yaml:29: HTTPRoute/reviews: spec.rules[1].filters[0].urlRewrite.path: ReplacePrefixMatch needs"),
            ("backendRequest: 2s", "backendRequest: 20s", "x.yaml:25: HTTPRoute/reviews: spec.rules[0].timeouts.backendRequest: backendRequest must not exceed"),
            ("type: RequestHeaderModifier", "type: ExtensionRef", "x.yaml:16: HTTPRoute/reviews: spec.rules[0].filters[0].type: unknown variant `ExtensionRef`"),
        ];
        for (from, to, want) in cases {
            let (_, errors) = parse(Path::new("x.yaml"), &ROUTE.replace(from, to));
            let msg = errors.first().map(|e| e.to_string()).unwrap_or_default();
            assert!(msg.starts_with(want), "{msg}\nwant: {want}");
        }
    }
}

//! Matchers of routes, compiled once per config: Istio `HTTPMatchRequest` (uri, scheme,
//! method, authority, headers, withoutHeaders, queryParams, port, sourceLabels,
//! sourceNamespace, gateways, ignoreUriCase) and, for TCP routes, `L4MatchAttributes` (port,
//! sourceLabels, sourceNamespace, gateways), whose conditions are the [`ConnMatch`] part of
//! an HTTP match.

use http::request::Parts;
use regex::Regex;
use std::collections::BTreeMap;
use trellis_api::resources::common::StringMatch;
use trellis_api::resources::http_match::HttpMatchRequest;
use trellis_api::resources::http_route::{HttpRouteMatch, PathMatchType, ValueMatchType};
use trellis_api::resources::virtual_service::L4MatchAttributes;

/// One compiled string condition.
#[derive(Debug)]
pub enum Str {
    /// Equal.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// The whole value matches.
    Regex(Regex),
    /// A path prefix by whole segments (Gateway API `PathPrefix`): `/api` matches `/api`
    /// and `/api/users`, not `/apis`. Kept without its trailing slash (`/` as empty).
    PathPrefix(String),
    /// Present with any value (an empty `StringMatch` on a header).
    Any,
}

impl Str {
    /// Compiles an Istio `StringMatch` (already validated by the api layer).
    pub fn compile(m: &StringMatch, ignore_case: bool) -> Result<Self, String> {
        let fold = |s: &str| {
            if ignore_case {
                s.to_ascii_lowercase()
            } else {
                s.to_string()
            }
        };
        if let Some(e) = &m.exact {
            return Ok(Str::Exact(fold(e)));
        }
        if let Some(p) = &m.prefix {
            return Ok(Str::Prefix(fold(p)));
        }
        if let Some(r) = &m.regex {
            let anchored = format!("^(?:{r})$");
            return regex::RegexBuilder::new(&anchored)
                .case_insensitive(ignore_case)
                .size_limit(1 << 20)
                .build()
                .map(Str::Regex)
                .map_err(|e| format!("regex {r:?}: {e}"));
        }
        Ok(Str::Any)
    }

    /// Whether `v` matches (`v` already case-folded when the matcher is).
    pub fn matches(&self, v: &str) -> bool {
        match self {
            Str::Exact(e) => v == e,
            Str::Prefix(p) => v.starts_with(p.as_str()),
            Str::Regex(r) => r.is_match(v),
            Str::PathPrefix(p) => v
                .strip_prefix(p.as_str())
                .is_some_and(|rest| rest.is_empty() || rest.starts_with('/')),
            Str::Any => true,
        }
    }
}

/// A literal path condition ([`HttpMatch::literal_path`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Literal<'a> {
    /// The path equals this.
    Exact(&'a str),
    /// The path starts with this.
    Prefix(&'a str),
}

/// What a match sees of the request besides its head.
pub struct MatchContext<'a> {
    /// The path of the request (no query).
    pub path: &'a str,
    /// The host the client addressed, without port.
    pub authority: &'a str,
    /// The port the client addressed (or the listener's).
    pub port: Option<u16>,
    /// This (calling) workload.
    pub source: Source<'a>,
}

/// One compiled `HTTPMatchRequest`: every condition must hold.
#[derive(Debug)]
pub struct HttpMatch {
    uri: Option<Str>,
    ignore_uri_case: bool,
    scheme: Option<Str>,
    method: Option<Str>,
    authority: Option<Str>,
    headers: Vec<(http::HeaderName, Str)>,
    without_headers: Vec<(http::HeaderName, Str)>,
    query: Vec<(String, Str)>,
    conn: ConnMatch,
}

/// The conditions on the connection rather than the request, shared by HTTP and TCP matches:
/// the port the client addressed, and who calls (this proxy's own workload: its labels and
/// namespace). A match that names `gateways` without `mesh` is for gateways only and never
/// matches in a sidecar.
#[derive(Debug, Default)]
pub struct ConnMatch {
    port: Option<u16>,
    source_labels: BTreeMap<String, String>,
    source_namespace: Option<String>,
    gateways_only: bool,
}

impl ConnMatch {
    fn new(
        port: Option<u32>,
        source_labels: &BTreeMap<String, String>,
        source_namespace: &Option<String>,
        gateways: &[String],
    ) -> Self {
        Self {
            port: port.and_then(|p| u16::try_from(p).ok()),
            source_labels: source_labels.clone(),
            source_namespace: source_namespace.clone(),
            gateways_only: !gateways.is_empty() && !gateways.iter().any(|g| g == "mesh"),
        }
    }

    /// Compiles a TCP route's match.
    pub fn compile_l4(m: &L4MatchAttributes) -> Result<Self, String> {
        if !m.destination_subnets.is_empty() {
            return Err("destinationSubnets: not enforced by this proxy yet".into());
        }
        Ok(Self::new(
            m.port,
            &m.source_labels,
            &m.source_namespace,
            &m.gateways,
        ))
    }

    /// Whether a connection to `port` from this workload matches.
    pub fn matches(&self, port: Option<u16>, source: &Source<'_>) -> bool {
        !self.gateways_only
            && self.port.is_none_or(|p| port == Some(p))
            && self
                .source_labels
                .iter()
                .all(|(k, v)| source.labels.get(k) == Some(v))
            && self
                .source_namespace
                .as_ref()
                .is_none_or(|ns| ns == source.namespace)
    }
}

/// The calling workload (this proxy's own), as `sourceLabels` and `sourceNamespace` see it.
#[derive(Clone, Copy)]
pub struct Source<'a> {
    /// Its labels.
    pub labels: &'a BTreeMap<String, String>,
    /// Its namespace.
    pub namespace: &'a str,
}

impl HttpMatch {
    /// Compiles one match block.
    pub fn compile(m: &HttpMatchRequest) -> Result<Self, String> {
        let opt =
            |s: &Option<StringMatch>, ci: bool| s.as_ref().map(|s| Str::compile(s, ci)).transpose();
        let header_list = |map: &BTreeMap<String, StringMatch>| {
            map.iter()
                .map(|(k, v)| {
                    let name = http::HeaderName::from_bytes(k.as_bytes())
                        .map_err(|_| format!("invalid header name {k:?}"))?;
                    Ok((name, Str::compile(v, false)?))
                })
                .collect::<Result<Vec<_>, String>>()
        };
        Ok(Self {
            uri: opt(&m.uri, m.ignore_uri_case)?,
            ignore_uri_case: m.ignore_uri_case,
            scheme: opt(&m.scheme, false)?,
            method: opt(&m.method, false)?,
            authority: opt(&m.authority, false)?,
            headers: header_list(&m.headers)?,
            without_headers: header_list(&m.without_headers)?,
            query: m
                .query_params
                .iter()
                .map(|(k, v)| Ok((k.clone(), Str::compile(v, false)?)))
                .collect::<Result<_, String>>()?,
            conn: ConnMatch::new(m.port, &m.source_labels, &m.source_namespace, &m.gateways),
        })
    }

    /// Compiles a Gateway API `HTTPRouteMatch` (already validated by the api layer): header
    /// names are case-insensitive, `PathPrefix` matches whole segments, regexes match the
    /// whole value.
    pub fn from_gateway(m: &HttpRouteMatch) -> Result<Self, String> {
        let value = |kind: ValueMatchType, v: &str| match kind {
            ValueMatchType::Exact => Ok(Str::Exact(v.to_string())),
            ValueMatchType::RegularExpression => Str::compile(
                &StringMatch {
                    regex: Some(v.to_string()),
                    ..StringMatch::default()
                },
                false,
            ),
        };
        let uri = match &m.path {
            None => None,
            Some(p) => Some(match p.kind {
                PathMatchType::Exact => Str::Exact(p.value.clone()),
                PathMatchType::PathPrefix => {
                    Str::PathPrefix(p.value.trim_end_matches('/').to_string())
                }
                PathMatchType::RegularExpression => {
                    value(ValueMatchType::RegularExpression, &p.value)?
                }
            }),
        };
        Ok(Self {
            uri,
            ignore_uri_case: false,
            scheme: None,
            method: m.method.as_ref().map(|v| Str::Exact(v.clone())),
            authority: None,
            headers: m
                .headers
                .iter()
                .map(|h| {
                    let name = http::HeaderName::from_bytes(h.name.to_ascii_lowercase().as_bytes())
                        .map_err(|_| format!("invalid header name {:?}", h.name))?;
                    Ok((name, value(h.kind, &h.value)?))
                })
                .collect::<Result<_, String>>()?,
            without_headers: Vec::new(),
            query: m
                .query_params
                .iter()
                .map(|q| Ok((q.name.clone(), value(q.kind, &q.value)?)))
                .collect::<Result<_, String>>()?,
            conn: ConnMatch::default(),
        })
    }

    /// Whether the request matches.
    pub fn matches(&self, head: &Parts, cx: &MatchContext<'_>) -> bool {
        if let Some(u) = &self.uri {
            let ok = if self.ignore_uri_case {
                u.matches(&cx.path.to_ascii_lowercase())
            } else {
                u.matches(cx.path)
            };
            if !ok {
                return false;
            }
        }
        if let Some(m) = &self.method {
            if !m.matches(head.method.as_str()) {
                return false;
            }
        }
        if let Some(s) = &self.scheme {
            if !s.matches(head.uri.scheme_str().unwrap_or("http")) {
                return false;
            }
        }
        if let Some(a) = &self.authority {
            if !a.matches(cx.authority) {
                return false;
            }
        }
        if !self.conn.matches(cx.port, &cx.source) {
            return false;
        }
        for (name, m) in &self.headers {
            let any = head
                .headers
                .get_all(name)
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| m.matches(v)));
            if !any {
                return false;
            }
        }
        for (name, m) in &self.without_headers {
            if head
                .headers
                .get_all(name)
                .iter()
                .any(|v| v.to_str().is_ok_and(|v| m.matches(v)))
            {
                return false;
            }
        }
        if !self.query.is_empty() {
            let q = head.uri.query().unwrap_or("");
            for (name, m) in &self.query {
                let found = q.split('&').filter_map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (k == name).then_some(v)
                });
                if !found.into_iter().any(|v| m.matches(v)) {
                    return false;
                }
            }
        }
        true
    }

    /// The literal condition on the path, if any, for indexing routes: every path this match
    /// can match equals the `Exact` string or starts with the `Prefix` one.
    pub fn literal_path(&self) -> Option<Literal<'_>> {
        if self.ignore_uri_case {
            return None;
        }
        match &self.uri {
            Some(Str::Exact(e)) => Some(Literal::Exact(e)),
            Some(Str::Prefix(p) | Str::PathPrefix(p)) => Some(Literal::Prefix(p)),
            _ => None,
        }
    }

    /// The literal prefix the uri matched by, for a prefix rewrite (for exact and regex
    /// matches the whole path is replaced), and whether it is a Gateway API segment prefix.
    pub fn uri_prefix(&self) -> Option<(&str, bool)> {
        match &self.uri {
            Some(Str::Prefix(p)) => Some((p, false)),
            Some(Str::PathPrefix(p)) => Some((p, true)),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(uri: &str, headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::builder().method("GET").uri(uri);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn compile(yaml: &str) -> HttpMatch {
        let m: HttpMatchRequest = serde_yaml_ng::from_str(yaml).unwrap();
        HttpMatch::compile(&m).unwrap()
    }

    fn cx(path: &str) -> MatchContext<'static> {
        static LABELS: std::sync::OnceLock<BTreeMap<String, String>> = std::sync::OnceLock::new();
        let labels = LABELS.get_or_init(|| [("app".to_string(), "web".to_string())].into());
        MatchContext {
            path: Box::leak(path.to_string().into_boxed_str()),
            authority: "reviews",
            port: Some(9080),
            source: Source {
                labels,
                namespace: "edtech",
            },
        }
    }

    #[test]
    fn uri_method_headers_query_and_source() {
        let m = compile("uri: { prefix: /api }\nmethod: { exact: GET }\nheaders: { x-canary: { exact: \"true\" } }\nqueryParams: { v: { regex: \"[0-9]+\" } }\nsourceLabels: { app: web }\nport: 9080\n");
        let ok = head("/api/x?v=12", &[("x-canary", "true")]);
        assert!(m.matches(&ok, &cx("/api/x")));
        assert!(!m.matches(&head("/api/x?v=1a", &[("x-canary", "true")]), &cx("/api/x")));
        assert!(!m.matches(&head("/api/x?v=12", &[]), &cx("/api/x")));
        assert!(!m.matches(&ok, &cx("/other")));
        let m = compile("withoutHeaders: { x-canary: {} }\n");
        assert!(m.matches(&head("/", &[]), &cx("/")));
        assert!(!m.matches(&head("/", &[("x-canary", "no")]), &cx("/")));
    }

    #[test]
    fn regex_is_anchored_and_case_folding_is_opt_in() {
        let m = compile("uri: { regex: \"/u/[0-9]+\" }\n");
        assert!(m.matches(&head("/", &[]), &cx("/u/12")));
        assert!(!m.matches(&head("/", &[]), &cx("/u/12/x")));
        let m = compile("uri: { exact: /Admin }\nignoreUriCase: true\n");
        assert!(m.matches(&head("/", &[]), &cx("/ADMIN")));
        let m = compile("uri: { exact: /Admin }\n");
        assert!(!m.matches(&head("/", &[]), &cx("/ADMIN")));
    }
}

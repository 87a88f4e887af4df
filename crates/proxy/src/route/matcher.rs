//! Request matchers of a route, compiled once per config: Istio `HTTPMatchRequest` (uri,
//! scheme, method, authority, headers, withoutHeaders, queryParams, port, sourceLabels,
//! sourceNamespace, ignoreUriCase).

use http::request::Parts;
use regex::Regex;
use std::collections::BTreeMap;
use trellis_api::resources::common::StringMatch;
use trellis_api::resources::http_match::HttpMatchRequest;

/// One compiled string condition.
#[derive(Debug)]
pub enum Str {
    /// Equal.
    Exact(String),
    /// Starts with.
    Prefix(String),
    /// The whole value matches.
    Regex(Regex),
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
            Str::Any => true,
        }
    }
}

/// What a match sees of the request besides its head.
pub struct MatchContext<'a> {
    /// The path of the request (no query).
    pub path: &'a str,
    /// The host the client addressed, without port.
    pub authority: &'a str,
    /// The port the client addressed (or the listener's).
    pub port: Option<u16>,
    /// Labels of this (calling) workload.
    pub source_labels: &'a BTreeMap<String, String>,
    /// Namespace of this (calling) workload.
    pub source_namespace: &'a str,
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
    port: Option<u16>,
    source_labels: BTreeMap<String, String>,
    source_namespace: Option<String>,
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
            port: m.port.and_then(|p| u16::try_from(p).ok()),
            source_labels: m.source_labels.clone(),
            source_namespace: m.source_namespace.clone(),
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
        if let Some(p) = self.port {
            if cx.port != Some(p) {
                return false;
            }
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
        if !self.source_labels.is_empty()
            && !self
                .source_labels
                .iter()
                .all(|(k, v)| cx.source_labels.get(k) == Some(v))
        {
            return false;
        }
        if let Some(ns) = &self.source_namespace {
            if ns != cx.source_namespace {
                return false;
            }
        }
        true
    }

    /// The literal prefix the uri matched by, for `rewrite.uri` (Istio replaces the matched
    /// prefix; for exact and regex matches the whole path).
    pub fn uri_prefix(&self) -> Option<&str> {
        match &self.uri {
            Some(Str::Prefix(p)) => Some(p),
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
            source_labels: labels,
            source_namespace: "edtech",
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

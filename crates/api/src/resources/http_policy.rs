//! The policies of an Istio VirtualService HTTP route: redirect, direct response, rewrite,
//! retries, fault injection, mirrors, CORS and header changes.

use super::common::{
    check_non_empty, check_percent, check_port, check_regex, Invalid, Percent, StringMatch,
};
use super::virtual_service::Destination;
use crate::duration::Duration;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Answer with a redirect.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRedirect {
    /// Replace the path with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// Replace the authority with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    /// Replace the port with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    /// Take the port from the request or the scheme's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub derive_port: Option<DerivePort>,
    /// Replace the scheme with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// Status code (default 301).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redirect_code: Option<u32>,
}

/// Where a redirect's port comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum DerivePort {
    /// 80 for http, 443 for https.
    FromProtocolDefault,
    /// The port of the request.
    FromRequestPort,
}

impl HttpRedirect {
    /// Checks port and status code.
    pub fn validate(&self, path: &str) -> Result<(), Invalid> {
        if let Some(p) = self.port {
            check_port(p, &format!("{path}.port"))?;
            if self.derive_port.is_some() {
                return Err((
                    format!("{path}.derivePort"),
                    "port and derivePort are exclusive".into(),
                ));
            }
        }
        match self.redirect_code {
            Some(c) if !(300..=399).contains(&c) => Err((
                format!("{path}.redirectCode"),
                format!("{c} is not a redirect status (3xx)"),
            )),
            _ => Ok(()),
        }
    }
}

/// Answer with a fixed response.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpDirectResponse {
    /// Status code.
    pub status: u32,
    /// Body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<HttpBody>,
}

/// A response body: text or base64 bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpBody {
    /// Text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub string: Option<String>,
    /// Base64-encoded bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<String>,
}

impl HttpDirectResponse {
    /// Checks status and body.
    pub fn validate(&self, path: &str) -> Result<(), Invalid> {
        if !(200..=599).contains(&self.status) {
            return Err((
                format!("{path}.status"),
                format!("{} is not in 200..=599", self.status),
            ));
        }
        match &self.body {
            Some(b) if b.string.is_some() == b.bytes.is_some() => Err((
                format!("{path}.body"),
                "set exactly one of string or bytes".into(),
            )),
            _ => Ok(()),
        }
    }
}

/// Rewrite before forwarding.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRewrite {
    /// Replace the matched part of the path (the prefix, or the whole exact path) with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<String>,
    /// Replace the authority with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
    /// Rewrite the path with a regex.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri_regex_rewrite: Option<RegexRewrite>,
}

/// `{ match: <regex>, rewrite: <replacement with \1 groups> }`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegexRewrite {
    /// The regex.
    #[serde(rename = "match")]
    pub pattern: String,
    /// The replacement.
    pub rewrite: String,
}

impl HttpRewrite {
    /// Checks exclusivity and the regex.
    pub fn validate(&self, path: &str) -> Result<(), Invalid> {
        if let Some(r) = &self.uri_regex_rewrite {
            if self.uri.is_some() {
                return Err((
                    format!("{path}.uriRegexRewrite"),
                    "uri and uriRegexRewrite are exclusive".into(),
                ));
            }
            check_regex(&r.pattern, &format!("{path}.uriRegexRewrite.match"))?;
        }
        Ok(())
    }
}

/// Retry policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRetry {
    /// Retries allowed (0 disables retries).
    #[serde(default)]
    pub attempts: u32,
    /// Timeout of each try (at least 1ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_try_timeout: Option<Duration>,
    /// Comma-separated conditions (`5xx`, `gateway-error`, `reset`, `connect-failure`,
    /// `retriable-4xx`, `refused-stream`, gRPC status names, status codes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_on: Option<String>,
    /// Whether retries may go to other localities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_remote_localities: Option<bool>,
    /// Whether retries avoid hosts already tried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_ignore_previous_hosts: Option<bool>,
    /// Base interval between retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<Duration>,
}

impl HttpRetry {
    /// Checks the per-try timeout and the retry conditions.
    pub fn validate(&self, path: &str) -> Result<(), Invalid> {
        if let Some(t) = self.per_try_timeout {
            if t.0.as_micros() < 1000 {
                return Err((
                    format!("{path}.perTryTimeout"),
                    "must be at least 1ms".into(),
                ));
            }
        }
        if let Some(on) = &self.retry_on {
            if on.split(',').any(|c| c.trim().is_empty()) {
                return Err((
                    format!("{path}.retryOn"),
                    format!("empty condition in {on:?}"),
                ));
            }
        }
        Ok(())
    }
}

/// Fault injection: delays and/or aborts.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpFaultInjection {
    /// Delay some requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delay: Option<Delay>,
    /// Abort some requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort: Option<Abort>,
}

/// Delay before forwarding.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Delay {
    /// The delay.
    pub fixed_delay: Duration,
    /// Share of requests delayed (default all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<Percent>,
    /// Deprecated integer share (use `percentage`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
}

/// Answer with an error instead of forwarding.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Abort {
    /// HTTP status to answer with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http_status: Option<u32>,
    /// gRPC status to answer with (name, e.g. `UNAVAILABLE`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grpc_status: Option<String>,
    /// Share of requests aborted (default all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<Percent>,
}

impl HttpFaultInjection {
    /// Checks that a fault is given, statuses and percentages.
    pub fn validate(&self, path: &str) -> Result<(), Invalid> {
        if self.delay.is_none() && self.abort.is_none() {
            return Err((path.into(), "set delay, abort or both".into()));
        }
        if let Some(d) = &self.delay {
            if let Some(p) = &d.percentage {
                p.validate(&format!("{path}.delay.percentage"))?;
            }
            if let Some(p) = d.percent {
                check_percent(f64::from(p), &format!("{path}.delay.percent"))?;
            }
        }
        if let Some(a) = &self.abort {
            let p = format!("{path}.abort");
            match (a.http_status, &a.grpc_status) {
                (Some(s), None) if !(200..=599).contains(&s) => {
                    return Err((
                        format!("{p}.httpStatus"),
                        format!("{s} is not in 200..=599"),
                    ))
                }
                (Some(_), None) | (None, Some(_)) => {}
                _ => return Err((p, "set exactly one of httpStatus or grpcStatus".into())),
            }
            if let Some(pc) = &a.percentage {
                pc.validate(&format!("{p}.percentage"))?;
            }
        }
        Ok(())
    }
}

/// One of several mirrors.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMirrorPolicy {
    /// Where to mirror.
    pub destination: Destination,
    /// Share of requests mirrored (default 100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percentage: Option<Percent>,
}

impl HttpMirrorPolicy {
    /// Checks destination and share.
    pub fn validate(&self, path: &str) -> Result<(), Invalid> {
        self.destination.validate(&format!("{path}.destination"))?;
        match &self.percentage {
            Some(p) => p.validate(&format!("{path}.percentage")),
            None => Ok(()),
        }
    }
}

/// Cross-origin resource sharing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CorsPolicy {
    /// Allowed origins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_origins: Vec<StringMatch>,
    /// Deprecated exact origins (use `allowOrigins`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_origin: Vec<String>,
    /// `Access-Control-Allow-Methods`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_methods: Vec<String>,
    /// `Access-Control-Allow-Headers`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow_headers: Vec<String>,
    /// `Access-Control-Expose-Headers`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub expose_headers: Vec<String>,
    /// `Access-Control-Max-Age`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<Duration>,
    /// `Access-Control-Allow-Credentials`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_credentials: Option<bool>,
    /// What to do with preflight requests from origins not allowed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unmatched_preflights: Option<UnmatchedPreflights>,
}

/// Handling of preflight requests that do not match the policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum UnmatchedPreflights {
    /// Default (forward).
    Unspecified,
    /// Forward to the upstream.
    Forward,
    /// Answer without CORS headers.
    Ignore,
}

impl CorsPolicy {
    /// Checks the origin matches.
    pub fn validate(&self, path: &str) -> Result<(), Invalid> {
        for (i, o) in self.allow_origins.iter().enumerate() {
            o.validate(&format!("{path}.allowOrigins[{i}]"), false)?;
        }
        Ok(())
    }
}

/// Header changes for request and response.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Headers {
    /// On the request, before forwarding.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<HeaderOperations>,
    /// On the response, before returning it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response: Option<HeaderOperations>,
}

/// Set, append and remove headers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HeaderOperations {
    /// Overwrite.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub set: BTreeMap<String, String>,
    /// Append.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub add: BTreeMap<String, String>,
    /// Remove.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

impl Headers {
    /// Checks both sides.
    pub fn validate(&self, path: &str) -> Result<(), Invalid> {
        for (side, ops) in [("request", &self.request), ("response", &self.response)] {
            if let Some(ops) = ops {
                ops.validate(&format!("{path}.{side}"))?;
            }
        }
        Ok(())
    }
}

impl HeaderOperations {
    /// Checks that header names are not empty.
    pub fn validate(&self, path: &str) -> Result<(), Invalid> {
        for (op, names) in [
            ("set", self.set.keys().collect::<Vec<_>>()),
            ("add", self.add.keys().collect()),
            ("remove", self.remove.iter().collect()),
        ] {
            for n in names {
                check_non_empty(n, &format!("{path}.{op}"), "header name")?;
            }
        }
        Ok(())
    }
}

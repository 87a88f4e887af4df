//! The conditions of an Istio VirtualService HTTP route (`match`): path, scheme, method,
//! authority, headers, query parameters, port and source.

use super::common::{check_port, Invalid, StringMatch};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Conditions on a request; all the given ones must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpMatchRequest {
    /// Name (joined to the route's name in logs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uri: Option<StringMatch>,
    /// The scheme (`http`, `https`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<StringMatch>,
    /// The method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<StringMatch>,
    /// The authority (Host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<StringMatch>,
    /// Headers by lower-case name; `{}` means "present".
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, StringMatch>,
    /// The port the request was sent to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    /// Labels of the calling workload.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub source_labels: BTreeMap<String, String>,
    /// Gateways this match applies to (overrides the spec's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gateways: Vec<String>,
    /// Query parameters (`exact` or `regex`; `{}` means "present").
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub query_params: BTreeMap<String, StringMatch>,
    /// Compare `uri` case-insensitively.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ignore_uri_case: bool,
    /// Headers that must not match.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub without_headers: BTreeMap<String, StringMatch>,
    /// Namespace of the calling workload.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_namespace: Option<String>,
    /// Prefix of the route's stats names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stat_prefix: Option<String>,
}

impl HttpMatchRequest {
    /// Checks string matches (exactly one of exact/prefix/regex; `{}` allowed for headers and
    /// query parameters), regexes, lower-case header names and the port.
    pub fn validate(&self, path: &str) -> Result<(), Invalid> {
        let m = self;
        for (name, sm) in [
            ("uri", &m.uri),
            ("scheme", &m.scheme),
            ("method", &m.method),
            ("authority", &m.authority),
        ] {
            if let Some(sm) = sm {
                sm.validate(&format!("{path}.{name}"), false)?;
            }
        }
        for (field, map) in [
            ("headers", &m.headers),
            ("withoutHeaders", &m.without_headers),
        ] {
            for (name, sm) in map {
                let p = format!("{path}.{field}.{name}");
                if name.is_empty() || name.chars().any(|c| c.is_ascii_uppercase()) {
                    return Err((
                        p,
                        format!("header name {name:?} must be non-empty lower case"),
                    ));
                }
                sm.validate(&p, true)?;
            }
        }
        for (name, sm) in &m.query_params {
            let p = format!("{path}.queryParams.{name}");
            if sm.prefix.is_some() {
                return Err((
                    format!("{p}.prefix"),
                    "query parameters match by exact or regex only".into(),
                ));
            }
            sm.validate(&p, true)?;
        }
        if let Some(p) = m.port {
            check_port(p, &format!("{path}.port"))?;
        }
        Ok(())
    }
}

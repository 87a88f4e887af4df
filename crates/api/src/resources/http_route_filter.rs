//! Gateway API HTTPRoute filters: header modifiers, redirects, URL rewrites and mirrors.

use super::common::{check_non_empty, check_port, Invalid};
use super::Unsupported;
use serde::{Deserialize, Serialize};

/// A filter: `type` and the field of that type.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpRouteFilter {
    /// Which filter.
    #[serde(rename = "type")]
    pub kind: FilterType,
    /// Request header changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_header_modifier: Option<HeaderFilter>,
    /// Response header changes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_header_modifier: Option<HeaderFilter>,
    /// Answer with a redirect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_redirect: Option<RedirectFilter>,
    /// Rewrite host or path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_rewrite: Option<UrlRewriteFilter>,
    /// Mirror to another backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_mirror: Option<MirrorFilter>,
    /// Implementation-specific filter: not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub extension_ref: Option<Unsupported>,
}

/// Filter types (`ExtensionRef` and experimental ones are refused).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum FilterType {
    /// `requestHeaderModifier`.
    RequestHeaderModifier,
    /// `responseHeaderModifier`.
    ResponseHeaderModifier,
    /// `requestRedirect`.
    RequestRedirect,
    /// `urlRewrite`.
    #[serde(rename = "URLRewrite")]
    UrlRewrite,
    /// `requestMirror`.
    RequestMirror,
}

/// Header changes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderFilter {
    /// Overwrite.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub set: Vec<HeaderValue>,
    /// Append.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add: Vec<HeaderValue>,
    /// Remove by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remove: Vec<String>,
}

/// `{ name, value }`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderValue {
    /// Header name.
    pub name: String,
    /// Value.
    pub value: String,
}

/// A redirect.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RedirectFilter {
    /// `http` or `https`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheme: Option<String>,
    /// Host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Path change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
    /// Port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u32>,
    /// 301 or 302 (default 302).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status_code: Option<u32>,
}

/// A rewrite before forwarding.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UrlRewriteFilter {
    /// Host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    /// Path change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathModifier>,
}

/// `{ type: ReplaceFullPath, replaceFullPath }` or `{ type: ReplacePrefixMatch, replacePrefixMatch }`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PathModifier {
    /// `ReplaceFullPath` or `ReplacePrefixMatch`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The new path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_full_path: Option<String>,
    /// The new prefix, replacing the matched `PathPrefix`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replace_prefix_match: Option<String>,
}

/// Mirror requests to a backend.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MirrorFilter {
    /// Where to mirror.
    pub backend_ref: BackendObjectReference,
    /// Share of requests mirrored (0..=100).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
    /// Share of requests mirrored as a fraction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fraction: Option<Fraction>,
}

/// `{ numerator, denominator }` (denominator default 100).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fraction {
    /// Numerator.
    pub numerator: u32,
    /// Denominator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub denominator: Option<u32>,
}

/// A backend without weight (mirror target).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BackendObjectReference {
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
}

impl HttpRouteFilter {
    /// Checks that exactly the field of `type` is set, redirect codes and ports, path
    /// modifiers (`ReplacePrefixMatch` needs the rule's single match to be a `PathPrefix`:
    /// `prefix_matches`) and the mirror backend.
    pub fn validate(&self, p: &str, prefix_matches: bool) -> Result<(), Invalid> {
        let set = [
            (
                FilterType::RequestHeaderModifier,
                self.request_header_modifier.is_some(),
            ),
            (
                FilterType::ResponseHeaderModifier,
                self.response_header_modifier.is_some(),
            ),
            (FilterType::RequestRedirect, self.request_redirect.is_some()),
            (FilterType::UrlRewrite, self.url_rewrite.is_some()),
            (FilterType::RequestMirror, self.request_mirror.is_some()),
        ];
        if set.iter().any(|(t, s)| *s != (*t == self.kind)) {
            return Err((
                p.into(),
                format!("set exactly the field of type {:?}", self.kind),
            ));
        }
        let modifier = match (&self.request_redirect, &self.url_rewrite) {
            (Some(r), _) => {
                if let Some(c) = r.status_code {
                    if ![301, 302, 303, 307, 308].contains(&c) {
                        return Err((
                            format!("{p}.requestRedirect.statusCode"),
                            format!("{c} is not 301, 302, 303, 307 or 308"),
                        ));
                    }
                }
                if let Some(port) = r.port {
                    check_port(port, &format!("{p}.requestRedirect.port"))?;
                }
                r.path
                    .as_ref()
                    .map(|m| (m, format!("{p}.requestRedirect.path")))
            }
            (None, Some(u)) => u.path.as_ref().map(|m| (m, format!("{p}.urlRewrite.path"))),
            (None, None) => None,
        };
        if let Some((m, mp)) = modifier {
            match (m.kind.as_str(), &m.replace_full_path, &m.replace_prefix_match) {
                ("ReplaceFullPath", Some(_), None) => {}
                ("ReplacePrefixMatch", None, Some(_)) if prefix_matches => {}
                ("ReplacePrefixMatch", None, Some(_)) => {
                    return Err((mp, "ReplacePrefixMatch needs exactly one PathPrefix match in the rule".into()))
                }
                _ => return Err((mp, "type ReplaceFullPath with replaceFullPath, or ReplacePrefixMatch with replacePrefixMatch".into())),
            }
        }
        if let Some(m) = &self.request_mirror {
            let b = &m.backend_ref;
            check_backend(
                &b.kind,
                &b.name,
                b.port,
                &format!("{p}.requestMirror.backendRef"),
            )?;
            if m.percent.is_some_and(|v| v > 100) {
                return Err((
                    format!("{p}.requestMirror.percent"),
                    "percent must be 0..=100".into(),
                ));
            }
        }
        Ok(())
    }
}

/// Checks a backend reference: a name, and a port (required for a Service).
pub(super) fn check_backend(
    kind: &Option<String>,
    name: &str,
    port: Option<u32>,
    path: &str,
) -> Result<(), Invalid> {
    check_non_empty(name, &format!("{path}.name"), "backend name")?;
    match port {
        Some(p) => check_port(p, &format!("{path}.port")),
        None if kind.as_deref().unwrap_or("Service") == "Service" => {
            Err((path.into(), "port is required for a Service backend".into()))
        }
        None => Ok(()),
    }
}

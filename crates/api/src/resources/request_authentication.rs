//! Istio's `RequestAuthentication`: which JWTs a workload accepts. A request with an invalid
//! token is rejected; one without a token passes (an AuthorizationPolicy on
//! `requestPrincipals` requires one).

use super::common::{check_non_empty, Invalid};
use super::{ObjectMeta, Unsupported, WorkloadSelector};
use crate::duration::Duration;
use serde::{Deserialize, Serialize};

/// apiVersions accepted for this kind.
pub const API_VERSIONS: [&str; 2] = super::peer_authentication::API_VERSIONS;

/// The resource.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestAuthentication {
    /// `security.istio.io/v1` or `v1beta1`.
    pub api_version: String,
    /// `RequestAuthentication`.
    pub kind: String,
    /// Name and namespace.
    pub metadata: ObjectMeta,
    /// The rules.
    #[serde(default)]
    pub spec: RequestAuthenticationSpec,
    /// Server-written status: accepted and ignored.
    #[serde(default, skip_serializing)]
    pub status: Option<serde_yaml_ng::Value>,
}

/// `spec` of a RequestAuthentication.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RequestAuthenticationSpec {
    /// Workloads this applies to; absent: the whole namespace (or mesh, in the root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// Gateway API attachment: not supported yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_ref: Option<Unsupported>,
    /// Gateway API attachment: not supported yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_refs: Option<Unsupported>,
    /// Accepted issuers and how to verify their tokens.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jwt_rules: Vec<JwtRule>,
}

/// One accepted issuer.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JwtRule {
    /// The `iss` claim.
    pub issuer: String,
    /// Accepted `aud` values (empty: any).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    /// Where to fetch the JWKS: `https://`, `http://` or `file:///absolute/path`; Istio's
    /// default (the issuer's OpenID discovery) is not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks_uri: Option<String>,
    /// The JWKS inline, as a JSON string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwks: Option<String>,
    /// Headers carrying the token (default `Authorization: Bearer`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_headers: Vec<JwtHeader>,
    /// Query parameters carrying the token (default `access_token`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_params: Vec<String>,
    /// Cookies carrying the token.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_cookies: Vec<String>,
    /// Header to receive the verified payload (base64url JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_payload_to_header: Option<String>,
    /// Keep the token in the forwarded request (default: removed).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub forward_original_token: bool,
    /// Copy claims into request headers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub output_claim_to_headers: Vec<ClaimToHeader>,
    /// Timeout of the JWKS fetch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
}

/// `{ name, prefix }`: a header carrying the token after `prefix`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtHeader {
    /// Header name.
    pub name: String,
    /// Prefix before the token, e.g. `"Bearer "`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
}

/// `{ header, claim }`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimToHeader {
    /// The request header to set.
    pub header: String,
    /// The claim (nested with `.`).
    pub claim: String,
}

impl RequestAuthentication {
    /// Checks issuers, the JWKS source, and the header and claim names.
    pub fn validate(&self) -> Result<(), Invalid> {
        for (i, r) in self.spec.jwt_rules.iter().enumerate() {
            let path = format!("spec.jwtRules[{i}]");
            check_non_empty(&r.issuer, &format!("{path}.issuer"), "issuer")?;
            if r.jwks.is_some() && r.jwks_uri.is_some() {
                return Err((
                    format!("{path}.jwks"),
                    "jwks and jwksUri are exclusive".into(),
                ));
            }
            if let Some(uri) = &r.jwks_uri {
                let remote = ["https://", "http://"]
                    .iter()
                    .any(|s| uri.strip_prefix(s).is_some_and(|h| !h.is_empty()));
                // A key set on the workload's disk: only an absolute path means one file.
                let file = uri.strip_prefix("file:///").is_some_and(|p| !p.is_empty());
                if !remote && !file {
                    return Err((
                        format!("{path}.jwksUri"),
                        format!("{uri:?} is not an http(s) URL or a file:///absolute/path"),
                    ));
                }
            }
            for (j, h) in r.from_headers.iter().enumerate() {
                check_non_empty(
                    &h.name,
                    &format!("{path}.fromHeaders[{j}].name"),
                    "header name",
                )?;
            }
            for (j, p) in r.from_params.iter().enumerate() {
                check_non_empty(p, &format!("{path}.fromParams[{j}]"), "parameter name")?;
            }
            for (j, c) in r.output_claim_to_headers.iter().enumerate() {
                let p = format!("{path}.outputClaimToHeaders[{j}]");
                check_non_empty(&c.header, &format!("{p}.header"), "header")?;
                check_non_empty(&c.claim, &format!("{p}.claim"), "claim")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{parse, Resource};
    use std::path::Path;

    const JWT: &str = r#"apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata: { name: jwt, namespace: edtech }
spec:
  selector: { matchLabels: { app: api } }
  jwtRules:
  - issuer: https://accounts.example.com
    audiences: [api.example.com]
    jwksUri: https://accounts.example.com/.well-known/jwks.json
    fromHeaders: [{ name: x-jwt-assertion, prefix: "Bearer " }]
    fromParams: [token]
    fromCookies: [session]
    outputPayloadToHeader: x-jwt-payload
    forwardOriginalToken: true
    outputClaimToHeaders: [{ header: x-user-id, claim: sub }]
  - issuer: testing@secure.istio.io
    jwks: '{"keys": []}'
"#;

    #[test]
    fn jwt_rules_load() {
        let (ok, errors) = parse(Path::new("x.yaml"), JWT);
        assert!(errors.is_empty(), "{errors:?}");
        let Resource::RequestAuthentication(r) = &ok[0].resource else {
            panic!("{ok:?}")
        };
        assert_eq!(r.spec.jwt_rules.len(), 2);
        assert!(r.spec.jwt_rules[0].forward_original_token);
    }

    #[test]
    fn errors_name_line_and_field() {
        let cases = [
            ("jwksUri: https://", "jwksUri: ftp://", "x.yaml:9: RequestAuthentication/jwt: spec.jwtRules[0].jwksUri: \"ftp://"),
            ("claim: sub", "claim: \"\"", "x.yaml:15: RequestAuthentication/jwt: spec.jwtRules[0].outputClaimToHeaders[0].claim: claim must not be empty"),
            ("    jwks: '", "    jwksUrl: '", "x.yaml:17: RequestAuthentication/jwt: spec.jwtRules[1].jwksUrl: unknown field `jwksUrl`"),
        ];
        for (from, to, want) in cases {
            let (_, errors) = parse(Path::new("x.yaml"), &JWT.replace(from, to));
            let msg = errors.first().map(|e| e.to_string()).unwrap_or_default();
            assert!(msg.starts_with(want), "{msg}\nwant: {want}");
        }
    }

    #[test]
    fn jwks_uri_schemes() {
        let uri = "https://accounts.example.com/.well-known/jwks.json";
        for ok in [
            "http://keys.auth.svc:8080/jwks",
            "file:///etc/trellis/jwks.json",
        ] {
            let (_, errors) = parse(Path::new("x.yaml"), &JWT.replace(uri, ok));
            assert!(errors.is_empty(), "{ok}: {errors:?}");
        }
        for bad in [
            "file://relative/jwks.json",
            "file:///",
            "https://",
            "jwks.json",
        ] {
            let (_, errors) = parse(Path::new("x.yaml"), &JWT.replace(uri, bad));
            let msg = errors.first().map(|e| e.to_string()).unwrap_or_default();
            assert!(
                msg.contains("spec.jwtRules[0].jwksUri") && msg.contains("file:///absolute/path"),
                "{bad}: {msg}"
            );
        }
    }
}

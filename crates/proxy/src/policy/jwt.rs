//! Istio `RequestAuthentication` for one workload: [`JwtAuthn::compile`] keeps the JWT rules
//! that apply to it; [`JwtAuthn::authenticate`] finds and verifies a request's token, giving
//! the [`JwtAttrs`] authorization reads and the [`JwtEffects`] to apply to the forwarded
//! request.
//!
//! Semantics follow Istio (istio.io reference "RequestAuthentication" and "JWTRule"; the
//! generator `pilot/pkg/security/authn`, which turns every rule into an Envoy `jwt_authn`
//! provider required as `{provider OR allow_missing}`):
//! - A request without a token passes ([`Authn::NoToken`]); an AuthorizationPolicy on
//!   `requestPrincipals` is what requires one. A request with a token that fails any check
//!   is rejected with 401 ([`Authn::Invalid`]), including a token whose `iss` no rule at that
//!   location accepts (Envoy's "Jwt issuer is not configured"). More than one token is
//!   rejected too (Istio leaves the principal undefined then; we refuse to guess).
//! - Locations: a rule with `fromHeaders`, `fromParams` or `fromCookies` reads only those;
//!   one without reads `Authorization: Bearer <token>` and the `access_token` query
//!   parameter. A header whose value lacks the configured prefix holds no token (as Envoy's
//!   extractor skips it), so `Authorization: Basic ...` passes untouched.
//! - The token's unverified `iss` picks the rule; its `kid` picks the key from that issuer's
//!   JWKS (no `kid`: every key of a fitting type is tried). The algorithm must fit the key:
//!   RSA for RS*/PS*, P-256 for ES256, P-384 for ES384, Ed25519 for EdDSA. `none` and HMAC
//!   are never accepted, and keys a token carries itself (`jwk`, `jku`, `x5u`) are ignored.
//! - `exp` and `nbf` are checked when present, with [`CLOCK_SKEW_LEEWAY`] (Envoy's default
//!   is the same 60 s). With `audiences`, the token's `aud` must contain one of them (no
//!   `aud` fails); without, any `aud` is accepted, as Envoy does with an empty list.
//! - Principal `<iss>/<sub>` (`request.auth.principal`), audiences from `aud`, and all claims.
//! - Effects on success: the token's header (or query parameter, or cookie) is removed
//!   unless `forwardOriginalToken: true` (Istio's default is false: "If set to true, the
//!   original token will be kept for the upstream request"); `outputPayloadToHeader` gets the
//!   payload as unpadded base64url; `outputClaimToHeaders` copies string, number and boolean
//!   claims (`.` for nested ones), overriding the header. Every output header the policies
//!   name is first removed from the request, and [`JwtAuthn::strip_output_headers`] does the
//!   same for requests without a token, so a client cannot forge what the app trusts.

mod fetch;
mod jwks;
mod location;
#[cfg(test)]
mod tests;

pub use jwks::{
    JwksCache, JwksSettings, JwksStatus, JWKS_FETCH_TIMEOUT, JWKS_MIN_REFETCH_INTERVAL,
    JWKS_REFRESH_INTERVAL,
};

use super::authz::JwtAttrs;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::{HeaderMap, HeaderName, HeaderValue};
use jsonwebtoken::Algorithm;
use jwks::{asymmetric_algorithm, JwksSlot, KeySet};
use location::{cookie_name, find_tokens, percent_decode, Location, Place, Prefix};
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use trellis_api::resources::request_authentication::JwtRule;
use trellis_api::resources::RequestAuthentication;

/// Tolerance for clock skew when checking `exp` and `nbf`.
pub const CLOCK_SKEW_LEEWAY: Duration = Duration::from_secs(60);

/// The query parameter read when a rule names no token location (RFC 6750 section 2.3).
const DEFAULT_PARAM: &str = "access_token";

/// The outcome of authenticating one request.
#[derive(Debug)]
pub enum Authn {
    /// No token at any configured location: the request proceeds without a request
    /// principal (authorization may still require one).
    NoToken,
    /// A valid token: what authorization sees, and what to change in the forwarded request.
    Valid(JwtAttrs, JwtEffects),
    /// A token that failed: answer 401 with the reason (never echo the token).
    Invalid(JwtError),
}

/// Why a token was refused; `Display` is the short text for the 401 body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    /// Not three base64url parts of JSON, or a claim of the wrong type.
    #[error("malformed token")]
    Malformed,
    /// More than one token in the request.
    #[error("multiple tokens")]
    MultipleTokens,
    /// No rule accepts the token's `iss` at the location it was found.
    #[error("issuer not configured")]
    UnknownIssuer,
    /// `none`, an HMAC or an unknown algorithm, or a critical header we do not implement.
    #[error("algorithm not allowed")]
    Algorithm,
    /// The issuer's JWKS has no key with the token's `kid` that fits its algorithm.
    #[error("no matching key")]
    UnknownKey,
    /// The signature does not verify.
    #[error("signature invalid")]
    Signature,
    /// `exp` is past (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    #[error("token not yet valid")]
    NotYetValid,
    /// `aud` names none of the rule's audiences.
    #[error("audience not allowed")]
    Audience,
    /// The issuer's JWKS has not been fetched yet.
    #[error("keys not yet available")]
    KeysUnavailable,
}

/// What to change in a request whose token was valid; see [`apply`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JwtEffects {
    remove_headers: Vec<HeaderName>,
    set_headers: Vec<(HeaderName, HeaderValue)>,
    strip_param: Option<String>,
    strip_cookie: Option<String>,
}

impl JwtEffects {
    /// The query to forward when the token came in a query parameter that must not be
    /// forwarded: `query` without that parameter (possibly empty). `None`: keep the query.
    pub fn rewrite_query(&self, query: &str) -> Option<String> {
        let name = self.strip_param.as_deref()?;
        let kept: Vec<&str> = query
            .split('&')
            .filter(|pair| {
                let key = pair.split_once('=').map_or(*pair, |(k, _)| k);
                !pair.is_empty() && percent_decode(key).as_deref() != Some(name)
            })
            .collect();
        Some(kept.join("&"))
    }
}

/// Applies `effects` to the headers of the request forwarded to the application: removes
/// the token (unless forwarded) and forged output headers, then sets the output headers.
/// A token in a query parameter is removed by [`JwtEffects::rewrite_query`] instead.
pub fn apply(effects: &JwtEffects, headers: &mut HeaderMap) {
    for name in &effects.remove_headers {
        headers.remove(name);
    }
    if let Some(cookie) = &effects.strip_cookie {
        let kept: Vec<String> = headers
            .get_all(http::header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .map(str::trim)
            .filter(|pair| !pair.is_empty() && cookie_name(pair) != cookie)
            .map(str::to_string)
            .collect();
        headers.remove(http::header::COOKIE);
        if let Ok(value) = HeaderValue::from_str(&kept.join("; ")) {
            if !kept.is_empty() {
                headers.insert(http::header::COOKIE, value);
            }
        }
    }
    for (name, value) in &effects.set_headers {
        headers.insert(name.clone(), value.clone());
    }
}

/// Whether `policy` applies to a workload: Istio's scoping, as for AuthorizationPolicy (a
/// policy in the root namespace applies mesh-wide, elsewhere to its namespace; a `selector`
/// narrows either; `targetRef(s)` attach to gateways, never to a sidecar).
pub fn applies_to(
    policy: &RequestAuthentication,
    workload_namespace: &str,
    workload_labels: &BTreeMap<String, String>,
    root_namespace: &str,
) -> bool {
    let spec = &policy.spec;
    if spec.target_ref.is_some() || spec.target_refs.is_some() {
        return false;
    }
    let ns = policy.metadata.namespace();
    (ns == root_namespace || ns == workload_namespace)
        && spec
            .selector
            .as_ref()
            .is_none_or(|s| s.matches(workload_labels))
}

/// The JWT rules of one workload, compiled: token locations, issuers, keys and outputs.
/// Cheap to share behind an `Arc`; the key sets it reads are swapped in by [`JwksCache`].
/// The default has no rules (every request passes as `NoToken`).
#[derive(Default)]
pub struct JwtAuthn {
    rules: Vec<Rule>,
    locations: Vec<Location>,
    /// Every output header any rule names: reset on each request.
    output_headers: Vec<HeaderName>,
}

struct Rule {
    issuer: String,
    audiences: Vec<String>,
    keys: Keys,
    forward_original_token: bool,
    payload_header: Option<HeaderName>,
    claim_headers: Vec<(HeaderName, Vec<String>)>,
}

enum Keys {
    Inline(Arc<KeySet>),
    Remote(Arc<JwksSlot>),
}

impl JwtAuthn {
    /// Compiles the rules of every policy in `policies` that applies to the workload (see
    /// [`applies_to`]). Inline `jwks` are parsed now; `jwksUri` key sets come from
    /// `jwks_source`, which fetches them in the background. Errors name the policy and field.
    pub fn compile(
        policies: &[RequestAuthentication],
        workload_namespace: &str,
        workload_labels: &BTreeMap<String, String>,
        root_namespace: &str,
        jwks_source: &JwksCache,
    ) -> Result<Self, String> {
        let mut applicable: Vec<&RequestAuthentication> = policies
            .iter()
            .filter(|p| applies_to(p, workload_namespace, workload_labels, root_namespace))
            .collect();
        applicable.sort_by(|a, b| {
            (a.metadata.namespace(), &a.metadata.name)
                .cmp(&(b.metadata.namespace(), &b.metadata.name))
        });
        let mut compiled = JwtAuthn {
            rules: Vec::new(),
            locations: Vec::new(),
            output_headers: Vec::new(),
        };
        for policy in applicable {
            let meta = &policy.metadata;
            for (i, rule) in policy.spec.jwt_rules.iter().enumerate() {
                let at = format!(
                    "RequestAuthentication/{}/{}: spec.jwtRules[{i}]",
                    meta.namespace(),
                    meta.name
                );
                compiled.add_rule(rule, &at, jwks_source)?;
            }
        }
        Ok(compiled)
    }

    fn add_rule(&mut self, rule: &JwtRule, at: &str, jwks: &JwksCache) -> Result<(), String> {
        if rule.issuer.is_empty() {
            return Err(format!("{at}.issuer: must not be empty"));
        }
        let keys = match (&rule.jwks, &rule.jwks_uri) {
            // Istio ignores jwksUri when both are set.
            (Some(inline), _) => Keys::Inline(Arc::new(
                KeySet::parse(inline).map_err(|e| format!("{at}.jwks: {e}"))?,
            )),
            (None, Some(uri)) => {
                let timeout = rule.timeout.map_or(JWKS_FETCH_TIMEOUT, |t| t.0);
                Keys::Remote(
                    jwks.subscribe(uri, timeout)
                        .map_err(|e| format!("{at}.jwksUri: {e}"))?,
                )
            }
            (None, None) => {
                return Err(format!(
                    "{at}: neither jwks nor jwksUri is set (OpenID discovery of the issuer's \
                     keys is not supported yet)"
                ))
            }
        };
        let header = |name: &str, field: String| {
            HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("{at}.{field}: {name:?} is not a valid header name"))
        };
        let payload_header = match &rule.output_payload_to_header {
            Some(h) if !h.is_empty() => Some(header(h, "outputPayloadToHeader".into())?),
            _ => None,
        };
        let mut claim_headers = Vec::new();
        for (j, c) in rule.output_claim_to_headers.iter().enumerate() {
            let name = header(&c.header, format!("outputClaimToHeaders[{j}].header"))?;
            if c.claim.is_empty() {
                return Err(format!(
                    "{at}.outputClaimToHeaders[{j}].claim: must not be empty"
                ));
            }
            claim_headers.push((name, c.claim.split('.').map(str::to_string).collect()));
        }
        let mut places = Vec::new();
        for (j, h) in rule.from_headers.iter().enumerate() {
            let name = header(&h.name, format!("fromHeaders[{j}].name"))?;
            let prefix = match h.prefix.as_deref() {
                None | Some("") => Prefix::None,
                Some(p) if p.eq_ignore_ascii_case("bearer ") => Prefix::Bearer,
                Some(p) => Prefix::Exact(p.to_string()),
            };
            places.push(Place::Header { name, prefix });
        }
        for (j, p) in rule.from_params.iter().enumerate() {
            if p.is_empty() {
                return Err(format!("{at}.fromParams[{j}]: must not be empty"));
            }
            places.push(Place::Param(p.clone()));
        }
        for (j, c) in rule.from_cookies.iter().enumerate() {
            if c.is_empty() {
                return Err(format!("{at}.fromCookies[{j}]: must not be empty"));
            }
            places.push(Place::Cookie(c.clone()));
        }
        if places.is_empty() {
            places.push(Place::Header {
                name: http::header::AUTHORIZATION,
                prefix: Prefix::Bearer,
            });
            places.push(Place::Param(DEFAULT_PARAM.into()));
        }
        let index = self.rules.len();
        for place in places {
            match self.locations.iter_mut().find(|l| l.place == place) {
                Some(l) if !l.rules.contains(&index) => l.rules.push(index),
                Some(_) => {}
                None => self.locations.push(Location {
                    place,
                    rules: vec![index],
                }),
            }
        }
        let outputs = payload_header
            .iter()
            .chain(claim_headers.iter().map(|(h, _)| h));
        for name in outputs {
            if !self.output_headers.contains(name) {
                self.output_headers.push(name.clone());
            }
        }
        self.rules.push(Rule {
            issuer: rule.issuer.clone(),
            audiences: rule.audiences.clone(),
            keys,
            forward_original_token: rule.forward_original_token,
            payload_header,
            claim_headers,
        });
        Ok(())
    }

    /// Whether no rule applies (every request is [`Authn::NoToken`]).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Removes every header the rules output (payload and claim headers), so a request that
    /// carries no token cannot pass forged ones to the application.
    pub fn strip_output_headers(&self, headers: &mut HeaderMap) {
        for name in &self.output_headers {
            headers.remove(name);
        }
    }

    /// Finds the request's token (in `headers` and the URI's `query`) and verifies it.
    pub fn authenticate(&self, headers: &HeaderMap, query: Option<&str>) -> Authn {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        self.authenticate_at(headers, query, now)
    }

    fn authenticate_at(&self, headers: &HeaderMap, query: Option<&str>, now: f64) -> Authn {
        if self.rules.is_empty() {
            return Authn::NoToken;
        }
        let found = find_tokens(&self.locations, headers, query);
        let found = match found.as_slice() {
            [] => return Authn::NoToken,
            [one] => one,
            _ => return Authn::Invalid(JwtError::MultipleTokens),
        };
        let token = match Token::parse(&found.token) {
            Ok(t) => t,
            Err(e) => return Authn::Invalid(e),
        };
        let location = &self.locations[found.location];
        let mut first_error = JwtError::UnknownIssuer;
        let candidates = location
            .rules
            .iter()
            .filter(|&&r| Some(self.rules[r].issuer.as_str()) == token.issuer());
        for (n, &r) in candidates.enumerate() {
            match self.rules[r].verify(&token, now) {
                Ok(attrs) => return Authn::Valid(attrs, self.effects(r, &token, &location.place)),
                Err(e) if n == 0 => first_error = e,
                Err(_) => {}
            }
        }
        Authn::Invalid(first_error)
    }

    /// The changes to the forwarded request after rule `r` accepted `token` from `place`.
    fn effects(&self, r: usize, token: &Token, place: &Place) -> JwtEffects {
        let rule = &self.rules[r];
        let mut effects = JwtEffects {
            remove_headers: self.output_headers.clone(),
            ..JwtEffects::default()
        };
        if !rule.forward_original_token {
            match place {
                Place::Header { name, .. } => effects.remove_headers.push(name.clone()),
                Place::Param(name) => effects.strip_param = Some(name.clone()),
                Place::Cookie(name) => effects.strip_cookie = Some(name.clone()),
            }
        }
        if let Some(name) = &rule.payload_header {
            if let Ok(value) = HeaderValue::from_str(&URL_SAFE_NO_PAD.encode(&token.payload)) {
                effects.set_headers.push((name.clone(), value));
            }
        }
        for (name, path) in &rule.claim_headers {
            let claim = path.iter().try_fold(&token.claims, |v, key| v.get(key));
            let text = match claim {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Number(n)) => n.to_string(),
                Some(Value::Bool(b)) => b.to_string(),
                _ => continue,
            };
            if let Ok(value) = HeaderValue::from_str(&text) {
                effects.set_headers.push((name.clone(), value));
            }
        }
        effects
    }
}

/// A token split and decoded, not yet verified.
struct Token<'t> {
    signing_input: &'t str,
    signature: &'t str,
    alg: Algorithm,
    kid: Option<String>,
    payload: Vec<u8>,
    claims: Value,
}

impl<'t> Token<'t> {
    fn parse(token: &'t str) -> Result<Token<'t>, JwtError> {
        let (signing_input, signature) = token.rsplit_once('.').ok_or(JwtError::Malformed)?;
        let (header, payload) = signing_input.split_once('.').ok_or(JwtError::Malformed)?;
        if payload.contains('.') {
            return Err(JwtError::Malformed);
        }
        let decode = |part: &str| {
            URL_SAFE_NO_PAD
                .decode(part)
                .map_err(|_| JwtError::Malformed)
        };
        let header: Value =
            serde_json::from_slice(&decode(header)?).map_err(|_| JwtError::Malformed)?;
        let alg = header
            .get("alg")
            .and_then(Value::as_str)
            .ok_or(JwtError::Malformed)?;
        let alg = asymmetric_algorithm(alg).ok_or(JwtError::Algorithm)?;
        if header.get("crit").is_some() {
            // RFC 7515 4.1.11: extensions we do not understand must be refused.
            return Err(JwtError::Algorithm);
        }
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(JwtError::Malformed),
        };
        let payload = decode(payload)?;
        let claims: Value = serde_json::from_slice(&payload).map_err(|_| JwtError::Malformed)?;
        if !claims.is_object() || signature.is_empty() {
            return Err(JwtError::Malformed);
        }
        Ok(Token {
            signing_input,
            signature,
            alg,
            kid,
            payload,
            claims,
        })
    }

    fn issuer(&self) -> Option<&str> {
        self.claims.get("iss").and_then(Value::as_str)
    }
}

impl Rule {
    /// Verifies signature, time window and audience of a token this rule's issuer signed.
    fn verify(&self, token: &Token, now: f64) -> Result<JwtAttrs, JwtError> {
        let keys = match &self.keys {
            Keys::Inline(set) => set.clone(),
            Keys::Remote(slot) => slot.keys().ok_or(JwtError::KeysUnavailable)?,
        };
        let mut candidates = keys.candidates(token.kid.as_deref(), token.alg).peekable();
        if candidates.peek().is_none() {
            if let (Keys::Remote(slot), Some(_)) = (&self.keys, &token.kid) {
                slot.request_refresh();
            }
            return Err(JwtError::UnknownKey);
        }
        let input = token.signing_input.as_bytes();
        if !candidates.any(|k| k.verifies(token.signature, input, token.alg)) {
            return Err(JwtError::Signature);
        }
        let leeway = CLOCK_SKEW_LEEWAY.as_secs_f64();
        let time = |name| match token.claims.get(name) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or(JwtError::Malformed),
        };
        if time("exp")?.is_some_and(|exp| now >= exp + leeway) {
            return Err(JwtError::Expired);
        }
        if time("nbf")?.is_some_and(|nbf| now + leeway < nbf) {
            return Err(JwtError::NotYetValid);
        }
        let audiences: Vec<String> = match token.claims.get("aud") {
            None => Vec::new(),
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(list)) => list
                .iter()
                .map(|v| v.as_str().map(str::to_string).ok_or(JwtError::Malformed))
                .collect::<Result<_, _>>()?,
            Some(_) => return Err(JwtError::Malformed),
        };
        if !self.audiences.is_empty() && !audiences.iter().any(|a| self.audiences.contains(a)) {
            return Err(JwtError::Audience);
        }
        let subject = match token.claims.get("sub") {
            None => "",
            Some(Value::String(s)) => s,
            Some(_) => return Err(JwtError::Malformed),
        };
        Ok(JwtAttrs {
            principal: format!("{}/{subject}", self.issuer),
            audiences,
            claims: token.claims.clone(),
        })
    }
}

impl std::fmt::Debug for JwtAuthn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let issuers: Vec<&str> = self.rules.iter().map(|r| r.issuer.as_str()).collect();
        f.debug_struct("JwtAuthn")
            .field("issuers", &issuers)
            .finish_non_exhaustive()
    }
}

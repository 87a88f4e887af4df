//! A route's `corsPolicy` (Istio VirtualService), enforced as Envoy's CORS filter does.
//!
//! - A **preflight** (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) from an
//!   allowed origin is answered by the proxy, 200 with `Access-Control-Allow-Origin` (the
//!   request's origin), `-Allow-Methods`, `-Allow-Headers`, `-Max-Age` and
//!   `-Allow-Credentials` as configured; it never reaches the app. A preflight from another
//!   origin is forwarded (`unmatchedPreflights: FORWARD`, the default) or answered 200
//!   without CORS headers (`IGNORE`).
//! - Any other request from an allowed origin gets `Access-Control-Allow-Origin`,
//!   `-Allow-Credentials` and `-Expose-Headers` on its response. Requests without `Origin`, or
//!   from origins not allowed, pass untouched.
//!
//! Origins match `allowOrigins` (exact, prefix, regex; an exact `*` allows any origin) or the
//! deprecated `allowOrigin` list (`*` allows any).

use super::matcher::Str;
use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE,
    ACCESS_CONTROL_REQUEST_METHOD, ORIGIN,
};
use http::{HeaderMap, HeaderValue, Method};
use trellis_api::resources::common::StringMatch;
use trellis_api::resources::http_policy::{CorsPolicy, UnmatchedPreflights};

/// A compiled `corsPolicy`.
pub struct Cors {
    origins: Vec<Str>,
    allow_methods: Option<HeaderValue>,
    allow_headers: Option<HeaderValue>,
    expose_headers: Option<HeaderValue>,
    max_age: Option<HeaderValue>,
    credentials: bool,
    forward_unmatched: bool,
}

/// What a request is to the CORS policy before it is forwarded.
pub enum Preflight {
    /// Not a preflight, or one to forward: go on.
    Forward,
    /// A preflight the proxy answers: 200 with these headers.
    Answer(HeaderMap),
}

fn joined(list: &[String], field: &str) -> Result<Option<HeaderValue>, String> {
    if list.is_empty() {
        return Ok(None);
    }
    HeaderValue::from_str(&list.join(","))
        .map(Some)
        .map_err(|_| format!("{field}: not a valid header value"))
}

impl Cors {
    /// Compiles the policy; errors name the field.
    pub fn compile(p: &CorsPolicy) -> Result<Self, String> {
        let mut origins = Vec::new();
        for m in &p.allow_origins {
            origins.push(if m.exact.as_deref() == Some("*") {
                Str::Any
            } else {
                Str::compile(m, false).map_err(|e| format!("allowOrigins: {e}"))?
            });
        }
        for o in &p.allow_origin {
            origins.push(if o == "*" {
                Str::Any
            } else {
                Str::compile(
                    &StringMatch {
                        exact: Some(o.clone()),
                        ..StringMatch::default()
                    },
                    false,
                )?
            });
        }
        Ok(Self {
            origins,
            allow_methods: joined(&p.allow_methods, "allowMethods")?,
            allow_headers: joined(&p.allow_headers, "allowHeaders")?,
            expose_headers: joined(&p.expose_headers, "exposeHeaders")?,
            max_age: p.max_age.map(|d| HeaderValue::from(d.0.as_secs())),
            credentials: p.allow_credentials == Some(true),
            forward_unmatched: p.unmatched_preflights != Some(UnmatchedPreflights::Ignore),
        })
    }

    /// The request's origin, if the policy allows it.
    pub fn allowed_origin<'h>(&self, headers: &'h HeaderMap) -> Option<&'h HeaderValue> {
        let origin = headers.get(ORIGIN)?;
        let text = origin.to_str().ok()?;
        self.origins
            .iter()
            .any(|m| m.matches(text))
            .then_some(origin)
    }

    /// Whether the proxy answers this request itself (a preflight).
    pub fn preflight(&self, method: &Method, headers: &HeaderMap) -> Preflight {
        let is_preflight = method == Method::OPTIONS
            && headers.contains_key(ORIGIN)
            && headers.contains_key(ACCESS_CONTROL_REQUEST_METHOD);
        if !is_preflight {
            return Preflight::Forward;
        }
        let Some(origin) = self.allowed_origin(headers) else {
            return if self.forward_unmatched {
                Preflight::Forward
            } else {
                Preflight::Answer(HeaderMap::new())
            };
        };
        let mut out = HeaderMap::new();
        out.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        for (name, value) in [
            (ACCESS_CONTROL_ALLOW_METHODS, &self.allow_methods),
            (ACCESS_CONTROL_ALLOW_HEADERS, &self.allow_headers),
            (ACCESS_CONTROL_MAX_AGE, &self.max_age),
        ] {
            if let Some(v) = value {
                out.insert(name, v.clone());
            }
        }
        if self.credentials {
            out.insert(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        Preflight::Answer(out)
    }

    /// Adds the CORS headers of an actual request to its response; `origin` is the request's
    /// allowed origin ([`Cors::allowed_origin`], kept from before it was forwarded).
    pub fn decorate(&self, origin: &HeaderValue, response: &mut HeaderMap) {
        response.insert(ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        if self.credentials {
            response.insert(
                ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
        }
        if let Some(v) = &self.expose_headers {
            response.insert(ACCESS_CONTROL_EXPOSE_HEADERS, v.clone());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cors(yaml: &str) -> Cors {
        let p: CorsPolicy = serde_yaml_ng::from_str(yaml).unwrap();
        Cors::compile(&p).unwrap()
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    const POLICY: &str = "allowOrigins: [{ exact: https://app.example }, { regex: \"https://.*\\\\.trusted\\\\.example\" }]\n\
        allowMethods: [GET, POST]\nallowHeaders: [x-token, content-type]\nexposeHeaders: [x-request-id]\n\
        maxAge: 24h\nallowCredentials: true\n";

    #[test]
    fn allowed_preflights_are_answered_with_the_policy() {
        let c = cors(POLICY);
        let h = headers(&[
            ("origin", "https://a.trusted.example"),
            ("access-control-request-method", "POST"),
        ]);
        let Preflight::Answer(out) = c.preflight(&Method::OPTIONS, &h) else {
            panic!("answered")
        };
        assert_eq!(
            out["access-control-allow-origin"],
            "https://a.trusted.example"
        );
        assert_eq!(out["access-control-allow-methods"], "GET,POST");
        assert_eq!(out["access-control-allow-headers"], "x-token,content-type");
        assert_eq!(out["access-control-max-age"], "86400");
        assert_eq!(out["access-control-allow-credentials"], "true");
        // An OPTIONS without Access-Control-Request-Method is no preflight.
        let plain = headers(&[("origin", "https://app.example")]);
        assert!(matches!(
            c.preflight(&Method::OPTIONS, &plain),
            Preflight::Forward
        ));
    }

    #[test]
    fn unmatched_preflights_are_forwarded_or_ignored() {
        let h = headers(&[
            ("origin", "https://evil.example"),
            ("access-control-request-method", "POST"),
        ]);
        assert!(matches!(
            cors(POLICY).preflight(&Method::OPTIONS, &h),
            Preflight::Forward
        ));
        let ignoring = cors(&format!("{POLICY}unmatchedPreflights: IGNORE\n"));
        let Preflight::Answer(out) = ignoring.preflight(&Method::OPTIONS, &h) else {
            panic!("answered")
        };
        assert!(out.is_empty(), "no CORS headers: {out:?}");
    }

    #[test]
    fn responses_to_allowed_origins_are_decorated() {
        let c = cors(POLICY);
        let decorate = |c: &Cors, request: &HeaderMap, resp: &mut HeaderMap| {
            if let Some(origin) = c.allowed_origin(request) {
                c.decorate(origin, resp);
            }
        };
        let mut resp = HeaderMap::new();
        decorate(
            &c,
            &headers(&[("origin", "https://app.example")]),
            &mut resp,
        );
        assert_eq!(resp["access-control-allow-origin"], "https://app.example");
        assert_eq!(resp["access-control-expose-headers"], "x-request-id");
        assert_eq!(resp["access-control-allow-credentials"], "true");
        for other in [vec![("origin", "https://app.example.evil")], vec![]] {
            let mut resp = HeaderMap::new();
            decorate(&c, &headers(&other), &mut resp);
            assert!(resp.is_empty(), "{other:?}: {resp:?}");
        }
        // `*` (exact, or in the deprecated list) allows any origin.
        for any in ["allowOrigins: [{ exact: \"*\" }]", "allowOrigin: [\"*\"]"] {
            let mut resp = HeaderMap::new();
            decorate(
                &cors(any),
                &headers(&[("origin", "https://x.example")]),
                &mut resp,
            );
            assert_eq!(
                resp["access-control-allow-origin"], "https://x.example",
                "{any}"
            );
        }
    }
}

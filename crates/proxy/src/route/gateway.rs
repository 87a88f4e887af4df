//! Gateway API `HTTPRoute`s attached to a Service (the GAMMA mesh profile), compiled into
//! the same [`Route`]s as Istio VirtualServices.
//!
//! A route applies in the mesh when a `parentRefs` entry names a `Service` (`group: ""`,
//! `kind: Service`); routes attached only to Gateways are for gateways, not sidecars. The
//! rules of every route attached to one service are merged and ordered as the Gateway API
//! specifies (not first-match as in Istio): an `Exact` path first, then the longest
//! `PathPrefix` (whole segments), then regular expressions; then a method match, then the
//! most header matches, then the most query matches; remaining ties keep the order the
//! routes were given in, then rule and match order. A rule without matches is `PathPrefix /`.
//!
//! Filters: request and response header modifiers, `RequestRedirect` (302 by default; a
//! scheme change without a port drops the port), `URLRewrite` (hostname, `ReplaceFullPath`,
//! `ReplacePrefixMatch`) and `RequestMirror` (`percent` or `fraction`). A rule without
//! backends that does not redirect answers 500. `timeouts.request` bounds the whole request;
//! `timeouts.backendRequest` bounds it too (there are no HTTPRoute retries to bound one by
//! one). A backend's port is not needed: endpoints carry their own.

use super::matcher::HttpMatch;
use super::{
    Action, Backend, Edits, HeaderOps, Mirror, PathEdit, Redirect, RedirectPort, Rewrite, Route,
};
use crate::upstream::Service;
use http::{HeaderName, HeaderValue, StatusCode};
use std::cmp::Reverse;
use std::collections::HashMap;
use std::sync::Arc;
use trellis_api::names::ServiceKey;
use trellis_api::resources::http_route::{HttpRouteMatch, HttpRouteRule, PathMatchType};
use trellis_api::resources::http_route_filter::{FilterType, HeaderFilter, PathModifier};
use trellis_api::resources::{HttpRoute, Loaded, Resource};

/// How specific a match is; smaller sorts first.
type Rank = (u8, Reverse<usize>, bool, Reverse<usize>, Reverse<usize>);

fn rank(m: &HttpRouteMatch) -> Rank {
    let (class, len) = match &m.path {
        Some(p) => match p.kind {
            PathMatchType::Exact => (0, p.value.len()),
            PathMatchType::PathPrefix => (1, p.value.trim_end_matches('/').len()),
            PathMatchType::RegularExpression => (2, 0),
        },
        None => (1, 0),
    };
    (
        class,
        Reverse(len),
        m.method.is_none(),
        Reverse(m.headers.len()),
        Reverse(m.query_params.len()),
    )
}

/// The routes of every service some HTTPRoute attaches to, ordered by precedence.
/// `resolve(name, namespace)` names the service; `cluster_for` gives its cluster.
pub(super) fn compile(
    resources: &[Loaded],
    resolve: &dyn Fn(&str, &str) -> Option<ServiceKey>,
    cluster_for: &dyn Fn(&ServiceKey) -> Option<Arc<Service>>,
) -> Result<HashMap<ServiceKey, Vec<Route>>, String> {
    let mut ranked: HashMap<ServiceKey, Vec<(Rank, usize, Route)>> = HashMap::new();
    let mut order = 0;
    for l in resources {
        let Resource::HttpRoute(hr) = &l.resource else {
            continue;
        };
        let ns = hr.metadata.namespace();
        let parents: Vec<ServiceKey> = hr
            .spec
            .parent_refs
            .iter()
            .filter(|p| p.is_service())
            .filter_map(|p| resolve(&p.name, p.namespace.as_deref().unwrap_or(ns)))
            .collect();
        if parents.is_empty() {
            tracing::debug!(route = %hr.metadata.name, "HTTPRoute attaches to no service this proxy knows; skipped");
            continue;
        }
        for (i, rule) in hr.spec.rules.iter().enumerate() {
            let default = [HttpRouteMatch::default()];
            let matches = if rule.matches.is_empty() {
                &default[..]
            } else {
                &rule.matches[..]
            };
            for m in matches {
                for parent in &parents {
                    let route =
                        compile_rule(hr, i, rule, m, resolve, cluster_for).map_err(|e| {
                            format!("HTTPRoute {ns}/{}: spec.rules[{i}]{e}", hr.metadata.name)
                        })?;
                    ranked
                        .entry(parent.clone())
                        .or_default()
                        .push((rank(m), order, route));
                }
                order += 1;
            }
        }
    }
    Ok(ranked
        .into_iter()
        .map(|(key, mut routes)| {
            routes.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
            (key, routes.into_iter().map(|(_, _, r)| r).collect())
        })
        .collect())
}

/// One match of one rule as a [`Route`]. Errors start with the field path below the rule.
fn compile_rule(
    hr: &HttpRoute,
    index: usize,
    rule: &HttpRouteRule,
    m: &HttpRouteMatch,
    resolve: &dyn Fn(&str, &str) -> Option<ServiceKey>,
    cluster_for: &dyn Fn(&ServiceKey) -> Option<Arc<Service>>,
) -> Result<Route, String> {
    let ns = hr.metadata.namespace();
    let cluster = |name: &str, namespace: Option<&str>| {
        resolve(name, namespace.unwrap_or(ns)).and_then(|k| cluster_for(&k))
    };
    let matcher = HttpMatch::from_gateway(m).map_err(|e| format!(".matches: {e}"))?;
    let mut headers = HeaderOps::default();
    let mut redirect = None;
    let mut rewrite = None;
    let mut mirrors = Vec::new();
    for (j, f) in rule.filters.iter().enumerate() {
        let at = |e: String| format!(".filters[{j}]: {e}");
        match f.kind {
            FilterType::RequestHeaderModifier => {
                headers.request = edits(f.request_header_modifier.as_ref()).map_err(at)?;
            }
            FilterType::ResponseHeaderModifier => {
                headers.response = edits(f.response_header_modifier.as_ref()).map_err(at)?;
            }
            FilterType::RequestRedirect => {
                let rd = f.request_redirect.clone().unwrap_or_default();
                redirect = Some(Redirect {
                    uri: rd.path.as_ref().map(path_edit),
                    authority: rd.hostname.clone(),
                    port: match (rd.port.and_then(|p| u16::try_from(p).ok()), &rd.scheme) {
                        (Some(p), _) => RedirectPort::Set(p),
                        (None, Some(_)) => RedirectPort::Omit,
                        (None, None) => RedirectPort::Keep,
                    },
                    scheme: rd.scheme.clone(),
                    status: rd
                        .status_code
                        .and_then(|c| StatusCode::from_u16(c as u16).ok())
                        .unwrap_or(StatusCode::FOUND),
                });
            }
            FilterType::UrlRewrite => {
                let rw = f.url_rewrite.clone().unwrap_or_default();
                rewrite = Some(Rewrite {
                    uri: rw.path.as_ref().map(path_edit),
                    authority: rw
                        .hostname
                        .as_deref()
                        .map(HeaderValue::from_str)
                        .transpose()
                        .map_err(|_| at("urlRewrite.hostname: invalid host".into()))?,
                });
            }
            FilterType::RequestMirror => {
                let Some(mf) = &f.request_mirror else {
                    continue;
                };
                let b = &mf.backend_ref;
                let fraction = match (&mf.percent, &mf.fraction) {
                    (Some(p), _) => f64::from(*p) / 100.0,
                    (None, Some(fr)) => {
                        f64::from(fr.numerator) / f64::from(fr.denominator.unwrap_or(100).max(1))
                    }
                    (None, None) => 1.0,
                };
                match cluster(&b.name, b.namespace.as_deref()) {
                    Some(cluster) if fraction > 0.0 => mirrors.push(Mirror { cluster, fraction }),
                    Some(_) => {}
                    None => tracing::debug!(backend = %b.name, "mirror backend unknown"),
                }
            }
        }
    }
    let action = if let Some(rd) = redirect {
        Action::Redirect(rd)
    } else if rule.backend_refs.is_empty() {
        Action::Direct {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            body: bytes::Bytes::from_static(b"no backend\n"),
        }
    } else {
        let mut backends = Vec::new();
        for (j, b) in rule.backend_refs.iter().enumerate() {
            if !matches!(b.kind.as_deref(), None | Some("Service")) {
                return Err(format!(".backendRefs[{j}].kind: only Service is supported"));
            }
            let weight = b.weight.unwrap_or(1);
            if weight == 0 {
                continue;
            }
            // Not resolvable yet (no proxy registered for it): left out, as for a
            // VirtualService destination.
            let Some(cluster) = cluster(&b.name, b.namespace.as_deref()) else {
                tracing::debug!(backend = %b.name, "HTTPRoute backend unknown");
                continue;
            };
            backends.push(Backend {
                cluster,
                weight,
                headers: HeaderOps::default(),
            });
        }
        Action::Forward(backends)
    };
    let timeout = rule.timeouts.as_ref().and_then(|t| {
        [t.request, t.backend_request]
            .into_iter()
            .flatten()
            .map(|d| d.0)
            .filter(|d| !d.is_zero())
            .min()
    });
    Ok(Route {
        name: Arc::from(rule.name.clone().unwrap_or_else(|| {
            format!("{}/{}#{index}", hr.metadata.namespace(), hr.metadata.name)
        })),
        matches: vec![matcher],
        action,
        timeout,
        headers,
        rewrite,
        fault: None,
        retry: None,
        mirrors,
        cors: None,
    })
}

fn path_edit(p: &PathModifier) -> PathEdit {
    match (&p.replace_full_path, &p.replace_prefix_match) {
        (Some(full), _) => PathEdit::Whole(full.clone()),
        (None, Some(prefix)) => PathEdit::Prefix(prefix.clone()),
        (None, None) => PathEdit::Prefix("/".into()),
    }
}

fn edits(f: Option<&HeaderFilter>) -> Result<Edits, String> {
    let Some(f) = f else {
        return Ok(Edits::default());
    };
    let name = |n: &str| {
        HeaderName::from_bytes(n.to_ascii_lowercase().as_bytes())
            .map_err(|_| format!("invalid header name {n:?}"))
    };
    let pairs = |list: &[trellis_api::resources::http_route_filter::HeaderValue]| {
        list.iter()
            .map(|h| {
                Ok((
                    name(&h.name)?,
                    HeaderValue::from_str(&h.value)
                        .map_err(|_| format!("invalid value for header {:?}", h.name))?,
                ))
            })
            .collect::<Result<Vec<_>, String>>()
    };
    Ok(Edits {
        set: pairs(&f.set)?,
        add: pairs(&f.add)?,
        remove: f.remove.iter().map(|n| name(n)).collect::<Result<_, _>>()?,
    })
}

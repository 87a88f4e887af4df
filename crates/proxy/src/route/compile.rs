//! Compiling VirtualServices and DestinationRules into [`VirtualHost`]s.
//!
//! Hosts in a VirtualService (its `hosts` and its destinations) are resolved like a client's:
//! `svc`, `svc.ns`, `svc.ns.svc.<domain>`, or a ServiceEntry host; a short name means the
//! VirtualService's own namespace. When several VirtualServices name the same host, the first
//! one given wins (`trellis analyze` reports the conflict). Subsets come from the
//! DestinationRule for the destination host: the endpoints whose labels include the subset's.

use super::matcher::HttpMatch;
use super::{
    Abort, Action, Backend, Edits, Fault, HeaderOps, Redirect, Rewrite, Route, VirtualHost,
};
use crate::upstream::pool::EndpointConns;
use crate::upstream::Service;
use http::{HeaderName, HeaderValue, StatusCode};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use trellis_api::names::ServiceKey;
use trellis_api::resources::destination_rule::DestinationRule;
use trellis_api::resources::http_policy::{self, HeaderOperations, Headers};
use trellis_api::resources::virtual_service::{HttpRoute, VirtualService};
use trellis_api::resources::{Loaded, Resource};

/// A service's endpoints (with their labels) before routing is compiled.
pub struct ClusterSpec {
    /// Endpoints and their labels.
    pub endpoints: Vec<(Arc<EndpointConns>, BTreeMap<String, String>)>,
    /// Response timeout from the bootstrap (`upstreams[].timeout`).
    pub timeout: Option<Duration>,
}

/// Builds a cluster (a service, or a subset of it).
pub type MakeCluster<'a> = dyn Fn(&ServiceKey, Option<&str>, Vec<Arc<EndpointConns>>, Option<Duration>) -> Arc<Service>
    + 'a;

/// The cluster of a destination `host` (and `subset`), as seen from the VirtualService.
type ClusterFor<'a> = dyn Fn(&str, Option<&str>) -> Option<Arc<Service>> + 'a;

/// Compiles every service's virtual host. `resolve(host, namespace)` names the service a host
/// means as seen from `namespace`. Errors name the resource and field.
pub fn compile(
    clusters: &BTreeMap<ServiceKey, ClusterSpec>,
    resources: &[Loaded],
    resolve: &dyn Fn(&str, &str) -> Option<ServiceKey>,
    make: &MakeCluster<'_>,
) -> Result<HashMap<ServiceKey, Arc<VirtualHost>>, String> {
    let base: HashMap<&ServiceKey, Arc<Service>> = clusters
        .iter()
        .map(|(k, c)| {
            let eps = c.endpoints.iter().map(|(e, _)| e.clone()).collect();
            (k, make(k, None, eps, c.timeout))
        })
        .collect();
    let rules: Vec<&DestinationRule> = resources
        .iter()
        .filter_map(|l| match &l.resource {
            Resource::DestinationRule(r) => Some(r),
            _ => None,
        })
        .collect();
    // One cluster per subset, shared by every route that names it.
    let subsets: std::cell::RefCell<HashMap<(ServiceKey, String), Arc<Service>>> =
        Default::default();
    let subset_cluster = |key: &ServiceKey, name: &str| -> Arc<Service> {
        if let Some(s) = subsets.borrow().get(&(key.clone(), name.to_string())) {
            return s.clone();
        }
        let labels = rules
            .iter()
            .filter(|r| resolve(&r.spec.host, r.metadata.namespace()).as_ref() == Some(key))
            .flat_map(|r| r.spec.subsets.iter())
            .find(|s| s.name == name)
            .map(|s| s.labels.clone());
        let spec = clusters.get(key);
        // An unknown subset gets no endpoints: requests to it fail with 503, as in Istio.
        let endpoints = match (spec, &labels) {
            (Some(spec), Some(labels)) => spec
                .endpoints
                .iter()
                .filter(|(_, l)| labels.iter().all(|(k, v)| l.get(k) == Some(v)))
                .map(|(e, _)| e.clone())
                .collect(),
            _ => Vec::new(),
        };
        let cluster = make(key, Some(name), endpoints, spec.and_then(|s| s.timeout));
        subsets
            .borrow_mut()
            .insert((key.clone(), name.to_string()), cluster.clone());
        cluster
    };

    for r in &rules {
        not_enforced_rule(r)?;
    }
    let mut hosts: HashMap<ServiceKey, Arc<VirtualHost>> = HashMap::new();
    for l in resources {
        let Resource::VirtualService(vs) = &l.resource else {
            continue;
        };
        let ns = vs.metadata.namespace();
        if !vs.spec.tcp.is_empty() {
            return Err(format!(
                "VirtualService {ns}/{}: spec.tcp: not enforced by this proxy yet",
                vs.metadata.name
            ));
        }
        for host in &vs.spec.hosts {
            let Some(key) = resolve(host, ns) else {
                tracing::debug!(host = %host, vs = %vs.metadata.name, "VirtualService host is not a known service; skipped");
                continue;
            };
            if hosts.contains_key(&key) {
                tracing::warn!(host = %host, vs = %vs.metadata.name, "another VirtualService already routes this host; ignored");
                continue;
            }
            let Some(cluster) = base.get(&key).cloned() else {
                continue;
            };
            let routes = vs
                .spec
                .http
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    compile_route(vs, i, r, &|h, subset| {
                        let k = resolve(h, ns)?;
                        Some(match subset {
                            Some(s) => subset_cluster(&k, s),
                            None => base.get(&k)?.clone(),
                        })
                    })
                })
                .collect::<Result<Vec<_>, String>>()?;
            hosts.insert(
                key.clone(),
                Arc::new(VirtualHost {
                    key,
                    cluster,
                    routes,
                }),
            );
        }
    }
    for (key, cluster) in base {
        hosts
            .entry(key.clone())
            .or_insert_with(|| Arc::new(VirtualHost::plain(cluster)));
    }
    Ok(hosts)
}

/// Refuses the DestinationRule settings this proxy does not enforce yet: never silently
/// ignored (the traffic issue adds them).
fn not_enforced_rule(r: &DestinationRule) -> Result<(), String> {
    let at = format!(
        "DestinationRule {}/{}",
        r.metadata.namespace(),
        r.metadata.name
    );
    let policies = std::iter::once((
        "spec.trafficPolicy".to_string(),
        r.spec.traffic_policy.as_deref(),
    ))
    .chain(r.spec.subsets.iter().enumerate().map(|(i, s)| {
        (
            format!("spec.subsets[{i}].trafficPolicy"),
            s.traffic_policy.as_ref(),
        )
    }));
    for (path, tp) in policies {
        let Some(tp) = tp else { continue };
        for (field, set) in [
            ("loadBalancer", tp.load_balancer.is_some()),
            ("connectionPool", tp.connection_pool.is_some()),
            ("outlierDetection", tp.outlier_detection.is_some()),
            ("tls", tp.tls.is_some()),
            ("portLevelSettings", !tp.port_level_settings.is_empty()),
        ] {
            if set {
                return Err(format!(
                    "{at}: {path}.{field}: not enforced by this proxy yet"
                ));
            }
        }
    }
    Ok(())
}

fn compile_route(
    vs: &VirtualService,
    index: usize,
    r: &HttpRoute,
    cluster_for: &ClusterFor<'_>,
) -> Result<Route, String> {
    let at = |field: &str| {
        format!(
            "VirtualService {}/{}: spec.http[{index}]{field}",
            vs.metadata.namespace(),
            vs.metadata.name
        )
    };
    // Never silently ignored: what this proxy does not enforce yet is refused by name.
    for (field, set) in [
        ("retries", r.retries.is_some()),
        ("mirror", r.mirror.is_some() || !r.mirrors.is_empty()),
        ("corsPolicy", r.cors_policy.is_some()),
        (
            "rewrite.uriRegexRewrite",
            r.rewrite
                .as_ref()
                .is_some_and(|w| w.uri_regex_rewrite.is_some()),
        ),
    ] {
        if set {
            return Err(format!(
                "{}: not enforced by this proxy yet",
                at(&format!(".{field}"))
            ));
        }
    }
    let name: Arc<str> =
        Arc::from(r.name.clone().unwrap_or_else(|| {
            format!("{}/{}#{index}", vs.metadata.namespace(), vs.metadata.name)
        }));
    let matches = r
        .matches
        .iter()
        .enumerate()
        .map(|(j, m)| {
            HttpMatch::compile(m).map_err(|e| format!("{}: {e}", at(&format!(".match[{j}]"))))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let action = if let Some(d) = &r.direct_response {
        let status = StatusCode::from_u16(d.status as u16)
            .map_err(|_| format!("{}: bad status", at(".directResponse.status")))?;
        let body = match &d.body {
            Some(b) => match (&b.string, &b.bytes) {
                (Some(s), _) => bytes::Bytes::from(s.clone()),
                (None, Some(b64)) => {
                    use base64::Engine as _;
                    base64::engine::general_purpose::STANDARD
                        .decode(b64)
                        .map(bytes::Bytes::from)
                        .map_err(|e| format!("{}: {e}", at(".directResponse.body.bytes")))?
                }
                _ => bytes::Bytes::new(),
            },
            None => bytes::Bytes::new(),
        };
        Action::Direct { status, body }
    } else if let Some(rd) = &r.redirect {
        Action::Redirect(Redirect {
            uri: rd.uri.clone(),
            authority: rd.authority.clone(),
            scheme: rd.scheme.clone(),
            port: rd.port.and_then(|p| u16::try_from(p).ok()),
            status: rd
                .redirect_code
                .and_then(|c| StatusCode::from_u16(c as u16).ok())
                .unwrap_or(StatusCode::MOVED_PERMANENTLY),
        })
    } else {
        let mut backends = Vec::new();
        for (j, d) in r.route.iter().enumerate() {
            let dest = &d.destination;
            let cluster = cluster_for(&dest.host, dest.subset.as_deref()).ok_or_else(|| {
                format!(
                    "{}: host {:?} is not a service this proxy knows",
                    at(&format!(".route[{j}].destination.host")),
                    dest.host
                )
            });
            // A destination we cannot resolve yet (its service has no proxy registered) is
            // a 503 at request time, not a refused config.
            let cluster = match cluster {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "route destination unknown");
                    continue;
                }
            };
            backends.push(Backend {
                cluster,
                weight: d.weight.unwrap_or(if r.route.len() == 1 { 100 } else { 0 }),
                headers: header_ops(d.headers.as_ref())
                    .map_err(|e| format!("{}: {e}", at(&format!(".route[{j}].headers"))))?,
            });
        }
        Action::Forward(backends)
    };
    let rewrite = match &r.rewrite {
        Some(rw) => Some(Rewrite {
            uri: rw.uri.clone(),
            authority: rw
                .authority
                .as_deref()
                .map(HeaderValue::from_str)
                .transpose()
                .map_err(|_| format!("{}: invalid authority", at(".rewrite.authority")))?,
        }),
        None => None,
    };
    Ok(Route {
        name,
        matches,
        action,
        timeout: r.timeout.map(|d| d.0).filter(|d| !d.is_zero()),
        headers: header_ops(r.headers.as_ref()).map_err(|e| format!("{}: {e}", at(".headers")))?,
        rewrite,
        fault: r.fault.as_ref().map(fault),
    })
}

fn fraction(p: Option<&trellis_api::resources::common::Percent>, legacy: Option<u32>) -> f64 {
    match (p, legacy) {
        (Some(p), _) => (p.value / 100.0).clamp(0.0, 1.0),
        (None, Some(pct)) => (f64::from(pct) / 100.0).clamp(0.0, 1.0),
        // Istio: no percentage means every request.
        (None, None) => 1.0,
    }
}

fn fault(f: &http_policy::HttpFaultInjection) -> Fault {
    Fault {
        delay: f
            .delay
            .as_ref()
            .map(|d| (d.fixed_delay.0, fraction(d.percentage.as_ref(), d.percent))),
        abort: f.abort.as_ref().and_then(|a| {
            let how = match (&a.http_status, &a.grpc_status) {
                (Some(s), _) => Abort::Http(StatusCode::from_u16(*s as u16).ok()?),
                (None, Some(g)) => Abort::Grpc(grpc_code(g)?),
                _ => return None,
            };
            Some((how, fraction(a.percentage.as_ref(), None)))
        }),
    }
}

/// The numeric code of a gRPC status name.
pub fn grpc_code(name: &str) -> Option<u32> {
    const NAMES: [&str; 17] = [
        "OK",
        "CANCELLED",
        "UNKNOWN",
        "INVALID_ARGUMENT",
        "DEADLINE_EXCEEDED",
        "NOT_FOUND",
        "ALREADY_EXISTS",
        "PERMISSION_DENIED",
        "RESOURCE_EXHAUSTED",
        "FAILED_PRECONDITION",
        "ABORTED",
        "OUT_OF_RANGE",
        "UNIMPLEMENTED",
        "INTERNAL",
        "UNAVAILABLE",
        "DATA_LOSS",
        "UNAUTHENTICATED",
    ];
    NAMES
        .iter()
        .position(|n| n.eq_ignore_ascii_case(name))
        .map(|i| i as u32)
        .or_else(|| name.parse().ok())
}

fn edits(ops: Option<&HeaderOperations>) -> Result<Edits, String> {
    let Some(ops) = ops else {
        return Ok(Edits::default());
    };
    let pair = |(k, v): (&String, &String)| -> Result<(HeaderName, HeaderValue), String> {
        Ok((
            HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes())
                .map_err(|_| format!("invalid header name {k:?}"))?,
            HeaderValue::from_str(v).map_err(|_| format!("invalid value for header {k:?}"))?,
        ))
    };
    Ok(Edits {
        set: ops.set.iter().map(pair).collect::<Result<_, _>>()?,
        add: ops.add.iter().map(pair).collect::<Result<_, _>>()?,
        remove: ops
            .remove
            .iter()
            .map(|k| {
                HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes())
                    .map_err(|_| format!("invalid header name {k:?}"))
            })
            .collect::<Result<_, _>>()?,
    })
}

fn header_ops(h: Option<&Headers>) -> Result<HeaderOps, String> {
    Ok(HeaderOps {
        request: edits(h.and_then(|h| h.request.as_ref()))?,
        response: edits(h.and_then(|h| h.response.as_ref()))?,
    })
}

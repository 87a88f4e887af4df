//! Compiling VirtualServices and DestinationRules into [`VirtualHost`]s.
//!
//! Hosts in a VirtualService (its `hosts` and its destinations) are resolved like a client's:
//! `svc`, `svc.ns`, `svc.ns.svc.<domain>`, or a ServiceEntry host; a short name means the
//! VirtualService's own namespace. When several VirtualServices name the same host, the first
//! one given wins (`trellis analyze` reports the conflict). Subsets come from the
//! DestinationRule for the destination host: the endpoints whose labels include the subset's.
//! Every cluster is balanced by the `trafficPolicy.loadBalancer` of the DestinationRule for
//! its host, a subset's own overriding it; without one, by peak-EWMA P2C. Its
//! `connectionPool` (circuit breaking) and `outlierDetection` are resolved the same way, each
//! on its own (a subset with only a load balancer keeps the service's connection pool).

use super::matcher::{ConnMatch, HttpMatch};
use super::{
    Abort, Action, Backend, Edits, Fault, HeaderOps, Mirror, PathEdit, Redirect, RedirectPort,
    Rewrite, Route, VirtualHost,
};
use crate::balance::{policy_from, HashOn};
use crate::resilience::retry::RetryPolicy;
use crate::upstream::limits::ClusterLimits;
use crate::upstream::outlier::OutlierConfig;
use crate::upstream::pool::EndpointConns;
use crate::upstream::{Balancing, Resilience, Service};
use http::{HeaderName, HeaderValue, StatusCode};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use trellis_api::names::ServiceKey;
use trellis_api::resources::destination_rule::DestinationRule;
use trellis_api::resources::http_policy::{self, HeaderOperations, Headers};
use trellis_api::resources::traffic_policy::{ClientTlsSettings, TlsMode, TrafficPolicy};
use trellis_api::resources::virtual_service::{HttpRoute, TcpRoute, VirtualService};
use trellis_api::resources::{Loaded, Resource};

/// A service's endpoints (with their labels) before routing is compiled.
pub struct ClusterSpec {
    /// Endpoints and their labels.
    pub endpoints: Vec<(Arc<EndpointConns>, BTreeMap<String, String>)>,
    /// Response timeout from the bootstrap (`upstreams[].timeout`).
    pub timeout: Option<Duration>,
}

/// Builds a cluster (a service, or a subset of it) over these endpoints, with this response
/// timeout, balanced as given.
pub type MakeCluster<'a> = dyn Fn(
        &ServiceKey,
        Option<&str>,
        Vec<Arc<EndpointConns>>,
        Option<Duration>,
        Balancing,
    ) -> Arc<Service>
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
    let rules: Vec<&DestinationRule> = resources
        .iter()
        .filter_map(|l| match &l.resource {
            Resource::DestinationRule(r) => Some(r),
            _ => None,
        })
        .collect();
    // Checked for every rule, whether or not its host is a service known here.
    for r in &rules {
        not_enforced_rule(r)?;
        let istio_mutual =
            traffic_policies(r).any(|(_, tp)| tp.and_then(|tp| tp.tls.as_ref()).is_some());
        let spec = resolve(&r.spec.host, r.metadata.namespace()).and_then(|k| clusters.get(&k));
        if let (true, Some(spec)) = (istio_mutual, spec) {
            if let Some((e, _)) = spec.endpoints.iter().find(|(e, _)| !e.is_mtls()) {
                return Err(format!(
                    "{}: tls.mode ISTIO_MUTUAL: endpoint {} has no mesh identity to verify (give the upstream an `identity`, or drop `tls`)",
                    rule_at(r),
                    e.addr()
                ));
            }
        }
    }
    // `exportTo` narrower than the whole mesh is not honoured yet: refused, never widened.
    for l in resources {
        let (kind, export_to, meta) = match &l.resource {
            Resource::VirtualService(v) => ("VirtualService", &v.spec.export_to, &v.metadata),
            Resource::DestinationRule(r) => ("DestinationRule", &r.spec.export_to, &r.metadata),
            Resource::ServiceEntry(e) => ("ServiceEntry", &e.spec.export_to, &e.metadata),
            _ => continue,
        };
        if export_to.iter().any(|e| e != "*") {
            return Err(format!(
                "{kind} {}/{}: spec.exportTo {export_to:?}: only [\"*\"] (the default) is enforced by this proxy yet",
                meta.namespace(),
                meta.name
            ));
        }
    }
    let balancing = rules
        .iter()
        .map(|r| rule_balancing(r))
        .collect::<Result<Vec<_>, String>>()?;
    let rules_for = |key: &ServiceKey| {
        let key = key.clone();
        rules.iter().zip(&balancing).filter(move |(r, _)| {
            resolve(&r.spec.host, r.metadata.namespace()).as_ref() == Some(&key)
        })
    };
    // Service level: the first rule for the service that sets a load balancer (and
    // likewise a connection pool, and outlier detection).
    let service_balancing = |key: &ServiceKey| -> Balancing {
        let mut b = rules_for(key)
            .find_map(|(_, b)| b.service.clone())
            .unwrap_or_default();
        b.resilience = Resilience {
            limits: rules_for(key)
                .find_map(|(_, b)| b.resilience[0].limits.clone())
                .unwrap_or_default(),
            outlier: rules_for(key).find_map(|(_, b)| b.resilience[0].outlier.clone()),
        };
        b
    };
    let base: HashMap<&ServiceKey, Arc<Service>> = clusters
        .iter()
        .map(|(k, c)| {
            let eps = c.endpoints.iter().map(|(e, _)| e.clone()).collect();
            (k, make(k, None, eps, c.timeout, service_balancing(k)))
        })
        .collect();
    // One cluster per subset, shared by every route that names it.
    let subsets: std::cell::RefCell<HashMap<(ServiceKey, String), Arc<Service>>> =
        Default::default();
    let subset_cluster = |key: &ServiceKey, name: &str| -> Arc<Service> {
        if let Some(s) = subsets.borrow().get(&(key.clone(), name.to_string())) {
            return s.clone();
        }
        let found = rules_for(key)
            .flat_map(|(r, b)| {
                let parts = b.subsets.iter().zip(&b.resilience[1..]);
                r.spec.subsets.iter().zip(parts)
            })
            .find(|(s, _)| s.name == name);
        let labels = found.map(|(s, _)| s.labels.clone());
        // The subset's own load balancer, connection pool and outlier detection, each
        // else the service's (as Istio merges a subset's traffic policy).
        let service = service_balancing(key);
        let mut lb = found
            .and_then(|(_, (b, _))| b.clone())
            .unwrap_or_else(|| service.clone());
        lb.resilience = service.resilience;
        if let Some((_, (_, own))) = found {
            if let Some(l) = &own.limits {
                lb.resilience.limits = l.clone();
            }
            if let Some(o) = &own.outlier {
                lb.resilience.outlier = Some(o.clone());
            }
        }
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
        let cluster = make(key, Some(name), endpoints, spec.and_then(|s| s.timeout), lb);
        subsets
            .borrow_mut()
            .insert((key.clone(), name.to_string()), cluster.clone());
        cluster
    };

    let mut hosts: HashMap<ServiceKey, Arc<VirtualHost>> = HashMap::new();
    for l in resources {
        let Resource::VirtualService(vs) = &l.resource else {
            continue;
        };
        let ns = vs.metadata.namespace();
        // Bound to gateways only (`gateways` without `mesh`): not for sidecars.
        let gateways = &vs.spec.gateways;
        if !gateways.is_empty() && !gateways.iter().any(|g| g == "mesh") {
            tracing::debug!(vs = %vs.metadata.name, "VirtualService applies to gateways only; skipped");
            continue;
        }
        let cluster_for = |h: &str, subset: Option<&str>| {
            let k = resolve(h, ns)?;
            Some(match subset {
                Some(s) => subset_cluster(&k, s),
                None => base.get(&k)?.clone(),
            })
        };
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
                .map(|(i, r)| compile_route(vs, i, r, &cluster_for))
                .collect::<Result<Vec<_>, String>>()?;
            let tcp_routes = vs
                .spec
                .tcp
                .iter()
                .enumerate()
                .map(|(i, r)| compile_tcp_route(vs, i, r, &cluster_for))
                .collect::<Result<Vec<_>, String>>()?;
            hosts.insert(
                key.clone(),
                Arc::new(VirtualHost::new(key, cluster, routes, tcp_routes)),
            );
        }
    }
    // Gateway API HTTPRoutes attached to a service; a VirtualService for the same host wins.
    let gateway_routes = super::gateway::compile(resources, resolve, &|k| base.get(k).cloned())?;
    for (key, routes) in gateway_routes {
        if hosts.contains_key(&key) {
            tracing::warn!(host = %key, "a VirtualService already routes this service; its HTTPRoutes are ignored");
            continue;
        }
        let Some(cluster) = base.get(&key).cloned() else {
            continue;
        };
        hosts.insert(
            key.clone(),
            Arc::new(VirtualHost::new(key, cluster, routes, Vec::new())),
        );
    }
    for (key, cluster) in base {
        hosts
            .entry(key.clone())
            .or_insert_with(|| Arc::new(VirtualHost::plain(cluster)));
    }
    Ok(hosts)
}

/// `DestinationRule <namespace>/<name>`, for errors.
fn rule_at(r: &DestinationRule) -> String {
    format!(
        "DestinationRule {}/{}",
        r.metadata.namespace(),
        r.metadata.name
    )
}

/// The rule's traffic policies with their paths: the service's, then each subset's (in
/// order, `None` where a subset has none).
fn traffic_policies(
    r: &DestinationRule,
) -> impl Iterator<Item = (String, Option<&TrafficPolicy>)> + '_ {
    std::iter::once((
        "spec.trafficPolicy".to_string(),
        r.spec.traffic_policy.as_deref(),
    ))
    .chain(r.spec.subsets.iter().enumerate().map(|(i, s)| {
        (
            format!("spec.subsets[{i}].trafficPolicy"),
            s.traffic_policy.as_ref(),
        )
    }))
}

/// The load balancers a DestinationRule sets.
struct RuleBalancing {
    /// `spec.trafficPolicy.loadBalancer`.
    service: Option<Balancing>,
    /// `spec.subsets[i].trafficPolicy.loadBalancer`, for every subset in order.
    subsets: Vec<Option<Balancing>>,
    /// `connectionPool` and `outlierDetection` of the service, then of every subset.
    resilience: Vec<ResilienceParts>,
}

/// The `connectionPool` and `outlierDetection` one traffic policy sets.
#[derive(Default)]
struct ResilienceParts {
    limits: Option<ClusterLimits>,
    outlier: Option<OutlierConfig>,
}

/// The rule's load balancers, checked: errors name the rule and the field.
fn rule_balancing(r: &DestinationRule) -> Result<RuleBalancing, String> {
    let at = rule_at(r);
    let mut all = traffic_policies(r).map(|(path, tp)| {
        let Some(lb) = tp.and_then(|tp| tp.load_balancer.as_ref()) else {
            return Ok(None);
        };
        let path = format!("{at}: {path}.loadBalancer");
        for (field, set) in [
            ("localityLbSetting", lb.locality_lb_setting.is_some()),
            ("warmupDurationSecs", lb.warmup_duration_secs.is_some()),
        ] {
            if set {
                return Err(format!("{path}.{field}: not enforced by this proxy yet"));
            }
        }
        let (policy, hash_on) = policy_from(lb).map_err(|e| format!("{path}.{e}"))?;
        check_cookie(&hash_on).map_err(|e| format!("{path}.consistentHash.httpCookie.{e}"))?;
        Ok(Some(Balancing::from((policy, hash_on))))
    });
    let service = all.next().transpose()?.flatten();
    let subsets = all.collect::<Result<Vec<_>, String>>()?;
    let mut resilience = traffic_policies(r)
        .map(|(path, tp)| resilience_parts(&format!("{at}: {path}"), tp))
        .collect::<Result<Vec<_>, String>>()?;
    // Latency outliers (an annotation): on for the service, with Istio's outlier defaults
    // when the rule sets no `outlierDetection`, and for subsets with their own.
    let ratio = r
        .latency_outlier_ratio()
        .map_err(|(field, e)| format!("{at}: {field}: {e}"))?;
    if let Some(ratio) = ratio {
        let service = resilience[0]
            .outlier
            .get_or_insert_with(OutlierConfig::default);
        service.latency_ratio_percent = Some(ratio);
        for part in &mut resilience[1..] {
            if let Some(o) = &mut part.outlier {
                o.latency_ratio_percent = Some(ratio);
            }
        }
    }
    Ok(RuleBalancing {
        service,
        subsets,
        resilience,
    })
}

/// The enforced `connectionPool` and `outlierDetection` of a traffic policy; the subfields
/// not enforced yet are refused by name.
fn resilience_parts(path: &str, tp: Option<&TrafficPolicy>) -> Result<ResilienceParts, String> {
    let Some(tp) = tp else {
        return Ok(ResilienceParts::default());
    };
    let limits = match &tp.connection_pool {
        None => None,
        Some(cp) => {
            let tcp = cp.tcp.clone().unwrap_or_default();
            let http = cp.http.clone().unwrap_or_default();
            for (field, set) in [
                ("tcp.tcpKeepalive", tcp.tcp_keepalive.is_some()),
                (
                    "tcp.maxConnectionDuration",
                    tcp.max_connection_duration.is_some(),
                ),
                ("http.maxRetries", http.max_retries.is_some()),
                ("http.h2UpgradePolicy", http.h2_upgrade_policy.is_some()),
                ("http.useClientProtocol", http.use_client_protocol.is_some()),
                (
                    "http.maxConcurrentStreams",
                    http.max_concurrent_streams.is_some(),
                ),
            ] {
                if set {
                    return Err(format!(
                        "{path}.connectionPool.{field}: not enforced by this proxy yet"
                    ));
                }
            }
            // 0 means no limit (Istio's default), as does leaving a field out.
            let limit = |v: Option<u32>| v.filter(|&v| v > 0);
            let time = |v: Option<trellis_api::duration::Duration>| {
                v.map(|d| d.0).filter(|d| !d.is_zero())
            };
            Some(ClusterLimits {
                max_connections: limit(tcp.max_connections),
                max_pending: limit(http.http1_max_pending_requests),
                max_requests: limit(http.http2_max_requests),
                max_requests_per_connection: limit(http.max_requests_per_connection),
                connect_timeout: time(tcp.connect_timeout),
                idle_timeout: time(http.idle_timeout).or(time(tcp.idle_timeout)),
            })
        }
    };
    let outlier = tp.outlier_detection.as_ref().map(OutlierConfig::from);
    Ok(ResilienceParts { limits, outlier })
}

/// A cookie policy's cookie must be one a client can send back (`name` an RFC 6265 token)
/// and, when the proxy generates it, one it can set (`path` without `;` or controls).
fn check_cookie(on: &HashOn) -> Result<(), String> {
    let HashOn::Cookie { name, path, .. } = on else {
        return Ok(());
    };
    let token = |b: u8| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b);
    if name.is_empty() || !name.bytes().all(token) {
        return Err(format!("name {name:?} is not a valid cookie name"));
    }
    if let Some(p) = path {
        if !p.bytes().all(|b| (b' '..0x7f).contains(&b) && b != b';') {
            return Err(format!("path {p:?} is not a valid cookie path"));
        }
    }
    Ok(())
}

/// Refuses the DestinationRule settings this proxy does not enforce yet: never silently
/// ignored (the traffic issue adds them).
fn not_enforced_rule(r: &DestinationRule) -> Result<(), String> {
    let at = rule_at(r);
    for (path, tp) in traffic_policies(r) {
        let Some(tp) = tp else { continue };
        // `ISTIO_MUTUAL` is what the mesh does anyway (mTLS to every endpoint with a mesh
        // identity, checked in `compile` for the rule's endpoints); anything else is refused.
        if let Some(tls) = &tp.tls {
            let only_mode = ClientTlsSettings {
                mode: tls.mode,
                ..ClientTlsSettings::default()
            };
            if tls.mode != TlsMode::IstioMutual {
                let mode = match tls.mode {
                    TlsMode::Disable => "DISABLE",
                    TlsMode::Simple => "SIMPLE",
                    TlsMode::Mutual => "MUTUAL",
                    TlsMode::IstioMutual => "ISTIO_MUTUAL",
                };
                return Err(format!(
                    "{at}: {path}.tls.mode {mode}: not enforced by this proxy yet (ISTIO_MUTUAL is: mesh endpoints are always reached over mTLS)"
                ));
            }
            if *tls != only_mode {
                return Err(format!(
                    "{at}: {path}.tls: only `mode: ISTIO_MUTUAL` is enforced by this proxy yet (certificates, sni and subjectAltNames come from the mesh)"
                ));
            }
        }
        for (field, set) in [("portLevelSettings", !tp.port_level_settings.is_empty())] {
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
            uri: rd.uri.clone().map(PathEdit::Whole),
            authority: rd.authority.clone(),
            scheme: rd.scheme.clone(),
            port: match rd.port.and_then(|p| u16::try_from(p).ok()) {
                Some(p) => RedirectPort::Set(p),
                None => RedirectPort::Keep,
            },
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
    let retry = match &r.retries {
        Some(retries) => RetryPolicy::compile(retries).map_err(|e| at(&format!(".retries.{e}")))?,
        None => None,
    };
    let rewrite = match &r.rewrite {
        Some(rw) => Some(Rewrite {
            uri: match (&rw.uri, &rw.uri_regex_rewrite) {
                (Some(uri), _) => Some(PathEdit::Prefix(uri.clone())),
                (None, Some(rr)) => Some(
                    regex_rewrite(&rr.pattern, &rr.rewrite)
                        .map_err(|e| format!("{}: {e}", at(".rewrite.uriRegexRewrite")))?,
                ),
                (None, None) => None,
            },
            authority: rw
                .authority
                .as_deref()
                .map(HeaderValue::from_str)
                .transpose()
                .map_err(|_| format!("{}: invalid authority", at(".rewrite.authority")))?,
        }),
        None => None,
    };
    let mirrors = mirrors(r, cluster_for, &at);
    Ok(Route {
        name,
        matches,
        action,
        timeout: r.timeout.map(|d| d.0).filter(|d| !d.is_zero()),
        headers: header_ops(r.headers.as_ref()).map_err(|e| format!("{}: {e}", at(".headers")))?,
        rewrite,
        fault: r.fault.as_ref().map(fault),
        retry,
        mirrors,
        cors: r
            .cors_policy
            .as_ref()
            .map(super::cors::Cors::compile)
            .transpose()
            .map_err(|e| format!("{}: {e}", at(".corsPolicy")))?,
    })
}

/// Compiles `spec.tcp[index]` of a VirtualService. A destination this proxy cannot resolve
/// yet is left out, as for HTTP routes; a route left with none closes its connections.
fn compile_tcp_route(
    vs: &VirtualService,
    index: usize,
    r: &TcpRoute,
    cluster_for: &ClusterFor<'_>,
) -> Result<super::TcpRoute, String> {
    let at = format!(
        "VirtualService {}/{}: spec.tcp[{index}]",
        vs.metadata.namespace(),
        vs.metadata.name
    );
    let matches = r
        .matches
        .iter()
        .enumerate()
        .map(|(j, m)| ConnMatch::compile_l4(m).map_err(|e| format!("{at}.match[{j}].{e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let backends = r
        .route
        .iter()
        .filter_map(|d| {
            let dest = &d.destination;
            let Some(cluster) = cluster_for(&dest.host, dest.subset.as_deref()) else {
                tracing::debug!(at = %at, host = %dest.host, "TCP route destination unknown");
                return None;
            };
            Some(Backend {
                cluster,
                weight: d.weight.unwrap_or(if r.route.len() == 1 { 100 } else { 0 }),
                headers: HeaderOps::default(),
            })
        })
        .collect();
    Ok(super::TcpRoute {
        name: Arc::from(format!(
            "{}/{}#tcp{index}",
            vs.metadata.namespace(),
            vs.metadata.name
        )),
        matches,
        backends,
    })
}

/// Istio's `uriRegexRewrite` (Envoy's RE2 `regex_rewrite`): every match of `pattern` in the
/// path is replaced; `\1`..`\9` in `rewrite` are the groups (`$` is literal).
fn regex_rewrite(pattern: &str, rewrite: &str) -> Result<PathEdit, String> {
    let re = regex::RegexBuilder::new(pattern)
        .size_limit(1 << 20)
        .build()
        .map_err(|e| format!("match: {e}"))?;
    let mut with = String::with_capacity(rewrite.len());
    let mut chars = rewrite.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\\' if chars.peek().is_some_and(char::is_ascii_digit) => {
                with.push_str(&format!("${{{}}}", chars.next().unwrap_or('0')));
            }
            '$' => with.push_str("$$"),
            c => with.push(c),
        }
    }
    Ok(PathEdit::Regex(re, with))
}

/// The route's mirrors: `mirror` with `mirrorPercentage`, or `mirrors` (each with its own
/// `percentage`); no percentage means every request. A mirror whose host this proxy cannot
/// resolve yet is left out (a copy nobody receives), like an unknown route destination.
fn mirrors(
    r: &HttpRoute,
    cluster_for: &ClusterFor<'_>,
    at: &dyn Fn(&str) -> String,
) -> Vec<Mirror> {
    let single = r
        .mirror
        .as_ref()
        .map(|d| (".mirror".to_string(), d, r.mirror_percentage.as_ref()));
    let several = r.mirrors.iter().enumerate().map(|(j, m)| {
        (
            format!(".mirrors[{j}].destination"),
            &m.destination,
            m.percentage.as_ref(),
        )
    });
    single
        .into_iter()
        .chain(several)
        .filter_map(|(field, dest, pct)| {
            let Some(cluster) = cluster_for(&dest.host, dest.subset.as_deref()) else {
                tracing::debug!(
                    at = %at(&format!("{field}.host")),
                    host = %dest.host,
                    "mirror destination unknown"
                );
                return None;
            };
            Some(Mirror {
                cluster,
                fraction: fraction(pct, None),
            })
        })
        .filter(|m| m.fraction > 0.0)
        .collect()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::Policy;
    use crate::route::matcher::{MatchContext, Source};
    use crate::route::Decision;
    use crate::telemetry::metrics::Peer;
    use crate::telemetry::Metrics;
    use crate::upstream::pool::{Pool, PoolConfig};
    use std::cell::RefCell;
    use trellis_api::names::HostName;

    const VS: &str = "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: users, namespace: edtech }
spec:
  hosts: [users]
  http:
  - match: [{ uri: { prefix: /v1 } }]
    route: [{ destination: { host: users, subset: v1 } }]
  - match: [{ uri: { prefix: /v2 } }]
    route: [{ destination: { host: users, subset: v2 } }]
  - route: [{ destination: { host: users } }]
";

    /// The balancing each cluster was made with, by subset (`None`: the service).
    type Made = Vec<(Option<String>, Balancing)>;

    /// Compiles `yaml` (plus [`VS`]) over `users.edtech` with a v1 and a v2 endpoint.
    fn compile_with(yaml: &str) -> Result<Made, String> {
        compile_all(&format!("{VS}---\n{yaml}")).map(|(_, made)| made)
    }

    /// Compiles `text` over `users.edtech` with a v1 and a v2 endpoint.
    #[allow(clippy::type_complexity)]
    fn compile_all(text: &str) -> Result<(HashMap<ServiceKey, Arc<VirtualHost>>, Made), String> {
        let (resources, errors) = trellis_api::resources::parse("rules.yaml".as_ref(), text);
        assert!(errors.is_empty(), "{errors:?}");
        let pool = Pool::new(PoolConfig {
            metrics: Arc::default(),
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(60),
        });
        let users = ServiceKey::new("users", "edtech");
        let endpoints = ["v1", "v2"]
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let addr = ([10, 0, 0, i as u8 + 1], 8080).into();
                let labels = BTreeMap::from([("version".to_string(), v.to_string())]);
                (pool.endpoint(addr, None), labels)
            })
            .collect();
        let clusters = BTreeMap::from([(
            users.clone(),
            ClusterSpec {
                endpoints,
                timeout: None,
            },
        )]);
        let resolve = |host: &str, ns: &str| {
            let h = HostName::parse(host, "cluster.local").ok()?;
            let key = ServiceKey::new(&h.name, h.namespace.as_deref().unwrap_or(ns));
            (key == users).then_some(key)
        };
        let metrics = Metrics::default();
        let made = RefCell::new(Made::new());
        let make = |key: &ServiceKey,
                    subset: Option<&str>,
                    endpoints: Vec<Arc<EndpointConns>>,
                    timeout: Option<Duration>,
                    balancing: Balancing| {
            made.borrow_mut()
                .push((subset.map(str::to_string), balancing.clone()));
            let stats = metrics.http_stats("outbound", Peer::new(&key.name, &key.namespace));
            let mut s =
                Service::new(key.clone(), endpoints, timeout, stats).with_balancing(balancing);
            s.subset = subset.map(Arc::from);
            Arc::new(s)
        };
        let hosts = compile(&clusters, &resources, &resolve, &make)?;
        let mut made = made.into_inner();
        made.sort_by(|a, b| a.0.cmp(&b.0));
        Ok((hosts, made))
    }

    fn rule(traffic_policy: &str, v1_policy: &str) -> String {
        let v1_policy = if v1_policy.is_empty() {
            String::new()
        } else {
            format!(", {v1_policy}")
        };
        format!(
            "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{ name: users, namespace: edtech }}
spec:
  host: users
  {traffic_policy}
  subsets:
  - {{ name: v1, labels: {{ version: v1 }}{v1_policy} }}
  - {{ name: v2, labels: {{ version: v2 }} }}
"
        )
    }

    fn policies(made: &Made) -> Vec<(Option<&str>, Policy)> {
        made.iter().map(|(s, b)| (s.as_deref(), b.policy)).collect()
    }

    #[test]
    fn narrower_export_to_is_refused_until_enforced() {
        let err = compile_with(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: { name: private, namespace: edtech }\nspec:\n  host: users\n  exportTo: [\".\"]\n",
        )
        .expect_err("refused");
        assert!(
            err.contains("DestinationRule edtech/private: spec.exportTo"),
            "{err}"
        );
        assert!(compile_with(
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: { name: public, namespace: edtech }\nspec:\n  host: users\n  exportTo: [\"*\"]\n",
        )
        .is_ok());
    }

    const HTTP_ROUTE: &str = "\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: users, namespace: edtech }
spec:
  parentRefs: [{ group: \"\", kind: Service, name: users, port: 80 }]
  rules:
  - name: fallback
    backendRefs: [{ name: users, port: 80 }]
  - name: api
    matches: [{ path: { type: PathPrefix, value: /api/ } }]
    backendRefs: [{ name: users, port: 80 }]
  - name: exact
    matches: [{ path: { type: Exact, value: /api } }]
    backendRefs: [{ name: users, port: 80 }]
  - name: specific
    matches: [{ path: { type: PathPrefix, value: /api/v2 } }]
    filters: [{ type: URLRewrite, urlRewrite: { path: { type: ReplacePrefixMatch, replacePrefixMatch: / } } }]
    backendRefs: [{ name: users, port: 80 }]
  - name: by-method
    matches: [{ path: { type: PathPrefix, value: /api }, method: POST }]
    backendRefs: [{ name: users, port: 80 }]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: ingress-only, namespace: edtech }
spec:
  parentRefs: [{ name: ingress }]
  rules:
  - matches: [{ path: { type: Exact, value: /gw } }]
    filters: [{ type: RequestRedirect, requestRedirect: { scheme: https } }]
";

    #[test]
    fn http_routes_attached_to_a_service_route_by_gateway_api_precedence() {
        let (hosts, _) = compile_all(HTTP_ROUTE).unwrap();
        let users = &hosts[&ServiceKey::new("users", "edtech")];
        let labels = BTreeMap::new();
        let route = |method: &str, path: &str| {
            let head = http::Request::builder()
                .method(method)
                .uri(path)
                .body(())
                .unwrap()
                .into_parts()
                .0;
            let cx = MatchContext {
                path,
                authority: "users",
                port: None,
                source: Source {
                    labels: &labels,
                    namespace: "edtech",
                },
            };
            match users.decide(&head, &cx) {
                Decision::Forward { route, .. } => {
                    let r = route.unwrap();
                    (r.name.to_string(), r.rewritten_path(path, &head, &cx))
                }
                Decision::Answer(r) => (format!("answer {}", r.name), None),
                Decision::NoRoute => ("none".into(), None),
            }
        };
        let named = |m: &str, p: &str| route(m, p).0;
        // Exact beats every prefix; the longest prefix wins; prefixes match whole segments.
        assert_eq!(named("GET", "/api"), "exact");
        assert_eq!(
            route("GET", "/api/v2/users"),
            ("specific".into(), Some("/users".into()))
        );
        assert_eq!(
            route("GET", "/api/v2"),
            ("specific".into(), Some("/".into()))
        );
        assert_eq!(named("GET", "/api/v2x"), "api");
        assert_eq!(named("GET", "/api/v1"), "api");
        // Same prefix length: a method match first.
        assert_eq!(named("POST", "/api/v1"), "by-method");
        assert_eq!(named("GET", "/apis"), "fallback");
        // The route attached to a Gateway only is not a sidecar's.
        assert_eq!(named("GET", "/gw"), "fallback");
    }

    #[test]
    fn without_a_load_balancer_every_cluster_is_p2c() {
        let made = compile_with(&rule("", "")).unwrap();
        assert_eq!(
            policies(&made),
            [
                (None, Policy::P2cPeakEwma),
                (Some("v1"), Policy::P2cPeakEwma),
                (Some("v2"), Policy::P2cPeakEwma),
            ]
        );
    }

    #[test]
    fn a_subset_load_balancer_overrides_the_services() {
        let made = compile_with(&rule(
            "trafficPolicy: { loadBalancer: { simple: ROUND_ROBIN } }",
            "trafficPolicy: { loadBalancer: { consistentHash: { httpHeaderName: X-User, maglev: {} } } }",
        ))
        .unwrap();
        assert_eq!(
            policies(&made),
            [
                (None, Policy::RoundRobin),
                (Some("v1"), Policy::MAGLEV),
                (Some("v2"), Policy::RoundRobin),
            ]
        );
        assert_eq!(
            made[1].1.hash_on,
            HashOn::Header(HeaderName::from_static("x-user"))
        );
    }

    #[test]
    fn connection_pools_and_outlier_detection_resolve_per_subset() {
        let made = compile_with(&rule(
            "trafficPolicy: { connectionPool: { tcp: { maxConnections: 100, connectTimeout: 10s }, http: { http1MaxPendingRequests: 50, http2MaxRequests: 0, maxRequestsPerConnection: 10, idleTimeout: 60s } } }",
            "trafficPolicy: { loadBalancer: { simple: RANDOM }, outlierDetection: { consecutive5xxErrors: 3, baseEjectionTime: 2s } }",
        ))
        .unwrap();
        let service = &made[0].1.resilience;
        let want = ClusterLimits {
            max_connections: Some(100),
            max_pending: Some(50),
            max_requests: None,
            max_requests_per_connection: Some(10),
            connect_timeout: Some(Duration::from_secs(10)),
            idle_timeout: Some(Duration::from_secs(60)),
        };
        assert_eq!(service.limits, want);
        assert_eq!(service.outlier, None);
        // v1: its own load balancer and outlier detection, the service's connection pool.
        let v1 = &made[1].1;
        assert_eq!(v1.policy, Policy::Random);
        assert_eq!(v1.resilience.limits, want);
        let od = v1.resilience.outlier.as_ref().unwrap();
        assert_eq!(od.consecutive_5xx, 3);
        assert_eq!(od.base_ejection_time, Duration::from_secs(2));
        // v2: the service's.
        assert_eq!(made[2].1.resilience, *service);
    }

    #[test]
    fn a_rule_for_another_host_does_not_apply() {
        let other = rule("trafficPolicy: { loadBalancer: { simple: RANDOM } }", "")
            .replace("host: users", "host: grades");
        let made = compile_with(&format!("{other}---\n{}", rule("", ""))).unwrap();
        assert!(
            policies(&made)
                .iter()
                .all(|(_, p)| *p == Policy::P2cPeakEwma),
            "{made:?}"
        );
    }

    #[test]
    fn bad_load_balancers_are_refused_by_rule_and_field() {
        let at = "DestinationRule edtech/users: ";
        for (tp, v1, want) in [
            (
                "",
                "trafficPolicy: { loadBalancer: { consistentHash: { httpHeaderName: \"bad name\" } } }",
                "spec.subsets[0].trafficPolicy.loadBalancer.consistentHash.httpHeaderName \"bad name\" is not a valid header name",
            ),
            (
                "trafficPolicy: { loadBalancer: { consistentHash: { httpCookie: { name: \"a;b\", ttl: 10s } } } }",
                "",
                "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.name \"a;b\" is not a valid cookie name",
            ),
            (
                "trafficPolicy: { loadBalancer: { consistentHash: { httpCookie: { name: s, path: \"/a;b\", ttl: 10s } } } }",
                "",
                "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.path \"/a;b\" is not a valid cookie path",
            ),
            (
                "trafficPolicy: { loadBalancer: { simple: RANDOM, localityLbSetting: { enabled: true } } }",
                "",
                "spec.trafficPolicy.loadBalancer.localityLbSetting: not enforced by this proxy yet",
            ),
            (
                "trafficPolicy: { loadBalancer: { warmupDurationSecs: 30s } }",
                "",
                "spec.trafficPolicy.loadBalancer.warmupDurationSecs: not enforced by this proxy yet",
            ),
            (
                "trafficPolicy: { loadBalancer: { simple: RANDOM }, connectionPool: { tcp: { maxConnections: 1, tcpKeepalive: { time: 10s } } } }",
                "",
                "spec.trafficPolicy.connectionPool.tcp.tcpKeepalive: not enforced by this proxy yet",
            ),
            (
                "",
                "trafficPolicy: { connectionPool: { http: { maxConcurrentStreams: 10 } } }",
                "spec.subsets[0].trafficPolicy.connectionPool.http.maxConcurrentStreams: not enforced by this proxy yet",
            ),
        ] {
            let err = compile_with(&rule(tp, v1)).unwrap_err();
            assert_eq!(err, format!("{at}{want}"));
        }
        // Refused even when no service here is the rule's host.
        let other = rule(
            "trafficPolicy: { loadBalancer: { consistentHash: { httpHeaderName: \"bad name\" } } }",
            "",
        )
        .replace("host: users", "host: elsewhere");
        assert!(compile_with(&other).is_err());
    }

    const TCP_VS: &str = "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: users-tcp, namespace: edtech }
spec:
  hosts: [users]
  tcp:
  - match: [{ port: 5432 }]
    route: [{ destination: { host: users, subset: v2 } }]
  - match: [{ port: 6000, sourceLabels: { app: web } }, { port: 6001, sourceNamespace: other }]
    route: [{ destination: { host: users, subset: v1 } }]
  - match: [{ port: 7000, gateways: [ingress] }]
    route: [{ destination: { host: users, subset: v1 } }]
  - match: [{ port: 8000 }]
    route:
    - { destination: { host: users, subset: v1 }, weight: 80 }
    - { destination: { host: users, subset: v2 }, weight: 20 }
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: users, namespace: edtech }
spec:
  host: users
  subsets:
  - { name: v1, labels: { version: v1 } }
  - { name: v2, labels: { version: v2 } }
";

    #[test]
    fn tcp_routes_choose_by_port_and_source_and_split_by_weight() {
        let (hosts, _) = compile_all(TCP_VS).unwrap();
        let users = &hosts[&ServiceKey::new("users", "edtech")];
        let labels = BTreeMap::from([("app".to_string(), "api".to_string())]);
        let source = Source {
            labels: &labels,
            namespace: "edtech",
        };
        let subset = |port: u16| {
            let (cluster, _) = users.tcp_cluster(Some(port), &source).unwrap();
            cluster.subset.as_deref().map(str::to_string)
        };
        assert_eq!(subset(5432).as_deref(), Some("v2"));
        // Source labels and namespace that are not this workload's: the service itself.
        assert_eq!(subset(6000), None);
        assert_eq!(subset(6001), None);
        // A match for gateways only never applies in a sidecar.
        assert_eq!(subset(7000), None);
        // No route for the port: the service itself.
        assert_eq!(subset(9999), None);
        let v2 = (0..10_000)
            .filter(|_| subset(8000).as_deref() == Some("v2"))
            .count();
        assert!((1_800..=2_200).contains(&v2), "{v2} of 10000 went to v2");
        let web = BTreeMap::from([("app".to_string(), "web".to_string())]);
        let web = Source {
            labels: &web,
            namespace: "other",
        };
        for port in [6000, 6001] {
            let (cluster, route) = users.tcp_cluster(Some(port), &web).unwrap();
            assert_eq!(cluster.subset.as_deref(), Some("v1"));
            assert_eq!(&*route.unwrap().name, "edtech/users-tcp#tcp1");
        }
    }

    #[test]
    fn gateway_bound_virtual_services_and_destination_subnets() {
        // Bound to an ingress gateway only: not a sidecar's route.
        let gateway_only = TCP_VS.replace(
            "  hosts: [users]\n",
            "  hosts: [users]\n  gateways: [ingress]\n",
        );
        let (hosts, _) = compile_all(&gateway_only).unwrap();
        assert!(hosts[&ServiceKey::new("users", "edtech")]
            .tcp_routes
            .is_empty());
        let with_mesh = TCP_VS.replace(
            "  hosts: [users]\n",
            "  hosts: [users]\n  gateways: [ingress, mesh]\n",
        );
        let (hosts, _) = compile_all(&with_mesh).unwrap();
        assert_eq!(
            hosts[&ServiceKey::new("users", "edtech")].tcp_routes.len(),
            4
        );
        let subnets = TCP_VS.replace("{ port: 5432 }", "{ destinationSubnets: [10.0.0.0/8] }");
        let err = compile_all(&subnets).err().expect("refused");
        assert!(
            err.contains("VirtualService edtech/users-tcp: spec.tcp[0].match[0].destinationSubnets: not enforced by this proxy yet"),
            "{err}"
        );
    }

    #[test]
    fn only_istio_mutual_tls_is_accepted_and_only_for_mesh_endpoints() {
        let err = |tp: &str| compile_with(&rule(tp, "")).err().unwrap_or_default();
        assert!(
            err("trafficPolicy: { tls: { mode: SIMPLE } }").contains(
                "DestinationRule edtech/users: spec.trafficPolicy.tls.mode SIMPLE: not enforced"
            ),
            "{}",
            err("trafficPolicy: { tls: { mode: SIMPLE } }")
        );
        assert!(
            err("trafficPolicy: { tls: { mode: ISTIO_MUTUAL, sni: users.example } }")
                .contains("spec.trafficPolicy.tls: only `mode: ISTIO_MUTUAL`")
        );
        // The test endpoints have no mesh identity: ISTIO_MUTUAL cannot be what happens.
        assert!(err("trafficPolicy: { tls: { mode: ISTIO_MUTUAL } }")
            .contains("tls.mode ISTIO_MUTUAL: endpoint 10.0.0.1:8080 has no mesh identity"));
    }

    #[test]
    fn uri_regex_rewrites_use_envoy_group_syntax() {
        let rewrite = |pattern: &str, with: &str, path: &str| {
            let PathEdit::Regex(re, with) = regex_rewrite(pattern, with).unwrap() else {
                panic!("a regex edit")
            };
            re.replace_all(path, with.as_str()).into_owned()
        };
        // Istio's documented example: swap two path segments.
        assert_eq!(
            rewrite(
                "^/service/([^/]+)(/.*)$",
                "\\2/instance/\\1",
                "/service/foo/v1/api"
            ),
            "/v1/api/instance/foo"
        );
        // Every match is replaced; `$` in the replacement is literal.
        assert_eq!(rewrite("/+", "/", "//a///b"), "/a/b");
        assert_eq!(rewrite("^/price$", "/cost$", "/price"), "/cost$");
        assert!(regex_rewrite("(", "x").is_err());
    }

    #[test]
    fn mirrors_compile_with_their_shares_and_shadow_authorities() {
        use trellis_api::resources::common::Percent;
        use trellis_api::resources::http_policy::HttpMirrorPolicy;
        use trellis_api::resources::virtual_service::Destination;
        let stats = Metrics::default().http_stats("outbound", Peer::new("shadow", "edtech"));
        let shadow = Arc::new(Service::new(
            ServiceKey::new("shadow", "edtech"),
            Vec::new(),
            None,
            stats,
        ));
        let cluster_for = |host: &str, _: Option<&str>| (host == "shadow").then(|| shadow.clone());
        let at = |f: &str| f.to_string();
        let dest = |host: &str| Destination {
            host: host.into(),
            ..Destination::default()
        };
        let pct = |value| Some(Percent { value });

        // `mirror` alone: every request.
        let r = HttpRoute {
            mirror: Some(dest("shadow")),
            ..HttpRoute::default()
        };
        let m = mirrors(&r, &cluster_for, &at);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0].fraction, 1.0);
        assert_eq!(m[0].cluster.key.name, "shadow");
        assert!(m[0].draw());

        // `mirrorPercentage`; 0% mirrors nothing.
        let r = HttpRoute {
            mirror: Some(dest("shadow")),
            mirror_percentage: pct(12.5),
            ..HttpRoute::default()
        };
        assert_eq!(mirrors(&r, &cluster_for, &at)[0].fraction, 0.125);
        let r = HttpRoute {
            mirror: Some(dest("shadow")),
            mirror_percentage: pct(0.0),
            ..HttpRoute::default()
        };
        assert!(mirrors(&r, &cluster_for, &at).is_empty());

        // `mirrors`, each with its own share; an unknown host is left out.
        let r = HttpRoute {
            mirrors: vec![
                HttpMirrorPolicy {
                    destination: dest("shadow"),
                    percentage: pct(50.0),
                },
                HttpMirrorPolicy {
                    destination: dest("nowhere"),
                    percentage: None,
                },
                HttpMirrorPolicy {
                    destination: dest("shadow"),
                    percentage: None,
                },
            ],
            ..HttpRoute::default()
        };
        let fractions: Vec<f64> = mirrors(&r, &cluster_for, &at)
            .iter()
            .map(|m| m.fraction)
            .collect();
        assert_eq!(fractions, [0.5, 1.0]);

        // The copy's authority: `-shadow` after the host, before the port.
        assert_eq!(super::super::shadow_authority("reviews"), "reviews-shadow");
        assert_eq!(
            super::super::shadow_authority("reviews.edtech:9080"),
            "reviews.edtech-shadow:9080"
        );
        assert_eq!(
            super::super::shadow_authority("[::1]:80"),
            "[::1]-shadow:80"
        );
    }
}

//! Traffic rules: `weights`, `unknown-host`, `unknown-subset` and `shadowed-route`.
//!
//! Hosts are compared fully qualified: a short name is qualified with the namespace of the
//! resource that wrote it (`reviews` in `edtech` is `reviews.edtech.svc.cluster.local`),
//! `name.namespace` and `name.namespace.svc` are completed with the cluster domain.
//!
//! `unknown-host` is deliberately conservative. Kubernetes services are registered at run
//! time and cannot be checked offline, so a host is never reported when it is
//! - a short name (`reviews`), `name.namespace` (`reviews.edtech`, one dot) or ends with
//!   `.svc` / `.svc.cluster.local`;
//! - defined in the analyzed set: a ServiceEntry host (wildcards such as `*.example.com`
//!   match), a VirtualService `hosts` entry, or (for route destinations) a DestinationRule
//!   `host`.
//!
//! Only other fully qualified names (two dots or more, e.g. `api.payments.example.com`) that
//! nothing defines are reported: Istio has no service for them and requests fail.

use super::{finding, Finding, Level};
use crate::names::DEFAULT_CLUSTER_DOMAIN;
use crate::resources::http_match::HttpMatchRequest;
use crate::resources::virtual_service::{Destination, HttpRoute};
use crate::resources::{Loaded, Resource};
use std::collections::BTreeSet;

/// `host` fully qualified as seen from `namespace`, lower case, without a trailing dot.
pub fn fqdn(host: &str, namespace: &str) -> String {
    let h = host.trim_end_matches('.').to_ascii_lowercase();
    if h.starts_with('*') {
        return h;
    }
    match h.matches('.').count() {
        0 => format!("{h}.{namespace}.svc.{DEFAULT_CLUSTER_DOMAIN}"),
        1 => format!("{h}.svc.{DEFAULT_CLUSTER_DOMAIN}"),
        _ if h.ends_with(".svc") => format!("{h}.{DEFAULT_CLUSTER_DOMAIN}"),
        _ => h,
    }
}

/// Whether a (qualified) host is a cluster service name, which we cannot check offline.
fn in_cluster(fqdn: &str) -> bool {
    fqdn.ends_with(&format!(".svc.{DEFAULT_CLUSTER_DOMAIN}"))
}

/// Whether `pattern` (`*`, `*.example.com` or a plain host; qualified) matches `host`.
fn host_matches(pattern: &str, host: &str) -> bool {
    if pattern == "*" || pattern == host {
        return true;
    }
    match pattern.strip_prefix('*') {
        Some(suffix) => host.ends_with(suffix) && host.len() > suffix.len(),
        None => false,
    }
}

/// Whether a match condition holds for every request: nothing set but (at most) a `/` or
/// empty prefix, or a `.*` regex, on the path.
fn matches_everything(m: &HttpMatchRequest) -> bool {
    let uri_all = match &m.uri {
        None => true,
        Some(u) => matches!(
            (u.exact.as_deref(), u.prefix.as_deref(), u.regex.as_deref()),
            (None, None | Some("/" | ""), None) | (None, None, Some(".*"))
        ),
    };
    uri_all
        && m.scheme.is_none()
        && m.method.is_none()
        && m.authority.is_none()
        && m.headers.is_empty()
        && m.port.is_none()
        && m.source_labels.is_empty()
        && m.gateways.is_empty()
        && m.query_params.is_empty()
        && m.without_headers.is_empty()
        && m.source_namespace.is_none()
}

/// Whether an HTTP route catches every request (no `match`, or one that matches everything).
fn catch_all(r: &HttpRoute) -> bool {
    r.matches.is_empty() || r.matches.iter().any(matches_everything)
}

fn route_label(path: &str, r: &HttpRoute) -> String {
    match &r.name {
        Some(n) => format!("{path} ({n:?})"),
        None => path.to_string(),
    }
}

/// Host patterns defined in the set (qualified): ServiceEntry and VirtualService hosts, and
/// DestinationRule hosts (only used for route destinations).
struct Defined<'a> {
    entries_and_routes: Vec<String>,
    rules: Vec<String>,
    /// Services registered on a control plane (fully qualified), when the caller asked.
    registered: Option<&'a BTreeSet<String>>,
}

impl<'a> Defined<'a> {
    fn new(loaded: &[Loaded], registered: Option<&'a BTreeSet<String>>) -> Self {
        let mut d = Defined {
            entries_and_routes: Vec::new(),
            rules: Vec::new(),
            registered,
        };
        for l in loaded {
            match &l.resource {
                Resource::ServiceEntry(s) => d
                    .entries_and_routes
                    .extend(s.spec.hosts.iter().map(|h| fqdn(h, s.metadata.namespace()))),
                Resource::VirtualService(v) => d
                    .entries_and_routes
                    .extend(v.spec.hosts.iter().map(|h| fqdn(h, v.metadata.namespace()))),
                Resource::DestinationRule(r) => {
                    d.rules.push(fqdn(&r.spec.host, r.metadata.namespace()))
                }
                _ => {}
            }
        }
        d
    }

    fn knows(&self, host: &str, with_rules: bool) -> bool {
        let cluster_ok = match self.registered {
            None => in_cluster(host),
            Some(r) => r.contains(host),
        };
        cluster_ok
            || self
                .entries_and_routes
                .iter()
                .chain(self.rules.iter().filter(|_| with_rules))
                .any(|p| host_matches(p, host))
    }
}

/// The subsets the DestinationRules for `host` define (wildcard hosts included), and whether
/// any DestinationRule applies to it at all.
fn subsets_for<'a>(loaded: &'a [Loaded], host: &str) -> (bool, Vec<&'a str>) {
    let mut any = false;
    let mut names = Vec::new();
    for l in loaded {
        if let Resource::DestinationRule(r) = &l.resource {
            if host_matches(&fqdn(&r.spec.host, r.metadata.namespace()), host) {
                any = true;
                names.extend(r.spec.subsets.iter().map(|s| s.name.as_str()));
            }
        }
    }
    (any, names)
}

/// What an unknown host is not.
fn unknown_because(registered: bool) -> &'static str {
    if registered {
        "is not a service registered on the control plane and no ServiceEntry defines it"
    } else {
        "is not a cluster service and no ServiceEntry defines it"
    }
}

/// Runs the traffic rules. With `registered`, cluster service names are checked against the
/// services registered on a control plane instead of being trusted.
pub fn check(loaded: &[Loaded], registered: Option<&BTreeSet<String>>, out: &mut Vec<Finding>) {
    let defined = Defined::new(loaded, registered);
    let because = unknown_because(registered.is_some());
    for l in loaded {
        match &l.resource {
            Resource::VirtualService(v) => {
                let ns = v.metadata.namespace();
                let mut dests: Vec<(String, &Destination)> = Vec::new();
                let mut shadowed_by: Option<String> = None;
                for (i, r) in v.spec.http.iter().enumerate() {
                    let path = format!("spec.http[{i}]");
                    if let Some(by) = &shadowed_by {
                        out.push(finding(
                            l,
                            Level::Warning,
                            "shadowed-route",
                            format!(
                                "{} can never match: {by} before it matches every request",
                                route_label(&path, r)
                            ),
                        ));
                    } else if catch_all(r) {
                        shadowed_by = Some(route_label(&path, r));
                    }
                    let weights = r.route.iter().map(|d| d.weight);
                    weights_rule(l, &path, weights, out);
                    for (j, d) in r.route.iter().enumerate() {
                        dests.push((format!("{path}.route[{j}].destination"), &d.destination));
                    }
                }
                for (i, r) in v.spec.tcp.iter().enumerate() {
                    let path = format!("spec.tcp[{i}]");
                    weights_rule(l, &path, r.route.iter().map(|d| d.weight), out);
                    for (j, d) in r.route.iter().enumerate() {
                        dests.push((format!("{path}.route[{j}].destination"), &d.destination));
                    }
                }
                for (path, d) in dests {
                    let host = fqdn(&d.host, ns);
                    if !defined.knows(&host, true) {
                        out.push(finding(
                            l,
                            Level::Warning,
                            "unknown-host",
                            format!("{path}.host: {:?} {because}", d.host),
                        ));
                    }
                    let Some(subset) = &d.subset else { continue };
                    let (any_rule, subsets) = subsets_for(loaded, &host);
                    if !subsets.contains(&subset.as_str()) {
                        let why = if any_rule {
                            format!("no DestinationRule for {host} defines it")
                        } else {
                            format!("there is no DestinationRule for {host}")
                        };
                        out.push(finding(
                            l,
                            Level::Warning,
                            "unknown-subset",
                            format!("{path}.subset: subset {subset:?} not found: {why} (requests to it fail with 503)"),
                        ));
                    }
                }
            }
            Resource::HttpRoute(hr) => http_route(loaded, l, hr, out),
            Resource::DestinationRule(r) => {
                let host = fqdn(&r.spec.host, r.metadata.namespace());
                if !host.starts_with('*') && !defined.knows(&host, false) {
                    out.push(finding(
                        l,
                        Level::Warning,
                        "unknown-host",
                        format!("spec.host: {:?} {because}", r.spec.host),
                    ));
                }
            }
            _ => {}
        }
    }
}

/// An HTTPRoute as a sidecar sees it. `gateway-only-route`: it attaches to no Service, so
/// sidecars ignore it (Trellis has no gateway). `route-conflict`: a VirtualService applied to
/// sidecars routes the same service, and the proxy lets the VirtualService win.
fn http_route(
    loaded: &[Loaded],
    l: &Loaded,
    hr: &crate::resources::HttpRoute,
    out: &mut Vec<Finding>,
) {
    let ns = hr.metadata.namespace();
    let services: Vec<String> = hr
        .spec
        .parent_refs
        .iter()
        .filter(|p| p.is_service())
        .map(|p| fqdn(&p.name, p.namespace.as_deref().unwrap_or(ns)))
        .collect();
    if services.is_empty() {
        out.push(finding(
            l,
            Level::Warning,
            "gateway-only-route",
            "spec.parentRefs: no Service parent (group \"\", kind Service): sidecars ignore this route, and Trellis has no gateway to apply it".into(),
        ));
        return;
    }
    for other in loaded {
        let Resource::VirtualService(v) = &other.resource else {
            continue;
        };
        let g = &v.spec.gateways;
        if !g.is_empty() && !g.iter().any(|g| g == "mesh") {
            continue;
        }
        let vns = v.metadata.namespace();
        if let Some(host) = v
            .spec
            .hosts
            .iter()
            .map(|h| fqdn(h, vns))
            .find(|h| services.contains(h))
        {
            out.push(finding(
                l,
                Level::Warning,
                "route-conflict",
                format!(
                    "VirtualService {vns}/{} also routes {host}: the proxy applies the VirtualService and ignores this HTTPRoute for it",
                    v.metadata.name
                ),
            ));
        }
    }
}

/// `weights`: several destinations whose weights (absent: 0) do not sum to 100.
fn weights_rule(
    l: &Loaded,
    path: &str,
    weights: impl ExactSizeIterator<Item = Option<u32>>,
    out: &mut Vec<Finding>,
) {
    if weights.len() < 2 {
        return;
    }
    let ws: Vec<Option<u32>> = weights.collect();
    let sum: u32 = ws.iter().map(|w| w.unwrap_or(0)).sum();
    if sum != 100 {
        let list = ws
            .iter()
            .map(|w| w.map_or("-".to_string(), |w| w.to_string()))
            .collect::<Vec<_>>()
            .join(", ");
        out.push(finding(
            l,
            Level::Error,
            "weights",
            format!("{path}.route: weights [{list}] sum to {sum}, not 100"),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{codes, run};
    use super::*;

    const DR: &str = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: { name: reviews, namespace: edtech }\nspec:\n  host: reviews\n  subsets: [{ name: v1, labels: { version: v1 } }, { name: v2, labels: { version: v2 } }]\n---\n";

    fn vs(http: &str) -> String {
        format!("{DR}apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{ name: reviews, namespace: edtech }}\nspec:\n  hosts: [reviews]\n  http:\n{http}")
    }

    #[test]
    fn qualifies_hosts() {
        assert_eq!(
            fqdn("reviews", "edtech"),
            "reviews.edtech.svc.cluster.local"
        );
        assert_eq!(
            fqdn("reviews.edtech", "x"),
            "reviews.edtech.svc.cluster.local"
        );
        assert_eq!(
            fqdn("reviews.edtech.svc", "x"),
            "reviews.edtech.svc.cluster.local"
        );
        assert_eq!(fqdn("API.Example.com.", "x"), "api.example.com");
        assert!(host_matches("*.example.com", "api.example.com"));
        assert!(!host_matches("*.example.com", "example.com"));
    }

    #[test]
    fn http_routes_that_sidecars_ignore_are_reported() {
        let route = |parent: &str| {
            format!("apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{ name: reviews, namespace: edtech }}\nspec:\n  parentRefs: [{parent}]\n  rules:\n  - backendRefs: [{{ name: reviews, port: 9080 }}]\n")
        };
        let service = "{ group: \"\", kind: Service, name: reviews, port: 9080 }";
        assert!(run(&format!("{DR}{}", route(service))).is_empty());
        let f = run(&route("{ name: ingress }"));
        assert_eq!(codes(&f), ["gateway-only-route@1"]);
        let both = format!(
            "{}---\n{}",
            vs("  - route: [{ destination: { host: reviews } }]\n"),
            route(service)
        );
        let f = run(&both);
        assert_eq!(codes(&f), ["route-conflict@16"], "{f:?}");
        assert!(f[0].message.contains(
            "VirtualService edtech/reviews also routes reviews.edtech.svc.cluster.local"
        ));
    }

    #[test]
    fn canary_is_clean() {
        let f = run(&vs("  - route:\n    - destination: { host: reviews, subset: v1 }\n      weight: 90\n    - destination: { host: reviews.edtech.svc.cluster.local, subset: v2 }\n      weight: 10\n"));
        assert!(f.is_empty(), "{f:?}");
    }

    #[test]
    fn weights_must_sum_to_100() {
        let f = run(&vs("  - match: [{ uri: { prefix: /a } }]\n    route:\n    - destination: { host: reviews, subset: v1 }\n      weight: 90\n    - destination: { host: reviews, subset: v2 }\n      weight: 20\n  - route:\n    - destination: { host: reviews, subset: v1 }\n    - destination: { host: reviews, subset: v2 }\n"));
        assert_eq!(codes(&f), ["weights@8", "weights@8"]);
        assert_eq!(
            f[0].message,
            "spec.http[0].route: weights [90, 20] sum to 110, not 100"
        );
        assert_eq!(
            f[1].message,
            "spec.http[1].route: weights [-, -] sum to 0, not 100"
        );
        // One destination without weight: fine.
        assert!(run(&vs("  - route: [{ destination: { host: reviews } }]\n")).is_empty());
    }

    #[test]
    fn unknown_subsets_and_hosts() {
        let f = run(&vs("  - route:\n    - destination: { host: reviews, subset: v3 }\n    - destination: { host: ratings, subset: v1 }\n      weight: 100\n    - destination: { host: api.payments.example.com }\n"));
        let msgs: Vec<&str> = f.iter().map(|f| f.message.as_str()).collect();
        assert_eq!(
            codes(&f),
            ["unknown-subset@8", "unknown-subset@8", "unknown-host@8"],
            "{msgs:?}"
        );
        assert!(
            msgs[0].contains("no DestinationRule for reviews.edtech.svc.cluster.local defines it")
        );
        assert!(
            msgs[1].contains("there is no DestinationRule for ratings.edtech.svc.cluster.local")
        );
        assert!(msgs[2]
            .starts_with("spec.http[0].route[2].destination.host: \"api.payments.example.com\""));
        // A ServiceEntry (wildcard) defines it.
        let se = "---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: { name: ext, namespace: edtech }\nspec: { hosts: [\"*.example.com\"], ports: [{ number: 443, name: https, protocol: TLS }], resolution: DNS }\n";
        let f =
            run(&(vs("  - route: [{ destination: { host: api.payments.example.com } }]\n") + se));
        assert!(f.is_empty(), "{f:?}");
    }

    #[test]
    fn destination_rule_host_must_be_defined() {
        let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: { name: ext }\nspec: { host: api.example.org }\n";
        assert_eq!(codes(&run(dr)), ["unknown-host@1"]);
    }

    #[test]
    fn routes_after_catch_all_are_shadowed() {
        let f = run(&vs("  - name: all\n    match: [{ uri: { prefix: / } }]\n    route: [{ destination: { host: reviews } }]\n  - name: beta\n    match: [{ headers: { x-beta: { exact: \"1\" } } }]\n    route: [{ destination: { host: reviews } }]\n  - route: [{ destination: { host: reviews } }]\n"));
        assert_eq!(codes(&f), ["shadowed-route@8", "shadowed-route@8"]);
        assert_eq!(
            f[0].message,
            "spec.http[1] (\"beta\") can never match: spec.http[0] (\"all\") before it matches every request"
        );
        // A catch-all last is the normal default route.
        let f = run(&vs("  - match: [{ uri: { prefix: /api } }]\n    route: [{ destination: { host: reviews } }]\n  - route: [{ destination: { host: reviews } }]\n"));
        assert!(f.is_empty(), "{f:?}");
    }
}

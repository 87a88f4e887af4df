//! Offline analysis of a set of loaded resources, like `istioctl analyze`: the mistakes that
//! load fine one document at a time but do not do what their author meant (weights that do
//! not add up, subsets no DestinationRule defines, routes that can never match, policies
//! Istio silently ignores, authorization rules that allow more than intended).
//!
//! Everything here is a pure function of what [`crate::resources::load`] returned; the
//! `trellis analyze` command only loads, calls [`analyze`] and prints.
//!
//! Each [`Finding`] has a stable `code`:
//!
//! | code | level | what |
//! |------|-------|------|
//! | `schema` | error | a document the loader refused (unknown field, bad value, unsupported kind) |
//! | `duplicate` | error | the same kind/namespace/name defined twice |
//! | `weights` | error | a route with several destinations whose weights do not sum to 100 |
//! | `custom-action` | error | an AuthorizationPolicy with action CUSTOM (not supported by Trellis) |
//! | `unknown-host` | warning | a destination or DestinationRule host nothing defines (see [`traffic`]) |
//! | `unknown-subset` | warning | a destination subset no DestinationRule for its host defines |
//! | `shadowed-route` | warning | an HTTP route after a catch-all route: it can never match |
//! | `conflict` | warning | two Peer/RequestAuthentications with the same namespace and selector, or two DestinationRules for the same host in one namespace |
//! | `single-clause-rules` | warning | an ALLOW policy whose rules each carry one clause (see [`authz`]) |
//! | `path-wildcard` | warning | a path with `*` in the middle (matched literally by Istio) |
//! | `not-values-empty` | warning | a `when` with `notValues: [""]` |
//! | `empty-allow` | warning | an ALLOW policy without rules (denies every request) |
//! | `foreign-trust-domain` | warning | a principal in a trust domain other than the mesh's (never matches) |
//! | `http-on-tcp-port` | warning | an AuthorizationPolicy rule testing HTTP attributes on a port declared TCP, or (with `--registered`) naming no port where a selected workload has a TCP port (see [`http_on_tcp`]) |
//! | `route-conflict` | warning | an HTTPRoute for a service a VirtualService also routes (the VirtualService wins) |
//! | `gateway-only-route` | warning | an HTTPRoute with no Service parent (sidecars ignore it) |

pub mod authz;
pub mod http_on_tcp;
pub mod traffic;

use crate::resources::{Loaded, ObjectMeta, Resource, ResourceError};
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

/// How bad a finding is: errors make `trellis analyze` exit 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// The configuration is wrong or will not be applied.
    Error,
    /// Probably not what was meant.
    Warning,
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Error => "error",
            Level::Warning => "warning",
        })
    }
}

/// One problem found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// Error or warning.
    pub level: Level,
    /// Short stable id of the rule, e.g. `weights`.
    pub code: &'static str,
    /// The file.
    pub file: PathBuf,
    /// 1-based line (the start of the document for analysis findings; the field's line for
    /// `schema`).
    pub line: usize,
    /// `Kind/namespace/name` (`Kind/name` for `schema`, when the namespace was not read).
    pub object: String,
    /// What is wrong, starting with the field path when there is one.
    pub message: String,
}

impl fmt::Display for Finding {
    /// `error[weights] routes.yaml:12: VirtualService/edtech/reviews: ...`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}[{}] {}:{}: ",
            self.level,
            self.code,
            self.file.display(),
            self.line
        )?;
        if !self.object.is_empty() {
            write!(f, "{}: ", self.object)?;
        }
        f.write_str(&self.message)
    }
}

/// Number of errors and of warnings.
pub fn counts(findings: &[Finding]) -> (usize, usize) {
    let errors = findings.iter().filter(|f| f.level == Level::Error).count();
    (errors, findings.len() - errors)
}

/// `N errors, M warnings` (singular when 1).
pub fn summary(findings: &[Finding]) -> String {
    let (e, w) = counts(findings);
    let plural = |n: usize, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
    format!("{}, {}", plural(e, "error"), plural(w, "warning"))
}

/// Runs every rule over the resources loaded and the load errors; findings are sorted by
/// file and line (rule order within one document).
pub fn analyze(loaded: &[Loaded], errors: &[ResourceError]) -> Vec<Finding> {
    analyze_with_registry(loaded, errors, None)
}

/// What a control plane knows that the files do not (`trellis analyze --registered`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Registry {
    /// The registered services, fully qualified (`svc.ns.svc.cluster.local`).
    pub services: std::collections::BTreeSet<String>,
    /// The registered workloads (proxies).
    pub workloads: Vec<RegisteredWorkload>,
}

/// One registered proxy, as far as analysis cares.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RegisteredWorkload {
    /// Its service.
    pub service: String,
    /// Its namespace.
    pub namespace: String,
    /// Its labels (what policy selectors match).
    pub labels: BTreeMap<String, String>,
    /// Its inbound ports and their protocols (`auto`, `http1`, `http2`, `grpc`, `tcp`).
    pub ports: Vec<(u16, String)>,
}

/// [`analyze`] with what a control plane knows: cluster hosts (`svc.ns.svc.cluster.local`)
/// are checked against its registered services instead of being trusted, and its workloads'
/// `tcp` inbound ports count as TCP ports.
pub fn analyze_with_registry(
    loaded: &[Loaded],
    errors: &[ResourceError],
    registry: Option<&Registry>,
) -> Vec<Finding> {
    let mut out: Vec<Finding> = errors.iter().map(schema).collect();
    duplicates(loaded, &mut out);
    traffic::check(loaded, registry.map(|r| &r.services), &mut out);
    conflicts(loaded, &mut out);
    authz::check(loaded, &mut out);
    http_on_tcp::check(loaded, registry.map(|r| r.workloads.as_slice()), &mut out);
    out.sort_by(|a, b| (&a.file, a.line).cmp(&(&b.file, b.line)));
    out
}

/// A load error as a finding.
fn schema(e: &ResourceError) -> Finding {
    let message = if e.field.is_empty() || e.field == "." {
        e.message.clone()
    } else {
        format!("{}: {}", e.field, e.message)
    };
    Finding {
        level: Level::Error,
        code: "schema",
        file: e.source.file.clone(),
        line: e.source.line,
        object: e.object.clone(),
        message,
    }
}

/// The kind name and metadata of a resource.
pub fn kind_and_meta(r: &Resource) -> (&'static str, &ObjectMeta) {
    match r {
        Resource::PeerAuthentication(x) => ("PeerAuthentication", &x.metadata),
        Resource::AuthorizationPolicy(x) => ("AuthorizationPolicy", &x.metadata),
        Resource::RequestAuthentication(x) => ("RequestAuthentication", &x.metadata),
        Resource::VirtualService(x) => ("VirtualService", &x.metadata),
        Resource::DestinationRule(x) => ("DestinationRule", &x.metadata),
        Resource::ServiceEntry(x) => ("ServiceEntry", &x.metadata),
        Resource::HttpRoute(x) => ("HTTPRoute", &x.metadata),
        Resource::Mesh(x) => ("Mesh", &x.metadata),
        Resource::RateLimit(x) => ("RateLimit", &x.metadata),
    }
}

/// `Kind/namespace/name`.
pub fn object(r: &Resource) -> String {
    let (kind, meta) = kind_and_meta(r);
    format!("{kind}/{}/{}", meta.namespace(), meta.name)
}

/// A finding about a loaded resource, at the start of its document.
fn finding(l: &Loaded, level: Level, code: &'static str, message: String) -> Finding {
    Finding {
        level,
        code,
        file: l.source.file.clone(),
        line: l.source.line,
        object: object(&l.resource),
        message,
    }
}

/// `duplicate`: the same kind/namespace/name twice (the later one is reported).
fn duplicates(loaded: &[Loaded], out: &mut Vec<Finding>) {
    let mut seen: BTreeMap<String, &Loaded> = BTreeMap::new();
    for l in loaded {
        let key = object(&l.resource);
        if let Some(first) = seen.get(&key) {
            out.push(finding(
                l,
                Level::Error,
                "duplicate",
                format!(
                    "defined again (first at {}); only one can exist",
                    first.source
                ),
            ));
        } else {
            seen.insert(key, l);
        }
    }
}

/// `conflict`: Peer/RequestAuthentications sharing namespace and selector, DestinationRules
/// sharing namespace, host and workload selector. The later one (in load order) is reported.
fn conflicts(loaded: &[Loaded], out: &mut Vec<Finding>) {
    // (kind, namespace, what) -> first resource.
    let mut seen: BTreeMap<(&str, String, String), &Loaded> = BTreeMap::new();
    for l in loaded {
        let (kind, ns, key, why) = match &l.resource {
            Resource::PeerAuthentication(p) => (
                "PeerAuthentication",
                p.metadata.namespace(),
                selector_key(p.spec.selector.as_ref()),
                "same namespace and selector",
            ),
            Resource::RequestAuthentication(p) => (
                "RequestAuthentication",
                p.metadata.namespace(),
                selector_key(p.spec.selector.as_ref()),
                "same namespace and selector",
            ),
            Resource::DestinationRule(d) => (
                "DestinationRule",
                d.metadata.namespace(),
                format!(
                    "{} {}",
                    traffic::fqdn(&d.spec.host, d.metadata.namespace()),
                    selector_key(d.spec.workload_selector.as_ref())
                ),
                "same host in the same namespace",
            ),
            _ => continue,
        };
        let k = (kind, ns.to_string(), key);
        match seen.get(&k) {
            Some(first) if object(&first.resource) != object(&l.resource) => {
                let outcome = if kind == "DestinationRule" {
                    "Istio applies only one of them (the oldest); the other's policies and subsets may be ignored"
                } else {
                    "Istio applies only the oldest; the other is ignored"
                };
                out.push(finding(
                    l,
                    Level::Warning,
                    "conflict",
                    format!(
                        "{why} as {} ({}): {outcome}",
                        object(&first.resource),
                        first.source
                    ),
                ));
            }
            Some(_) => {} // a duplicate, reported as such
            None => {
                seen.insert(k, l);
            }
        }
    }
}

/// A selector as a comparable string; no selector and an empty one select the same.
fn selector_key(s: Option<&crate::resources::WorkloadSelector>) -> String {
    s.map(|s| {
        s.match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(",")
    })
    .unwrap_or_default()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::resources::parse;
    use std::path::Path;

    /// Parses `text` as `x.yaml` and analyzes it.
    pub(crate) fn run(text: &str) -> Vec<Finding> {
        let (ok, errors) = parse(Path::new("x.yaml"), text);
        analyze(&ok, &errors)
    }

    /// `code@line` of each finding.
    pub(crate) fn codes(findings: &[Finding]) -> Vec<String> {
        findings
            .iter()
            .map(|f| format!("{}@{}", f.code, f.line))
            .collect()
    }

    #[test]
    fn schema_errors_become_findings() {
        let f = run("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: { name: a }\nspec:\n  mtls: { mode: SOMETIMES }\n---\nkind: Sidecar\nmetadata: { name: s }\n");
        assert_eq!(codes(&f), ["schema@5", "schema@7"]);
        assert_eq!(f[0].level, Level::Error);
        assert!(
            f[0].to_string().starts_with(
                "error[schema] x.yaml:5: PeerAuthentication/a: spec.mtls.mode: unknown variant"
            ),
            "{}",
            f[0]
        );
    }

    #[test]
    fn duplicates_and_conflicts() {
        let pa = |name: &str, sel: &str| {
            format!("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{ name: {name}, namespace: edtech }}\nspec:\n  {sel}mtls: {{ mode: STRICT }}\n")
        };
        let text = [
            pa("a", ""),
            pa("a", ""),
            pa("b", "selector: { matchLabels: {} }\n  "),
            pa("c", "selector: { matchLabels: { app: x } }\n  "),
            pa("d", "selector: { matchLabels: { app: y } }\n  "),
            pa("e", "selector: { matchLabels: { app: x } }\n  "),
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: { name: r1, namespace: edtech }\nspec: { host: reviews }\n".into(),
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: { name: r2, namespace: edtech }\nspec: { host: reviews.edtech.svc.cluster.local }\n".into(),
            "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: { name: r3, namespace: other }\nspec: { host: reviews.edtech.svc.cluster.local }\n".into(),
        ]
        .join("---\n");
        let f = run(&text);
        assert_eq!(
            codes(&f),
            ["duplicate@7", "conflict@13", "conflict@34", "conflict@46"]
        );
        assert!(f[0].message.contains("first at x.yaml:1"), "{}", f[0]);
        assert!(
            f[1].message
                .contains("same namespace and selector as PeerAuthentication/edtech/a"),
            "{}",
            f[1]
        );
        assert!(f[2].message.contains("PeerAuthentication/edtech/c"));
        assert!(f[3].message.contains("DestinationRule/edtech/r1"));
        assert_eq!(summary(&f), "1 error, 3 warnings");
    }
}

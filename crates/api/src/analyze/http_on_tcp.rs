//! `http-on-tcp-port`: an AuthorizationPolicy rule that tests HTTP attributes and names, in
//! `to.operation.ports`, a port declared TCP.
//!
//! HTTP attributes are the operation's `hosts`, `methods` and `paths` (and their `not`
//! forms), the source's `requestPrincipals` / `notRequestPrincipals` and every `when` key
//! under `request.` (headers and `request.auth.*`). A connection on a TCP port has none of
//! them, and the proxy (like Istio's generator) judges it as follows: an ALLOW rule testing
//! any HTTP attribute never matches it, so the port stays closed to that rule; in a DENY (or
//! AUDIT) rule the HTTP tests are dropped and the rest of the rule decides, so it denies (or
//! audits) every connection to the port that the rest of the rule matches, whatever the
//! requests inside would have been.
//!
//! A port counts as TCP when a ServiceEntry of the policy's namespace (any namespace, for a
//! policy in the root namespace) declares it, as `number` or `targetPort`, with protocol
//! `TCP` (or, without a protocol, a name `tcp` / `tcp-*`, Istio's name-prefix rule), and no
//! ServiceEntry there declares the same port with another protocol. With a control plane's
//! registry (`trellis analyze --registered`), a port also counts as TCP when a registered
//! workload the policy selects has it as a `tcp` inbound port and none it selects has it with
//! another protocol.
//!
//! A rule that names no port (no `to`, or an operation without `ports`) applies to every port
//! of the workloads it selects, TCP ones included: the classic case is a namespace-wide DENY
//! on `/admin` that also closes every connection to a database in the namespace. Those are
//! reported with `--registered` only, for the selected workloads' `tcp` inbound ports (minus
//! the operation's `notPorts`): a ServiceEntry's TCP port says what a host serves, often a
//! host outside the mesh, not what a workload the policy selects listens on.

use super::{finding, object, Finding, Level, RegisteredWorkload};
use crate::resources::authorization_policy::{Action, Rule};
use crate::resources::service_entry::ServicePort;
use crate::resources::{AuthorizationPolicy, Loaded, Resource};
use std::collections::{BTreeMap, BTreeSet};

/// Runs the rule; `registered`: a control plane's workloads, when the caller asked.
pub fn check(loaded: &[Loaded], registered: Option<&[RegisteredWorkload]>, out: &mut Vec<Finding>) {
    let root = loaded
        .iter()
        .find_map(|l| match &l.resource {
            Resource::Mesh(m) => Some(m.spec.root_namespace.as_str()),
            _ => None,
        })
        .unwrap_or(crate::resources::mesh::DEFAULT_ROOT_NAMESPACE);
    let ports = TcpPorts::of(loaded);
    let registered = registered.unwrap_or_default();
    if ports.tcp.is_empty()
        && !registered
            .iter()
            .any(|w| w.ports.iter().any(|p| p.1 == "tcp"))
    {
        return;
    }
    for l in loaded {
        let Resource::AuthorizationPolicy(p) = &l.resource else {
            continue;
        };
        let consequence = |ports: &str| {
            match p.spec.action {
            Action::Allow => format!("an ALLOW rule testing HTTP attributes never matches a TCP connection, so this rule never allows a connection on {}", if ports == "the port" { "it" } else { "them" }),
            Action::Deny => format!("on a TCP connection the HTTP tests are ignored and the rest of the rule decides, so this DENY rule denies every connection to {ports} that its other fields match, whatever the requests inside"),
            Action::Audit => format!("on a TCP connection the HTTP tests are ignored and the rest of the rule decides, so this AUDIT rule audits every connection to {ports} that its other fields match"),
            Action::Custom => String::new(),
        }
        };
        if p.spec.action == Action::Custom {
            continue;
        }
        let namespace = p.metadata.namespace();
        let everywhere = namespace == root;
        let selected_tcp = registered_tcp_ports(registered, p, everywhere);
        for (i, rule) in p.spec.rules.iter().enumerate() {
            let http = http_attributes(rule);
            if http.is_empty() {
                continue;
            }
            let reached = portless_reach(rule, &selected_tcp);
            if !reached.is_empty() {
                let (numbers, by): (Vec<String>, Vec<&str>) = reached
                    .iter()
                    .map(|(n, by)| (n.to_string(), by.as_str()))
                    .unzip();
                let mut workloads: Vec<&str> = Vec::new();
                for b in by {
                    if !workloads.contains(&b) {
                        workloads.push(b);
                    }
                }
                let (ports, these) = match numbers.len() {
                    1 => (format!("TCP port {}", numbers[0]), "the port"),
                    _ => (format!("TCP ports {}", numbers.join(", ")), "these ports"),
                };
                out.push(finding(
                    l,
                    Level::Warning,
                    "http-on-tcp-port",
                    format!(
                        "spec.rules[{i}]: the rule names no port, so it also applies to {ports} ({}), but it tests HTTP attributes ({}), which a TCP connection does not have: {}",
                        workloads.join("; "),
                        http.join(", "),
                        consequence(these)
                    ),
                ));
            }
            for (j, to) in rule.to.iter().flatten().enumerate() {
                for (k, port) in to.operation.ports.iter().enumerate() {
                    let Ok(number) = port.trim().parse::<u32>() else {
                        continue;
                    };
                    let Some(declared_by) = ports
                        .declared_tcp(namespace, number, everywhere)
                        .or_else(|| selected_tcp.get(&number).map(String::as_str))
                    else {
                        continue;
                    };
                    out.push(finding(
                        l,
                        Level::Warning,
                        "http-on-tcp-port",
                        format!(
                            "spec.rules[{i}].to[{j}].operation.ports[{k}]: port {number} is TCP ({declared_by}), but the rule also tests HTTP attributes ({}), which a TCP connection does not have: {}",
                            http.join(", "),
                            consequence("the port")
                        ),
                    ));
                }
            }
        }
    }
}

/// The HTTP attributes a rule tests, as field paths within the rule.
fn http_attributes(rule: &Rule) -> Vec<String> {
    let mut found = Vec::new();
    for (j, from) in rule.from.iter().flatten().enumerate() {
        let s = &from.source;
        for (name, values) in [
            ("requestPrincipals", &s.request_principals),
            ("notRequestPrincipals", &s.not_request_principals),
        ] {
            if !values.is_empty() {
                found.push(format!("from[{j}].source.{name}"));
            }
        }
    }
    for (j, to) in rule.to.iter().flatten().enumerate() {
        let op = &to.operation;
        for (name, values) in [
            ("hosts", &op.hosts),
            ("notHosts", &op.not_hosts),
            ("methods", &op.methods),
            ("notMethods", &op.not_methods),
            ("paths", &op.paths),
            ("notPaths", &op.not_paths),
        ] {
            if !values.is_empty() {
                found.push(format!("to[{j}].operation.{name}"));
            }
        }
    }
    for (j, c) in rule.when.iter().flatten().enumerate() {
        if c.key.starts_with("request.") {
            found.push(format!("when[{j}] {}", c.key));
        }
    }
    found
}

/// Ports ServiceEntries declare, by namespace.
struct TcpPorts<'a> {
    /// (namespace, port) -> the first ServiceEntry declaring it TCP.
    tcp: BTreeMap<(&'a str, u32), String>,
    /// (namespace, port) declared with another protocol somewhere.
    other: BTreeSet<(&'a str, u32)>,
}

impl<'a> TcpPorts<'a> {
    fn of(loaded: &'a [Loaded]) -> Self {
        let mut ports = TcpPorts {
            tcp: BTreeMap::new(),
            other: BTreeSet::new(),
        };
        for l in loaded {
            let Resource::ServiceEntry(se) = &l.resource else {
                continue;
            };
            let namespace = se.metadata.namespace();
            for p in &se.spec.ports {
                for number in [Some(p.number), p.target_port].into_iter().flatten() {
                    if is_tcp(p) {
                        ports
                            .tcp
                            .entry((namespace, number))
                            .or_insert_with(|| object(&l.resource));
                    } else {
                        ports.other.insert((namespace, number));
                    }
                }
            }
        }
        ports
    }

    /// The ServiceEntry declaring `port` TCP in `namespace` (in any namespace when
    /// `everywhere`), unless it is declared with another protocol there too.
    fn declared_tcp(&self, namespace: &str, port: u32, everywhere: bool) -> Option<&str> {
        self.tcp
            .iter()
            .filter(|((ns, n), _)| *n == port && (everywhere || *ns == namespace))
            .find(|(key, _)| !self.other.contains(*key))
            .map(|(_, by)| by.as_str())
    }
}

/// The `tcp` inbound ports of the registered workloads `policy` selects, each with the first
/// workload having it (`inbound port of registered workload svc.ns`); a port that one of them
/// serves with another protocol is left out.
fn registered_tcp_ports(
    registered: &[RegisteredWorkload],
    policy: &AuthorizationPolicy,
    everywhere: bool,
) -> BTreeMap<u32, String> {
    let namespace = policy.metadata.namespace();
    let selected = registered.iter().filter(|w| {
        (everywhere || w.namespace == namespace)
            && policy
                .spec
                .selector
                .as_ref()
                .is_none_or(|s| s.matches(&w.labels))
    });
    let mut tcp = BTreeMap::new();
    let mut other = BTreeSet::new();
    for w in selected {
        for (p, protocol) in &w.ports {
            if protocol != "tcp" {
                other.insert(u32::from(*p));
                continue;
            }
            tcp.entry(u32::from(*p)).or_insert_with(|| {
                format!(
                    "inbound port of registered workload {}.{}",
                    w.service, w.namespace
                )
            });
        }
    }
    tcp.retain(|p, _| !other.contains(p));
    tcp
}

/// The ports of `tcp` a rule reaches through an operation that names no port: all of them
/// when the rule has no operation, else those an operation without `ports` does not exclude
/// with `notPorts`.
fn portless_reach<'t>(rule: &Rule, tcp: &'t BTreeMap<u32, String>) -> Vec<(u32, &'t String)> {
    let operations: Vec<_> = rule.to.iter().flatten().map(|t| &t.operation).collect();
    tcp.iter()
        .filter(|(port, _)| {
            operations.is_empty()
                || operations.iter().any(|o| {
                    o.ports.is_empty()
                        && !o
                            .not_ports
                            .iter()
                            .any(|n| n.trim().parse::<u32>().ok() == Some(**port))
                })
        })
        .map(|(port, by)| (*port, by))
        .collect()
}

/// Whether a ServiceEntry port is plain TCP: protocol `TCP`, or no protocol and a `tcp` /
/// `tcp-*` name.
fn is_tcp(p: &ServicePort) -> bool {
    match &p.protocol {
        Some(protocol) => protocol.eq_ignore_ascii_case("tcp"),
        None => {
            let name = p.name.to_ascii_lowercase();
            name == "tcp" || name.starts_with("tcp-")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{codes, run};
    use super::super::{analyze_with_registry, RegisteredWorkload, Registry};
    use crate::resources::parse;
    use std::path::Path;

    const DB: &str = "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: { name: db, namespace: edtech }\nspec:\n  hosts: [db.edtech.internal]\n  ports: [{ number: 5432, name: postgres, protocol: TCP }, { number: 8080, name: http-admin, protocol: HTTP }]\n  resolution: STATIC\n  endpoints: [{ address: 10.0.0.5 }]\n";

    fn policy(namespace: &str, action: &str, rule: &str) -> String {
        format!("---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{ name: p, namespace: {namespace} }}\nspec:\n  action: {action}\n  rules:\n  - {rule}\n")
    }

    #[test]
    fn http_tests_on_a_tcp_port_are_reported() {
        let allow = format!(
            "{DB}{}",
            policy(
                "edtech",
                "ALLOW",
                r#"to: [{ operation: { ports: ["5432"], methods: ["GET"] } }]"#
            )
        );
        let f = run(&allow);
        assert_eq!(codes(&f), ["http-on-tcp-port@10"]);
        assert_eq!(
            f[0].to_string(),
            "warning[http-on-tcp-port] x.yaml:10: AuthorizationPolicy/edtech/p: spec.rules[0].to[0].operation.ports[0]: port 5432 is TCP (ServiceEntry/edtech/db), but the rule also tests HTTP attributes (to[0].operation.methods), which a TCP connection does not have: an ALLOW rule testing HTTP attributes never matches a TCP connection, so this rule never allows a connection on it"
        );
        let deny = format!(
            "{DB}{}",
            policy(
                "edtech",
                "DENY",
                r#"{ from: [{ source: { notRequestPrincipals: ["*"] } }], to: [{ operation: { ports: ["5432"] } }], when: [{ key: "request.headers[x-env]", values: [prod] }] }"#
            )
        );
        let f = run(&deny);
        assert_eq!(codes(&f), ["http-on-tcp-port@10"]);
        assert!(
            f[0].message.contains("(from[0].source.notRequestPrincipals, when[0] request.headers[x-env])")
                && f[0].message.ends_with("this DENY rule denies every connection to the port that its other fields match, whatever the requests inside"),
            "{}",
            f[0].message
        );
    }

    #[test]
    fn other_ports_namespaces_and_rules_are_not() {
        let quiet = [
            // An HTTP port.
            policy(
                "edtech",
                "ALLOW",
                r#"to: [{ operation: { ports: ["8080"], paths: ["/admin*"] } }]"#,
            ),
            // TCP port, but no HTTP attribute.
            policy(
                "edtech",
                "ALLOW",
                r#"{ from: [{ source: { principals: ["*"] } }], to: [{ operation: { ports: ["5432"] } }], when: [{ key: source.ip, values: [10.0.0.0/8] }] }"#,
            ),
            // Another namespace's ServiceEntry.
            policy(
                "shop",
                "ALLOW",
                r#"to: [{ operation: { ports: ["5432"], methods: ["GET"] } }]"#,
            ),
            // No port named.
            policy(
                "edtech",
                "DENY",
                r#"to: [{ operation: { methods: ["POST"] } }]"#,
            ),
        ];
        for p in quiet {
            let f = run(&format!("{DB}{p}"));
            assert!(f.is_empty(), "{p}: {f:?}");
        }
        // The root namespace's policies apply everywhere.
        let f = run(&format!(
            "{DB}{}",
            policy(
                "istio-system",
                "ALLOW",
                r#"to: [{ operation: { ports: ["5432"], hosts: ["db"] } }]"#
            )
        ));
        assert_eq!(codes(&f), ["http-on-tcp-port@10"]);
        // A port declared TCP by name only counts; one also declared HTTP does not.
        let by_name = DB.replace("name: postgres, protocol: TCP", "name: tcp-postgres");
        let rule = policy(
            "edtech",
            "ALLOW",
            r#"to: [{ operation: { ports: ["5432"], notPaths: ["/x"] } }]"#,
        );
        assert_eq!(
            codes(&run(&format!("{by_name}{rule}"))),
            ["http-on-tcp-port@10"]
        );
        let both = format!(
            "{DB}---\n{}",
            DB.replace("name: db,", "name: db-http,")
                .replace("protocol: TCP", "protocol: HTTP")
        );
        assert!(run(&format!("{both}{rule}")).is_empty());
    }

    /// Registered workloads: `svc` in `edtech` with the given inbound ports.
    fn workload(svc: &str, ports: &[(u16, &str)]) -> RegisteredWorkload {
        RegisteredWorkload {
            service: svc.into(),
            namespace: "edtech".into(),
            labels: [("app".to_string(), svc.to_string())].into(),
            ports: ports
                .iter()
                .map(|(p, proto)| (*p, proto.to_string()))
                .collect(),
        }
    }

    fn with_registry(text: &str, workloads: Vec<RegisteredWorkload>) -> Vec<super::Finding> {
        let (ok, errors) = parse(Path::new("x.yaml"), text);
        let registry = Registry {
            services: Default::default(),
            workloads,
        };
        analyze_with_registry(&ok, &errors, Some(&registry))
    }

    #[test]
    fn rules_naming_no_port_reach_the_selected_workloads_tcp_ports() {
        let registered = || {
            vec![
                workload("redis", &[(6379, "tcp")]),
                workload("web", &[(8080, "http1")]),
            ]
        };
        let deny = policy(
            "edtech",
            "DENY",
            r#"to: [{ operation: { paths: ["/admin*"] } }]"#,
        );
        let f = with_registry(&deny, registered());
        assert_eq!(codes(&f), ["http-on-tcp-port@2"]);
        assert_eq!(
            f[0].message,
            "spec.rules[0]: the rule names no port, so it also applies to TCP port 6379 (inbound port of registered workload redis.edtech), but it tests HTTP attributes (to[0].operation.paths), which a TCP connection does not have: on a TCP connection the HTTP tests are ignored and the rest of the rule decides, so this DENY rule denies every connection to the port that its other fields match, whatever the requests inside"
        );
        assert!(run(&deny).is_empty(), "offline the workloads are unknown");
        // Two TCP ports, and an ALLOW with only a condition.
        let allow = policy(
            "edtech",
            "ALLOW",
            r#"when: [{ key: "request.headers[x-team]", values: [core] }]"#,
        );
        let mut two = registered();
        two.push(workload("db", &[(5432, "tcp")]));
        let f = with_registry(&allow, two);
        assert_eq!(codes(&f), ["http-on-tcp-port@2"]);
        assert!(
            f[0].message.contains("applies to TCP ports 5432, 6379 (inbound port of registered workload db.edtech; inbound port of registered workload redis.edtech)")
                && f[0].message.ends_with("so this rule never allows a connection on them"),
            "{}",
            f[0].message
        );
        // Quiet: the port excluded, the rule names the HTTP port, no HTTP attribute, a
        // selector that leaves the TCP workload out.
        for quiet in [
            policy(
                "edtech",
                "DENY",
                r#"to: [{ operation: { notPorts: ["6379"], paths: ["/admin*"] } }]"#,
            ),
            policy(
                "edtech",
                "DENY",
                r#"to: [{ operation: { ports: ["8080"], paths: ["/admin*"] } }]"#,
            ),
            policy(
                "edtech",
                "DENY",
                r#"from: [{ source: { namespaces: [legacy] } }]"#,
            ),
            policy(
                "edtech",
                "DENY",
                r#"to: [{ operation: { paths: ["/admin*"] } }]"#,
            )
            .replace(
                "spec:\n",
                "spec:\n  selector: { matchLabels: { app: web } }\n",
            ),
        ] {
            let f = with_registry(&quiet, registered());
            assert!(f.is_empty(), "{quiet}: {f:?}");
        }
    }

    #[test]
    fn registered_tcp_inbound_ports_count() {
        let rule = r#"to: [{ operation: { ports: ["9000"], methods: ["GET"] } }]"#;
        let text = policy("edtech", "ALLOW", rule).replace(
            "spec:\n",
            "spec:\n  selector: { matchLabels: { app: ledger } }\n",
        );
        let (ok, errors) = parse(Path::new("x.yaml"), &text);
        let ledger = |labels: &[(&str, &str)], protocol: &str| RegisteredWorkload {
            service: "ledger".into(),
            namespace: "edtech".into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ports: vec![(9000, protocol.into())],
        };
        let with = |workloads: Vec<RegisteredWorkload>| {
            let registry = Registry {
                services: Default::default(),
                workloads,
            };
            analyze_with_registry(&ok, &errors, Some(&registry))
        };
        assert!(codes(&run(&text)).is_empty(), "offline nothing is known");
        let f = with(vec![ledger(&[("app", "ledger")], "tcp")]);
        assert_eq!(codes(&f), ["http-on-tcp-port@2"]);
        assert!(
            f[0].message
                .contains("port 9000 is TCP (inbound port of registered workload ledger.edtech)"),
            "{}",
            f[0].message
        );
        // Not selected, or also served as HTTP by a selected workload: nothing.
        assert!(with(vec![ledger(&[("app", "other")], "tcp")]).is_empty());
        assert!(with(vec![
            ledger(&[("app", "ledger")], "tcp"),
            ledger(&[("app", "ledger")], "auto")
        ])
        .is_empty());
    }
}

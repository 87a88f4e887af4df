//! The config compiler: stored resources and registered workloads in, one [`Compiled`] view
//! per store revision out; from it, each proxy's snapshot (only what concerns that proxy).
//!
//! The shared part (services and endpoints, parsed resources) is built once per revision;
//! the per-proxy part is a filter over it, cheap enough to run for every connected proxy.

use crate::registry::Workload;
use prost::Message as _;
use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::net::ToSocketAddrs;
use trellis_api::proto::config::{Endpoint, Service, ServiceList, Snapshot};
use trellis_api::resources::service_entry::{Resolution, ServiceEntry};
use trellis_api::resources::{Resource, WorkloadSelector};

/// One stored resource, parsed, with what decides who receives it.
struct Doc {
    json: String,
    /// For workload policies: namespace and selector. `None`: every proxy receives it.
    policy_scope: Option<(String, Option<WorkloadSelector>)>,
}

/// Everything proxies are sent, as of one store revision.
pub struct Compiled {
    /// The store revision it reflects.
    pub revision: u64,
    /// Every service, encoded once (a `ServiceList`) and shared by every proxy's snapshot.
    services: bytes::Bytes,
    services_hash: u64,
    counts: (usize, usize),
    docs: Vec<Doc>,
    root_namespace: String,
    /// Stored documents that no longer parse (written by a newer version, or corrupt).
    pub skipped: Vec<String>,
}

impl Compiled {
    /// An empty view (before the first compile).
    pub fn empty(root_namespace: &str) -> Self {
        Self {
            revision: 0,
            services: bytes::Bytes::new(),
            services_hash: 0,
            counts: (0, 0),
            docs: Vec::new(),
            root_namespace: root_namespace.to_string(),
            skipped: Vec::new(),
        }
    }

    /// Builds the view of `resources` (`(key, json)`) and `workloads` at `revision`. Resolves
    /// the host names of DNS ServiceEntries (blocking; run it off the async threads).
    pub fn build(
        revision: u64,
        resources: &[(String, String)],
        workloads: &[Workload],
        root_namespace: &str,
    ) -> Self {
        let mut services: BTreeMap<(String, String), Service> = BTreeMap::new();
        for w in workloads {
            let svc = services
                .entry((w.service.clone(), w.namespace.clone()))
                .or_insert_with(|| Service {
                    name: w.service.clone(),
                    namespace: w.namespace.clone(),
                    ..Default::default()
                });
            for p in &w.ports {
                svc.endpoints.push(Endpoint {
                    address: join_host_port(&w.address, p.port),
                    identity: w.identity.clone(),
                    labels: w.labels.clone().into_iter().collect(),
                    ready: w.ready,
                    protocol: p.protocol.clone(),
                });
            }
        }
        let mut docs = Vec::new();
        let mut skipped = Vec::new();
        let mut mesh_root = None;
        for (key, json) in resources {
            let (loaded, errors) = trellis_api::resources::parse(std::path::Path::new(key), json);
            if !errors.is_empty() {
                skipped.extend(errors.iter().map(|e| e.to_string()));
                continue;
            }
            for l in loaded {
                if let Resource::Mesh(m) = &l.resource {
                    // The Mesh resource names the root namespace; it wins over the flag.
                    mesh_root = Some(m.spec.root_namespace.clone());
                }
                let policy_scope = match &l.resource {
                    Resource::PeerAuthentication(p) => {
                        Some((p.metadata.namespace().to_string(), p.spec.selector.clone()))
                    }
                    Resource::AuthorizationPolicy(p) => {
                        Some((p.metadata.namespace().to_string(), p.spec.selector.clone()))
                    }
                    Resource::RequestAuthentication(p) => {
                        Some((p.metadata.namespace().to_string(), p.spec.selector.clone()))
                    }
                    Resource::RateLimit(p) => {
                        Some((p.metadata.namespace().to_string(), p.spec.selector.clone()))
                    }
                    Resource::ServiceEntry(se) => {
                        for s in entry_services(se) {
                            services.insert((s.name.clone(), s.namespace.clone()), s);
                        }
                        None
                    }
                    _ => None,
                };
                docs.push(Doc {
                    json: json.clone(),
                    policy_scope,
                });
            }
        }
        let list = ServiceList {
            services: services.into_values().collect(),
        };
        let counts = (
            list.services.len(),
            list.services.iter().map(|s| s.endpoints.len()).sum(),
        );
        let encoded = list.encode_to_vec();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        encoded.hash(&mut h);
        Self {
            revision,
            services: bytes::Bytes::from(encoded),
            services_hash: h.finish(),
            counts,
            docs,
            root_namespace: mesh_root.unwrap_or_else(|| root_namespace.to_string()),
            skipped,
        }
    }

    /// The snapshot for `w`: every service, the routing resources, and only the workload
    /// policies that select it (mesh-wide in the root namespace, namespace-wide, or by labels);
    /// and a fingerprint of its content (equal fingerprints: nothing to send).
    pub fn for_proxy(&self, w: &Workload) -> (Snapshot, u64) {
        let resources: Vec<String> = self
            .docs
            .iter()
            .filter(|d| match &d.policy_scope {
                None => true,
                Some((ns, _)) if *ns == self.root_namespace => true,
                Some((ns, selector)) => {
                    *ns == w.namespace && selector.as_ref().is_none_or(|s| s.matches(&w.labels))
                }
            })
            .map(|d| d.json.clone())
            .collect();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        self.services_hash.hash(&mut h);
        resources.hash(&mut h);
        let snapshot = Snapshot {
            version: self.revision,
            services: self.services.clone(),
            resources,
        };
        (snapshot, h.finish())
    }

    /// Number of services and endpoints (for logs).
    pub fn counts(&self) -> (usize, usize) {
        self.counts
    }
}

fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// The services a ServiceEntry adds: one per host, named by the host, in the entry's
/// namespace; endpoints from `endpoints` (STATIC) or the hosts' DNS addresses (DNS).
fn entry_services(se: &ServiceEntry) -> Vec<Service> {
    let spec = &se.spec;
    let port = spec.ports.first().map_or(80, |p| p.number) as u16;
    let port_name = spec.ports.first().map(|p| p.name.as_str()).unwrap_or("");
    let protocol = spec
        .ports
        .first()
        .and_then(|p| p.protocol.as_deref())
        .map_or("auto", |p| match p.to_ascii_uppercase().as_str() {
            "HTTP" => "http1",
            "HTTP2" => "http2",
            "GRPC" => "grpc",
            "TCP" | "TLS" | "HTTPS" => "tcp",
            _ => "auto",
        });
    let endpoint = |address: String, labels: BTreeMap<String, String>| Endpoint {
        address,
        identity: String::new(),
        labels: labels.into_iter().collect(),
        ready: true,
        protocol: protocol.to_string(),
    };
    spec.hosts
        .iter()
        .map(|host| {
            let endpoints = match spec.resolution {
                Resolution::Static | Resolution::None => spec
                    .endpoints
                    .iter()
                    .map(|e| {
                        let p = e.ports.get(port_name).copied().unwrap_or(port as u32) as u16;
                        let address = if e.address.starts_with("unix://") {
                            e.address.clone()
                        } else {
                            join_host_port(&e.address, p)
                        };
                        endpoint(address, e.labels.clone())
                    })
                    .collect(),
                Resolution::Dns | Resolution::DnsRoundRobin => {
                    let names: Vec<String> = if spec.endpoints.is_empty() {
                        vec![host.clone()]
                    } else {
                        spec.endpoints.iter().map(|e| e.address.clone()).collect()
                    };
                    names
                        .iter()
                        .flat_map(|n| {
                            (n.as_str(), port)
                                .to_socket_addrs()
                                .map(|a| a.collect::<Vec<_>>())
                                .unwrap_or_else(|e| {
                                    tracing::warn!(host = %n, error = %e, "ServiceEntry host does not resolve");
                                    Vec::new()
                                })
                        })
                        .map(|a| endpoint(a.to_string(), BTreeMap::new()))
                        .collect()
                }
            };
            Service {
                name: host.to_ascii_lowercase(),
                namespace: se.metadata.namespace().to_string(),
                hosts: vec![host.to_ascii_lowercase()],
                endpoints,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::PortInfo;

    fn workload(ns: &str, app: &str) -> Workload {
        Workload {
            instance: format!("{app}-1"),
            service: app.into(),
            namespace: ns.into(),
            identity: format!("spiffe://cluster.local/ns/{ns}/sa/{app}"),
            address: "127.0.0.1".into(),
            ports: vec![PortInfo {
                port: 8080,
                protocol: "http1".into(),
            }],
            labels: [("app".to_string(), app.to_string())].into(),
            ready: true,
            replica: "r".into(),
            connected_at: 0,
            session: String::new(),
        }
    }

    fn pa(name: &str, ns: &str, selector: Option<&str>) -> (String, String) {
        let sel = selector.map_or(String::new(), |a| {
            format!("  selector: {{ matchLabels: {{ app: {a} }} }}\n")
        });
        (
            format!("resources/PeerAuthentication/{ns}/{name}"),
            format!("apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{ name: {name}, namespace: {ns} }}\nspec:\n{sel}  mtls: {{ mode: STRICT }}\n"),
        )
    }

    #[test]
    fn each_proxy_gets_only_the_policies_that_select_it() {
        let docs = vec![
            pa("mesh-wide", "istio-system", None),
            pa("ns-wide", "edtech", None),
            pa("for-web", "edtech", Some("web")),
            pa("for-api", "edtech", Some("api")),
            pa("elsewhere", "billing", None),
        ];
        let ws = [workload("edtech", "web"), workload("edtech", "api")];
        let c = Compiled::build(7, &docs, &ws, "istio-system");
        let (snap, fp) = c.for_proxy(&ws[0]);
        let names: Vec<bool> = ["mesh-wide", "ns-wide", "for-web", "for-api", "elsewhere"]
            .iter()
            .map(|n| {
                snap.resources
                    .iter()
                    .any(|r| r.contains(&format!("name: {n},")))
            })
            .collect();
        assert_eq!(names, [true, true, true, false, false]);
        assert_eq!(snap.version, 7);
        let list = ServiceList::decode(snap.services.clone()).unwrap();
        assert_eq!(list.services.len(), 2);
        let (_, fp_api) = c.for_proxy(&ws[1]);
        assert_ne!(fp, fp_api, "different policies, different fingerprints");
        assert_eq!(c.for_proxy(&ws[0]).1, fp, "same content, same fingerprint");
    }

    #[test]
    fn the_mesh_resource_names_the_root_namespace() {
        let mut docs = vec![pa("mesh-wide", "trellis-system", None)];
        let ws = [workload("edtech", "web")];
        let c = Compiled::build(1, &docs, &ws, "istio-system");
        assert!(c.for_proxy(&ws[0]).0.resources.is_empty());
        docs.push((
            "resources/Mesh/default/mesh".into(),
            "apiVersion: trellis.dev/v1alpha1\nkind: Mesh\nmetadata: { name: mesh }\nspec:\n  rootNamespace: trellis-system\n".into(),
        ));
        let c = Compiled::build(2, &docs, &ws, "istio-system");
        assert_eq!(
            c.for_proxy(&ws[0]).0.resources.len(),
            2,
            "mesh-wide policy and the Mesh"
        );
    }
}

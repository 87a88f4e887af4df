//! Istio's `ServiceEntry`: adds a service to the registry — an external API, or workloads
//! outside the platform (VMs) — with its hosts, ports, resolution and endpoints.

use super::common::{check_non_empty, check_port, Invalid};
use super::ObjectMeta;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

/// apiVersions accepted for this kind.
pub const API_VERSIONS: [&str; 3] = super::virtual_service::API_VERSIONS;

/// Port protocols Istio knows (compared case-insensitively).
const PROTOCOLS: [&str; 12] = [
    "HTTP", "HTTPS", "GRPC", "GRPC-WEB", "HTTP2", "MONGO", "REDIS", "MYSQL", "TCP", "TLS", "UDP",
    "HBONE",
];

/// The resource.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEntry {
    /// `networking.istio.io/v1` (or `v1beta1`, `v1alpha3`).
    pub api_version: String,
    /// `ServiceEntry`.
    pub kind: String,
    /// Name and namespace.
    pub metadata: ObjectMeta,
    /// The service.
    #[serde(default)]
    pub spec: ServiceEntrySpec,
    /// Server-written status: accepted and ignored.
    #[serde(default, skip_serializing)]
    pub status: Option<serde_yaml_ng::Value>,
}

/// `spec` of a ServiceEntry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServiceEntrySpec {
    /// Host names of the service (may start with `*.`).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Virtual IPs or CIDRs of the service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// Ports.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ServicePort>,
    /// Inside or outside the mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<Location>,
    /// How endpoints are found.
    #[serde(default)]
    pub resolution: Resolution,
    /// Endpoints (with `STATIC` or `DNS` resolution).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub endpoints: Vec<WorkloadEntry>,
    /// Select workloads by label as endpoints instead (`MESH_INTERNAL`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<EntryWorkloadSelector>,
    /// Namespaces this is visible to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub export_to: Vec<String>,
    /// SANs accepted in the endpoints' certificates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subject_alt_names: Vec<String>,
}

/// A port of the service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ServicePort {
    /// The port.
    pub number: u32,
    /// `HTTP`, `HTTPS`, `GRPC`, `HTTP2`, `TCP`, `TLS`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// Name, unique in the entry.
    #[serde(default)]
    pub name: String,
    /// The port on the endpoints (default `number`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_port: Option<u32>,
}

/// Where the service runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Location {
    /// Outside the mesh (no mTLS to it).
    MeshExternal,
    /// Part of the mesh.
    MeshInternal,
}

/// How endpoints are found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Resolution {
    /// Forward to the address the client connected to.
    #[default]
    None,
    /// The listed endpoint IPs.
    Static,
    /// Resolve the hosts (or endpoint names) by DNS, all addresses used.
    Dns,
    /// Resolve by DNS, first address used.
    DnsRoundRobin,
}

/// An endpoint of the service.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadEntry {
    /// IP, host name (with `DNS`), or `unix://` path.
    pub address: String,
    /// Port overrides by service port name.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub ports: BTreeMap<String, u32>,
    /// Labels (for subsets).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Network, for multi-network meshes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// `region/zone/subzone`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub locality: Option<String>,
    /// Load balancing weight.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Service account of the workload (its identity).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account: Option<String>,
}

/// ServiceEntry's own selector: `workloadSelector.labels`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntryWorkloadSelector {
    /// Every label must match.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

impl ServiceEntry {
    /// Checks hosts, ports, and the endpoint rules Istio enforces for each resolution.
    pub fn validate(&self) -> Result<(), Invalid> {
        let spec = &self.spec;
        if spec.hosts.is_empty() {
            return Err(("spec.hosts".into(), "at least one host is required".into()));
        }
        for (i, h) in spec.hosts.iter().enumerate() {
            check_non_empty(h, &format!("spec.hosts[{i}]"), "host")?;
        }
        let mut names = BTreeSet::new();
        for (i, p) in spec.ports.iter().enumerate() {
            let path = format!("spec.ports[{i}]");
            check_port(p.number, &format!("{path}.number"))?;
            if let Some(t) = p.target_port {
                check_port(t, &format!("{path}.targetPort"))?;
            }
            if let Some(proto) = &p.protocol {
                if !PROTOCOLS.iter().any(|k| k.eq_ignore_ascii_case(proto)) {
                    return Err((
                        format!("{path}.protocol"),
                        format!(
                            "unknown protocol {proto:?} (one of {})",
                            PROTOCOLS.join(", ")
                        ),
                    ));
                }
            }
            if !p.name.is_empty() && !names.insert(p.name.as_str()) {
                return Err((
                    format!("{path}.name"),
                    format!("duplicate port name {:?}", p.name),
                ));
            }
        }
        if spec.workload_selector.is_some() && !spec.endpoints.is_empty() {
            return Err((
                "spec.workloadSelector".into(),
                "workloadSelector and endpoints are exclusive".into(),
            ));
        }
        if spec.resolution == Resolution::None && !spec.endpoints.is_empty() {
            return Err((
                "spec.endpoints".into(),
                "endpoints need resolution STATIC or DNS".into(),
            ));
        }
        for (i, e) in spec.endpoints.iter().enumerate() {
            let path = format!("spec.endpoints[{i}]");
            check_non_empty(&e.address, &format!("{path}.address"), "address")?;
            let is_ip = e.address.parse::<IpAddr>().is_ok() || e.address.starts_with("unix://");
            if spec.resolution == Resolution::Static && !is_ip {
                return Err((
                    format!("{path}.address"),
                    format!("{:?} is not an IP address (resolution STATIC)", e.address),
                ));
            }
            for (name, port) in &e.ports {
                check_port(*port, &format!("{path}.ports.{name}"))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{parse, Resource};
    use super::Resolution;
    use std::path::Path;

    const ENTRIES: &str = r#"apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: { name: external-apis }
spec:
  hosts: [api.dropboxapi.com, www.googleapis.com]
  location: MESH_EXTERNAL
  ports:
  - { number: 443, name: https, protocol: TLS }
  resolution: DNS
---
apiVersion: networking.istio.io/v1alpha3
kind: ServiceEntry
metadata: { name: mongo-vms, namespace: data }
spec:
  hosts: [mymongodb.somedomain]
  addresses: [192.192.192.192/24]
  ports:
  - number: 27018
    name: mongodb
    protocol: MONGO
    targetPort: 27017
  location: MESH_INTERNAL
  resolution: STATIC
  endpoints:
  - address: 2.2.2.2
    labels: { version: v1 }
    locality: us-east1/us-east1-b
    weight: 3
  - address: 3.3.3.3
    ports: { mongodb: 27019 }
    serviceAccount: mongo
"#;

    #[test]
    fn external_and_vm_entries_load() {
        let (ok, errors) = parse(Path::new("x.yaml"), ENTRIES);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(ok.len(), 2);
        let Resource::ServiceEntry(se) = &ok[1].resource else {
            panic!("{ok:?}")
        };
        assert_eq!(se.spec.resolution, Resolution::Static);
        assert_eq!(se.spec.endpoints[1].ports["mongodb"], 27019);
    }

    #[test]
    fn errors_name_line_and_field() {
        let cases = [
            ("address: 3.3.3.3", "address: mongo.local", "x.yaml:29: ServiceEntry/mongo-vms: spec.endpoints[1].address: \"mongo.local\" is not an IP"),
            ("protocol: MONGO", "protocol: SMTP", "x.yaml:20: ServiceEntry/mongo-vms: spec.ports[0].protocol: unknown protocol"),
            ("resolution: DNS", "resolution: DYNAMIC", "x.yaml:9: ServiceEntry/external-apis: spec.resolution: unknown variant `DYNAMIC`"),
            ("targetPort: 27017", "targetPort: 70000", "x.yaml:21: ServiceEntry/mongo-vms: spec.ports[0].targetPort: port 70000"),
        ];
        for (from, to, want) in cases {
            let (_, errors) = parse(Path::new("x.yaml"), &ENTRIES.replace(from, to));
            let msg = errors.first().map(|e| e.to_string()).unwrap_or_default();
            assert!(msg.starts_with(want), "{msg}\nwant: {want}");
        }
    }
}

//! Upstream services: their endpoints, how one is picked, and name lookup by host.

pub mod pool;

use crate::route::VirtualHost;
use crate::telemetry::metrics::{HttpStats, Peer};
use pool::EndpointConns;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use trellis_api::names::{HostName, ServiceKey};

/// A cluster the proxy forwards to: an upstream service, a subset of its endpoints, or the
/// local app for inbound traffic.
pub struct Service {
    /// Name and namespace.
    pub key: ServiceKey,
    /// The DestinationRule subset this cluster is, if it is one.
    pub subset: Option<Arc<str>>,
    /// The service as metrics label it.
    pub peer: Peer,
    /// Response-header timeout; 504 past it.
    pub timeout: Option<Duration>,
    /// Request metrics for traffic to this service.
    pub stats: Arc<HttpStats>,
    endpoints: Vec<Arc<EndpointConns>>,
    next: AtomicUsize,
}

impl Service {
    /// A service over the given endpoints.
    pub fn new(
        key: ServiceKey,
        endpoints: Vec<Arc<EndpointConns>>,
        timeout: Option<Duration>,
        stats: Arc<HttpStats>,
    ) -> Self {
        Self {
            peer: Peer::new(&key.name, &key.namespace),
            key,
            subset: None,
            timeout,
            stats,
            endpoints,
            next: AtomicUsize::new(0),
        }
    }

    /// The next endpoint, round robin; `None` when the service has none.
    pub fn pick(&self) -> Option<&Arc<EndpointConns>> {
        if self.endpoints.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        self.endpoints.get(i)
    }
}

/// Why a host did not lead to a service.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// Not a service host at all.
    #[error(transparent)]
    Host(#[from] trellis_api::names::HostError),
    /// A well-formed name this proxy has no upstream for.
    #[error("no upstream service {0} is configured")]
    Unknown(String),
    /// A bare name that exists in several namespaces.
    #[error("{0} is ambiguous: it exists in several namespaces; use {0}.<namespace>")]
    Ambiguous(String),
}

/// Upstream services by name, for routing by `Host` / `:authority`.
#[derive(Default)]
pub struct ServiceTable {
    by_key: HashMap<ServiceKey, Arc<VirtualHost>>,
    /// Hosts outside the mesh's naming (ServiceEntry), lower case, without port.
    by_host: HashMap<String, ServiceKey>,
    namespace: String,
    cluster_domain: String,
}

impl ServiceTable {
    /// A table over `services`; bare names resolve in `namespace` first. `hosts` are extra
    /// exact host names (ServiceEntry) for some of them.
    pub fn new(
        services: HashMap<ServiceKey, Arc<VirtualHost>>,
        hosts: Vec<(String, ServiceKey)>,
        namespace: &str,
        cluster_domain: &str,
    ) -> Self {
        Self {
            by_key: services,
            by_host: hosts
                .into_iter()
                .map(|(h, k)| (h.to_ascii_lowercase(), k))
                .collect(),
            namespace: namespace.to_string(),
            cluster_domain: cluster_domain.to_string(),
        }
    }

    /// The service an external (ServiceEntry) host names.
    pub fn external(&self, host: &str) -> Option<&ServiceKey> {
        let bare = strip_port(host).trim_end_matches('.').to_ascii_lowercase();
        self.by_host.get(&bare)
    }

    /// The service with this exact name and namespace.
    pub fn get(&self, key: &ServiceKey) -> Option<&Arc<VirtualHost>> {
        self.by_key.get(key)
    }

    /// The service a host names: `svc`, `svc.ns`, `svc.ns.svc.<domain>`, any case, any port.
    /// A bare `svc` means this proxy's namespace, or the only namespace that has it.
    pub fn resolve(&self, host: &str) -> Result<&Arc<VirtualHost>, LookupError> {
        if let Some(s) = self.external(host).and_then(|k| self.by_key.get(k)) {
            return Ok(s);
        }
        let h = HostName::parse(host, &self.cluster_domain)?;
        if let Some(ns) = &h.namespace {
            return self
                .by_key
                .get(&ServiceKey::new(&h.name, ns))
                .ok_or_else(|| LookupError::Unknown(format!("{}.{}", h.name, ns)));
        }
        if let Some(s) = self.by_key.get(&ServiceKey::new(&h.name, &self.namespace)) {
            return Ok(s);
        }
        let mut found = self.by_key.values().filter(|s| s.key.name == h.name);
        match (found.next(), found.next()) {
            (Some(s), None) => Ok(s),
            (Some(_), Some(_)) => Err(LookupError::Ambiguous(h.name)),
            _ => Err(LookupError::Unknown(h.name)),
        }
    }

    /// Every service in the table.
    pub fn services(&self) -> impl Iterator<Item = &Arc<VirtualHost>> {
        self.by_key.values()
    }
}

/// `host` without a `:port` suffix (IPv6 literals keep their brackets).
fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((h, p))
            if !h.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':') =>
        {
            h
        }
        _ => host,
    }
}

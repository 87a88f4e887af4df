//! Builds what a config describes: the upstream services (discovered and from the bootstrap)
//! and the listeners: inbound ports in front of the local app (with their mTLS mode),
//! per-upstream local ports, and the outbound HTTP proxy listener. Runs at start and again
//! for every config the control plane pushes.

use crate::config::{Bootstrap, MtlsMode, Protocol};
use crate::http::forward::{Destination, Forwarder, Shared};
use crate::listener::Listener;
use crate::policy::authz::Authz;
use crate::policy::inbound::Inbound;
use crate::policy::jwt::JwtAuthn;
use crate::policy::ratelimit::RateLimits;
use crate::pushed::Pushed;
use crate::route::compile::ClusterSpec;
use crate::route::VirtualHost;
use crate::telemetry::metrics::{Peer, UNKNOWN};
use crate::telemetry::Metrics;
use crate::tls::{InboundTls, UpstreamTls};
use crate::upstream::pool::{EndpointConns, Pool};
use crate::upstream::{Service, ServiceTable};
use crate::ProxyError;
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use trellis_api::names::ServiceKey;
use trellis_api::resources::Loaded;
use trellis_api::resources::Resource;
use trellis_identity::{IdentityStore, SpiffeId};

/// What a config builds: the upstream services and every listener (same addresses, in the
/// same order, for any `pushed`, since only the bootstrap opens ports).
pub struct Assembly {
    /// Upstream services by name and host.
    pub services: ServiceTable,
    /// The workload's identity and inbound policies.
    pub inbound: Inbound,
    /// Listeners with the address each is bound to.
    pub listeners: Vec<(SocketAddr, Listener)>,
}

/// Builds the services and listeners of `boot` plus the control plane's `pushed` config.
/// Bootstrap upstreams with endpoints win over discovered ones; without endpoints they take
/// the discovered ones (a local port for a discovered service).
pub fn assemble(
    boot: &Bootstrap,
    pushed: Option<&Pushed>,
    identity: Option<&Arc<IdentityStore>>,
    mtls: MtlsMode,
    pool: &Pool,
    metrics: &Metrics,
    shared: &Arc<Shared>,
) -> Result<Assembly, ProxyError> {
    let me = boot.service_key();
    let my_peer = Peer::new(&me.name, &me.namespace);
    let mut listeners: Vec<(SocketAddr, Listener)> = Vec::new();
    let pushed_resources = pushed.map_or(&[][..], |p| p.resources.as_slice());
    let mesh = mesh_settings(boot, pushed_resources)?;
    let root_namespace = mesh.root_namespace.as_str();
    // A Mesh's default mTLS mode applies unless the bootstrap sets one.
    let mtls = match (boot.mtls, mesh.mtls, identity) {
        (None, Some(mode), Some(_)) => mode,
        _ => mtls,
    };

    let local_identity: Option<Arc<str>> = identity
        .and_then(|s| s.info())
        .map(|i| Arc::from(i.identity.to_string()));
    // Inbound: every public port forwards to its local app, as this workload's service,
    // under the workload's request authentication and authorization policies.
    let jwt_policies: Vec<_> = boot
        .loaded
        .iter()
        .chain(pushed_resources)
        .filter_map(|l| match &l.resource {
            Resource::RequestAuthentication(p) => Some(p.clone()),
            _ => None,
        })
        .collect();
    let jwt = Arc::new(
        JwtAuthn::compile(
            &jwt_policies,
            &boot.namespace,
            &boot.labels,
            &boot.root_namespace,
            &shared.jwks,
        )
        .map_err(ProxyError::Config)?,
    );
    let authz = Authz::compile(
        boot.loaded
            .iter()
            .chain(pushed_resources)
            .filter_map(|l| match &l.resource {
                Resource::AuthorizationPolicy(p) => Some(p),
                _ => None,
            }),
        &boot.namespace,
        &boot.labels,
        root_namespace,
    );
    // Rate limits keep their buckets across configs when unchanged.
    let ratelimits = RateLimits::compile(
        boot.loaded
            .iter()
            .chain(pushed_resources)
            .filter_map(|l| match &l.resource {
                Resource::RateLimit(r) => Some(r),
                _ => None,
            }),
        &boot.namespace,
        &boot.labels,
        root_namespace,
        Some(&shared.inbound.load().ratelimits),
        std::time::Instant::now(),
    );
    let inbound_stats = metrics.http_stats("inbound", my_peer.clone());
    for (i, inb) in boot.inbound.iter().enumerate() {
        let field = format!("inbound[{i}].listen");
        let app = Arc::new(VirtualHost::plain(Arc::new(Service::new(
            me.clone(),
            vec![pool.endpoint(inb.app, None)],
            inb.timeout.map(|d| d.0),
            inbound_stats.clone(),
        ))));
        let l = Listener {
            name: field.clone(),
            direction: "inbound",
            protocol: inb.protocol,
            forwarder: Arc::new(Forwarder {
                destination: Destination::Fixed(app.clone()),
                inbound: true,
                shared: shared.clone(),
            }),
            tcp_target: Some(Destination::Fixed(app)),
            source: Peer::unknown(),
            peer_label: Arc::from(UNKNOWN),
            tls: match (
                identity,
                inbound_mode(boot, pushed_resources, root_namespace, mtls, inb.app.port()),
            ) {
                (_, MtlsMode::Disable) => None,
                (Some(store), mode) => Some(InboundTls::new(mode, store)),
                (None, mode) => {
                    return Err(ProxyError::Identity(format!(
                        "PeerAuthentication asks for {mode:?} on {field}, but this proxy has no identity"
                    )))
                }
            },
        };
        listeners.push((inb.listen, l));
    }

    // Outbound: discovered services, then the bootstrap's upstreams over them.
    let mut tls_by_identity: HashMap<SpiffeId, Arc<UpstreamTls>> = HashMap::new();
    let mut upstream_tls = |expected: &SpiffeId, what: &str| match identity {
        Some(store) => Ok(tls_by_identity
            .entry(expected.clone())
            .or_insert_with(|| Arc::new(UpstreamTls::new(store, expected.clone())))
            .clone()),
        None => Err(ProxyError::Identity(format!(
            "{what} asks for mTLS, but this proxy has no identity"
        ))),
    };
    let mut clusters: BTreeMap<ServiceKey, ClusterSpec> = BTreeMap::new();
    let mut hosts = Vec::new();
    for svc in pushed.map_or(&[][..], |p| p.services.as_slice()) {
        let mut endpoints = Vec::new();
        for e in svc.endpoints.iter().filter(|e| e.ready) {
            let tls = match &e.identity {
                Some(id) => Some(upstream_tls(id, &format!("service {}", svc.key))?),
                None => None,
            };
            endpoints.push((pool.endpoint(e.addr, tls), e.labels.clone()));
        }
        clusters.insert(
            svc.key.clone(),
            ClusterSpec {
                endpoints,
                timeout: None,
            },
        );
        hosts.extend(svc.hosts.iter().map(|h| (h.clone(), svc.key.clone())));
    }
    for (i, u) in boot.upstreams.iter().enumerate() {
        let key = boot.upstream_key(u);
        let entry = clusters.entry(key).or_insert_with(|| ClusterSpec {
            endpoints: Vec::new(),
            timeout: None,
        });
        if !u.endpoints.is_empty() {
            let tls = match &u.identity {
                Some(id) => Some(upstream_tls(id, &format!("upstreams[{i}].identity"))?),
                None => None,
            };
            entry.endpoints = u
                .endpoints
                .iter()
                .map(|a| (pool.endpoint(*a, tls.clone()), Default::default()))
                .collect();
        }
        entry.timeout = u.timeout.map(|d| d.0);
    }
    let table_for_names = ServiceTable::new(
        Default::default(),
        hosts.clone(),
        &me.namespace,
        &boot.cluster_domain,
    );
    let known: std::collections::HashSet<&ServiceKey> = clusters.keys().collect();
    // A host as a VirtualService in `namespace` means it: an external (ServiceEntry) host, or
    // a mesh name with short names in that namespace.
    let resolve = |host: &str, namespace: &str| -> Option<ServiceKey> {
        if let Some(k) = table_for_names.external(host) {
            return Some(k.clone());
        }
        let h = trellis_api::names::HostName::parse(host, &boot.cluster_domain).ok()?;
        let key = ServiceKey::new(&h.name, h.namespace.as_deref().unwrap_or(namespace));
        known.contains(&key).then_some(key)
    };
    // Clusters the new config builds exactly as the running one has them are kept, with
    // their retry budgets, circuit-breaker counts and outlier ejections: a push about
    // something else must not put an ejected endpoint back in service.
    let running = shared.services.load().clusters();
    let make = |key: &ServiceKey,
                subset: Option<&str>,
                endpoints: Vec<Arc<EndpointConns>>,
                timeout: Option<std::time::Duration>,
                balancing: crate::upstream::Balancing| {
        if let Some(c) = running.get(&(key.clone(), subset.map(Arc::from))) {
            if c.is_built_as(subset, &endpoints, timeout, &balancing) {
                return c.clone();
            }
        }
        let peer = Peer::new(&key.name, &key.namespace);
        let mut s = Service::new(
            key.clone(),
            endpoints,
            timeout,
            metrics.http_stats("outbound", peer),
        )
        .with_balancing(balancing);
        s.subset = subset.map(Arc::from);
        Arc::new(s)
    };
    let resources: Vec<Loaded> = boot
        .loaded
        .iter()
        .chain(pushed_resources)
        .cloned()
        .collect();
    let vhosts = crate::route::compile::compile(&clusters, &resources, &resolve, &make)
        .map_err(ProxyError::Config)?;

    for (i, u) in boot.upstreams.iter().enumerate() {
        let Some(addr) = u.listen else { continue };
        let key = boot.upstream_key(u);
        let l = Listener {
            name: format!("upstreams[{i}].listen"),
            direction: "outbound",
            protocol: u.protocol,
            forwarder: Arc::new(Forwarder {
                destination: Destination::Upstream(key.clone()),
                inbound: false,
                shared: shared.clone(),
            }),
            tcp_target: Some(Destination::Upstream(key.clone())),
            source: my_peer.clone(),
            peer_label: Peer::new(&key.name, &key.namespace).service.clone(),
            tls: None,
        };
        listeners.push((addr, l));
    }
    if let Some(addr) = boot.outbound.listen {
        let l = Listener {
            name: "outbound.listen".into(),
            direction: "outbound",
            protocol: Protocol::Auto,
            forwarder: Arc::new(Forwarder {
                destination: Destination::ByHost,
                inbound: false,
                shared: shared.clone(),
            }),
            tcp_target: None,
            source: my_peer.clone(),
            peer_label: Arc::from(UNKNOWN),
            tls: None,
        };
        listeners.push((addr, l));
    }

    Ok(Assembly {
        services: ServiceTable::new(vhosts, hosts, &me.namespace, &boot.cluster_domain),
        inbound: Inbound {
            identity: local_identity,
            authz,
            jwt,
            default_deny: mesh.default_deny,
            ratelimits,
            counters: Default::default(),
        },
        listeners,
    })
}

/// The mTLS mode of the inbound port whose app listens on `app_port`: PeerAuthentication
/// resources (the bootstrap's and pushed ones; workload, namespace, mesh scope) over the
/// bootstrap's `mtls` default.
fn inbound_mode(
    boot: &Bootstrap,
    pushed: &[Loaded],
    root_namespace: &str,
    default: MtlsMode,
    app_port: u16,
) -> MtlsMode {
    use trellis_api::resources::peer_authentication::{effective_mode, Workload};
    use trellis_api::resources::{PeerMode, Resource};
    let policies = boot
        .loaded
        .iter()
        .chain(pushed)
        .filter_map(|l| match &l.resource {
            Resource::PeerAuthentication(p) => Some(p),
            _ => None,
        });
    let default = match default {
        MtlsMode::Strict => PeerMode::Strict,
        MtlsMode::Permissive => PeerMode::Permissive,
        MtlsMode::Disable => PeerMode::Disable,
    };
    let workload = Workload {
        namespace: &boot.namespace,
        labels: &boot.labels,
    };
    match effective_mode(policies, &workload, app_port, root_namespace, default) {
        PeerMode::Strict => MtlsMode::Strict,
        PeerMode::Permissive => MtlsMode::Permissive,
        PeerMode::Disable | PeerMode::Unset => MtlsMode::Disable,
    }
}

/// What the `Mesh` resource (`trellis.dev/v1alpha1`, pushed) sets for this proxy.
struct MeshSettings {
    root_namespace: String,
    mtls: Option<MtlsMode>,
    default_deny: bool,
}

/// Reads the Mesh resource, if any. Settings this proxy does not enforce yet are refused by
/// name rather than ignored.
fn mesh_settings(boot: &Bootstrap, pushed: &[Loaded]) -> Result<MeshSettings, ProxyError> {
    use trellis_api::resources::PeerMode;
    let Some(mesh) = boot
        .loaded
        .iter()
        .chain(pushed)
        .find_map(|l| match &l.resource {
            Resource::Mesh(m) => Some(m),
            _ => None,
        })
    else {
        return Ok(MeshSettings {
            root_namespace: boot.root_namespace.clone(),
            mtls: None,
            default_deny: false,
        });
    };
    let spec = &mesh.spec;
    let d = &spec.defaults;
    for (field, set) in [
        ("defaults.timeout", d.timeout.is_some()),
        ("defaults.retries", d.retries.is_some()),
        ("defaults.outlierDetection", d.outlier_detection.is_some()),
        ("defaults.connectionPool", d.connection_pool.is_some()),
        ("tracing.sampling", spec.tracing.sampling != 1.0),
    ] {
        if set {
            return Err(ProxyError::Config(format!(
                "Mesh {}: spec.{field}: not enforced by this proxy yet",
                mesh.metadata.name
            )));
        }
    }
    Ok(MeshSettings {
        root_namespace: spec.root_namespace.clone(),
        mtls: Some(match spec.mtls.mode {
            PeerMode::Strict => MtlsMode::Strict,
            PeerMode::Permissive => MtlsMode::Permissive,
            PeerMode::Disable | PeerMode::Unset => MtlsMode::Disable,
        }),
        default_deny: spec.authorization.default_deny,
    })
}

//! Builds the listeners a bootstrap file describes: inbound ports in front of the local app
//! (with their mTLS mode), per-upstream local ports, and the outbound HTTP proxy listener.

use crate::config::{Bootstrap, MtlsMode, Protocol};
use crate::http::forward::{Destination, Forwarder, Shared};
use crate::listener::Listener;
use crate::telemetry::metrics::{Peer, UNKNOWN};
use crate::telemetry::Metrics;
use crate::tls::{InboundTls, UpstreamTls};
use crate::upstream::pool::Pool;
use crate::upstream::{Service, ServiceTable};
use crate::ProxyError;
use std::net::SocketAddr;
use std::sync::Arc;
use trellis_identity::IdentityStore;

/// Every listener of `boot`, with the address it must be bound to.
pub fn listeners(
    boot: &Bootstrap,
    identity: Option<&Arc<IdentityStore>>,
    mtls: MtlsMode,
    pool: &Pool,
    metrics: &Metrics,
    shared: &Arc<Shared>,
) -> Result<Vec<(SocketAddr, Listener)>, ProxyError> {
    let me = boot.service_key();
    let my_peer = Peer::new(&me.name, &me.namespace);
    let mut listeners: Vec<(SocketAddr, Listener)> = Vec::new();

    let local_identity: Option<Arc<str>> = identity
        .and_then(|s| s.info())
        .map(|i| Arc::from(i.identity.to_string()));
    // Inbound: every public port forwards to its local app, as this workload's service.
    let inbound_stats = metrics.http_stats("inbound", my_peer.clone());
    for (i, inb) in boot.inbound.iter().enumerate() {
        let field = format!("inbound[{i}].listen");
        let app = Arc::new(Service::new(
            me.clone(),
            vec![pool.endpoint(inb.app, None)],
            inb.timeout.map(|d| d.0),
            inbound_stats.clone(),
        ));
        let l = Listener {
            name: field.clone(),
            direction: "inbound",
            protocol: inb.protocol,
            forwarder: Arc::new(Forwarder {
                destination: Destination::Fixed(app.clone()),
                inbound_identity: Some(local_identity.clone()),
                shared: shared.clone(),
            }),
            tcp_target: Some(app),
            source: Peer::unknown(),
            peer_label: Arc::from(UNKNOWN),
            tls: match (identity, inbound_mode(boot, mtls, inb.app.port())) {
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

    // Outbound: every upstream service, reachable by host through the HTTP proxy listener
    // and, when it has one, through its own local port.
    let mut services = Vec::new();
    for (i, u) in boot.upstreams.iter().enumerate() {
        let key = boot.upstream_key(u);
        let peer = Peer::new(&key.name, &key.namespace);
        let upstream_tls = match (&u.identity, identity) {
            (None, _) => None,
            (Some(expected), Some(store)) => {
                Some(Arc::new(UpstreamTls::new(store, expected.clone())))
            }
            (Some(_), None) => {
                return Err(ProxyError::Identity(format!(
                    "upstreams[{i}].identity asks for mTLS, but this proxy has no identity"
                )))
            }
        };
        let svc = Arc::new(Service::new(
            key,
            u.endpoints
                .iter()
                .map(|a| pool.endpoint(*a, upstream_tls.clone()))
                .collect(),
            u.timeout.map(|d| d.0),
            metrics.http_stats("outbound", peer.clone()),
        ));
        if let Some(addr) = u.listen {
            let field = format!("upstreams[{i}].listen");
            let l = Listener {
                name: field.clone(),
                direction: "outbound",
                protocol: u.protocol,
                forwarder: Arc::new(Forwarder {
                    destination: Destination::Fixed(svc.clone()),
                    inbound_identity: None,
                    shared: shared.clone(),
                }),
                tcp_target: Some(svc.clone()),
                source: my_peer.clone(),
                peer_label: peer.service.clone(),
                tls: None,
            };
            listeners.push((addr, l));
        }
        services.push(svc);
    }
    if let Some(addr) = boot.outbound.listen {
        let table = Arc::new(ServiceTable::new(
            services,
            &me.namespace,
            &boot.cluster_domain,
        ));
        let l = Listener {
            name: "outbound.listen".into(),
            direction: "outbound",
            protocol: Protocol::Auto,
            forwarder: Arc::new(Forwarder {
                destination: Destination::ByHost(table),
                inbound_identity: None,
                shared: shared.clone(),
            }),
            tcp_target: None,
            source: my_peer.clone(),
            peer_label: Arc::from(UNKNOWN),
            tls: None,
        };
        listeners.push((addr, l));
    }

    Ok(listeners)
}

/// The mTLS mode of the inbound port whose app listens on `app_port`: PeerAuthentication
/// resources (workload, namespace, mesh scope) over the bootstrap's `mtls` default.
fn inbound_mode(boot: &Bootstrap, default: MtlsMode, app_port: u16) -> MtlsMode {
    use trellis_api::resources::peer_authentication::{effective_mode, Workload};
    use trellis_api::resources::{PeerMode, Resource};
    let policies = boot.loaded.iter().filter_map(|l| match &l.resource {
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
    match effective_mode(policies, &workload, app_port, &boot.root_namespace, default) {
        PeerMode::Strict => MtlsMode::Strict,
        PeerMode::Permissive => MtlsMode::Permissive,
        PeerMode::Disable | PeerMode::Unset => MtlsMode::Disable,
    }
}

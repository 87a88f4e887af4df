//! The Trellis data-plane proxy.
//!
//! A connection's path through this crate (see DESIGN.md "The request path"):
//! [`listener`] accepts, [`detect`] reads the first bytes, then [`http`] (server side, then
//! [`http::forward`] to an [`upstream`] service over a pooled connection) or [`tcp`] (opaque
//! bytes). [`telemetry`] wraps every exchange; [`admin`] reports on all of it.

pub mod admin;
pub mod config;
pub mod detect;
pub mod http;
pub mod identity_client;
pub mod io;
pub mod listener;
pub mod tcp;
pub mod telemetry;
pub mod tls;
pub mod upstream;

use admin::AdminState;
use config::Bootstrap;
use http::forward::{Destination, Forwarder, Shared};
use http::ServerConfig;
use listener::{Context, Listener};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use telemetry::metrics::Peer;
use telemetry::{AccessLog, Metrics};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use trellis_identity::IdentityStore;
use upstream::pool::{Pool, PoolConfig};
use upstream::{Service, ServiceTable};

/// Failures that stop the proxy from starting.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A listener address could not be bound.
    #[error("cannot listen on {addr} ({field}): {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The config field that named it.
        field: String,
        /// Why.
        source: std::io::Error,
    },
    /// The workload identity could not be set up.
    #[error("identity: {0}")]
    Identity(String),
    /// Signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

/// Options from the command line rather than the bootstrap file.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Write the JSON access log to stdout.
    pub access_log: bool,
    /// Longest a drain waits for in-flight work before exiting.
    pub drain_timeout: Duration,
    /// Metric series idle this long are dropped.
    pub metrics_retention: Duration,
    /// Obtain the workload certificate from a control plane.
    pub control: Option<identity_client::ControlConfig>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            access_log: false,
            drain_timeout: Duration::from_secs(30),
            metrics_retention: Duration::from_secs(600),
            control: None,
        }
    }
}

async fn bind(addr: SocketAddr, field: &str) -> Result<TcpListener, ProxyError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ProxyError::Bind {
            addr,
            field: field.to_string(),
            source,
        })
}

/// Runs the proxy until SIGTERM, SIGINT or `POST /shutdown`, then drains and returns.
pub async fn run(boot: Bootstrap, opts: RunOptions) -> Result<(), ProxyError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut sigterm = signal(SignalKind::terminate()).map_err(ProxyError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(ProxyError::Signals)?;

    let identity = match &opts.control {
        None => load_identity(&boot)?,
        Some(control) => {
            if boot.identity.is_some() {
                return Err(ProxyError::Identity(
                    "use either identity files or a control plane, not both".into(),
                ));
            }
            let id = boot.spiffe_id().ok_or_else(|| {
                ProxyError::Identity(
                    "service, namespace or service account is not a valid identity".into(),
                )
            })?;
            let store = IdentityStore::new();
            let never = CancellationToken::new();
            let first = tokio::select! {
                r = identity_client::first_certificate(control, &id, &store, &never) => r,
                _ = sigterm.recv() => return Ok(()),
                _ = sigint.recv() => return Ok(()),
            }
            .map_err(|e| ProxyError::Identity(e.to_string()))?;
            tracing::info!(identity = %first.identity, serial = %first.serial, not_after = first.not_after, "workload certificate obtained from the control plane");
            tokio::spawn(identity_client::renew_forever(
                control.clone(),
                id,
                store.clone(),
                first,
            ));
            Some(store)
        }
    };
    let mtls = match (boot.mtls, &identity) {
        (Some(config::MtlsMode::Disable), _) => config::MtlsMode::Disable,
        (Some(mode), Some(_)) => mode,
        (Some(mode), None) => {
            return Err(ProxyError::Identity(format!(
                "mtls: {mode:?} needs a workload identity (identity: files, or a control plane)"
            )))
        }
        (None, Some(_)) => config::MtlsMode::Strict,
        (None, None) => {
            tracing::warn!("no workload identity: inbound accepts plaintext only (mtls DISABLE)");
            config::MtlsMode::Disable
        }
    };
    let mut metrics = Metrics::new();
    if let Some(store) = &identity {
        metrics.registry_mut().register_collector(Box::new(
            telemetry::identity::IdentityCollector(store.clone()),
        ));
    }
    let metrics = Arc::new(metrics);
    let pool = Pool::new(PoolConfig {
        connect_timeout: boot.timeouts.connect.0,
        idle_timeout: boot.timeouts.idle.0,
    });
    tokio::spawn(pool.clone().reap());
    tokio::spawn(sweep_metrics(metrics.clone(), opts.metrics_retention));

    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let shared = Arc::new(Shared {
        access_log: if opts.access_log {
            AccessLog::json_stdout()
        } else {
            AccessLog::disabled()
        },
        metrics: metrics.clone(),
        tracker: tracker.clone(),
    });
    let ctx = Arc::new(Context {
        metrics: metrics.clone(),
        server: ServerConfig {
            max_header_bytes: boot.max_header_bytes,
            header_read_timeout: boot.timeouts.header_read.0,
        },
        detect_timeout: boot.timeouts.detect.0,
        shutdown: shutdown.clone(),
        tracker: tracker.clone(),
    });

    let me = boot.service_key();
    let my_peer = Peer::new(&me.name, &me.namespace);
    let mut listeners: Vec<(TcpListener, Arc<Listener>)> = Vec::new();

    let local_identity: Option<Arc<str>> = identity
        .as_ref()
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
            peer_label: Arc::from(telemetry::metrics::UNKNOWN),
            tls: match (&identity, inbound_mode(&boot, mtls, inb.app.port())) {
                (_, config::MtlsMode::Disable) => None,
                (Some(store), mode) => Some(tls::InboundTls::new(mode, store)),
                (None, mode) => {
                    return Err(ProxyError::Identity(format!(
                        "PeerAuthentication asks for {mode:?} on {field}, but this proxy has no identity"
                    )))
                }
            },
        };
        listeners.push((bind(inb.listen, &field).await?, Arc::new(l)));
    }

    // Outbound: every upstream service, reachable by host through the HTTP proxy listener
    // and, when it has one, through its own local port.
    let mut services = Vec::new();
    for (i, u) in boot.upstreams.iter().enumerate() {
        let key = boot.upstream_key(u);
        let peer = Peer::new(&key.name, &key.namespace);
        let upstream_tls = match (&u.identity, &identity) {
            (None, _) => None,
            (Some(expected), Some(store)) => {
                Some(Arc::new(tls::UpstreamTls::new(store, expected.clone())))
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
            listeners.push((bind(addr, &field).await?, Arc::new(l)));
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
            protocol: config::Protocol::Auto,
            forwarder: Arc::new(Forwarder {
                destination: Destination::ByHost(table),
                inbound_identity: None,
                shared: shared.clone(),
            }),
            tcp_target: None,
            source: my_peer.clone(),
            peer_label: Arc::from(telemetry::metrics::UNKNOWN),
            tls: None,
        };
        listeners.push((bind(addr, "outbound.listen").await?, Arc::new(l)));
    }

    let admin_listener = bind(boot.admin, "admin").await?;
    let state = Arc::new(AdminState {
        metrics: metrics.clone(),
        ready: Default::default(),
        draining: Default::default(),
        config_json: serde_json::to_string_pretty(&serde_json::json!({
            "bootstrap": &boot,
            "resources": &boot.loaded,
        }))
        .unwrap_or_default(),
        identity: identity.clone(),
        shutdown_requested: CancellationToken::new(),
    });
    tokio::spawn(admin::serve(admin_listener, state.clone()));

    let mut accept_loops = Vec::new();
    for (tcp, l) in listeners {
        tracing::info!(listener = %l.name, addr = ?tcp.local_addr().ok(), "listening");
        accept_loops.push(tokio::spawn(listener::accept_loop(tcp, l, ctx.clone())));
    }
    state.ready.store(true, Ordering::Release);
    tracing::info!(service = %me, "proxy ready");

    let why = tokio::select! {
        _ = sigterm.recv() => "SIGTERM",
        _ = sigint.recv() => "SIGINT",
        _ = state.shutdown_requested.cancelled() => "POST /shutdown",
    };
    tracing::info!(reason = why, deadline = ?opts.drain_timeout, "draining");
    state.draining.store(true, Ordering::Release);
    shutdown.cancel();
    for l in accept_loops {
        let _ = l.await;
    }
    tracker.close();
    if tokio::time::timeout(opts.drain_timeout, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            open = tracker.len(),
            "drain deadline reached; closing remaining connections"
        );
    } else {
        tracing::info!("drained");
    }
    Ok(())
}

/// The mTLS mode of the inbound port whose app listens on `app_port`: PeerAuthentication
/// resources (workload, namespace, mesh scope) over the bootstrap's `mtls` default.
fn inbound_mode(boot: &Bootstrap, default: config::MtlsMode, app_port: u16) -> config::MtlsMode {
    use trellis_api::resources::peer_authentication::{effective_mode, Workload};
    use trellis_api::resources::{PeerMode, Resource};
    let policies = boot.loaded.iter().map(|l| match &l.resource {
        Resource::PeerAuthentication(p) => p,
    });
    let default = match default {
        config::MtlsMode::Strict => PeerMode::Strict,
        config::MtlsMode::Permissive => PeerMode::Permissive,
        config::MtlsMode::Disable => PeerMode::Disable,
    };
    let workload = Workload {
        namespace: &boot.namespace,
        labels: &boot.labels,
    };
    match effective_mode(policies, &workload, app_port, &boot.root_namespace, default) {
        PeerMode::Strict => config::MtlsMode::Strict,
        PeerMode::Permissive => config::MtlsMode::Permissive,
        PeerMode::Disable | PeerMode::Unset => config::MtlsMode::Disable,
    }
}

/// The static identity of the bootstrap file, checked against this workload's name.
fn load_identity(boot: &Bootstrap) -> Result<Option<Arc<IdentityStore>>, ProxyError> {
    let Some(files) = &boot.identity else {
        return Ok(None);
    };
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .map_err(|e| ProxyError::Identity(format!("{}: {e}", p.display())))
    };
    let store = IdentityStore::new();
    let info = store
        .install(
            &read(&files.cert)?,
            &read(&files.key)?,
            &read(&files.trust_bundle)?,
        )
        .map_err(|e| ProxyError::Identity(format!("{}: {e}", files.cert.display())))?;
    if let Some(me) = boot.spiffe_id() {
        if info.identity != me {
            return Err(ProxyError::Identity(format!(
                "{} holds {}, but this workload is {me}",
                files.cert.display(),
                info.identity
            )));
        }
    }
    tracing::info!(identity = %info.identity, not_after = info.not_after, "workload identity loaded");
    Ok(Some(store))
}

async fn sweep_metrics(metrics: Arc<Metrics>, retention: Duration) {
    let period = (retention / 4).clamp(Duration::from_millis(100), Duration::from_secs(60));
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        let dropped = metrics.sweep(retention);
        if dropped > 0 {
            tracing::debug!(dropped, "dropped idle metric series");
        }
    }
}

//! The Trellis data-plane proxy.
//!
//! A connection's path through this crate (see DESIGN.md "The request path"):
//! [`listener`] accepts, [`detect`] reads the first bytes, then [`http`] (server side, then
//! [`http::forward`] to an [`upstream`] service over a pooled connection) or [`tcp`] (opaque
//! bytes). [`telemetry`] wraps every exchange; [`admin`] reports on all of it.

pub mod admin;
mod assemble;
pub mod balance;
pub mod config;
pub mod control_stream;
pub mod detect;
pub mod http;
pub mod identity_client;
pub mod io;
pub mod listener;
mod live;
pub mod policy;
pub mod pushed;
pub mod resilience;
pub mod route;
pub mod tcp;
pub mod telemetry;
pub mod tls;
pub mod upstream;
mod workload_identity;

use admin::AdminState;
use config::Bootstrap;
use http::forward::Shared;
use http::ServerConfig;
use listener::Context;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use telemetry::{AccessLog, Metrics};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use upstream::pool::{Pool, PoolConfig};

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
    /// The resources do not compile into routes.
    #[error("config: {0}")]
    Config(String),
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
    /// Obtain the workload certificate and config from a control plane.
    pub control: Option<identity_client::ControlConfig>,
    /// IP other proxies reach this workload at (default: as the control plane sees it).
    pub advertise: Option<std::net::IpAddr>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            access_log: false,
            drain_timeout: Duration::from_secs(30),
            metrics_retention: Duration::from_secs(600),
            control: None,
            advertise: None,
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

    let identity = tokio::select! {
        r = workload_identity::obtain(&boot, opts.control.as_ref()) => r?,
        _ = sigterm.recv() => return Ok(()),
        _ = sigint.recv() => return Ok(()),
    };
    let mtls = workload_identity::default_mode(&boot, identity.is_some())?;
    let mut metrics = Metrics::new();
    if let Some(store) = &identity {
        metrics.registry_mut().register_collector(Box::new(
            telemetry::identity::IdentityCollector(store.clone()),
        ));
    }
    let metrics = Arc::new(metrics);
    let pool = Pool::new(PoolConfig {
        metrics: metrics.clone(),
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
        services: Default::default(),
        workload: (boot.namespace.clone(), boot.labels.clone()),
        // Key sets are fetched through this proxy's own outbound listener (the mesh).
        jwks: policy::jwt::JwksCache::with_settings(boot.outbound.listen, boot.jwks.settings()),
        inbound: Default::default(),
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
    // With a control plane and a state directory, start from the last accepted config: the
    // proxy serves even when the control plane is unreachable (static stability).
    let state_dir = opts.control.as_ref().and_then(|c| c.state_dir.clone());
    let saved = state_dir
        .as_deref()
        .and_then(pushed::state_dir::load_config);
    if let Some(p) = &saved {
        tracing::info!(
            version = p.version,
            "starting from the config in the state directory"
        );
    }
    let (live, addrs) = live::Live::start(
        boot.clone(),
        saved.as_ref(),
        identity.clone(),
        mtls,
        pool.clone(),
        metrics.clone(),
        shared.clone(),
        state_dir,
    )?;
    let mut listeners = Vec::new();
    for (addr, slot) in addrs.into_iter().zip(&live.listeners) {
        let name = slot.load().name.clone();
        listeners.push((bind(addr, &name).await?, slot.clone()));
    }

    let admin_listener = bind(boot.admin, "admin").await?;
    let state = Arc::new(AdminState {
        metrics: metrics.clone(),
        ready: Default::default(),
        draining: Default::default(),
        config_json: {
            let live = Arc::downgrade(&live);
            Box::new(move || live.upgrade().map(|l| l.config_json()).unwrap_or_default())
        },
        identity: identity.clone(),
        shutdown_requested: CancellationToken::new(),
    });
    tokio::spawn(admin::serve(admin_listener, state.clone()));

    let mut accept_loops = Vec::new();
    for (tcp, slot) in listeners {
        tracing::info!(listener = %slot.load().name, addr = ?tcp.local_addr().ok(), "listening");
        accept_loops.push(tokio::spawn(listener::accept_loop(tcp, slot, ctx.clone())));
    }
    if let (Some(control), Some(store)) = (&opts.control, &identity) {
        start_control_stream(&boot, control, store, opts.advertise, live.clone())?;
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

/// Registers with the control plane and follows its config (see [`control_stream`]).
fn start_control_stream(
    boot: &Bootstrap,
    control: &identity_client::ControlConfig,
    store: &Arc<trellis_identity::IdentityStore>,
    advertise: Option<std::net::IpAddr>,
    live: Arc<live::Live>,
) -> Result<(), ProxyError> {
    use trellis_api::proto::config::{Hello, Port};
    let id = boot
        .spiffe_id()
        .ok_or_else(|| ProxyError::Identity("no valid identity".into()))?;
    let control_id = trellis_identity::SpiffeId::new(
        &id.trust_domain,
        identity_client::CONTROL_NS,
        identity_client::CONTROL_SA,
    )
    .map_err(|e| ProxyError::Identity(e.to_string()))?;
    let (ready_tx, ready_rx) = tokio::sync::watch::channel(true);
    if let (Some(path), Some(first)) = (&boot.readiness_path, boot.inbound.first()) {
        ready_tx.send_replace(false);
        tokio::spawn(control_stream::probe_app(first.app, path.clone(), ready_tx));
    }
    let hello = Hello {
        instance: control.instance.clone(),
        service: boot.service.clone(),
        labels: boot.labels.clone().into_iter().collect(),
        address: advertise.map(|a| a.to_string()).unwrap_or_default(),
        ports: boot
            .inbound
            .iter()
            .map(|i| Port {
                port: u32::from(i.listen.port()),
                protocol: i.protocol.as_str().to_string(),
            })
            .collect(),
        ready: *ready_rx.borrow(),
        version: 0,
    };
    tokio::spawn(control_stream::run(
        control.clone(),
        hello,
        store.clone(),
        control_id,
        ready_rx,
        live,
    ));
    Ok(())
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

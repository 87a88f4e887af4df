//! The Trellis data-plane proxy.
//!
//! A connection's path through this crate (see DESIGN.md "The request path"):
//! [`listener`] accepts, [`detect`] reads the first bytes, then [`http`] (server side, then
//! [`http::forward`] to an [`upstream`] service over a pooled connection) or [`tcp`] (opaque
//! bytes). [`telemetry`] wraps every exchange; [`admin`] reports on all of it.

pub mod admin;
mod assemble;
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
    let mut listeners = Vec::new();
    for (addr, l) in assemble::listeners(&boot, identity.as_ref(), mtls, &pool, &metrics, &shared)?
    {
        listeners.push((bind(addr, &l.name).await?, Arc::new(l)));
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

//! The Trellis control plane (`trellis control`): the mesh CA and identity service, its
//! store (embedded or etcd), discovery and config push, and the HTTP API the CLI talks to.

pub mod compile;
pub mod grpc;
pub mod http;
pub mod identity;
pub mod ops;
pub mod push;
pub mod registry;
pub mod resources;
pub mod state;
pub mod store;

use state::{CaSource, State, StateError};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use trellis_identity::{IdentityStore, SpiffeId};

/// The namespace and service account of the control plane's own identity.
pub const CONTROL_NAMESPACE: &str = "trellis-system";
/// See [`CONTROL_NAMESPACE`].
pub const CONTROL_SERVICE_ACCOUNT: &str = "trellis-control";

/// The control plane's SPIFFE ID in `trust_domain` (what proxies expect when they dial it).
pub fn control_identity(trust_domain: &str) -> Option<SpiffeId> {
    SpiffeId::new(trust_domain, CONTROL_NAMESPACE, CONTROL_SERVICE_ACCOUNT).ok()
}

/// Failures that stop the control plane.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// State trouble.
    #[error(transparent)]
    State(#[from] StateError),
    /// Store trouble.
    #[error(transparent)]
    Store(#[from] store::StoreError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The serving certificate could not be made.
    #[error("serving certificate: {0}")]
    Serving(String),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
}

/// `trellis control` options.
#[derive(Clone, Debug)]
pub struct ControlOptions {
    /// State directory (the embedded store's data).
    pub state_dir: PathBuf,
    /// `embedded` or `etcd://host:port[,...]`.
    pub store: String,
    /// Trust domain of issued identities.
    pub trust_domain: String,
    /// gRPC (identity service) address.
    pub grpc: SocketAddr,
    /// HTTP API address.
    pub http: SocketAddr,
    /// CA source.
    pub ca: CaSource,
    /// Lifetime of workload certificates.
    pub workload_cert_ttl: Duration,
    /// Default join token lifetime.
    pub token_ttl: Duration,
    /// Extra DNS names for the serving certificate.
    pub dns_names: Vec<String>,
    /// A directory of resource YAML to load and watch (GitOps); it then owns the resources.
    pub config_dir: Option<PathBuf>,
    /// Namespace whose selector-less policies apply mesh-wide (Istio's root namespace).
    pub root_namespace: String,
}

/// Issues the control plane's serving certificate: its mesh identity, `localhost`, loopback
/// and the listen address, with the CA certificate appended so pinned clients can verify it.
fn install_serving_cert(
    state: &State,
    store: &IdentityStore,
    opts: &ControlOptions,
) -> Result<(), ControlError> {
    let id = control_identity(&opts.trust_domain).ok_or_else(|| {
        ControlError::Serving(format!("invalid trust domain {}", opts.trust_domain))
    })?;
    let mut dns = vec!["localhost".to_string()];
    dns.extend(opts.dns_names.iter().cloned());
    let mut ips = vec![IpAddr::V4(Ipv4Addr::LOCALHOST)];
    if !opts.grpc.ip().is_unspecified() && !ips.contains(&opts.grpc.ip()) {
        ips.push(opts.grpc.ip());
    }
    let (issued, key, ca_pem, bundle) = state
        .with_ca(|ca| {
            ca.issue(&id, &dns, &ips, Duration::from_secs(86400))
                .map(|(i, k)| (i, k, ca.cert_pem(), ca.bundle_pem()))
        })
        .map_err(|e| ControlError::Serving(e.to_string()))?;
    let mut chain = issued.chain_pem;
    if !chain.contains(ca_pem.trim()) {
        chain.push_str(&ca_pem);
    }
    store
        .install(&chain, &key, &bundle)
        .map_err(|e| ControlError::Serving(e.to_string()))?;
    Ok(())
}

/// Runs the control plane until SIGTERM or SIGINT.
pub async fn run(opts: ControlOptions) -> Result<(), ControlError> {
    let kv = Arc::new(store::Store::open(&opts.store, &opts.state_dir).await?);
    tracing::info!(store = %kv.describe(), "store opened");
    let state = Arc::new(State::open(kv.clone(), &opts.trust_domain, &opts.ca).await?);
    let store = IdentityStore::new();
    install_serving_cert(&state, &store, &opts)?;

    let grpc_listener =
        TcpListener::bind(opts.grpc)
            .await
            .map_err(|source| ControlError::Bind {
                addr: opts.grpc,
                source,
            })?;
    let http_listener =
        TcpListener::bind(opts.http)
            .await
            .map_err(|source| ControlError::Bind {
                addr: opts.http,
                source,
            })?;
    let shutdown = CancellationToken::new();
    let ca_changed = Arc::new(Notify::new());

    // A CA change through any replica (rotation, restore): reload it, re-issue our cert.
    {
        let (state, changed) = (state.clone(), ca_changed.clone());
        let mut ca_rev = kv.subscribe("ca/");
        tokio::spawn(async move {
            while ca_rev.changed().await.is_ok() {
                match state.reload_ca().await {
                    Ok(true) => {
                        tracing::info!(pin = %state.with_ca(|c| c.pin()), "CA changed in the store; reloaded");
                        changed.notify_one();
                    }
                    Ok(false) => {}
                    Err(e) => tracing::error!(error = %e, "reloading the CA failed"),
                }
            }
        });
    }
    // Keep the serving certificate fresh, and re-issue it when the CA changes.
    {
        let (state, store, opts, changed) = (
            state.clone(),
            store.clone(),
            opts.clone(),
            ca_changed.clone(),
        );
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = changed.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(6 * 3600)) => {}
                }
                if let Err(e) = install_serving_cert(&state, &store, &opts) {
                    tracing::error!(error = %e, "renewing the serving certificate failed");
                }
            }
        });
    }
    let resources = Arc::new(resources::ResourceStore::new(kv.clone()));
    if let Some(dir) = &opts.config_dir {
        tokio::spawn(watch_config_dir(dir.clone(), resources.clone()));
    }
    let api = Arc::new(http::Api {
        state: state.clone(),
        resources,
        ca_changed,
        default_token_ttl: opts.token_ttl,
        ca_validity: opts.ca.validity,
    });
    tokio::spawn(http::serve(http_listener, api, shutdown.clone()));
    let service = identity::IdentityService {
        state: state.clone(),
        cert_ttl: opts.workload_cert_ttl,
    };
    let pin = state.with_ca(|ca| ca.pin());
    tracing::info!(grpc = %opts.grpc, http = %opts.http, trust_domain = %opts.trust_domain, ca_pin = %pin, "control plane ready");
    let (compiled_tx, compiled_rx) =
        tokio::sync::watch::channel(Arc::new(compile::Compiled::empty(&opts.root_namespace)));
    tokio::spawn(push::compile_forever(
        kv.clone(),
        opts.root_namespace.clone(),
        compiled_tx,
    ));
    let push = push::PushService {
        state: state.clone(),
        store: kv.clone(),
        compiled: compiled_rx,
        replica: grpc_listener
            .local_addr()
            .map_or_else(|_| opts.grpc.to_string(), |a| a.to_string()),
    };
    let grpc = tokio::spawn(grpc::serve(
        grpc_listener,
        store,
        service,
        push,
        shutdown.clone(),
    ));

    use tokio::signal::unix::{signal, SignalKind};
    let mut term =
        signal(SignalKind::terminate()).map_err(|e| ControlError::Serving(e.to_string()))?;
    let mut int =
        signal(SignalKind::interrupt()).map_err(|e| ControlError::Serving(e.to_string()))?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("control plane stopping");
    shutdown.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), grpc).await;
    Ok(())
}

/// A fingerprint of a directory tree's YAML files: paths, sizes and modification times.
fn fingerprint(dir: &std::path::Path) -> Vec<(PathBuf, u64, Option<std::time::SystemTime>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                let m = e.metadata().ok();
                out.push((
                    p,
                    m.as_ref().map_or(0, |m| m.len()),
                    m.and_then(|m| m.modified().ok()),
                ));
            }
        }
    }
    out.sort();
    out
}

/// Loads `dir` now and whenever its files change (polled every second). A tree with any
/// invalid document is rejected as a whole with a logged error; the last good config stays.
async fn watch_config_dir(dir: PathBuf, store: Arc<resources::ResourceStore>) {
    let mut last = None;
    loop {
        let print = fingerprint(&dir);
        if last.as_ref() != Some(&print) {
            last = Some(print);
            let (loaded, errors) = trellis_api::resources::load(&dir);
            if errors.is_empty() {
                match store.replace_all(&loaded).await {
                    Ok((changes, version)) => {
                        for c in changes.iter().filter(|c| c.action != "unchanged") {
                            tracing::info!(object = %c.object, action = c.action, version, "config directory applied");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "storing the config directory failed"),
                }
            } else {
                for e in &errors {
                    tracing::error!(error = %e, "config directory rejected; keeping the last good config");
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

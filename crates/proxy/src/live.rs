//! The running config: services and listeners built from the bootstrap plus the latest
//! accepted push, swapped atomically when a new one arrives. Connections already open keep
//! the listener behaviour they were accepted with; every request resolves its upstream in the
//! current service table.

use crate::assemble::{assemble, Assembly};
use crate::config::{Bootstrap, MtlsMode};
use crate::control_stream::Apply;
use crate::http::forward::Shared;
use crate::listener::Listener;
use crate::pushed::{state_dir, Pushed};
use crate::telemetry::Metrics;
use crate::upstream::pool::Pool;
use crate::ProxyError;
use arc_swap::ArcSwap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use trellis_identity::IdentityStore;

/// See the module docs.
pub struct Live {
    pub(crate) boot: Bootstrap,
    pub(crate) identity: Option<Arc<IdentityStore>>,
    pub(crate) mtls: MtlsMode,
    pub(crate) pool: Arc<Pool>,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) shared: Arc<Shared>,
    pub(crate) state_dir: Option<PathBuf>,
    /// One slot per bound listener, in the order [`assemble`] returns them.
    pub(crate) listeners: Vec<Arc<ArcSwap<Listener>>>,
    /// The last pushed config as `/config` shows it (`null` before any).
    pushed_json: ArcSwap<serde_json::Value>,
    version: AtomicU64,
    /// Applies one at a time.
    applying: Mutex<()>,
}

impl Live {
    /// Builds the first config; returns it and the listeners to bind (address, slot).
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        boot: Bootstrap,
        pushed: Option<&Pushed>,
        identity: Option<Arc<IdentityStore>>,
        mtls: MtlsMode,
        pool: Arc<Pool>,
        metrics: Arc<Metrics>,
        shared: Arc<Shared>,
        state_dir: Option<PathBuf>,
    ) -> Result<(Arc<Self>, Vec<std::net::SocketAddr>), ProxyError> {
        let Assembly {
            services,
            inbound,
            listeners,
        } = assemble(
            &boot,
            pushed,
            identity.as_ref(),
            mtls,
            &pool,
            &metrics,
            &shared,
        )?;
        shared.services.store(Arc::new(services));
        shared.inbound.store(Arc::new(inbound));
        let addrs = listeners.iter().map(|(a, _)| *a).collect();
        let slots = listeners
            .into_iter()
            .map(|(_, l)| Arc::new(ArcSwap::from_pointee(l)))
            .collect();
        let version = pushed.map_or(0, |p| p.version);
        metrics.config_version.set(version as i64);
        let live = Arc::new(Self {
            boot,
            identity,
            mtls,
            pool,
            metrics,
            shared,
            state_dir,
            listeners: slots,
            pushed_json: ArcSwap::from_pointee(serde_json::to_value(pushed).unwrap_or_default()),
            version: AtomicU64::new(version),
            applying: Mutex::new(()),
        });
        Ok((live, addrs))
    }

    /// The effective config as the admin `/config` shows it, built when asked: routes and
    /// clusters with their endpoints' current state (outlier ejections).
    pub fn config_json(&self) -> String {
        let table = self.shared.services.load();
        let mut hosts: Vec<serde_json::Value> = table.services().map(|h| h.describe()).collect();
        hosts.sort_by(|a, b| a["host"].as_str().cmp(&b["host"].as_str()));
        serde_json::to_string_pretty(&serde_json::json!({
            "version": self.version(),
            "bootstrap": &self.boot,
            "resources": &self.boot.loaded,
            "pushed": &**self.pushed_json.load(),
            "routes": hosts,
        }))
        .unwrap_or_default()
    }
}

impl Apply for Live {
    fn apply(&self, pushed: Pushed) -> Result<(), String> {
        let _one = self.applying.lock().unwrap_or_else(|e| e.into_inner());
        let Assembly {
            services,
            inbound,
            listeners,
        } = assemble(
            &self.boot,
            Some(&pushed),
            self.identity.as_ref(),
            self.mtls,
            &self.pool,
            &self.metrics,
            &self.shared,
        )
        .map_err(|e| e.to_string())?;
        if listeners.len() != self.listeners.len() {
            return Err("the pushed config changes the set of listeners".into());
        }
        self.shared.services.store(Arc::new(services));
        self.shared.inbound.store(Arc::new(inbound));
        for (slot, (_, l)) in self.listeners.iter().zip(listeners) {
            slot.store(Arc::new(l));
        }
        self.version.store(pushed.version, Ordering::Release);
        self.metrics.config_version.set(pushed.version as i64);
        if let Some(dir) = &self.state_dir {
            if let Err(e) = state_dir::save_config(dir, &pushed.raw) {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot save the config in the state directory");
            }
        }
        self.pushed_json
            .store(Arc::new(serde_json::to_value(&pushed).unwrap_or_default()));
        Ok(())
    }

    fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    fn connected(&self, up: bool) {
        self.metrics.control_plane_connected.set(i64::from(up));
    }
}

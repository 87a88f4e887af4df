//! Config pushed by the control plane: a snapshot checked and parsed into what the proxy
//! builds its services and listeners from, and its copy in the state directory.
//!
//! A snapshot that does not parse is refused whole (NACK) and the running config stays.

use std::net::SocketAddr;
use std::path::Path;
use trellis_api::names::ServiceKey;
use trellis_api::proto::config::{ServiceList, Snapshot};
use trellis_api::resources::Loaded;
use trellis_identity::SpiffeId;

/// One endpoint of a pushed service.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PushedEndpoint {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The identity it must present (mTLS); `None` outside the mesh.
    pub identity: Option<SpiffeId>,
    /// Whether its app is ready.
    pub ready: bool,
    /// Its workload's labels (subsets select by them).
    pub labels: std::collections::BTreeMap<String, String>,
}

/// One pushed service.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PushedService {
    /// Name and namespace.
    pub key: ServiceKey,
    /// Extra exact host names (ServiceEntry).
    pub hosts: Vec<String>,
    /// Its endpoints.
    pub endpoints: Vec<PushedEndpoint>,
}

/// A checked snapshot.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Pushed {
    /// Its version.
    pub version: u64,
    /// Every service the proxy may call.
    pub services: Vec<PushedService>,
    /// The resources that concern this proxy.
    pub resources: Vec<Loaded>,
    /// The snapshot as received (what the state directory keeps).
    #[serde(skip)]
    pub raw: Snapshot,
}

impl Pushed {
    /// Checks and parses a snapshot; the error is the NACK reason.
    pub fn from_snapshot(s: Snapshot) -> Result<Self, String> {
        use prost::Message as _;
        let list = ServiceList::decode(s.services.clone())
            .map_err(|e| format!("the service list does not decode: {e}"))?;
        let mut services = Vec::with_capacity(list.services.len());
        for svc in &list.services {
            let what = format!("service {}.{}", svc.name, svc.namespace);
            let mut endpoints = Vec::with_capacity(svc.endpoints.len());
            for e in &svc.endpoints {
                if e.address.starts_with("unix://") {
                    return Err(format!(
                        "{what}: endpoint {}: unix domain socket endpoints are not supported by this proxy",
                        e.address
                    ));
                }
                let addr = e.address.parse().map_err(|_| {
                    format!("{what}: endpoint address {:?} is not ip:port", e.address)
                })?;
                let identity = if e.identity.is_empty() {
                    None
                } else {
                    Some(e.identity.parse().map_err(|err| {
                        format!("{what}: endpoint identity {:?}: {err}", e.identity)
                    })?)
                };
                endpoints.push(PushedEndpoint {
                    addr,
                    identity,
                    ready: e.ready,
                    labels: e.labels.clone().into_iter().collect(),
                });
            }
            services.push(PushedService {
                key: ServiceKey::new(&svc.name, &svc.namespace),
                hosts: svc.hosts.clone(),
                endpoints,
            });
        }
        let mut resources = Vec::new();
        for (i, doc) in s.resources.iter().enumerate() {
            let (loaded, errors) =
                trellis_api::resources::parse(Path::new(&format!("pushed[{i}]")), doc);
            if let Some(e) = errors.first() {
                return Err(e.to_string());
            }
            resources.extend(loaded);
        }
        Ok(Self {
            version: s.version,
            services,
            resources,
            raw: s,
        })
    }
}

/// The files of a proxy's state directory: the last accepted snapshot and the workload
/// certificate, so a restart works without the control plane.
pub mod state_dir {
    use super::*;
    use prost::Message as _;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    /// Last accepted snapshot.
    pub const CONFIG: &str = "config.pb";
    /// Workload certificate chain.
    pub const CERT: &str = "cert.pem";
    /// Its key (mode 0600).
    pub const KEY: &str = "key.pem";
    /// Trust bundle.
    pub const BUNDLE: &str = "bundle.pem";
    /// This proxy's instance id (kept so a restart renews as the same instance).
    pub const INSTANCE: &str = "instance";

    /// Writes `name` in `dir` atomically; `secret` files get mode 0600.
    pub fn write(dir: &Path, name: &str, data: &[u8], secret: bool) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join(name);
        let tmp = dir.join(format!(".{name}.tmp"));
        {
            let mut opts = std::fs::OpenOptions::new();
            opts.write(true).create(true).truncate(true);
            if secret {
                opts.mode(0o600);
            }
            let mut f = opts.open(&tmp)?;
            f.write_all(data)?;
            f.sync_all()?;
        }
        std::fs::rename(&tmp, &path)
    }

    /// Saves an accepted snapshot.
    pub fn save_config(dir: &Path, s: &Snapshot) -> std::io::Result<()> {
        write(dir, CONFIG, &s.encode_to_vec(), false)
    }

    /// The saved snapshot, if there is a readable one.
    pub fn load_config(dir: &Path) -> Option<Pushed> {
        let bytes = std::fs::read(dir.join(CONFIG)).ok()?;
        match Snapshot::decode(bytes.as_slice()).map_err(|e| e.to_string()) {
            Ok(s) => match Pushed::from_snapshot(s) {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring the saved config");
                    None
                }
            },
            Err(e) => {
                tracing::warn!(error = %e, "ignoring an unreadable saved config");
                None
            }
        }
    }
}

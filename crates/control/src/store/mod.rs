//! Where the control plane keeps what it knows: a small key-value model with two backends.
//!
//! - **embedded** (default): one process, the data in memory and in one JSON file in the
//!   state directory, replaced atomically on every write. Nothing else to run.
//! - **etcd** (`--store etcd://host:port,...`): several control plane replicas share one etcd
//!   cluster, so a write through any replica reaches proxies connected to every replica, and
//!   any replica can issue certificates.
//!
//! Keys (under `/trellis/` in etcd):
//! `ca/...` CA material and rotation phase, `tokens/<id>`, `certs/<instance>`,
//! `resources/<Kind>/<namespace>/<name>`, `meta/resources` (bumped with every resource
//! change, its revision is the config version) are durable. `registry/<instance>` and
//! `status/<instance>` are ephemeral: they belong to the replica that holds the proxy's stream
//! and vanish when the proxy disconnects or the replica dies (an etcd lease of a few seconds).

mod embedded;
mod etcd;

use std::path::Path;
use std::time::Duration;
use tokio::sync::watch;

/// Store failures.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The data file could not be read or written.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: String,
        /// Why.
        message: String,
    },
    /// etcd trouble.
    #[error("etcd: {0}")]
    Etcd(String),
    /// A `--store` value we do not understand.
    #[error("--store {0}: expected `embedded` or `etcd://host:port[,host:port...]`")]
    Url(String),
}

/// One stored value and the store revision that last changed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The value (JSON or PEM text).
    pub value: String,
    /// Revision of the last change to this key.
    pub mod_revision: u64,
}

/// One change in an atomic commit.
#[derive(Clone, Debug)]
pub enum Op {
    /// Set a key.
    Put(String, String),
    /// Remove a key (no error when absent).
    Delete(String),
}

/// How long an ephemeral key outlives a replica that stopped renewing it.
pub const EPHEMERAL_TTL: Duration = Duration::from_secs(5);

/// The store, either backend.
pub enum Store {
    /// In-process, one file.
    Embedded(embedded::Embedded),
    /// An etcd cluster.
    Etcd(Box<etcd::Etcd>),
}

impl Store {
    /// Opens the store `url` names: `embedded` (the default; data in `state_dir`) or
    /// `etcd://host:port[,host:port...]`.
    pub async fn open(url: &str, state_dir: &Path) -> Result<Self, StoreError> {
        if url.is_empty() || url == "embedded" {
            return Ok(Self::Embedded(embedded::Embedded::open(state_dir)?));
        }
        let Some(rest) = url.strip_prefix("etcd://") else {
            return Err(StoreError::Url(url.to_string()));
        };
        let endpoints: Vec<String> = rest
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| format!("http://{}", s.trim_end_matches('/')))
            .collect();
        if endpoints.is_empty() {
            return Err(StoreError::Url(url.to_string()));
        }
        Ok(Self::Etcd(Box::new(etcd::Etcd::connect(&endpoints).await?)))
    }

    /// What the store is, for logs and `trellis check`.
    pub fn describe(&self) -> String {
        match self {
            Self::Embedded(e) => e.describe(),
            Self::Etcd(e) => e.describe(),
        }
    }

    /// One key.
    pub async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        match self {
            Self::Embedded(e) => Ok(e.get(key)),
            Self::Etcd(e) => e.get(key).await,
        }
    }

    /// Every key under `prefix` (sorted), and the store revision the listing reflects.
    pub async fn list(&self, prefix: &str) -> Result<(Vec<(String, Entry)>, u64), StoreError> {
        match self {
            Self::Embedded(e) => Ok(e.list(prefix)),
            Self::Etcd(e) => e.list(prefix).await,
        }
    }

    /// Applies every op or none; returns the new revision.
    pub async fn commit(&self, ops: Vec<Op>) -> Result<u64, StoreError> {
        match self {
            Self::Embedded(e) => e.commit(ops),
            Self::Etcd(e) => e.commit(ops).await,
        }
    }

    /// Sets every key in `values` only if none of them exists yet (first replica to start
    /// creates the CA). Returns whether they were written.
    pub async fn create(&self, values: Vec<(String, String)>) -> Result<bool, StoreError> {
        match self {
            Self::Embedded(e) => e.create(values),
            Self::Etcd(e) => e.create(values).await,
        }
    }

    /// Sets a key that lives only as long as this replica (see the module docs).
    pub async fn put_ephemeral(&self, key: &str, value: String) -> Result<(), StoreError> {
        match self {
            Self::Embedded(e) => {
                e.put_ephemeral(key, value);
                Ok(())
            }
            Self::Etcd(e) => e.put_ephemeral(key, value).await,
        }
    }

    /// Removes an ephemeral key if it still holds `value` (a proxy that reconnected through
    /// another replica meanwhile keeps its newer registration).
    pub async fn delete_ephemeral_if(&self, key: &str, value: &str) -> Result<(), StoreError> {
        match self {
            Self::Embedded(e) => {
                e.delete_ephemeral_if(key, value);
                Ok(())
            }
            Self::Etcd(e) => e.delete_if(key, value).await,
        }
    }

    /// The revision of the latest change under `prefix`, updated as changes happen (from any
    /// replica, with etcd).
    pub fn subscribe(&self, prefix: &str) -> watch::Receiver<u64> {
        match self {
            Self::Embedded(e) => e.subscribe(prefix),
            Self::Etcd(e) => e.subscribe(prefix),
        }
    }

    /// Whether the store answers, with a short description of its members' state.
    pub async fn health(&self) -> Result<String, StoreError> {
        match self {
            Self::Embedded(e) => Ok(e.describe()),
            Self::Etcd(e) => e.health().await,
        }
    }
}

/// Subscriptions by key prefix, shared by both backends.
#[derive(Default)]
pub(crate) struct Watchers {
    subs: std::sync::Mutex<Vec<(String, watch::Sender<u64>)>>,
}

impl Watchers {
    pub(crate) fn subscribe(&self, prefix: &str, revision: u64) -> watch::Receiver<u64> {
        let mut subs = self.subs.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, tx)) = subs.iter().find(|(p, _)| p == prefix) {
            return tx.subscribe();
        }
        let (tx, rx) = watch::channel(revision);
        subs.push((prefix.to_string(), tx));
        rx
    }

    /// Tells every subscriber (history was lost; everyone reloads).
    pub(crate) fn all(&self, revision: u64) {
        let subs = self.subs.lock().unwrap_or_else(|e| e.into_inner());
        for (_, tx) in subs.iter() {
            tx.send_replace(revision);
        }
    }

    /// Tells the subscribers of every prefix one of `keys` falls under.
    pub(crate) fn changed<'a>(&self, keys: impl IntoIterator<Item = &'a str>, revision: u64) {
        let subs = self.subs.lock().unwrap_or_else(|e| e.into_inner());
        for key in keys {
            for (prefix, tx) in subs.iter() {
                if key.starts_with(prefix.as_str()) && *tx.borrow() < revision {
                    tx.send_replace(revision);
                }
            }
        }
    }
}

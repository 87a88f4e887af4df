//! The resources a team applies (Istio YAML), validated before they are stored, under
//! `resources/<Kind>/<namespace>/<name>` in the [`Store`].
//!
//! Every change also rewrites `meta/resources` in the same commit: the revision of that key is
//! the config version the API reports.

use crate::state::StateError;
use crate::store::{Op, Store};
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::Arc;
use trellis_api::analyze::kind_and_meta;
use trellis_api::resources::Loaded;

const PREFIX: &str = "resources/";
const META: &str = "meta/resources";

/// What applying one resource did (or would do, in a dry run).
#[derive(Clone, Debug, Serialize)]
pub struct Change {
    /// `Kind/namespace/name`.
    pub object: String,
    /// `created`, `configured`, `unchanged` or `deleted`.
    pub action: &'static str,
    /// Unified diff of the YAML, live against applied (empty when unchanged).
    pub diff: String,
}

/// The stored resources.
pub struct ResourceStore {
    store: Arc<Store>,
    /// Serializes this replica's read-compare-write cycles.
    writing: tokio::sync::Mutex<()>,
}

fn key_of(l: &Loaded) -> String {
    let (kind, meta) = kind_and_meta(&l.resource);
    format!("{PREFIX}{kind}/{}/{}", meta.namespace(), meta.name)
}

fn object_of(key: &str) -> &str {
    key.strip_prefix(PREFIX).unwrap_or(key)
}

fn yaml(v: &Value) -> String {
    serde_yaml_ng::to_string(v).unwrap_or_default()
}

impl ResourceStore {
    /// The resources in `store`.
    pub fn new(store: Arc<Store>) -> Self {
        Self {
            store,
            writing: tokio::sync::Mutex::new(()),
        }
    }

    /// The config version: the store revision of the last resource change.
    pub async fn version(&self) -> Result<u64, StateError> {
        Ok(self.store.get(META).await?.map_or(0, |e| e.mod_revision))
    }

    async fn current(&self) -> Result<BTreeMap<String, Value>, StateError> {
        let (items, _) = self.store.list(PREFIX).await?;
        items
            .into_iter()
            .map(|(k, e)| {
                serde_json::from_str(&e.value)
                    .map(|v| (k.clone(), v))
                    .map_err(|err| StateError::Corrupt {
                        key: k,
                        message: err.to_string(),
                    })
            })
            .collect()
    }

    /// Every stored resource document.
    pub async fn all(&self) -> Result<Vec<Value>, StateError> {
        Ok(self.current().await?.into_values().collect())
    }

    async fn commit(&self, mut ops: Vec<Op>) -> Result<u64, StateError> {
        ops.push(Op::Put(META.into(), crate::state::now().to_string()));
        Ok(self.store.commit(ops).await?)
    }

    /// Applies validated resources (all or nothing); with `dry_run` only reports the changes.
    pub async fn apply(
        &self,
        loaded: &[Loaded],
        dry_run: bool,
    ) -> Result<(Vec<Change>, u64), StateError> {
        let _guard = self.writing.lock().await;
        let live = self.current().await?;
        let mut ops = Vec::new();
        let mut changes = Vec::new();
        for l in loaded {
            let key = key_of(l);
            let object = object_of(&key).to_string();
            let new = serde_json::to_value(&l.resource).unwrap_or_default();
            let (action, diff) = match live.get(&key) {
                None => ("created", String::new()),
                Some(old) if *old == new => ("unchanged", String::new()),
                Some(old) => {
                    let (a, b) = (yaml(old), yaml(&new));
                    let diff = similar::TextDiff::from_lines(&a, &b)
                        .unified_diff()
                        .header(&format!("{object} (live)"), &format!("{object} (applied)"))
                        .to_string();
                    ("configured", diff)
                }
            };
            if action != "unchanged" {
                ops.push(Op::Put(key, new.to_string()));
            }
            changes.push(Change {
                object,
                action,
                diff,
            });
        }
        if dry_run || ops.is_empty() {
            return Ok((changes, self.version().await?));
        }
        Ok((changes, self.commit(ops).await?))
    }

    /// Makes the stored set exactly `loaded` (GitOps: the config directory is the truth).
    /// Returns the changes, deletions included, and the version.
    pub async fn replace_all(&self, loaded: &[Loaded]) -> Result<(Vec<Change>, u64), StateError> {
        let _guard = self.writing.lock().await;
        let live = self.current().await?;
        let mut ops = Vec::new();
        let mut changes = Vec::new();
        let mut wanted = std::collections::BTreeSet::new();
        for l in loaded {
            let key = key_of(l);
            let new = serde_json::to_value(&l.resource).unwrap_or_default();
            let action = match live.get(&key) {
                None => "created",
                Some(old) if *old == new => "unchanged",
                Some(_) => "configured",
            };
            if action != "unchanged" {
                ops.push(Op::Put(key.clone(), new.to_string()));
            }
            changes.push(Change {
                object: object_of(&key).to_string(),
                action,
                diff: String::new(),
            });
            wanted.insert(key);
        }
        for k in live.keys().filter(|k| !wanted.contains(*k)) {
            changes.push(Change {
                object: object_of(k).to_string(),
                action: "deleted",
                diff: String::new(),
            });
            ops.push(Op::Delete(k.clone()));
        }
        if ops.is_empty() {
            return Ok((changes, self.version().await?));
        }
        Ok((changes, self.commit(ops).await?))
    }

    /// Resources of `kind` (all kinds when `None`), optionally one namespace and name.
    pub async fn list(
        &self,
        kind: Option<&str>,
        namespace: Option<&str>,
        name: Option<&str>,
    ) -> Result<Vec<Value>, StateError> {
        Ok(self
            .current()
            .await?
            .into_iter()
            .filter(|(k, _)| {
                let mut parts = object_of(k).splitn(3, '/');
                let (k, ns, n) = (parts.next(), parts.next(), parts.next());
                kind.is_none_or(|x| Some(x) == k)
                    && namespace.is_none_or(|x| Some(x) == ns)
                    && name.is_none_or(|x| Some(x) == n)
            })
            .map(|(_, v)| v)
            .collect())
    }

    /// Deletes one resource; `false` when it did not exist.
    pub async fn delete(
        &self,
        kind: &str,
        namespace: &str,
        name: &str,
    ) -> Result<bool, StateError> {
        let _guard = self.writing.lock().await;
        let key = format!("{PREFIX}{kind}/{namespace}/{name}");
        if self.store.get(&key).await?.is_none() {
            return Ok(false);
        }
        self.commit(vec![Op::Delete(key)]).await?;
        Ok(true)
    }
}

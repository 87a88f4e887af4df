//! The resources a team applies (Istio YAML), validated before they are stored, versioned, and
//! kept in the state directory (`resources.json`, written atomically).
//!
//! Every change bumps the config version that proxies will be pushed (config push is the
//! next step of the control-plane issue).

use crate::state::{write_atomic, StateError};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use trellis_api::analyze::kind_and_meta;
use trellis_api::resources::Loaded;

/// `(kind, namespace, name)`.
type Key = (String, String, String);

#[derive(Default, Serialize, Deserialize)]
struct StoreFile {
    version: u64,
    items: Vec<Value>,
}

/// What applying one resource did (or would do, in a dry run).
#[derive(Clone, Debug, Serialize)]
pub struct Change {
    /// `Kind/namespace/name`.
    pub object: String,
    /// `created`, `configured` or `unchanged`.
    pub action: &'static str,
    /// Unified diff of the YAML, live against applied (empty when unchanged).
    pub diff: String,
}

/// The stored resources.
pub struct ResourceStore {
    path: PathBuf,
    inner: Mutex<(u64, BTreeMap<Key, Value>)>,
}

fn key_of(l: &Loaded) -> Key {
    let (kind, meta) = kind_and_meta(&l.resource);
    (
        kind.to_string(),
        meta.namespace().to_string(),
        meta.name.clone(),
    )
}

fn yaml(v: &Value) -> String {
    serde_yaml_ng::to_string(v).unwrap_or_default()
}

impl ResourceStore {
    /// Opens `resources.json` in `dir` (empty when absent).
    pub fn open(dir: &Path) -> Result<Self, StateError> {
        let path = dir.join("resources.json");
        let file: StoreFile = match std::fs::read_to_string(&path) {
            Ok(s) => serde_json::from_str(&s).map_err(|e| StateError::Corrupt {
                path: path.clone(),
                message: e.to_string(),
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StoreFile::default(),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        let mut items = BTreeMap::new();
        for v in file.items {
            let key = (
                v["kind"].as_str().unwrap_or_default().to_string(),
                v["metadata"]["namespace"]
                    .as_str()
                    .unwrap_or("default")
                    .to_string(),
                v["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            );
            items.insert(key, v);
        }
        Ok(Self {
            path,
            inner: Mutex::new((file.version, items)),
        })
    }

    /// The config version (bumped by every change).
    pub fn version(&self) -> u64 {
        self.inner.lock().unwrap_or_else(|e| e.into_inner()).0
    }

    fn save(&self, version: u64, items: &BTreeMap<Key, Value>) -> Result<(), StateError> {
        let file = StoreFile {
            version,
            items: items.values().cloned().collect(),
        };
        let json = serde_json::to_vec_pretty(&file).unwrap_or_default();
        write_atomic(&self.path, &json, false)
    }

    /// Applies validated resources (all or nothing); with `dry_run` only reports the changes.
    pub fn apply(
        &self,
        loaded: &[Loaded],
        dry_run: bool,
    ) -> Result<(Vec<Change>, u64), StateError> {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (version, items) = &mut *guard;
        let mut next = items.clone();
        let mut changes = Vec::new();
        for l in loaded {
            let key = key_of(l);
            let object = format!("{}/{}/{}", key.0, key.1, key.2);
            let new = serde_json::to_value(&l.resource).unwrap_or_default();
            let (action, diff) = match next.get(&key) {
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
            next.insert(key, new);
            changes.push(Change {
                object,
                action,
                diff,
            });
        }
        let changed = changes.iter().any(|c| c.action != "unchanged");
        if dry_run || !changed {
            return Ok((changes, *version));
        }
        self.save(*version + 1, &next)?;
        *version += 1;
        *items = next;
        Ok((changes, *version))
    }

    /// Makes the stored set exactly `loaded` (GitOps: the config directory is the truth).
    /// Returns the changes, deletions included, and the version.
    pub fn replace_all(&self, loaded: &[Loaded]) -> Result<(Vec<Change>, u64), StateError> {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (version, items) = &mut *guard;
        let mut next = BTreeMap::new();
        let mut changes = Vec::new();
        for l in loaded {
            let key = key_of(l);
            let object = format!("{}/{}/{}", key.0, key.1, key.2);
            let new = serde_json::to_value(&l.resource).unwrap_or_default();
            let action = match items.get(&key) {
                None => "created",
                Some(old) if *old == new => "unchanged",
                Some(_) => "configured",
            };
            next.insert(key, new);
            changes.push(Change {
                object,
                action,
                diff: String::new(),
            });
        }
        for (k, _) in items.iter().filter(|(k, _)| !next.contains_key(*k)) {
            changes.push(Change {
                object: format!("{}/{}/{}", k.0, k.1, k.2),
                action: "deleted",
                diff: String::new(),
            });
        }
        if changes.iter().all(|c| c.action == "unchanged") {
            return Ok((changes, *version));
        }
        self.save(*version + 1, &next)?;
        *version += 1;
        *items = next;
        Ok((changes, *version))
    }

    /// Resources of `kind` (all kinds when `None`), optionally one namespace and name.
    pub fn list(
        &self,
        kind: Option<&str>,
        namespace: Option<&str>,
        name: Option<&str>,
    ) -> Vec<Value> {
        let guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        guard
            .1
            .iter()
            .filter(|((k, ns, n), _)| {
                kind.is_none_or(|x| x == k)
                    && namespace.is_none_or(|x| x == ns)
                    && name.is_none_or(|x| x == n)
            })
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// Deletes one resource; `false` when it did not exist.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) -> Result<bool, StateError> {
        let mut guard = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let (version, items) = &mut *guard;
        let key = (kind.to_string(), namespace.to_string(), name.to_string());
        if !items.contains_key(&key) {
            return Ok(false);
        }
        let mut next = items.clone();
        next.remove(&key);
        self.save(*version + 1, &next)?;
        *version += 1;
        *items = next;
        Ok(true)
    }
}

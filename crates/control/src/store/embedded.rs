//! The embedded store: a sorted map in memory, its durable keys written to `store.json` in the
//! state directory (mode 0600: it holds the CA key) by write-to-temporary, fsync, rename on
//! every commit. Ephemeral keys stay in memory.

use super::{Entry, Op, StoreError, Watchers};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use tokio::sync::watch;

#[derive(Default, Serialize, Deserialize)]
struct File {
    revision: u64,
    keys: BTreeMap<String, FileEntry>,
}

#[derive(Clone, Serialize, Deserialize)]
struct FileEntry {
    value: String,
    mod_revision: u64,
}

struct Inner {
    revision: u64,
    durable: BTreeMap<String, FileEntry>,
    ephemeral: BTreeMap<String, FileEntry>,
}

/// See the module docs.
pub struct Embedded {
    path: PathBuf,
    inner: Mutex<Inner>,
    watchers: Watchers,
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::File {
        path: path.display().to_string(),
        message: e.to_string(),
    }
}

impl Embedded {
    /// Opens (creating) `dir/store.json`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| file_err(dir, e))?;
        let path = dir.join("store.json");
        let file: File = match std::fs::read_to_string(&path) {
            Ok(s) => serde_json::from_str(&s).map_err(|e| file_err(&path, e))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => File::default(),
            Err(e) => return Err(file_err(&path, e)),
        };
        Ok(Self {
            path,
            inner: Mutex::new(Inner {
                revision: file.revision,
                durable: file.keys,
                ephemeral: BTreeMap::new(),
            }),
            watchers: Watchers::default(),
        })
    }

    pub(super) fn describe(&self) -> String {
        format!("embedded ({})", self.path.display())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_ephemeral(key: &str) -> bool {
        key.starts_with("registry/") || key.starts_with("status/")
    }

    pub(super) fn get(&self, key: &str) -> Option<Entry> {
        let inner = self.lock();
        let map = if Self::is_ephemeral(key) {
            &inner.ephemeral
        } else {
            &inner.durable
        };
        map.get(key).map(|e| Entry {
            value: e.value.clone(),
            mod_revision: e.mod_revision,
        })
    }

    pub(super) fn list(&self, prefix: &str) -> (Vec<(String, Entry)>, u64) {
        let inner = self.lock();
        let matching = |map: &BTreeMap<String, FileEntry>| -> Vec<(String, Entry)> {
            map.range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, e)| {
                    let entry = Entry {
                        value: e.value.clone(),
                        mod_revision: e.mod_revision,
                    };
                    (k.clone(), entry)
                })
                .collect()
        };
        let mut out = matching(&inner.durable);
        out.extend(matching(&inner.ephemeral));
        out.sort_by(|a, b| a.0.cmp(&b.0));
        (out, inner.revision)
    }

    fn save(&self, inner: &Inner) -> Result<(), StoreError> {
        let file = File {
            revision: inner.revision,
            keys: inner.durable.clone(),
        };
        let json = serde_json::to_vec_pretty(&file).map_err(|e| file_err(&self.path, e))?;
        let tmp = self.path.with_extension("json.tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(|e| file_err(&tmp, e))?;
        f.write_all(&json).map_err(|e| file_err(&tmp, e))?;
        f.sync_all().map_err(|e| file_err(&tmp, e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| file_err(&self.path, e))
    }

    pub(super) fn commit(&self, ops: Vec<Op>) -> Result<u64, StoreError> {
        let mut inner = self.lock();
        let revision = inner.revision + 1;
        let durable = ops.iter().any(|op| match op {
            Op::Put(k, _) | Op::Delete(k) => !Self::is_ephemeral(k),
        });
        // Only a commit that writes the file can fail half-way; keep what to go back to.
        let before = durable.then(|| inner.durable.clone());
        let mut keys = Vec::new();
        for op in &ops {
            match op {
                Op::Put(k, v) => {
                    let entry = FileEntry {
                        value: v.clone(),
                        mod_revision: revision,
                    };
                    if Self::is_ephemeral(k) {
                        inner.ephemeral.insert(k.clone(), entry);
                    } else {
                        inner.durable.insert(k.clone(), entry);
                    }
                    keys.push(k.as_str());
                }
                Op::Delete(k) => {
                    let gone = if Self::is_ephemeral(k) {
                        inner.ephemeral.remove(k).is_some()
                    } else {
                        inner.durable.remove(k).is_some()
                    };
                    if gone {
                        keys.push(k.as_str());
                    }
                }
            }
        }
        if keys.is_empty() {
            return Ok(inner.revision);
        }
        inner.revision = revision;
        if let Some(before) = before {
            if let Err(e) = self.save(&inner) {
                // Nothing is half-applied: memory goes back to what the file still holds.
                // (Ephemeral keys are never in a durable commit's ops with durable ones.)
                inner.durable = before;
                inner.revision = revision - 1;
                return Err(e);
            }
        }
        drop(inner);
        self.watchers.changed(keys, revision);
        Ok(revision)
    }

    pub(super) fn create(&self, values: Vec<(String, String)>) -> Result<bool, StoreError> {
        {
            let inner = self.lock();
            if values.iter().any(|(k, _)| inner.durable.contains_key(k)) {
                return Ok(false);
            }
        }
        // One process: nobody else can create them between the check and the commit but
        // this process's own start-up, which runs once.
        self.commit(values.into_iter().map(|(k, v)| Op::Put(k, v)).collect())?;
        Ok(true)
    }

    pub(super) fn put_ephemeral(&self, key: &str, value: String) {
        let _ = self.commit(vec![Op::Put(key.to_string(), value)]);
    }

    pub(super) fn delete_ephemeral_if(&self, key: &str, value: &str) {
        let holds = self
            .lock()
            .ephemeral
            .get(key)
            .is_some_and(|e| e.value == value);
        if holds {
            let _ = self.commit(vec![Op::Delete(key.to_string())]);
        }
    }

    pub(super) fn subscribe(&self, prefix: &str) -> watch::Receiver<u64> {
        let revision = self.lock().revision;
        self.watchers.subscribe(prefix, revision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durable_keys_survive_a_reopen_and_ephemeral_ones_do_not() {
        let dir = std::env::temp_dir().join(format!("trellis-embedded-{}", uuid::Uuid::new_v4()));
        let s = Embedded::open(&dir).unwrap();
        let mut rx = s.subscribe("resources/");
        let r = s
            .commit(vec![
                Op::Put("resources/A/ns/a".into(), "1".into()),
                Op::Put("tokens/t".into(), "2".into()),
            ])
            .unwrap();
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), r);
        s.put_ephemeral("registry/x", "3".into());
        assert!(!rx.has_changed().unwrap());
        assert_eq!(s.list("registry/").0.len(), 1);
        assert!(!s.create(vec![("tokens/t".into(), "9".into())]).unwrap());
        let mode = std::fs::metadata(dir.join("store.json")).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.permissions().mode() & 0o777, 0o600);

        let s = Embedded::open(&dir).unwrap();
        assert_eq!(s.get("tokens/t").unwrap().value, "2");
        assert_eq!(s.get("resources/A/ns/a").unwrap().mod_revision, r);
        assert!(s.list("registry/").0.is_empty());
        let _ = std::fs::remove_dir_all(dir);
    }
}

//! `trellis status` (every connected proxy and how in sync it is), `trellis backup` and
//! `trellis restore` (everything durable on the control plane, CA key included).

use crate::api_client::{block_on, call};
use anyhow::{bail, Context as _};
use serde_json::Value;
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// The archive format `GET /api/v1/backup` produces.
const BACKUP_FORMAT: &str = "trellis-backup/v1";

/// How in sync one proxy of `GET /api/v1/status` is.
#[derive(Debug, PartialEq, Eq)]
pub enum SyncState {
    /// It runs the latest config it was sent.
    InSync,
    /// It has not (yet) acknowledged the latest config it was sent.
    Stale { acked: u64, sent: u64 },
    /// It refused a config at least as new as the one it last accepted.
    Nack { version: u64, error: String },
}

impl SyncState {
    /// Classifies one `proxies[]` entry.
    pub fn of(p: &Value) -> Self {
        let acked = p["acked_version"].as_u64().unwrap_or(0);
        let sent = p["sent_version"].as_u64().unwrap_or(0);
        let nack = &p["last_nack"];
        if let Some(version) = nack["version"].as_u64().filter(|v| *v >= acked) {
            return Self::Nack {
                version,
                error: nack["error"].as_str().unwrap_or("").to_string(),
            };
        }
        if p["in_sync"].as_bool() == Some(true) {
            Self::InSync
        } else {
            Self::Stale { acked, sent }
        }
    }

    /// Whether this is healthy.
    pub fn ok(&self) -> bool {
        *self == Self::InSync
    }
}

/// `service.namespace` of a proxy.
pub fn service_of(p: &Value) -> String {
    format!(
        "{}.{}",
        p["service"].as_str().unwrap_or("?"),
        p["namespace"].as_str().unwrap_or("?")
    )
}

/// The instance id without the service name it starts with (that is the SERVICE column).
fn short_instance(p: &Value) -> String {
    let instance = p["instance"].as_str().unwrap_or("");
    let service = p["service"].as_str().unwrap_or("");
    let short = instance
        .strip_prefix(service)
        .and_then(|s| s.strip_prefix('-'))
        .filter(|s| !s.is_empty())
        .unwrap_or(instance);
    ellipsize(short, 20)
}

/// `ip:port,port`.
fn address_of(p: &Value) -> String {
    let ip = p["address"].as_str().unwrap_or("");
    let ports: Vec<String> = p["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|x| x["port"].as_u64())
        .map(|x| x.to_string())
        .collect();
    match (ip, ports.is_empty()) {
        ("", true) => "-".to_string(),
        (ip, true) => ip.to_string(),
        (ip, false) if ip.contains(':') => format!("[{ip}]:{}", ports.join(",")),
        (ip, false) => format!("{ip}:{}", ports.join(",")),
    }
}

fn ellipsize(s: &str, max: usize) -> String {
    let s = s.replace('\n', " ");
    if s.chars().count() <= max {
        s
    } else {
        let mut t: String = s.chars().take(max.saturating_sub(1)).collect();
        t.push('…');
        t
    }
}

/// `trellis status [-o json]`: `Ok(false)` (exit 1) when a proxy is not in sync.
pub fn status(api: &str, json_out: bool) -> anyhow::Result<bool> {
    let v = block_on(call(api, "GET", "/api/v1/status", None))??;
    let mut proxies: Vec<&Value> = v["proxies"].as_array().into_iter().flatten().collect();
    let all_ok = proxies.iter().all(|p| SyncState::of(p).ok());
    if json_out {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(all_ok);
    }
    proxies.sort_by_key(|p| {
        (
            service_of(p),
            p["instance"].as_str().unwrap_or("").to_string(),
        )
    });
    let now = v["now"].as_u64().unwrap_or(0);
    let in_sync = proxies.iter().filter(|p| SyncState::of(p).ok()).count();
    println!(
        "config version {} (store revision {}): {} prox{}, {in_sync} in sync",
        v["config_version"],
        v["revision"],
        proxies.len(),
        if proxies.len() == 1 { "y" } else { "ies" },
    );
    println!(
        "{:<28} {:<20} {:<24} {:<5} {:<9} {:<32} {:<14} REPLICA",
        "SERVICE", "INSTANCE", "ADDRESS", "READY", "VERSION", "SYNC", "CERT EXPIRES"
    );
    let mut nacks = Vec::new();
    for p in &proxies {
        let sync = match SyncState::of(p) {
            SyncState::InSync => "in sync".to_string(),
            SyncState::Stale { .. } => "STALE".to_string(),
            SyncState::Nack { version, error } => {
                nacks.push(format!(
                    "{} ({}) refused config version {version}: {error}",
                    service_of(p),
                    p["instance"].as_str().unwrap_or("?")
                ));
                ellipsize(&format!("NACK: {error}"), 32)
            }
        };
        println!(
            "{:<28} {:<20} {:<24} {:<5} {:<9} {:<32} {:<14} {}",
            service_of(p),
            short_instance(p),
            address_of(p),
            if p["ready"].as_bool() == Some(true) {
                "yes"
            } else {
                "no"
            },
            format!(
                "{}/{}",
                p["acked_version"].as_u64().unwrap_or(0),
                p["sent_version"].as_u64().unwrap_or(0)
            ),
            sync,
            p["cert_not_after"]
                .as_u64()
                .map_or_else(|| "-".to_string(), |t| super::relative(t, now)),
            p["replica"].as_str().unwrap_or(""),
        );
    }
    for n in nacks {
        println!("NACK {n}");
    }
    Ok(all_ok)
}

/// `trellis backup FILE [--force]`: the archive is written to a temporary file (mode 0600)
/// next to FILE, then renamed over it, so FILE is never seen half-written.
pub fn backup(api: &str, file: &Path, force: bool) -> anyhow::Result<()> {
    if !force && file.symlink_metadata().is_ok() {
        bail!(
            "{} already exists (--force to overwrite it)",
            file.display()
        );
    }
    let v = block_on(call(api, "GET", "/api/v1/backup", None))??;
    if v["format"].as_str() != Some(BACKUP_FORMAT) {
        bail!(
            "the control plane sent an unexpected backup format {} (expected {BACKUP_FORMAT})",
            v["format"]
        );
    }
    let mut text = serde_json::to_vec_pretty(&v)?;
    text.push(b'\n');
    write_atomically(file, &text, force)?;
    let keys = v["keys"].as_object().map(|k| k.len()).unwrap_or(0);
    println!(
        "backup of trust domain {} written to {}: {keys} keys ({})",
        v["trust_domain"].as_str().unwrap_or("?"),
        file.display(),
        summary(&v)
    );
    eprintln!("note: the backup holds the CA private key: keep it as secret as the CA itself");
    Ok(())
}

/// "3 tokens, 2 resources, 5 issued certificates, 4 CA keys" of an archive.
fn summary(archive: &Value) -> String {
    let keys: Vec<&String> = archive["keys"]
        .as_object()
        .map(|m| m.keys().collect())
        .unwrap_or_default();
    let count = |prefix: &str| keys.iter().filter(|k| k.starts_with(prefix)).count();
    [
        ("tokens/", "token"),
        ("resources/", "resource"),
        ("certs/", "issued certificate"),
        ("ca/", "CA key"),
    ]
    .iter()
    .map(|(prefix, what)| {
        let n = count(prefix);
        format!("{n} {what}{}", if n == 1 { "" } else { "s" })
    })
    .collect::<Vec<_>>()
    .join(", ")
}

/// Writes `bytes` to a temporary file (0600) in `file`'s directory, then moves it to `file`:
/// over an existing one with `overwrite`, else never (a file that appeared meanwhile wins).
fn write_atomically(file: &Path, bytes: &[u8], overwrite: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = file
        .file_name()
        .with_context(|| format!("{}: not a file name", file.display()))?
        .to_string_lossy()
        .into_owned();
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| -> anyhow::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("creating {}", tmp.display()))?;
        f.write_all(bytes)
            .and_then(|()| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        drop(f);
        if overwrite {
            std::fs::rename(&tmp, file)
                .with_context(|| format!("moving {} to {}", tmp.display(), file.display()))?;
        } else {
            // A hard link does not replace an existing file, unlike rename.
            match std::fs::hard_link(&tmp, file) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => bail!(
                    "{} already exists (--force to overwrite it)",
                    file.display()
                ),
                // Filesystems without hard links: check, then rename.
                Err(_) if file.symlink_metadata().is_err() => std::fs::rename(&tmp, file)
                    .with_context(|| format!("moving {} to {}", tmp.display(), file.display()))?,
                Err(e) => return Err(e).with_context(|| file.display().to_string()),
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_file(&tmp);
    result?;
    if let Ok(d) = std::fs::File::open(&dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// `trellis restore FILE [--force]`.
pub fn restore(api: &str, file: &Path, force: bool) -> anyhow::Result<()> {
    let text = std::fs::read(file).with_context(|| file.display().to_string())?;
    let archive: Value = serde_json::from_slice(&text)
        .map_err(|e| anyhow::anyhow!("{}: not a Trellis backup (not JSON: {e})", file.display()))?;
    match archive.get("format") {
        Some(Value::String(f)) if f == BACKUP_FORMAT => {}
        Some(Value::String(f)) => bail!(
            "{}: not a Trellis backup this version can restore (format {f:?}, expected {BACKUP_FORMAT:?})",
            file.display()
        ),
        _ => bail!(
            "{}: not a Trellis backup (no \"format\" field, expected {BACKUP_FORMAT:?})",
            file.display()
        ),
    }
    let path = if force {
        "/api/v1/restore?force=true"
    } else {
        "/api/v1/restore"
    };
    let what = summary(&archive);
    let resp = block_on(call(api, "POST", path, Some(archive)))??;
    println!(
        "restored {} keys from {} ({what}), store revision {}",
        resp["restored_keys"],
        file.display(),
        resp["revision"],
    );
    println!("CA pin {}", resp["ca_pin"].as_str().unwrap_or("?"));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sync_states() {
        let p = |sent: u64, acked: u64, nack: Value| json!({ "sent_version": sent, "acked_version": acked, "in_sync": sent != 0 && sent == acked, "last_nack": nack });
        assert_eq!(SyncState::of(&p(3, 3, Value::Null)), SyncState::InSync);
        assert_eq!(
            SyncState::of(&p(4, 3, Value::Null)),
            SyncState::Stale { acked: 3, sent: 4 }
        );
        assert_eq!(
            SyncState::of(&p(
                4,
                3,
                json!({ "version": 4, "error": "bad route", "at": 1 })
            )),
            SyncState::Nack {
                version: 4,
                error: "bad route".into()
            }
        );
        // A refusal older than the latest accepted config is history.
        assert_eq!(
            SyncState::of(&p(
                5,
                5,
                json!({ "version": 4, "error": "bad route", "at": 1 })
            )),
            SyncState::InSync
        );
    }

    #[test]
    fn addresses_and_instances() {
        let p = json!({
            "service": "reviews", "instance": "reviews-0a1b2c3d", "address": "10.0.0.7",
            "ports": [{ "port": 9080, "protocol": "http1" }, { "port": 9090, "protocol": "grpc" }],
        });
        assert_eq!(address_of(&p), "10.0.0.7:9080,9090");
        assert_eq!(short_instance(&p), "0a1b2c3d");
        let p = json!({ "service": "x", "instance": "other", "address": "::1", "ports": [{ "port": 1 }] });
        assert_eq!(address_of(&p), "[::1]:1");
        assert_eq!(short_instance(&p), "other");
        assert_eq!(ellipsize("abcdef", 4), "abc…");
    }

    #[test]
    fn backups_are_written_atomically_with_mode_0600() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("trellis-ops-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("b.json");
        write_atomically(&file, b"one", false).unwrap();
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let err = write_atomically(&file, b"two", false).unwrap_err();
        assert!(err.to_string().contains("already exists"), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"one");
        write_atomically(&file, b"two", true).unwrap();
        assert_eq!(std::fs::read(&file).unwrap(), b"two");
        let left: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file left behind");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

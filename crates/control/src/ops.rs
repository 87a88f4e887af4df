//! Operations over the whole store: the per-proxy status view (`trellis status`), and backup
//! and restore of everything durable (`trellis backup` / `trellis restore`).

use crate::http::Api;
use crate::registry::{SyncStatus, Workload};
use crate::state::{now, StateError};
use crate::store::Op;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::BTreeMap;

/// What a backup holds: every durable key (CA material, tokens, the certificate ledger,
/// resources). Registrations are not in it: proxies register again when they reconnect.
const DURABLE: [&str; 5] = ["ca/", "tokens/", "certs/", "resources/", "meta/"];

/// The archive format.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backup {
    /// `trellis-backup/v1`.
    pub format: String,
    /// When it was taken, Unix seconds.
    pub created_at: u64,
    /// Trust domain of the identities in it.
    pub trust_domain: String,
    /// Key to value.
    pub keys: BTreeMap<String, String>,
}

const FORMAT: &str = "trellis-backup/v1";

/// `GET /api/v1/status`: every connected proxy, its sync state and certificate expiry.
pub async fn status(api: &Api) -> Result<Value, StateError> {
    let store = api.state.store();
    let (regs, revision) = store.list("registry/").await?;
    let (statuses, _) = store.list("status/").await?;
    let statuses: BTreeMap<String, SyncStatus> = statuses
        .into_iter()
        .filter_map(|(k, e)| {
            let instance = k.strip_prefix("status/")?.to_string();
            Some((instance, serde_json::from_str(&e.value).ok()?))
        })
        .collect();
    let certs: BTreeMap<String, u64> = api
        .state
        .certs()
        .await?
        .into_iter()
        .map(|c| (c.instance, c.not_after))
        .collect();
    let mut proxies = Vec::new();
    for (_, e) in regs {
        let Ok(w) = serde_json::from_str::<Workload>(&e.value) else {
            continue;
        };
        let st = statuses.get(&w.instance).cloned().unwrap_or_default();
        proxies.push(json!({
            "instance": w.instance,
            "service": w.service,
            "namespace": w.namespace,
            "identity": w.identity,
            "address": w.address,
            "ports": w.ports,
            "labels": w.labels,
            "ready": w.ready,
            "replica": w.replica,
            "connected_at": w.connected_at,
            "sent_version": st.sent,
            "acked_version": st.acked,
            "in_sync": st.in_sync(),
            "last_nack": st.last_nack,
            "cert_not_after": certs.get(&w.instance),
        }));
    }
    Ok(json!({
        "now": now(),
        "revision": revision,
        "config_version": api.resources.version().await?,
        "proxies": proxies,
    }))
}

/// `GET /api/v1/backup`.
pub async fn backup(api: &Api) -> Result<Value, StateError> {
    let mut keys = BTreeMap::new();
    for prefix in DURABLE {
        let (items, _) = api.state.store().list(prefix).await?;
        keys.extend(items.into_iter().map(|(k, e)| (k, e.value)));
    }
    let b = Backup {
        format: FORMAT.into(),
        created_at: now(),
        trust_domain: api.state.trust_domain().to_string(),
        keys,
    };
    Ok(serde_json::to_value(b).unwrap_or_default())
}

/// `POST /api/v1/restore[?force=true]`: replaces every durable key with the archive's. Refused
/// when this control plane already has tokens or resources, unless forced.
pub async fn restore(api: &Api, b: Backup, force: bool) -> Result<Value, StateError> {
    if b.format != FORMAT {
        return Err(StateError::Invalid(format!(
            "not a Trellis backup (format {:?}, expected {FORMAT})",
            b.format
        )));
    }
    if b.trust_domain != api.state.trust_domain() {
        return Err(StateError::Invalid(format!(
            "the backup is of trust domain {}, this control plane runs {}",
            b.trust_domain,
            api.state.trust_domain()
        )));
    }
    if let Some(k) = b
        .keys
        .keys()
        .find(|k| !DURABLE.iter().any(|p| k.starts_with(p)))
    {
        return Err(StateError::Invalid(format!(
            "unexpected key {k:?} in the backup"
        )));
    }
    for required in ["ca/cert.pem", "ca/key.pem"] {
        if !b.keys.contains_key(required) {
            return Err(StateError::Invalid(format!("the backup has no {required}")));
        }
    }
    // The CA must load before anything is replaced.
    trellis_identity::CertificateAuthority::from_pem(
        &b.trust_domain,
        &b.keys["ca/cert.pem"],
        &b.keys["ca/key.pem"],
        b.keys.get("ca/bundle.pem").map(String::as_str),
    )?;
    let store = api.state.store();
    let mut ops = Vec::new();
    for prefix in DURABLE {
        let (items, _) = store.list(prefix).await?;
        if !force && (prefix == "tokens/" || prefix == "resources/") && !items.is_empty() {
            return Err(StateError::Invalid(format!(
                "this control plane already has {} {}; restore into an empty one, or force it",
                items.len(),
                prefix.trim_end_matches('/')
            )));
        }
        ops.extend(
            items
                .into_iter()
                .filter(|(k, _)| !b.keys.contains_key(k))
                .map(|(k, _)| Op::Delete(k)),
        );
    }
    let count = b.keys.len();
    ops.extend(b.keys.into_iter().map(|(k, v)| Op::Put(k, v)));
    let revision = store.commit(ops).await?;
    // Reload now rather than wait for the watch, so the answer reflects the restored CA.
    api.state.reload_ca().await?;
    api.ca_changed.notify_one();
    Ok(json!({
        "restored_keys": count,
        "revision": revision,
        "ca_pin": api.state.with_ca(|c| c.pin()),
    }))
}

//! The control plane's durable identity state, kept in the [`Store`]: CA material and the
//! rotation phase (`ca/...`), join tokens (`tokens/<id>`) and the ledger of issued
//! certificates (`certs/<instance>`). The CA is cached in memory and reloaded when `ca/`
//! changes (a rotation or a restore through any replica).

use crate::store::{Op, Store, StoreError};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use trellis_identity::ca::{CaError, Issued};
use trellis_identity::token::{constant_time_eq, hash_secret, JoinToken};
use trellis_identity::{CertificateAuthority, SpiffeId};

/// Why the state could not be read, written or used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file named on the command line could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A stored value is corrupt.
    #[error("{key}: {message}")]
    Corrupt {
        /// The key.
        key: String,
        /// Why.
        message: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// CA trouble.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// A request that cannot be honoured (bad name, unknown token, wrong rotation phase).
    #[error("{0}")]
    Invalid(String),
}

/// How the control plane's CA is set up at start.
#[derive(Clone, Debug, Default)]
pub struct CaSource {
    /// Operator-supplied CA certificate (and intermediates) PEM file.
    pub cert: Option<PathBuf>,
    /// Its key.
    pub key: Option<PathBuf>,
    /// Roots to trust (required for an intermediate).
    pub bundle: Option<PathBuf>,
    /// Validity of a generated root.
    pub validity: Duration,
}

/// A join token as stored: never the secret itself.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TokenRecord {
    /// Public id.
    pub id: String,
    /// SHA-256 of the secret, hex.
    pub secret_sha256: String,
    /// Service the token joins as.
    pub service: String,
    /// Namespace.
    pub namespace: String,
    /// Service account (the identity's `sa`).
    pub service_account: String,
    /// Creation, Unix seconds.
    pub created_at: u64,
    /// Expiry, Unix seconds.
    pub expires_at: u64,
    /// Revoked tokens are refused.
    pub revoked: bool,
}

/// A certificate the control plane issued, per proxy instance (latest only).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CertRecord {
    /// The proxy process.
    pub instance: String,
    /// SPIFFE ID.
    pub identity: String,
    /// Serial, hex.
    pub serial: String,
    /// Expiry, Unix seconds.
    pub not_after: u64,
    /// Issue time, Unix seconds.
    pub issued_at: u64,
    /// What the proxy reported as its address.
    pub address: String,
    /// Certificates issued to this instance so far.
    pub issued_count: u64,
    /// The join token this instance joined with: revoking it stops renewals too.
    #[serde(default)]
    pub token_id: String,
}

/// Where a CA rotation stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RotationPhase {
    /// One root, signing.
    Idle,
    /// A new root is trusted but not yet signing.
    Prepared,
    /// The new root signs; the old one is still trusted.
    Activated,
}

#[derive(Serialize, Deserialize)]
struct RotationFile {
    phase: RotationPhase,
}

/// Now, Unix seconds.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

const CA_CERT: &str = "ca/cert.pem";
const CA_KEY: &str = "ca/key.pem";
const CA_BUNDLE: &str = "ca/bundle.pem";
const CA_NEXT_CERT: &str = "ca/next-cert.pem";
const CA_NEXT_KEY: &str = "ca/next-key.pem";
const CA_ROTATION: &str = "ca/rotation";

/// The identity state and the cached CA.
pub struct State {
    store: Arc<Store>,
    trust_domain: String,
    ca: RwLock<CertificateAuthority>,
}

fn check_name(what: &str, v: &str) -> Result<(), StateError> {
    let ok = !v.is_empty()
        && v.len() <= 63
        && v.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !v.starts_with('-')
        && !v.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(StateError::Invalid(format!(
            "{what} {v:?} is not a valid name (lower-case letters, digits and '-')"
        )))
    }
}

/// Whether `v` may be used as a store key segment (proxy instance ids, token ids).
pub fn valid_id(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 64
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !v.starts_with('.')
}

fn parse<T: for<'de> Deserialize<'de>>(key: &str, value: &str) -> Result<T, StateError> {
    serde_json::from_str(value).map_err(|e| StateError::Corrupt {
        key: key.to_string(),
        message: e.to_string(),
    })
}

fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

fn ca_ops(ca: &CertificateAuthority) -> Vec<Op> {
    vec![
        Op::Put(CA_KEY.into(), ca.key_pem().to_string()),
        Op::Put(CA_CERT.into(), ca.cert_file_pem()),
        Op::Put(CA_BUNDLE.into(), ca.bundle_pem()),
    ]
}

impl State {
    /// Loads the CA from the store, or imports the operator's (`source`), or creates one (the
    /// first replica to start wins; the others load it).
    pub async fn open(
        store: Arc<Store>,
        trust_domain: &str,
        source: &CaSource,
    ) -> Result<Self, StateError> {
        let ca = match (&source.cert, &source.key) {
            (Some(cert), Some(key)) => {
                let read = |p: &PathBuf| {
                    std::fs::read_to_string(p).map_err(|source| StateError::Io {
                        path: p.clone(),
                        source,
                    })
                };
                let bundle = source.bundle.as_ref().map(read).transpose()?;
                let ca = CertificateAuthority::from_pem(
                    trust_domain,
                    &read(cert)?,
                    &read(key)?,
                    bundle.as_deref(),
                )?;
                tracing::info!(cert = %cert.display(), "using the operator-supplied CA");
                store.commit(ca_ops(&ca)).await?;
                ca
            }
            (None, None) => match Self::load_ca(&store, trust_domain).await? {
                Some(ca) => ca,
                None => {
                    let ca = CertificateAuthority::generate(trust_domain, source.validity)?;
                    let values = ca_ops(&ca)
                        .into_iter()
                        .filter_map(|op| match op {
                            Op::Put(k, v) => Some((k, v)),
                            Op::Delete(_) => None,
                        })
                        .collect();
                    if store.create(values).await? {
                        tracing::info!(pin = %ca.pin(), "created a new root CA");
                        ca
                    } else {
                        // Another replica created it first.
                        Self::load_ca(&store, trust_domain).await?.ok_or_else(|| {
                            StateError::Invalid("the CA vanished from the store".into())
                        })?
                    }
                }
            },
            _ => {
                return Err(StateError::Invalid(
                    "--ca-cert and --ca-key go together".into(),
                ))
            }
        };
        Ok(Self {
            store,
            trust_domain: trust_domain.to_string(),
            ca: RwLock::new(ca),
        })
    }

    async fn load_ca(
        store: &Store,
        trust_domain: &str,
    ) -> Result<Option<CertificateAuthority>, StateError> {
        let (cert, key, bundle) = (
            store.get(CA_CERT).await?,
            store.get(CA_KEY).await?,
            store.get(CA_BUNDLE).await?,
        );
        match (cert, key) {
            (Some(cert), Some(key)) => Ok(Some(CertificateAuthority::from_pem(
                trust_domain,
                &cert.value,
                &key.value,
                bundle.as_ref().map(|b| b.value.as_str()),
            )?)),
            _ => Ok(None),
        }
    }

    /// Reloads the CA from the store (after a change through another replica or a restore).
    /// Returns whether it differs from the cached one.
    pub async fn reload_ca(&self) -> Result<bool, StateError> {
        let Some(fresh) = Self::load_ca(&self.store, &self.trust_domain).await? else {
            return Ok(false);
        };
        let mut ca = self.ca.write().unwrap_or_else(|e| e.into_inner());
        let changed =
            ca.cert_file_pem() != fresh.cert_file_pem() || ca.bundle_pem() != fresh.bundle_pem();
        if changed {
            *ca = fresh;
        }
        Ok(changed)
    }

    /// The store behind the state.
    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    async fn save_ca(&self, extra: Vec<Op>) -> Result<(), StateError> {
        let mut ops = self.with_ca(ca_ops);
        ops.extend(extra);
        self.store.commit(ops).await?;
        Ok(())
    }

    /// Runs `f` with the CA.
    pub fn with_ca<T>(&self, f: impl FnOnce(&CertificateAuthority) -> T) -> T {
        f(&self.ca.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Creates a join token for `service.namespace` (service account defaults to the
    /// service) valid for `ttl`. Returns the token string (shown once) and its record.
    pub async fn create_token(
        &self,
        service: &str,
        namespace: &str,
        service_account: Option<&str>,
        ttl: Duration,
    ) -> Result<(String, TokenRecord), StateError> {
        check_name("service", service)?;
        check_name("namespace", namespace)?;
        let sa = service_account.unwrap_or(service);
        check_name("service account", sa)?;
        if ttl.is_zero() {
            return Err(StateError::Invalid("ttl must be positive".into()));
        }
        let token = JoinToken::generate(&self.with_ca(|ca| ca.pin()));
        let record = TokenRecord {
            id: token.id.clone(),
            secret_sha256: token.secret_hash(),
            service: service.into(),
            namespace: namespace.into(),
            service_account: sa.into(),
            created_at: now(),
            expires_at: now() + ttl.as_secs(),
            revoked: false,
        };
        self.store
            .commit(vec![Op::Put(
                format!("tokens/{}", record.id),
                json(&record),
            )])
            .await?;
        Ok((token.to_string(), record))
    }

    /// Every token record (no secrets).
    pub async fn tokens(&self) -> Result<Vec<TokenRecord>, StateError> {
        let (items, _) = self.store.list("tokens/").await?;
        let mut out: Vec<TokenRecord> = items
            .iter()
            .map(|(k, e)| parse(k, &e.value))
            .collect::<Result<_, _>>()?;
        out.sort_by_key(|t| t.created_at);
        Ok(out)
    }

    async fn token(&self, id: &str) -> Result<Option<TokenRecord>, StateError> {
        if !valid_id(id) {
            return Ok(None);
        }
        let key = format!("tokens/{id}");
        match self.store.get(&key).await? {
            Some(e) => Ok(Some(parse(&key, &e.value)?)),
            None => Ok(None),
        }
    }

    /// Revokes a token; certificates already issued stay valid until they expire.
    pub async fn revoke_token(&self, id: &str) -> Result<TokenRecord, StateError> {
        let mut rec = self
            .token(id)
            .await?
            .ok_or_else(|| StateError::Invalid(format!("no join token {id}")))?;
        rec.revoked = true;
        self.store
            .commit(vec![Op::Put(format!("tokens/{id}"), json(&rec))])
            .await?;
        Ok(rec)
    }

    /// The ledger record of `instance`, if any.
    pub async fn cert_record(&self, instance: &str) -> Result<Option<CertRecord>, StateError> {
        if !valid_id(instance) {
            return Ok(None);
        }
        let key = format!("certs/{instance}");
        match self.store.get(&key).await? {
            Some(e) => Ok(Some(parse(&key, &e.value)?)),
            None => Ok(None),
        }
    }

    /// For a renewal by certificate: the token `instance` joined with as `identity`, if that
    /// token has not been revoked.
    pub async fn renewal_token(
        &self,
        instance: &str,
        identity: &SpiffeId,
    ) -> Result<TokenRecord, TokenRefusal> {
        let unavailable = |e: StateError| TokenRefusal::Unavailable(e.to_string());
        let rec = self
            .cert_record(instance)
            .await
            .map_err(unavailable)?
            .filter(|r| r.identity == identity.to_string())
            .ok_or_else(|| {
                TokenRefusal::Unknown(format!(
                    "(no certificate on record for instance {instance})"
                ))
            })?;
        match self.token(&rec.token_id).await.map_err(unavailable)? {
            Some(t) if t.revoked => Err(TokenRefusal::Revoked(t.id.clone())),
            Some(t) => Ok(t),
            None => Err(TokenRefusal::Unknown(rec.token_id.clone())),
        }
    }

    /// The identity a presented token entitles its holder to, and the token's record.
    pub async fn check_token(&self, token: &str) -> Result<(SpiffeId, TokenRecord), TokenRefusal> {
        let token: JoinToken = token.parse().map_err(|_| TokenRefusal::Malformed)?;
        let rec = self
            .token(&token.id)
            .await
            .map_err(|e| TokenRefusal::Unavailable(e.to_string()))?
            .ok_or_else(|| TokenRefusal::Unknown(token.id.clone()))?;
        if !constant_time_eq(&rec.secret_sha256, &hash_secret(&token.secret)) {
            return Err(TokenRefusal::Unknown(token.id.clone()));
        }
        if rec.revoked {
            return Err(TokenRefusal::Revoked(rec.id.clone()));
        }
        if now() >= rec.expires_at {
            return Err(TokenRefusal::Expired(rec.id.clone()));
        }
        SpiffeId::new(&self.trust_domain, &rec.namespace, &rec.service_account)
            .map(|id| (id, rec))
            .map_err(|_| TokenRefusal::Malformed)
    }

    /// Signs a CSR for `allowed` and records it in the ledger under `instance`.
    pub async fn certify(
        &self,
        csr_pem: &str,
        allowed: &SpiffeId,
        ttl: Duration,
        instance: &str,
        address: &str,
        token_id: &str,
    ) -> Result<(Issued, String), StateError> {
        if !valid_id(instance) {
            return Err(StateError::Invalid(format!(
                "instance id {instance:?} must be 1-64 letters, digits, '-', '_' or '.'"
            )));
        }
        let (issued, bundle) = self.with_ca(|ca| {
            ca.sign_csr(csr_pem, allowed, ttl)
                .map(|i| (i, ca.bundle_pem()))
        })?;
        let count = self
            .cert_record(instance)
            .await?
            .map_or(0, |r| r.issued_count);
        let record = CertRecord {
            instance: instance.to_string(),
            identity: issued.id.to_string(),
            serial: issued.serial.clone(),
            not_after: issued.not_after,
            issued_at: now(),
            address: address.chars().take(128).collect(),
            issued_count: count + 1,
            token_id: token_id.to_string(),
        };
        self.store
            .commit(vec![Op::Put(format!("certs/{instance}"), json(&record))])
            .await?;
        Ok((issued, bundle))
    }

    /// The ledger of issued certificates. Instances whose last certificate expired more than
    /// a day ago are forgotten here.
    pub async fn certs(&self) -> Result<Vec<CertRecord>, StateError> {
        let (items, _) = self.store.list("certs/").await?;
        let t = now();
        let mut out = Vec::new();
        let mut stale = Vec::new();
        for (k, e) in items {
            let rec: CertRecord = parse(&k, &e.value)?;
            if rec.not_after + 86_400 > t {
                out.push(rec);
            } else {
                stale.push(Op::Delete(k));
            }
        }
        if !stale.is_empty() {
            self.store.commit(stale).await?;
        }
        Ok(out)
    }

    /// The rotation phase.
    pub async fn rotation_phase(&self) -> Result<RotationPhase, StateError> {
        Ok(match self.store.get(CA_ROTATION).await? {
            Some(e) => parse::<RotationFile>(CA_ROTATION, &e.value)?.phase,
            None => RotationPhase::Idle,
        })
    }

    fn phase_op(phase: RotationPhase) -> Op {
        Op::Put(CA_ROTATION.into(), json(&RotationFile { phase }))
    }

    /// Moves a CA rotation one step:
    /// `prepare` creates a new root and trusts it beside the current one (proxies learn the
    /// new bundle as they renew); `activate` makes the new root sign (wait one workload
    /// certificate lifetime after `prepare`); `finish` stops trusting the old root (wait one
    /// lifetime after `activate`).
    pub async fn rotate(
        &self,
        step: &str,
        validity: Duration,
    ) -> Result<RotationPhase, StateError> {
        let phase = self.rotation_phase().await?;
        match (step, phase) {
            ("prepare", RotationPhase::Idle) => {
                let next = CertificateAuthority::generate(&self.trust_domain, validity)?;
                self.ca
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .trust_also(next.bundle());
                self.save_ca(vec![
                    Op::Put(CA_NEXT_KEY.into(), next.key_pem().to_string()),
                    Op::Put(CA_NEXT_CERT.into(), next.cert_file_pem()),
                    Self::phase_op(RotationPhase::Prepared),
                ])
                .await?;
                Ok(RotationPhase::Prepared)
            }
            ("activate", RotationPhase::Prepared) => {
                let get = |k: &'static str| async move {
                    self.store
                        .get(k)
                        .await?
                        .map(|e| e.value)
                        .ok_or_else(|| StateError::Invalid(format!("{k} is missing")))
                };
                let mut next = CertificateAuthority::from_pem(
                    &self.trust_domain,
                    &get(CA_NEXT_CERT).await?,
                    &get(CA_NEXT_KEY).await?,
                    None,
                )?;
                {
                    let mut ca = self.ca.write().unwrap_or_else(|e| e.into_inner());
                    next.trust_also(ca.bundle());
                    *ca = next;
                }
                self.save_ca(vec![
                    Op::Delete(CA_NEXT_CERT.into()),
                    Op::Delete(CA_NEXT_KEY.into()),
                    Self::phase_op(RotationPhase::Activated),
                ])
                .await?;
                Ok(RotationPhase::Activated)
            }
            ("finish", RotationPhase::Activated) => {
                {
                    let mut ca = self.ca.write().unwrap_or_else(|e| e.into_inner());
                    let old: Vec<_> = ca.bundle().iter().skip(1).cloned().collect();
                    for root in old {
                        ca.distrust(&root);
                    }
                }
                self.save_ca(vec![Self::phase_op(RotationPhase::Idle)])
                    .await?;
                Ok(RotationPhase::Idle)
            }
            (step, phase) => Err(StateError::Invalid(format!(
                "cannot {step} a CA rotation in phase {phase:?} (order: prepare, activate, finish)"
            ))),
        }
    }
}

/// Why a join token was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TokenRefusal {
    /// Not a token at all.
    #[error("malformed join token")]
    Malformed,
    /// Unknown id or wrong secret (not told apart, to give nothing away).
    #[error("join token {0} is not known here")]
    Unknown(String),
    /// Revoked by an operator.
    #[error("join token {0} was revoked")]
    Revoked(String),
    /// Past its expiry.
    #[error("join token {0} has expired")]
    Expired(String),
    /// The store could not be asked.
    #[error("the control plane's store is unavailable: {0}")]
    Unavailable(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn open(dir: &std::path::Path) -> State {
        let store = Arc::new(Store::open("embedded", dir).await.unwrap());
        State::open(
            store,
            "cluster.local",
            &CaSource {
                validity: Duration::from_secs(86400 * 365),
                ..Default::default()
            },
        )
        .await
        .unwrap()
    }

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("trellis-state-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[tokio::test]
    async fn ca_and_tokens_survive_a_restart_and_secrets_are_not_stored() {
        let dir = tmp("restart");
        let (token, rec, pin) = {
            let s = open(&dir).await;
            let (t, r) = s
                .create_token("frontend", "edtech", None, Duration::from_secs(3600))
                .await
                .unwrap();
            (t, r, s.with_ca(|c| c.pin()))
        };
        let s = open(&dir).await;
        assert_eq!(s.with_ca(|c| c.pin()), pin);
        assert_eq!(
            s.check_token(&token).await.unwrap().0.to_string(),
            "spiffe://cluster.local/ns/edtech/sa/frontend"
        );
        assert_eq!(s.tokens().await.unwrap()[0].id, rec.id);
        assert!(!std::fs::read_to_string(dir.join("store.json"))
            .unwrap()
            .contains(token.split('.').nth(2).unwrap()));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn revoked_expired_and_forged_tokens_are_refused() {
        let dir = tmp("refuse");
        let s = open(&dir).await;
        let (t, rec) = s
            .create_token("a", "b", Some("c"), Duration::from_secs(3600))
            .await
            .unwrap();
        assert_eq!(s.check_token(&t).await.unwrap().0.service_account, "c");
        let forged = t.replace(&t.split('.').nth(2).unwrap().to_string(), "AAAA");
        assert_eq!(
            s.check_token(&forged).await.unwrap_err(),
            TokenRefusal::Unknown(rec.id.clone())
        );
        s.revoke_token(&rec.id).await.unwrap();
        assert_eq!(
            s.check_token(&t).await.unwrap_err(),
            TokenRefusal::Revoked(rec.id.clone())
        );
        assert_eq!(
            s.check_token("nonsense").await.unwrap_err(),
            TokenRefusal::Malformed
        );
        assert!(s
            .create_token("Bad_Name", "b", None, Duration::from_secs(1))
            .await
            .is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn rotation_goes_prepare_activate_finish() {
        let dir = tmp("rotate");
        let s = open(&dir).await;
        let pin0 = s.with_ca(|c| c.pin());
        assert!(s
            .rotate("activate", Duration::from_secs(1000))
            .await
            .is_err());
        s.rotate("prepare", Duration::from_secs(86400))
            .await
            .unwrap();
        assert_eq!(
            s.with_ca(|c| (c.pin(), c.bundle().len())),
            (pin0.clone(), 2)
        );
        s.rotate("activate", Duration::from_secs(86400))
            .await
            .unwrap();
        let pin1 = s.with_ca(|c| c.pin());
        assert_ne!(pin1, pin0);
        assert_eq!(s.with_ca(|c| c.bundle().len()), 2);
        // The stored state follows.
        assert_eq!(
            open(&dir).await.with_ca(|c| (c.pin(), c.bundle().len())),
            (pin1.clone(), 2)
        );
        s.rotate("finish", Duration::from_secs(86400))
            .await
            .unwrap();
        assert_eq!(s.with_ca(|c| c.bundle().len()), 1);
        assert_eq!(s.rotation_phase().await.unwrap(), RotationPhase::Idle);
        let _ = std::fs::remove_dir_all(&dir);
    }
}

//! The control plane's durable state in its state directory (the embedded store): CA
//! material, the trust bundle, join tokens and the ledger of issued certificates.
//!
//! Files are small JSON/PEM documents written atomically (write to a temporary file, fsync,
//! rename). Key files are created with mode 0600.

use serde::{Deserialize, Serialize};
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use trellis_identity::ca::{CaError, Issued};
use trellis_identity::token::{constant_time_eq, hash_secret, JoinToken};
use trellis_identity::{CertificateAuthority, SpiffeId};

/// Why the state could not be read, written or used.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// File system trouble.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A state file is corrupt.
    #[error("{path}: {message}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
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

/// The state directory and what is loaded from it.
pub struct State {
    dir: PathBuf,
    trust_domain: String,
    ca: RwLock<CertificateAuthority>,
    tokens: Mutex<Vec<TokenRecord>>,
    ledger: Mutex<Vec<CertRecord>>,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StateError + '_ {
    move |source| StateError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes a file atomically; `secret` files get mode 0600.
pub(crate) fn write_atomic(path: &Path, data: &[u8], secret: bool) -> Result<(), StateError> {
    let tmp = path.with_extension("tmp");
    {
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        if secret {
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp).map_err(io_err(&tmp))?;
        f.write_all(data).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
    }
    fs::rename(&tmp, path).map_err(io_err(path))
}

fn read_opt(path: &Path) -> Result<Option<String>, StateError> {
    match fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(StateError::Io {
            path: path.to_path_buf(),
            source: e,
        }),
    }
}

fn read_json<T: for<'de> Deserialize<'de> + Default>(path: &Path) -> Result<T, StateError> {
    match read_opt(path)? {
        None => Ok(T::default()),
        Some(s) => serde_json::from_str(&s).map_err(|e| StateError::Corrupt {
            path: path.to_path_buf(),
            message: e.to_string(),
        }),
    }
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

impl State {
    /// Opens (creating if needed) the state in `dir`: loads the CA or creates/imports one.
    pub fn open(dir: &Path, trust_domain: &str, source: &CaSource) -> Result<Self, StateError> {
        fs::create_dir_all(dir).map_err(io_err(dir))?;
        let (cert_path, key_path, bundle_path) = (
            dir.join("ca.pem"),
            dir.join("ca-key.pem"),
            dir.join("bundle.pem"),
        );
        let ca = match (&source.cert, &source.key) {
            (Some(cert), Some(key)) => {
                let read = |p: &PathBuf| fs::read_to_string(p).map_err(io_err(p));
                let bundle = source.bundle.as_ref().map(read).transpose()?;
                let ca = CertificateAuthority::from_pem(
                    trust_domain,
                    &read(cert)?,
                    &read(key)?,
                    bundle.as_deref(),
                )?;
                tracing::info!(cert = %cert.display(), "using the operator-supplied CA");
                ca
            }
            (None, None) => match (read_opt(&cert_path)?, read_opt(&key_path)?) {
                (Some(cert), Some(key)) => {
                    let bundle = read_opt(&bundle_path)?;
                    CertificateAuthority::from_pem(trust_domain, &cert, &key, bundle.as_deref())?
                }
                _ => {
                    let ca = CertificateAuthority::generate(trust_domain, source.validity)?;
                    tracing::info!(pin = %ca.pin(), "created a new root CA");
                    ca
                }
            },
            _ => {
                return Err(StateError::Invalid(
                    "--ca-cert and --ca-key go together".into(),
                ))
            }
        };
        let state = Self {
            dir: dir.to_path_buf(),
            trust_domain: trust_domain.to_string(),
            ca: RwLock::new(ca),
            tokens: Mutex::new(read_json(&dir.join("tokens.json"))?),
            ledger: Mutex::new(read_json(&dir.join("certs.json"))?),
        };
        state.save_ca()?;
        Ok(state)
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    fn save_ca(&self) -> Result<(), StateError> {
        let ca = self.ca.read().unwrap_or_else(|e| e.into_inner());
        write_atomic(&self.dir.join("ca-key.pem"), ca.key_pem().as_bytes(), true)?;
        write_atomic(
            &self.dir.join("ca.pem"),
            ca.cert_file_pem().as_bytes(),
            false,
        )?;
        write_atomic(
            &self.dir.join("bundle.pem"),
            ca.bundle_pem().as_bytes(),
            false,
        )
    }

    /// Runs `f` with the CA.
    pub fn with_ca<T>(&self, f: impl FnOnce(&CertificateAuthority) -> T) -> T {
        f(&self.ca.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Creates a join token for `service.namespace` (service account defaults to the
    /// service) valid for `ttl`. Returns the token string (shown once) and its record.
    pub fn create_token(
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
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        tokens.push(record.clone());
        self.save_tokens(&tokens)?;
        Ok((token.to_string(), record))
    }

    fn save_tokens(&self, tokens: &[TokenRecord]) -> Result<(), StateError> {
        let json = serde_json::to_vec_pretty(tokens).unwrap_or_default();
        write_atomic(&self.dir.join("tokens.json"), &json, true)
    }

    /// Every token record (no secrets).
    pub fn tokens(&self) -> Vec<TokenRecord> {
        self.tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Revokes a token; certificates already issued stay valid until they expire.
    pub fn revoke_token(&self, id: &str) -> Result<TokenRecord, StateError> {
        let mut tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        let rec = tokens
            .iter_mut()
            .find(|t| t.id == id)
            .ok_or_else(|| StateError::Invalid(format!("no join token {id}")))?;
        rec.revoked = true;
        let rec = rec.clone();
        self.save_tokens(&tokens)?;
        Ok(rec)
    }

    /// For a renewal by certificate: the token `instance` joined with as `identity`, if that
    /// token has not been revoked.
    pub fn renewal_token(
        &self,
        instance: &str,
        identity: &SpiffeId,
    ) -> Result<String, TokenRefusal> {
        let ledger = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
        let rec = ledger
            .iter()
            .find(|r| r.instance == instance && r.identity == identity.to_string())
            .ok_or_else(|| {
                TokenRefusal::Unknown(format!(
                    "(no certificate on record for instance {instance})"
                ))
            })?;
        let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        match tokens.iter().find(|t| t.id == rec.token_id) {
            Some(t) if t.revoked => Err(TokenRefusal::Revoked(t.id.clone())),
            Some(t) => Ok(t.id.clone()),
            None => Err(TokenRefusal::Unknown(rec.token_id.clone())),
        }
    }

    /// The identity a presented token entitles its holder to, and the token's id.
    pub fn check_token(&self, token: &str) -> Result<(SpiffeId, String), TokenRefusal> {
        let token: JoinToken = token.parse().map_err(|_| TokenRefusal::Malformed)?;
        let tokens = self.tokens.lock().unwrap_or_else(|e| e.into_inner());
        let rec = tokens
            .iter()
            .find(|t| t.id == token.id)
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
            .map(|id| (id, rec.id.clone()))
            .map_err(|_| TokenRefusal::Malformed)
    }

    /// Signs a CSR for `allowed` and records it in the ledger under `instance`.
    pub fn certify(
        &self,
        csr_pem: &str,
        allowed: &SpiffeId,
        ttl: Duration,
        instance: &str,
        address: &str,
        token_id: &str,
    ) -> Result<(Issued, String), StateError> {
        let (issued, bundle) = self.with_ca(|ca| {
            ca.sign_csr(csr_pem, allowed, ttl)
                .map(|i| (i, ca.bundle_pem()))
        })?;
        let mut ledger = self.ledger.lock().unwrap_or_else(|e| e.into_inner());
        let t = now();
        // Forget instances whose last certificate expired more than a day ago.
        ledger.retain(|r| r.not_after + 86_400 > t);
        let count = ledger
            .iter()
            .find(|r| r.instance == instance)
            .map_or(0, |r| r.issued_count);
        ledger.retain(|r| r.instance != instance);
        ledger.push(CertRecord {
            instance: instance.chars().take(64).collect(),
            identity: issued.id.to_string(),
            serial: issued.serial.clone(),
            not_after: issued.not_after,
            issued_at: t,
            address: address.chars().take(128).collect(),
            issued_count: count + 1,
            token_id: token_id.to_string(),
        });
        let json = serde_json::to_vec_pretty(&*ledger).unwrap_or_default();
        write_atomic(&self.dir.join("certs.json"), &json, false)?;
        Ok((issued, bundle))
    }

    /// The ledger of issued certificates.
    pub fn certs(&self) -> Vec<CertRecord> {
        self.ledger
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The rotation phase.
    pub fn rotation_phase(&self) -> RotationPhase {
        read_opt(&self.dir.join("rotation.json"))
            .ok()
            .flatten()
            .and_then(|s| serde_json::from_str::<RotationFile>(&s).ok())
            .map_or(RotationPhase::Idle, |r| r.phase)
    }

    fn set_phase(&self, phase: RotationPhase) -> Result<(), StateError> {
        let json = serde_json::to_vec(&RotationFile { phase }).unwrap_or_default();
        write_atomic(&self.dir.join("rotation.json"), &json, false)
    }

    /// Moves a CA rotation one step:
    /// `prepare` creates a new root and trusts it beside the current one (proxies learn the
    /// new bundle as they renew); `activate` makes the new root sign (wait one workload
    /// certificate lifetime after `prepare`); `finish` stops trusting the old root (wait one
    /// lifetime after `activate`).
    pub fn rotate(&self, step: &str, validity: Duration) -> Result<RotationPhase, StateError> {
        let phase = self.rotation_phase();
        let next_cert = self.dir.join("ca-next.pem");
        let next_key = self.dir.join("ca-next-key.pem");
        match (step, phase) {
            ("prepare", RotationPhase::Idle) => {
                let next = CertificateAuthority::generate(&self.trust_domain, validity)?;
                write_atomic(&next_key, next.key_pem().as_bytes(), true)?;
                write_atomic(&next_cert, next.cert_file_pem().as_bytes(), false)?;
                self.ca
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .trust_also(next.bundle());
                self.save_ca()?;
                self.set_phase(RotationPhase::Prepared)?;
                Ok(RotationPhase::Prepared)
            }
            ("activate", RotationPhase::Prepared) => {
                let read = |p: &PathBuf| fs::read_to_string(p).map_err(io_err(p));
                let mut next = CertificateAuthority::from_pem(
                    &self.trust_domain,
                    &read(&next_cert)?,
                    &read(&next_key)?,
                    None,
                )?;
                {
                    let mut ca = self.ca.write().unwrap_or_else(|e| e.into_inner());
                    next.trust_also(ca.bundle());
                    *ca = next;
                }
                self.save_ca()?;
                let _ = fs::remove_file(&next_cert);
                let _ = fs::remove_file(&next_key);
                self.set_phase(RotationPhase::Activated)?;
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
                self.save_ca()?;
                self.set_phase(RotationPhase::Idle)?;
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
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> State {
        State::open(
            dir,
            "cluster.local",
            &CaSource {
                validity: Duration::from_secs(86400 * 365),
                ..Default::default()
            },
        )
        .unwrap()
    }

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("trellis-state-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn ca_and_tokens_survive_a_restart_and_keys_are_private() {
        let dir = tmp("restart");
        let (token, rec) = {
            let s = open(&dir);
            s.create_token("frontend", "edtech", None, Duration::from_secs(3600))
                .unwrap()
        };
        let s = open(&dir);
        assert_eq!(
            s.check_token(&token).unwrap().0.to_string(),
            "spiffe://cluster.local/ns/edtech/sa/frontend"
        );
        assert_eq!(s.tokens()[0].id, rec.id);
        assert!(!fs::read_to_string(dir.join("tokens.json"))
            .unwrap()
            .contains(token.split('.').nth(2).unwrap()));
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.join("ca-key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn revoked_expired_and_forged_tokens_are_refused() {
        let dir = tmp("refuse");
        let s = open(&dir);
        let (t, rec) = s
            .create_token("a", "b", Some("c"), Duration::from_secs(3600))
            .unwrap();
        assert_eq!(s.check_token(&t).unwrap().0.service_account, "c");
        let forged = t.replace(&t.split('.').nth(2).unwrap().to_string(), "AAAA");
        assert_eq!(
            s.check_token(&forged),
            Err(TokenRefusal::Unknown(rec.id.clone()))
        );
        s.revoke_token(&rec.id).unwrap();
        assert_eq!(
            s.check_token(&t),
            Err(TokenRefusal::Revoked(rec.id.clone()))
        );
        assert_eq!(s.check_token("nonsense"), Err(TokenRefusal::Malformed));
        assert!(s
            .create_token("Bad_Name", "b", None, Duration::from_secs(1))
            .is_err());
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn rotation_goes_prepare_activate_finish() {
        let dir = tmp("rotate");
        let s = open(&dir);
        let pin0 = s.with_ca(|c| c.pin());
        assert!(s.rotate("activate", Duration::from_secs(1000)).is_err());
        s.rotate("prepare", Duration::from_secs(86400)).unwrap();
        assert_eq!(
            s.with_ca(|c| (c.pin(), c.bundle().len())),
            (pin0.clone(), 2)
        );
        s.rotate("activate", Duration::from_secs(86400)).unwrap();
        let pin1 = s.with_ca(|c| c.pin());
        assert_ne!(pin1, pin0);
        assert_eq!(s.with_ca(|c| c.bundle().len()), 2);
        // The state on disk follows.
        assert_eq!(
            open(&dir).with_ca(|c| (c.pin(), c.bundle().len())),
            (pin1.clone(), 2)
        );
        s.rotate("finish", Duration::from_secs(86400)).unwrap();
        assert_eq!(s.with_ca(|c| c.bundle().len()), 1);
        assert_eq!(s.rotation_phase(), RotationPhase::Idle);
        let _ = fs::remove_dir_all(&dir);
    }
}

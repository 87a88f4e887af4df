//! JSON Web Key Sets: parsing a JWKS into verification keys, and [`JwksCache`], which keeps
//! the key set of every `jwksUri` fresh in the background.
//!
//! Only asymmetric keys are kept: RSA (RS256/384/512, PS256/384/512), EC P-256 (ES256),
//! EC P-384 (ES384) and OKP Ed25519 (EdDSA). Symmetric (`oct`) keys, encryption keys
//! (`use: enc`) and other curves are skipped, so a token can never be checked as an HMAC over
//! a public key. A key's `alg`, when given, narrows it to that one algorithm; RSA moduli
//! must have 2048 to 4096 bits.
//!
//! Remote sets are fetched once when first needed, then every refresh interval
//! ([`JwksSettings`], by default [`JWKS_REFRESH_INTERVAL`]); a failed fetch is retried with
//! exponential backoff (1 s doubling to 60 s, capped at the refresh interval) and the last good
//! keys stay in use meanwhile. A token whose `kid` is not in the set asks for an early refetch
//! (at most every minimum refetch interval, by default [`JWKS_MIN_REFETCH_INTERVAL`]), so a
//! rotated-in key is picked up without waiting for the refresh. How a document is fetched
//! (`http://`, `https://`, `file://`) is in [`super::fetch`].

use arc_swap::ArcSwapOption;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde_json::Value;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::Notify;

use super::fetch::{Fetcher, JwksSource};

/// How often a fetched JWKS is fetched again (Envoy caches remote JWKS for 5 minutes, Istio's
/// control plane refreshes every 20; 10 minutes picks up rotations well inside an IdP's usual
/// overlap of old and new keys).
pub const JWKS_REFRESH_INTERVAL: Duration = Duration::from_secs(600);

/// How long one fetch may take, unless the rule's `timeout` says otherwise (Istio's default).
pub const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(5);

/// First delay before retrying a failed fetch; doubles up to [`RETRY_MAX`].
const RETRY_INITIAL: Duration = Duration::from_secs(1);
/// Longest delay between retries of a failing fetch.
const RETRY_MAX: Duration = Duration::from_secs(60);
/// Least time between two fetches of one URI asked for by tokens with an unknown `kid`, unless
/// the bootstrap's `jwks.min_refetch_interval` says otherwise.
pub const JWKS_MIN_REFETCH_INTERVAL: Duration = Duration::from_secs(30);

/// The algorithms a key type can verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KeyType {
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl KeyType {
    fn algorithms(self) -> &'static [Algorithm] {
        use Algorithm::*;
        match self {
            KeyType::Rsa => &[RS256, RS384, RS512, PS256, PS384, PS512],
            KeyType::P256 => &[ES256],
            KeyType::P384 => &[ES384],
            KeyType::Ed25519 => &[EdDSA],
        }
    }
}

/// One public key of a JWKS.
pub(super) struct Key {
    kid: Option<String>,
    key_type: KeyType,
    /// The JWK's `alg`, when it names one.
    alg: Option<Algorithm>,
    decoding: DecodingKey,
}

impl Key {
    /// Whether this key may verify a token signed with `alg` naming `kid`: the algorithm fits
    /// the key type (and the key's own `alg`), and the ids are equal or the key has none.
    fn accepts(&self, kid: Option<&str>, alg: Algorithm) -> bool {
        self.key_type.algorithms().contains(&alg)
            && self.alg.is_none_or(|a| a == alg)
            && match (kid, &self.kid) {
                (Some(want), Some(have)) => want == have,
                _ => true,
            }
    }

    /// Checks `signature` (base64url, as in the token) over `signing_input`.
    pub(super) fn verifies(&self, signature: &str, signing_input: &[u8], alg: Algorithm) -> bool {
        // `accepts` guarantees an asymmetric algorithm of this key's family; jsonwebtoken
        // would treat an HMAC algorithm's key as a secret, so never reach it with one.
        self.key_type.algorithms().contains(&alg)
            && jsonwebtoken::crypto::verify(signature, signing_input, &self.decoding, alg)
                .unwrap_or(false)
    }
}

/// The usable keys of one JWKS document.
#[derive(Default)]
pub(super) struct KeySet {
    keys: Vec<Key>,
}

impl KeySet {
    /// Parses a JWKS (`{"keys": [...]}`). Keys of unsupported types are skipped; a document
    /// that is not a JWKS, or whose keys are all unusable, is an error.
    pub(super) fn parse(json: &str) -> Result<KeySet, String> {
        let doc: Value = serde_json::from_str(json).map_err(|e| format!("not JSON: {e}"))?;
        let listed = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or("not a JWKS: no \"keys\" array")?;
        let mut keys = Vec::new();
        let mut skipped = Vec::new();
        for (i, jwk) in listed.iter().enumerate() {
            match parse_jwk(jwk) {
                Ok(key) => keys.push(key),
                Err(why) => skipped.push(format!("keys[{i}]: {why}")),
            }
        }
        if keys.is_empty() && !skipped.is_empty() {
            return Err(format!("no usable key ({})", skipped.join("; ")));
        }
        if !skipped.is_empty() {
            tracing::debug!(skipped = %skipped.join("; "), "JWKS keys skipped");
        }
        Ok(KeySet { keys })
    }

    /// The keys that may verify a token with `alg` and `kid`.
    pub(super) fn candidates<'a>(
        &'a self,
        kid: Option<&'a str>,
        alg: Algorithm,
    ) -> impl Iterator<Item = &'a Key> + 'a {
        self.keys.iter().filter(move |k| k.accepts(kid, alg))
    }

    /// How many keys the set holds.
    pub(super) fn len(&self) -> usize {
        self.keys.len()
    }
}

/// Smallest RSA modulus accepted (NIST SP 800-57; ring's verifier has the same floor).
const RSA_MIN_BITS: usize = 2048;
/// Largest RSA modulus the verifier handles.
const RSA_MAX_BITS: usize = 4096;

/// The bit length of a big-endian unsigned integer.
fn modulus_bits(be: &[u8]) -> usize {
    match be.iter().position(|&b| b != 0) {
        Some(i) => (be.len() - i) * 8 - be[i].leading_zeros() as usize,
        None => 0,
    }
}

fn str_field<'a>(jwk: &'a Value, name: &str) -> Result<&'a str, String> {
    jwk.get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| format!("no {name:?}"))
}

/// A base64url field that must decode to exactly `len` bytes.
fn sized_field<'a>(jwk: &'a Value, name: &str, len: usize) -> Result<&'a str, String> {
    let text = str_field(jwk, name)?;
    match URL_SAFE_NO_PAD.decode(text) {
        Ok(bytes) if bytes.len() == len => Ok(text),
        Ok(bytes) => Err(format!("{name:?} is {} bytes, want {len}", bytes.len())),
        Err(_) => Err(format!("{name:?} is not base64url")),
    }
}

fn parse_jwk(jwk: &Value) -> Result<Key, String> {
    if jwk
        .get("use")
        .and_then(Value::as_str)
        .is_some_and(|u| u != "sig")
    {
        return Err("not a signature key (\"use\")".into());
    }
    let kty = str_field(jwk, "kty")?;
    let crv = jwk.get("crv").and_then(Value::as_str);
    let (key_type, decoding) = match (kty, crv) {
        ("RSA", _) => {
            let (n, e) = (str_field(jwk, "n")?, str_field(jwk, "e")?);
            let modulus = URL_SAFE_NO_PAD
                .decode(n)
                .map_err(|_| "\"n\" is not base64url")?;
            let bits = modulus_bits(&modulus);
            if !(RSA_MIN_BITS..=RSA_MAX_BITS).contains(&bits) {
                return Err(format!(
                    "RSA modulus of {bits} bits (want {RSA_MIN_BITS} to {RSA_MAX_BITS})"
                ));
            }
            let key =
                DecodingKey::from_rsa_components(n, e).map_err(|_| "\"e\" is not base64url")?;
            (KeyType::Rsa, key)
        }
        ("EC", Some("P-256")) | ("EC", Some("P-384")) => {
            let (key_type, len) = match crv {
                Some("P-256") => (KeyType::P256, 32),
                _ => (KeyType::P384, 48),
            };
            let (x, y) = (sized_field(jwk, "x", len)?, sized_field(jwk, "y", len)?);
            let key = DecodingKey::from_ec_components(x, y).map_err(|e| e.to_string())?;
            (key_type, key)
        }
        ("OKP", Some("Ed25519")) => {
            let key = DecodingKey::from_ed_components(sized_field(jwk, "x", 32)?)
                .map_err(|e| e.to_string())?;
            (KeyType::Ed25519, key)
        }
        ("EC", _) | ("OKP", _) => return Err(format!("unsupported curve {crv:?}")),
        (other, _) => return Err(format!("unsupported key type {other:?}")),
    };
    let alg = match jwk.get("alg").and_then(Value::as_str) {
        None => None,
        Some(name) => match asymmetric_algorithm(name) {
            Some(a) if key_type.algorithms().contains(&a) => Some(a),
            _ => return Err(format!("\"alg\" {name:?} does not fit key type {kty}")),
        },
    };
    let kid = match jwk.get("kid") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => return Err("\"kid\" is not a string".into()),
    };
    Ok(Key {
        kid,
        key_type,
        alg,
        decoding,
    })
}

/// The algorithm a JOSE `alg` names, if it is one this proxy verifies: never `none`, never an
/// HMAC.
pub(super) fn asymmetric_algorithm(name: &str) -> Option<Algorithm> {
    use Algorithm::*;
    Some(match name {
        "RS256" => RS256,
        "RS384" => RS384,
        "RS512" => RS512,
        "PS256" => PS256,
        "PS384" => PS384,
        "PS512" => PS512,
        "ES256" => ES256,
        "ES384" => ES384,
        "EdDSA" => EdDSA,
        _ => return None,
    })
}

/// What a [`JwksCache`] knows about one URI, for status pages and tests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct JwksStatus {
    /// Keys in the set in use; `None` until a fetch has succeeded.
    pub keys: Option<usize>,
    /// When the last successful fetch finished.
    pub last_success: Option<SystemTime>,
    /// Failed fetches since the last success.
    pub consecutive_failures: u32,
    /// Why the last fetch failed, while it is failing.
    pub last_error: Option<String>,
}

/// The live key set of one URI, shared by every compiled rule that names it. Its refresh task
/// holds only a weak reference and stops once the last rule using it is dropped.
pub(super) struct JwksSlot {
    keys: ArcSwapOption<KeySet>,
    status: Mutex<JwksStatus>,
    last_attempt: Mutex<Option<Instant>>,
    early_gap: Duration,
    wake: Arc<Notify>,
}

impl JwksSlot {
    /// The keys, once fetched.
    pub(super) fn keys(&self) -> Option<Arc<KeySet>> {
        self.keys.load_full()
    }

    /// Asks for an early refetch (a token named a `kid` the set lacks), at most once per
    /// minimum refetch interval ([`JwksSettings::min_refetch_interval`]).
    pub(super) fn request_refresh(&self) {
        let Ok(mut last) = self.last_attempt.lock() else {
            return;
        };
        if last.is_none_or(|t| t.elapsed() >= self.early_gap) {
            *last = Some(Instant::now());
            self.wake.notify_one();
        }
    }

    fn record(&self, result: Result<KeySet, String>) -> bool {
        let ok = result.is_ok();
        let mut status = self.status.lock().unwrap_or_else(|p| p.into_inner());
        match result {
            Ok(set) => {
                status.keys = Some(set.len());
                status.last_success = Some(SystemTime::now());
                status.consecutive_failures = 0;
                status.last_error = None;
                self.keys.store(Some(Arc::new(set)));
            }
            Err(e) => {
                status.consecutive_failures = status.consecutive_failures.saturating_add(1);
                status.last_error = Some(e);
            }
        }
        ok
    }
}

impl Drop for JwksSlot {
    fn drop(&mut self) {
        // Wake the refresh task so it sees the slot is gone and ends.
        self.wake.notify_one();
    }
}

/// The key sets of every `jwksUri` in use, fetched and refreshed in the background; shared
/// across config versions so a new config reuses keys already fetched.
///
/// `connect_to` sends every `http://` fetch to that address first instead of the URI's host:
/// in the mesh, the proxy's own outbound listener, so the fetch is routed, balanced and mTLS'd
/// like any other request of the workload (the request carries the absolute URI, as to a
/// forward proxy); a host the mesh does not know is then fetched directly. Without it the
/// proxy connects to the host directly. `https://` fetches always go directly to the host,
/// verified against the system's trust store. Create it within a Tokio runtime: refresh tasks
/// are spawned on that runtime.
#[derive(Clone)]
pub struct JwksCache {
    inner: Arc<CacheInner>,
}

struct CacheInner {
    slots: Mutex<HashMap<String, Weak<JwksSlot>>>,
    fetcher: Fetcher,
    refresh: Duration,
    min_refetch: Duration,
    runtime: Option<tokio::runtime::Handle>,
}

/// How often a [`JwksCache`] refetches key sets (the bootstrap's `jwks` section).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JwksSettings {
    /// Time between two scheduled fetches of a key set; retries of a failing fetch back off
    /// up to the same bound.
    pub refresh_interval: Duration,
    /// Least time between two early fetches asked for by tokens naming an unknown `kid`.
    pub min_refetch_interval: Duration,
}

impl Default for JwksSettings {
    fn default() -> Self {
        JwksSettings {
            refresh_interval: JWKS_REFRESH_INTERVAL,
            min_refetch_interval: JWKS_MIN_REFETCH_INTERVAL,
        }
    }
}

impl JwksCache {
    /// A cache with the default [`JwksSettings`].
    pub fn new(connect_to: Option<SocketAddr>) -> Self {
        Self::with_settings(connect_to, JwksSettings::default())
    }

    /// A cache refetching as `settings` say. The bootstrap validates the intervals (at least
    /// 1 s); here they are only floored at 10 ms, and the early-refetch gap is capped at the
    /// refresh interval.
    pub fn with_settings(connect_to: Option<SocketAddr>, settings: JwksSettings) -> Self {
        let refresh = settings.refresh_interval.max(Duration::from_millis(10));
        JwksCache {
            inner: Arc::new(CacheInner {
                slots: Mutex::new(HashMap::new()),
                fetcher: Fetcher::new(connect_to),
                refresh,
                min_refetch: settings.min_refetch_interval.min(refresh),
                runtime: tokio::runtime::Handle::try_current().ok(),
            }),
        }
    }

    /// The state of `uri`'s key set, if a compiled config uses it.
    pub fn status(&self, uri: &str) -> Option<JwksStatus> {
        let slots = self.inner.slots.lock().ok()?;
        let slot = slots.get(uri)?.upgrade()?;
        let status = slot.status.lock().ok()?.clone();
        Some(status)
    }

    /// The slot of `uri`, starting its refresh task if no live config uses it yet.
    pub(super) fn subscribe(&self, uri: &str, timeout: Duration) -> Result<Arc<JwksSlot>, String> {
        let source = JwksSource::parse(uri)?;
        let mut slots = self
            .inner
            .slots
            .lock()
            .map_err(|_| "JWKS cache lock poisoned".to_string())?;
        if let Some(slot) = slots.get(uri).and_then(Weak::upgrade) {
            return Ok(slot);
        }
        let runtime = self
            .inner
            .runtime
            .as_ref()
            .ok_or("no async runtime to fetch JWKS on (JwksCache created outside Tokio)")?;
        let wake = Arc::new(Notify::new());
        let slot = Arc::new(JwksSlot {
            keys: ArcSwapOption::empty(),
            status: Mutex::new(JwksStatus::default()),
            last_attempt: Mutex::new(None),
            early_gap: self.inner.min_refetch,
            wake: wake.clone(),
        });
        slots.retain(|_, w| w.strong_count() > 0);
        slots.insert(uri.to_string(), Arc::downgrade(&slot));
        runtime.spawn(refresh_forever(
            uri.to_string(),
            source,
            Arc::downgrade(&slot),
            wake,
            self.inner.fetcher.clone(),
            self.inner.refresh,
            timeout,
        ));
        Ok(slot)
    }
}

/// Fetches `source` into `slot` until the slot is dropped: every `refresh` after a success,
/// with backoff after a failure, and early when a token asks for it.
async fn refresh_forever(
    uri: String,
    source: JwksSource,
    slot: Weak<JwksSlot>,
    wake: Arc<Notify>,
    fetcher: Fetcher,
    refresh: Duration,
    timeout: Duration,
) {
    let retry_max = RETRY_MAX.min(refresh);
    let mut retry = RETRY_INITIAL.min(retry_max);
    loop {
        let fetched = match tokio::time::timeout(timeout, fetcher.fetch(&source)).await {
            Ok(Ok(body)) => KeySet::parse(&body),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(format!("timed out after {timeout:?}")),
        };
        let Some(live) = slot.upgrade() else { return };
        if let Ok(mut last) = live.last_attempt.lock() {
            *last = Some(Instant::now());
        }
        let wait = match fetched {
            Ok(set) => {
                tracing::debug!(%uri, keys = set.len(), "JWKS fetched");
                live.record(Ok(set));
                retry = RETRY_INITIAL.min(retry_max);
                refresh
            }
            Err(e) => {
                tracing::warn!(%uri, error = %e, "JWKS fetch failed; keeping the last keys");
                live.record(Err(e));
                let wait = retry.mul_f64(0.75 + fastrand::f64() * 0.5);
                retry = (retry * 2).min(retry_max);
                wait
            }
        };
        drop(live);
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = wake.notified() => {}
        }
        if slot.strong_count() == 0 {
            return;
        }
    }
}

//! The rustls side of mesh mTLS.
//!
//! [`IdentityStore`] holds what a proxy presents (its certificate and key) and what it trusts
//! (the bundle). Both are swapped atomically on rotation: the configs built here resolve the
//! certificate and the trust anchors per handshake, so new connections use the new
//! certificate while established ones carry on untouched.
//!
//! Clients verify the server's chain against the bundle AND that its SPIFFE ID is the one
//! expected for the destination; servers require and verify a client chain and expose the
//! peer's SPIFFE ID. TLS 1.3 is preferred, 1.2 is the minimum, and only AEAD suites exist in
//! the provider we use.

use crate::pem;
use crate::spiffe::SpiffeId;
use arc_swap::{ArcSwap, ArcSwapOption};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, OtherError,
    RootCertStore, ServerConfig, SignatureScheme,
};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// ALPN protocol ids.
pub const ALPN_H2: &[u8] = b"h2";
/// ALPN for HTTP/1.1.
pub const ALPN_HTTP11: &[u8] = b"http/1.1";

/// Why identity material could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// PEM or key problems.
    #[error("{0}")]
    Material(String),
    /// The certificate holds no SPIFFE ID.
    #[error("the certificate has no spiffe:// URI SAN")]
    NoIdentity,
}

/// What `/certs` and metrics report about the current certificate.
#[derive(Clone, Debug, serde::Serialize)]
pub struct CertInfo {
    /// The workload identity.
    pub identity: SpiffeId,
    /// Serial, hex.
    pub serial: String,
    /// Expiry, seconds since the Unix epoch.
    pub not_after: u64,
    /// Trusted roots in the bundle.
    pub trust_roots: usize,
    /// The issuer's distinguished name.
    pub issuer: String,
}

/// The crypto provider used everywhere in the mesh.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The proxy's current certificate, key and trust bundle; cheap to read per handshake.
pub struct IdentityStore {
    provider: Arc<CryptoProvider>,
    certified: ArcSwapOption<CertifiedKey>,
    roots: ArcSwap<RootCertStore>,
    client_verifier: ArcSwapOption<Arc<dyn ClientCertVerifier>>,
    info: ArcSwapOption<CertInfo>,
    rotations: AtomicU64,
}

impl fmt::Debug for IdentityStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IdentityStore")
            .field("info", &self.info.load())
            .finish()
    }
}

impl IdentityStore {
    /// An empty store: handshakes fail until [`IdentityStore::install`] succeeds.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            provider: provider(),
            certified: ArcSwapOption::empty(),
            roots: ArcSwap::from_pointee(RootCertStore::empty()),
            client_verifier: ArcSwapOption::empty(),
            info: ArcSwapOption::empty(),
            rotations: AtomicU64::new(0),
        })
    }

    /// Installs a certificate chain (leaf first), its key and the trust bundle. The first
    /// install is not counted as a rotation; every later one is.
    pub fn install(
        &self,
        chain_pem: &str,
        key_pem: &str,
        bundle_pem: &str,
    ) -> Result<CertInfo, TlsError> {
        let key = pem::private_key(key_pem).map_err(TlsError::Material)?;
        self.install_der(chain_pem, key, bundle_pem)
    }

    /// Like [`IdentityStore::install`] with a DER key (kept in memory only).
    pub fn install_der(
        &self,
        chain_pem: &str,
        key: rustls::pki_types::PrivateKeyDer<'static>,
        bundle_pem: &str,
    ) -> Result<CertInfo, TlsError> {
        let chain = pem::certs(chain_pem).map_err(TlsError::Material)?;
        let leaf = chain
            .first()
            .ok_or_else(|| TlsError::Material("no certificate in the chain".into()))?;
        let identity = SpiffeId::from_cert_der(leaf)
            .into_iter()
            .next()
            .ok_or(TlsError::NoIdentity)?;
        let signing_key = self
            .provider
            .key_provider
            .load_private_key(key)
            .map_err(|e| TlsError::Material(format!("private key: {e}")))?;
        let certified = CertifiedKey::new(chain.clone(), signing_key);
        certified.keys_match().map_err(|e| {
            TlsError::Material(format!("the key does not match the certificate: {e}"))
        })?;
        let mut roots = RootCertStore::empty();
        let bundle = pem::certs(bundle_pem).map_err(TlsError::Material)?;
        for r in &bundle {
            roots
                .add(r.clone())
                .map_err(|e| TlsError::Material(format!("trust bundle: {e}")))?;
        }
        if roots.is_empty() {
            return Err(TlsError::Material(
                "the trust bundle holds no certificate".into(),
            ));
        }
        let roots = Arc::new(roots);
        let verifier =
            WebPkiClientVerifier::builder_with_provider(roots.clone(), self.provider.clone())
                .build()
                .map_err(|e| TlsError::Material(format!("trust bundle: {e}")))?;
        let info = CertInfo {
            identity,
            serial: crate::ca::serial(leaf).unwrap_or_default(),
            not_after: crate::ca::not_after(leaf).unwrap_or(0),
            trust_roots: bundle.len(),
            issuer: crate::ca::issuer(leaf).unwrap_or_default(),
        };
        self.roots.store(roots);
        self.client_verifier.store(Some(Arc::new(verifier)));
        let first = self.certified.swap(Some(Arc::new(certified))).is_none();
        if !first {
            self.rotations.fetch_add(1, Ordering::Relaxed);
        }
        self.info.store(Some(Arc::new(info.clone())));
        Ok(info)
    }

    /// The current certificate, if any.
    pub fn info(&self) -> Option<CertInfo> {
        self.info.load_full().map(|i| (*i).clone())
    }

    /// Certificates installed after the first.
    pub fn rotations(&self) -> u64 {
        self.rotations.load(Ordering::Relaxed)
    }

    /// A server config: presents the current certificate, requires a client certificate
    /// that chains to the bundle, offers `alpn`.
    pub fn server_config(self: &Arc<Self>, alpn: &[&[u8]]) -> Arc<ServerConfig> {
        self.server_config_with(alpn, true)
    }

    /// Like [`IdentityStore::server_config`], but a client may also connect without a
    /// certificate (the control plane's identity endpoint: joining workloads have none yet
    /// and authenticate with a token; renewing ones present their certificate).
    pub fn server_config_client_cert_optional(
        self: &Arc<Self>,
        alpn: &[&[u8]],
    ) -> Arc<ServerConfig> {
        self.server_config_with(alpn, false)
    }

    fn server_config_with(self: &Arc<Self>, alpn: &[&[u8]], mandatory: bool) -> Arc<ServerConfig> {
        let mut cfg = ServerConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("the ring provider supports TLS 1.2 and 1.3")
            .with_client_cert_verifier(Arc::new(BundleClientVerifier {
                store: self.clone(),
                mandatory,
            }))
            .with_cert_resolver(Arc::new(Resolver(self.clone())));
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(cfg)
    }

    /// A client config for connections whose server must be `expected` (any mesh identity
    /// when `None`), presenting the current certificate and offering `alpn`.
    pub fn client_config(
        self: &Arc<Self>,
        expected: Option<SpiffeId>,
        alpn: &[&[u8]],
    ) -> Arc<ClientConfig> {
        let mut cfg = ClientConfig::builder_with_provider(self.provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("the ring provider supports TLS 1.2 and 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier {
                roots: RootsSource::Store(self.clone()),
                expected,
                algs: self.provider.signature_verification_algorithms,
            }))
            .with_client_cert_resolver(Arc::new(Resolver(self.clone())));
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Arc::new(cfg)
    }
}

/// A client config that trusts a server chaining to the CA whose certificate hashes to
/// `pin` (how a joining workload authenticates the control plane before it has a bundle).
/// The server's SPIFFE ID must be `expected`.
pub fn pinned_client_config(pin: &str, expected: SpiffeId, alpn: &[&[u8]]) -> Arc<ClientConfig> {
    let provider = provider();
    let algs = provider.signature_verification_algorithms;
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .expect("the ring provider supports TLS 1.2 and 1.3")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(SpiffeServerVerifier {
            roots: RootsSource::Pin(pin.to_ascii_lowercase()),
            expected: Some(expected),
            algs,
        }))
        .with_no_client_auth();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

/// The SPIFFE ID of a peer's leaf certificate.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<SpiffeId> {
    SpiffeId::from_cert_der(certs?.first()?).into_iter().next()
}

/// A short, bounded label for a failed handshake (`trellis_tls_handshake_failures_total`).
pub fn failure_reason(err: &std::io::Error) -> &'static str {
    let Some(e) = err.get_ref().and_then(|e| e.downcast_ref::<Error>()) else {
        return match err.kind() {
            std::io::ErrorKind::UnexpectedEof => "eof",
            std::io::ErrorKind::TimedOut => "timeout",
            _ => "io",
        };
    };
    match e {
        Error::NoCertificatesPresented => "no_client_certificate",
        Error::InvalidCertificate(c) => match c {
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "expired_certificate"
            }
            CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
                "certificate_not_yet_valid"
            }
            CertificateError::UnknownIssuer => "unknown_ca",
            CertificateError::Other(_) | CertificateError::ApplicationVerificationFailure => {
                "identity_mismatch"
            }
            _ => "bad_certificate",
        },
        Error::AlertReceived(_) => "alert_received",
        Error::NoApplicationProtocol => "no_alpn",
        Error::PeerIncompatible(_) => "incompatible",
        _ => "protocol",
    }
}

#[derive(Debug)]
struct Resolver(Arc<IdentityStore>);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0.certified.load_full()
    }
}

impl ResolvesClientCert for Resolver {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.0.certified.load_full()
    }

    fn has_certs(&self) -> bool {
        self.0.certified.load().is_some()
    }
}

/// Verifies client chains against whatever bundle the store holds right now.
#[derive(Debug)]
struct BundleClientVerifier {
    store: Arc<IdentityStore>,
    mandatory: bool,
}

impl BundleClientVerifier {
    fn current(&self) -> Result<Arc<Arc<dyn ClientCertVerifier>>, Error> {
        self.store
            .client_verifier
            .load_full()
            .ok_or_else(|| Error::General("no trust bundle installed yet".into()))
    }
}

impl ClientCertVerifier for BundleClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.current()?
            .verify_client_cert(end_entity, intermediates, now)?;
        if SpiffeId::from_cert_der(end_entity).is_empty() {
            return Err(no_spiffe_id());
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.store.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.store.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.store
            .provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the certificate has no spiffe:// URI SAN")]
struct NoSpiffeId;

/// The rustls error for a peer certificate without a SPIFFE ID.
fn no_spiffe_id() -> Error {
    Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(NoSpiffeId))))
}

#[derive(Debug, thiserror::Error)]
#[error("peer identity is {found}, expected {expected}")]
struct IdentityMismatch {
    found: String,
    expected: String,
}

#[derive(Debug)]
enum RootsSource {
    Store(Arc<IdentityStore>),
    /// Trust a chain whose top certificate (or root) hashes to this pin.
    Pin(String),
}

/// Verifies the server chain, then its SPIFFE ID.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: RootsSource,
    expected: Option<SpiffeId>,
    algs: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        let roots = match &self.roots {
            RootsSource::Store(store) => store.roots.load_full(),
            RootsSource::Pin(pin) => {
                // The pinned CA must be among the certificates the server sent (the control
                // plane sends its chain up to and including the pinned CA).
                let ca = intermediates
                    .iter()
                    .find(|c| crate::ca::pin(c) == *pin)
                    .ok_or(Error::InvalidCertificate(CertificateError::UnknownIssuer))?;
                let mut r = RootCertStore::empty();
                r.add(ca.clone().into_owned())
                    .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
                Arc::new(r)
            }
        };
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &roots,
            intermediates,
            now,
            self.algs.all,
        )?;
        let found = SpiffeId::from_cert_der(end_entity);
        if let Some(expected) = &self.expected {
            if !found.contains(expected) {
                return Err(Error::InvalidCertificate(CertificateError::Other(
                    OtherError(Arc::new(IdentityMismatch {
                        found: found
                            .first()
                            .map_or_else(|| "none".to_string(), |f| f.to_string()),
                        expected: expected.to_string(),
                    })),
                )));
            }
        } else if found.is_empty() {
            return Err(no_spiffe_id());
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algs.supported_schemes()
    }
}

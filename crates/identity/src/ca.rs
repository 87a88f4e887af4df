//! The mesh certificate authority: creates or loads the signing CA, signs workload CSRs for
//! exactly the identity a caller is entitled to, and knows the trust bundle (every root the
//! mesh trusts, so a root can be rotated with old and new trusted side by side).

use crate::pem;
use crate::spiffe::SpiffeId;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::SecureRandom;
use rustls_pki_types::CertificateDer;
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use time::OffsetDateTime;

/// Why the CA could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// The CA certificate or key could not be read.
    #[error("invalid CA material: {0}")]
    Material(String),
    /// The CSR is malformed or its signature does not verify.
    #[error("invalid CSR: {0}")]
    BadCsr(String),
    /// The CSR asks for an identity other than the one the caller may have.
    #[error("CSR asks for {asked}, but this token may only obtain {allowed}")]
    WrongIdentity {
        /// What the CSR asked for.
        asked: String,
        /// What the caller is entitled to.
        allowed: String,
    },
    /// Certificate generation failed.
    #[error("signing failed: {0}")]
    Signing(#[from] rcgen::Error),
}

/// A certificate the CA issued.
#[derive(Clone, Debug)]
pub struct Issued {
    /// Leaf first, then any intermediates up to (not including) the root.
    pub chain_pem: String,
    /// Serial number, hex.
    pub serial: String,
    /// Expiry, seconds since the Unix epoch.
    pub not_after: u64,
    /// The identity in the certificate.
    pub id: SpiffeId,
}

/// The signing CA and the trust bundle.
pub struct CertificateAuthority {
    trust_domain: String,
    issuer: Issuer<'static, KeyPair>,
    key_pem: String,
    /// The signing certificate, then the intermediates above it (PEM).
    chain_pem: String,
    signing_der: CertificateDer<'static>,
    bundle: Vec<CertificateDer<'static>>,
    not_after: u64,
}

fn unix(t: OffsetDateTime) -> u64 {
    t.unix_timestamp().max(0) as u64
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn offset(secs: u64) -> OffsetDateTime {
    OffsetDateTime::from_unix_timestamp(secs as i64).unwrap_or(OffsetDateTime::UNIX_EPOCH)
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // SystemRandom only fails if the OS has no randomness at all; fall back to time.
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        bytes[..8].copy_from_slice(&now_unix().to_be_bytes());
    }
    bytes[0] &= 0x7f; // positive
    bytes[0] |= 0x01; // and never with a leading zero byte
    SerialNumber::from_slice(&bytes)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Expiry of a DER certificate, seconds since the Unix epoch.
pub fn not_after(der: &[u8]) -> Option<u64> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.validity().not_after.timestamp().max(0) as u64)
}

/// Issuer distinguished name of a DER certificate.
pub fn issuer(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(cert.issuer().to_string())
}

/// Serial of a DER certificate, hex.
pub fn serial(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(hex(cert.raw_serial()))
}

impl CertificateAuthority {
    /// A new self-signed root (ECDSA P-256) valid for `validity`.
    pub fn generate(trust_domain: &str, validity: Duration) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Trellis");
        // A random tag tells roots apart (rotation keeps two side by side).
        let tag = hex(&random_serial().to_bytes()[..4]);
        dn.push(
            DnType::CommonName,
            format!("Trellis root CA {tag} ({trust_domain})"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = now_unix();
        params.not_before = offset(now.saturating_sub(60));
        params.not_after = offset(now + validity.as_secs());
        params.serial_number = Some(random_serial());
        let cert = params.self_signed(&key)?;
        let key_pem = key.serialize_pem();
        Self::from_pem(trust_domain, &cert.pem(), &key_pem, None)
    }

    /// Loads an operator-supplied CA: `cert_pem` holds the signing certificate first, then
    /// any intermediates above it; `bundle_pem` the trusted roots. A self-signed signing
    /// certificate is its own root when no bundle is given.
    pub fn from_pem(
        trust_domain: &str,
        cert_pem: &str,
        key_pem: &str,
        bundle_pem: Option<&str>,
    ) -> Result<Self, CaError> {
        let chain = pem::certs(cert_pem).map_err(CaError::Material)?;
        let signing_der = chain
            .first()
            .cloned()
            .ok_or_else(|| CaError::Material("no certificate in the CA file".into()))?;
        let key =
            KeyPair::from_pem(key_pem).map_err(|e| CaError::Material(format!("CA key: {e}")))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&signing_der)
            .map_err(|e| CaError::Material(format!("CA certificate: {e}")))?;
        if !parsed.is_ca() {
            return Err(CaError::Material(
                "the CA certificate is not a CA (basicConstraints CA:TRUE missing)".into(),
            ));
        }
        if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(CaError::Material(
                "the CA key does not match the CA certificate".into(),
            ));
        }
        let self_signed = parsed.subject() == parsed.issuer();
        let not_after = parsed.validity().not_after.timestamp().max(0) as u64;
        let bundle = match bundle_pem {
            Some(b) => pem::certs(b).map_err(CaError::Material)?,
            None if self_signed => vec![signing_der.clone()],
            None => {
                return Err(CaError::Material(
                    "an intermediate CA needs the root(s) it chains to as the trust bundle".into(),
                ))
            }
        };
        if bundle.is_empty() {
            return Err(CaError::Material(
                "the trust bundle holds no certificate".into(),
            ));
        }
        let issuer = Issuer::from_ca_cert_der(&signing_der, key)
            .map_err(|e| CaError::Material(format!("CA certificate: {e}")))?;
        // The chain sent with leaves: the signing cert and intermediates, never the root.
        let chain_pem = chain
            .iter()
            .filter(|c| !bundle.contains(c))
            .map(|c| pem::cert_pem(c))
            .collect::<String>();
        Ok(Self {
            trust_domain: trust_domain.to_string(),
            issuer,
            key_pem: key_pem.to_string(),
            chain_pem,
            signing_der,
            bundle,
            not_after,
        })
    }

    /// The trust domain identities are issued in.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The signing certificate (PEM).
    pub fn cert_pem(&self) -> String {
        pem::cert_pem(&self.signing_der)
    }

    /// What a CA certificate file should hold to load this CA again: the signing
    /// certificate and any intermediates above it.
    pub fn cert_file_pem(&self) -> String {
        if self.chain_pem.is_empty() {
            self.cert_pem()
        } else {
            self.chain_pem.clone()
        }
    }

    /// The signing key (PEM). Handle with care.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    /// Every trusted root, PEM, concatenated.
    pub fn bundle_pem(&self) -> String {
        self.bundle.iter().map(|c| pem::cert_pem(c)).collect()
    }

    /// The trusted roots.
    pub fn bundle(&self) -> &[CertificateDer<'static>] {
        &self.bundle
    }

    /// Adds roots to the trust bundle (CA rotation: trust old and new side by side).
    pub fn trust_also(&mut self, roots: &[CertificateDer<'static>]) {
        for r in roots {
            if !self.bundle.contains(r) {
                self.bundle.push(r.clone());
            }
        }
    }

    /// Drops a root from the bundle (the end of a rotation). The signing root stays.
    pub fn distrust(&mut self, root: &CertificateDer<'static>) -> bool {
        if root == &self.signing_der {
            return false;
        }
        let before = self.bundle.len();
        self.bundle.retain(|r| r != root);
        before != self.bundle.len()
    }

    /// Expiry of the signing certificate, seconds since the Unix epoch.
    pub fn not_after(&self) -> u64 {
        self.not_after
    }

    /// SHA-256 (hex) of the signing certificate, as pinned in join tokens.
    pub fn pin(&self) -> String {
        pin(&self.signing_der)
    }

    fn leaf_params(&self, id: &SpiffeId, ttl: Duration) -> Result<CertificateParams, CaError> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, id.trust_domain.clone());
        dn.push(DnType::CommonName, id.service_account.clone());
        params.distinguished_name = dn;
        params.subject_alt_names =
            vec![SanType::URI(id.to_string().try_into().map_err(|_| {
                CaError::Material(format!("identity {id} is not a valid URI"))
            })?)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = now_unix();
        params.not_before = offset(now.saturating_sub(60));
        // Never outlive the CA that signs it.
        params.not_after = offset((now + ttl.as_secs().max(1)).min(self.not_after));
        params.serial_number = Some(random_serial());
        Ok(params)
    }

    fn finish(&self, params: &CertificateParams, cert: rcgen::Certificate, id: SpiffeId) -> Issued {
        Issued {
            chain_pem: format!("{}{}", cert.pem(), self.chain_pem),
            serial: params
                .serial_number
                .as_ref()
                .map(|s| hex(&s.to_bytes()))
                .unwrap_or_default(),
            not_after: unix(params.not_after),
            id,
        }
    }

    /// Signs a workload CSR for `allowed`, and only for it: the CSR must name exactly that
    /// SPIFFE ID as its one URI SAN. Everything else in the CSR is ignored.
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        allowed: &SpiffeId,
        ttl: Duration,
    ) -> Result<Issued, CaError> {
        let csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        let asked: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|s| match s {
                SanType::URI(u) => u.as_str().to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        if asked != [allowed.to_string()] {
            return Err(CaError::WrongIdentity {
                asked: if asked.is_empty() {
                    "no identity".into()
                } else {
                    asked.join(", ")
                },
                allowed: allowed.to_string(),
            });
        }
        let params = self.leaf_params(allowed, ttl)?;
        let cert = params.signed_by(&csr.public_key, &self.issuer)?;
        Ok(self.finish(&params, cert, allowed.clone()))
    }

    /// Issues a certificate and a fresh key for `id` (the control plane's own serving
    /// certificate, static bootstrap files, tests). Extra DNS/IP SANs let non-mesh clients
    /// verify the server by address.
    pub fn issue(
        &self,
        id: &SpiffeId,
        dns: &[String],
        ips: &[IpAddr],
        ttl: Duration,
    ) -> Result<(Issued, String), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = self.leaf_params(id, ttl)?;
        for d in dns {
            params.subject_alt_names.push(SanType::DnsName(
                d.clone()
                    .try_into()
                    .map_err(|_| CaError::Material(format!("invalid DNS name {d}")))?,
            ));
        }
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((self.finish(&params, cert, id.clone()), key.serialize_pem()))
    }

    /// A new intermediate CA signed by this one (for operators who keep the root offline).
    pub fn issue_intermediate(&self, validity: Duration) -> Result<(String, String), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Trellis");
        dn.push(
            DnType::CommonName,
            format!("Trellis intermediate CA ({})", self.trust_domain),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.use_authority_key_identifier_extension = true;
        let now = now_unix();
        params.not_before = offset(now.saturating_sub(60));
        params.not_after = offset((now + validity.as_secs()).min(self.not_after));
        params.serial_number = Some(random_serial());
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((
            format!("{}{}", cert.pem(), self.chain_pem),
            key.serialize_pem(),
        ))
    }
}

/// SHA-256 of a certificate's DER, hex: the pin join tokens carry.
pub fn pin(der: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, der).as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csr::WorkloadKey;

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "edtech", sa).unwrap()
    }

    #[test]
    fn signs_a_csr_for_the_allowed_identity_only() {
        let ca =
            CertificateAuthority::generate("cluster.local", Duration::from_secs(86400)).unwrap();
        let key = WorkloadKey::generate().unwrap();
        let issued = ca
            .sign_csr(
                &key.csr_pem(&id("frontend")).unwrap(),
                &id("frontend"),
                Duration::from_secs(3600),
            )
            .unwrap();
        let leaf = crate::pem::certs(&issued.chain_pem).unwrap();
        assert_eq!(leaf.len(), 1, "a root CA sends only the leaf");
        assert_eq!(SpiffeId::from_cert_der(&leaf[0]), vec![id("frontend")]);
        let left = issued.not_after - now_unix();
        assert!((3500..=3600).contains(&left), "{left}");

        let err = ca
            .sign_csr(
                &key.csr_pem(&id("admin")).unwrap(),
                &id("frontend"),
                Duration::from_secs(3600),
            )
            .unwrap_err();
        assert!(matches!(err, CaError::WrongIdentity { .. }), "{err}");
        assert!(ca
            .sign_csr("garbage", &id("frontend"), Duration::from_secs(1))
            .is_err());
    }

    #[test]
    fn leaves_never_outlive_the_ca() {
        let ca = CertificateAuthority::generate("cluster.local", Duration::from_secs(100)).unwrap();
        let (issued, _) = ca
            .issue(&id("a"), &[], &[], Duration::from_secs(86400))
            .unwrap();
        assert!(issued.not_after <= ca.not_after());
    }

    #[test]
    fn loads_what_it_saved_and_refuses_mismatched_keys() {
        let a = CertificateAuthority::generate("cluster.local", Duration::from_secs(1000)).unwrap();
        let b = CertificateAuthority::generate("cluster.local", Duration::from_secs(1000)).unwrap();
        let again =
            CertificateAuthority::from_pem("cluster.local", &a.cert_pem(), a.key_pem(), None)
                .unwrap();
        assert_eq!(again.pin(), a.pin());
        assert!(
            CertificateAuthority::from_pem("cluster.local", &a.cert_pem(), b.key_pem(), None)
                .is_err()
        );
    }

    #[test]
    fn an_intermediate_signs_with_its_chain() {
        let root =
            CertificateAuthority::generate("cluster.local", Duration::from_secs(10000)).unwrap();
        let (cert, key) = root.issue_intermediate(Duration::from_secs(5000)).unwrap();
        assert!(CertificateAuthority::from_pem("cluster.local", &cert, &key, None).is_err());
        let inter =
            CertificateAuthority::from_pem("cluster.local", &cert, &key, Some(&root.bundle_pem()))
                .unwrap();
        let (issued, _) = inter
            .issue(&id("a"), &[], &[], Duration::from_secs(60))
            .unwrap();
        assert_eq!(
            crate::pem::certs(&issued.chain_pem).unwrap().len(),
            2,
            "leaf + intermediate"
        );
        assert_eq!(inter.bundle_pem(), root.bundle_pem());
    }
}

//! A workload's key pair and its certificate signing request. The key is generated where it
//! is used and never leaves the process.

use crate::spiffe::SpiffeId;
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
use rustls_pki_types::PrivateKeyDer;

/// A freshly generated ECDSA P-256 key.
pub struct WorkloadKey {
    key: KeyPair,
}

impl WorkloadKey {
    /// Generates a key.
    pub fn generate() -> Result<Self, rcgen::Error> {
        Ok(Self {
            key: KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?,
        })
    }

    /// A CSR asking for `id` as the only URI SAN.
    pub fn csr_pem(&self, id: &SpiffeId) -> Result<String, rcgen::Error> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, id.service_account.clone());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        params.serialize_request(&self.key)?.pem()
    }

    /// The private key for rustls.
    pub fn private_key_der(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.serialize_der().into())
    }

    /// The private key as PEM (for static files; the control-plane flow never writes it).
    pub fn private_key_pem(&self) -> String {
        self.key.serialize_pem()
    }
}

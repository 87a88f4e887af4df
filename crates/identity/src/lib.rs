//! Workload identity for the mesh: SPIFFE IDs, the certificate authority, CSRs, join tokens,
//! and the rustls configurations that enforce mTLS between proxies.

pub mod ca;
pub mod csr;
pub mod pem;
pub mod spiffe;
pub mod tls;
pub mod token;

pub use ca::CertificateAuthority;
pub use spiffe::SpiffeId;
pub use tls::IdentityStore;

//! Certificates for tests: a mesh CA that writes workload identity files a bootstrap file
//! can point at.

use std::path::{Path, PathBuf};
use std::time::Duration;
use trellis_identity::{CertificateAuthority, SpiffeId};

/// A CA for one test, writing files into `dir`.
pub struct TestCa {
    /// The CA itself.
    pub ca: CertificateAuthority,
    dir: PathBuf,
}

/// Paths of one workload's identity files.
pub struct IdentityFiles {
    /// Certificate chain.
    pub cert: PathBuf,
    /// Private key.
    pub key: PathBuf,
    /// Trust bundle.
    pub bundle: PathBuf,
}

impl IdentityFiles {
    /// The `identity:` block of a bootstrap file.
    pub fn yaml(&self) -> String {
        format!(
            "identity:\n  cert: {}\n  key: {}\n  trust_bundle: {}\n",
            self.cert.display(),
            self.key.display(),
            self.bundle.display()
        )
    }
}

/// `spiffe://cluster.local/ns/<ns>/sa/<sa>`.
pub fn spiffe(ns: &str, sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", ns, sa).expect("a valid SPIFFE ID")
}

impl TestCa {
    /// A fresh root CA for `cluster.local`.
    pub fn new(dir: &Path) -> Self {
        Self {
            ca: CertificateAuthority::generate("cluster.local", Duration::from_secs(86400))
                .expect("generating a CA"),
            dir: dir.to_path_buf(),
        }
    }

    /// Writes a certificate for `ns/sa` valid for `ttl`, and the bundle.
    pub fn workload_ttl(&self, ns: &str, sa: &str, ttl: Duration) -> IdentityFiles {
        let (issued, key) = self
            .ca
            .issue(&spiffe(ns, sa), &[], &[], ttl)
            .expect("issuing a workload certificate");
        let files = IdentityFiles {
            cert: self.dir.join(format!("{ns}-{sa}.pem")),
            key: self.dir.join(format!("{ns}-{sa}-key.pem")),
            bundle: self.dir.join(format!("bundle-{}.pem", &self.ca.pin()[..8])),
        };
        std::fs::write(&files.cert, issued.chain_pem).expect("writing cert");
        std::fs::write(&files.key, key).expect("writing key");
        std::fs::write(&files.bundle, self.ca.bundle_pem()).expect("writing bundle");
        files
    }

    /// Writes a day-long certificate for `ns/sa`.
    pub fn workload(&self, ns: &str, sa: &str) -> IdentityFiles {
        self.workload_ttl(ns, sa, Duration::from_secs(86400))
    }
}

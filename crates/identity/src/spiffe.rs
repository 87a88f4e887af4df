//! SPIFFE identities: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;
use std::str::FromStr;
use x509_parser::extensions::GeneralName;

/// A workload identity in the mesh.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// Trust domain, e.g. `cluster.local`.
    pub trust_domain: String,
    /// Namespace.
    pub namespace: String,
    /// Service account (by default the service name).
    pub service_account: String,
}

/// Why a string is not a Trellis SPIFFE ID.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error(
    "invalid SPIFFE ID {0:?}: expected spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
)]
pub struct SpiffeIdError(pub String);

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
}

impl SpiffeId {
    /// Builds an identity, validating each part.
    pub fn new(
        trust_domain: &str,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        let id = Self {
            trust_domain: trust_domain.to_ascii_lowercase(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        };
        if [&id.trust_domain, &id.namespace, &id.service_account]
            .iter()
            .all(|s| valid_segment(s))
        {
            Ok(id)
        } else {
            Err(SpiffeIdError(id.to_string()))
        }
    }

    /// The Istio-style principal, `<trust-domain>/ns/<namespace>/sa/<service-account>`.
    pub fn principal(&self) -> String {
        format!(
            "{}/ns/{}/sa/{}",
            self.trust_domain, self.namespace, self.service_account
        )
    }

    /// The SPIFFE IDs in a DER certificate's URI SANs (usually exactly one).
    pub fn from_cert_der(der: &[u8]) -> Vec<SpiffeId> {
        let Ok((_, cert)) = x509_parser::parse_x509_certificate(der) else {
            return Vec::new();
        };
        let Ok(Some(san)) = cert.subject_alternative_name() else {
            return Vec::new();
        };
        san.value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::URI(u) => u.parse().ok(),
                _ => None,
            })
            .collect()
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}", self.principal())
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || SpiffeIdError(s.to_string());
        let rest = s.strip_prefix("spiffe://").ok_or_else(err)?;
        let parts: Vec<&str> = rest.split('/').collect();
        match parts.as_slice() {
            [td, "ns", ns, "sa", sa] => Self::new(td, ns, sa).map_err(|_| err()),
            _ => Err(err()),
        }
    }
}

impl serde::Serialize for SpiffeId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for SpiffeId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let id: SpiffeId = "spiffe://cluster.local/ns/edtech/sa/frontend"
            .parse()
            .unwrap();
        assert_eq!(id.namespace, "edtech");
        assert_eq!(id.service_account, "frontend");
        assert_eq!(id.principal(), "cluster.local/ns/edtech/sa/frontend");
        assert_eq!(
            id.to_string(),
            "spiffe://cluster.local/ns/edtech/sa/frontend"
        );
    }

    #[test]
    fn rejects_other_shapes() {
        for s in [
            "cluster.local/ns/a/sa/b",
            "spiffe://cluster.local/ns/a",
            "spiffe://cluster.local/ns/a/sa/b/c",
            "spiffe://cluster.local/ns//sa/b",
            "spiffe://cluster.local/x/a/sa/b",
            "spiffe://clu ster/ns/a/sa/b",
        ] {
            assert!(s.parse::<SpiffeId>().is_err(), "{s}");
        }
    }
}

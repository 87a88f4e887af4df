//! Service and host names.
//!
//! A service is named by `(name, namespace)`. Clients may spell it `svc`, `svc.ns`,
//! `svc.ns.svc` or `svc.ns.svc.cluster.local` (the cluster domain is configurable), with any
//! case, an optional trailing dot and an optional port. [`HostName::parse`] folds all of these
//! into one form so that lookups never depend on how a client wrote the host.

use std::fmt;

/// The default Kubernetes-style cluster domain used in fully qualified service hosts.
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";

/// The default namespace when none is given.
pub const DEFAULT_NAMESPACE: &str = "default";

/// A service identified by name and namespace.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct ServiceKey {
    /// The service name, lower case.
    pub name: String,
    /// The namespace, lower case.
    pub namespace: String,
}

impl ServiceKey {
    /// Builds a key, lower-casing both parts.
    pub fn new(name: &str, namespace: &str) -> Self {
        Self {
            name: name.to_ascii_lowercase(),
            namespace: namespace.to_ascii_lowercase(),
        }
    }
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.name, self.namespace)
    }
}

/// A host as a client wrote it, reduced to the service it names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostName {
    /// The service name (first label).
    pub name: String,
    /// The namespace when the host carried one (`svc.ns...`), else `None`.
    pub namespace: Option<String>,
    /// The port when the host carried one.
    pub port: Option<u16>,
}

/// Why a host could not be read as a service name.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HostError {
    /// Empty host.
    #[error("empty host")]
    Empty,
    /// The port part is not a number in 1..=65535.
    #[error("invalid port in host {0:?}")]
    BadPort(String),
    /// A label holds characters other than letters, digits and `-`, or is empty.
    #[error("invalid host {0:?}")]
    BadLabel(String),
    /// More labels than `svc.ns.svc.<cluster domain>`, or a suffix other than the cluster domain.
    #[error(
        "host {0:?} is not a service name (svc, svc.ns or svc.ns.svc.{DEFAULT_CLUSTER_DOMAIN})"
    )]
    NotAService(String),
}

impl HostName {
    /// Parses `svc`, `svc.ns`, `svc.ns.svc`, `svc.ns.svc.<cluster_domain>` with an optional
    /// `:port` and trailing dot, case-insensitively.
    pub fn parse(host: &str, cluster_domain: &str) -> Result<Self, HostError> {
        if host.is_empty() {
            return Err(HostError::Empty);
        }
        let (host_part, port) = match host.rsplit_once(':') {
            Some((h, p)) => {
                let port: u16 = p
                    .parse()
                    .map_err(|_| HostError::BadPort(host.to_string()))?;
                if port == 0 {
                    return Err(HostError::BadPort(host.to_string()));
                }
                (h, Some(port))
            }
            None => (host, None),
        };
        let lower = host_part.trim_end_matches('.').to_ascii_lowercase();
        if lower.is_empty() {
            return Err(HostError::Empty);
        }
        let labels: Vec<&str> = lower.split('.').collect();
        if labels.iter().any(|l| !valid_label(l)) {
            return Err(HostError::BadLabel(host.to_string()));
        }
        let domain: Vec<String> = cluster_domain
            .trim_end_matches('.')
            .to_ascii_lowercase()
            .split('.')
            .map(str::to_string)
            .collect();
        let namespace = match labels.len() {
            1 => None,
            2 => Some(labels[1].to_string()),
            3 if labels[2] == "svc" => Some(labels[1].to_string()),
            n if n == 3 + domain.len()
                && labels[2] == "svc"
                && labels[3..].iter().zip(&domain).all(|(a, b)| a == b) =>
            {
                Some(labels[1].to_string())
            }
            _ => return Err(HostError::NotAService(host.to_string())),
        };
        Ok(Self {
            name: labels[0].to_string(),
            namespace,
            port,
        })
    }
}

fn valid_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(h: &str) -> Result<HostName, HostError> {
        HostName::parse(h, DEFAULT_CLUSTER_DOMAIN)
    }

    #[test]
    fn all_spellings_name_the_same_service() {
        for h in [
            "user-profile.default",
            "user-profile.default.svc",
            "user-profile.default.svc.cluster.local",
            "User-Profile.Default.svc.cluster.local.",
            "user-profile.default:8080",
        ] {
            let n = parse(h).unwrap();
            assert_eq!(n.name, "user-profile", "{h}");
            assert_eq!(n.namespace.as_deref(), Some("default"), "{h}");
        }
        let n = parse("user-profile").unwrap();
        assert_eq!((n.name.as_str(), n.namespace), ("user-profile", None));
        assert_eq!(parse("svc:80").unwrap().port, Some(80));
    }

    #[test]
    fn rejects_what_is_not_a_service() {
        assert_eq!(parse(""), Err(HostError::Empty));
        assert!(matches!(parse("svc:0"), Err(HostError::BadPort(_))));
        assert!(matches!(parse("svc:http"), Err(HostError::BadPort(_))));
        assert!(matches!(parse("a..b"), Err(HostError::BadLabel(_))));
        assert!(matches!(parse("a_b"), Err(HostError::BadLabel(_))));
        assert!(matches!(parse("a.b.c"), Err(HostError::NotAService(_))));
        assert!(matches!(
            parse("a.b.svc.example.com"),
            Err(HostError::NotAService(_))
        ));
    }
}

#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// No input panics, and every spelling of a service host names the same service.
        #[test]
        fn parse_is_total(host in "\\PC{0,80}") {
            let _ = HostName::parse(&host, DEFAULT_CLUSTER_DOMAIN);
        }

        #[test]
        fn spellings_agree(name in "[a-z][a-z0-9-]{0,20}", ns in "[a-z][a-z0-9-]{0,20}", port in 1u16..) {
            let short = HostName::parse(&format!("{name}.{ns}"), DEFAULT_CLUSTER_DOMAIN).unwrap();
            for host in [
                format!("{name}.{ns}.svc.cluster.local"),
                format!("{}.{}.SVC.cluster.local.", name.to_uppercase(), ns),
                format!("{name}.{ns}:{port}"),
            ] {
                let h = HostName::parse(&host, DEFAULT_CLUSTER_DOMAIN).unwrap();
                prop_assert_eq!((&h.name, &h.namespace), (&short.name, &short.namespace));
            }
        }
    }
}

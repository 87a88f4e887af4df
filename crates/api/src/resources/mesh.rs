//! `trellis.dev/v1alpha1` `Mesh`: mesh-wide settings that Istio keeps in its MeshConfig —
//! trust domain, root namespace, default mTLS mode, trace sampling, default resilience
//! policies and default-deny authorization.
//!
//! ```yaml
//! apiVersion: trellis.dev/v1alpha1
//! kind: Mesh
//! metadata: { name: default }
//! spec:
//!   trustDomain: cluster.local
//!   rootNamespace: istio-system
//!   mtls: { mode: STRICT }
//!   tracing: { sampling: 1.0 }
//!   defaults:
//!     timeout: 15s
//!     retries: { attempts: 2, perTryTimeout: 5s, retryOn: "connect-failure,refused-stream,unavailable" }
//!     outlierDetection: { consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s }
//!     connectionPool: { tcp: { connectTimeout: 1s } }
//!   authorization: { defaultDeny: false }
//! ```

use super::common::{check_percent, Invalid};
use super::http_policy::HttpRetry;
use super::traffic_policy::{ConnectionPoolSettings, OutlierDetection};
use super::{ObjectMeta, PeerMode};
use crate::duration::Duration;
use serde::{Deserialize, Serialize};

/// apiVersions accepted for this kind.
pub const API_VERSIONS: [&str; 1] = ["trellis.dev/v1alpha1"];

/// The root namespace when none is given (Istio's).
pub const DEFAULT_ROOT_NAMESPACE: &str = "istio-system";

/// The resource.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Mesh {
    /// `trellis.dev/v1alpha1`.
    pub api_version: String,
    /// `Mesh`.
    pub kind: String,
    /// Name (one Mesh per mesh).
    pub metadata: ObjectMeta,
    /// The settings.
    #[serde(default)]
    pub spec: MeshSpec,
    /// Server-written status: accepted and ignored.
    #[serde(default, skip_serializing)]
    pub status: Option<serde_yaml_ng::Value>,
}

/// `spec` of a Mesh.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MeshSpec {
    /// Trust domain of identities (`spiffe://<trustDomain>/ns/<ns>/sa/<sa>`).
    #[serde(default = "default_trust_domain")]
    pub trust_domain: String,
    /// Namespace whose policies without selector are mesh-wide.
    #[serde(default = "default_root_namespace")]
    pub root_namespace: String,
    /// Default inbound mTLS mode (below any PeerAuthentication).
    #[serde(default)]
    pub mtls: MeshMtls,
    /// Tracing.
    #[serde(default)]
    pub tracing: Tracing,
    /// Policies for routes and destinations that set none (boxed: it is large).
    #[serde(default)]
    pub defaults: Box<Defaults>,
    /// Authorization defaults.
    #[serde(default)]
    pub authorization: Authorization,
}

impl Default for MeshSpec {
    fn default() -> Self {
        Self {
            trust_domain: default_trust_domain(),
            root_namespace: default_root_namespace(),
            mtls: MeshMtls::default(),
            tracing: Tracing::default(),
            defaults: Box::default(),
            authorization: Authorization::default(),
        }
    }
}

fn default_trust_domain() -> String {
    crate::names::DEFAULT_CLUSTER_DOMAIN.into()
}

fn default_root_namespace() -> String {
    DEFAULT_ROOT_NAMESPACE.into()
}

/// `{ mode: STRICT | PERMISSIVE | DISABLE }` (default `STRICT`: secure by default).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MeshMtls {
    /// The mode.
    #[serde(default = "strict")]
    pub mode: PeerMode,
}

impl Default for MeshMtls {
    fn default() -> Self {
        Self { mode: strict() }
    }
}

fn strict() -> PeerMode {
    PeerMode::Strict
}

/// Tracing settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tracing {
    /// Percentage of requests sampled when the caller made no decision (0..=100, default 1).
    #[serde(default = "one_percent")]
    pub sampling: f64,
}

impl Default for Tracing {
    fn default() -> Self {
        Self {
            sampling: one_percent(),
        }
    }
}

fn one_percent() -> f64 {
    1.0
}

/// Defaults for what VirtualServices and DestinationRules leave unset.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Defaults {
    /// Request timeout of HTTP routes (absent: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<Duration>,
    /// Retry policy of HTTP routes (as a VirtualService's `retries`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retries: Option<HttpRetry>,
    /// Outlier detection of destinations (as a DestinationRule's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outlier_detection: Option<OutlierDetection>,
    /// Connection pool limits of destinations (as a DestinationRule's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connection_pool: Option<ConnectionPoolSettings>,
}

/// Authorization defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Authorization {
    /// Deny requests to workloads no ALLOW policy covers (Istio allows them).
    #[serde(default)]
    pub default_deny: bool,
}

impl Mesh {
    /// Checks the trust domain, mode, sampling and defaults.
    pub fn validate(&self) -> Result<(), Invalid> {
        let spec = &self.spec;
        let td = &spec.trust_domain;
        let td_ok = !td.is_empty()
            && td.split('.').all(|l| {
                !l.is_empty()
                    && !l.starts_with('-')
                    && l.chars().all(|c| {
                        c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_'
                    })
            });
        if !td_ok {
            return Err((
                "spec.trustDomain".into(),
                format!("{td:?} is not a trust domain (lower-case DNS name, e.g. cluster.local)"),
            ));
        }
        if spec.root_namespace.is_empty() {
            return Err((
                "spec.rootNamespace".into(),
                "rootNamespace must not be empty".into(),
            ));
        }
        if spec.mtls.mode == PeerMode::Unset {
            return Err((
                "spec.mtls.mode".into(),
                "the mesh mode must be STRICT, PERMISSIVE or DISABLE".into(),
            ));
        }
        check_percent(spec.tracing.sampling, "spec.tracing.sampling")?;
        if let Some(r) = &spec.defaults.retries {
            r.validate("spec.defaults.retries")?;
        }
        if let Some(o) = &spec.defaults.outlier_detection {
            o.validate("spec.defaults.outlierDetection")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::{parse, PeerMode, Resource};
    use std::path::Path;

    const MESH: &str = r#"apiVersion: trellis.dev/v1alpha1
kind: Mesh
metadata: { name: default }
spec:
  trustDomain: edtech.example
  mtls: { mode: PERMISSIVE }
  tracing: { sampling: 10 }
  defaults:
    timeout: 15s
    retries: { attempts: 2, perTryTimeout: 5s, retryOn: "connect-failure,refused-stream" }
    outlierDetection: { consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s }
    connectionPool: { tcp: { connectTimeout: 1s }, http: { http2MaxRequests: 1000 } }
  authorization: { defaultDeny: true }
"#;

    #[test]
    fn mesh_loads_with_defaults() {
        let (ok, errors) = parse(Path::new("x.yaml"), MESH);
        assert!(errors.is_empty(), "{errors:?}");
        let Resource::Mesh(m) = &ok[0].resource else {
            panic!("{ok:?}")
        };
        assert_eq!(m.spec.root_namespace, "istio-system");
        assert_eq!(m.spec.mtls.mode, PeerMode::Permissive);
        assert!(m.spec.authorization.default_deny);
        let minimal = "apiVersion: trellis.dev/v1alpha1\nkind: Mesh\nmetadata: { name: default }\n";
        let (ok, errors) = parse(Path::new("x.yaml"), minimal);
        assert!(errors.is_empty(), "{errors:?}");
        let Resource::Mesh(m) = &ok[0].resource else {
            panic!("{ok:?}")
        };
        assert_eq!(m.spec.trust_domain, "cluster.local");
        assert_eq!(m.spec.mtls.mode, PeerMode::Strict);
        assert_eq!(m.spec.tracing.sampling, 1.0);
    }

    #[test]
    fn errors_name_line_and_field() {
        let cases = [
            (
                "sampling: 10",
                "sampling: 101",
                "x.yaml:7: Mesh/default: spec.tracing.sampling: 101 is not a percentage",
            ),
            (
                "trustDomain: edtech.example",
                "trustDomain: Edtech",
                "x.yaml:5: Mesh/default: spec.trustDomain: \"Edtech\" is not a trust domain",
            ),
            (
                "defaultDeny: true",
                "defaultDeny: true, mode: x",
                "x.yaml:13: Mesh/default: spec.authorization.mode: unknown field `mode`",
            ),
            (
                "trellis.dev/v1alpha1",
                "trellis.dev/v1",
                "x.yaml:1: Mesh/default: apiVersion: unsupported apiVersion \"trellis.dev/v1\"",
            ),
        ];
        for (from, to, want) in cases {
            let (_, errors) = parse(Path::new("x.yaml"), &MESH.replace(from, to));
            let msg = errors.first().map(|e| e.to_string()).unwrap_or_default();
            assert!(msg.starts_with(want), "{msg}\nwant: {want}");
        }
    }
}

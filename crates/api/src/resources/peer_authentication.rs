//! Istio's `PeerAuthentication`: whether a workload's inbound side requires mTLS.
//!
//! Scope follows Istio: a policy in the root namespace without a selector is mesh-wide, one in
//! another namespace without a selector covers that namespace, one with `selector.matchLabels`
//! covers the selected workloads. The most specific wins; `UNSET` inherits from the next
//! broader scope; `portLevelMtls` (workload policies only) overrides per port of the workload
//! (the port its application listens on, as in Istio).

use super::{ObjectMeta, WorkloadSelector};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// apiVersions accepted for this kind.
pub const API_VERSIONS: [&str; 2] = ["security.istio.io/v1", "security.istio.io/v1beta1"];

/// The resource.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthentication {
    /// `security.istio.io/v1` or `v1beta1`.
    pub api_version: String,
    /// `PeerAuthentication`.
    pub kind: String,
    /// Name and namespace.
    pub metadata: ObjectMeta,
    /// The policy.
    #[serde(default)]
    pub spec: PeerAuthenticationSpec,
}

/// `spec` of a PeerAuthentication.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    /// Workloads this applies to; absent: the whole namespace (or mesh, in the root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// The mode for all ports.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MutualTls>,
    /// Per-port overrides, by the workload's port.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub port_level_mtls: BTreeMap<u32, MutualTls>,
}

/// `{ mode: ... }`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MutualTls {
    /// The mode.
    #[serde(default)]
    pub mode: PeerMode,
}

/// Istio's mTLS modes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PeerMode {
    /// Inherit from the broader scope.
    #[default]
    #[serde(rename = "UNSET")]
    Unset,
    /// Plaintext only (TLS passes through to the app).
    #[serde(rename = "DISABLE")]
    Disable,
    /// mTLS and plaintext.
    #[serde(rename = "PERMISSIVE")]
    Permissive,
    /// mTLS only.
    #[serde(rename = "STRICT")]
    Strict,
}

impl PeerAuthentication {
    /// Checks what serde cannot: Istio only allows `portLevelMtls` with a selector.
    pub fn validate(&self) -> Result<(), (String, String)> {
        if !self.spec.port_level_mtls.is_empty() && self.spec.selector.is_none() {
            return Err((
                "spec.portLevelMtls".into(),
                "portLevelMtls needs a workload selector (as in Istio)".into(),
            ));
        }
        if let Some(port) = self
            .spec
            .port_level_mtls
            .keys()
            .find(|p| **p == 0 || **p > 65535)
        {
            return Err((
                format!("spec.portLevelMtls.{port}"),
                "port must be 1..=65535".into(),
            ));
        }
        Ok(())
    }

    fn mode_for(&self, port: u16) -> PeerMode {
        if let Some(m) = self.spec.port_level_mtls.get(&u32::from(port)) {
            if m.mode != PeerMode::Unset {
                return m.mode;
            }
        }
        self.spec.mtls.as_ref().map_or(PeerMode::Unset, |m| m.mode)
    }
}

/// The workload a mode is computed for.
pub struct Workload<'a> {
    /// Its namespace.
    pub namespace: &'a str,
    /// Its labels.
    pub labels: &'a BTreeMap<String, String>,
}

/// The effective mode of `port` on `workload`: workload policy, then namespace policy, then
/// mesh policy (in `root_namespace`), then `default`. Among several policies of the same
/// scope the first one given wins (`trellis analyze` reports such conflicts).
pub fn effective_mode<'a>(
    policies: impl IntoIterator<Item = &'a PeerAuthentication>,
    workload: &Workload<'_>,
    port: u16,
    root_namespace: &str,
    default: PeerMode,
) -> PeerMode {
    let all: Vec<&PeerAuthentication> = policies.into_iter().collect();
    let in_ns = |ns: &str| -> Vec<&PeerAuthentication> {
        all.iter()
            .copied()
            .filter(|p| p.metadata.namespace() == ns)
            .collect()
    };
    let workload_policy = in_ns(workload.namespace).into_iter().find(|p| {
        p.spec
            .selector
            .as_ref()
            .is_some_and(|s| s.matches(workload.labels))
    });
    let namespace_policy = in_ns(workload.namespace)
        .into_iter()
        .find(|p| p.spec.selector.is_none());
    let mesh_policy = in_ns(root_namespace)
        .into_iter()
        .find(|p| p.spec.selector.is_none());
    [workload_policy, namespace_policy, mesh_policy]
        .into_iter()
        .flatten()
        .map(|p| p.mode_for(port))
        .find(|m| *m != PeerMode::Unset)
        .unwrap_or(default)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pa(
        ns: &str,
        selector: Option<(&str, &str)>,
        mode: PeerMode,
        ports: &[(u32, PeerMode)],
    ) -> PeerAuthentication {
        PeerAuthentication {
            api_version: API_VERSIONS[0].into(),
            kind: "PeerAuthentication".into(),
            metadata: ObjectMeta {
                name: "p".into(),
                namespace: Some(ns.into()),
                ..Default::default()
            },
            spec: PeerAuthenticationSpec {
                selector: selector.map(|(k, v)| WorkloadSelector {
                    match_labels: [(k.to_string(), v.to_string())].into(),
                }),
                mtls: Some(MutualTls { mode }),
                port_level_mtls: ports
                    .iter()
                    .map(|(p, m)| (*p, MutualTls { mode: *m }))
                    .collect(),
            },
        }
    }

    #[test]
    fn most_specific_scope_wins_and_unset_inherits() {
        let labels: BTreeMap<String, String> = [("app".to_string(), "grades".to_string())].into();
        let w = Workload {
            namespace: "edtech",
            labels: &labels,
        };
        let mesh = pa("istio-system", None, PeerMode::Strict, &[]);
        let ns = pa("edtech", None, PeerMode::Permissive, &[]);
        let wl = pa(
            "edtech",
            Some(("app", "grades")),
            PeerMode::Unset,
            &[(8080, PeerMode::Disable)],
        );
        let other_ns = pa("other", None, PeerMode::Disable, &[]);
        let mode = |ps: &[&PeerAuthentication], port| {
            effective_mode(
                ps.iter().copied(),
                &w,
                port,
                "istio-system",
                PeerMode::Strict,
            )
        };
        assert_eq!(mode(&[], 80), PeerMode::Strict, "default");
        assert_eq!(mode(&[&mesh], 80), PeerMode::Strict);
        assert_eq!(mode(&[&mesh, &ns], 80), PeerMode::Permissive);
        assert_eq!(
            mode(&[&mesh, &ns, &wl], 80),
            PeerMode::Permissive,
            "UNSET inherits"
        );
        assert_eq!(
            mode(&[&mesh, &ns, &wl], 8080),
            PeerMode::Disable,
            "port level"
        );
        assert_eq!(
            mode(&[&other_ns], 80),
            PeerMode::Strict,
            "other namespaces do not apply"
        );
        let not_me = pa("edtech", Some(("app", "other")), PeerMode::Disable, &[]);
        assert_eq!(mode(&[&not_me], 80), PeerMode::Strict);
    }

    #[test]
    fn port_level_needs_a_selector() {
        assert!(
            pa("edtech", None, PeerMode::Strict, &[(80, PeerMode::Disable)])
                .validate()
                .is_err()
        );
        assert!(pa(
            "edtech",
            Some(("a", "b")),
            PeerMode::Strict,
            &[(80, PeerMode::Disable)]
        )
        .validate()
        .is_ok());
    }
}

//! `trellis.dev/v1alpha1` `RateLimit`: local (per proxy) rate limits on a workload's inbound
//! HTTP requests, as token buckets. Istio has no first-class kind for this.
//!
//! Scope follows AuthorizationPolicy: a RateLimit in the root namespace applies mesh-wide,
//! one elsewhere to its own namespace, and `selector` narrows either to the workloads whose
//! labels match. Each proxy keeps its own buckets (the limit is per workload instance).
//!
//! ```yaml
//! apiVersion: trellis.dev/v1alpha1
//! kind: RateLimit
//! metadata: { name: profile-api, namespace: edtech }
//! spec:
//!   selector: { matchLabels: { app: user-profile } }
//!   limits:
//!   - name: api-reads
//!     requestsPerUnit: 100
//!     unit: SECOND
//!     burst: 20
//!     match:
//!       path: { prefix: /api/ }
//!       method: GET
//! ```

use super::common::{check_non_empty, Invalid, StringMatch};
use super::{ObjectMeta, WorkloadSelector};
use serde::{Deserialize, Serialize};

/// apiVersions accepted for this kind.
pub const API_VERSIONS: [&str; 1] = ["trellis.dev/v1alpha1"];

/// The resource.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimit {
    /// `trellis.dev/v1alpha1`.
    pub api_version: String,
    /// `RateLimit`.
    pub kind: String,
    /// Name and namespace.
    pub metadata: ObjectMeta,
    /// The limits.
    #[serde(default)]
    pub spec: RateLimitSpec,
    /// Server-written status: accepted and ignored.
    #[serde(default, skip_serializing)]
    pub status: Option<serde_yaml_ng::Value>,
}

/// `spec` of a RateLimit.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimitSpec {
    /// Workloads this applies to; absent: the whole namespace (or mesh, in the root namespace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// The limits; a request takes one token from every limit it matches.
    #[serde(default)]
    pub limits: Vec<Limit>,
}

/// One token bucket.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limit {
    /// Name, for metrics and logs (`namespace/name/limit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Tokens added per `unit` (> 0).
    pub requests_per_unit: u64,
    /// The refill period.
    pub unit: Unit,
    /// Bucket size (> 0); `requestsPerUnit` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub burst: Option<u64>,
    /// Which requests count; absent: every request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r#match: Option<LimitMatch>,
}

impl Limit {
    /// The bucket size.
    pub fn capacity(&self) -> u64 {
        self.burst.unwrap_or(self.requests_per_unit)
    }
}

/// The refill period of a limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Unit {
    /// Per second.
    #[default]
    Second,
    /// Per minute.
    Minute,
    /// Per hour.
    Hour,
}

impl Unit {
    /// The period in seconds.
    pub fn seconds(self) -> u64 {
        match self {
            Unit::Second => 1,
            Unit::Minute => 60,
            Unit::Hour => 3600,
        }
    }
}

/// Request attributes a limit applies to; every given one must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LimitMatch {
    /// The (normalized) path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<StringMatch>,
    /// The method, exactly (`GET`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
}

impl RateLimit {
    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), Invalid> {
        check_non_empty(&self.metadata.name, "metadata.name", "name")?;
        if self.spec.limits.is_empty() {
            return Err((
                "spec.limits".into(),
                "at least one limit is required".into(),
            ));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, l) in self.spec.limits.iter().enumerate() {
            let at = format!("spec.limits[{i}]");
            if let Some(n) = &l.name {
                check_non_empty(n, &format!("{at}.name"), "name")?;
                if !names.insert(n.as_str()) {
                    return Err((format!("{at}.name"), format!("duplicate limit name {n:?}")));
                }
            }
            if l.requests_per_unit == 0 {
                return Err((
                    format!("{at}.requestsPerUnit"),
                    "requestsPerUnit must be greater than 0".into(),
                ));
            }
            if l.burst == Some(0) {
                return Err((format!("{at}.burst"), "burst must be greater than 0".into()));
            }
            if let Some(m) = &l.r#match {
                if let Some(p) = &m.path {
                    p.validate(&format!("{at}.match.path"), false)?;
                }
                if let Some(method) = &m.method {
                    check_non_empty(method, &format!("{at}.match.method"), "method")?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::resources::{parse, Resource};
    use std::path::Path;

    const EXAMPLE: &str = "apiVersion: trellis.dev/v1alpha1\nkind: RateLimit\nmetadata: { name: profile-api, namespace: edtech }\nspec:\n  selector: { matchLabels: { app: user-profile } }\n  limits:\n  - name: api-reads\n    requestsPerUnit: 100\n    unit: SECOND\n    burst: 20\n    match:\n      path: { prefix: /api/ }\n      method: GET\n  - requestsPerUnit: 1000\n    unit: HOUR\n";

    #[test]
    fn parses_the_documented_example() {
        let (ok, errors) = parse(Path::new("rl.yaml"), EXAMPLE);
        assert!(errors.is_empty(), "{errors:?}");
        let Resource::RateLimit(r) = &ok[0].resource else {
            panic!("{:?}", ok[0].resource)
        };
        assert_eq!(r.metadata.namespace(), "edtech");
        assert_eq!(r.spec.limits.len(), 2);
        let l = &r.spec.limits[0];
        assert_eq!(l.name.as_deref(), Some("api-reads"));
        assert_eq!((l.requests_per_unit, l.capacity()), (100, 20));
        assert_eq!(l.unit.seconds(), 1);
        let m = l.r#match.as_ref().unwrap();
        assert_eq!(m.method.as_deref(), Some("GET"));
        assert_eq!(m.path.as_ref().unwrap().prefix.as_deref(), Some("/api/"));
        assert_eq!(r.spec.limits[1].capacity(), 1000);
        assert_eq!(r.spec.limits[1].unit.seconds(), 3600);
    }

    fn error_of(spec: &str) -> String {
        let text = format!(
            "apiVersion: trellis.dev/v1alpha1\nkind: RateLimit\nmetadata: {{ name: r }}\nspec:\n{spec}"
        );
        let (ok, errors) = parse(Path::new("rl.yaml"), &text);
        assert!(ok.is_empty(), "{ok:?}");
        errors[0].to_string()
    }

    #[test]
    fn bad_fields_are_named() {
        let e = error_of("  limits: [{ requestsPerUnit: 5, unit: DAY }]\n");
        assert!(
            e.contains("spec.limits[0].unit: unknown variant `DAY`"),
            "{e}"
        );
        let e = error_of("  limits: [{ requestsPerUnit: 0, unit: SECOND }]\n");
        assert!(
            e.contains("spec.limits[0].requestsPerUnit: requestsPerUnit must be greater than 0"),
            "{e}"
        );
        let e = error_of("  limits: [{ requestsPerUnit: 5, unit: SECOND, burst: 0 }]\n");
        assert!(
            e.contains("spec.limits[0].burst: burst must be greater than 0"),
            "{e}"
        );
        let e = error_of(
            "  limits: [{ requestsPerUnit: 5, unit: MINUTE, match: { path: { regex: \"(\" } } }]\n",
        );
        assert!(
            e.contains("spec.limits[0].match.path.regex: invalid regex"),
            "{e}"
        );
        let e = error_of("  limits: [{ requestsPerUnit: 5, unit: SECOND, perIp: true }]\n");
        assert!(e.contains("unknown field `perIp`"), "{e}");
        let e = error_of("  limits: []\n");
        assert!(e.contains("spec.limits: at least one limit"), "{e}");
        let e = error_of("  limits: [{ unit: SECOND }]\n");
        assert!(e.contains("requestsPerUnit"), "{e}");
    }
}

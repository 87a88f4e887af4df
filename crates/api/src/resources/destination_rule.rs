//! Istio's `DestinationRule`: what happens to traffic for a service after routing — subsets
//! (named groups of endpoints by label) and their traffic policies (see
//! [`super::traffic_policy`]).

use super::common::{check_non_empty, Invalid};
use super::traffic_policy::TrafficPolicy;
use super::{ObjectMeta, WorkloadSelector};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// apiVersions accepted for this kind.
pub const API_VERSIONS: [&str; 3] = super::virtual_service::API_VERSIONS;

/// The resource.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationRule {
    /// `networking.istio.io/v1` (or `v1beta1`, `v1alpha3`).
    pub api_version: String,
    /// `DestinationRule`.
    pub kind: String,
    /// Name and namespace.
    pub metadata: ObjectMeta,
    /// The rule.
    #[serde(default)]
    pub spec: DestinationRuleSpec,
    /// Server-written status: accepted and ignored.
    #[serde(default, skip_serializing)]
    pub status: Option<serde_yaml_ng::Value>,
}

/// `spec` of a DestinationRule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DestinationRuleSpec {
    /// The service host (`reviews`, `reviews.prod.svc.cluster.local`, `*.example.com`).
    #[serde(default)]
    pub host: String,
    /// Policies for all traffic to the host (boxed: it is large).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<Box<TrafficPolicy>>,
    /// Named subsets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subsets: Vec<Subset>,
    /// Namespaces this is visible to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub export_to: Vec<String>,
    /// Client workloads this applies to (absent: all in scope).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload_selector: Option<WorkloadSelector>,
}

/// A named group of the service's endpoints.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Subset {
    /// Name, referenced by VirtualService destinations.
    pub name: String,
    /// Endpoint labels that select the subset.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Policies overriding the host's for this subset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_policy: Option<TrafficPolicy>,
}

/// Annotation that turns on latency outlier detection (a Trellis extension; Istio has no
/// field for it): eject an endpoint whose recent p99 is this many times its peers' median.
pub const LATENCY_OUTLIER_ANNOTATION: &str = "trellis.dev/latency-outlier-ratio";

impl DestinationRule {
    /// The ratio of [`LATENCY_OUTLIER_ANNOTATION`] in hundredths (`"3"` is 300), if set.
    pub fn latency_outlier_ratio(&self) -> Result<Option<u32>, Invalid> {
        let Some(v) = self.metadata.annotations.get(LATENCY_OUTLIER_ANNOTATION) else {
            return Ok(None);
        };
        match v.trim().parse::<f64>() {
            Ok(r) if (1.5..=100.0).contains(&r) => Ok(Some((r * 100.0).round() as u32)),
            _ => Err((
                format!("metadata.annotations[{LATENCY_OUTLIER_ANNOTATION}]"),
                format!("{v:?}: must be a number from 1.5 to 100 (times the peers' median p99)"),
            )),
        }
    }

    /// Checks host, unique subset names and the traffic policies.
    pub fn validate(&self) -> Result<(), Invalid> {
        let spec = &self.spec;
        check_non_empty(&spec.host, "spec.host", "host")?;
        self.latency_outlier_ratio()?;
        if let Some(tp) = &spec.traffic_policy {
            tp.validate("spec.trafficPolicy")?;
        }
        let mut names = BTreeSet::new();
        for (i, s) in spec.subsets.iter().enumerate() {
            let path = format!("spec.subsets[{i}]");
            check_non_empty(&s.name, &format!("{path}.name"), "subset name")?;
            if !names.insert(s.name.as_str()) {
                return Err((
                    format!("{path}.name"),
                    format!("duplicate subset {:?}", s.name),
                ));
            }
            if let Some(tp) = &s.traffic_policy {
                tp.validate(&format!("{path}.trafficPolicy"))?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::load_balancer::SimpleLb;
    use super::super::traffic_policy::TlsMode;
    use super::super::{parse, Resource};
    use std::path::Path;

    const RULE: &str = r#"apiVersion: networking.istio.io/v1beta1
kind: DestinationRule
metadata:
  name: reviews
  namespace: bookinfo
spec:
  host: reviews.bookinfo.svc.cluster.local
  trafficPolicy:
    loadBalancer:
      simple: LEAST_REQUEST
    connectionPool:
      tcp:
        maxConnections: 100
        connectTimeout: 30ms
        tcpKeepalive: { time: 7200s, interval: 75s }
      http:
        http1MaxPendingRequests: 1024
        http2MaxRequests: 1024
        maxRequestsPerConnection: 10
        maxRetries: 3
        idleTimeout: 90s
        h2UpgradePolicy: UPGRADE
    outlierDetection:
      consecutive5xxErrors: 7
      consecutiveGatewayErrors: 5
      interval: 5m
      baseEjectionTime: 15m
      maxEjectionPercent: 50
      minHealthPercent: 30
    tls:
      mode: ISTIO_MUTUAL
    portLevelSettings:
    - port: { number: 9080 }
      loadBalancer:
        consistentHash:
          httpCookie: { name: user, ttl: 0s }
          ringHash: { minimumRingSize: 1024 }
  subsets:
  - name: v1
    labels: { version: v1 }
  - name: v2
    labels: { version: v2 }
    trafficPolicy:
      loadBalancer: { simple: ROUND_ROBIN }
"#;

    #[test]
    fn subsets_pool_and_outlier_detection_load() {
        let (ok, errors) = parse(Path::new("x.yaml"), RULE);
        assert!(errors.is_empty(), "{errors:?}");
        let Resource::DestinationRule(dr) = &ok[0].resource else {
            panic!("{ok:?}")
        };
        let tp = dr.spec.traffic_policy.as_ref().unwrap();
        assert_eq!(tp.tls.as_ref().map(|t| t.mode), Some(TlsMode::IstioMutual));
        let od = tp.outlier_detection.as_ref().unwrap();
        assert_eq!(od.consecutive_5xx_errors, Some(7));
        assert_eq!(dr.spec.subsets.len(), 2);
        let v2 = dr.spec.subsets[1].traffic_policy.as_ref().unwrap();
        assert_eq!(
            v2.load_balancer.as_ref().unwrap().simple,
            Some(SimpleLb::RoundRobin)
        );
    }

    #[test]
    fn errors_name_line_and_field() {
        let cases = [
            ("name: v2", "name: v1", "x.yaml:41: DestinationRule/reviews: spec.subsets[1].name: duplicate subset"),
            ("maxEjectionPercent: 50", "maxEjectionPercent: 150", "x.yaml:28: DestinationRule/reviews: spec.trafficPolicy.outlierDetection.maxEjectionPercent: 150 is not a percentage"),
            ("simple: LEAST_REQUEST", "simple: FASTEST", "x.yaml:10: DestinationRule/reviews: spec.trafficPolicy.loadBalancer.simple: unknown variant `FASTEST`"),
            ("httpCookie: { name: user, ttl: 0s }", "httpCookie: { name: user }\n          useSourceIp: true", "x.yaml:36: DestinationRule/reviews: spec.trafficPolicy.portLevelSettings[0].loadBalancer.consistentHash: set exactly one"),
            ("maxRetries: 3", "maxRetry: 3", "x.yaml:20: DestinationRule/reviews: spec.trafficPolicy.connectionPool.http.maxRetry: unknown field `maxRetry`"),
            ("mode: ISTIO_MUTUAL", "mode: ISTIO_MUTUAL\n    tunnel: { protocol: CONNECT }", "x.yaml:32: DestinationRule/reviews: spec.trafficPolicy.tunnel: not supported"),
        ];
        for (from, to, want) in cases {
            let (_, errors) = parse(Path::new("x.yaml"), &RULE.replace(from, to));
            let msg = errors.first().map(|e| e.to_string()).unwrap_or_default();
            assert!(msg.starts_with(want), "{msg}\nwant: {want}");
        }
    }
}

//! Upstream services: their endpoints, how one is picked, and name lookup by host.

pub mod limits;
pub mod outlier;
pub mod pool;

use crate::balance::{hash_key, Balancer, HashOn, Policy};
use crate::route::VirtualHost;
use crate::telemetry::metrics::{HttpStats, Peer};
use http::HeaderValue;
use limits::{ClusterLimits, Limiter, Overflow, Permit};
use outlier::{Outcome, OutlierConfig, OutlierDetector};
use pool::EndpointConns;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;
use trellis_api::names::{HostName, ServiceKey};

/// How a cluster spreads requests over its endpoints: the policy, and what a
/// consistent-hash policy hashes. The default is peak-EWMA P2C. Also carries the cluster's
/// circuit breaking and outlier detection ([`Resilience`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Balancing {
    /// The algorithm.
    pub policy: Policy,
    /// The affinity key of a consistent-hash policy ([`HashOn::None`] otherwise).
    pub hash_on: HashOn,
    /// Connection pool limits and outlier detection.
    pub resilience: Resilience,
}

/// A cluster's DestinationRule `connectionPool` and `outlierDetection`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resilience {
    /// Circuit breaking limits (default: none).
    pub limits: ClusterLimits,
    /// Outlier detection (`None`: off).
    pub outlier: Option<OutlierConfig>,
}

impl From<(Policy, HashOn)> for Balancing {
    fn from((policy, hash_on): (Policy, HashOn)) -> Self {
        Self {
            policy,
            hash_on,
            resilience: Resilience::default(),
        }
    }
}

/// A cluster the proxy forwards to: an upstream service, a subset of its endpoints, or the
/// local app for inbound traffic.
pub struct Service {
    /// Name and namespace.
    pub key: ServiceKey,
    /// The DestinationRule subset this cluster is, if it is one.
    pub subset: Option<Arc<str>>,
    /// The service as metrics label it.
    pub peer: Peer,
    /// Response-header timeout; 504 past it.
    pub timeout: Option<Duration>,
    /// Request metrics for traffic to this service.
    pub stats: Arc<HttpStats>,
    /// Retries allowed to this cluster (shared by every route that sends here).
    pub retry_budget: crate::resilience::budget::RetryBudget,
    balancer: Balancer<EndpointConns>,
    hash_on: HashOn,
    /// For a cookie policy with a `ttl`: what follows `name=value` in a generated cookie's
    /// `Set-Cookie` (`; Path=..; Max-Age=..; HttpOnly`).
    cookie_attributes: Option<String>,
    /// Circuit breaking: admission of requests.
    limiter: Limiter,
    /// Ejection of failing endpoints (by index in [`Service::endpoints`]).
    outlier: Option<OutlierDetector>,
    /// The settings it was built with, to tell whether a new config changes it.
    settings: Balancing,
}

/// The endpoint [`Service::pick_for`] chose for a request.
pub struct Picked {
    /// The endpoint; `None` when the cluster has none.
    pub endpoint: Option<Arc<EndpointConns>>,
    /// A `Set-Cookie` value to add to the response: the request lacked the affinity cookie of
    /// a cookie policy with a `ttl`, so one was made up (and hashed for this pick) for its
    /// next requests to carry.
    pub set_cookie: Option<HeaderValue>,
}

impl Service {
    /// A service over the given endpoints, balanced by the default policy (peak-EWMA P2C).
    pub fn new(
        key: ServiceKey,
        endpoints: Vec<Arc<EndpointConns>>,
        timeout: Option<Duration>,
        stats: Arc<HttpStats>,
    ) -> Self {
        Self {
            peer: Peer::new(&key.name, &key.namespace),
            key,
            subset: None,
            timeout,
            stats,
            retry_budget: Default::default(),
            balancer: Balancer::new(Policy::default(), endpoints),
            hash_on: HashOn::None,
            cookie_attributes: None,
            limiter: Limiter::default(),
            outlier: None,
            settings: Balancing::default(),
        }
    }

    /// Whether this cluster is what a new config would build again: the same subset,
    /// endpoints (the same pooled endpoints, in order), timeout and balancing settings. Such
    /// a cluster is kept across config versions, with its retry budget, circuit-breaker
    /// counts and outlier ejections.
    pub fn is_built_as(
        &self,
        subset: Option<&str>,
        endpoints: &[Arc<EndpointConns>],
        timeout: Option<Duration>,
        balancing: &Balancing,
    ) -> bool {
        self.subset.as_deref() == subset
            && self.timeout == timeout
            && self.settings == *balancing
            && self.endpoints().len() == endpoints.len()
            && self
                .endpoints()
                .iter()
                .zip(endpoints)
                .all(|(a, b)| Arc::ptr_eq(a, b))
    }

    /// The same service balanced by `balancing` (builds its hash ring or table, if any).
    pub fn with_balancing(mut self, balancing: Balancing) -> Self {
        self.settings = balancing.clone();
        let endpoints = self.balancer.endpoints().clone();
        self.balancer = Balancer::new(balancing.policy, endpoints);
        self.cookie_attributes = match &balancing.hash_on {
            HashOn::Cookie {
                path,
                ttl: Some(ttl),
                ..
            } => {
                let mut attrs = String::new();
                if let Some(p) = path {
                    attrs.push_str("; Path=");
                    attrs.push_str(p);
                }
                // A zero ttl makes a session cookie (as in Istio); otherwise whole seconds,
                // rounded up so that a sub-second ttl does not expire the cookie at once.
                if !ttl.is_zero() {
                    let secs = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
                    attrs.push_str(&format!("; Max-Age={secs}"));
                }
                attrs.push_str("; HttpOnly");
                Some(attrs)
            }
            _ => None,
        };
        self.hash_on = balancing.hash_on;
        let Resilience { limits, outlier } = balancing.resilience;
        for ep in self.balancer.endpoints().iter() {
            ep.tune(
                limits.connect_timeout,
                limits.idle_timeout,
                limits.max_requests_per_connection,
            );
        }
        self.limiter = Limiter::new(limits);
        self.outlier = outlier.map(|cfg| OutlierDetector::new(cfg, self.endpoints().len()));
        self
    }

    /// Admits a request under the cluster's `connectionPool` limits (see [`limits`]); an
    /// overflow is counted in `trellis_overflow_total{kind}`. Hold the permit until the
    /// response ends.
    pub async fn admit(&self) -> Result<Permit, Overflow> {
        let admitted = self.limiter.admit().await;
        if let Err(o) = &admitted {
            self.stats.overflow(o.kind());
        }
        admitted
    }

    /// Admits a TCP connection or tunnel under `tcp.maxConnections` (see [`limits`]); an
    /// overflow is counted in `trellis_overflow_total{kind="connections"}`. Hold the permit
    /// while the connection lasts.
    pub fn admit_connection(&self) -> Result<Permit, Overflow> {
        let admitted = self.limiter.admit_connection();
        if let Err(o) = &admitted {
            self.stats.overflow(o.kind());
        }
        admitted
    }

    /// The enforced `connectionPool` settings.
    pub fn limits(&self) -> &ClusterLimits {
        self.limiter.limits()
    }

    /// Reports the result of an exchange with `endpoint` to outlier detection; an ejection
    /// is counted in `trellis_outlier_ejections_total`.
    /// `latency` is the time to the response head (or to a per-try timeout), for latency
    /// outliers.
    pub fn report(
        &self,
        endpoint: &Arc<EndpointConns>,
        outcome: Outcome,
        latency: Option<std::time::Duration>,
    ) {
        let Some(od) = &self.outlier else { return };
        let endpoints = self.endpoints();
        let Some(i) = endpoints.iter().position(|e| Arc::ptr_eq(e, endpoint)) else {
            return;
        };
        if od.report(i, outcome) {
            self.stats.outlier_ejected();
            tracing::info!(service = %self.key, endpoint = %endpoint.addr(), ?outcome, "endpoint ejected by outlier detection");
        }
        for j in latency.map(|l| od.record_latency(i, l)).unwrap_or_default() {
            self.stats.outlier_ejected();
            tracing::info!(service = %self.key, endpoint = %endpoints[j].addr(), "endpoint ejected by outlier detection: its p99 latency is an outlier");
        }
    }

    /// Whether `endpoint` is ejected by outlier detection now.
    pub fn is_ejected(&self, endpoint: &Arc<EndpointConns>) -> bool {
        let Some(od) = &self.outlier else {
            return false;
        };
        self.endpoints()
            .iter()
            .position(|e| Arc::ptr_eq(e, endpoint))
            .is_some_and(|i| od.is_ejected(i))
    }

    /// The balancing policy.
    pub fn policy(&self) -> Policy {
        self.balancer.policy()
    }

    /// The endpoints, in the order given.
    pub fn endpoints(&self) -> &[Arc<EndpointConns>] {
        self.balancer.endpoints()
    }

    /// The endpoint for the next request; `None` when the service has none. `hash_key`
    /// (from [`Service::hash_key`]) is what consistent-hash policies hash; the others
    /// ignore it, and consistent hashing without one picks at random.
    /// Endpoints ejected by outlier detection are skipped while others are in service.
    pub fn pick(&self, hash_key: Option<u64>) -> Option<&Arc<EndpointConns>> {
        let first = self.balancer.pick(hash_key)?;
        let i = match &self.outlier {
            Some(od) => od.choose(first, || self.balancer.pick(hash_key)),
            None => first,
        };
        self.endpoints().get(i)
    }

    /// The affinity hash of a request from `source` under this service's consistent-hash
    /// policy: its header, cookie, query parameter or client address (`None` when not
    /// hashing, when the request lacks it, or for source-IP hashing without a `source`).
    pub fn hash_key<B>(&self, req: &http::Request<B>, source: Option<IpAddr>) -> Option<u64> {
        match (&self.hash_on, source) {
            (HashOn::None, _) | (HashOn::SourceIp, None) => None,
            (on, source) => on.key_of(req, source.unwrap_or(IpAddr::from([0, 0, 0, 0]))),
        }
    }

    /// [`pick`](Self::pick) with the request's [`hash_key`](Self::hash_key). A request
    /// lacking the cookie of a cookie policy with a `ttl` gets a random 128-bit token as its
    /// key, and [`Picked::set_cookie`] sets it, as Istio (Envoy) does.
    pub fn pick_for<B>(&self, req: &http::Request<B>, source: IpAddr) -> Picked {
        let mut key = self.hash_key(req, Some(source));
        let mut set_cookie = None;
        if let (None, Some(attrs), HashOn::Cookie { name, .. }) =
            (key, &self.cookie_attributes, &self.hash_on)
        {
            let token = format!("{:016x}{:016x}", fastrand::u64(..), fastrand::u64(..));
            key = Some(hash_key(token.as_bytes()));
            set_cookie = HeaderValue::try_from(format!("{name}={token}{attrs}")).ok();
        }
        Picked {
            endpoint: self.pick(key).cloned(),
            set_cookie,
        }
    }
}

/// Why a host did not lead to a service.
#[derive(Debug, thiserror::Error)]
pub enum LookupError {
    /// Not a service host at all.
    #[error(transparent)]
    Host(#[from] trellis_api::names::HostError),
    /// A well-formed name this proxy has no upstream for.
    #[error("no upstream service {0} is configured")]
    Unknown(String),
    /// A bare name that exists in several namespaces.
    #[error("{0} is ambiguous: it exists in several namespaces; use {0}.<namespace>")]
    Ambiguous(String),
}

/// Upstream services by name, for routing by `Host` / `:authority`.
#[derive(Default)]
pub struct ServiceTable {
    by_key: HashMap<ServiceKey, Arc<VirtualHost>>,
    /// Hosts outside the mesh's naming (ServiceEntry), lower case, without port.
    by_host: HashMap<String, ServiceKey>,
    namespace: String,
    cluster_domain: String,
}

impl ServiceTable {
    /// A table over `services`; bare names resolve in `namespace` first. `hosts` are extra
    /// exact host names (ServiceEntry) for some of them.
    pub fn new(
        services: HashMap<ServiceKey, Arc<VirtualHost>>,
        hosts: Vec<(String, ServiceKey)>,
        namespace: &str,
        cluster_domain: &str,
    ) -> Self {
        Self {
            by_key: services,
            by_host: hosts
                .into_iter()
                .map(|(h, k)| (h.to_ascii_lowercase(), k))
                .collect(),
            namespace: namespace.to_string(),
            cluster_domain: cluster_domain.to_string(),
        }
    }

    /// The service an external (ServiceEntry) host names.
    pub fn external(&self, host: &str) -> Option<&ServiceKey> {
        let bare = strip_port(host).trim_end_matches('.').to_ascii_lowercase();
        self.by_host.get(&bare)
    }

    /// The service with this exact name and namespace.
    pub fn get(&self, key: &ServiceKey) -> Option<&Arc<VirtualHost>> {
        self.by_key.get(key)
    }

    /// The service a host names: `svc`, `svc.ns`, `svc.ns.svc.<domain>`, any case, any port.
    /// A bare `svc` means this proxy's namespace, or the only namespace that has it.
    pub fn resolve(&self, host: &str) -> Result<&Arc<VirtualHost>, LookupError> {
        if let Some(s) = self.external(host).and_then(|k| self.by_key.get(k)) {
            return Ok(s);
        }
        let h = HostName::parse(host, &self.cluster_domain)?;
        if let Some(ns) = &h.namespace {
            return self
                .by_key
                .get(&ServiceKey::new(&h.name, ns))
                .ok_or_else(|| LookupError::Unknown(format!("{}.{}", h.name, ns)));
        }
        if let Some(s) = self.by_key.get(&ServiceKey::new(&h.name, &self.namespace)) {
            return Ok(s);
        }
        let mut found = self.by_key.values().filter(|s| s.key.name == h.name);
        match (found.next(), found.next()) {
            (Some(s), None) => Ok(s),
            (Some(_), Some(_)) => Err(LookupError::Ambiguous(h.name)),
            _ => Err(LookupError::Unknown(h.name)),
        }
    }

    /// Every service in the table.
    pub fn services(&self) -> impl Iterator<Item = &Arc<VirtualHost>> {
        self.by_key.values()
    }

    /// Every cluster the table's hosts use (services and subsets), by key and subset.
    pub fn clusters(&self) -> HashMap<(ServiceKey, Option<Arc<str>>), Arc<Service>> {
        self.by_key
            .values()
            .flat_map(|h| h.clusters())
            .map(|c| ((c.key.clone(), c.subset.clone()), c.clone()))
            .collect()
    }
}

/// `host` without a `:port` suffix (IPv6 literals keep their brackets).
fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((h, p))
            if !h.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) && !h.ends_with(':') =>
        {
            h
        }
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::hash_ip;
    use crate::telemetry::Metrics;
    use pool::{Pool, PoolConfig};

    fn service(n: u8, balancing: Balancing) -> Service {
        let pool = Pool::new(PoolConfig {
            metrics: Arc::default(),
            connect_timeout: Duration::from_secs(1),
            idle_timeout: Duration::from_secs(60),
        });
        let endpoints = (1..=n)
            .map(|i| pool.endpoint(([10, 0, 0, i], 8080).into(), None))
            .collect();
        let key = ServiceKey::new("users", "default");
        let stats = Metrics::default().http_stats("outbound", Peer::new("users", "default"));
        Service::new(key, endpoints, None, stats).with_balancing(balancing)
    }

    fn cookie_policy(ttl: Option<Duration>) -> Balancing {
        Balancing {
            policy: Policy::RING_HASH,
            hash_on: HashOn::Cookie {
                name: "affinity".into(),
                path: Some("/".into()),
                ttl,
            },
            resilience: Resilience::default(),
        }
    }

    fn get(cookie: Option<&str>) -> http::Request<()> {
        let mut b = http::Request::get("/");
        if let Some(c) = cookie {
            b = b.header("cookie", c);
        }
        b.body(()).unwrap()
    }

    const SRC: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 9, 9, 9));

    #[test]
    fn the_default_policy_is_p2c_and_picks_every_endpoint() {
        let s = service(3, Balancing::default());
        assert_eq!(s.policy(), Policy::P2cPeakEwma);
        assert_eq!(s.hash_key(&get(None), Some(SRC)), None);
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            seen.insert(s.pick_for(&get(None), SRC).endpoint.unwrap().addr());
        }
        assert_eq!(seen.len(), 3);
        assert!(service(0, Balancing::default()).pick(None).is_none());
    }

    #[test]
    fn round_robin_takes_turns() {
        let s = service(3, (Policy::RoundRobin, HashOn::None).into());
        let picks: Vec<_> = (0..6).map(|_| s.pick(None).unwrap().addr()).collect();
        assert_eq!(picks[..3], picks[3..]);
        assert_ne!(picks[0], picks[1]);
        assert_ne!(picks[1], picks[2]);
        assert_ne!(picks[0], picks[2]);
    }

    #[test]
    fn source_ip_affinity_needs_a_source() {
        let s = service(5, (Policy::MAGLEV, HashOn::SourceIp).into());
        assert_eq!(s.hash_key(&get(None), Some(SRC)), Some(hash_ip(SRC)));
        assert_eq!(s.hash_key(&get(None), None), None);
        let first = s.pick_for(&get(None), SRC).endpoint.unwrap().addr();
        for _ in 0..20 {
            assert_eq!(s.pick_for(&get(None), SRC).endpoint.unwrap().addr(), first);
        }
    }

    #[test]
    fn a_missing_cookie_with_a_ttl_is_generated_and_then_sticks() {
        let s = service(5, cookie_policy(Some(Duration::from_secs(60))));
        let picked = s.pick_for(&get(None), SRC);
        let set = picked.set_cookie.expect("a cookie is generated");
        let set = set.to_str().unwrap();
        let (pair, attrs) = set.split_once(';').unwrap();
        assert_eq!(attrs, " Path=/; Max-Age=60; HttpOnly");
        let token = pair.strip_prefix("affinity=").unwrap();
        assert_eq!(token.len(), 32);
        assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
        // The pick used the generated value: sending it back lands on the same endpoint.
        let first = picked.endpoint.unwrap().addr();
        for _ in 0..20 {
            let again = s.pick_for(&get(Some(&format!("x=1; {pair}"))), SRC);
            assert!(again.set_cookie.is_none(), "the client has the cookie");
            assert_eq!(again.endpoint.unwrap().addr(), first);
        }
        // Tokens differ between clients.
        let other = s.pick_for(&get(None), SRC).set_cookie.unwrap();
        assert_ne!(other.to_str().unwrap(), set);
    }

    #[test]
    fn a_zero_ttl_makes_a_session_cookie_and_no_ttl_none() {
        let s = service(3, cookie_policy(Some(Duration::ZERO)));
        let set = s.pick_for(&get(None), SRC).set_cookie.unwrap();
        assert!(
            set.to_str().unwrap().ends_with("; Path=/; HttpOnly"),
            "{set:?}"
        );
        let s = service(3, cookie_policy(Some(Duration::from_millis(1500))));
        let set = s.pick_for(&get(None), SRC).set_cookie.unwrap();
        assert!(set.to_str().unwrap().contains("; Max-Age=2;"), "{set:?}");
        let s = service(3, cookie_policy(None));
        let picked = s.pick_for(&get(None), SRC);
        assert!(picked.set_cookie.is_none());
        assert!(picked.endpoint.is_some(), "no key: a random endpoint");
    }
}

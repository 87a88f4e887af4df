//! The golden-signal metrics of DESIGN.md, on one registry passed around (no globals).
//!
//! Cardinality is bounded: label values are known service names (never raw hosts or paths),
//! and every series remembers when it was last used; [`Metrics::sweep`] drops series idle
//! longer than the retention (10 minutes by default). Hot-path handles ([`HttpStats`],
//! [`TcpConn`]) are resolved once per destination or connection, so a request costs one
//! small map lookup under an uncontended lock rather than hashing every label.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// `inbound` or `outbound`.
pub type Direction = &'static str;

/// Label value used when the peer is not known (plaintext inbound traffic).
pub const UNKNOWN: &str = "unknown";

/// Upper bounds of the request duration histogram, in seconds.
const DURATION_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HttpLabels {
    direction: Direction,
    source_service: Arc<str>,
    source_namespace: Arc<str>,
    destination_service: Arc<str>,
    destination_namespace: Arc<str>,
    response_code: u16,
    grpc_status: Option<u16>,
    tls: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DurationLabels {
    direction: Direction,
    source_service: Arc<str>,
    source_namespace: Arc<str>,
    destination_service: Arc<str>,
    destination_namespace: Arc<str>,
    tls: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TcpLabels {
    direction: Direction,
    peer_service: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn duration_histogram() -> Histogram {
    Histogram::new(DURATION_BUCKETS)
}

/// A service as it appears in labels.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Peer {
    /// Service name.
    pub service: Arc<str>,
    /// Namespace.
    pub namespace: Arc<str>,
}

impl Peer {
    /// A named peer.
    pub fn new(service: &str, namespace: &str) -> Self {
        Self {
            service: service.into(),
            namespace: namespace.into(),
        }
    }

    /// The peer we cannot name (plaintext inbound).
    pub fn unknown() -> Self {
        Self::new(UNKNOWN, UNKNOWN)
    }
}

struct Families {
    requests: Family<HttpLabels, Counter>,
    durations: HistogramFamily<DurationLabels>,
    tcp_open: Family<TcpLabels, Gauge>,
    tcp_total: Family<TcpLabels, Counter>,
    tcp_bytes: Family<TcpLabels, Counter>,
    tls_failures: Family<ReasonLabels, Counter>,
    authz: Family<AuthzLabels, Counter>,
    retries: Family<DestinationLabels, Counter>,
    retry_budget_exhausted: Family<DestinationLabels, Counter>,
    overflow: Family<KindLabels, Counter>,
    outlier_ejections: Family<DestinationLabels, Counter>,
    ratelimited: Family<LimitLabels, Counter>,
    mirrored: Family<DestinationLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LimitLabels {
    limit: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DestinationLabels {
    destination_service: Arc<str>,
    destination_namespace: Arc<str>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuthzLabels {
    action: &'static str,
    policy: Arc<str>,
}

/// The proxy's metrics registry and the families the request path writes to.
pub struct Metrics {
    registry: Registry,
    families: Arc<Families>,
    clock: Instant,
    http: Mutex<Vec<Arc<HttpStats>>>,
    tcp: Mutex<HashMap<TcpLabels, Arc<TcpStats>>>,
    /// `trellis_proxy_config_version`: the pushed config version running (0: none).
    pub config_version: prometheus_client::metrics::gauge::Gauge,
    /// `trellis_control_plane_connected`: 1 while the config stream is up.
    pub control_plane_connected: prometheus_client::metrics::gauge::Gauge,
}

impl Metrics {
    /// Creates the registry with the HTTP, TCP and process metrics.
    pub fn new() -> Self {
        let families = Arc::new(Families {
            requests: Family::default(),
            durations: Family::new_with_constructor(duration_histogram as fn() -> Histogram),
            tcp_open: Family::default(),
            tcp_total: Family::default(),
            tcp_bytes: Family::default(),
            tls_failures: Family::default(),
            authz: Family::default(),
            retries: Family::default(),
            retry_budget_exhausted: Family::default(),
            overflow: Family::default(),
            outlier_ejections: Family::default(),
            ratelimited: Family::default(),
            mirrored: Family::default(),
        });
        let mut registry = Registry::default();
        registry.register(
            "trellis_http_requests",
            "HTTP requests completed, by response code and gRPC status",
            families.requests.clone(),
        );
        registry.register(
            "trellis_http_request_duration_seconds",
            "Time from the request's arrival to the end of its response",
            families.durations.clone(),
        );
        registry.register(
            "trellis_tcp_connections_open",
            "Connections currently open",
            families.tcp_open.clone(),
        );
        registry.register(
            "trellis_tcp_connections",
            "Connections accepted or opened",
            families.tcp_total.clone(),
        );
        registry.register(
            "trellis_tcp_bytes",
            "Bytes read and written on proxied connections",
            families.tcp_bytes.clone(),
        );
        registry.register(
            "trellis_tls_handshake_failures",
            "mTLS handshakes that failed, and plaintext refused under STRICT, by reason",
            families.tls_failures.clone(),
        );
        registry.register(
            "trellis_authz_decisions",
            "Authorization decisions of the inbound side, by action and deciding policy",
            families.authz.clone(),
        );
        registry.register(
            "trellis_retries",
            "Requests sent again after a failed attempt, by destination",
            families.retries.clone(),
        );
        registry.register(
            "trellis_retry_budget_exhausted",
            "Retries not made because the destination's retry budget was spent",
            families.retry_budget_exhausted.clone(),
        );
        registry.register(
            "trellis_overflow",
            "Requests refused at once by a cluster's connectionPool limits, by kind",
            families.overflow.clone(),
        );
        registry.register(
            "trellis_outlier_ejections",
            "Endpoints ejected by outlier detection, by destination",
            families.outlier_ejections.clone(),
        );
        registry.register(
            "trellis_ratelimited",
            "Inbound requests refused by a RateLimit, by limit (namespace/name[/limit])",
            families.ratelimited.clone(),
        );
        registry.register(
            "trellis_mirrored_requests",
            "Copies of requests sent to a mirror destination (responses discarded)",
            families.mirrored.clone(),
        );
        registry.register_collector(Box::new(super::process::ProcessCollector::new()));
        let config_version = prometheus_client::metrics::gauge::Gauge::default();
        let control_plane_connected = prometheus_client::metrics::gauge::Gauge::default();
        registry.register(
            "trellis_proxy_config_version",
            "Version of the control plane config this proxy runs (0 when it has none)",
            config_version.clone(),
        );
        registry.register(
            "trellis_control_plane_connected",
            "1 while the proxy's config stream to a control plane replica is up",
            control_plane_connected.clone(),
        );
        Self {
            registry,
            families,
            clock: Instant::now(),
            http: Mutex::new(Vec::new()),
            tcp: Mutex::new(HashMap::new()),
            config_version,
            control_plane_connected,
        }
    }

    /// Registers more metrics (used by other modules at start-up).
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Counts a failed mTLS handshake (or refused plaintext) under a bounded `reason`.
    pub fn tls_handshake_failed(&self, reason: &'static str) {
        self.families
            .tls_failures
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Counts an authorization decision (`allow`, `deny`, `audit`) of `policy` (empty: the
    /// default decision, no policy matched).
    pub fn authz_decision(&self, action: &'static str, policy: Option<&Arc<str>>) {
        self.authz_counter(action, policy).inc();
    }

    /// The counter of [`Metrics::authz_decision`], for callers that keep it.
    pub fn authz_counter(&self, action: &'static str, policy: Option<&Arc<str>>) -> Counter {
        static DEFAULT: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from(""));
        let policy = policy.unwrap_or(&DEFAULT).clone();
        self.families
            .authz
            .get_or_create_owned(&AuthzLabels { action, policy })
    }

    /// Counts a request refused by the rate limit `limit` (`namespace/name[/limit]`).
    pub fn ratelimited(&self, limit: &Arc<str>) {
        self.families
            .ratelimited
            .get_or_create(&LimitLabels {
                limit: limit.clone(),
            })
            .inc();
    }

    /// Prometheus text exposition of everything.
    pub fn encode(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    fn now(&self) -> u64 {
        self.clock.elapsed().as_secs()
    }

    /// The handle for requests in `direction` to `destination`. Call once per known
    /// destination (at config load), not per request.
    pub fn http_stats(&self, direction: Direction, destination: Peer) -> Arc<HttpStats> {
        let stats = Arc::new(HttpStats {
            families: self.families.clone(),
            clock: self.clock,
            direction,
            destination,
            series: Mutex::new(HashMap::new()),
        });
        self.http
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(stats.clone());
        stats
    }

    /// The handle for one connection's TCP metrics; counts it as opened.
    pub fn tcp_open(&self, direction: Direction, peer_service: &Arc<str>) -> TcpConn {
        let labels = TcpLabels {
            direction,
            peer_service: peer_service.clone(),
        };
        let stats = {
            let mut map = self.tcp.lock().unwrap_or_else(|e| e.into_inner());
            map.entry(labels.clone())
                .or_insert_with(|| {
                    Arc::new(TcpStats {
                        open: self.families.tcp_open.get_or_create_owned(&labels),
                        total: self.families.tcp_total.get_or_create_owned(&labels),
                        bytes: self.families.tcp_bytes.get_or_create_owned(&labels),
                        last_used: AtomicU64::new(0),
                    })
                })
                .clone()
        };
        stats.open.inc();
        stats.total.inc();
        stats.last_used.store(self.now(), Ordering::Relaxed);
        TcpConn {
            stats,
            clock: self.clock,
        }
    }

    /// Drops every series not used for `idle`. Returns how many were dropped.
    pub fn sweep(&self, idle: Duration) -> usize {
        let now = self.now();
        let cutoff = now.saturating_sub(idle.as_secs());
        let mut dropped = 0;
        for stats in self.http.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            dropped += stats.sweep(cutoff);
        }
        let mut tcp = self.tcp.lock().unwrap_or_else(|e| e.into_inner());
        tcp.retain(|labels, s| {
            let keep = s.open.get() > 0 || s.last_used.load(Ordering::Relaxed) > cutoff;
            if !keep {
                self.families.tcp_open.remove(labels);
                self.families.tcp_total.remove(labels);
                self.families.tcp_bytes.remove(labels);
                dropped += 1;
            }
            keep
        });
        dropped
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The outcome of one HTTP exchange, as metrics see it.
#[derive(Clone, Debug)]
pub struct HttpOutcome {
    /// Who called.
    pub source: Peer,
    /// Final HTTP status.
    pub status: u16,
    /// `grpc-status`, when the response carried one.
    pub grpc_status: Option<u16>,
    /// Whether the hop was mTLS.
    pub tls: bool,
    /// From request arrival to response end.
    pub duration: Duration,
}

#[derive(Clone, Hash, PartialEq, Eq)]
struct SeriesKey {
    source: Peer,
    tls: bool,
}

struct SourceSeries {
    last_used: u64,
    duration: Histogram,
    codes: Vec<(u16, Option<u16>, Counter)>,
}

/// Metrics of one (direction, destination), shared by every request to it.
pub struct HttpStats {
    families: Arc<Families>,
    clock: Instant,
    direction: Direction,
    destination: Peer,
    series: Mutex<HashMap<SeriesKey, SourceSeries>>,
}

impl HttpStats {
    /// The destination these stats are for.
    pub fn destination(&self) -> &Peer {
        &self.destination
    }

    /// `inbound` or `outbound`.
    pub fn direction(&self) -> Direction {
        self.direction
    }

    fn destination_labels(&self) -> DestinationLabels {
        DestinationLabels {
            destination_service: self.destination.service.clone(),
            destination_namespace: self.destination.namespace.clone(),
        }
    }

    /// Counts a retry to this destination (`trellis_retries_total`).
    pub fn retried(&self) {
        let labels = self.destination_labels();
        self.families.retries.get_or_create(&labels).inc();
    }

    /// Counts a retry refused by the destination's budget
    /// (`trellis_retry_budget_exhausted_total`).
    pub fn retry_budget_exhausted(&self) {
        let labels = self.destination_labels();
        self.families
            .retry_budget_exhausted
            .get_or_create(&labels)
            .inc();
    }

    /// Counts a request refused by a connection pool limit (`trellis_overflow_total`;
    /// `kind`: `connections`, `pending` or `requests`).
    pub fn overflow(&self, kind: &'static str) {
        self.families
            .overflow
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    /// Counts an endpoint of this destination ejected by outlier detection
    /// (`trellis_outlier_ejections_total`).
    pub fn outlier_ejected(&self) {
        let labels = self.destination_labels();
        self.families.outlier_ejections.get_or_create(&labels).inc();
    }

    /// Counts a copy of a request sent to this mirror destination
    /// (`trellis_mirrored_requests_total`).
    pub fn mirrored(&self) {
        let labels = self.destination_labels();
        self.families.mirrored.get_or_create(&labels).inc();
    }

    fn duration_labels(&self, key: &SeriesKey) -> DurationLabels {
        DurationLabels {
            direction: self.direction,
            source_service: key.source.service.clone(),
            source_namespace: key.source.namespace.clone(),
            destination_service: self.destination.service.clone(),
            destination_namespace: self.destination.namespace.clone(),
            tls: key.tls,
        }
    }

    fn request_labels(&self, key: &SeriesKey, code: u16, grpc: Option<u16>) -> HttpLabels {
        HttpLabels {
            direction: self.direction,
            source_service: key.source.service.clone(),
            source_namespace: key.source.namespace.clone(),
            destination_service: self.destination.service.clone(),
            destination_namespace: self.destination.namespace.clone(),
            response_code: code,
            grpc_status: grpc,
            tls: key.tls,
        }
    }

    /// Records one finished exchange.
    pub fn record(&self, o: &HttpOutcome) {
        let now = self.clock.elapsed().as_secs();
        let key = SeriesKey {
            source: o.source.clone(),
            tls: o.tls,
        };
        let mut map = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let series = match map.get_mut(&key) {
            Some(s) => s,
            None => {
                let duration = self
                    .families
                    .durations
                    .get_or_create_owned(&self.duration_labels(&key));
                map.entry(key.clone()).or_insert(SourceSeries {
                    last_used: now,
                    duration,
                    codes: Vec::new(),
                })
            }
        };
        series.last_used = now;
        series.duration.observe(o.duration.as_secs_f64());
        match series
            .codes
            .iter()
            .find(|(c, g, _)| *c == o.status && *g == o.grpc_status)
        {
            Some((_, _, counter)) => {
                counter.inc();
            }
            None => {
                let counter = self
                    .families
                    .requests
                    .get_or_create_owned(&self.request_labels(&key, o.status, o.grpc_status));
                counter.inc();
                series.codes.push((o.status, o.grpc_status, counter));
            }
        }
    }

    fn sweep(&self, cutoff: u64) -> usize {
        let mut map = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let mut dropped = 0;
        map.retain(|key, s| {
            if s.last_used > cutoff {
                return true;
            }
            self.families.durations.remove(&self.duration_labels(key));
            for (code, grpc, _) in &s.codes {
                self.families
                    .requests
                    .remove(&self.request_labels(key, *code, *grpc));
            }
            dropped += 1;
            false
        });
        dropped
    }
}

struct TcpStats {
    open: Gauge,
    total: Counter,
    bytes: Counter,
    last_used: AtomicU64,
}

/// One open connection's TCP metrics; closing is counted when it is dropped.
pub struct TcpConn {
    stats: Arc<TcpStats>,
    clock: Instant,
}

impl TcpConn {
    /// Counts bytes read or written on the connection.
    pub fn add_bytes(&self, n: u64) {
        self.stats.bytes.inc_by(n);
    }
}

impl Drop for TcpConn {
    fn drop(&mut self) {
        self.stats.open.dec();
        self.stats
            .last_used
            .store(self.clock.elapsed().as_secs(), Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(status: u16) -> HttpOutcome {
        HttpOutcome {
            source: Peer::new("frontend", "default"),
            status,
            grpc_status: None,
            tls: false,
            duration: Duration::from_millis(3),
        }
    }

    #[test]
    fn records_and_sweeps_idle_series() {
        let m = Metrics::new();
        let stats = m.http_stats("outbound", Peer::new("users", "default"));
        stats.record(&outcome(200));
        stats.record(&outcome(200));
        stats.record(&outcome(503));
        let text = m.encode();
        assert!(text.contains(r#"trellis_http_requests_total{direction="outbound",source_service="frontend",source_namespace="default",destination_service="users",destination_namespace="default",response_code="200",grpc_status="",tls="false"} 2"#), "{text}");
        assert!(text.contains("response_code=\"503\""));
        assert!(text.contains("trellis_http_request_duration_seconds_count{"));
        {
            let _conn = m.tcp_open("outbound", &Arc::from("users"));
            assert_eq!(m.sweep(Duration::ZERO), 1, "open tcp series is kept");
        }
        let text = m.encode();
        assert!(text.contains("trellis_tcp_connections_total"));
        assert!(!text.contains("destination_service=\"users\""), "{text}");
        assert_eq!(m.sweep(Duration::ZERO), 1, "closed tcp series goes");
        assert!(!m.encode().contains("peer_service=\"users\""));
        stats.record(&outcome(200));
        assert!(m.encode().contains("destination_service=\"users\""));
    }
}

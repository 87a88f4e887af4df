//! One request/response exchange as telemetry sees it: recorded once, when the response
//! ends (or is abandoned), into the metrics and the access log.

use crate::telemetry::access_log::{AccessLog, Entry};
use crate::telemetry::metrics::{HttpOutcome, HttpStats, Peer};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

/// The fields only the access log needs; built only when it is on.
pub struct LogFields {
    /// Where entries go.
    pub log: AccessLog,
    /// Arrival time.
    pub ts: SystemTime,
    /// `source` field.
    pub source: String,
    /// Request method.
    pub method: String,
    /// Request authority.
    pub authority: String,
    /// Path and query.
    pub path: String,
    /// `x-request-id`.
    pub request_id: String,
    /// W3C trace id.
    pub trace_id: String,
    /// Chosen endpoint.
    pub upstream: String,
    /// Matched route.
    pub route: String,
}

/// A request in flight.
pub struct Exchange {
    /// Metrics of the destination.
    pub stats: Arc<HttpStats>,
    /// The caller.
    pub source: Peer,
    /// Whether the hop was mTLS.
    pub tls: bool,
    /// Arrival.
    pub start: Instant,
    /// Response status (set when the response head is known).
    pub status: u16,
    /// `grpc-status` from the response headers or trailers.
    pub grpc_status: Option<u16>,
    /// Response body bytes sent.
    pub bytes_out: u64,
    /// Request body bytes received (shared with the request body).
    pub bytes_in: Option<Arc<AtomicU64>>,
    /// Access log fields, when the access log is on.
    pub log: Option<Box<LogFields>>,
    /// The request's admission under its cluster's connection pool limits: held until the
    /// response ends.
    pub admission: crate::upstream::limits::Permit,
}

impl Exchange {
    /// Records the exchange in the metrics and the access log.
    pub fn finish(self) {
        let duration = self.start.elapsed();
        self.stats.record(&HttpOutcome {
            source: self.source.clone(),
            status: self.status,
            grpc_status: self.grpc_status,
            tls: self.tls,
            duration,
        });
        if let Some(f) = self.log {
            let dest = self.stats.destination();
            f.log.write(&Entry {
                ts: crate::telemetry::time::rfc3339(f.ts),
                direction: self.stats.direction(),
                source: f.source,
                destination: format!("{}.{}", dest.service, dest.namespace),
                method: f.method,
                authority: f.authority,
                path: f.path,
                status: self.status,
                duration_ms: (duration.as_secs_f64() * 1e6).round() / 1e3,
                bytes_in: self
                    .bytes_in
                    .as_ref()
                    .map_or(0, |b| b.load(Ordering::Relaxed)),
                bytes_out: self.bytes_out,
                request_id: f.request_id,
                trace_id: f.trace_id,
                upstream: f.upstream,
                route: f.route,
            });
        }
    }
}

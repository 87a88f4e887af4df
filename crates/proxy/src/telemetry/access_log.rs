//! The JSON access log: one object per request on stdout (`--access-log json`).
//!
//! Lines are handed to a dedicated writer thread over a bounded channel so a slow stdout
//! never blocks the request path; when the channel is full the line is dropped and counted.

use serde::Serialize;
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::Arc;

/// One access log record (field names are part of the interface contract).
#[derive(Debug, Serialize)]
pub struct Entry {
    /// When the request arrived (RFC 3339).
    pub ts: String,
    /// `inbound` or `outbound`.
    pub direction: &'static str,
    /// The caller: `service.namespace`, or the client address when unknown.
    pub source: String,
    /// The destination service, `service.namespace`.
    pub destination: String,
    /// Request method.
    pub method: String,
    /// Request authority (`Host` / `:authority`).
    pub authority: String,
    /// Request path and query.
    pub path: String,
    /// Response status (0 when no response was sent).
    pub status: u16,
    /// From request arrival to response end, in milliseconds.
    pub duration_ms: f64,
    /// Request body bytes.
    pub bytes_in: u64,
    /// Response body bytes.
    pub bytes_out: u64,
    /// `x-request-id` as forwarded.
    pub request_id: String,
    /// W3C trace id from `traceparent`, when present.
    pub trace_id: String,
    /// The upstream endpoint address, when one was chosen.
    pub upstream: String,
    /// The route that matched (VirtualService route name, or `namespace/name#index`).
    #[serde(skip_serializing_if = "String::is_empty")]
    pub route: String,
}

/// Where access log entries go. Cheap to clone.
#[derive(Clone)]
pub struct AccessLog {
    tx: Option<SyncSender<Vec<u8>>>,
    dropped: Arc<AtomicU64>,
}

impl AccessLog {
    /// A log that discards everything.
    pub fn disabled() -> Self {
        Self {
            tx: None,
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// A log writing JSON lines to stdout from a background thread.
    pub fn json_stdout() -> Self {
        let (tx, rx) = sync_channel::<Vec<u8>>(4096);
        let spawned = std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || {
                let stdout = std::io::stdout();
                while let Ok(line) = rx.recv() {
                    let mut out = stdout.lock();
                    let _ = out.write_all(&line);
                    // Drain what queued meanwhile before flushing once.
                    while let Ok(more) = rx.try_recv() {
                        let _ = out.write_all(&more);
                    }
                    let _ = out.flush();
                }
            });
        Self {
            tx: spawned.ok().map(|_| tx),
            dropped: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Whether entries are written at all (callers skip building them otherwise).
    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    /// Queues one entry.
    pub fn write(&self, entry: &Entry) {
        let Some(tx) = &self.tx else { return };
        let Ok(mut line) = serde_json::to_vec(entry) else {
            return;
        };
        line.push(b'\n');
        if let Err(TrySendError::Full(_)) = tx.try_send(line) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

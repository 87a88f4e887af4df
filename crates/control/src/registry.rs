//! Discovery: the workloads whose proxies are connected, and how in sync each one is.
//!
//! A proxy registers on its config stream (`registry/<instance>`); the entry is ephemeral
//! (see [`crate::store`]): it goes when the stream closes or when the replica holding it stops
//! renewing its lease. `status/<instance>` holds what the proxy was sent and acknowledged.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A connected workload instance: one endpoint per inbound port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    /// The proxy process's id.
    pub instance: String,
    /// Service name.
    pub service: String,
    /// Namespace.
    pub namespace: String,
    /// SPIFFE ID (from its certificate).
    pub identity: String,
    /// IP it is reached at.
    pub address: String,
    /// Inbound ports.
    pub ports: Vec<PortInfo>,
    /// Labels (`app`, `version`, ...).
    pub labels: BTreeMap<String, String>,
    /// Whether the local app passes its readiness probe.
    pub ready: bool,
    /// The control plane replica holding its stream.
    pub replica: String,
    /// When it connected, Unix seconds.
    pub connected_at: u64,
    /// Random id of the stream (a reconnect is a new session).
    #[serde(default)]
    pub session: String,
}

/// One inbound port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortInfo {
    /// Port number.
    pub port: u16,
    /// `auto`, `http1`, `http2`, `grpc` or `tcp`.
    pub protocol: String,
}

/// A config the proxy refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Nack {
    /// The refused version.
    pub version: u64,
    /// The proxy's reason.
    pub error: String,
    /// When, Unix seconds.
    pub at: u64,
}

/// How in sync one proxy is.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncStatus {
    /// Latest version sent.
    pub sent: u64,
    /// Latest version the proxy accepted.
    pub acked: u64,
    /// The latest refusal, if the proxy refused one since it connected.
    pub last_nack: Option<Nack>,
}

impl SyncStatus {
    /// Whether the proxy runs the latest config it was sent.
    pub fn in_sync(&self) -> bool {
        self.sent != 0 && self.acked == self.sent
    }
}

/// Store key of a workload's registration.
pub fn registry_key(instance: &str) -> String {
    format!("registry/{instance}")
}

/// Store key of a workload's sync status.
pub fn status_key(instance: &str) -> String {
    format!("status/{instance}")
}

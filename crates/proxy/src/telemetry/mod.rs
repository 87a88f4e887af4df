//! Telemetry wrapped around every exchange: Prometheus metrics, the JSON access log and
//! process metrics.

pub mod access_log;
pub mod identity;
pub mod metrics;
mod process;
pub(crate) mod time;

pub use access_log::AccessLog;
pub use metrics::Metrics;

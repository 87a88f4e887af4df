//! Test harness for Trellis end-to-end tests: origin servers, small clients and readiness
//! polling, all on loopback with ephemeral ports.
#![warn(missing_docs)]

pub mod certs;
pub mod client;
pub mod etcd;
pub mod origin;
pub mod proxy;
pub mod wait;

pub use etcd::EtcdCluster;

//! Origin servers that end-to-end tests put behind the proxy.
//!
//! Every origin binds `127.0.0.1:0`, runs on the current tokio runtime and stops (accept loop,
//! connections and upgraded streams alike) when its handle is dropped.

pub mod grpc;
pub mod http;
pub mod tcp;

mod tasks;

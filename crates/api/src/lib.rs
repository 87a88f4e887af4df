//! Types shared by the Trellis proxy and control plane: names, durations and (later) the
//! resource model. Nothing here does I/O.

pub mod analyze;
pub mod duration;
pub mod names;
pub mod resources;

/// Generated protobuf types and gRPC stubs.
#[allow(missing_docs, clippy::all, clippy::pedantic)]
pub mod proto {
    /// The identity service (`trellis.identity.v1`).
    pub mod identity {
        tonic::include_proto!("trellis.identity.v1");
    }
    /// Config push and discovery (`trellis.config.v1`).
    pub mod config {
        tonic::include_proto!("trellis.config.v1");
    }
}

//! Types shared by the Trellis proxy and control plane: names, durations and (later) the
//! resource model. Nothing here does I/O.

pub mod duration;
pub mod names;

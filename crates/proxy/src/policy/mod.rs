//! Access policy for inbound traffic: Istio `AuthorizationPolicy`, compiled once per config and
//! evaluated per request or connection.
//!
//! [`path`] puts the request path in the one form policies are matched against (and the
//! application is given); [`authz`] compiles the policies that apply to this workload and
//! decides each request; [`jwt`] authenticates requests by their JWT (`RequestAuthentication`)
//! and feeds authorization the validated claims; [`ratelimit`] keeps the token buckets of
//! the workload's `RateLimit`s, checked after authorization. Wiring them into the request
//! path is the caller's job.

pub mod authz;
pub mod inbound;
pub mod jwt;
pub mod path;
pub mod ratelimit;

//! Resilience of the outbound request path: retries and the budget that bounds them.
//!
//! A route's [`retry::RetryPolicy`] (Istio `retries`) decides which failed attempts are tried
//! again and how long to wait; [`budget::RetryBudget`] (one per destination cluster) caps
//! retries at a share of the cluster's traffic so that retries cannot multiply the load of
//! an upstream that is already failing; [`replay::Replay`] keeps a request body so that it
//! can be sent again. The loop itself is in [`crate::http::forward`].

pub mod budget;
pub mod replay;
pub mod retry;

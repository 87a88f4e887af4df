//! The retry policy of a route (Istio `HTTPRetry`), compiled once per config.
//!
//! A policy says how many extra attempts a request may make, how long each may take, and
//! which outcomes of an attempt are worth another try ([`Condition`]s, Envoy's `retry_on`
//! names as Istio passes them through). Whether a particular failure is retried also
//! depends on the request: only idempotent methods are retried on outcomes that mean the
//! request may have reached the application; `POST`, `PATCH` and other non-idempotent
//! methods are retried only when the request provably never got there (`connect-failure`,
//! `refused-stream`). gRPC calls (always `POST`) are the exception for the gRPC status
//! conditions: listing `unavailable` and the like is the service owner's statement that
//! those statuses are safe to retry, as in gRPC's own retry design (gRFC A6).

use http::{Method, StatusCode};
use std::time::Duration;
use trellis_api::resources::http_policy::HttpRetry;

/// Base backoff between attempts when the route sets none.
pub const DEFAULT_BACKOFF: Duration = Duration::from_millis(25);
/// The longest backoff between two attempts, whatever the base.
pub const MAX_BACKOFF: Duration = Duration::from_millis(250);

/// One `retryOn` condition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Condition {
    /// `5xx`: any 5xx response, a reset, a connect failure or a per-try timeout.
    ServerError,
    /// `gateway-error`: 502, 503, 504, a reset, a connect failure or a per-try timeout.
    GatewayError,
    /// `connect-failure`: no connection to the endpoint (refused, timed out, TLS failed).
    ConnectFailure,
    /// `reset`: the connection or stream failed before a response head arrived.
    Reset,
    /// `refused-stream`: the HTTP/2 peer refused the stream (`REFUSED_STREAM`) unprocessed.
    RefusedStream,
    /// `retriable-4xx`: 409 Conflict.
    Retriable4xx,
    /// A gRPC status in the response head (trailers-only response): `cancelled` (1),
    /// `deadline-exceeded` (4), `resource-exhausted` (8), `internal` (13), `unavailable` (14).
    Grpc(u16),
    /// A status code listed in `retryOn` (`retriable-status-codes` with the codes).
    Status(u16),
}

impl Condition {
    /// Parses one `retryOn` item; `None` for names this proxy does not know.
    pub fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "5xx" => Condition::ServerError,
            "gateway-error" => Condition::GatewayError,
            "connect-failure" => Condition::ConnectFailure,
            "reset" => Condition::Reset,
            "refused-stream" => Condition::RefusedStream,
            "retriable-4xx" => Condition::Retriable4xx,
            "cancelled" => Condition::Grpc(1),
            "deadline-exceeded" => Condition::Grpc(4),
            "resource-exhausted" => Condition::Grpc(8),
            "internal" => Condition::Grpc(13),
            "unavailable" => Condition::Grpc(14),
            code => match code.parse::<u16>() {
                Ok(c) if (100..=599).contains(&c) => Condition::Status(c),
                _ => return None,
            },
        })
    }
}

/// What one attempt came to, as far as retrying is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// No connection to the endpoint.
    ConnectFailure,
    /// HTTP/2 `REFUSED_STREAM`: the peer did not process the request.
    RefusedStream,
    /// The connection or stream failed before a response head.
    Reset,
    /// The attempt's `perTryTimeout` passed before a response head.
    PerTryTimeout,
    /// A response head: its status and `grpc-status` header, if any.
    Response(StatusCode, Option<u16>),
}

impl Outcome {
    /// Whether the request certainly never reached the application (safe to retry whatever
    /// the method).
    pub fn never_reached_app(self) -> bool {
        matches!(self, Outcome::ConnectFailure | Outcome::RefusedStream)
    }
}

/// A compiled `retries` block.
#[derive(Clone, Debug, PartialEq)]
pub struct RetryPolicy {
    /// Extra attempts after the first (Istio `attempts`).
    pub retries: u32,
    /// Bound on each attempt (to the response head).
    pub per_try_timeout: Option<Duration>,
    /// When an attempt is worth another.
    pub conditions: Vec<Condition>,
    /// Base of the exponential backoff.
    pub backoff: Duration,
}

/// Istio's `retryOn` when a route sets `retries` without it.
const DEFAULT_RETRY_ON: &str = "connect-failure,refused-stream,unavailable,cancelled";

impl RetryPolicy {
    /// Compiles `retries`; `Ok(None)` when it allows no retry (`attempts: 0`). Errors name
    /// the offending field and value.
    pub fn compile(r: &HttpRetry) -> Result<Option<Self>, String> {
        // Never silently ignored: this proxy has no localities, and it always prefers an
        // endpoint not tried yet.
        if r.retry_remote_localities == Some(true) {
            return Err(
                "retryRemoteLocalities: not enforced by this proxy yet (no localities)".into(),
            );
        }
        if r.retry_ignore_previous_hosts == Some(false) {
            return Err("retryIgnorePreviousHosts: false is not supported (retries always prefer an endpoint not tried yet)".into());
        }
        let on = r.retry_on.as_deref().unwrap_or(DEFAULT_RETRY_ON);
        let mut conditions = Vec::new();
        for item in on.split(',').map(str::trim) {
            // `retriable-status-codes` only says "the listed codes"; the codes are items.
            if item == "retriable-status-codes" {
                continue;
            }
            let c = Condition::parse(item)
                .ok_or_else(|| format!("retryOn: unknown retry condition {item:?}"))?;
            if !conditions.contains(&c) {
                conditions.push(c);
            }
        }
        if r.attempts == 0 {
            return Ok(None);
        }
        Ok(Some(Self {
            retries: r.attempts,
            per_try_timeout: r.per_try_timeout.map(|d| d.0).filter(|d| !d.is_zero()),
            conditions,
            backoff: r
                .backoff
                .map(|d| d.0)
                .filter(|d| !d.is_zero())
                .unwrap_or(DEFAULT_BACKOFF)
                .min(MAX_BACKOFF),
        }))
    }

    /// Whether `outcome` of an attempt of a `method` request is retried (attempts and
    /// budget aside); `grpc` says the request is a gRPC call.
    pub fn retries_on(&self, method: &Method, grpc: bool, outcome: Outcome) -> bool {
        let safe = idempotent(method) || outcome.never_reached_app();
        self.conditions
            .iter()
            .any(|c| matches(*c, outcome) && (safe || (grpc && matches!(c, Condition::Grpc(_)))))
    }

    /// The pause before retry number `retry` (1 for the first retry): full jitter over
    /// `base * 2^(retry-1)`, at most [`MAX_BACKOFF`].
    pub fn backoff(&self, retry: u32) -> Duration {
        let ceiling = backoff_ceiling(self.backoff, retry);
        let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(fastrand::u64(nanos / 2..=nanos))
    }
}

/// The upper bound of the backoff before retry number `retry`.
fn backoff_ceiling(base: Duration, retry: u32) -> Duration {
    let factor = 1u32 << retry.saturating_sub(1).min(16);
    base.saturating_mul(factor).min(MAX_BACKOFF)
}

/// RFC 9110 idempotent methods (GET, HEAD, OPTIONS, PUT, DELETE, TRACE).
pub fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::PUT | Method::DELETE | Method::TRACE
    )
}

fn matches(c: Condition, o: Outcome) -> bool {
    use Outcome::*;
    let failed = matches!(o, ConnectFailure | RefusedStream | Reset | PerTryTimeout);
    match (c, o) {
        (Condition::ServerError, Response(s, _)) => s.is_server_error(),
        (Condition::GatewayError, Response(s, _)) => matches!(s.as_u16(), 502..=504),
        // Envoy: 5xx and gateway-error also cover resets, connect failures and per-try
        // timeouts (a timed-out try counts as a 504).
        (Condition::ServerError | Condition::GatewayError, _) => failed,
        (Condition::ConnectFailure, ConnectFailure) => true,
        (Condition::Reset, ConnectFailure | RefusedStream | Reset) => true,
        (Condition::RefusedStream, RefusedStream) => true,
        (Condition::Retriable4xx, Response(s, _)) => s == StatusCode::CONFLICT,
        (Condition::Grpc(code), Response(_, Some(g))) => code == g,
        (Condition::Status(code), Response(s, _)) => s.as_u16() == code,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(on: &str) -> RetryPolicy {
        RetryPolicy::compile(&HttpRetry {
            attempts: 3,
            retry_on: Some(on.into()),
            ..Default::default()
        })
        .unwrap()
        .unwrap()
    }

    fn status(code: u16) -> Outcome {
        Outcome::Response(StatusCode::from_u16(code).unwrap(), None)
    }

    #[test]
    fn locality_and_previous_host_settings_we_cannot_honour_are_refused() {
        let err = RetryPolicy::compile(&HttpRetry {
            attempts: 2,
            retry_remote_localities: Some(true),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.starts_with("retryRemoteLocalities"), "{err}");
        let err = RetryPolicy::compile(&HttpRetry {
            attempts: 2,
            retry_ignore_previous_hosts: Some(false),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.starts_with("retryIgnorePreviousHosts"), "{err}");
        assert!(RetryPolicy::compile(&HttpRetry {
            attempts: 2,
            retry_ignore_previous_hosts: Some(true),
            retry_remote_localities: Some(false),
            ..Default::default()
        })
        .is_ok());
    }

    #[test]
    fn parses_conditions_and_refuses_unknown_ones_by_name() {
        let p = policy("5xx, gateway-error,connect-failure,reset,refused-stream,retriable-4xx,cancelled,deadline-exceeded,resource-exhausted,internal,unavailable,retriable-status-codes,418");
        assert_eq!(p.conditions.len(), 12);
        assert!(p.conditions.contains(&Condition::Grpc(14)));
        assert!(p.conditions.contains(&Condition::Status(418)));
        let err = RetryPolicy::compile(&HttpRetry {
            attempts: 2,
            retry_on: Some("5xx,bogus".into()),
            ..Default::default()
        })
        .unwrap_err();
        assert!(err.contains("\"bogus\""), "{err}");
        assert!(RetryPolicy::compile(&HttpRetry {
            attempts: 0,
            ..Default::default()
        })
        .unwrap()
        .is_none());
        let d = RetryPolicy::compile(&HttpRetry {
            attempts: 1,
            ..Default::default()
        })
        .unwrap()
        .unwrap();
        assert!(d.retries_on(&Method::GET, false, Outcome::ConnectFailure));
        assert!(!d.retries_on(&Method::GET, false, status(503)));
    }

    #[test]
    fn conditions_match_outcomes() {
        let get = Method::GET;
        let p = policy("5xx");
        assert!(p.retries_on(&get, false, status(500)));
        assert!(p.retries_on(&get, false, Outcome::Reset));
        assert!(p.retries_on(&get, false, Outcome::PerTryTimeout));
        assert!(!p.retries_on(&get, false, status(409)));
        let p = policy("gateway-error");
        assert!(p.retries_on(&get, false, status(503)));
        assert!(!p.retries_on(&get, false, status(500)));
        let p = policy("retriable-4xx");
        assert!(p.retries_on(&get, false, status(409)));
        assert!(!p.retries_on(&get, false, status(404)));
        let p = policy("connect-failure");
        assert!(p.retries_on(&get, false, Outcome::ConnectFailure));
        assert!(!p.retries_on(&get, false, Outcome::Reset));
        let p = policy("418");
        assert!(p.retries_on(&get, false, status(418)));
    }

    #[test]
    fn grpc_unavailable_is_read_from_the_response_head() {
        let p = policy("unavailable");
        let ok = StatusCode::OK;
        assert!(!p.retries_on(&Method::POST, false, Outcome::Response(ok, Some(14))));
        assert!(p.retries_on(&Method::POST, true, Outcome::Response(ok, Some(14))));
        let both = policy("5xx,unavailable");
        let unavailable_503 = Outcome::Response(StatusCode::SERVICE_UNAVAILABLE, Some(14));
        assert!(both.retries_on(&Method::POST, true, unavailable_503));
        assert!(!both.retries_on(&Method::POST, true, status(503)));
        assert!(p.retries_on(&Method::GET, false, Outcome::Response(ok, Some(14))));
        assert!(!p.retries_on(&Method::GET, false, Outcome::Response(ok, Some(0))));
        assert!(!p.retries_on(&Method::GET, false, Outcome::Response(ok, None)));
    }

    #[test]
    fn non_idempotent_methods_retry_only_when_the_app_never_saw_them() {
        let p = policy("5xx,connect-failure,refused-stream");
        for m in [Method::POST, Method::PATCH] {
            assert!(!p.retries_on(&m, false, status(503)));
            assert!(!p.retries_on(&m, false, Outcome::Reset));
            assert!(!p.retries_on(&m, false, Outcome::PerTryTimeout));
            assert!(p.retries_on(&m, false, Outcome::ConnectFailure));
            assert!(p.retries_on(&m, false, Outcome::RefusedStream));
        }
        for m in [Method::PUT, Method::DELETE, Method::HEAD] {
            assert!(p.retries_on(&m, false, status(503)));
        }
    }

    #[test]
    fn backoff_is_exponential_jittered_and_capped() {
        let p = policy("5xx");
        assert_eq!(p.backoff, DEFAULT_BACKOFF);
        for _ in 0..200 {
            let b = p.backoff(1);
            assert!(b >= Duration::from_micros(12_500) && b <= Duration::from_millis(25));
            let b = p.backoff(3);
            assert!(b >= Duration::from_millis(50) && b <= Duration::from_millis(100));
            assert!(p.backoff(30) <= MAX_BACKOFF);
        }
        assert_eq!(
            backoff_ceiling(DEFAULT_BACKOFF, 2),
            Duration::from_millis(50)
        );
        assert_eq!(backoff_ceiling(DEFAULT_BACKOFF, 5), MAX_BACKOFF);
        assert_eq!(backoff_ceiling(DEFAULT_BACKOFF, u32::MAX), MAX_BACKOFF);
        let slow = RetryPolicy::compile(&HttpRetry {
            attempts: 1,
            backoff: Some(trellis_api::duration::Duration(Duration::from_secs(5))),
            ..Default::default()
        })
        .unwrap()
        .unwrap();
        assert_eq!(slow.backoff, MAX_BACKOFF);
    }
}

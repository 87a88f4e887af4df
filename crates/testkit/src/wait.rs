//! Readiness polling with deadlines (tests never sleep a fixed time).

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::{sleep, timeout, Instant};

/// How often [`wait_for`] polls.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);

/// Polls `f` every [`POLL_INTERVAL`] until it returns `true`.
///
/// # Panics
/// When `deadline` passes first (including while an attempt is still running), naming `what`.
pub async fn wait_for<F, Fut>(what: &str, deadline: Duration, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if let Ok(true) = timeout(left, f()).await {
            return;
        }
        let now = Instant::now();
        if now >= end {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        sleep(POLL_INTERVAL.min(end - now)).await;
    }
}

/// Waits until a TCP connection to `addr` succeeds.
///
/// # Panics
/// When `deadline` passes first.
pub async fn wait_tcp(addr: SocketAddr, deadline: Duration) {
    wait_for(&format!("tcp connect to {addr}"), deadline, || async move {
        TcpStream::connect(addr).await.is_ok()
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn wait_for_returns_once_true() {
        let mut calls = 0;
        wait_for("third call", Duration::from_secs(5), || {
            calls += 1;
            let done = calls >= 3;
            async move { done }
        })
        .await;
        assert_eq!(calls, 3);
    }

    #[tokio::test]
    #[should_panic(expected = "waiting for never")]
    async fn wait_for_panics_at_the_deadline() {
        wait_for("never", Duration::from_millis(50), || async { false }).await;
    }
}

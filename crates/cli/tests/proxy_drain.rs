//! Graceful drain of the real `trellis` binary on SIGTERM and `POST /shutdown`.

mod common;

use common::*;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_testkit::origin::http::HttpOrigin;
use trellis_testkit::wait::wait_for;

async fn setup(drain: &str) -> (Trellis, HttpOrigin, std::net::SocketAddr) {
    let app = HttpOrigin::start().await.unwrap();
    let (admin, inbound) = (free_addr(), free_addr());
    let yaml = format!(
        "service: grades\nadmin: {admin}\noutbound: {{ listen: null }}\n\
         inbound:\n  - listen: {inbound}\n    app: {}\n",
        app.addr()
    );
    let p = proxy(&yaml, admin, &["--drain-timeout", drain]).await;
    (p, app, inbound)
}

/// Starts a raw HTTP/1.1 request and returns the stream (response not read yet).
async fn start_slow_h1(addr: std::net::SocketAddr, ms: u64) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET /slow/{ms} HTTP/1.1\r\nHost: grades\r\n\r\n").as_bytes())
        .await
        .unwrap();
    s
}

async fn drain_test(trigger: impl AsyncFnOnce(&Trellis)) {
    let (mut p, app, inbound) = setup("10s").await;
    let mut slow = start_slow_h1(inbound, 1500).await;
    let h2 = H2::connect(inbound).await;
    let h2_slow = {
        let h2 = h2.clone();
        tokio::spawn(async move { h2.request("GET", "http://grades/slow/1500", b"").await })
    };
    wait_for(
        "both slow requests reached the app",
        Duration::from_secs(5),
        || {
            let n = app.requests();
            async move { n >= 2 }
        },
    )
    .await;

    let started = Instant::now();
    trigger(&p).await;

    // Readiness fails at once, and new connections are refused.
    wait_for("/ready turns 503", Duration::from_secs(1), || async {
        trellis_testkit::client::http1_get(p.admin(), "/ready", &[])
            .await
            .is_ok_and(|(s, _, _)| s == 503)
    })
    .await;
    wait_for(
        "new connections refused",
        Duration::from_secs(1),
        || async { TcpStream::connect(inbound).await.is_err() },
    )
    .await;

    // The in-flight HTTP/1 request completes, with Connection: close.
    let mut resp = Vec::new();
    slow.read_to_end(&mut resp).await.unwrap();
    let resp = String::from_utf8_lossy(&resp).to_ascii_lowercase();
    assert!(resp.starts_with("http/1.1 200"), "{resp}");
    assert!(resp.contains("connection: close"), "{resp}");
    assert!(resp.ends_with("slow"), "{resp}");
    // The in-flight HTTP/2 stream completes too (the connection got a GOAWAY).
    let (status, _, body) = h2_slow.await.unwrap();
    assert_eq!((status, &body[..]), (200, &b"slow"[..]));

    // Then the process exits by itself, well before the deadline.
    let status = p.wait_exit(Duration::from_secs(8)).await;
    assert!(status.success(), "{status}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn sigterm_drains_in_flight_requests() {
    drain_test(async |p: &Trellis| p.signal(libc_sigterm())).await;
}

#[tokio::test]
async fn post_shutdown_drains_in_flight_requests() {
    drain_test(async |p: &Trellis| {
        let (code, out) = curl(&["-X", "POST", &format!("http://{}/shutdown", p.admin())]).await;
        assert_eq!((code, out.as_str()), (0, "draining\n"));
    })
    .await;
}

#[tokio::test]
async fn drain_deadline_bounds_the_wait() {
    let (mut p, app, inbound) = setup("1s").await;
    let _slow = start_slow_h1(inbound, 20_000).await;
    wait_for(
        "slow request reached the app",
        Duration::from_secs(5),
        || {
            let n = app.requests();
            async move { n >= 1 }
        },
    )
    .await;
    let started = Instant::now();
    p.signal(libc_sigterm());
    p.wait_exit(Duration::from_secs(5)).await;
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(3),
        "{took:?}"
    );
}

#[tokio::test]
async fn idle_proxy_exits_at_once() {
    let (mut p, _app, inbound) = setup("30s").await;
    // An idle keep-alive connection must not hold the drain.
    let (status, _, _) = trellis_testkit::client::http1_get(inbound, "/echo", &[])
        .await
        .unwrap();
    assert_eq!(status, 200);
    let _idle = TcpStream::connect(inbound).await.unwrap();
    let started = Instant::now();
    p.signal(libc_sigterm());
    p.wait_exit(Duration::from_secs(5)).await;
    // The idle connection that never sent a byte is still in detection: bounded by it.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
}

fn libc_sigterm() -> i32 {
    15
}

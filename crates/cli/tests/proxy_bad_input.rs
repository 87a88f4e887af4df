//! Bad input to the real `trellis` binary: malformed requests, oversized heads, dead or slow
//! upstreams, invalid bootstrap files, and garbage bytes. Clear errors, no crash.

mod common;

use common::*;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_testkit::client::http1_get;
use trellis_testkit::origin::http::HttpOrigin;

async fn setup() -> (Trellis, HttpOrigin, [std::net::SocketAddr; 3]) {
    let app = HttpOrigin::start().await.unwrap();
    let (admin, inbound, outbound, slow_port) =
        (free_addr(), free_addr(), free_addr(), free_addr());
    let dead = free_addr();
    let yaml = format!(
        "service: frontend\nadmin: {admin}\n\
         inbound:\n  - listen: {inbound}\n    app: {a}\n\
         outbound: {{ listen: {outbound} }}\n\
         upstreams:\n\
         \x20 - service: user-authentication\n    endpoints: [{dead}]\n\
         \x20 - service: content-delivery\n\
         \x20 - service: exam-engine\n    listen: {slow_port}\n    endpoints: [{a}]\n    timeout: 300ms\n",
        a = app.addr(),
    );
    let p = proxy(&yaml, admin, &[]).await;
    (p, app, [inbound, outbound, slow_port])
}

/// Writes raw bytes, reads until the proxy closes the connection (bounded).
async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("the proxy closes the connection")
        .ok();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn malformed_http_gets_400_and_the_connection_closed() {
    let (p, app, [inbound, outbound, _]) = setup().await;
    for bad in [
        &b"GET / HTTP/1.1\r\nHost: exam-engine\r\nBad Header Line\r\n\r\n"[..],
        b"GET /\x01\x02 HTTP/1.1\r\nHost: exam-engine\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: exam-engine\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello",
        b"POST / HTTP/1.1\r\nHost: exam-engine\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ] {
        for addr in [inbound, outbound] {
            let resp = raw(addr, bad).await;
            assert!(resp.starts_with("HTTP/1.1 400"), "{:?} -> {resp:?}", String::from_utf8_lossy(bad));
        }
    }
    assert_eq!(app.requests(), 0, "nothing malformed reached the app");
    assert_eq!(p.admin_get("/live").await.0, 200);
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let (_p, app, [inbound, outbound, _]) = setup().await;
    let big = "a".repeat(100 * 1024);
    for addr in [inbound, outbound] {
        let req = format!("GET / HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
        let resp = raw(addr, req.as_bytes()).await;
        assert!(resp.starts_with("HTTP/1.1 431"), "{resp:.200}");
    }
    assert_eq!(app.requests(), 0);
}

#[tokio::test]
async fn unreachable_upstreams_get_503_naming_the_service() {
    let (_p, _app, [_, outbound, _]) = setup().await;
    let (status, headers, body) = http1_get(outbound, "http://user-authentication/login", &[])
        .await
        .unwrap();
    assert_eq!(status, 503);
    assert_eq!(headers["x-trellis-error"], "connect-failed");
    assert!(
        String::from_utf8_lossy(&body).contains("user-authentication.default"),
        "{body:?}"
    );

    let (status, headers, body) = http1_get(outbound, "http://content-delivery/x", &[])
        .await
        .unwrap();
    assert_eq!(status, 503);
    assert_eq!(headers["x-trellis-error"], "no-endpoints");
    assert!(
        String::from_utf8_lossy(&body).contains("content-delivery.default"),
        "{body:?}"
    );
}

#[tokio::test]
async fn slow_upstream_gets_504_at_the_timeout() {
    let (p, _app, [_, _, slow_port]) = setup().await;
    let started = Instant::now();
    let (status, headers, body) = http1_get(slow_port, "/slow/3000", &[]).await.unwrap();
    let took = started.elapsed();
    assert_eq!(status, 504, "{body:?}");
    assert_eq!(headers["x-trellis-error"], "upstream-timeout");
    assert!(String::from_utf8_lossy(&body).contains("exam-engine"));
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(800),
        "{took:?}"
    );
    // Under the limit is fine.
    assert_eq!(http1_get(slow_port, "/slow/10", &[]).await.unwrap().0, 200);
    let text = p.metrics().await;
    assert_eq!(
        sample(
            &text,
            "trellis_http_requests_total",
            &[
                ("destination_service", "exam-engine"),
                ("response_code", "504")
            ]
        ),
        Some(1.0)
    );
}

#[tokio::test]
async fn upstream_connect_timeout_gets_504() {
    let hole = trellis_testkit::origin::tcp::BlackholeOrigin::start()
        .await
        .unwrap();
    let (admin, port) = (free_addr(), free_addr());
    let yaml = format!(
        "service: frontend\nadmin: {admin}\noutbound: {{ listen: null }}\n\
         timeouts: {{ connect: 300ms }}\n\
         upstreams:\n  - service: scoring-service\n    listen: {port}\n    endpoints: [{}]\n",
        hole.addr()
    );
    let _p = proxy(&yaml, admin, &[]).await;
    let started = Instant::now();
    let (status, headers, body) = http1_get(port, "/", &[]).await.unwrap();
    let took = started.elapsed();
    assert_eq!(status, 504, "{body:?}");
    assert_eq!(headers["x-trellis-error"], "connect-timeout");
    assert!(
        String::from_utf8_lossy(&body).contains("scoring-service"),
        "{body:?}"
    );
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(800),
        "{took:?}"
    );
}

#[tokio::test]
async fn garbage_never_crashes_the_proxy() {
    let (p, app, [inbound, outbound, slow_port]) = setup().await;
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let prefixes: [&[u8]; 6] = [
        b"",
        b"GET ",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        b"\x16\x03\x01",
        b"CONNECT ",
        b"GET / HTTP/1.1\r\n",
    ];
    for i in 0..150 {
        let addr = [inbound, outbound, slow_port, p.admin()][i % 4];
        let mut bytes = prefixes[i % prefixes.len()].to_vec();
        let n = (next() % 2048) as usize;
        bytes.extend((0..n).map(|_| next() as u8));
        if let Ok(mut s) = TcpStream::connect(addr).await {
            let _ = s.write_all(&bytes).await;
            let _ = s.shutdown().await;
            let mut sink = Vec::new();
            let _ =
                tokio::time::timeout(Duration::from_millis(200), s.read_to_end(&mut sink)).await;
        }
    }
    assert_eq!(p.admin_get("/live").await.0, 200);
    assert_eq!(http1_get(inbound, "/echo", &[]).await.unwrap().0, 200);
    assert!(app.requests() >= 1);
}

#[test]
fn invalid_bootstrap_exits_2_naming_file_line_and_field() {
    let dir = trellis_testkit::proxy::TempDir::new("badconfig");
    let cases = [
        (
            "service: frontend\nupstreams:\n  - service: users\n    endpoints: [not-an-address]\n",
            ":4: upstreams[0].endpoints[0]",
        ),
        (
            "service: frontend\ninbound:\n  - listen: 127.0.0.1:1\n    apps: 127.0.0.1:2\n",
            ":4: inbound[0].apps",
        ),
        (
            "service: frontend\ntimeouts:\n  connect: sometime\n",
            ":3: timeouts.connect",
        ),
        ("namespace: x\n", "service"),
        ("service: [unclosed\n", "proxy.yaml:"),
    ];
    for (yaml, want) in cases {
        let file = dir.path().join("proxy.yaml");
        std::fs::write(&file, yaml).unwrap();
        let (code, _, err) =
            trellis_testkit::proxy::run(BIN, &["proxy", "--config", file.to_str().unwrap()]);
        assert_eq!(code, Some(2), "{yaml}: {err}");
        assert!(err.contains(file.to_str().unwrap()), "{err}");
        assert!(err.contains(want), "{yaml}: want {want:?} in {err}");
    }
    let (code, _, err) =
        trellis_testkit::proxy::run(BIN, &["proxy", "--config", "/nonexistent/proxy.yaml"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("/nonexistent/proxy.yaml"), "{err}");
}

//! Opaque TCP through the real `trellis` binary: half-close, server-speaks-first, CONNECT.

mod common;

use common::*;
use std::time::{Duration, Instant};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use trellis_testkit::origin::tcp::{BannerOrigin, TcpEchoOrigin, BANNER};

async fn setup(
    protocol: &str,
) -> (
    Trellis,
    TcpEchoOrigin,
    BannerOrigin,
    [std::net::SocketAddr; 4],
) {
    let echo = TcpEchoOrigin::start().await.unwrap();
    let banner = BannerOrigin::start().await.unwrap();
    let (admin, inbound, echo_port, banner_port) =
        (free_addr(), free_addr(), free_addr(), free_addr());
    let outbound = free_addr();
    let yaml = format!(
        "service: ledger\nadmin: {admin}\n\
         inbound:\n  - listen: {inbound}\n    app: {e}\n    protocol: {protocol}\n\
         outbound: {{ listen: {outbound} }}\n\
         upstreams:\n\
         \x20 - service: echo\n    listen: {echo_port}\n    protocol: {protocol}\n    endpoints: [{e}]\n\
         \x20 - service: smtp\n    listen: {banner_port}\n    protocol: {protocol}\n    endpoints: [{b}]\n",
        e = echo.addr(),
        b = banner.addr(),
    );
    let p = proxy(&yaml, admin, &[]).await;
    (p, echo, banner, [inbound, echo_port, banner_port, outbound])
}

async fn half_close_echo(addr: std::net::SocketAddr, payload: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(payload).await.unwrap();
    s.shutdown().await.unwrap(); // half-close: we are done sending, still reading
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
        .await
        .expect("echo within 10s")
        .unwrap();
    got
}

#[tokio::test]
async fn tcp_echo_with_half_close_detected_and_forced() {
    for protocol in ["auto", "tcp"] {
        let (p, _e, _b, [inbound, echo_port, _, _]) = setup(protocol).await;
        // Binary payload that is clearly not HTTP, and a large one.
        let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(
            half_close_echo(echo_port, &payload).await,
            payload,
            "{protocol}"
        );
        assert_eq!(
            half_close_echo(inbound, b"\x00\x01ping").await,
            b"\x00\x01ping",
            "{protocol}"
        );
        let text = p.metrics().await;
        let bytes = sample(
            &text,
            "trellis_tcp_bytes_total",
            &[("direction", "outbound"), ("peer_service", "echo")],
        )
        .unwrap();
        assert_eq!(bytes, 400_000.0, "{protocol}: {text}");
        // The gauge returns to zero once connections close.
        trellis_testkit::wait::wait_for("connections closed", Duration::from_secs(5), || {
            let p = &p;
            async move {
                sample(
                    &p.metrics().await,
                    "trellis_tcp_connections_open",
                    &[("direction", "outbound"), ("peer_service", "echo")],
                ) == Some(0.0)
            }
        })
        .await;
    }
}

#[tokio::test]
async fn server_speaks_first_protocol_works() {
    let (_p, _e, _b, [_, _, banner_port, _]) = setup("auto").await;
    let started = Instant::now();
    let s = TcpStream::connect(banner_port).await.unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(5), r.read_line(&mut line))
        .await
        .expect("banner arrives although the client sent nothing")
        .unwrap();
    assert_eq!(line, BANNER);
    // The banner waits only for the bounded detection timeout (500 ms default).
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    r.get_mut().write_all(b"EHLO mesh\r\n").await.unwrap();
    line.clear();
    r.read_line(&mut line).await.unwrap();
    assert_eq!(line, "echo: EHLO mesh\r\n");
}

#[tokio::test]
async fn connect_tunnel_through_the_http_proxy_listener() {
    let (_p, _e, _b, [_, _, _, outbound]) = setup("auto").await;
    let mut s = TcpStream::connect(outbound).await.unwrap();
    s.write_all(b"CONNECT echo.default:7000 HTTP/1.1\r\nHost: echo.default:7000\r\n\r\n")
        .await
        .unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap();
    assert!(line.starts_with("HTTP/1.1 200"), "{line}");
    loop {
        line.clear();
        r.read_line(&mut line).await.unwrap();
        if line == "\r\n" {
            break;
        }
    }
    let mut s = r.into_inner();
    s.write_all(b"through the tunnel").await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    s.read_to_end(&mut got).await.unwrap();
    assert_eq!(got, b"through the tunnel");

    // curl's tunnel mode (-p) to an unknown service gets a 503 naming it.
    let (code, _) = curl(&[
        "-p",
        "-x",
        &format!("http://{outbound}"),
        "http://nowhere:80/",
    ])
    .await;
    assert_ne!(code, 0);
    let mut s = TcpStream::connect(outbound).await.unwrap();
    s.write_all(b"CONNECT nowhere:80 HTTP/1.1\r\nHost: nowhere:80\r\n\r\n")
        .await
        .unwrap();
    let mut buf = vec![0; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let resp = String::from_utf8_lossy(&buf[..n]);
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    assert!(resp.contains("nowhere"), "{resp}");
}

/// Reads the first line a server sends over `s`.
async fn first_line<S: tokio::io::AsyncRead + Unpin>(s: S) -> String {
    let mut line = String::new();
    tokio::time::timeout(
        Duration::from_secs(10),
        BufReader::new(s).read_line(&mut line),
    )
    .await
    .expect("a line within 10s")
    .unwrap();
    line
}

/// Opens `CONNECT authority` on the outbound listener and returns the tunnel's first line.
async fn tunnel_banner(outbound: std::net::SocketAddr, authority: &str) -> String {
    let mut s = TcpStream::connect(outbound).await.unwrap();
    let req = format!("CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap();
    assert!(line.starts_with("HTTP/1.1 200"), "{authority}: {line}");
    while line != "\r\n" {
        line.clear();
        r.read_line(&mut line).await.unwrap();
    }
    first_line(r).await
}

#[tokio::test]
async fn tcp_routes_send_connections_by_port_and_weight() {
    let primary = BannerOrigin::start_with("primary\r\n").await.unwrap();
    let replica = BannerOrigin::start_with("replica\r\n").await.unwrap();
    let (admin, outbound, db_port) = (free_addr(), free_addr(), free_addr());
    let dir = trellis_testkit::proxy::TempDir::new("tcp-routes");
    let rules = dir.path().join("rules.yaml");
    // The per-upstream port of `db` and CONNECT to port 5432 go to the replica; CONNECT to
    // 6000 splits 50/50; any other port (CONNECT db:7000) goes to `db` itself.
    std::fs::write(
        &rules,
        format!(
            "apiVersion: networking.istio.io/v1\nkind: VirtualService\n\
             metadata: {{ name: db, namespace: default }}\n\
             spec:\n  hosts: [db]\n  tcp:\n\
             \x20 - match: [{{ port: {} }}, {{ port: 5432 }}]\n\
             \x20   route: [{{ destination: {{ host: db-replica }} }}]\n\
             \x20 - match: [{{ port: 6000 }}]\n\
             \x20   route:\n\
             \x20   - {{ destination: {{ host: db }}, weight: 50 }}\n\
             \x20   - {{ destination: {{ host: db-replica }}, weight: 50 }}\n",
            db_port.port()
        ),
    )
    .unwrap();
    let yaml = format!(
        "service: api\nadmin: {admin}\noutbound: {{ listen: {outbound} }}\n\
         upstreams:\n\
         \x20 - service: db\n    listen: {db_port}\n    protocol: tcp\n    endpoints: [{}]\n\
         \x20 - service: db-replica\n    endpoints: [{}]\n\
         resources: [{}]\n",
        primary.addr(),
        replica.addr(),
        rules.display()
    );
    let p = proxy(&yaml, admin, &[]).await;

    let s = TcpStream::connect(db_port).await.unwrap();
    assert_eq!(first_line(s).await, "replica\r\n", "per-upstream port");
    assert_eq!(tunnel_banner(outbound, "db:5432").await, "replica\r\n");
    assert_eq!(tunnel_banner(outbound, "db:7000").await, "primary\r\n");
    let mut replicas = 0;
    for _ in 0..200 {
        if tunnel_banner(outbound, "db.default:6000").await == "replica\r\n" {
            replicas += 1;
        }
    }
    // Binomial(200, 0.5): 70..=130 is beyond five standard deviations.
    assert!(
        (70..=130).contains(&replicas),
        "{replicas} of 200 to the replica"
    );

    // The routes are visible in /config.
    let (_, config) = p.admin_get("/config").await;
    assert!(config.contains("default/db#tcp0"), "{config}");
}

#[tokio::test]
async fn tcp_connections_over_max_connections_are_turned_away_at_once() {
    let db = BannerOrigin::start_with("db\r\n").await.unwrap();
    let (admin, outbound, db_port) = (free_addr(), free_addr(), free_addr());
    let dir = trellis_testkit::proxy::TempDir::new("tcp-limits");
    let rules = dir.path().join("rules.yaml");
    std::fs::write(
        &rules,
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
         metadata: { name: db, namespace: default }\n\
         spec:\n  host: db\n  trafficPolicy:\n    connectionPool: { tcp: { maxConnections: 1 } }\n",
    )
    .unwrap();
    let yaml = format!(
        "service: api\nadmin: {admin}\noutbound: {{ listen: {outbound} }}\n\
         upstreams:\n\
         \x20 - service: db\n    listen: {db_port}\n    protocol: tcp\n    endpoints: [{}]\n\
         resources: [{}]\n",
        db.addr(),
        rules.display()
    );
    let p = proxy(&yaml, admin, &[]).await;

    // One connection holds the only slot while it lasts.
    let first = TcpStream::connect(db_port).await.unwrap();
    let mut first = BufReader::new(first);
    let mut line = String::new();
    first.read_line(&mut line).await.unwrap();
    assert_eq!(line, "db\r\n");

    // A second one is closed at once, without reaching the database.
    let start = Instant::now();
    let mut second = TcpStream::connect(db_port).await.unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), second.read_to_end(&mut buf))
        .await
        .expect("closed within 5s")
        .ok();
    assert!(buf.is_empty(), "{:?}", String::from_utf8_lossy(&buf));
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "{:?}",
        start.elapsed()
    );
    // So is a CONNECT tunnel to the same service: 503 saying why.
    let mut s = TcpStream::connect(outbound).await.unwrap();
    s.write_all(b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n")
        .await
        .unwrap();
    let mut resp = vec![0; 1024];
    let n = s.read(&mut resp).await.unwrap();
    let resp = String::from_utf8_lossy(&resp[..n]).to_string();
    assert!(resp.starts_with("HTTP/1.1 503"), "{resp}");
    assert!(resp.contains("overflow-connections"), "{resp}");
    let metrics = p.metrics().await;
    let overflows = metrics
        .lines()
        .find(|l| l.starts_with("trellis_overflow_total") && l.contains("kind=\"connections\""))
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert_eq!(overflows, 2.0, "{metrics}");

    // When the first closes, the slot is free again.
    drop(first);
    let line = eventually(Duration::from_secs(5), "a free slot", || async {
        let s = TcpStream::connect(db_port).await.unwrap();
        let mut line = String::new();
        let read = tokio::time::timeout(
            Duration::from_secs(2),
            BufReader::new(s).read_line(&mut line),
        )
        .await;
        matches!(read, Ok(Ok(n)) if n > 0).then_some(line)
    })
    .await;
    assert_eq!(line, "db\r\n");
}

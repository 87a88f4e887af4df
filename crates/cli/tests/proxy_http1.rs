//! HTTP/1.1 through the real `trellis` binary: inbound, outbound as an HTTP proxy and through
//! per-upstream ports, with real clients (hyper and curl).

mod common;

use common::*;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use trellis_testkit::client::{http1_get, ws_echo};
use trellis_testkit::origin::http::HttpOrigin;

struct Mesh {
    proxy: Trellis,
    inbound: std::net::SocketAddr,
    outbound: std::net::SocketAddr,
    users_port: std::net::SocketAddr,
    app: HttpOrigin,
    users: [HttpOrigin; 2],
}

/// One proxy: inbound -> app, outbound proxy and a per-upstream port for `user-profile`
/// (two endpoints), plus `dead` (refusing endpoint) and `empty` (no endpoints).
async fn mesh(extra: &[&str]) -> Mesh {
    mesh_with(extra, "").await
}

/// [`mesh`] with more bootstrap YAML (`resources: [...]`, say).
async fn mesh_with(extra: &[&str], more_yaml: &str) -> Mesh {
    let app = HttpOrigin::start_with_name("app").await.unwrap();
    let users = [
        HttpOrigin::start_with_name("users-1").await.unwrap(),
        HttpOrigin::start_with_name("users-2").await.unwrap(),
    ];
    let (admin, inbound, outbound, users_port) =
        (free_addr(), free_addr(), free_addr(), free_addr());
    let dead = free_addr();
    let yaml = format!(
        "service: frontend\nnamespace: edtech\nadmin: {admin}\n\
         inbound:\n  - listen: {inbound}\n    app: {app}\n\
         outbound:\n  listen: {outbound}\n\
         upstreams:\n\
         \x20 - service: user-profile\n    listen: {users_port}\n    endpoints: [{u1}, {u2}]\n\
         \x20 - service: dead\n    endpoints: [{dead}]\n\
         \x20 - service: empty\n{more_yaml}",
        app = app.addr(),
        u1 = users[0].addr(),
        u2 = users[1].addr(),
    );
    let proxy = proxy(&yaml, admin, extra).await;
    Mesh {
        proxy,
        inbound,
        outbound,
        users_port,
        app,
        users,
    }
}

#[tokio::test]
async fn inbound_reaches_the_local_app() {
    let m = mesh(&[]).await;
    let (status, headers, body) = http1_get(m.inbound, "/echo/hello?x=1", &[("x-custom", "v")])
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert_eq!(headers["x-origin"], "app");
    let echo = json(&body);
    assert_eq!(echo["path"], "/echo/hello?x=1");
    assert_eq!(echo["headers"]["x-custom"], "v");
    assert_eq!(echo["headers"]["host"], m.inbound.to_string());
    assert_eq!(m.app.requests(), 1);
}

#[tokio::test]
async fn outbound_http_proxy_routes_every_spelling_of_a_host() {
    let m = mesh(&[]).await;
    for host in [
        "user-profile",
        "user-profile.edtech",
        "user-profile.edtech.svc",
        "user-profile.edtech.svc.cluster.local",
        "USER-PROFILE.edtech.svc.cluster.local.",
        "user-profile:8080",
    ] {
        let (status, headers, body) = http1_get(m.outbound, &format!("http://{host}/echo"), &[])
            .await
            .unwrap();
        assert_eq!(status, 200, "{host}: {body:?}");
        assert!(
            headers["x-origin"].to_str().unwrap().starts_with("users-"),
            "{host}"
        );
        // The upstream sees origin-form with Host set to what the client asked for.
        let echo = json(&body);
        assert_eq!(echo["path"], "/echo");
        assert_eq!(echo["headers"]["host"], host);
    }
    let (status, _, body) = http1_get(m.outbound, "http://nosuch.edtech/", &[])
        .await
        .unwrap();
    assert_eq!(status, 503);
    assert!(
        String::from_utf8_lossy(&body).contains("nosuch.edtech"),
        "{body:?}"
    );
}

#[tokio::test]
async fn endpoints_are_balanced_round_robin_when_a_destination_rule_says_so() {
    let dir = trellis_testkit::proxy::TempDir::new("round-robin");
    let rule = dir.path().join("rule.yaml");
    std::fs::write(
        &rule,
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
         metadata: { name: user-profile, namespace: edtech }\n\
         spec:\n  host: user-profile\n  trafficPolicy: { loadBalancer: { simple: ROUND_ROBIN } }\n",
    )
    .unwrap();
    let m = mesh_with(&[], &format!("resources: [{}]\n", rule.display())).await;
    for _ in 0..10 {
        let (status, _, _) = http1_get(m.users_port, "/echo", &[]).await.unwrap();
        assert_eq!(status, 200);
    }
    assert_eq!((m.users[0].requests(), m.users[1].requests()), (5, 5));
}

#[tokio::test]
async fn curl_through_proxy_mode_and_upstream_port() {
    let m = mesh(&[]).await;
    let proxy = format!("http://{}", m.outbound);
    let (code, out) = curl(&["-x", &proxy, "http://user-profile.edtech/echo?via=proxy"]).await;
    assert_eq!(code, 0);
    assert_eq!(json(out.as_bytes())["path"], "/echo?via=proxy");

    // http_proxy in the environment, as an unmodified app would use it.
    let (code, out) = curl_env(&["http://user-profile/echo"], &[("http_proxy", &proxy)]).await;
    assert_eq!(code, 0);
    assert_eq!(json(out.as_bytes())["path"], "/echo");

    let (code, out) = curl(&[&format!("http://{}/echo?via=port", m.users_port)]).await;
    assert_eq!(code, 0);
    assert_eq!(json(out.as_bytes())["path"], "/echo?via=port");

    // POST with a body through the proxy.
    let (code, out) = curl(&[
        "-x",
        &proxy,
        "--data-binary",
        "hello world",
        "http://user-profile/upload",
    ])
    .await;
    assert_eq!((code, out.as_str()), (0, "11"));
}

#[tokio::test]
async fn keep_alive_reuses_client_and_upstream_connections() {
    let m = mesh(&[]).await;
    let mut s = TcpStream::connect(m.users_port).await.unwrap();
    for i in 0..5 {
        s.write_all(format!("GET /echo/{i} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let (status, body) = read_response(&mut s).await;
        assert_eq!(status, 200);
        assert_eq!(json(&body)["path"], format!("/echo/{i}"));
    }
    // Five sequential requests used one upstream connection per endpoint at most.
    let metrics = m.proxy.metrics().await;
    assert_eq!(
        sample(
            &metrics,
            "trellis_tcp_connections_total",
            &[("direction", "outbound"), ("peer_service", "user-profile")]
        ),
        Some(1.0),
        "{metrics}"
    );
}

/// Reads one HTTP/1.1 response with Content-Length or chunked body from a raw stream.
async fn read_response(s: &mut TcpStream) -> (u16, Vec<u8>) {
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).await.unwrap();
    let status: u16 = line.split(' ').nth(1).unwrap().parse().unwrap();
    let (mut len, mut chunked) = (0usize, false);
    loop {
        let mut h = String::new();
        r.read_line(&mut h).await.unwrap();
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let lower = h.to_ascii_lowercase();
        if let Some(v) = lower.strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
        if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
            chunked = true;
        }
    }
    let mut body = Vec::new();
    if chunked {
        loop {
            let mut size = String::new();
            r.read_line(&mut size).await.unwrap();
            let n = usize::from_str_radix(size.trim(), 16).unwrap();
            let mut chunk = vec![0; n + 2];
            r.read_exact(&mut chunk).await.unwrap();
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else {
        body.resize(len, 0);
        r.read_exact(&mut body).await.unwrap();
    }
    (status, body)
}

#[tokio::test]
async fn large_bodies_stream_both_ways() {
    let m = mesh(&[]).await;
    // 64 MiB download, chunked from the origin.
    let (code, out) = curl(&[
        "-o",
        "/dev/null",
        "-w",
        "%{size_download}",
        &format!("http://{}/stream/67108864", m.users_port),
    ])
    .await;
    assert_eq!((code, out.as_str()), (0, "67108864"));
    // 32 MiB chunked upload.
    let mut s = TcpStream::connect(m.users_port).await.unwrap();
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        .await
        .unwrap();
    let chunk = vec![b'y'; 1 << 20];
    for _ in 0..32 {
        s.write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
            .await
            .unwrap();
        s.write_all(&chunk).await.unwrap();
        s.write_all(b"\r\n").await.unwrap();
    }
    s.write_all(b"0\r\n\r\n").await.unwrap();
    let (status, body) = read_response(&mut s).await;
    assert_eq!(
        (status, String::from_utf8(body).unwrap()),
        (200, (32u64 << 20).to_string())
    );
    // Streaming, not buffering: the proxy's memory stays far below the body sizes.
    let rss = sample(
        &m.proxy.metrics().await,
        "process_resident_memory_bytes",
        &[],
    )
    .unwrap();
    assert!(rss < 40.0 * 1024.0 * 1024.0, "rss {rss}");
}

#[tokio::test]
async fn hop_by_hop_headers_are_not_forwarded() {
    let m = mesh(&[]).await;
    let (_, _, body) = http1_get(
        m.users_port,
        "/echo",
        &[
            ("connection", "keep-alive, x-secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic Zm9vOmJhcg=="),
            ("te", "trailers"),
            ("x-kept", "yes"),
        ],
    )
    .await
    .unwrap();
    let h = &json(&body)["headers"];
    for gone in [
        "x-secret",
        "keep-alive",
        "proxy-authorization",
        "connection",
    ] {
        assert!(h.get(gone).is_none(), "{gone} forwarded: {h}");
    }
    assert_eq!(h["x-kept"], "yes");
    assert_eq!(h["te"], "trailers");
}

#[tokio::test]
async fn request_id_is_generated_or_propagated_and_logged() {
    let m = mesh(&["--access-log", "json"]).await;
    let (_, _, body) = http1_get(m.users_port, "/echo", &[("x-request-id", "given-id-1")])
        .await
        .unwrap();
    assert_eq!(json(&body)["headers"]["x-request-id"], "given-id-1");
    let (_, _, body) = http1_get(
        m.outbound,
        "http://user-profile/echo/gen",
        &[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )],
    )
    .await
    .unwrap();
    let generated = json(&body)["headers"]["x-request-id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(generated.len(), 36, "{generated}");

    let mut lines = Vec::new();
    trellis_testkit::wait::wait_for("two access log lines", Duration::from_secs(5), || {
        lines = m
            .proxy
            .stdout()
            .lines()
            .map(str::to_string)
            .collect::<Vec<_>>();
        let n = lines.len();
        async move { n >= 2 }
    })
    .await;
    let entries: Vec<serde_json::Value> = lines.iter().map(|l| json(l.as_bytes())).collect();
    let e = entries
        .iter()
        .find(|e| e["request_id"] == generated)
        .expect("logged");
    assert_eq!(e["direction"], "outbound");
    assert_eq!(e["source"], "frontend.edtech");
    assert_eq!(e["destination"], "user-profile.edtech");
    assert_eq!(e["method"], "GET");
    assert_eq!(e["authority"], "user-profile");
    assert_eq!(e["path"], "/echo/gen");
    assert_eq!(e["status"], 200);
    assert_eq!(e["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert!(e["duration_ms"].as_f64().unwrap() >= 0.0);
    assert!(e["bytes_out"].as_u64().unwrap() > 0);
    assert!(e["upstream"].as_str().unwrap().starts_with("127.0.0.1:"));
    for key in ["ts", "bytes_in"] {
        assert!(e.get(key).is_some(), "{key} missing");
    }
    assert!(entries.iter().any(|e| e["request_id"] == "given-id-1"));
}

#[tokio::test]
async fn metrics_count_requests_by_direction_destination_and_code() {
    let m = mesh(&[]).await;
    for _ in 0..7 {
        assert_eq!(http1_get(m.users_port, "/echo", &[]).await.unwrap().0, 200);
    }
    for _ in 0..3 {
        assert_eq!(
            http1_get(m.users_port, "/status/500", &[]).await.unwrap().0,
            500
        );
    }
    for _ in 0..4 {
        assert_eq!(http1_get(m.inbound, "/echo", &[]).await.unwrap().0, 200);
    }
    assert_eq!(
        http1_get(m.outbound, "http://dead/", &[]).await.unwrap().0,
        503
    );
    let text = m.proxy.metrics().await;
    let out = |code| {
        sample(
            &text,
            "trellis_http_requests_total",
            &[
                ("direction", "outbound"),
                ("source_service", "frontend"),
                ("source_namespace", "edtech"),
                ("destination_service", "user-profile"),
                ("destination_namespace", "edtech"),
                ("response_code", code),
                ("tls", "false"),
            ],
        )
    };
    assert_eq!(out("200"), Some(7.0), "{text}");
    assert_eq!(out("500"), Some(3.0));
    assert_eq!(
        sample(
            &text,
            "trellis_http_requests_total",
            &[
                ("direction", "inbound"),
                ("destination_service", "frontend"),
                ("response_code", "200")
            ]
        ),
        Some(4.0)
    );
    assert_eq!(
        sample(
            &text,
            "trellis_http_requests_total",
            &[("destination_service", "dead"), ("response_code", "503")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "trellis_http_request_duration_seconds_count",
            &[
                ("direction", "outbound"),
                ("destination_service", "user-profile")
            ]
        ),
        Some(10.0)
    );
    assert!(
        sample(
            &text,
            "trellis_tcp_bytes_total",
            &[("direction", "inbound")]
        )
        .unwrap()
            > 0.0
    );
    assert_eq!(
        sample(
            &text,
            "trellis_tcp_connections_total",
            &[("direction", "inbound")]
        ),
        Some(4.0)
    );
    assert!(sample(&text, "process_resident_memory_bytes", &[]).unwrap() > 0.0);
    assert!(sample(&text, "process_cpu_seconds_total", &[]).is_some());
    // Labels never carry raw paths or hosts.
    assert!(
        !text.contains("/echo") && !text.contains("/status"),
        "{text}"
    );
}

#[tokio::test]
async fn idle_destination_series_are_dropped() {
    let m = mesh(&["--metrics-retention", "1s"]).await;
    assert_eq!(http1_get(m.users_port, "/echo", &[]).await.unwrap().0, 200);
    assert!(m
        .proxy
        .metrics()
        .await
        .contains("destination_service=\"user-profile\""));
    trellis_testkit::wait::wait_for("idle series dropped", Duration::from_secs(10), || {
        let p = &m.proxy;
        async move {
            !p.metrics()
                .await
                .contains("destination_service=\"user-profile\"")
        }
    })
    .await;
    // And they come back when traffic does.
    assert_eq!(http1_get(m.users_port, "/echo", &[]).await.unwrap().0, 200);
    assert!(m
        .proxy
        .metrics()
        .await
        .contains("destination_service=\"user-profile\""));
}

#[tokio::test]
async fn websocket_upgrade_passes_through() {
    let m = mesh(&[]).await;
    let echoed = ws_echo(&format!("ws://{}/ws", m.users_port), "hello over the mesh")
        .await
        .unwrap();
    assert_eq!(echoed, "hello over the mesh");
    let echoed = ws_echo(&format!("ws://{}/ws", m.inbound), "inbound")
        .await
        .unwrap();
    assert_eq!(echoed, "inbound");
}

#[tokio::test]
async fn admin_endpoints() {
    let m = mesh(&[]).await;
    let p = &m.proxy;
    assert_eq!(p.admin_get("/live").await.0, 200);
    assert_eq!(p.admin_get("/ready").await.0, 200);
    let (status, config) = p.admin_get("/config").await;
    assert_eq!(status, 200);
    let config = json(config.as_bytes());
    assert_eq!(config["bootstrap"]["service"], "frontend");
    assert_eq!(
        config["bootstrap"]["upstreams"][0]["service"],
        "user-profile"
    );
    assert_eq!(config["bootstrap"]["timeouts"]["connect"], "10s");
    assert_eq!(p.admin_get("/certs").await.0, 200);
    assert_eq!(p.admin_get("/nope").await.0, 404);
    assert_eq!(
        p.admin_get("/shutdown").await.0,
        405,
        "GET /shutdown must not drain"
    );
    assert_eq!(p.admin_get("/ready").await.0, 200);
}

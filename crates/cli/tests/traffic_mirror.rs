//! Traffic mirroring from Istio VirtualService `mirror` / `mirrorPercentage`, end to end:
//! copies reach the mirror, the client is answered by the route's destination only, and a
//! mirror that never answers neither slows nor fails the client.

mod common;

use common::*;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use trellis_testkit::origin::http::HttpOrigin;
use trellis_testkit::proxy::{Control, TempDir};

const RULES: &str = "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: user-profile, namespace: edtech }
spec:
  hosts: [user-profile]
  http:
  - name: into-the-hole
    match: [{ uri: { prefix: /echo/hole/ } }]
    route: [{ destination: { host: user-profile } }]
    mirror: { host: profile-hole }
  - name: half
    match: [{ uri: { prefix: /echo/half/ } }]
    route: [{ destination: { host: user-profile } }]
    mirrors: [{ destination: { host: profile-shadow }, percentage: { value: 50 } }]
  - name: shadowed
    route: [{ destination: { host: user-profile } }]
    mirror: { host: profile-shadow }
    mirrorPercentage: { value: 100 }
";

/// A workload joined to `control` in namespace edtech, labelled `app=<service>`.
async fn joined_edtech(control: &Control, service: &str, app: SocketAddr) -> (Trellis, SocketAddr) {
    joined(
        control,
        service,
        "edtech",
        app,
        &[&format!("app={service}")],
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrors_get_copies_and_never_affect_the_client() {
    let control = Control::start(BIN, &[]).await;
    let a = HttpOrigin::start_with_name("a").await.unwrap();
    let b = HttpOrigin::start_with_name("b").await.unwrap();
    // A black hole: accepts, then answers only after a minute.
    let hole = HttpOrigin::start_with_delay("hole", Duration::from_secs(60))
        .await
        .unwrap();
    let _pa = joined_edtech(&control, "user-profile", a.addr()).await;
    let _pb = joined_edtech(&control, "profile-shadow", b.addr()).await;
    let _ph = joined_edtech(&control, "profile-hole", hole.addr()).await;
    let front_app = HttpOrigin::start().await.unwrap();
    let (frontend, out) = joined_edtech(&control, "frontend", front_app.addr()).await;

    let dir = TempDir::new("mirror");
    apply(&control, &dir, "rules.yaml", RULES);
    eventually(
        Duration::from_secs(5),
        "the routes and their mirrors reach the frontend",
        || async {
            let (_, cfg) = frontend.admin_get("/config").await;
            let cfg: Value = serde_json::from_str(&cfg).ok()?;
            let host = cfg["routes"]
                .as_array()?
                .iter()
                .find(|h| h["host"] == "user-profile.edtech")?
                .clone();
            let routes = host["routes"].as_array()?;
            let ready = routes.len() == 3
                && routes.iter().all(|r| {
                    r["mirrors"].as_array().is_some_and(|m| {
                        m.len() == 1
                            && m[0]["cluster"]["endpoints"]
                                .as_array()
                                .is_some_and(|e| !e.is_empty())
                    })
                });
            ready.then_some(())
        },
    )
    .await;
    let (_, cfg) = frontend.admin_get("/config").await;
    assert!(cfg.contains("\"fraction\": 0.5"), "{cfg}");

    let h2 = H2::connect(out).await;
    let url = |p: &str| format!("http://user-profile.edtech{p}");

    // 50 GETs and 10 small POSTs: all answered by A, each copied to B.
    for i in 0..50 {
        let (status, headers, _) = h2.request("GET", &url(&format!("/echo/{i}")), b"").await;
        assert_eq!(status, 200);
        assert_eq!(headers.get("x-origin").unwrap(), "a");
    }
    for i in 0..10 {
        let body = format!("{{\"n\":{i}}}");
        let req = http::Request::post(url("/echo"))
            .body(http_body_util::Full::new(bytes::Bytes::from(body.clone())))
            .unwrap();
        let (status, headers, echo) = h2.send(req).await;
        assert_eq!(status, 200);
        assert_eq!(headers.get("x-origin").unwrap(), "a");
        let echo: Value = serde_json::from_slice(&echo).unwrap();
        assert_eq!(echo["body_len"], body.len(), "{echo}");
    }
    assert_eq!(a.requests(), 60);
    eventually(Duration::from_secs(5), "B gets 60 copies", || async {
        (b.requests() >= 60).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(b.requests(), 60, "one copy per request");
    let (_, metrics) = frontend.admin_get("/metrics").await;
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("trellis_mirrored_requests_total")
                && l.contains("destination_service=\"profile-shadow\"")
        })
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(line.ends_with(" 60"), "{line}");

    // A mirror that never answers: the client neither waits nor fails.
    let t0 = Instant::now();
    for i in 0..50 {
        let (status, headers, _) = h2
            .request("GET", &url(&format!("/echo/hole/{i}")), b"")
            .await;
        assert_eq!(status, 200);
        assert_eq!(headers.get("x-origin").unwrap(), "a");
    }
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(2), "{took:?}");

    // 50%: roughly half of 200 requests are copied.
    let before = b.requests();
    for i in 0..200 {
        let (status, headers, _) = h2
            .request("GET", &url(&format!("/echo/half/{i}")), b"")
            .await;
        assert_eq!(status, 200);
        assert_eq!(headers.get("x-origin").unwrap(), "a");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let copied = b.requests() - before;
    assert!((60..=140).contains(&copied), "{copied} of 200 copied");
}

//! Outbound routing from Istio VirtualService and DestinationRule, end to end: subsets by
//! labels, weighted canary splits, header-based canaries, header edits, rewrite, redirect,
//! direct response, fault injection and route timeouts, through real proxies registered with
//! a control plane.

mod common;

use common::*;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use trellis_testkit::origin::http::HttpOrigin;
use trellis_testkit::proxy::{Control, TempDir};

const RULES: &str = "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: user-profile, namespace: edtech }
spec:
  host: user-profile
  subsets:
  - { name: v1, labels: { version: v1 } }
  - { name: v2, labels: { version: v2 } }
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: user-profile, namespace: edtech }
spec:
  hosts: [user-profile]
  http:
  - name: direct
    match: [{ uri: { exact: /teapot } }]
    directResponse: { status: 418, body: { string: short and stout } }
  - name: moved
    match: [{ uri: { prefix: /old/ } }]
    redirect: { uri: /new/place, redirectCode: 308 }
  - name: broken
    match: [{ uri: { prefix: /broken } }]
    fault: { abort: { httpStatus: 503, percentage: { value: 100 } } }
    route: [{ destination: { host: user-profile, subset: v1 } }]
  - name: slow
    match: [{ uri: { prefix: /slow/ } }]
    timeout: 300ms
    route: [{ destination: { host: user-profile, subset: v1 } }]
  - name: legacy
    match: [{ uri: { prefix: /legacy/ } }]
    rewrite: { uri: /echo/ }
    route: [{ destination: { host: user-profile, subset: v1 } }]
  - name: canary-header
    match: [{ headers: { x-canary: { exact: \"true\" } } }]
    route: [{ destination: { host: user-profile, subset: v2 } }]
    headers:
      request: { set: { x-routed-by: canary-header } }
      response: { add: { x-route: canary-header } }
  - name: split
    route:
    - { destination: { host: user-profile, subset: v1 }, weight: 75 }
    - { destination: { host: user-profile, subset: v2 }, weight: 25 }
";

/// A workload joined to `control` in namespace edtech.
async fn joined_edtech(
    control: &Control,
    service: &str,
    app: SocketAddr,
    labels: &[&str],
) -> (Trellis, SocketAddr) {
    joined(control, service, "edtech", app, labels).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn virtual_services_route_split_rewrite_and_fail_as_configured() {
    let control = Control::start(BIN, &[]).await;
    let v1 = HttpOrigin::start_with_name("v1").await.unwrap();
    let v2 = HttpOrigin::start_with_name("v2").await.unwrap();
    let _p1 = joined_edtech(
        &control,
        "user-profile",
        v1.addr(),
        &["app=user-profile", "version=v1"],
    )
    .await;
    let _p2 = joined_edtech(
        &control,
        "user-profile",
        v2.addr(),
        &["app=user-profile", "version=v2"],
    )
    .await;
    let front_app = HttpOrigin::start().await.unwrap();
    let (frontend, out) =
        joined_edtech(&control, "frontend", front_app.addr(), &["app=frontend"]).await;

    let dir = TempDir::new("routing");
    apply(&control, &dir, "rules.yaml", RULES);
    eventually(
        Duration::from_secs(5),
        "routes and both endpoints reach the frontend",
        || async {
            let (_, cfg) = frontend.admin_get("/config").await;
            let ok = cfg.contains("canary-header") && cfg.matches("\"version\": \"v").count() >= 2;
            ok.then_some(())
        },
    )
    .await;

    // The compiled routes and clusters are visible in the admin /config.
    let (_, cfg) = frontend.admin_get("/config").await;
    let host = config_host(&cfg, "user-profile.edtech");
    assert_eq!(
        route_names(&host),
        [
            "direct",
            "moved",
            "broken",
            "slow",
            "legacy",
            "canary-header",
            "split"
        ]
    );
    let split = &host["routes"][6]["action"]["forward"];
    assert_eq!(split[0]["weight"], 75);
    assert_eq!(split[1]["cluster"]["subset"], "v2");
    assert_eq!(
        split[1]["cluster"]["endpoints"].as_array().unwrap().len(),
        1
    );
    let h2 = H2::connect(out).await;
    let url = |p: &str| format!("http://user-profile.edtech{p}");
    let origin = |h: &http::HeaderMap| {
        h.get("x-origin")
            .map(|v| v.to_str().unwrap().to_string())
            .unwrap_or_default()
    };

    // Weighted split: 75/25 over 10,000 requests, within 2 points.
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let h2 = h2.clone();
        let u = url("/echo");
        tasks.push(tokio::spawn(async move {
            let mut v2 = 0u32;
            for _ in 0..1250 {
                let (status, headers, _) = h2.request("GET", &u, b"").await;
                assert_eq!(status, 200);
                if headers.get("x-origin").is_some_and(|v| v == "v2") {
                    v2 += 1;
                }
            }
            v2
        }));
    }
    let mut v2_count = 0;
    for t in tasks {
        v2_count += t.await.unwrap();
    }
    let share = f64::from(v2_count) / 100.0;
    assert!(
        (23.0..=27.0).contains(&share),
        "v2 got {share}% (want 25 ± 2)"
    );

    // Header canary: always v2, with the route's header edits both ways.
    for _ in 0..20 {
        let req = http::Request::get(url("/echo"))
            .header("x-canary", "true")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let (status, headers, body) = h2.send(req).await;
        assert_eq!(status, 200);
        assert_eq!(origin(&headers), "v2");
        assert_eq!(headers.get("x-route").unwrap(), "canary-header");
        let echo: Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(echo["headers"]["x-routed-by"], "canary-header");
    }

    // Direct response, redirect, injected abort.
    let (status, _, body) = h2.request("GET", &url("/teapot"), b"").await;
    assert_eq!((status, &body[..]), (418, &b"short and stout"[..]));
    let (status, headers, _) = h2.request("GET", &url("/old/x"), b"").await;
    assert_eq!(status, 308);
    assert_eq!(
        headers.get("location").unwrap(),
        "http://user-profile.edtech/new/place"
    );
    let (status, headers, _) = h2.request("GET", &url("/broken"), b"").await;
    assert_eq!(status, 503);
    assert_eq!(headers.get("x-trellis-error").unwrap(), "fault-injected");

    // Answers the proxy makes itself are counted like any response.
    let m = frontend.metrics().await;
    for code in ["418", "308", "503"] {
        let n = sample(
            &m,
            "trellis_http_requests_total",
            &[
                ("direction", "outbound"),
                ("destination_service", "user-profile"),
                ("response_code", code),
            ],
        )
        .unwrap_or(0.0);
        assert!(n >= 1.0, "response_code {code} not counted:\n{m}");
    }

    // Rewrite: /legacy/x reaches the app as /echo/x, on v1.
    let (status, headers, body) = h2.request("GET", &url("/legacy/x?q=1"), b"").await;
    assert_eq!(status, 200);
    assert_eq!(origin(&headers), "v1");
    let echo: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo["path"], "/echo/x?q=1", "the query is kept: {echo}");

    // Route timeout: 504 within 50 ms of 300 ms.
    let t0 = Instant::now();
    let (status, headers, _) = h2.request("GET", &url("/slow/2000"), b"").await;
    let took = t0.elapsed();
    assert_eq!(status, 504);
    assert_eq!(headers.get("x-trellis-error").unwrap(), "upstream-timeout");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(350),
        "{took:?}"
    );

    // A route setting this proxy does not enforce yet is refused by name (NACK), never
    // silently ignored; the running routes stay.
    let keepalive = RULES.replace(
        "  host: user-profile\n  subsets:\n",
        "  host: user-profile\n  trafficPolicy: { connectionPool: { tcp: { tcpKeepalive: { time: 10s } } } }\n  subsets:\n",
    );
    apply(&control, &dir, "keepalive.yaml", &keepalive);
    eventually(Duration::from_secs(3), "the frontend NACKs", || async {
        let (_, out, _) = control.cli(&["status", "-o", "json"]);
        let st: Value = serde_json::from_str(&out).ok()?;
        st["proxies"].as_array()?.iter().find(|p| {
            p["service"] == "frontend"
                && p["last_nack"]["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("tcpKeepalive: not enforced"))
        })?;
        Some(())
    })
    .await;
    let (status, _, _) = h2.request("GET", &url("/teapot"), b"").await;
    assert_eq!(status, 418);
}

const CORS_RULES: &str = r#"
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: user-profile, namespace: edtech }
spec:
  hosts: [user-profile]
  http:
  - name: api
    match: [{ uri: { prefix: /echo } }]
    corsPolicy:
      allowOrigins: [{ exact: https://app.example }]
      allowMethods: [GET, POST]
      allowHeaders: [x-token]
      exposeHeaders: [x-request-id]
      maxAge: 1h
      allowCredentials: true
    rewrite: { uriRegexRewrite: { match: "^/echo/v1/(.*)$", rewrite: "/echo/\\1" } }
    route: [{ destination: { host: user-profile } }]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_policies_answer_preflights_and_regex_rewrites_apply() {
    let origin = HttpOrigin::start_with_name("v1").await.unwrap();
    let dir = TempDir::new("cors");
    let rules = dir.path().join("rules.yaml");
    std::fs::write(&rules, CORS_RULES).unwrap();
    let (admin, outbound) = (free_addr(), free_addr());
    let yaml = format!(
        "service: frontend\nnamespace: edtech\nadmin: {admin}\noutbound: {{ listen: {outbound} }}\n\
         upstreams:\n  - {{ service: user-profile, endpoints: [{}] }}\nresources: [{}]\n",
        origin.addr(),
        rules.display()
    );
    let _p = proxy(&yaml, admin, &[]).await;
    let proxy_arg = format!("http://{outbound}");
    let curl_head = |extra: Vec<&'static str>| {
        let proxy_arg = proxy_arg.clone();
        async move {
            let mut args = vec!["-s", "-o", "/dev/null", "-D", "-", "-x", &proxy_arg];
            args.extend(extra);
            curl(&args).await
        }
    };

    // A preflight from the allowed origin: answered by the proxy, never reaching the app.
    let before = origin.requests();
    let (code, head) = curl_head(vec![
        "-X",
        "OPTIONS",
        "-H",
        "Origin: https://app.example",
        "-H",
        "Access-Control-Request-Method: POST",
        "http://user-profile.edtech/echo/v1/users",
    ])
    .await;
    assert_eq!(code, 0);
    let head = head.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    for line in [
        "access-control-allow-origin: https://app.example",
        "access-control-allow-methods: get,post",
        "access-control-allow-headers: x-token",
        "access-control-max-age: 3600",
        "access-control-allow-credentials: true",
    ] {
        assert!(head.contains(line), "{line}: {head}");
    }
    assert_eq!(origin.requests(), before);

    // A preflight from another origin is forwarded, without CORS headers.
    let (_, head) = curl_head(vec![
        "-X",
        "OPTIONS",
        "-H",
        "Origin: https://evil.example",
        "-H",
        "Access-Control-Request-Method: POST",
        "http://user-profile.edtech/echo/v1/users",
    ])
    .await;
    assert!(
        !head.to_ascii_lowercase().contains("access-control-"),
        "{head}"
    );
    assert_eq!(origin.requests(), before + 1);

    // An actual request: CORS headers on the response, the path rewritten by the regex.
    let (code, out) = curl(&[
        "-s",
        "-D",
        "/dev/stderr",
        "-x",
        &proxy_arg,
        "-H",
        "Origin: https://app.example",
        "http://user-profile.edtech/echo/v1/users?id=7",
    ])
    .await;
    assert_eq!(code, 0);
    assert_eq!(json(out.as_bytes())["path"], "/echo/users?id=7");
    let (_, head) = curl_head(vec![
        "-H",
        "Origin: https://app.example",
        "http://user-profile.edtech/echo/v1/users",
    ])
    .await;
    let head = head.to_ascii_lowercase();
    assert!(
        head.contains("access-control-allow-origin: https://app.example"),
        "{head}"
    );
    assert!(
        head.contains("access-control-expose-headers: x-request-id"),
        "{head}"
    );
}

const GAMMA_ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: user-profile-canary, namespace: edtech }
spec:
  parentRefs: [{ group: "", kind: Service, name: user-profile, port: 80 }]
  rules:
  - matches: [{ headers: [{ name: x-canary, value: "true" }] }]
    backendRefs: [{ name: user-profile-v2, port: 80 }]
  - backendRefs: [{ name: user-profile, port: 80 }]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_routes_applied_to_the_control_plane_route_the_mesh() {
    let control = Control::start(BIN, &[]).await;
    let v1 = HttpOrigin::start_with_name("v1").await.unwrap();
    let v2 = HttpOrigin::start_with_name("v2").await.unwrap();
    let _p1 = joined_edtech(&control, "user-profile", v1.addr(), &[]).await;
    let _p2 = joined_edtech(&control, "user-profile-v2", v2.addr(), &[]).await;
    let front_app = HttpOrigin::start().await.unwrap();
    let (frontend, out) = joined_edtech(&control, "frontend", front_app.addr(), &[]).await;

    let dir = TempDir::new("gamma");
    apply(&control, &dir, "route.yaml", GAMMA_ROUTE);
    eventually(
        Duration::from_secs(5),
        "the route reaches the frontend",
        || async {
            let (_, cfg) = frontend.admin_get("/config").await;
            let host = config_host(&cfg, "user-profile.edtech");
            (route_names(&host).len() == 2).then_some(())
        },
    )
    .await;

    let h2 = H2::connect(out).await;
    let origin_of = |canary: bool| {
        let mut req = http::Request::get("http://user-profile.edtech/echo");
        if canary {
            req = req.header("x-canary", "true");
        }
        let req = req
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let h2 = h2.clone();
        async move {
            let (status, headers, _) = h2.send(req).await;
            let origin = headers
                .get("x-origin")
                .map(|v| v.to_str().unwrap().to_string());
            (status, origin.unwrap_or_default())
        }
    };
    eventually(Duration::from_secs(5), "the canary reaches v2", || async {
        (origin_of(true).await == (200, "v2".to_string())).then_some(())
    })
    .await;
    for _ in 0..10 {
        assert_eq!(origin_of(false).await, (200, "v1".to_string()));
        assert_eq!(origin_of(true).await, (200, "v2".to_string()));
    }
}

//! VirtualService `retries` end to end: failed attempts retried on the configured conditions,
//! non-idempotent requests left alone, per-try timeouts, gRPC statuses, and the retry budget
//! capping what a failing upstream sees — through real proxies joined to a control plane.

mod common;

use common::*;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use trellis_testkit::origin::grpc::{EchoClient, EchoRequest, GrpcOrigin};
use trellis_testkit::origin::http::HttpOrigin;
use trellis_testkit::proxy::{Control, TempDir};

const RULES: &str = "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: user-profile, namespace: edtech }
spec:
  hosts: [user-profile]
  http:
  - name: per-try
    match: [{ uri: { prefix: /slow/ } }]
    timeout: 1s
    retries: { attempts: 2, perTryTimeout: 200ms, retryOn: gateway-error }
    route: [{ destination: { host: user-profile } }]
  - name: retried
    retries: { attempts: 3, retryOn: 5xx }
    route: [{ destination: { host: user-profile } }]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: scoring, namespace: edtech }
spec:
  hosts: [scoring]
  http:
  - name: grpc-retried
    retries: { attempts: 2, retryOn: unavailable }
    route: [{ destination: { host: scoring } }]
";

/// The value of `metric{destination_service=service,destination_namespace="edtech"}`.
async fn counter(proxy: &Trellis, metric: &str, service: &str) -> u64 {
    let (_, text) = proxy.admin_get("/metrics").await;
    let series =
        format!("{metric}{{destination_service=\"{service}\",destination_namespace=\"edtech\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map_or(0, |v| v.trim().parse().unwrap())
}

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
async fn retries_recover_failures_within_the_budget() {
    let control = Control::start(BIN, &[]).await;
    let users = HttpOrigin::start().await.unwrap();
    let scoring = GrpcOrigin::start().await.unwrap();
    let _p1 = joined_edtech(&control, "user-profile", users.addr()).await;
    let _p2 = joined_edtech(&control, "scoring", scoring.addr()).await;
    let front_app = HttpOrigin::start().await.unwrap();
    let (frontend, out) = joined_edtech(&control, "frontend", front_app.addr()).await;

    let dir = TempDir::new("retries");
    let file = dir.path().join("rules.yaml");
    std::fs::write(&file, RULES).unwrap();
    let applied = Instant::now();
    let (code, o, e) = control.cli(&["apply", "-f", file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{o}{e}");
    let h2 = H2::connect(out).await;
    let url = |p: &str| format!("http://user-profile.edtech{p}");
    eventually(
        Duration::from_secs(5),
        "the retry routes and both upstreams reach the frontend",
        || async {
            let (_, cfg) = frontend.admin_get("/config").await;
            if !(cfg.contains("grpc-retried") && cfg.contains("per-try")) {
                return None;
            }
            let (status, _, _) = h2.request("GET", &url("/echo"), b"").await;
            (status == 200).then_some(())
        },
    )
    .await;
    let retries = |s: &'static str| counter(&frontend, "trellis_retries_total", s);

    // (a) Two 503s, then 200: the client sees the 200, after two retries.
    let before = users.requests();
    let (status, _, body) = h2.request("GET", &url("/fail-first/a/2/503"), b"").await;
    assert_eq!((status, &body[..]), (200, &b"ok"[..]));
    assert_eq!(users.requests() - before, 3);
    assert_eq!(retries("user-profile").await, 2);

    // A body is replayed on the retry.
    let (status, _, body) = h2
        .request("PUT", &url("/fail-first/put/1/500"), b"payload")
        .await;
    assert_eq!((status, &body[..]), (200, &b"ok"[..]));
    assert_eq!(retries("user-profile").await, 3);

    // (b) POST is not retried on a 503: the app may have acted on it.
    let before = users.requests();
    let (status, _, _) = h2.request("POST", &url("/fail-first/b/1/503"), b"x").await;
    assert_eq!(status, 503);
    assert_eq!(users.requests() - before, 1);
    assert_eq!(retries("user-profile").await, 3);

    // (e) Each try is cut at perTryTimeout and retried; the route timeout bounds them all.
    let before = users.requests();
    let t0 = Instant::now();
    let (status, headers, _) = h2.request("GET", &url("/slow/2000"), b"").await;
    let took = t0.elapsed();
    assert_eq!(status, 504);
    assert_eq!(headers.get("x-trellis-error").unwrap(), "upstream-timeout");
    assert!(
        took >= Duration::from_millis(600) && took < Duration::from_millis(1100),
        "{took:?}"
    );
    assert_eq!(users.requests() - before, 3);
    assert_eq!(retries("user-profile").await, 5);

    // (d) gRPC UNAVAILABLE in a trailers-only response is retried (a POST, but the route
    // lists the gRPC status as retriable).
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{out}"))
        .unwrap()
        .origin("http://scoring.edtech".parse().unwrap())
        .connect()
        .await
        .unwrap();
    let mut client = EchoClient::new(channel);
    let reply = client
        .unary(EchoRequest {
            message: "unavailable-once:d".into(),
        })
        .await
        .unwrap();
    assert_eq!(reply.into_inner().message, "unavailable-once:d");
    assert_eq!(retries("scoring").await, 1);

    // (c) The budget: against an upstream that always fails, retries add at most 20% of
    // the requests plus 10 per second of the budget's life.
    let exhausted_before = counter(
        &frontend,
        "trellis_retry_budget_exhausted_total",
        "user-profile",
    )
    .await;
    let before = users.requests();
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let h2 = h2.clone();
        let u = url("/status/503");
        tasks.push(tokio::spawn(async move {
            for _ in 0..50 {
                let (status, _, _) = h2.request("GET", &u, b"").await;
                assert_eq!(status, 503);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let seen = users.requests() - before;
    let budget_age = applied.elapsed().as_secs() + 1;
    // Requests of the checks above deposited too (each reached the origin at least once).
    let earlier = before + 10;
    let limit = 500 + (500 + earlier) / 5 + 10 * budget_age.min(10) + 5;
    eprintln!("budget: the upstream saw {seen} requests for 500 (limit {limit})");
    assert!(
        seen <= limit,
        "upstream saw {seen} requests for 500 (limit {limit})"
    );
    assert!(seen > 500, "some requests were retried: {seen}");
    let exhausted = counter(
        &frontend,
        "trellis_retry_budget_exhausted_total",
        "user-profile",
    )
    .await;
    assert!(exhausted > exhausted_before, "the budget ran out");
}

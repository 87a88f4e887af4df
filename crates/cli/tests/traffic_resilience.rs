//! Circuit breaking and outlier detection from Istio DestinationRule `connectionPool` and
//! `outlierDetection`, end to end: an endpoint that keeps answering 503 is ejected (its
//! traffic goes to the healthy one) and comes back after the ejection time; requests over
//! `http2MaxRequests`, or over `maxConnections` with a full `http1MaxPendingRequests` queue,
//! get a 503 `overflow-<kind>` at once; both are counted in the proxy's metrics. Through a
//! standalone proxy with static upstreams and a resources file.

mod common;

use common::*;
use futures_util::future::join_all;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use trellis_testkit::origin::http::HttpOrigin;
use trellis_testkit::proxy::TempDir;

/// A proxy in namespace edtech with an outbound listener, the given `upstreams` YAML
/// entries and `rules` as its resources file: (proxy, outbound address).
async fn frontend(dir: &TempDir, upstreams: &str, rules: &str) -> (Trellis, SocketAddr) {
    let file = dir.path().join("rules.yaml");
    std::fs::write(&file, rules).unwrap();
    let (admin, outbound) = (free_addr(), free_addr());
    let yaml = format!(
        "service: frontend\nnamespace: edtech\nadmin: {admin}\n\
         outbound:\n  listen: {outbound}\n\
         upstreams:\n{upstreams}\
         resources: [{}]\n",
        file.display()
    );
    (proxy(&yaml, admin, &[]).await, outbound)
}

fn header(h: &http::HeaderMap, name: &str) -> String {
    h.get(name)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

/// GET `path` of `host`: (status, x-origin, x-trellis-error).
async fn get(h2: &H2, host: &str, path: &str) -> (u16, String, String) {
    let req = http::Request::get(format!("http://{host}{path}"))
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let (status, headers, _) = h2.send(req).await;
    (
        status,
        header(&headers, "x-origin"),
        header(&headers, "x-trellis-error"),
    )
}

/// The value of the metric series whose line starts with `series` (0 when absent).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

const OUTLIER_RULES: &str = "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: user-profile, namespace: edtech }
spec:
  host: user-profile
  trafficPolicy:
    loadBalancer: { simple: ROUND_ROBIN }
    outlierDetection:
      consecutive5xxErrors: 3
      interval: 1s
      baseEjectionTime: 2s
      maxEjectionPercent: 50
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_endpoint_is_ejected_then_comes_back() {
    let good = HttpOrigin::start_with_name("good").await.unwrap();
    let bad = HttpOrigin::start_failing("bad", 503).await.unwrap();
    let dir = TempDir::new("outlier");
    let upstreams = format!(
        "  - service: user-profile\n    endpoints: [{}, {}]\n",
        good.addr(),
        bad.addr()
    );
    let (proxy, outbound) = frontend(&dir, &upstreams, OUTLIER_RULES).await;
    let h2 = H2::connect(outbound).await;
    let host = "user-profile.edtech";

    // Round robin: the bad endpoint answers every other request, 503 three times in a row.
    let mut bad_answers = 0;
    for _ in 0..6 {
        let (status, origin, _) = get(&h2, host, "/echo").await;
        if origin == "bad" {
            assert_eq!(status, 503);
            bad_answers += 1;
        }
    }
    assert_eq!(bad_answers, 3, "round robin alternates");
    let ejected_at = Instant::now();
    let text = proxy.metrics().await;
    let series = "trellis_outlier_ejections_total{destination_service=\"user-profile\",destination_namespace=\"edtech\"}";
    assert!(metric(&text, series) >= 1.0, "{text}");

    // Ejected: every request succeeds, on the good endpoint.
    let bad_before = bad.requests();
    for i in 0..20 {
        let (status, origin, _) = get(&h2, host, "/echo").await;
        assert_eq!((status, origin.as_str()), (200, "good"), "request {i}");
    }
    assert_eq!(
        bad.requests(),
        bad_before,
        "no traffic to the ejected endpoint"
    );
    assert!(
        ejected_at.elapsed() < Duration::from_secs(2),
        "test too slow"
    );

    // After the base ejection time it gets traffic again (and fails again).
    tokio::time::sleep(
        Duration::from_secs(2).saturating_sub(ejected_at.elapsed()) + Duration::from_millis(200),
    )
    .await;
    let mut back = 0;
    for _ in 0..10 {
        if get(&h2, host, "/echo").await.1 == "bad" {
            back += 1;
        }
    }
    assert!(back >= 1, "the endpoint is back after its ejection time");
    assert!(bad.requests() > bad_before);
}

const LATENCY_RULES: &str = "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: user-profile
  namespace: edtech
  annotations: { trellis.dev/latency-outlier-ratio: \"3\" }
spec:
  host: user-profile
  trafficPolicy:
    loadBalancer: { simple: ROUND_ROBIN }
    outlierDetection: { interval: 1s, baseEjectionTime: 3s, maxEjectionPercent: 50 }
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_endpoint_is_ejected_as_a_latency_outlier_then_comes_back() {
    let fast_a = HttpOrigin::start_with_name("fast-a").await.unwrap();
    let fast_b = HttpOrigin::start_with_name("fast-b").await.unwrap();
    let slow = HttpOrigin::start_with_delay("slow", Duration::from_millis(60))
        .await
        .unwrap();
    let dir = TempDir::new("latency-outlier");
    let upstreams = format!(
        "  - service: user-profile\n    endpoints: [{}, {}, {}]\n",
        fast_a.addr(),
        fast_b.addr(),
        slow.addr()
    );
    let (proxy, outbound) = frontend(&dir, &upstreams, LATENCY_RULES).await;
    let h2 = H2::connect(outbound).await;
    let host = "user-profile.edtech";
    let series = "trellis_outlier_ejections_total{destination_service=\"user-profile\",destination_namespace=\"edtech\"}";

    // Every answer is a 200: only its p99 (60 ms against well under 20 ms) marks the slow one.
    let ejected_at = eventually(Duration::from_secs(10), "latency ejection", || async {
        let sent: Vec<_> = (0..15)
            .map(|_| {
                let h2 = h2.clone();
                tokio::spawn(async move { get(&h2, host, "/echo").await })
            })
            .collect();
        for s in sent {
            assert_eq!(s.await.unwrap().0, 200);
        }
        let text = proxy.metrics().await;
        (metric(&text, series) >= 1.0).then(Instant::now)
    })
    .await;

    // Ejected: the slow endpoint gets nothing while the fast ones answer.
    let slow_before = slow.requests();
    for i in 0..30 {
        let (status, origin, _) = get(&h2, host, "/echo").await;
        assert_eq!(status, 200, "request {i}");
        assert_ne!(origin, "slow", "request {i}");
    }
    assert_eq!(slow.requests(), slow_before);
    let (_, config) = proxy.admin_get("/config").await;
    assert!(config.contains("\"ejected\": true"), "{config}");

    // Back after its ejection time (3 s).
    tokio::time::sleep(
        Duration::from_secs(3).saturating_sub(ejected_at.elapsed()) + Duration::from_millis(300),
    )
    .await;
    for _ in 0..6 {
        get(&h2, host, "/echo").await;
    }
    assert!(
        slow.requests() > slow_before,
        "the endpoint is back after its ejection time"
    );
}

const LIMIT_RULES: &str = "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: user-profile, namespace: edtech }
spec:
  host: user-profile
  trafficPolicy:
    connectionPool:
      http: { http2MaxRequests: 1 }
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: grades, namespace: edtech }
spec:
  host: grades
  trafficPolicy:
    connectionPool:
      tcp: { maxConnections: 1, connectTimeout: 5s }
      http: { http1MaxPendingRequests: 1 }
";

/// Starts a slow request to `host` (1 s), returns its task once it is in flight.
async fn in_flight(h2: &H2, host: &'static str) -> tokio::task::JoinHandle<(u16, String, String)> {
    let h2c = h2.clone();
    let task = tokio::spawn(async move { get(&h2c, host, "/slow/1000").await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    task
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_over_the_connection_pool_limits_overflow_at_once() {
    let slow = HttpOrigin::start_with_name("slow").await.unwrap();
    let dir = TempDir::new("overflow");
    let upstreams = format!(
        "  - service: user-profile\n    endpoints: [{0}]\n  - service: grades\n    endpoints: [{0}]\n",
        slow.addr()
    );
    let (proxy, outbound) = frontend(&dir, &upstreams, LIMIT_RULES).await;
    let h2 = H2::connect(outbound).await;

    // http2MaxRequests 1: while one request is in flight, the others are refused at once.
    let first = in_flight(&h2, "user-profile.edtech").await;
    let refused = join_all((0..3).map(|_| async {
        let t = Instant::now();
        let r = get(&h2, "user-profile.edtech", "/slow/1000").await;
        (r, t.elapsed())
    }))
    .await;
    for ((status, _, error), took) in &refused {
        assert_eq!((*status, error.as_str()), (503, "overflow-requests"));
        assert!(*took < Duration::from_millis(100), "refused after {took:?}");
    }
    assert_eq!(
        first.await.unwrap().0,
        200,
        "the admitted request completes"
    );
    // The slot is freed when the response has ended (a moment after the client saw it).
    let mut status = 0;
    for _ in 0..50 {
        status = get(&h2, "user-profile.edtech", "/echo").await.0;
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(status, 200, "the slot is freed");

    // maxConnections 1 + http1MaxPendingRequests 1: one in flight, one waits for the
    // connection, the third is refused at once; the waiting one completes after the first.
    let first = in_flight(&h2, "grades.edtech").await;
    let waiting = in_flight(&h2, "grades.edtech").await;
    let t = Instant::now();
    let (status, _, error) = get(&h2, "grades.edtech", "/slow/1000").await;
    assert_eq!((status, error.as_str()), (503, "overflow-pending"));
    assert!(
        t.elapsed() < Duration::from_millis(100),
        "refused after {:?}",
        t.elapsed()
    );
    assert_eq!(first.await.unwrap().0, 200);
    assert_eq!(
        waiting.await.unwrap().0,
        200,
        "the queued request got the connection"
    );

    let text = proxy.metrics().await;
    let requests = metric(&text, "trellis_overflow_total{kind=\"requests\"}");
    assert!(requests >= 3.0, "{text}");
    assert_eq!(
        metric(&text, "trellis_overflow_total{kind=\"pending\"}"),
        1.0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unenforced_connection_pool_fields_are_refused_by_name() {
    let origin = HttpOrigin::start().await.unwrap();
    let dir = TempDir::new("refused");
    let file = dir.path().join("rules.yaml");
    std::fs::write(
        &file,
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\n\
         metadata: { name: user-profile, namespace: edtech }\n\
         spec:\n  host: user-profile\n  trafficPolicy:\n    connectionPool: { http: { maxRetries: 3 } }\n",
    )
    .unwrap();
    let admin = free_addr();
    let yaml = format!(
        "service: frontend\nnamespace: edtech\nadmin: {admin}\n\
         upstreams:\n  - service: user-profile\n    endpoints: [{}]\nresources: [{}]\n",
        origin.addr(),
        file.display()
    );
    let config = dir.path().join("proxy.yaml");
    std::fs::write(&config, yaml).unwrap();
    let (code, _, err) =
        trellis_testkit::proxy::run(BIN, &["proxy", "--config", config.to_str().unwrap()]);
    assert_ne!(code, Some(0), "{err}");
    assert!(
        err.contains("connectionPool.http.maxRetries: not enforced by this proxy yet"),
        "{err}"
    );
}

const TIMEOUT_RULES: &str = "\
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: user-profile, namespace: edtech }
spec:
  hosts: [user-profile]
  http:
  - timeout: 300ms
    route: [{ destination: { host: user-profile } }]
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_route_timeout_bounds_the_wait_for_headers_not_a_streaming_body() {
    let origin = HttpOrigin::start_with_name("origin").await.unwrap();
    let dir = TempDir::new("stream-timeout");
    let upstreams = format!(
        "  - service: user-profile\n    endpoints: [{}]\n",
        origin.addr()
    );
    let (_proxy, outbound) = frontend(&dir, &upstreams, TIMEOUT_RULES).await;
    let h2 = H2::connect(outbound).await;

    // No headers within 300 ms: 504, within 50 ms of the timeout.
    let start = Instant::now();
    let (status, _, error) = get(&h2, "user-profile.edtech", "/slow/2000").await;
    let took = start.elapsed();
    assert_eq!((status, error.as_str()), (504, "upstream-timeout"));
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(350),
        "{took:?}"
    );

    // Headers at once, then a line every 100 ms for 800 ms: the whole stream arrives.
    let start = Instant::now();
    let req = http::Request::get("http://user-profile.edtech/drip/8/100")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let (status, _, body) = h2.send(req).await;
    assert_eq!(status, 200);
    assert_eq!(body, "tick\n".repeat(8));
    assert!(start.elapsed() >= Duration::from_millis(800));
}

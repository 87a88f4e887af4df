//! Gateway API HTTPRoutes attached to a Service (the GAMMA mesh profile), end to end through
//! the real binary: precedence, header canary, weighted split, rewrite, redirect, header
//! edits, request timeout, and a rule without backends.

mod common;

use common::*;
use std::time::{Duration, Instant};
use trellis_testkit::origin::http::HttpOrigin;
use trellis_testkit::proxy::TempDir;

const ROUTES: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: { name: reviews, namespace: edtech }
spec:
  parentRefs: [{ group: "", kind: Service, name: reviews, port: 9080 }]
  rules:
  - name: split
    backendRefs:
    - { name: reviews, port: 9080, weight: 90 }
    - { name: reviews-v2, port: 9080, weight: 10 }
  - name: canary
    matches: [{ headers: [{ name: X-Canary, value: "true" }] }]
    filters:
    - type: ResponseHeaderModifier
      responseHeaderModifier: { add: [{ name: x-route, value: canary }] }
    backendRefs: [{ name: reviews-v2, port: 9080 }]
  - name: legacy
    matches: [{ path: { type: PathPrefix, value: /legacy } }]
    filters:
    - type: URLRewrite
      urlRewrite: { path: { type: ReplacePrefixMatch, replacePrefixMatch: /echo } }
    - type: RequestHeaderModifier
      requestHeaderModifier: { set: [{ name: x-routed-by, value: legacy }] }
    backendRefs: [{ name: reviews, port: 9080 }]
  - name: moved
    matches: [{ path: { type: PathPrefix, value: /old } }]
    filters:
    - type: RequestRedirect
      requestRedirect: { path: { type: ReplacePrefixMatch, replacePrefixMatch: /new } }
  - name: slow
    matches: [{ path: { type: PathPrefix, value: /slow } }]
    timeouts: { request: 300ms }
    backendRefs: [{ name: reviews, port: 9080 }]
  - name: nowhere
    matches: [{ path: { type: Exact, value: /nowhere } }]
"#;

fn header(h: &http::HeaderMap, name: &str) -> String {
    h.get(name)
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_routes_route_mesh_traffic_as_the_gateway_api_says() {
    let v1 = HttpOrigin::start_with_name("v1").await.unwrap();
    let v2 = HttpOrigin::start_with_name("v2").await.unwrap();
    let dir = TempDir::new("httproute");
    let rules = dir.path().join("routes.yaml");
    std::fs::write(&rules, ROUTES).unwrap();
    let (admin, outbound) = (free_addr(), free_addr());
    let yaml = format!(
        "service: frontend\nnamespace: edtech\nadmin: {admin}\n\
         outbound: {{ listen: {outbound} }}\n\
         upstreams:\n\
         \x20 - {{ service: reviews, endpoints: [{}] }}\n\
         \x20 - {{ service: reviews-v2, endpoints: [{}] }}\n\
         resources: [{}]\n",
        v1.addr(),
        v2.addr(),
        rules.display()
    );
    let p = proxy(&yaml, admin, &[]).await;
    let h2 = H2::connect(outbound).await;
    let get = |path: &str, headers: &[(&str, &str)]| {
        let mut req = http::Request::get(format!("http://reviews.edtech:9080{path}"));
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let req = req
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let h2 = h2.clone();
        async move { h2.send(req).await }
    };

    // Header canary (header names are case-insensitive), with a response header added.
    let (status, headers, _) = get("/echo", &[("x-canary", "true")]).await;
    assert_eq!(status, 200);
    assert_eq!(header(&headers, "x-origin"), "v2");
    assert_eq!(header(&headers, "x-route"), "canary");

    // Rewrite by whole segments and a request header set on the way.
    let (status, headers, body) = get("/legacy/users?id=7", &[]).await;
    assert_eq!((status, header(&headers, "x-origin").as_str()), (200, "v1"));
    let echo = json(&body);
    assert_eq!(echo["path"], "/echo/users?id=7");
    assert_eq!(echo["headers"]["x-routed-by"], "legacy");
    // `/legacyx` is not under the `/legacy` segment: the split rule's backends answer it.
    let (_, headers, _) = get("/legacyx", &[("x-canary", "no")]).await;
    assert_ne!(header(&headers, "x-routed-by"), "legacy");

    // Redirect: 302 by default, prefix replaced, query kept.
    let (status, headers, _) = get("/old/page?x=1", &[]).await;
    assert_eq!(status, 302);
    assert_eq!(
        header(&headers, "location"),
        "http://reviews.edtech:9080/new/page?x=1"
    );

    // A rule with no backends answers 500.
    let (status, _, _) = get("/nowhere", &[]).await;
    assert_eq!(status, 500);

    // The request timeout: 504 at 300 ms.
    let start = Instant::now();
    let (status, _, _) = get("/slow/2000", &[]).await;
    let took = start.elapsed();
    assert_eq!(status, 504);
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(350),
        "{took:?}"
    );

    // The 90/10 split, over 4,000 requests: within 2 points.
    let mut to_v2 = 0;
    for _ in 0..4000 {
        let (status, headers, _) = get("/echo", &[]).await;
        assert_eq!(status, 200);
        if header(&headers, "x-origin") == "v2" {
            to_v2 += 1;
        }
    }
    let share = f64::from(to_v2) / 4000.0 * 100.0;
    assert!((8.0..=12.0).contains(&share), "{share:.1}% to v2");

    // A real client: curl through the outbound listener.
    let (code, out) = curl(&[
        "-s",
        "-x",
        &format!("http://{outbound}"),
        "-H",
        "x-canary: true",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "http://reviews.edtech:9080/echo",
    ])
    .await;
    assert_eq!((code, out.as_str()), (0, "200"));

    // The routes are visible in /config.
    // The routes are visible in /config, in precedence order: the exact path first, the
    // longest prefixes next, the header match, then the rule without matches.
    let (_, config) = p.admin_get("/config").await;
    let names = route_names(&config_host(&config, "reviews.edtech"));
    assert_eq!(
        names,
        ["nowhere", "legacy", "slow", "moved", "canary", "split"]
    );
}

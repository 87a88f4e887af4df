//! Micro-benchmarks of the per-request policy and routing work:
//!
//! - `authz/*`: [`Authz::decide`] for a workload with 50 `AuthorizationPolicy` resources
//!   (10 DENY, 40 ALLOW) and [`path::normalize`];
//! - `inbound/*`: the whole inbound policy step ([`Inbound::check_request`]: path
//!   normalization, authorization, counting) for a plain `GET /` as `wrk` sends it, with no
//!   policy and with the ten policies of the proxy bench's `trellis-authz10` row;
//! - `route/*`: [`VirtualHost::decide`] over a VirtualService with 1,000 `http` routes, and
//!   over one with a single route for comparison.
//!
//! Run with `cargo bench -p trellis-proxy --bench policy_and_routes`; results are recorded in
//! `docs/benchmarks.md`.

use criterion::{criterion_group, criterion_main, Criterion};
use http::{HeaderMap, HeaderValue};
use std::collections::BTreeMap;
use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use trellis_api::names::ServiceKey;
use trellis_api::resources::{parse, AuthorizationPolicy, Loaded, Resource};
use trellis_proxy::http::forward::ClientConn;
use trellis_proxy::policy::authz::{Authz, HttpAttrs, RequestAttrs};
use trellis_proxy::policy::inbound::Inbound;
use trellis_proxy::policy::path;
use trellis_proxy::route::compile::{compile, ClusterSpec};
use trellis_proxy::route::matcher::{MatchContext, Source};
use trellis_proxy::route::{Decision, VirtualHost};
use trellis_proxy::telemetry::metrics::Peer;
use trellis_proxy::telemetry::Metrics;
use trellis_proxy::upstream::pool::{EndpointConns, Pool, PoolConfig};
use trellis_proxy::upstream::{Balancing, Service};

const NAMESPACE: &str = "shop";
const POLICIES: usize = 50;

/// Policy `i`: DENY for every fifth (`p00`, `p05`, ..., `p45`), ALLOW otherwise.
fn policy_yaml(i: usize) -> String {
    let selector = if i.is_multiple_of(2) {
        "  selector: { matchLabels: { app: catalog } }\n"
    } else {
        ""
    };
    if i.is_multiple_of(5) {
        format!(
            "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{ name: p{i:02}, namespace: {NAMESPACE} }}
spec:
{selector}  action: DENY
  rules:
  - from: [{{ source: {{ principals: [\"cluster.local/ns/quarantine-{i}/*\", \"*/sa/legacy-{i}\"] }} }}]
  - to: [{{ operation: {{ methods: [DELETE, PATCH], paths: [\"/admin/svc-{i}/*\", \"/internal/svc-{i}/{{*}}/debug\"] }} }}]
    when: [{{ key: \"request.headers[x-debug]\", values: [\"on\", \"trace-*\"] }}]
"
        )
    } else {
        format!(
            "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{ name: p{i:02}, namespace: {NAMESPACE} }}
spec:
{selector}  action: ALLOW
  rules:
  - from: [{{ source: {{ principals: [\"cluster.local/ns/team-{i}/*\", \"*/sa/svc-{i}-client\"] }} }}]
    to:
    - operation:
        methods: [GET, HEAD, POST]
        paths: [\"/api/v1/svc-{i}/*\", \"/api/v1/svc-{i}/items/{{*}}/detail\", \"/healthz/svc-{i}\"]
    when:
    - {{ key: \"request.headers[x-tenant]\", values: [\"tenant-{i}\", \"tenant-{i}-*\"] }}
    - {{ key: \"request.headers[x-env]\", notValues: [\"staging\"] }}
"
        )
    }
}

fn policies() -> Vec<AuthorizationPolicy> {
    let text: String = (0..POLICIES)
        .map(policy_yaml)
        .collect::<Vec<_>>()
        .join("---\n");
    let (loaded, errors) = parse(Path::new("bench-policies.yaml"), &text);
    assert!(errors.is_empty(), "{errors:?}");
    let out: Vec<AuthorizationPolicy> = loaded
        .into_iter()
        .filter_map(|l| match l.resource {
            Resource::AuthorizationPolicy(p) => Some(p),
            _ => None,
        })
        .collect();
    assert_eq!(out.len(), POLICIES);
    out
}

fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert("user-agent", HeaderValue::from_static("curl/8.5.0"));
    h.insert("accept", HeaderValue::from_static("*/*"));
    for (k, v) in pairs {
        h.insert(*k, HeaderValue::from_static(v));
    }
    h
}

fn attrs<'a>(
    principal: &'a str,
    method: &'a str,
    path: &'a str,
    headers: &'a HeaderMap,
) -> RequestAttrs<'a> {
    let ip = IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3));
    RequestAttrs {
        source_principal: Some(principal),
        source_namespace: trellis_proxy::policy::authz::principal_namespace(principal),
        source_ip: ip,
        remote_ip: ip,
        destination_ip: Some(IpAddr::V4(Ipv4Addr::new(10, 1, 9, 9))),
        destination_port: 8080,
        http: Some(HttpAttrs {
            method,
            host: "catalog.shop.svc.cluster.local",
            path,
            headers,
        }),
        jwt: None,
    }
}

fn bench_authz(c: &mut Criterion) {
    let policies = policies();
    let labels = BTreeMap::from([("app".to_string(), "catalog".to_string())]);
    let authz = Authz::compile(&policies, NAMESPACE, &labels, "istio-system");

    let allow_h = headers(&[("x-tenant", "tenant-49-eu"), ("x-env", "prod")]);
    let allowed = attrs(
        "cluster.local/ns/team-49/sa/frontend",
        "GET",
        "/api/v1/svc-49/items/42/detail",
        &allow_h,
    );
    let d = authz.decide(&allowed);
    assert!(d.allowed, "{d:?}");
    assert_eq!(d.policy.as_deref(), Some("shop/p49"));

    let deny_h = headers(&[("x-debug", "trace-all"), ("x-tenant", "tenant-45")]);
    let denied = attrs(
        "cluster.local/ns/team-45/sa/ops",
        "DELETE",
        "/admin/svc-45/users",
        &deny_h,
    );
    let d = authz.decide(&denied);
    assert!(!d.allowed, "{d:?}");
    assert_eq!(d.policy.as_deref(), Some("shop/p45"));

    let none_h = headers(&[]);
    let nothing = attrs(
        "cluster.local/ns/other/sa/crawler",
        "GET",
        "/static/logo.png",
        &none_h,
    );
    let d = authz.decide(&nothing);
    assert!(!d.allowed && d.policy.is_none(), "{d:?}");

    let mut g = c.benchmark_group("authz");
    g.bench_function("decide_50_policies/allowed_by_last_allow", |b| {
        b.iter(|| authz.decide(black_box(&allowed)))
    });
    g.bench_function("decide_50_policies/denied_by_deny", |b| {
        b.iter(|| authz.decide(black_box(&denied)))
    });
    g.bench_function("decide_50_policies/no_match", |b| {
        b.iter(|| authz.decide(black_box(&nothing)))
    });
    let typical = "/api/v1/svc-49/items/42/detail?page=2&sort=asc";
    let messy = "//api/./v1//svc-49/%69tems/../items/42/%7Euser/detail/.?x=1";
    assert_eq!(
        path::normalize(messy).unwrap(),
        "/api/v1/svc-49/items/42/~user/detail/"
    );
    g.bench_function("path_normalize/typical", |b| {
        b.iter(|| path::normalize(black_box(typical)))
    });
    g.bench_function("path_normalize/messy", |b| {
        b.iter(|| path::normalize(black_box(messy)))
    });
    g.finish();
}

/// The policies of `bench/lib.sh`'s `write_trellis_authz`: nine DENY policies, each on two
/// paths or a header, and one ALLOW for GET and HEAD on every path, so that a plain `GET /`
/// evaluates all ten.
fn bench_row_policies() -> Vec<AuthorizationPolicy> {
    let mut text = String::new();
    for i in 1..=9 {
        text += &format!(
            "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{ name: deny-{i}, namespace: default }}
spec:
  action: DENY
  rules:
  - to: [{{ operation: {{ paths: [\"/admin/{i}/*\", \"/internal/{i}\"] }} }}]
  - when: [{{ key: \"request.headers[x-blocked-{i}]\", values: [\"yes\"] }}]
---
"
        );
    }
    text += "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: allow-reads, namespace: default }
spec:
  action: ALLOW
  rules:
  - to: [{ operation: { methods: [GET, HEAD], paths: [\"/*\"] } }]
";
    let (loaded, errors) = parse(Path::new("bench-row.yaml"), &text);
    assert!(errors.is_empty(), "{errors:?}");
    loaded
        .into_iter()
        .filter_map(|l| match l.resource {
            Resource::AuthorizationPolicy(p) => Some(p),
            _ => None,
        })
        .collect()
}

fn bench_inbound(c: &mut Criterion) {
    let metrics = Metrics::new();
    let client = ClientConn {
        addr: "127.0.0.1:40000".parse().unwrap(),
        source: Peer::new("unknown", "unknown"),
        tls: false,
        identity: None,
        local: Some("127.0.0.1:8080".parse().unwrap()),
        principal: Default::default(),
    };
    let request = || {
        http::Request::get("/")
            .header("host", "127.0.0.1:8080")
            .body(())
            .unwrap()
    };
    let none = Inbound::default();
    let ten = Inbound {
        authz: Authz::compile(
            &bench_row_policies(),
            "default",
            &BTreeMap::new(),
            "istio-system",
        ),
        ..Inbound::default()
    };
    let mut denied = request();
    denied
        .headers_mut()
        .insert("x-blocked-9", HeaderValue::from_static("yes"));
    assert!(ten.check_request(&mut denied, &client, &metrics).is_err());
    let mut g = c.benchmark_group("inbound");
    for (name, inbound) in [("no_policies", &none), ("ten_policies", &ten)] {
        let mut req = request();
        g.bench_function(name, |b| {
            b.iter(|| {
                let ok = inbound
                    .check_request(black_box(&mut req), &client, &metrics)
                    .is_ok();
                assert!(ok)
            })
        });
    }
    g.finish();
}

/// A VirtualService for `catalog` with `n` routes: `/svc-<i>/` prefixes, every tenth (from
/// the sixth) also requiring `x-version: v2`.
fn virtual_service(n: usize) -> Vec<Loaded> {
    let mut text = format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{ name: catalog, namespace: {NAMESPACE} }}
spec:
  hosts: [catalog]
  http:
"
    );
    for i in 1..=n {
        if i % 10 == 6 {
            text.push_str(&format!(
                "  - name: r{i}\n    match: [{{ uri: {{ prefix: /svc-{i}/ }}, headers: {{ x-version: {{ exact: v2 }} }} }}]\n    route: [{{ destination: {{ host: catalog }} }}]\n"
            ));
        } else {
            text.push_str(&format!(
                "  - name: r{i}\n    match: [{{ uri: {{ prefix: /svc-{i}/ }} }}]\n    route: [{{ destination: {{ host: catalog }} }}]\n"
            ));
        }
    }
    let (loaded, errors) = parse(Path::new("bench-vs.yaml"), &text);
    assert!(errors.is_empty(), "{errors:?}");
    assert_eq!(loaded.len(), 1);
    loaded
}

fn vhost(n: usize, pool: &Pool, metrics: &Metrics) -> Arc<VirtualHost> {
    let key = ServiceKey::new("catalog", NAMESPACE);
    let endpoints = (1..=3u8)
        .map(|i| {
            let addr = (Ipv4Addr::new(10, 0, 0, i), 8080).into();
            (pool.endpoint(addr, None), BTreeMap::new())
        })
        .collect();
    let clusters = BTreeMap::from([(
        key.clone(),
        ClusterSpec {
            endpoints,
            timeout: None,
        },
    )]);
    let resolve = |host: &str, namespace: &str| {
        (host == "catalog" && namespace == NAMESPACE).then(|| ServiceKey::new(host, namespace))
    };
    let make = |key: &ServiceKey,
                subset: Option<&str>,
                endpoints: Vec<Arc<EndpointConns>>,
                timeout: Option<Duration>,
                balancing: Balancing| {
        let peer = Peer::new(&key.name, &key.namespace);
        let mut s = Service::new(
            key.clone(),
            endpoints,
            timeout,
            metrics.http_stats("outbound", peer),
        )
        .with_balancing(balancing);
        s.subset = subset.map(Arc::from);
        Arc::new(s)
    };
    let mut vhosts = compile(&clusters, &virtual_service(n), &resolve, &make).unwrap();
    let vh = vhosts.remove(&key).unwrap();
    assert_eq!(vh.routes.len(), n);
    vh
}

fn request(path: &str, v2: bool) -> http::request::Parts {
    let mut b = http::Request::builder()
        .method("GET")
        .uri(path)
        .header("host", "catalog")
        .header("user-agent", "curl/8.5.0")
        .header("accept", "*/*");
    if v2 {
        b = b.header("x-version", "v2");
    }
    b.body(()).unwrap().into_parts().0
}

fn routed_to<'v>(d: &Decision<'v>) -> Option<&'v str> {
    match d {
        Decision::Forward { route: Some(r), .. } => Some(&r.name),
        _ => None,
    }
}

fn bench_routes(c: &mut Criterion) {
    let metrics = Arc::new(Metrics::new());
    let pool = Pool::new(PoolConfig {
        metrics: metrics.clone(),
        connect_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(60),
    });
    let big = vhost(1000, &pool, &metrics);
    let one = vhost(1, &pool, &metrics);
    let labels = BTreeMap::from([("app".to_string(), "frontend".to_string())]);

    let mut g = c.benchmark_group("route");
    let cases: [(&str, &VirtualHost, &str, bool, Option<&str>); 6] = [
        (
            "1000_routes/route_1",
            &big,
            "/svc-1/items/42",
            false,
            Some("r1"),
        ),
        (
            "1000_routes/route_500",
            &big,
            "/svc-500/items/42",
            false,
            Some("r500"),
        ),
        (
            "1000_routes/route_1000",
            &big,
            "/svc-1000/items/42",
            false,
            Some("r1000"),
        ),
        ("1000_routes/no_route", &big, "/other/items/42", true, None),
        (
            "1_route/route_1",
            &one,
            "/svc-1/items/42",
            false,
            Some("r1"),
        ),
        ("1_route/no_route", &one, "/other/items/42", true, None),
    ];
    for (name, vh, path, v2, expect) in cases {
        let head = request(path, v2);
        let cx = MatchContext {
            path,
            authority: "catalog",
            port: Some(80),
            source: Source {
                labels: &labels,
                namespace: NAMESPACE,
            },
        };
        assert_eq!(routed_to(&vh.decide(&head, &cx)), expect, "{name}");
        if expect.is_none() {
            assert!(matches!(vh.decide(&head, &cx), Decision::NoRoute), "{name}");
        }
        g.bench_function(name, |b| {
            b.iter(|| {
                let d = vh.decide(black_box(&head), black_box(&cx));
                black_box(matches!(d, Decision::NoRoute))
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_authz, bench_inbound, bench_routes);
criterion_main!(benches);

//! Load balancing from Istio DestinationRule `trafficPolicy.loadBalancer`, end to end: the
//! default peak-EWMA P2C prefers a fast endpoint, ROUND_ROBIN takes turns, a subset's policy
//! overrides the service's, consistent hashing on a header keeps users on their endpoint
//! (also when an endpoint goes), a generated affinity cookie sticks, and a bad setting is
//! NACKed by name; through real proxies registered with a control plane.

mod common;

use common::*;
use futures_util::future::join_all;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::Duration;
use trellis_testkit::origin::http::HttpOrigin;
use trellis_testkit::proxy::{Control, TempDir};

/// A proxy joined to `control` in namespace edtech in front of `app`.
struct Joined {
    proxy: Trellis,
    inbound: SocketAddr,
    outbound: SocketAddr,
}

/// Starts one proxy per `(service, app, labels)`, all at once.
async fn join(control: &Control, workloads: &[(&str, SocketAddr, &[&str])]) -> Vec<Joined> {
    let starts = workloads.iter().map(|(service, app, labels)| {
        let (admin, inbound, outbound) = (free_addr(), free_addr(), free_addr());
        let yaml = format!(
            "service: {service}\nnamespace: edtech\nadmin: {admin}\noutbound: {{ listen: {outbound} }}\n\
             inbound:\n  - listen: {inbound}\n    app: {app}\n"
        );
        let token = control.token(service, "edtech", &[]);
        let mut args = vec![
            "--control".to_string(),
            control.grpc.to_string(),
            "--token".to_string(),
            token.to_str().unwrap().to_string(),
        ];
        args.extend(labels.iter().map(|l| format!("--label={l}")));
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Joined {
                proxy: proxy(&yaml, admin, &args).await,
                inbound,
                outbound,
            }
        }
    });
    join_all(starts).await
}

/// The ready endpoints of `service` in the config `proxy` runs.
async fn endpoints(proxy: &Trellis, service: &str) -> Vec<String> {
    let (_, cfg) = proxy.admin_get("/config").await;
    let cfg: Value = serde_json::from_str(&cfg).unwrap_or_default();
    cfg["pushed"]["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["key"]["name"] == service)
        .flat_map(|s| s["endpoints"].as_array().cloned().unwrap_or_default())
        .filter(|e| e["ready"] == true)
        .filter_map(|e| e["addr"].as_str().map(str::to_string))
        .collect()
}

/// Waits until `frontend` runs a config that contains `needle` and has `n` user-profile
/// endpoints.
async fn configured(frontend: &Trellis, needle: &str, n: usize) {
    eventually(
        Duration::from_secs(5),
        &format!("{needle:?} and {n} endpoints reach the frontend"),
        || async {
            let (_, cfg) = frontend.admin_get("/config").await;
            (cfg.contains(needle) && endpoints(frontend, "user-profile").await.len() == n)
                .then_some(())
        },
    )
    .await;
}

fn origin(h: &http::HeaderMap) -> String {
    h.get("x-origin")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

/// GET `path` of user-profile with extra headers: (x-origin, headers).
async fn get(h2: &H2, path: &str, headers: &[(&str, &str)]) -> (String, http::HeaderMap) {
    let mut req = http::Request::get(format!("http://user-profile.edtech{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    let (status, headers, body) = h2.send(req).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    (origin(&headers), headers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn by_default_p2c_prefers_the_fast_endpoint() {
    let control = Control::start(BIN, &[]).await;
    let fast = HttpOrigin::start_with_name("fast").await.unwrap();
    let slow = HttpOrigin::start_with_delay("slow", Duration::from_millis(30))
        .await
        .unwrap();
    let front_app = HttpOrigin::start().await.unwrap();
    let up: &[&str] = &["app=user-profile"];
    let procs = join(
        &control,
        &[
            ("user-profile", fast.addr(), up),
            ("user-profile", slow.addr(), up),
            ("frontend", front_app.addr(), &["app=frontend"]),
        ],
    )
    .await;
    let frontend = &procs[2];
    // No DestinationRule at all: the default policy.
    configured(&frontend.proxy, "user-profile", 2).await;
    let h2 = H2::connect(frontend.outbound).await;

    // Warm-up: until both have answered, so both have a latency estimate.
    let mut seen = HashSet::new();
    for _ in 0..100 {
        seen.insert(get(&h2, "/echo", &[]).await.0);
        if seen.len() == 2 {
            break;
        }
    }
    assert_eq!(seen.len(), 2, "P2C tries every endpoint: {seen:?}");

    // 500 requests, 4 at a time: the slow endpoint costs 30 ms a request, the fast one about 1.
    let tasks = (0..4).map(|_| {
        let h2 = h2.clone();
        tokio::spawn(async move {
            let mut fast = 0u32;
            for _ in 0..125 {
                fast += u32::from(get(&h2, "/echo", &[]).await.0 == "fast");
            }
            fast
        })
    });
    let fast_count: u32 = join_all(tasks).await.into_iter().map(Result::unwrap).sum();
    assert!(
        fast_count > 400,
        "{fast_count} of 500 requests went to the fast endpoint (want > 80%)"
    );
}

const ROUND_ROBIN_RULES: &str = "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: user-profile, namespace: edtech }
spec:
  host: user-profile
  trafficPolicy:
    loadBalancer: { simple: ROUND_ROBIN }
  subsets:
  - name: sticky
    labels: { app: user-profile }
    trafficPolicy:
      loadBalancer: { consistentHash: { httpHeaderName: X-User } }
  - name: cookie
    labels: { app: user-profile }
    trafficPolicy:
      loadBalancer:
        consistentHash: { httpCookie: { name: trellis-affinity, path: /, ttl: 60s } }
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: { name: user-profile, namespace: edtech }
spec:
  hosts: [user-profile]
  http:
  - match: [{ uri: { prefix: /echo/sticky } }]
    route: [{ destination: { host: user-profile, subset: sticky } }]
  - match: [{ uri: { prefix: /echo/cookie } }]
    route: [{ destination: { host: user-profile, subset: cookie } }]
  - route: [{ destination: { host: user-profile } }]
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_subset_overrides_cookie_affinity_and_bad_settings_nacked() {
    let control = Control::start(BIN, &[]).await;
    let origins: Vec<HttpOrigin> = join_all(["a", "b", "c"].map(HttpOrigin::start_with_name))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let front_app = HttpOrigin::start().await.unwrap();
    let up: &[&str] = &["app=user-profile"];
    let mut workloads: Vec<(&str, SocketAddr, &[&str])> = origins
        .iter()
        .map(|o| ("user-profile", o.addr(), up))
        .collect();
    workloads.push(("frontend", front_app.addr(), &["app=frontend"]));
    let procs = join(&control, &workloads).await;
    let frontend = &procs[3].proxy;
    let dir = TempDir::new("balancing");
    apply(&control, &dir, "rules.yaml", ROUND_ROBIN_RULES);
    configured(frontend, "trellis-affinity", 3).await;
    let h2 = H2::connect(procs[3].outbound).await;

    // Service level ROUND_ROBIN: the three endpoints in turn, evenly.
    let mut picks = Vec::new();
    for _ in 0..300 {
        picks.push(get(&h2, "/echo", &[]).await.0);
    }
    assert_eq!(
        picks[..3].iter().collect::<HashSet<_>>().len(),
        3,
        "{picks:?}"
    );
    for (i, p) in picks.iter().enumerate().skip(3) {
        assert_eq!(p, &picks[i - 3], "request {i} broke the turn: {picks:?}");
    }

    // The `sticky` subset overrides it with consistent hashing (ring hash) on x-user.
    let mut homes = HashSet::new();
    for user in 0..30 {
        let user = format!("user-{user}");
        let (home, _) = get(&h2, "/echo/sticky", &[("x-user", &user)]).await;
        for _ in 0..4 {
            let (again, _) = get(&h2, "/echo/sticky", &[("x-user", &user)]).await;
            assert_eq!(again, home, "{user} moved");
        }
        homes.insert(home);
    }
    assert!(homes.len() >= 2, "30 users all on {homes:?}");

    // The `cookie` subset: a request without the cookie gets one (made up, hashed for its
    // pick); sending it back keeps to the same endpoint.
    let mut homes = HashSet::new();
    for _ in 0..10 {
        let (home, headers) = get(&h2, "/echo/cookie", &[]).await;
        let set = headers
            .get("set-cookie")
            .expect("an affinity cookie is set")
            .to_str()
            .unwrap();
        let (pair, attrs) = set.split_once(';').unwrap();
        assert_eq!(attrs, " Path=/; Max-Age=60; HttpOnly", "{set}");
        assert!(pair.starts_with("trellis-affinity="), "{set}");
        for _ in 0..5 {
            let cookie = format!("theme=dark; {pair}");
            let (again, headers) = get(&h2, "/echo/cookie", &[("cookie", &cookie)]).await;
            assert_eq!(again, home, "{pair} moved");
            assert!(headers.get("set-cookie").is_none());
        }
        homes.insert(home);
    }
    assert!(homes.len() >= 2, "10 cookies all on {homes:?}");

    // A setting that cannot be enforced is NACKed naming the field; the running config stays.
    apply(
        &control,
        &dir,
        "bad.yaml",
        &ROUND_ROBIN_RULES.replace("httpHeaderName: X-User", "httpHeaderName: \"X User\""),
    );
    let want = "spec.subsets[0].trafficPolicy.loadBalancer.consistentHash.httpHeaderName \"X User\" is not a valid header name";
    eventually(Duration::from_secs(3), "the frontend NACKs", || async {
        let (_, out, _) = control.cli(&["status", "-o", "json"]);
        let st: Value = serde_json::from_str(&out).ok()?;
        st["proxies"].as_array()?.iter().find(|p| {
            p["service"] == "frontend"
                && p["last_nack"]["error"].as_str().is_some_and(|e| {
                    e.contains("DestinationRule edtech/user-profile") && e.contains(want)
                })
        })?;
        Some(())
    })
    .await;
    let (a, _) = get(&h2, "/echo", &[]).await;
    let (b, _) = get(&h2, "/echo", &[]).await;
    assert_ne!(a, b, "still round robin");
}

const HASH_RULE: &str = "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: user-profile, namespace: edtech }
spec:
  host: user-profile
  trafficPolicy:
    loadBalancer: { consistentHash: { httpHeaderName: x-user, maglev: {} } }
";

/// Users in the consistent-hashing test.
const USERS: usize = 400;

/// Where each of `users` lands, 8 requests at a time.
async fn homes(h2: &H2, users: usize) -> Vec<String> {
    let tasks = (0..8).map(|t| {
        let h2 = h2.clone();
        tokio::spawn(async move {
            let mut out = Vec::new();
            for u in (t..users).step_by(8) {
                let user = format!("user-{u}");
                out.push((u, get(&h2, "/echo", &[("x-user", &user)]).await.0));
            }
            out
        })
    });
    let mut all: Vec<(usize, String)> = join_all(tasks)
        .await
        .into_iter()
        .flat_map(Result::unwrap)
        .collect();
    all.sort();
    all.into_iter().map(|(_, home)| home).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consistent_hashing_keeps_users_home_when_an_endpoint_goes() {
    let control = Control::start(BIN, &[]).await;
    // Ten endpoints, as the bar reads: one goes, over 90% of users stay home.
    let names = ["e0", "e1", "e2", "e3", "e4", "e5", "e6", "e7", "e8", "e9"];
    let origins: Vec<HttpOrigin> = join_all(names.map(HttpOrigin::start_with_name))
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let front_app = HttpOrigin::start().await.unwrap();
    let up: &[&str] = &["app=user-profile"];
    let mut workloads: Vec<(&str, SocketAddr, &[&str])> = origins
        .iter()
        .map(|o| ("user-profile", o.addr(), up))
        .collect();
    workloads.push(("frontend", front_app.addr(), &["app=frontend"]));
    let mut procs = join(&control, &workloads).await;
    let front = procs.pop().unwrap();
    let dir = TempDir::new("hashing");
    apply(&control, &dir, "rules.yaml", HASH_RULE);
    configured(&front.proxy, "maglev", 10).await;
    let h2 = H2::connect(front.outbound).await;

    let before = homes(&h2, USERS).await;
    assert_eq!(
        homes(&h2, USERS).await,
        before,
        "every user keeps its endpoint"
    );
    let mut load: HashMap<&str, usize> = names.iter().map(|n| (*n, 0)).collect();
    for h in &before {
        *load.get_mut(h.as_str()).unwrap() += 1;
    }
    assert!(load.values().all(|&n| n > 10), "uneven: {load:?}");

    // Take away the endpoint with the fewest users: its proxy dies, the registry drops it.
    let (gone, _) = load.iter().min_by_key(|(_, n)| **n).unwrap();
    let gone = gone.to_string();
    let i = names.iter().position(|n| *n == gone).unwrap();
    let victim = procs.remove(i);
    let gone_addr = victim.inbound.to_string();
    drop(victim.proxy);
    eventually(
        Duration::from_secs(5),
        "the frontend drops the endpoint",
        || async {
            let eps = endpoints(&front.proxy, "user-profile").await;
            (eps.len() == 9 && !eps.contains(&gone_addr)).then_some(())
        },
    )
    .await;

    let after = homes(&h2, USERS).await;
    let kept = before.iter().zip(&after).filter(|(b, a)| b == a).count();
    let stayers = before.iter().filter(|b| **b != gone).count();
    let stayed = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| **b != gone && b == a)
        .count();
    assert!(after.iter().all(|a| *a != gone));
    assert!(
        kept * 100 > USERS * 90,
        "{kept} of {USERS} users kept their endpoint"
    );
    assert!(
        stayed * 100 >= stayers * 97,
        "{stayed} of the {stayers} users of the remaining endpoints kept them"
    );
}

const EJECT_RULE: &str = "\
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: { name: user-profile, namespace: edtech }
spec:
  host: user-profile
  trafficPolicy:
    loadBalancer: { simple: ROUND_ROBIN }
    outlierDetection: { consecutive5xxErrors: 3, interval: 30s, baseEjectionTime: 30s, maxEjectionPercent: 50 }
    tls: { mode: ISTIO_MUTUAL }
";

/// The `ejected` flags of the frontend's user-profile endpoints, by address.
async fn ejected(frontend: &Trellis) -> HashMap<String, bool> {
    let (_, cfg) = frontend.admin_get("/config").await;
    config_host(&cfg, "user-profile.edtech")["cluster"]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["address"].as_str().unwrap().to_string(),
                e["ejected"] == true,
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ejection_survives_a_push_about_something_else() {
    let control = Control::start(BIN, &[]).await;
    let good = HttpOrigin::start_with_name("good").await.unwrap();
    let bad = HttpOrigin::start_failing("bad", 503).await.unwrap();
    let front_app = HttpOrigin::start().await.unwrap();
    let up: &[&str] = &["app=user-profile"];
    let procs = join(
        &control,
        &[
            ("user-profile", good.addr(), up),
            ("user-profile", bad.addr(), up),
            ("frontend", front_app.addr(), &["app=frontend"]),
        ],
    )
    .await;
    let front = &procs[2];
    let dir = TempDir::new("eject-push");
    apply(&control, &dir, "rules.yaml", EJECT_RULE);
    configured(&front.proxy, "RoundRobin", 2).await;
    let h2 = H2::connect(front.outbound).await;

    // Round robin: the failing endpoint answers every other request; three 503s eject it.
    for _ in 0..6 {
        let req = http::Request::get("http://user-profile.edtech/echo")
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        h2.send(req).await;
    }
    let bad_addr = procs[1].inbound.to_string();
    assert_eq!(ejected(&front.proxy).await.get(&bad_addr), Some(&true));
    let (_, cfg) = front.proxy.admin_get("/config").await;
    let version = serde_json::from_str::<Value>(&cfg).unwrap()["version"].clone();

    // A workload of another service joins: every proxy gets a new config version.
    let other_app = HttpOrigin::start().await.unwrap();
    let _other = join(&control, &[("grades", other_app.addr(), &[])]).await;
    eventually(Duration::from_secs(5), "a new config version", || async {
        let (_, cfg) = front.proxy.admin_get("/config").await;
        let v = serde_json::from_str::<Value>(&cfg).unwrap()["version"].clone();
        (v != version).then_some(())
    })
    .await;

    // The user-profile cluster did not change: still ejected, nothing reaches it.
    assert_eq!(ejected(&front.proxy).await.get(&bad_addr), Some(&true));
    let before = bad.requests();
    for _ in 0..10 {
        assert_eq!(get(&h2, "/echo", &[]).await.0, "good");
    }
    assert_eq!(bad.requests(), before);
}

//! Discovery and config push end to end: proxies register with `trellis control`, find each
//! other without static endpoints, receive the resources that concern them within a second,
//! leave the registry when they die, and keep serving (and restart) while the control plane
//! is down.

mod common;

use common::*;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};
use trellis_testkit::client::http1_get;
use trellis_testkit::origin::http::HttpOrigin;
use trellis_testkit::proxy::{Control, TempDir};

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

/// A workload behind a proxy joined to `controls`: inbound port in front of `app` (if any),
/// outbound HTTP proxy listener, no static upstreams.
struct Workload {
    proxy: Trellis,
    inbound: SocketAddr,
    outbound: SocketAddr,
}

#[allow(clippy::too_many_arguments)]
async fn workload(
    controls: &[&Control],
    token: &Path,
    service: &str,
    app: SocketAddr,
    labels: &[&str],
    state_dir: Option<&Path>,
    yaml_extra: &str,
) -> Workload {
    let (admin, inbound, outbound) = (free_addr(), free_addr(), free_addr());
    let yaml = format!(
        "service: {service}\nnamespace: edtech\nadmin: {admin}\noutbound: {{ listen: {outbound} }}\n\
         inbound:\n  - listen: {inbound}\n    app: {app}\n{yaml_extra}"
    );
    let grpc: Vec<String> = controls.iter().map(|c| c.grpc.to_string()).collect();
    let grpc = grpc.join(",");
    let mut args = vec!["--control", &grpc, "--token", token.to_str().unwrap()];
    let label_args: Vec<String> = labels.iter().map(|l| format!("--label={l}")).collect();
    args.extend(label_args.iter().map(String::as_str));
    let sd;
    if let Some(d) = state_dir {
        sd = d.to_str().unwrap().to_string();
        args.extend(["--state-dir", &sd]);
    }
    Workload {
        proxy: proxy(&yaml, admin, &args).await,
        inbound,
        outbound,
    }
}

fn status(control: &Control) -> Value {
    let (code, out, err) = control.cli(&["status", "-o", "json"]);
    assert!(code.is_some(), "{err}");
    json(&out)
}

/// The status, once exactly `n` proxies are registered and all of them are in sync.
fn all_in_sync(control: &Control, n: usize) -> Option<Value> {
    let st = status(control);
    let proxies = st["proxies"].as_array()?;
    (proxies.len() == n && proxies.iter().all(|p| p["in_sync"] == true)).then_some(st)
}

fn proxies_of(status: &Value, service: &str) -> Vec<Value> {
    status["proxies"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["service"] == service)
        .cloned()
        .collect()
}

async fn get(addr: SocketAddr, url: &str) -> u16 {
    http1_get(addr, url, &[]).await.map_or(0, |r| r.0.as_u16())
}

fn apply(control: &Control, dir: &TempDir, name: &str, yaml: &str) -> (Option<i32>, String) {
    let file = dir.path().join(name);
    std::fs::write(&file, yaml).unwrap();
    let (code, out, err) = control.cli(&["apply", "-f", file.to_str().unwrap()]);
    (code, format!("{out}{err}"))
}

const STRICT_PROFILE: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
metadata: { name: profile-strict, namespace: edtech }\n\
spec:\n  selector: { matchLabels: { app: user-profile } }\n  mtls: { mode: STRICT }\n";

#[tokio::test]
async fn proxies_discover_each_other_and_get_their_config_within_a_second() {
    let control = Control::start(BIN, &[]).await;
    let app = HttpOrigin::start().await.unwrap();
    let profile = workload(
        &[&control],
        &control.token("user-profile", "edtech", &[]),
        "user-profile",
        app.addr(),
        &["app=user-profile", "version=v1"],
        None,
        "",
    )
    .await;
    let front_app = HttpOrigin::start().await.unwrap();
    let frontend = workload(
        &[&control],
        &control.token("frontend", "edtech", &[]),
        "frontend",
        front_app.addr(),
        &["app=frontend"],
        None,
        "",
    )
    .await;

    // No static endpoints anywhere: the frontend finds user-profile through the registry and
    // calls it over mTLS (the app sees the verified caller).
    eventually(
        Duration::from_secs(5),
        "frontend reaches user-profile",
        || async {
            (get(frontend.outbound, "http://user-profile.edtech/echo").await == 200).then_some(())
        },
    )
    .await;
    let (_, _, body) = http1_get(frontend.outbound, "http://user-profile/echo", &[])
        .await
        .unwrap();
    let echo: Value = serde_json::from_slice(&body).unwrap();
    assert!(
        echo["headers"]["x-forwarded-client-cert"]
            .as_str()
            .unwrap()
            .contains("URI=spiffe://cluster.local/ns/edtech/sa/frontend"),
        "{echo}"
    );

    // Both are registered, with their labels, and in sync.
    let st = eventually(Duration::from_secs(5), "both proxies in sync", || async {
        all_in_sync(&control, 2)
    })
    .await;
    let p = &proxies_of(&st, "user-profile")[0];
    assert_eq!(p["labels"]["version"], "v1");
    assert_eq!(p["ports"][0]["port"], profile.inbound.port());
    assert_eq!(
        p["identity"],
        "spiffe://cluster.local/ns/edtech/sa/user-profile"
    );
    assert!(p["cert_not_after"].as_u64().unwrap() > 0);

    // An applied policy reaches the proxy it selects within a second, and only that proxy.
    let dir = TempDir::new("push");
    let start = Instant::now();
    let (code, out) = apply(&control, &dir, "pa.yaml", STRICT_PROFILE);
    assert_eq!(code, Some(0), "{out}");
    eventually(
        Duration::from_secs(1),
        "the policy reaches user-profile",
        || async {
            let (_, cfg) = profile.proxy.admin_get("/config").await;
            cfg.contains("profile-strict").then_some(())
        },
    )
    .await;
    let took = start.elapsed();
    let (_, cfg) = frontend.proxy.admin_get("/config").await;
    assert!(
        !cfg.contains("profile-strict"),
        "a workload policy is only sent to the workloads it selects"
    );
    eprintln!("apply -> proxy /config: {took:?}");
    // The version the proxy runs is the one the control plane reports.
    let version = json(&control.cli(&["get", "peerauthentication", "-o", "json"]).1)["version"]
        .as_u64()
        .unwrap_or(0);
    let metrics = profile.proxy.metrics().await;
    let running = sample(&metrics, "trellis_proxy_config_version", &[]).unwrap();
    assert!(running >= version as f64, "{running} < {version}");
    assert_eq!(
        sample(&metrics, "trellis_control_plane_connected", &[]),
        Some(1.0)
    );

    // A pushed policy changes what new connections get: STRICT by default, so plaintext to
    // user-profile's public port is refused; once PERMISSIVE arrives, the very next plaintext
    // connection is served.
    assert_eq!(
        get(profile.inbound, "/echo").await,
        0,
        "plaintext refused under STRICT"
    );
    let (code, out) = apply(
        &control,
        &dir,
        "pa.yaml",
        &STRICT_PROFILE.replace("STRICT", "PERMISSIVE"),
    );
    assert_eq!(code, Some(0), "{out}");
    eventually(
        Duration::from_secs(1),
        "PERMISSIVE reaches user-profile",
        || async {
            let (_, cfg) = profile.proxy.admin_get("/config").await;
            cfg.contains("PERMISSIVE").then_some(())
        },
    )
    .await;
    assert_eq!(get(profile.inbound, "/echo").await, 200);

    // An invalid file is refused whole; traffic goes on with the old config.
    let (code, out) = apply(
        &control,
        &dir,
        "bad.yaml",
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: { name: x, namespace: edtech }\nspec:\n  mtls: { mode: SOMETIMES }\n",
    );
    assert_ne!(code, Some(0), "{out}");
    assert!(out.contains("bad.yaml:5"), "{out}");
    assert_eq!(
        get(frontend.outbound, "http://user-profile/echo").await,
        200
    );

    // `trellis analyze --registered` checks cluster hosts against the registry.
    let vs = dir.path().join("vs");
    std::fs::create_dir_all(&vs).unwrap();
    std::fs::write(
        vs.join("vs.yaml"),
        [
            "apiVersion: networking.istio.io/v1",
            "kind: VirtualService",
            "metadata: { name: profile, namespace: edtech }",
            "spec:",
            "  hosts: [user-profile]",
            "  http:",
            "  - route:",
            "    - destination: { host: user-profile }",
            "      weight: 90",
            "    - destination: { host: ghost }",
            "      weight: 10",
        ]
        .join("\n"),
    )
    .unwrap();
    let vs = vs.to_str().unwrap();
    let (code, out, _) = control.cli(&["analyze", vs]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        !out.contains("unknown-host"),
        "offline, cluster names are trusted: {out}"
    );
    let (code, out, _) = control.cli(&["analyze", "--registered", vs]);
    assert_eq!(code, Some(0), "warnings only: {out}");
    assert!(
        out.contains("unknown-host")
            && out.contains("\"ghost\"")
            && !out.contains("\"user-profile\""),
        "{out}"
    );

    // `trellis status` (table) names both; `trellis check` passes.
    let (code, out, err) = control.cli(&["status"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("user-profile") && out.contains("frontend"),
        "{out}"
    );

    // With --registered, a registered proxy's `tcp` inbound port is a TCP port too: HTTP
    // attributes in a rule on it are reported (`http-on-tcp-port`).
    let ledger_app = HttpOrigin::start().await.unwrap();
    let ledger = workload(
        &[&control],
        &control.token("ledger", "edtech", &[]),
        "ledger",
        ledger_app.addr(),
        &["app=ledger"],
        None,
        "    protocol: tcp\n",
    )
    .await;
    eventually(Duration::from_secs(5), "ledger registered", || async {
        (!proxies_of(&status(&control), "ledger").is_empty()).then_some(())
    })
    .await;
    let authz = dir.path().join("authz");
    std::fs::create_dir_all(&authz).unwrap();
    std::fs::write(
        authz.join("ledger.yaml"),
        [
            "apiVersion: security.istio.io/v1",
            "kind: AuthorizationPolicy",
            "metadata: { name: ledger-readers, namespace: edtech }",
            "spec:",
            "  selector: { matchLabels: { app: ledger } }",
            "  rules:",
            &format!(
                "  - to: [{{ operation: {{ ports: [\"{}\"], methods: [GET] }} }}]",
                ledger.inbound.port()
            ),
        ]
        .join("\n"),
    )
    .unwrap();
    // A namespace-wide DENY on paths names no port: it reaches the ledger's TCP port too.
    std::fs::write(
        authz.join("no-admin.yaml"),
        [
            "apiVersion: security.istio.io/v1",
            "kind: AuthorizationPolicy",
            "metadata: { name: no-admin, namespace: edtech }",
            "spec:",
            "  action: DENY",
            "  rules:",
            "  - to: [{ operation: { paths: [\"/admin*\"] } }]",
        ]
        .join("\n"),
    )
    .unwrap();
    let authz = authz.to_str().unwrap();
    let (code, out, _) = control.cli(&["analyze", authz]);
    assert_eq!((code, out.as_str()), (Some(0), "0 errors, 0 warnings\n"));
    let (code, out, _) = control.cli(&["analyze", "--registered", authz]);
    assert_eq!(code, Some(0), "warnings only: {out}");
    assert!(
        out.contains("warning[http-on-tcp-port]")
            && out.contains("(inbound port of registered workload ledger.edtech)")
            && out.contains("never allows a connection on it"),
        "{out}"
    );
    let portless = format!(
        "AuthorizationPolicy/edtech/no-admin: spec.rules[0]: the rule names no port, so it also applies to TCP port {} (inbound port of registered workload ledger.edtech)",
        ledger.inbound.port()
    );
    assert!(
        out.contains(&portless)
            && out.contains("this DENY rule denies every connection to the port"),
        "{out}"
    );
}

#[tokio::test]
async fn a_dead_proxy_leaves_the_registry_and_unready_apps_take_no_traffic() {
    let control = Control::start(BIN, &[]).await;
    let app = HttpOrigin::start().await.unwrap();
    let token = control.token("user-profile", "edtech", &[]);
    let a = workload(
        &[&control],
        &token,
        "user-profile",
        app.addr(),
        &[],
        None,
        "",
    )
    .await;
    // A second replica of user-profile whose app reports unready (/status/503).
    let b = workload(
        &[&control],
        &token,
        "user-profile",
        app.addr(),
        &[],
        None,
        "readiness_path: /status/503\n",
    )
    .await;
    let front_app = HttpOrigin::start().await.unwrap();
    let frontend = workload(
        &[&control],
        &control.token("frontend", "edtech", &[]),
        "frontend",
        front_app.addr(),
        &[],
        None,
        "",
    )
    .await;
    let st = eventually(
        Duration::from_secs(5),
        "three proxies registered",
        || async {
            let st = status(&control);
            (proxies_of(&st, "user-profile").len() == 2
                && proxies_of(&st, "user-profile")
                    .iter()
                    .any(|p| p["ready"] == false))
            .then_some(st)
        },
    )
    .await;
    let unready: Vec<_> = proxies_of(&st, "user-profile")
        .into_iter()
        .filter(|p| p["ready"] == false)
        .collect();
    assert_eq!(unready.len(), 1, "{st}");
    assert_eq!(unready[0]["ports"][0]["port"], b.inbound.port());
    // Only the ready endpoint is pushed as ready; every request lands on it.
    eventually(
        Duration::from_secs(5),
        "frontend reaches user-profile",
        || async {
            (get(frontend.outbound, "http://user-profile/echo").await == 200).then_some(())
        },
    )
    .await;
    let (_, cfg) = frontend.proxy.admin_get("/config").await;
    let cfg = json(&cfg);
    let svc = cfg["pushed"]["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["key"]["name"] == "user-profile")
        .unwrap()
        .clone();
    let ready: Vec<bool> = svc["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["ready"].as_bool().unwrap())
        .collect();
    assert_eq!(ready.len(), 2);
    assert_eq!(ready.iter().filter(|r| **r).count(), 1);
    for _ in 0..20 {
        assert_eq!(
            get(frontend.outbound, "http://user-profile/echo").await,
            200
        );
    }

    // Kill the ready one: it leaves the registry within a few seconds, and with no ready
    // endpoint left the frontend answers 503 naming the service.
    drop(a);
    let start = Instant::now();
    eventually(
        Duration::from_secs(5),
        "the killed proxy leaves",
        || async {
            let st = status(&control);
            (proxies_of(&st, "user-profile").len() == 1).then_some(())
        },
    )
    .await;
    eprintln!(
        "registry dropped the dead proxy after {:?}",
        start.elapsed()
    );
    eventually(
        Duration::from_secs(2),
        "frontend sees no endpoint",
        || async {
            (get(frontend.outbound, "http://user-profile/echo").await == 503).then_some(())
        },
    )
    .await;
    drop(b);
}

#[tokio::test]
async fn traffic_and_restarts_survive_a_control_plane_outage() {
    let control = Control::start(BIN, &[]).await;
    let app = HttpOrigin::start().await.unwrap();
    let profile_state = TempDir::new("profile-state");
    let front_state = TempDir::new("front-state");
    let profile_token = control.token("user-profile", "edtech", &[]);
    let front_token = control.token("frontend", "edtech", &[]);
    let profile = workload(
        &[&control],
        &profile_token,
        "user-profile",
        app.addr(),
        &["app=user-profile"],
        Some(profile_state.path()),
        "",
    )
    .await;
    let front_app = HttpOrigin::start().await.unwrap();
    let frontend = workload(
        &[&control],
        &front_token,
        "frontend",
        front_app.addr(),
        &[],
        Some(front_state.path()),
        "",
    )
    .await;
    eventually(
        Duration::from_secs(5),
        "frontend reaches user-profile",
        || async {
            (get(frontend.outbound, "http://user-profile/echo").await == 200).then_some(())
        },
    )
    .await;
    eventually(Duration::from_secs(5), "both in sync", || async {
        all_in_sync(&control, 2)
    })
    .await;
    assert!(front_state.path().join("config.pb").exists());
    assert!(front_state.path().join("cert.pem").exists());

    // Control plane gone: traffic keeps flowing.
    let (grpc, api) = (control.grpc, control.api);
    let control_dir = control.kill();
    for _ in 0..10 {
        assert_eq!(
            get(frontend.outbound, "http://user-profile/echo").await,
            200
        );
    }
    eventually(
        Duration::from_secs(5),
        "the proxy notices the outage",
        || async {
            let m = frontend.proxy.metrics().await;
            (sample(&m, "trellis_control_plane_connected", &[]) == Some(0.0)).then_some(())
        },
    )
    .await;

    // The frontend restarts while the control plane is still down: it comes up from its
    // state directory (certificate and config) and reaches user-profile over mTLS.
    let (front_in, front_out) = (frontend.inbound, frontend.outbound);
    drop(frontend);
    let admin = free_addr();
    let yaml = format!(
        "service: frontend\nnamespace: edtech\nadmin: {admin}\noutbound: {{ listen: {front_out} }}\n\
         inbound:\n  - listen: {front_in}\n    app: {}\n",
        front_app.addr()
    );
    let grpc_s = grpc.to_string();
    let restarted = proxy(
        &yaml,
        admin,
        &[
            "--control",
            &grpc_s,
            "--token",
            front_token.to_str().unwrap(),
            "--state-dir",
            front_state.path().to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(get(front_out, "http://user-profile/echo").await, 200);

    let m = restarted.metrics().await;
    assert!(sample(&m, "trellis_proxy_config_version", &[]).unwrap() > 0.0);

    // The control plane comes back on its state: both proxies reconnect, register again, and
    // a change applied now reaches them.
    let control = Control::start_at(BIN, control_dir, grpc, api, &[]).await;
    eventually(
        Duration::from_secs(10),
        "both proxies back in sync",
        || async { all_in_sync(&control, 2) },
    )
    .await;
    let dir = TempDir::new("push-after");
    let (code, out) = apply(&control, &dir, "pa.yaml", STRICT_PROFILE);
    assert_eq!(code, Some(0), "{out}");
    eventually(
        Duration::from_secs(2),
        "the policy reaches user-profile",
        || async {
            let (_, cfg) = profile.proxy.admin_get("/config").await;
            cfg.contains("profile-strict").then_some(())
        },
    )
    .await;
    assert_eq!(get(front_out, "http://user-profile/echo").await, 200);
    drop(restarted);
}

#[tokio::test]
async fn service_entries_reach_outside_the_mesh_and_refused_configs_show_in_status() {
    let control = Control::start(BIN, &[]).await;
    let partner = HttpOrigin::start().await.unwrap();
    let front_app = HttpOrigin::start().await.unwrap();
    let frontend = workload(
        &[&control],
        &control.token("frontend", "edtech", &[]),
        "frontend",
        front_app.addr(),
        &[],
        None,
        "",
    )
    .await;
    let dir = TempDir::new("se");
    let entry = [
        "apiVersion: networking.istio.io/v1",
        "kind: ServiceEntry",
        "metadata: { name: partner, namespace: edtech }",
        "spec:",
        "  hosts: [api.partner.example]",
        &format!(
            "  ports: [{{ number: {}, name: http, protocol: HTTP }}]",
            partner.addr().port()
        ),
        "  resolution: STATIC",
        "  endpoints: [{ address: 127.0.0.1 }]",
    ]
    .join("\n");
    let (code, out) = apply(&control, &dir, "se.yaml", &entry);
    assert_eq!(code, Some(0), "{out}");
    eventually(
        Duration::from_secs(2),
        "the partner API is reachable by name",
        || async {
            (get(frontend.outbound, "http://api.partner.example/echo").await == 200).then_some(())
        },
    )
    .await;

    // A unix-socket endpoint is valid Istio but this proxy cannot dial it: it refuses the
    // snapshot (NACK), keeps serving with the previous one, and `trellis status` says why.
    let (code, out) = apply(
        &control,
        &dir,
        "unix.yaml",
        &[
            "apiVersion: networking.istio.io/v1",
            "kind: ServiceEntry",
            "metadata: { name: local-socket, namespace: edtech }",
            "spec:",
            "  hosts: [socket.local]",
            "  ports: [{ number: 80, name: http }]",
            "  resolution: STATIC",
            "  endpoints: [{ address: \"unix:///run/app.sock\" }]",
        ]
        .join("\n"),
    );
    assert_eq!(code, Some(0), "{out}");
    let st = eventually(Duration::from_secs(2), "the proxy NACKs", || async {
        let st = status(&control);
        let p = proxies_of(&st, "frontend").pop()?;
        (!p["last_nack"].is_null() && p["in_sync"] == false).then_some(p)
    })
    .await;
    assert!(
        st["last_nack"]["error"]
            .as_str()
            .unwrap()
            .contains("unix domain socket"),
        "{st}"
    );
    assert_eq!(
        get(frontend.outbound, "http://api.partner.example/echo").await,
        200
    );
    let (code, out, _) = control.cli(&["status"]);
    assert_eq!(
        code,
        Some(1),
        "status fails while a proxy refuses its config: {out}"
    );
    assert!(out.contains("NACK"), "{out}");
    let (code, out, _) = control.cli(&["check"]);
    assert_ne!(code, Some(0), "{out}");

    // Fixing the config brings it back in sync.
    let (code, out, err) = control.cli(&["delete", "serviceentry", "local-socket", "-n", "edtech"]);
    assert_eq!(code, Some(0), "{out}{err}");
    eventually(Duration::from_secs(2), "back in sync", || async {
        let st = status(&control);
        (proxies_of(&st, "frontend").pop()?["in_sync"] == true).then_some(())
    })
    .await;
    let (code, out, _) = control.cli(&["status"]);
    assert_eq!(code, Some(0), "{out}");
}

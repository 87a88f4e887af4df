//! Istio AuthorizationPolicy enforced by the inbound proxy, end to end with real mTLS
//! identities: the seed policy's exact decisions, and the path-bypass matrix against a DENY.

mod common;

use common::*;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;
use trellis_testkit::client::http1_get;
use trellis_testkit::origin::http::HttpOrigin;
use trellis_testkit::proxy::{Control, TempDir};

/// The issue's seed policy, unchanged (v1beta1, no namespace: `default`).
const SEED: &str = r#"apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: { name: user-data-protection }
spec:
  selector: { matchLabels: { app: user-service } }
  rules:
  - from: [{ source: { principals: ["cluster.local/ns/edtech-production/sa/frontend-service"] } }]
  - to: [{ operation: { methods: ["GET", "PUT"], paths: ["/api/v1/users/*"] } }]
  - when: [{ key: "request.headers[x-user-role]", values: ["admin", "user-owner"] }]
"#;

const DENY_ADMIN: &str = r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: { name: deny-admin, namespace: default }
spec:
  selector: { matchLabels: { app: user-service } }
  action: DENY
  rules:
  - to: [{ operation: { paths: ["/echo/admin", "/echo/admin/*"] } }]
"#;

async fn call(out: SocketAddr, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let url = format!("http://user-service.default{path}");
    match http1_get(out, &url, headers).await {
        Ok((s, _, body)) => (s.as_u16(), String::from_utf8_lossy(&body).into_owned()),
        Err(e) => (0, e.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_seed_policy_and_the_bypass_matrix_decide_as_istio_would() {
    let control = Control::start(BIN, &[]).await;
    let users = HttpOrigin::start().await.unwrap();
    let (user_service, _) = joined(
        &control,
        "user-service",
        "default",
        users.addr(),
        &["app=user-service"],
    )
    .await;
    let app = HttpOrigin::start().await.unwrap();
    let (_front, front_out) = joined(
        &control,
        "frontend-service",
        "edtech-production",
        app.addr(),
        &[],
    )
    .await;
    let (_grader, other_out) =
        joined(&control, "grader", "edtech-production", app.addr(), &[]).await;

    let dir = TempDir::new("authz");
    for (name, yaml) in [("seed.yaml", SEED), ("deny.yaml", DENY_ADMIN)] {
        let f = dir.path().join(name);
        std::fs::write(&f, yaml).unwrap();
        let (code, o, e) = control.cli(&["apply", "-f", f.to_str().unwrap()]);
        assert_eq!(code, Some(0), "{o}{e}");
    }
    eventually(
        Duration::from_secs(5),
        "policies reach user-service",
        || async {
            let (_, cfg) = user_service.admin_get("/config").await;
            (cfg.contains("user-data-protection") && cfg.contains("deny-admin")).then_some(())
        },
    )
    .await;
    eventually(
        Duration::from_secs(5),
        "both callers reach user-service",
        || async {
            (call(other_out, "/api/v1/users/7", &[]).await.0 == 404
                && call(front_out, "/anything", &[]).await.0 == 404)
                .then_some(())
        },
    )
    .await;

    // The seed policy is three separate rules: any one matching allows (Istio semantics).
    // The origin has no /api routes, so an allowed request gets the app's 404.
    assert_eq!(
        call(other_out, "/api/v1/users/7", &[]).await.0,
        404,
        "second rule allows GET"
    );
    let (status, body) = call(other_out, "/api/v1/grades", &[]).await;
    assert_eq!(status, 403, "no rule matches: {body}");
    assert!(body.contains("RBAC: access denied"), "{body}");
    assert_eq!(
        call(other_out, "/api/v1/grades", &[("x-user-role", "guest")])
            .await
            .0,
        403
    );
    assert_eq!(
        call(other_out, "/api/v1/grades", &[("x-user-role", "admin")])
            .await
            .0,
        404,
        "third rule allows any request with the role header"
    );
    assert_eq!(
        call(front_out, "/api/v1/grades", &[]).await.0,
        404,
        "the frontend's principal matches the first rule"
    );

    // Bypass matrix against the DENY on /echo/admin (from a caller the ALLOW policy admits
    // through its third rule): never served by the app's /echo/admin.
    let role = [("x-user-role", "admin")];
    assert_eq!(
        call(other_out, "/echo/ok", &role).await.0,
        200,
        "the control case"
    );
    for path in [
        "/echo/admin",
        "/echo//admin",
        "/echo/./admin",
        "/echo/x/../admin",
        "/echo/%2e%2e/echo/admin",
        "/echo/%61dmin",
        "/echo/admin?x=1",
        "/echo/admin;x",
        "/echo/admin/",
        "/echo/admin/deeper",
    ] {
        let (status, body) = call(other_out, path, &role).await;
        assert_eq!(status, 403, "{path} must be denied: {body}");
    }
    for path in ["/echo/%2Fadmin", "/echo/%5Cadmin", "/echo/%2fadmin"] {
        let (status, body) = call(other_out, path, &role).await;
        assert_eq!(status, 400, "{path} must be refused: {body}");
    }
    // Paths are case-sensitive, as in Istio: /echo/ADMIN is a different path, served as such.
    let (status, body) = call(other_out, "/echo/ADMIN", &role).await;
    assert_eq!(status, 200);
    let echo: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echo["path"], "/echo/ADMIN");
    // The app receives the normalized path.
    let (status, body) = call(other_out, "/echo/a/./b//c/../d", &role).await;
    assert_eq!(status, 200);
    let echo: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(echo["path"], "/echo/a/b/d");

    let m = user_service.metrics().await;
    let denied = sample(
        &m,
        "trellis_authz_decisions_total",
        &[("action", "deny"), ("policy", "default/deny-admin")],
    )
    .unwrap_or(0.0);
    assert!(denied >= 10.0, "{m}");
    let default_denied = sample(
        &m,
        "trellis_authz_decisions_total",
        &[("action", "deny"), ("policy", "")],
    )
    .unwrap_or(0.0);
    assert!(default_denied >= 2.0, "{m}");
}

/// Sends `msg` on a fresh connection to `addr`; returns what came back before EOF or 2 s.
async fn tcp_roundtrip(addr: SocketAddr, msg: &[u8]) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return Vec::new();
    };
    // The echo origin answers after the client half-closes.
    if s.write_all(msg).await.is_err() || s.shutdown().await.is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    match tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut buf)).await {
        Ok(Ok(_)) => buf,
        _ => Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_connections_are_denied_and_http_only_deny_rules_never_allow() {
    let control = Control::start(BIN, &[]).await;
    let echo = trellis_testkit::origin::tcp::TcpEchoOrigin::start()
        .await
        .unwrap();
    let (ea, ein) = (free_addr(), free_addr());
    let token = control.token("ledger", "default", &[]);
    let grpc = control.grpc.to_string();
    let _ledger = proxy(
        &format!(
            "service: ledger\nnamespace: default\nadmin: {ea}\noutbound: {{ listen: null }}\n\
             inbound:\n  - listen: {ein}\n    app: {}\n    protocol: tcp\n",
            echo.addr()
        ),
        ea,
        &[
            "--control",
            &grpc,
            "--token",
            token.to_str().unwrap(),
            "--label=app=ledger",
        ],
    )
    .await;
    let (ca, port) = (free_addr(), free_addr());
    let token = control.token("teller", "default", &[]);
    let teller = proxy(
        &format!(
            "service: teller\nnamespace: default\nadmin: {ca}\noutbound: {{ listen: null }}\n\
             upstreams:\n  - service: ledger\n    listen: {port}\n    protocol: tcp\n"
        ),
        ca,
        &["--control", &grpc, "--token", token.to_str().unwrap()],
    )
    .await;
    eventually(
        Duration::from_secs(5),
        "teller reaches ledger over mTLS",
        || async { (tcp_roundtrip(port, b"ping").await == b"ping").then_some(()) },
    )
    .await;

    let dir = TempDir::new("authz-tcp");
    let apply = |name: &str, yaml: &str| {
        let f = dir.path().join(name);
        std::fs::write(&f, yaml).unwrap();
        let (code, o, e) = control.cli(&["apply", "-f", f.to_str().unwrap()]);
        assert_eq!(code, Some(0), "{o}{e}");
    };
    // A DENY rule on an HTTP-only field cannot be checked on TCP: it denies the connection.
    apply(
        "deny-post.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: { name: no-posts, namespace: default }\nspec:\n  selector: { matchLabels: { app: ledger } }\n  action: DENY\n  rules:\n  - to: [{ operation: { methods: [POST] } }]\n",
    );
    eventually(
        Duration::from_secs(5),
        "the DENY closes TCP connections",
        || async { tcp_roundtrip(port, b"ping").await.is_empty().then_some(()) },
    )
    .await;
    // Replaced by an ALLOW for the teller only: allowed again.
    let (code, o, e) = control.cli(&["delete", "authorizationpolicy", "no-posts", "-n", "default"]);
    assert_eq!(code, Some(0), "{o}{e}");
    apply(
        "allow-teller.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: { name: tellers, namespace: default }\nspec:\n  selector: { matchLabels: { app: ledger } }\n  rules:\n  - from: [{ source: { principals: [\"cluster.local/ns/default/sa/teller\"] } }]\n",
    );
    eventually(Duration::from_secs(5), "the teller is allowed", || async {
        (tcp_roundtrip(port, b"pong").await == b"pong").then_some(())
    })
    .await;
    drop(teller);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_mesh_default_deny_switch_denies_what_no_allow_policy_covers() {
    let control = Control::start(BIN, &[]).await;
    let users = HttpOrigin::start().await.unwrap();
    let (user_service, _) = joined(
        &control,
        "user-service",
        "default",
        users.addr(),
        &["app=user-service"],
    )
    .await;
    let app = HttpOrigin::start().await.unwrap();
    let (_front, out) = joined(
        &control,
        "frontend-service",
        "edtech-production",
        app.addr(),
        &[],
    )
    .await;
    eventually(
        Duration::from_secs(5),
        "frontend reaches user-service",
        || async { (call(out, "/echo/x", &[]).await.0 == 200).then_some(()) },
    )
    .await;
    let dir = TempDir::new("mesh");
    let apply = |name: &str, yaml: &str| {
        let f = dir.path().join(name);
        std::fs::write(&f, yaml).unwrap();
        control.cli(&["apply", "-f", f.to_str().unwrap()])
    };
    let (code, o, e) = apply(
        "mesh.yaml",
        "apiVersion: trellis.dev/v1alpha1\nkind: Mesh\nmetadata: { name: mesh }\nspec:\n  authorization: { defaultDeny: true }\n",
    );
    assert_eq!(code, Some(0), "{o}{e}");
    eventually(Duration::from_secs(5), "default deny applies", || async {
        (call(out, "/echo/x", &[]).await.0 == 403).then_some(())
    })
    .await;
    let (code, o, e) = apply(
        "allow.yaml",
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: { name: frontend-in, namespace: default }\nspec:\n  selector: { matchLabels: { app: user-service } }\n  rules:\n  - from: [{ source: { namespaces: [edtech-production] } }]\n",
    );
    assert_eq!(code, Some(0), "{o}{e}");
    eventually(
        Duration::from_secs(5),
        "an ALLOW policy opens it",
        || async { (call(out, "/echo/x", &[]).await.0 == 200).then_some(()) },
    )
    .await;
    let m = user_service.metrics().await;
    assert!(
        sample(
            &m,
            "trellis_authz_decisions_total",
            &[("action", "deny"), ("policy", "mesh/default-deny")]
        )
        .unwrap_or(0.0)
            >= 1.0,
        "{m}"
    );
    // A Mesh setting the proxy does not enforce yet is refused (NACK), never ignored.
    let (code, o, e) = apply(
        "mesh.yaml",
        "apiVersion: trellis.dev/v1alpha1\nkind: Mesh\nmetadata: { name: mesh }\nspec:\n  authorization: { defaultDeny: true }\n  defaults: { timeout: 5s }\n",
    );
    assert_eq!(code, Some(0), "{o}{e}");
    eventually(Duration::from_secs(5), "the proxies NACK", || async {
        let (_, out, _) = control.cli(&["status", "-o", "json"]);
        out.contains("spec.defaults.timeout: not enforced")
            .then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn denied_grpc_calls_get_permission_denied() {
    use trellis_testkit::origin::grpc::{EchoClient, EchoRequest, GrpcOrigin};
    let control = Control::start(BIN, &[]).await;
    let scoring = GrpcOrigin::start().await.unwrap();
    let (scoring_proxy, _) = joined(
        &control,
        "scoring",
        "default",
        scoring.addr(),
        &["app=scoring"],
    )
    .await;
    let app = HttpOrigin::start().await.unwrap();
    let (_front, out) = joined(&control, "web", "default", app.addr(), &[]).await;
    let client = || async {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{out}"))
            .unwrap()
            .origin("http://scoring.default".parse().unwrap())
            .connect()
            .await
            .unwrap();
        EchoClient::new(channel)
    };
    eventually(Duration::from_secs(5), "web reaches scoring", || async {
        client()
            .await
            .unary(EchoRequest {
                message: "hi".into(),
            })
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    let dir = TempDir::new("authz-grpc");
    let f = dir.path().join("deny.yaml");
    std::fs::write(
        &f,
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: { name: no-web, namespace: default }\nspec:\n  selector: { matchLabels: { app: scoring } }\n  action: DENY\n  rules:\n  - from: [{ source: { principals: [\"cluster.local/ns/default/sa/web\"] } }]\n",
    )
    .unwrap();
    let (code, o, e) = control.cli(&["apply", "-f", f.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{o}{e}");
    let status = eventually(Duration::from_secs(5), "the call is denied", || async {
        client()
            .await
            .unary(EchoRequest {
                message: "hi".into(),
            })
            .await
            .err()
    })
    .await;
    assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains("RBAC"), "{status:?}");
    let m = scoring_proxy.metrics().await;
    assert!(
        sample(
            &m,
            "trellis_authz_decisions_total",
            &[("action", "deny"), ("policy", "default/no-web")]
        )
        .unwrap_or(0.0)
            >= 1.0
    );
}

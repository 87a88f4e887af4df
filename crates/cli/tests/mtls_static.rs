//! Proxy-to-proxy mTLS with static identity files: the mesh path, identity checks both ways,
//! STRICT / PERMISSIVE / DISABLE, and real `openssl s_client` probes.

mod common;

use common::*;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trellis_testkit::certs::{IdentityFiles, TestCa};
use trellis_testkit::client::{http1_get, ws_echo};
use trellis_testkit::origin::grpc::{EchoClient, EchoRequest, GrpcOrigin};
use trellis_testkit::origin::http::HttpOrigin;
use trellis_testkit::origin::tcp::TcpEchoOrigin;
use trellis_testkit::proxy::TempDir;

const PROFILE_ID: &str = "spiffe://cluster.local/ns/edtech/sa/user-profile";

/// A user-profile proxy (inbound, `mode`) in front of an HTTP app, and a frontend proxy whose
/// `user-profile` upstream expects `expected` at that inbound port.
struct Mesh {
    _dir: TempDir,
    ca: TestCa,
    frontend: Trellis,
    profile: Trellis,
    app: HttpOrigin,
    profile_in: SocketAddr,
    front_port: SocketAddr,
    front_out: SocketAddr,
}

async fn mesh(mode: &str, expected: &str) -> Mesh {
    let dir = TempDir::new("mtls");
    let ca = TestCa::new(dir.path());
    let app = HttpOrigin::start().await.unwrap();
    let (profile_admin, profile_in) = (free_addr(), free_addr());
    let profile = proxy(
        &format!(
            "service: user-profile\nnamespace: edtech\nadmin: {profile_admin}\noutbound: {{ listen: null }}\n\
             mtls: {mode}\n{}\
             inbound:\n  - listen: {profile_in}\n    app: {}\n",
            ca.workload("edtech", "user-profile").yaml(),
            app.addr()
        ),
        profile_admin,
        &["--access-log", "json"],
    )
    .await;
    let (front_admin, front_out, front_port) = (free_addr(), free_addr(), free_addr());
    let frontend = proxy(
        &format!(
            "service: frontend\nnamespace: edtech\nadmin: {front_admin}\noutbound: {{ listen: {front_out} }}\n{}\
             upstreams:\n  - service: user-profile\n    listen: {front_port}\n    endpoints: [{profile_in}]\n    identity: {expected}\n",
            ca.workload("edtech", "frontend").yaml()
        ),
        front_admin,
        &[],
    )
    .await;
    Mesh {
        _dir: dir,
        ca,
        frontend,
        profile,
        app,
        profile_in,
        front_port,
        front_out,
    }
}

#[tokio::test]
async fn requests_cross_the_mesh_over_mtls_with_the_source_identity() {
    let m = mesh("STRICT", PROFILE_ID).await;
    for _ in 0..3 {
        let (status, _, body) = http1_get(m.front_out, "http://user-profile.edtech/echo/7", &[])
            .await
            .unwrap();
        assert_eq!(status, 200, "{body:?}");
        let echo = json(&body);
        // The app gets HTTP/1.1 back although the hop between proxies is HTTP/2.
        assert_eq!(echo["version"], "HTTP/1.1");
        assert_eq!(echo["path"], "/echo/7");
        assert_eq!(echo["headers"]["host"], "user-profile.edtech");
        assert!(
            echo["headers"].get("trellis-orig-proto").is_none(),
            "{echo}"
        );
    }
    assert_eq!(m.app.requests(), 3);

    let text = m.profile.metrics().await;
    assert_eq!(
        sample(
            &text,
            "trellis_http_requests_total",
            &[
                ("direction", "inbound"),
                ("source_service", "frontend"),
                ("source_namespace", "edtech"),
                ("destination_service", "user-profile"),
                ("response_code", "200"),
                ("tls", "true"),
            ]
        ),
        Some(3.0),
        "{text}"
    );
    let text = m.frontend.metrics().await;
    assert_eq!(
        sample(
            &text,
            "trellis_http_requests_total",
            &[
                ("direction", "outbound"),
                ("destination_service", "user-profile"),
                ("tls", "true")
            ]
        ),
        Some(3.0),
        "{text}"
    );
    assert!(sample(&text, "trellis_identity_cert_expiry_timestamp_seconds", &[]).unwrap() > 1.7e9);
    // The access log names the calling workload.
    let log = m.profile.stdout();
    assert!(
        log.lines()
            .any(|l| json(l.as_bytes())["source"] == "frontend.edtech"),
        "{log}"
    );
    // /certs shows the identity.
    let (_, certs) = m.profile.admin_get("/certs").await;
    assert_eq!(json(certs.as_bytes())["identity"], PROFILE_ID);
}

#[tokio::test]
async fn websocket_grpc_and_tcp_cross_the_mesh() {
    let dir = TempDir::new("mtls-proto");
    let ca = TestCa::new(dir.path());
    let http = HttpOrigin::start().await.unwrap();
    let grpc = GrpcOrigin::start().await.unwrap();
    let tcp = TcpEchoOrigin::start().await.unwrap();
    let (admin_b, in_http, in_grpc, in_tcp) = (free_addr(), free_addr(), free_addr(), free_addr());
    let _b = proxy(
        &format!(
            "service: content-delivery\nnamespace: edtech\nadmin: {admin_b}\noutbound: {{ listen: null }}\n{}\
             inbound:\n  - listen: {in_http}\n    app: {}\n  - listen: {in_grpc}\n    app: {}\n  - listen: {in_tcp}\n    app: {}\n    protocol: tcp\n",
            ca.workload("edtech", "content-delivery").yaml(), http.addr(), grpc.addr(), tcp.addr()
        ),
        admin_b,
        &[],
    )
    .await;
    let (admin_a, p_http, p_grpc, p_tcp) = (free_addr(), free_addr(), free_addr(), free_addr());
    let id = "spiffe://cluster.local/ns/edtech/sa/content-delivery";
    let _a = proxy(
        &format!(
            "service: frontend\nnamespace: edtech\nadmin: {admin_a}\noutbound: {{ listen: null }}\n{}\
             upstreams:\n\
             \x20 - {{ service: content-web, listen: {p_http}, endpoints: [{in_http}], identity: {id} }}\n\
             \x20 - {{ service: content-grpc, listen: {p_grpc}, endpoints: [{in_grpc}], identity: {id} }}\n\
             \x20 - {{ service: content-tcp, listen: {p_tcp}, protocol: tcp, endpoints: [{in_tcp}], identity: {id} }}\n",
            ca.workload("edtech", "frontend").yaml()
        ),
        admin_a,
        &[],
    )
    .await;
    assert_eq!(
        ws_echo(&format!("ws://{p_http}/ws"), "over mtls")
            .await
            .unwrap(),
        "over mtls"
    );

    let mut client = EchoClient::connect(format!("http://{p_grpc}"))
        .await
        .unwrap();
    assert_eq!(
        client
            .unary(EchoRequest {
                message: "hi".into()
            })
            .await
            .unwrap()
            .into_inner()
            .message,
        "hi"
    );
    let err = client
        .unary(EchoRequest {
            message: "fail:nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);

    let mut s = TcpStream::connect(p_tcp).await.unwrap();
    s.write_all(b"bytes through mtls").await.unwrap();
    s.shutdown().await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, b"bytes through mtls");
}

#[tokio::test]
async fn a_server_with_the_wrong_identity_is_refused() {
    // The frontend expects exam-engine at the user-profile proxy's port.
    let m = mesh("STRICT", "spiffe://cluster.local/ns/edtech/sa/exam-engine").await;
    let (status, headers, body) = http1_get(m.front_port, "/echo", &[]).await.unwrap();
    assert_eq!(status, 503);
    assert_eq!(headers["x-trellis-error"], "tls-handshake-failed");
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains("exam-engine") && body.contains("user-profile"),
        "{body}"
    );
    assert_eq!(m.app.requests(), 0);
}

#[tokio::test]
async fn strict_refuses_plaintext_and_permissive_accepts_both() {
    let m = mesh("STRICT", PROFILE_ID).await;
    let refused = http1_get(m.profile_in, "/echo", &[]).await;
    assert!(
        refused.is_err(),
        "plaintext must be refused under STRICT: {refused:?}"
    );
    assert_eq!(m.app.requests(), 0);
    let text = m.profile.metrics().await;
    assert_eq!(
        sample(
            &text,
            "trellis_tls_handshake_failures_total",
            &[("reason", "plaintext_refused")]
        ),
        Some(1.0),
        "{text}"
    );

    let m = mesh("PERMISSIVE", PROFILE_ID).await;
    let (status, _, _) = http1_get(m.profile_in, "/echo", &[]).await.unwrap();
    assert_eq!(status, 200, "plaintext under PERMISSIVE");
    let (status, _, _) = http1_get(m.front_port, "/echo", &[]).await.unwrap();
    assert_eq!(status, 200, "mTLS under PERMISSIVE");
    let text = m.profile.metrics().await;
    assert_eq!(
        sample(
            &text,
            "trellis_http_requests_total",
            &[("tls", "true"), ("source_service", "frontend")]
        ),
        Some(1.0)
    );
    assert_eq!(
        sample(
            &text,
            "trellis_http_requests_total",
            &[("tls", "false"), ("source_service", "unknown")]
        ),
        Some(1.0)
    );
}

/// Runs `openssl s_client` against `addr`, sends an HTTP request, returns everything printed.
async fn s_client(addr: SocketAddr, extra: &[String]) -> String {
    let mut args: Vec<String> = vec![
        "s_client".into(),
        "-connect".into(),
        addr.to_string(),
        "-quiet".into(),
        "-ign_eof".into(),
    ];
    args.extend(extra.iter().cloned());
    tokio::task::spawn_blocking(move || {
        use std::io::Write;
        let mut child = std::process::Command::new("openssl")
            .args(&args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("openssl must be installed (bash .ci/run installs it)");
        let mut stdin = child.stdin.take().unwrap();
        let _ = stdin.write_all(b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
    .await
    .unwrap()
}

fn cert_args(files: &IdentityFiles) -> Vec<String> {
    vec![
        "-cert".into(),
        files.cert.display().to_string(),
        "-key".into(),
        files.key.display().to_string(),
        "-CAfile".into(),
        files.bundle.display().to_string(),
    ]
}

#[tokio::test]
async fn openssl_probes_without_or_with_bad_certificates_are_refused() {
    let m = mesh("STRICT", PROFILE_ID).await;
    // No client certificate.
    let out = s_client(m.profile_in, &[]).await;
    assert!(!out.contains("HTTP/1.1 200"), "{out}");
    // A certificate from another CA.
    let other_dir = TempDir::new("other-ca");
    let other = TestCa::new(other_dir.path());
    let out = s_client(
        m.profile_in,
        &cert_args(&other.workload("edtech", "frontend")),
    )
    .await;
    assert!(!out.contains("HTTP/1.1 200"), "{out}");
    // An expired certificate from the right CA.
    let expired =
        m.ca.workload_ttl("edtech", "expired", Duration::from_secs(1));
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let out = s_client(m.profile_in, &cert_args(&expired)).await;
    assert!(!out.contains("HTTP/1.1 200"), "{out}");
    // A good certificate works, so the refusals above were about the certificates.
    let out = s_client(
        m.profile_in,
        &cert_args(&m.ca.workload("edtech", "frontend")),
    )
    .await;
    assert!(out.contains("HTTP/1.1 200"), "{out}");
    assert_eq!(m.app.requests(), 1);

    let text = m.profile.metrics().await;
    for reason in ["no_client_certificate", "unknown_ca", "expired_certificate"] {
        assert_eq!(
            sample(
                &text,
                "trellis_tls_handshake_failures_total",
                &[("reason", reason)]
            ),
            Some(1.0),
            "{reason}: {text}"
        );
    }
}

#[tokio::test]
async fn identity_files_must_match_the_workload() {
    let dir = TempDir::new("mismatch");
    let ca = TestCa::new(dir.path());
    let admin = free_addr();
    let yaml = format!(
        "service: frontend\nnamespace: edtech\nadmin: {admin}\n{}",
        ca.workload("edtech", "someone-else").yaml()
    );
    let file = dir.path().join("p.yaml");
    std::fs::write(&file, yaml).unwrap();
    let (code, _, err) =
        trellis_testkit::proxy::run(BIN, &["proxy", "--config", file.to_str().unwrap()]);
    assert_ne!(code, Some(0));
    assert!(
        err.contains("someone-else") && err.contains("sa/frontend"),
        "{err}"
    );
}

#[tokio::test]
async fn peer_authentication_resources_set_the_mode_per_scope_and_port() {
    let dir = TempDir::new("peerauthn");
    let ca = TestCa::new(dir.path());
    let (app1, app2) = (
        HttpOrigin::start().await.unwrap(),
        HttpOrigin::start().await.unwrap(),
    );
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    // Istio YAML as users write it: mesh-wide STRICT, the namespace PERMISSIVE, and the
    // workload's second port DISABLE.
    std::fs::write(
        policies.join("mesh.yaml"),
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: istio-system\nspec:\n  mtls:\n    mode: STRICT\n",
    )
    .unwrap();
    std::fs::write(
        policies.join("edtech.yaml"),
        format!(
            "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata:\n  name: edtech\n  namespace: edtech\nspec:\n  mtls:\n    mode: PERMISSIVE\n---\n\
             apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: profile-metrics\n  namespace: edtech\nspec:\n  selector:\n    matchLabels:\n      app: user-profile\n  mtls:\n    mode: UNSET\n  portLevelMtls:\n    {}:\n      mode: DISABLE\n",
            app2.addr().port()
        ),
    )
    .unwrap();
    let (admin, in1, in2) = (free_addr(), free_addr(), free_addr());
    let p = proxy(
        &format!(
            "service: user-profile\nnamespace: edtech\nlabels: {{ app: user-profile }}\nadmin: {admin}\noutbound: {{ listen: null }}\n{}\
             resources: [{}]\n\
             inbound:\n  - listen: {in1}\n    app: {}\n  - listen: {in2}\n    app: {}\n",
            ca.workload("edtech", "user-profile").yaml(),
            policies.display(),
            app1.addr(),
            app2.addr()
        ),
        admin,
        &[],
    )
    .await;
    // Port 1: PERMISSIVE (namespace policy over the mesh one): plaintext and mTLS both work.
    assert_eq!(http1_get(in1, "/echo", &[]).await.unwrap().0, 200);
    let out = s_client(in1, &cert_args(&ca.workload("edtech", "frontend"))).await;
    assert!(out.contains("HTTP/1.1 200"), "{out}");
    // Port 2: DISABLE: plaintext works, and TLS is not terminated (it reaches the app, which
    // does not speak TLS, so the handshake fails).
    assert_eq!(http1_get(in2, "/echo", &[]).await.unwrap().0, 200);
    let out = s_client(in2, &cert_args(&ca.workload("edtech", "frontend"))).await;
    assert!(!out.contains("HTTP/1.1 200"), "{out}");
    let (_, config) = p.admin_get("/config").await;
    assert_eq!(
        json(config.as_bytes())["resources"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
}

#[tokio::test]
async fn invalid_peer_authentication_is_refused_with_file_and_line() {
    let dir = TempDir::new("badpa");
    let pa = dir.path().join("pa.yaml");
    std::fs::write(&pa, "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: strict\nspec:\n  mtls:\n    mode: STRIKT\n").unwrap();
    let file = dir.path().join("p.yaml");
    std::fs::write(
        &file,
        format!("service: grades\nresources: [{}]\n", pa.display()),
    )
    .unwrap();
    let (code, _, err) =
        trellis_testkit::proxy::run(BIN, &["proxy", "--config", file.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(
            "pa.yaml:7: PeerAuthentication/strict: spec.mtls.mode: unknown variant `STRIKT`"
        ),
        "{err}"
    );
}

#[tokio::test]
async fn kinds_the_proxy_does_not_apply_are_refused_not_ignored() {
    let dir = TempDir::new("vs");
    let ap = dir.path().join("ap.yaml");
    std::fs::write(
        &ap,
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: { name: partner }\nspec:\n  hosts: [api.partner.example]\n  resolution: DNS\n",
    )
    .unwrap();
    let file = dir.path().join("p.yaml");
    std::fs::write(
        &file,
        format!("service: grades\nresources: [{}]\n", ap.display()),
    )
    .unwrap();
    let (code, _, err) =
        trellis_testkit::proxy::run(BIN, &["proxy", "--config", file.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains("ap.yaml:1: ServiceEntry/partner: kind: the proxy does not apply this kind"),
        "{err}"
    );

    // A kind it applies, with a field it does not enforce yet: refused by name at start.
    let vs = dir.path().join("vs.yaml");
    std::fs::write(
        &vs,
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: { name: reviews }\nspec:\n  hosts: [reviews]\n  tcp:\n  - match: [{ destinationSubnets: [10.0.0.0/8] }]\n    route: [{ destination: { host: reviews } }]\n",
    )
    .unwrap();
    let admin = free_addr();
    std::fs::write(
        &file,
        format!(
            "service: grades\nadmin: {admin}\noutbound: {{ listen: {} }}\nupstreams:\n  - service: reviews\n    endpoints: [127.0.0.1:9]\nresources: [{}]\n",
            free_addr(),
            vs.display()
        ),
    )
    .unwrap();
    let (code, _, err) =
        trellis_testkit::proxy::run(BIN, &["proxy", "--config", file.to_str().unwrap()]);
    assert_ne!(code, Some(0), "{err}");
    assert!(
        err.contains("VirtualService default/reviews: spec.tcp[0].match[0].destinationSubnets: not enforced by this proxy yet"),
        "{err}"
    );
}

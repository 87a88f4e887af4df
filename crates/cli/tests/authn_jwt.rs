//! RequestAuthentication (JWT) on the inbound proxy, end to end: real tokens signed in the
//! test with a generated ES256 key, verified against the policy's inline JWKS; invalid tokens
//! are 401 whatever the authorization says, and AuthorizationPolicy `requestPrincipals`
//! requires a valid one. Remote key sets (`jwksUri`) are served by a JWKS server the test
//! controls, to check rotation, outages and https.

mod common;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use common::*;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use trellis_testkit::client::http1_get;
use trellis_testkit::origin::http::HttpOrigin;
use trellis_testkit::proxy::{Control, TempDir};

const ISSUER: &str = "https://issuer.trellis.test";

struct Signer {
    key: ring::signature::EcdsaKeyPair,
    jwks: String,
}

impl Signer {
    fn new() -> Self {
        Self::with_kid("k1")
    }

    /// A fresh P-256 key whose JWKS names it `kid`.
    fn with_kid(kid: &str) -> Self {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let rng = ring::rand::SystemRandom::new();
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            &kp.serialize_der(),
            &rng,
        )
        .unwrap();
        let point = kp.public_key_raw();
        assert_eq!(point[0], 4, "uncompressed point");
        let jwks = json!({ "keys": [{
            "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
            "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..65]),
        }]})
        .to_string();
        Self { key, jwks }
    }

    fn token(&self, header: Value, claims: Value) -> String {
        let signing_input = format!(
            "{}.{}",
            B64.encode(header.to_string()),
            B64.encode(claims.to_string())
        );
        let sig = self
            .key
            .sign(&ring::rand::SystemRandom::new(), signing_input.as_bytes())
            .unwrap();
        format!("{signing_input}.{}", B64.encode(sig.as_ref()))
    }
}

/// A token for `user-service` from [`ISSUER`], valid for ten minutes.
fn token_for(signer: &Signer, kid: &str) -> String {
    signer.token(
        json!({ "alg": "ES256", "typ": "JWT", "kid": kid }),
        json!({ "iss": ISSUER, "sub": "student-7", "aud": "user-service", "exp": now() + 600 }),
    )
}

/// A loopback HTTP server (HTTPS with a `tls` acceptor) answering every request with the
/// current `body` (a JWKS the test swaps), recording each request's target.
struct JwksServer {
    addr: SocketAddr,
    body: Arc<Mutex<String>>,
    requests: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start(body: String) -> Self {
        Self::start_with(body, None).await
    }

    async fn start_with(body: String, tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let body = Arc::new(Mutex::new(body));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (b, r) = (body.clone(), requests.clone());
        let task = tokio::spawn(async move {
            // Connections live in the set, so aborting the task closes them too.
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let (body, requests, tls) = (b.clone(), r.clone(), tls.clone());
                connections.spawn(async move {
                    let service = hyper::service::service_fn(
                        move |req: http::Request<hyper::body::Incoming>| {
                            requests.lock().unwrap().push(req.uri().to_string());
                            let text = body.lock().unwrap().clone();
                            async move {
                                Ok::<_, std::convert::Infallible>(http::Response::new(
                                    http_body_util::Full::new(bytes::Bytes::from(text)),
                                ))
                            }
                        },
                    );
                    let http1 = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let io = hyper_util::rt::TokioIo::new(stream);
                            let _ = http1.serve_connection(io, service).await;
                        }
                        Some(tls) => {
                            let Ok(stream) = tls.accept(stream).await else {
                                return;
                            };
                            let io = hyper_util::rt::TokioIo::new(stream);
                            let _ = http1.serve_connection(io, service).await;
                        }
                    }
                });
            }
        });
        Self {
            addr,
            body,
            requests,
            task,
        }
    }

    /// Stops accepting and closes every connection.
    async fn stop(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

/// Applies [`remote_jwks_policies`] through the control plane's API and waits until `proxy`
/// holds them.
async fn apply_remote_jwks_policies(control: &Control, proxy: &Trellis, jwks_uri: &str) {
    let dir = TempDir::new("jwt");
    let f = dir.path().join("policies.yaml");
    std::fs::write(&f, remote_jwks_policies(jwks_uri)).unwrap();
    let (code, o, e) = control.cli(&["apply", "-f", f.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{o}{e}");
    eventually(
        Duration::from_secs(5),
        "the policies reach the proxy",
        || async {
            let (_, cfg) = proxy.admin_get("/config").await;
            (cfg.contains("secure-needs-jwt") && cfg.contains(jwks_uri)).then_some(())
        },
    )
    .await;
}

/// A RequestAuthentication on `user-service` reading keys from `jwks_uri`, and a DENY of
/// `/echo/secure*` without a verified token (so a 200 there proves the token was verified).
fn remote_jwks_policies(jwks_uri: &str) -> String {
    [
        "apiVersion: security.istio.io/v1",
        "kind: RequestAuthentication",
        "metadata: { name: jwt, namespace: default }",
        "spec:",
        "  selector: { matchLabels: { app: user-service } }",
        "  jwtRules:",
        &format!("  - issuer: {ISSUER}"),
        "    audiences: [user-service]",
        &format!("    jwksUri: {jwks_uri}"),
        "---",
        "apiVersion: security.istio.io/v1",
        "kind: AuthorizationPolicy",
        "metadata: { name: secure-needs-jwt, namespace: default }",
        "spec:",
        "  selector: { matchLabels: { app: user-service } }",
        "  action: DENY",
        "  rules:",
        "  - from: [{ source: { notRequestPrincipals: [\"*\"] } }]",
        "    to: [{ operation: { paths: [\"/echo/secure*\"] } }]",
    ]
    .join("\n")
}

/// The refresh settings the remote-JWKS tests bootstrap `user-service` with.
const FAST_JWKS: &str = "jwks: { refresh_interval: 1s, min_refetch_interval: 1s }\n";

/// A fresh CA named `name`: its certificate (PEM) and, signed by it, a server config for
/// `localhost`.
fn ca_and_localhost_server(name: &str) -> (String, Arc<rustls::ServerConfig>) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.distinguished_name.push(DnType::CommonName, name);
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let leaf = CertificateParams::new(vec!["localhost".to_string()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![leaf.der().clone()],
            rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap(),
        )
        .unwrap();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    (ca.pem(), Arc::new(config))
}

/// A static proxy for `user-service` (labels app=user-service) in front of `app`, applying
/// the resources in `policies`, trusting only the roots in `ca_file` for https. Returns the
/// proxy and its inbound address.
async fn static_user_service(
    app: SocketAddr,
    policies: &std::path::Path,
    ca_file: &std::path::Path,
) -> (Trellis, SocketAddr) {
    let (admin, inbound, outbound) = (free_addr(), free_addr(), free_addr());
    let yaml = format!(
        "service: user-service\nlabels: {{ app: user-service }}\nadmin: {admin}\n\
         outbound: {{ listen: {outbound} }}\ninbound:\n  - listen: {inbound}\n    app: {app}\n\
         resources: [{}]\n{FAST_JWKS}",
        policies.display()
    );
    let ca = ca_file.to_str().unwrap();
    let proxy = Trellis::start_with_env(BIN, &yaml, admin, &[], &[("SSL_CERT_FILE", ca)]).await;
    (proxy, inbound)
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// GET `path` of user-service through the outbound listener `out`.
async fn call(out: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    get(out, &format!("http://user-service{path}"), token).await
}

/// GET `target` (origin or absolute form) from `addr`, with `token` as a bearer token.
async fn get(addr: SocketAddr, target: &str, token: Option<&str>) -> (u16, String) {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .as_deref()
        .map(|b| vec![("authorization", b)])
        .unwrap_or_default();
    match http1_get(addr, target, &headers).await {
        Ok((s, _, body)) => (s.as_u16(), String::from_utf8_lossy(&body).into_owned()),
        Err(e) => (0, e.to_string()),
    }
}

/// A workload joined to `control` in namespace default.
async fn joined_default(
    control: &Control,
    service: &str,
    app: SocketAddr,
    labels: &[&str],
) -> (Trellis, SocketAddr) {
    joined(control, service, "default", app, labels).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwts_are_verified_and_required_where_policies_say() {
    let signer = Signer::new();
    let control = Control::start(BIN, &[]).await;
    let users = HttpOrigin::start().await.unwrap();
    let (user_service, _) = joined_default(
        &control,
        "user-service",
        users.addr(),
        &["app=user-service"],
    )
    .await;
    let app = HttpOrigin::start().await.unwrap();
    let (_client, out) = joined_default(&control, "web", app.addr(), &[]).await;

    let policies = [
        "apiVersion: security.istio.io/v1",
        "kind: RequestAuthentication",
        "metadata: { name: jwt, namespace: default }",
        "spec:",
        "  selector: { matchLabels: { app: user-service } }",
        "  jwtRules:",
        &format!("  - issuer: {ISSUER}"),
        "    audiences: [user-service]",
        "    outputPayloadToHeader: x-jwt-payload",
        &format!("    jwks: '{}'", signer.jwks),
        "---",
        "apiVersion: security.istio.io/v1",
        "kind: AuthorizationPolicy",
        "metadata: { name: secure-needs-jwt, namespace: default }",
        "spec:",
        "  selector: { matchLabels: { app: user-service } }",
        "  action: DENY",
        "  rules:",
        "  - from: [{ source: { notRequestPrincipals: [\"*\"] } }]",
        "    to: [{ operation: { paths: [\"/echo/secure*\"] } }]",
    ]
    .join("\n");
    let dir = TempDir::new("jwt");
    let f = dir.path().join("jwt.yaml");
    std::fs::write(&f, policies).unwrap();
    let (code, o, e) = control.cli(&["apply", "-f", f.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{o}{e}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let (_, cfg) = user_service.admin_get("/config").await;
        if cfg.contains("secure-needs-jwt") && call(out, "/echo/open", None).await.0 == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "policies did not arrive");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }

    let es256 = json!({ "alg": "ES256", "typ": "JWT", "kid": "k1" });
    let good = signer.token(
        es256.clone(),
        json!({ "iss": ISSUER, "sub": "student-7", "aud": "user-service", "exp": now() + 600 }),
    );
    // A valid token: allowed, removed before the app, payload handed over.
    let (status, body) = call(out, "/echo/secure", Some(&good)).await;
    assert_eq!(status, 200, "{body}");
    let echo: Value = serde_json::from_str(&body).unwrap();
    assert!(
        echo["headers"]["authorization"].is_null(),
        "token not forwarded: {echo}"
    );
    let payload = echo["headers"]["x-jwt-payload"].as_str().unwrap();
    let claims: Value = serde_json::from_slice(&B64.decode(payload).unwrap()).unwrap();
    assert_eq!(claims["sub"], "student-7");

    // No token: fine where no policy requires one, denied where one does.
    assert_eq!(call(out, "/echo/open", None).await.0, 200);
    assert_eq!(call(out, "/echo/secure", None).await.0, 403);

    // Bad tokens are 401 everywhere.
    let expired = signer.token(
        es256.clone(),
        json!({ "iss": ISSUER, "sub": "s", "aud": "user-service", "exp": now() - 3600 }),
    );
    let not_yet = signer.token(
        es256.clone(),
        json!({ "iss": ISSUER, "sub": "s", "aud": "user-service", "exp": now() + 7200, "nbf": now() + 3600 }),
    );
    let wrong_aud = signer.token(
        es256.clone(),
        json!({ "iss": ISSUER, "sub": "s", "aud": "billing", "exp": now() + 600 }),
    );
    let wrong_iss = signer.token(
        es256.clone(),
        json!({ "iss": "https://evil.example", "sub": "s", "aud": "user-service", "exp": now() + 600 }),
    );
    let parts: Vec<&str> = good.split('.').collect();
    let none = format!(
        "{}.{}.",
        B64.encode(json!({ "alg": "none", "typ": "JWT" }).to_string()),
        parts[1]
    );
    let tampered = format!(
        "{}.{}.{}",
        parts[0],
        B64.encode(
            json!({ "iss": ISSUER, "sub": "admin", "aud": "user-service", "exp": now() + 600 })
                .to_string()
        ),
        parts[2]
    );
    // HS256 "signed" with the public JWKS as the secret (the key-confusion attack).
    let hs_input = format!(
        "{}.{}",
        B64.encode(json!({ "alg": "HS256", "typ": "JWT", "kid": "k1" }).to_string()),
        parts[1]
    );
    let mac = ring::hmac::sign(
        &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, signer.jwks.as_bytes()),
        hs_input.as_bytes(),
    );
    let hs256 = format!("{hs_input}.{}", B64.encode(mac.as_ref()));
    let unknown_kid = signer.token(
        json!({ "alg": "ES256", "typ": "JWT", "kid": "rotated-away" }),
        json!({ "iss": ISSUER, "sub": "s", "aud": "user-service", "exp": now() + 600 }),
    );
    for (name, token) in [
        ("unknown kid", unknown_kid),
        ("expired", expired),
        ("not yet valid", not_yet),
        ("wrong audience", wrong_aud),
        ("wrong issuer", wrong_iss),
        ("alg none", none),
        ("tampered", tampered),
        ("HS256 with the public key", hs256),
        ("garbage", "not.a.jwt".to_string()),
    ] {
        for path in ["/echo/open", "/echo/secure"] {
            let (status, body) = call(out, path, Some(&token)).await;
            assert_eq!(status, 401, "{name} on {path}: {body}");
            assert!(!body.contains(&token), "the token is never echoed");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_rotation_reaches_a_running_proxy() {
    let (a, b) = (Signer::with_kid("a"), Signer::with_kid("b"));
    // On loopback, a host the mesh does not know: the proxy asks its outbound listener, which
    // answers unknown-service, and then fetches from the host directly.
    let server = JwksServer::start(a.jwks.clone()).await;
    let control = Control::start(BIN, &[]).await;
    let users = HttpOrigin::start().await.unwrap();
    let (user_service, _) = joined_with(
        &control,
        "user-service",
        "default",
        users.addr(),
        &["app=user-service"],
        FAST_JWKS,
    )
    .await;
    let app = HttpOrigin::start().await.unwrap();
    let (_client, out) = joined_default(&control, "web", app.addr(), &[]).await;
    let uri = format!("http://{}/jwks.json", server.addr);
    apply_remote_jwks_policies(&control, &user_service, &uri).await;

    let (token_a, token_b) = (token_for(&a, "a"), token_for(&b, "b"));
    eventually(Duration::from_secs(10), "key A accepted", || async {
        (call(out, "/echo/secure", Some(&token_a)).await.0 == 200).then_some(())
    })
    .await;
    assert_eq!(call(out, "/echo/secure", Some(&token_b)).await.0, 401);
    assert_eq!(
        server.requests.lock().unwrap()[0],
        "/jwks.json",
        "fetched from the host itself"
    );

    // Rotate: only key B is published from now on.
    *server.body.lock().unwrap() = b.jwks.clone();
    eventually(Duration::from_secs(5), "key B in, key A out", || async {
        let b_ok = call(out, "/echo/secure", Some(&token_b)).await.0 == 200;
        let a_refused = call(out, "/echo/secure", Some(&token_a)).await.0 == 401;
        (b_ok && a_refused).then_some(())
    })
    .await;

    // The key server goes away: the keys fetched last keep working.
    server.stop().await;
    let down = Instant::now();
    while down.elapsed() < Duration::from_millis(3500) {
        let (status, body) = call(out, "/echo/secure", Some(&token_b)).await;
        assert_eq!(
            status, 200,
            "key B refused while the JWKS server is down: {body}"
        );
        assert_eq!(call(out, "/echo/secure", Some(&token_a)).await.0, 401);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        user_service.stderr().contains("JWKS fetch failed"),
        "refreshes failed meanwhile: {}",
        user_service.stderr()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_jwks_is_verified_against_the_trust_store() {
    let dir = TempDir::new("jwks-https");
    let (ca_pem, server_config) = ca_and_localhost_server("JWKS test CA");
    let (other_ca_pem, _) = ca_and_localhost_server("some other CA");
    let (ca, other_ca) = (dir.path().join("ca.pem"), dir.path().join("other-ca.pem"));
    std::fs::write(&ca, ca_pem).unwrap();
    std::fs::write(&other_ca, other_ca_pem).unwrap();
    let signer = Signer::new();
    let server = JwksServer::start_with(
        signer.jwks.clone(),
        Some(tokio_rustls::TlsAcceptor::from(server_config)),
    )
    .await;
    let uri = format!("https://localhost:{}/jwks.json", server.addr.port());
    let policies = dir.path().join("policies.yaml");
    std::fs::write(&policies, remote_jwks_policies(&uri)).unwrap();
    let app = HttpOrigin::start().await.unwrap();
    let token = token_for(&signer, "k1");

    // Trusting the server's CA: the keys load and the token is accepted.
    let (_trusting, inbound) = static_user_service(app.addr(), &policies, &ca).await;
    eventually(
        Duration::from_secs(10),
        "keys fetched over https",
        || async { (get(inbound, "/echo/secure", Some(&token)).await.0 == 200).then_some(()) },
    )
    .await;
    assert_eq!(server.requests.lock().unwrap()[0], "/jwks.json");

    // Trusting another CA only: the handshake fails, the keys never load, the token is 401.
    let (distrusting, inbound) = static_user_service(app.addr(), &policies, &other_ca).await;
    let warning = eventually(Duration::from_secs(10), "a failed https fetch", || async {
        let log = distrusting.stderr();
        log.lines()
            .find(|l| l.contains("JWKS fetch failed") && l.contains(&uri))
            .map(str::to_string)
    })
    .await;
    assert!(
        warning.contains("WARN") && warning.contains("invalid peer certificate: UnknownIssuer"),
        "{warning}"
    );
    let (status, body) = get(inbound, "/echo/secure", Some(&token)).await;
    assert_eq!(status, 401, "{body}");
}

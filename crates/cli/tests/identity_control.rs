//! Identities issued by `trellis control`: join tokens, CSRs, rotation, revocation, the CA
//! (generated, operator-supplied intermediate, rotated), `trellis certs` and `trellis check`.

mod common;

use common::*;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use trellis_testkit::client::http1_get;
use trellis_testkit::origin::http::HttpOrigin;
use trellis_testkit::proxy::{Control, TempDir};

const PROFILE_ID: &str = "spiffe://cluster.local/ns/edtech/sa/user-profile";

/// Starts a proxy that gets its identity from `control` with `token`.
async fn joined(
    control: &Control,
    token: &Path,
    yaml: &str,
    admin: SocketAddr,
    extra: &[&str],
) -> Trellis {
    let grpc = control.grpc.to_string();
    let mut args = vec![
        "--control",
        grpc.as_str(),
        "--token",
        token.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    proxy(yaml, admin, &args).await
}

struct Pair {
    frontend: Trellis,
    profile: Trellis,
    app: HttpOrigin,
    front_out: SocketAddr,
}

/// user-profile (inbound STRICT -> app) and frontend (outbound to it), both joined.
async fn pair(control: &Control, frontend_extra_yaml: &str) -> Pair {
    let app = HttpOrigin::start().await.unwrap();
    let (pa, pin) = (free_addr(), free_addr());
    let profile = joined(
        control,
        &control.token("user-profile", "edtech", &[]),
        &format!(
            "service: user-profile\nnamespace: edtech\nadmin: {pa}\noutbound: {{ listen: null }}\n\
             inbound:\n  - listen: {pin}\n    app: {}\n",
            app.addr()
        ),
        pa,
        &[],
    )
    .await;
    let (fa, fout) = (free_addr(), free_addr());
    let frontend = joined(
        control,
        &control.token("frontend", "edtech", &[]),
        &format!(
            "service: frontend\nnamespace: edtech\nadmin: {fa}\noutbound: {{ listen: {fout} }}\n{frontend_extra_yaml}\
             upstreams:\n  - service: user-profile\n    endpoints: [{pin}]\n    identity: {PROFILE_ID}\n"
        ),
        fa,
        &[],
    )
    .await;
    Pair {
        frontend,
        profile,
        app,
        front_out: fout,
    }
}

#[tokio::test]
async fn joined_proxies_talk_mtls_and_the_app_sees_the_caller() {
    let control = Control::start(BIN, &[]).await;
    let p = pair(&control, "").await;
    let (status, _, body) = http1_get(
        p.front_out,
        "http://user-profile.edtech/echo",
        &[("x-forwarded-client-cert", "URI=spiffe://evil/ns/x/sa/y")],
    )
    .await
    .unwrap();
    assert_eq!(status, 200, "{body:?}");
    let echo = json(&body);
    assert_eq!(
        echo["headers"]["x-forwarded-client-cert"],
        format!("By={PROFILE_ID};URI=spiffe://cluster.local/ns/edtech/sa/frontend"),
        "the app learns the verified caller, never a client-supplied value"
    );
    let (_, certs) = p.profile.admin_get("/certs").await;
    let certs = json(certs.as_bytes());
    assert_eq!(certs["identity"], PROFILE_ID);
    let left = certs["not_after"].as_u64().unwrap() - now();
    assert!(
        (86_000..=86_400).contains(&left),
        "24h certificates by default: {left}"
    );
    assert!(p.app.requests() == 1);

    // `trellis certs` lists both proxies with their expiry.
    let (code, out, err) = control.cli(&["certs"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains(PROFILE_ID) && out.contains("sa/frontend"),
        "{out}"
    );
    assert!(out.contains("in 23h") || out.contains("in 1d"), "{out}");
    let (code, out, _) = control.cli(&["certs", "-o", "json"]);
    assert_eq!(code, Some(0));
    assert_eq!(
        json(out.as_bytes())["workloads"].as_array().unwrap().len(),
        2
    );
    let (code, out, _) = control.cli(&["check"]);
    assert_eq!(code, Some(0), "{out}");
    drop(p.frontend);
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test]
async fn continuous_traffic_across_rotations_has_no_failures() {
    let control = Control::start(BIN, &["--workload-cert-ttl", "10s"]).await;
    // A short idle timeout makes the frontend open new mTLS connections during the run, so
    // fresh handshakes happen with rotated certificates on both sides.
    let p = pair(&control, "timeouts: { idle: 1s }\n").await;
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut round = 0u32;
    while started.elapsed() < Duration::from_secs(26) {
        let mut batch = Vec::new();
        for _ in 0..8 {
            let (ok, failed, out) = (ok.clone(), failed.clone(), p.front_out);
            batch.push(tokio::spawn(async move {
                match http1_get(out, "http://user-profile.edtech/echo", &[]).await {
                    Ok((s, _, _)) if s == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    other => {
                        eprintln!("failed: {other:?}");
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }));
        }
        for b in batch {
            b.await.unwrap();
        }
        round += 1;
        // Every few rounds, pause past the idle timeout so connections are re-established.
        let pause = if round.is_multiple_of(10) { 1300 } else { 50 };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "ok: {}",
        ok.load(Ordering::Relaxed)
    );
    assert!(ok.load(Ordering::Relaxed) > 500);
    for proxy in [&p.frontend, &p.profile] {
        let rotations = sample(
            &proxy.metrics().await,
            "trellis_identity_cert_rotations_total",
            &[],
        )
        .unwrap();
        assert!(
            rotations >= 2.0,
            "rotations {rotations}: {}",
            proxy.stderr()
        );
    }
}

#[tokio::test]
async fn revoked_expired_and_foreign_tokens_are_refused() {
    let control = Control::start(BIN, &[]).await;
    let yaml = |admin: SocketAddr| {
        format!(
            "service: grades\nnamespace: edtech\nadmin: {admin}\noutbound: {{ listen: null }}\n"
        )
    };
    let run = |token: &Path, admin: SocketAddr| {
        let dir = TempDir::new("refused");
        let file = dir.path().join("p.yaml");
        std::fs::write(&file, yaml(admin)).unwrap();
        let grpc = control.grpc.to_string();
        let out = trellis_testkit::proxy::run(
            BIN,
            &[
                "proxy",
                "--config",
                file.to_str().unwrap(),
                "--control",
                &grpc,
                "--token",
                token.to_str().unwrap(),
            ],
        );
        (out.0, out.2)
    };

    let revoked = control.token("grades", "edtech", &[]);
    let id = std::fs::read_to_string(&revoked)
        .unwrap()
        .split('.')
        .nth(1)
        .unwrap()
        .to_string();
    let (code, out, err) = control.cli(&["token", "revoke", &id]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, err) = run(&revoked, free_addr());
    assert_ne!(code, Some(0));
    assert!(err.contains("revoked"), "{err}");

    let short = control.token("grades", "edtech", &["--ttl", "1s"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (code, err) = run(&short, free_addr());
    assert_ne!(code, Some(0));
    assert!(err.contains("expired"), "{err}");

    // A token for another identity: the CSR (for grades) is refused.
    let other = control.token("exam-engine", "edtech", &[]);
    let (code, err) = run(&other, free_addr());
    assert_ne!(code, Some(0));
    assert!(
        err.contains("sa/grades") && err.contains("sa/exam-engine"),
        "{err}"
    );

    // A well-formed token the control plane never issued.
    let dir = TempDir::new("forged");
    let forged = dir.path().join("t");
    let real = std::fs::read_to_string(&other).unwrap();
    let parts: Vec<&str> = real.trim().split('.').collect();
    std::fs::write(
        &forged,
        format!("tjt1.{}.forgedsecret.{}", parts[1], parts[3]),
    )
    .unwrap();
    let (code, err) = run(&forged, free_addr());
    assert_ne!(code, Some(0));
    assert!(err.contains("not known"), "{err}");

    let (_, list, _) = control.cli(&["token", "list"]);
    assert!(
        list.contains("revoked") && list.contains("expired") && list.contains("active"),
        "{list}"
    );
}

#[tokio::test]
async fn revoking_a_token_stops_renewals_and_check_fails_on_expiry() {
    let control = Control::start(BIN, &["--workload-cert-ttl", "4s"]).await;
    let token = control.token("grades", "edtech", &[]);
    let admin = free_addr();
    let p = joined(
        &control,
        &token,
        &format!(
            "service: grades\nnamespace: edtech\nadmin: {admin}\noutbound: {{ listen: null }}\n"
        ),
        admin,
        &[],
    )
    .await;
    // Renewals happen (by certificate, no token needed)...
    trellis_testkit::wait::wait_for("a renewal", Duration::from_secs(10), || {
        let p = &p;
        async move {
            sample(
                &p.metrics().await,
                "trellis_identity_cert_rotations_total",
                &[],
            )
            .unwrap_or(0.0)
                >= 1.0
        }
    })
    .await;
    let id = std::fs::read_to_string(&token)
        .unwrap()
        .split('.')
        .nth(1)
        .unwrap()
        .to_string();
    control.cli(&["token", "revoke", &id]);
    // ...until the token is revoked: the certificate then runs out and check fails.
    trellis_testkit::wait::wait_for("trellis check fails", Duration::from_secs(15), || {
        let code = control.cli(&["check"]).0;
        async move { code == Some(1) }
    })
    .await;
    let (_, out, _) = control.cli(&["check"]);
    assert!(
        out.contains("[FAIL]") && out.contains("sa/grades") && out.contains("expired"),
        "{out}"
    );
    assert!(p.stderr().contains("revoked"), "{}", p.stderr());
}

#[tokio::test]
async fn check_warns_when_the_ca_expires_soon_and_fails_when_unreachable() {
    let control = Control::start(BIN, &["--ca-validity", "10d"]).await;
    let (code, out, _) = control.cli(&["check"]);
    assert_eq!(code, Some(0), "a warning is not a failure: {out}");
    assert!(
        out.contains("[WARN] CA certificate expires in 9d")
            || out.contains("[WARN] CA certificate expires in 10d"),
        "{out}"
    );
    let (code, out, _) = control.cli(&["check", "-o", "json"]);
    assert_eq!(code, Some(0));
    assert_eq!(json(out.as_bytes())["ok"], true);
    let api = control.api;
    drop(control);
    let out = std::process::Command::new(BIN)
        .args(["check"])
        .env("TRELLIS_API", api.to_string())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("unreachable"));
}

#[tokio::test]
async fn an_operator_supplied_intermediate_ca_issues_the_mesh_identities() {
    let dir = TempDir::new("operator-ca");
    let root = trellis_identity::CertificateAuthority::generate(
        "cluster.local",
        Duration::from_secs(86400 * 30),
    )
    .unwrap();
    let (cert, key) = root
        .issue_intermediate(Duration::from_secs(86400 * 10))
        .unwrap();
    let (c, k, b) = (
        dir.path().join("inter.pem"),
        dir.path().join("inter-key.pem"),
        dir.path().join("root.pem"),
    );
    std::fs::write(&c, cert).unwrap();
    std::fs::write(&k, key).unwrap();
    std::fs::write(&b, root.bundle_pem()).unwrap();
    let control = Control::start(
        BIN,
        &[
            "--ca-cert",
            c.to_str().unwrap(),
            "--ca-key",
            k.to_str().unwrap(),
            "--ca-bundle",
            b.to_str().unwrap(),
        ],
    )
    .await;
    let p = pair(&control, "").await;
    assert_eq!(
        http1_get(p.front_out, "http://user-profile.edtech/echo", &[])
            .await
            .unwrap()
            .0,
        200
    );
    // The store file holding the CA key is private.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(control.state_dir().join("store.json"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[tokio::test]
async fn the_root_ca_rotates_without_downtime() {
    let control = Control::start(BIN, &["--workload-cert-ttl", "3s"]).await;
    let p = pair(&control, "timeouts: { idle: 1s }\n").await;
    let failures = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (failures, stop, out) = (failures.clone(), stop.clone(), p.front_out);
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match http1_get(out, "http://user-profile.edtech/echo", &[]).await {
                    Ok((s, _, _)) if s == 200 => {}
                    other => {
                        eprintln!("failed: {other:?}");
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                }
                n += 1;
                // Pauses past the idle timeout force fresh handshakes now and then.
                tokio::time::sleep(Duration::from_millis(if n.is_multiple_of(20) {
                    1200
                } else {
                    30
                }))
                .await;
            }
            n
        })
    };
    let certs = |p: &Trellis| {
        let p = p.admin();
        async move {
            let (_, _, body) = http1_get(p, "/certs", &[]).await.unwrap();
            let v = json(&body);
            (
                v["trust_roots"].as_u64().unwrap(),
                v["issuer"].as_str().unwrap().to_string(),
            )
        }
    };
    let first_issuer = certs(&p.frontend).await.1;
    for (step, roots, new_issuer) in [
        ("prepare", 2, false),
        ("activate", 2, true),
        ("finish", 1, true),
    ] {
        let (code, out, err) = control.cli(&["ca", "rotate", "--step", step]);
        assert_eq!(code, Some(0), "{step}: {out}{err}");
        // Wait past one certificate lifetime so every proxy renewed into the new phase.
        tokio::time::sleep(Duration::from_secs(4)).await;
        for proxy in [&p.frontend, &p.profile] {
            let deadline = Instant::now() + Duration::from_secs(6);
            while {
                let (n, issuer) = certs(proxy).await;
                n != roots || (issuer != first_issuer) != new_issuer
            } {
                assert!(
                    Instant::now() < deadline,
                    "{step}: proxy did not renew into the new phase\n{}\n{}",
                    proxy.stderr(),
                    control.log()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    stop.store(true, Ordering::Relaxed);
    let requests = traffic.await.unwrap();
    assert_eq!(failures.load(Ordering::Relaxed), 0, "of {requests}");
    let (code, out, _) = control.cli(&["ca", "rotate", "--step", "activate"]);
    assert_ne!(code, Some(0), "out of order: {out}");
}

#[tokio::test]
async fn a_restarted_proxy_gets_a_fresh_certificate_with_the_same_token() {
    let control = Control::start(BIN, &[]).await;
    let token = control.token("grades", "edtech", &[]);
    let admin = free_addr();
    let yaml = format!(
        "service: grades\nnamespace: edtech\nadmin: {admin}\noutbound: {{ listen: null }}\n"
    );
    let serial = |p: &Trellis| {
        let admin = p.admin();
        async move {
            json(&http1_get(admin, "/certs", &[]).await.unwrap().2)["serial"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    let first = joined(&control, &token, &yaml, admin, &[]).await;
    let s1 = serial(&first).await;
    drop(first);
    let second = joined(&control, &token, &yaml, admin, &[]).await;
    let s2 = serial(&second).await;
    assert_ne!(s1, s2);
}

#[tokio::test]
async fn mesh_tls_is_1_2_at_least_and_1_3_by_preference() {
    let control = Control::start(BIN, &[]).await;
    let p = pair(&control, "").await;
    let inbound = json(p.profile.admin_get("/config").await.1.as_bytes())["bootstrap"]["inbound"]
        [0]["listen"]
        .as_str()
        .unwrap()
        .to_string();
    // A client certificate from the same CA, issued offline with `trellis ca issue`.
    let certs = TempDir::new("probe-certs");
    let out_dir = certs.path().to_str().unwrap().to_string();
    let state = control.state_dir().to_str().unwrap().to_string();
    let (code, out, err) = control.cli(&[
        "ca",
        "issue",
        "--state-dir",
        &state,
        "--service",
        "prober",
        "--namespace",
        "edtech",
        "--out-dir",
        &out_dir,
    ]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (cert, key) = (
        format!("{out_dir}/prober.pem"),
        format!("{out_dir}/prober-key.pem"),
    );
    let probe = |version: &'static str| {
        let (inbound, cert, key) = (inbound.clone(), cert.clone(), key.clone());
        tokio::task::spawn_blocking(move || {
            let out = std::process::Command::new("openssl")
                .args([
                    "s_client", "-connect", &inbound, version, "-brief", "-cert", &cert, "-key",
                    &key,
                ])
                .stdin(std::process::Stdio::null())
                .output()
                .expect("openssl");
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    };
    let tls11 = probe("-tls1_1").await.unwrap();
    assert!(!tls11.contains("Protocol version: TLSv1.1"), "{tls11}");
    let any = probe("-tls1_2").await.unwrap();
    assert!(any.contains("TLSv1.2"), "TLS 1.2 is accepted: {any}");
    assert!(
        any.contains("GCM") || any.contains("CHACHA20"),
        "AEAD only: {any}"
    );
    let best = probe("-verify_quiet").await.unwrap(); // no version flag: the default offer
    assert!(best.contains("TLSv1.3"), "TLS 1.3 preferred: {best}");
    drop(p.frontend);
}

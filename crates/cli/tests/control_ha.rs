//! Highly available control plane: replicas sharing a real etcd cluster (started by the test
//! on loopback ports) share the CA and tokens, see each other's registrations and writes, and
//! proxies fail over between them.

mod common;

use common::*;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use trellis_testkit::client::http1_get;
use trellis_testkit::origin::http::HttpOrigin;
use trellis_testkit::proxy::{Control, TempDir};
use trellis_testkit::EtcdCluster;

fn json(s: &str) -> Value {
    serde_json::from_str(s).unwrap_or_else(|e| panic!("not JSON ({e}): {s}"))
}

async fn get(addr: SocketAddr, url: &str) -> u16 {
    http1_get(addr, url, &[]).await.map_or(0, |r| r.0.as_u16())
}

fn pin(control: &Control) -> String {
    let (code, out, err) = control.cli(&["certs", "-o", "json"]);
    assert_eq!(code, Some(0), "{out}{err}");
    json(&out)["ca"]["pin"].as_str().unwrap().to_string()
}

fn policy(name: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\n\
         metadata: {{ name: {name}, namespace: edtech }}\nspec:\n  mtls: {{ mode: STRICT }}\n"
    )
}

fn apply(control: &Control, dir: &TempDir, name: &str) {
    let file = dir.path().join(format!("{name}.yaml"));
    std::fs::write(&file, policy(name)).unwrap();
    let (code, out, err) = control.cli(&["apply", "-f", file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_on_etcd_share_the_mesh_and_proxies_fail_over() {
    let etcd = EtcdCluster::start(3);
    let url = etcd.store_url();
    let a = Control::start(BIN, &["--store", &url]).await;
    let b = Control::start(BIN, &["--store", &url]).await;
    assert_eq!(pin(&a), pin(&b), "one CA for every replica");
    let (code, out, _) = a.cli(&["check"]);
    assert!(
        out.contains("etcd"),
        "check reports the store: {out} ({code:?})"
    );

    // A token made through A joins a proxy through B: tokens are shared.
    let app = HttpOrigin::start().await.unwrap();
    let (pa, pin_addr) = (free_addr(), free_addr());
    let profile = proxy(
        &format!(
            "service: user-profile\nnamespace: edtech\nadmin: {pa}\noutbound: {{ listen: null }}\n\
             inbound:\n  - listen: {pin_addr}\n    app: {}\n",
            app.addr()
        ),
        pa,
        &[
            "--control",
            &b.grpc.to_string(),
            "--token",
            a.token("user-profile", "edtech", &[]).to_str().unwrap(),
        ],
    )
    .await;

    // The frontend lists A first: it connects there, and finds user-profile, registered on B.
    let front_app = HttpOrigin::start().await.unwrap();
    let (fa, fin, fout) = (free_addr(), free_addr(), free_addr());
    let controls = format!("{},{}", a.grpc, b.grpc);
    let frontend = proxy(
        &format!(
            "service: frontend\nnamespace: edtech\nadmin: {fa}\noutbound: {{ listen: {fout} }}\n\
             inbound:\n  - listen: {fin}\n    app: {}\n",
            front_app.addr()
        ),
        fa,
        &[
            "--control",
            &controls,
            "--token",
            b.token("frontend", "edtech", &[]).to_str().unwrap(),
        ],
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "frontend reaches user-profile",
        || async { (get(fout, "http://user-profile.edtech/echo").await == 200).then_some(()) },
    )
    .await;
    let replica_of = |control: &Control, service: &str| -> Option<String> {
        let (_, out, _) = control.cli(&["status", "-o", "json"]);
        let st: Value = serde_json::from_str(&out).ok()?;
        st["proxies"]
            .as_array()?
            .iter()
            .find(|p| p["service"] == service && p["in_sync"] == true)
            .map(|p| p["replica"].as_str().unwrap_or("").to_string())
    };
    let on = eventually(Duration::from_secs(10), "frontend registered", || async {
        replica_of(&b, "frontend")
    })
    .await;
    assert_eq!(on, a.grpc.to_string(), "the frontend is on replica A");

    // A write through B reaches the frontend, connected to A, within a second.
    let dir = TempDir::new("ha");
    let start = Instant::now();
    apply(&b, &dir, "via-b");
    eventually(
        Duration::from_secs(1),
        "B's write reaches the frontend on A",
        || async {
            let (_, cfg) = frontend.admin_get("/config").await;
            cfg.contains("via-b").then_some(())
        },
    )
    .await;
    eprintln!("write through B -> proxy on A: {:?}", start.elapsed());

    // Kill A: the frontend fails over to B, keeps serving, and follows writes through B.
    drop(a);
    for _ in 0..5 {
        assert_eq!(get(fout, "http://user-profile/echo").await, 200);
    }
    let start = Instant::now();
    eventually(
        Duration::from_secs(10),
        "the frontend re-registers on B",
        || async { (replica_of(&b, "frontend")? == b.grpc.to_string()).then_some(()) },
    )
    .await;
    eprintln!("failover to B: {:?}", start.elapsed());
    apply(&b, &dir, "after-failover");
    eventually(
        Duration::from_secs(2),
        "a write reaches the failed-over frontend",
        || async {
            let (_, cfg) = frontend.admin_get("/config").await;
            cfg.contains("after-failover").then_some(())
        },
    )
    .await;
    // One etcd member down: the cluster keeps quorum and the control plane keeps working.
    let mut etcd = etcd;
    etcd.kill(0);
    apply(&b, &dir, "one-member-down");
    eventually(
        Duration::from_secs(5),
        "writes go on with one etcd member down",
        || async {
            let (_, cfg) = frontend.admin_get("/config").await;
            cfg.contains("one-member-down").then_some(())
        },
    )
    .await;
    drop(profile);
}

//! Starts real etcd clusters with the testkit and checks they are healthy.

use std::net::SocketAddr;
use std::time::Duration;

use trellis_testkit::client::http1_get;
use trellis_testkit::wait::wait_for;
use trellis_testkit::EtcdCluster;

const DEADLINE: Duration = Duration::from_secs(10);

async fn health(endpoint: &str) -> Option<(u16, String)> {
    let addr: SocketAddr = endpoint.parse().expect("endpoint is host:port");
    let (status, _, body) = http1_get(addr, "/health", &[]).await.ok()?;
    Some((status.as_u16(), String::from_utf8_lossy(&body).into_owned()))
}

async fn assert_healthy(endpoint: &str) {
    let (status, body) = health(endpoint)
        .await
        .unwrap_or_else(|| panic!("no answer from {endpoint}"));
    assert_eq!(status, 200, "{endpoint}: {body}");
    assert!(body.contains(r#""health":"true""#), "{endpoint}: {body}");
}

fn assert_loopback_endpoints(cluster: &EtcdCluster, n: usize) {
    let endpoints = cluster.endpoints();
    assert_eq!(endpoints.len(), n);
    for e in &endpoints {
        let addr: SocketAddr = e.parse().expect("endpoint is host:port");
        assert!(addr.ip().is_loopback(), "{e}");
        assert_ne!(addr.port(), 2379, "{e}: not an ephemeral port");
    }
    let mut ports: Vec<_> = endpoints.iter().collect();
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), n, "distinct endpoints: {endpoints:?}");
    assert_eq!(
        cluster.store_url(),
        format!("etcd://{}", endpoints.join(","))
    );
}

#[tokio::test]
async fn one_member_cluster_is_healthy() {
    let cluster = EtcdCluster::start(1);
    assert_loopback_endpoints(&cluster, 1);
    assert_healthy(&cluster.endpoints()[0]).await;
}

#[tokio::test]
async fn three_member_cluster_is_healthy_and_survives_losing_one() {
    let mut cluster = EtcdCluster::start(3);
    assert_loopback_endpoints(&cluster, 3);
    let endpoints = cluster.endpoints();
    for e in &endpoints {
        assert_healthy(e).await;
    }

    // Two of three keep quorum.
    cluster.kill(0);
    assert!(
        health(&endpoints[0]).await.is_none(),
        "killed member still answers"
    );
    for e in &endpoints[1..] {
        let e = e.clone();
        wait_for(
            &format!("{e} healthy with one member down"),
            DEADLINE,
            || {
                let e = e.clone();
                async move {
                    health(&e)
                        .await
                        .is_some_and(|(s, b)| s == 200 && b.contains(r#""health":"true""#))
                }
            },
        )
        .await;
    }
}

#[tokio::test]
async fn drop_kills_every_member() {
    let cluster = EtcdCluster::start(3);
    let endpoints = cluster.endpoints();
    drop(cluster);
    for e in &endpoints {
        assert!(health(e).await.is_none(), "{e} still answers after drop");
    }
}

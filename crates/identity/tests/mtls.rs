//! Handshakes between configs built by `IdentityStore`, over in-memory pipes.

use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use trellis_identity::tls::{failure_reason, peer_identity, ALPN_H2};
use trellis_identity::{CertificateAuthority, IdentityStore, SpiffeId};

fn id(sa: &str) -> SpiffeId {
    SpiffeId::new("cluster.local", "edtech", sa).unwrap()
}

fn store_for(ca: &CertificateAuthority, sa: &str, ttl: Duration) -> Arc<IdentityStore> {
    let (issued, key) = ca.issue(&id(sa), &[], &[], ttl).unwrap();
    let store = IdentityStore::new();
    store
        .install(&issued.chain_pem, &key, &ca.bundle_pem())
        .unwrap();
    store
}

/// Runs one handshake; returns (client result, server result, identity the server saw).
async fn handshake(
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
) -> (
    Result<(), std::io::Error>,
    Result<Option<SpiffeId>, std::io::Error>,
) {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let server_side = tokio::spawn(async move {
        let mut tls = TlsAcceptor::from(server).accept(b).await?;
        let peer = peer_identity(tls.get_ref().1.peer_certificates());
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await?;
        tls.write_all(&buf).await?;
        tls.flush().await?;
        Ok(peer)
    });
    let name = rustls::pki_types::ServerName::try_from("mesh.local").unwrap();
    let client_result = async {
        let mut tls = TlsConnector::from(client).connect(name, a).await?;
        tls.write_all(b"ping").await?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await?;
        assert_eq!(&buf, b"ping");
        Ok(())
    }
    .await;
    (client_result, server_side.await.unwrap())
}

#[tokio::test]
async fn mutual_tls_with_expected_identity() {
    let ca = CertificateAuthority::generate("cluster.local", Duration::from_secs(3600)).unwrap();
    let frontend = store_for(&ca, "frontend", Duration::from_secs(600));
    let profile = store_for(&ca, "user-profile", Duration::from_secs(600));
    let (c, s) = handshake(
        frontend.client_config(Some(id("user-profile")), &[ALPN_H2]),
        profile.server_config(&[ALPN_H2]),
    )
    .await;
    c.unwrap();
    assert_eq!(s.unwrap(), Some(id("frontend")));
}

#[tokio::test]
async fn wrong_server_identity_is_refused_by_the_client() {
    let ca = CertificateAuthority::generate("cluster.local", Duration::from_secs(3600)).unwrap();
    let frontend = store_for(&ca, "frontend", Duration::from_secs(600));
    let imposter = store_for(&ca, "exam-engine", Duration::from_secs(600));
    let (c, s) = handshake(
        frontend.client_config(Some(id("user-profile")), &[]),
        imposter.server_config(&[]),
    )
    .await;
    let err = c.unwrap_err();
    assert_eq!(failure_reason(&err), "identity_mismatch", "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("sa/exam-engine") && msg.contains("sa/user-profile"),
        "{msg}"
    );
    assert!(s.is_err());
}

#[tokio::test]
async fn another_ca_is_refused_both_ways() {
    let ca = CertificateAuthority::generate("cluster.local", Duration::from_secs(3600)).unwrap();
    let other = CertificateAuthority::generate("cluster.local", Duration::from_secs(3600)).unwrap();
    let good = store_for(&ca, "frontend", Duration::from_secs(600));
    let stranger = store_for(&other, "frontend", Duration::from_secs(600));
    // A client with a foreign certificate that itself trusts our CA: the server refuses it.
    let (issued, key) = other
        .issue(&id("frontend"), &[], &[], Duration::from_secs(600))
        .unwrap();
    let trusting_stranger = IdentityStore::new();
    trusting_stranger
        .install(
            &issued.chain_pem,
            &key,
            &format!("{}{}", ca.bundle_pem(), other.bundle_pem()),
        )
        .unwrap();
    let (_, s) = handshake(
        trusting_stranger.client_config(None, &[]),
        good.server_config(&[]),
    )
    .await;
    assert_eq!(failure_reason(&s.unwrap_err()), "unknown_ca");
    let (c, _) = handshake(good.client_config(None, &[]), stranger.server_config(&[])).await;
    assert_eq!(failure_reason(&c.unwrap_err()), "unknown_ca");
}

#[tokio::test]
async fn rotation_takes_effect_for_new_handshakes() {
    let ca = CertificateAuthority::generate("cluster.local", Duration::from_secs(3600)).unwrap();
    let server = store_for(&ca, "user-profile", Duration::from_secs(600));
    let client = store_for(&ca, "frontend", Duration::from_secs(600));
    let first = client.info().unwrap().serial;
    let (issued, key) = ca
        .issue(&id("frontend"), &[], &[], Duration::from_secs(600))
        .unwrap();
    client
        .install(&issued.chain_pem, &key, &ca.bundle_pem())
        .unwrap();
    assert_ne!(client.info().unwrap().serial, first);
    assert_eq!(client.rotations(), 1);
    let (c, s) = handshake(client.client_config(None, &[]), server.server_config(&[])).await;
    c.unwrap();
    assert_eq!(s.unwrap(), Some(id("frontend")));
}

#[tokio::test]
async fn rotated_root_is_trusted_alongside_the_old_one() {
    let old = CertificateAuthority::generate("cluster.local", Duration::from_secs(3600)).unwrap();
    let mut new =
        CertificateAuthority::generate("cluster.local", Duration::from_secs(3600)).unwrap();
    new.trust_also(old.bundle());
    // A server still on the old root, a client already on the new one, both trusting both.
    let (issued, key) = old
        .issue(&id("user-profile"), &[], &[], Duration::from_secs(600))
        .unwrap();
    let server = IdentityStore::new();
    server
        .install(&issued.chain_pem, &key, &new.bundle_pem())
        .unwrap();
    let (issued, key) = new
        .issue(&id("frontend"), &[], &[], Duration::from_secs(600))
        .unwrap();
    let client = IdentityStore::new();
    client
        .install(&issued.chain_pem, &key, &new.bundle_pem())
        .unwrap();
    let (c, s) = handshake(
        client.client_config(Some(id("user-profile")), &[]),
        server.server_config(&[]),
    )
    .await;
    c.unwrap();
    assert_eq!(s.unwrap(), Some(id("frontend")));
}

#[test]
fn install_refuses_bad_material() {
    let ca = CertificateAuthority::generate("cluster.local", Duration::from_secs(3600)).unwrap();
    let (issued, key) = ca
        .issue(&id("a"), &[], &[], Duration::from_secs(60))
        .unwrap();
    let (_, other_key) = ca
        .issue(&id("b"), &[], &[], Duration::from_secs(60))
        .unwrap();
    let store = IdentityStore::new();
    assert!(store
        .install(&issued.chain_pem, &other_key, &ca.bundle_pem())
        .is_err());
    assert!(store.install(&issued.chain_pem, &key, "").is_err());
    assert!(store.install("junk", &key, &ca.bundle_pem()).is_err());
    assert!(store.info().is_none());
}

#[tokio::test]
async fn a_reloaded_next_root_serving_with_its_own_cert_in_the_chain_verifies() {
    let mut old =
        CertificateAuthority::generate("cluster.local", Duration::from_secs(3600)).unwrap();
    let next = CertificateAuthority::generate("cluster.local", Duration::from_secs(3600)).unwrap();
    old.trust_also(next.bundle());
    let bundle2 = old.bundle_pem();
    let (issued, key) = old
        .issue(&id("frontend"), &[], &[], Duration::from_secs(600))
        .unwrap();
    let client = IdentityStore::new();
    client.install(&issued.chain_pem, &key, &bundle2).unwrap();

    let mut next2 = CertificateAuthority::from_pem(
        "cluster.local",
        &next.cert_file_pem(),
        next.key_pem(),
        None,
    )
    .unwrap();
    next2.trust_also(old.bundle());
    let (issued, key) = next2
        .issue(&id("control"), &[], &[], Duration::from_secs(600))
        .unwrap();
    let chain = format!("{}{}", issued.chain_pem, next2.cert_pem());
    let server = IdentityStore::new();
    server.install(&chain, &key, &next2.bundle_pem()).unwrap();
    let (c, s) = handshake(
        client.client_config(Some(id("control")), &[]),
        server.server_config(&[]),
    )
    .await;
    c.unwrap();
    s.unwrap();
}

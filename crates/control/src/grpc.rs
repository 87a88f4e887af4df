//! The control plane's gRPC listener: TLS with the control plane's own mesh certificate
//! (client certificates optional, verified when presented), then tonic: the identity service
//! and the config stream.

use crate::identity::{IdentityService, PeerInfo};
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use trellis_api::proto::config::config_server::ConfigServer;
use trellis_api::proto::identity::identity_server::IdentityServer;
use trellis_identity::tls::{peer_identity, ALPN_H2};
use trellis_identity::IdentityStore;

/// A TLS connection and what we know of its client.
pub struct PeerConn {
    io: TlsStream<TcpStream>,
    info: PeerInfo,
}

impl tonic::transport::server::Connected for PeerConn {
    type ConnectInfo = PeerInfo;
    fn connect_info(&self) -> PeerInfo {
        self.info.clone()
    }
}

impl AsyncRead for PeerConn {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for PeerConn {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, b)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Serves the identity service on `listener` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    store: Arc<IdentityStore>,
    service: IdentityService,
    push: crate::push::PushService,
    shutdown: CancellationToken,
) -> Result<(), tonic::transport::Error> {
    let acceptor = TlsAcceptor::from(store.server_config_client_cert_optional(&[ALPN_H2]));
    let (tx, rx) = tokio::sync::mpsc::channel::<io::Result<PeerConn>>(64);
    let accept_shutdown = shutdown.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, remote) = tokio::select! {
                _ = accept_shutdown.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "control plane accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let (acceptor, tx) = (acceptor.clone(), tx.clone());
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(io)) => {
                        let identity = peer_identity(io.get_ref().1.peer_certificates());
                        let info = PeerInfo {
                            remote: Some(remote),
                            identity,
                        };
                        let _ = tx.send(Ok(PeerConn { io, info })).await;
                    }
                    Ok(Err(e)) => {
                        tracing::info!(client = %remote, error = %e, "control plane TLS handshake failed")
                    }
                    Err(_) => {
                        tracing::info!(client = %remote, "control plane TLS handshake timed out")
                    }
                }
            });
        }
    });
    let incoming =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|c| (c, rx)) });
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(IdentityServer::new(service))
        .add_service(ConfigServer::new(push))
        .serve_with_incoming_shutdown(incoming, shutdown.cancelled_owned())
        .await
}

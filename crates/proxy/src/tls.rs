//! Mesh mTLS in the proxy: terminating it on inbound connections and originating it to
//! upstream endpoints whose identity is known.
//!
//! The certificates, the trust bundle and the verification rules live in
//! `trellis_identity::tls`; this module wires them to sockets and metrics.

use crate::config::MtlsMode;
use crate::telemetry::metrics::Peer;
use rustls::pki_types::ServerName;
use std::io;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use trellis_identity::tls::{peer_identity, ALPN_H2, ALPN_HTTP11};
use trellis_identity::{IdentityStore, SpiffeId};

/// How long a TLS handshake may take before the connection is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The protocol a client asked for inside TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Alpn {
    /// `h2`.
    H2,
    /// `http/1.1`.
    Http1,
    /// None negotiated: opaque bytes (or detect).
    None,
}

/// The inbound side of mTLS for one listener.
pub struct InboundTls {
    /// STRICT or PERMISSIVE (DISABLE has no `InboundTls`).
    pub mode: MtlsMode,
    acceptor: TlsAcceptor,
}

/// A terminated mTLS connection.
pub struct Accepted<I> {
    /// The decrypted stream.
    pub io: tokio_rustls::server::TlsStream<I>,
    /// The peer's identity (always present: client certificates are required).
    pub peer: Option<SpiffeId>,
    /// What ALPN chose.
    pub alpn: Alpn,
}

impl InboundTls {
    /// Terminates mTLS with the proxy's identity, requiring a client certificate.
    pub fn new(mode: MtlsMode, store: &Arc<IdentityStore>) -> Self {
        Self {
            mode,
            acceptor: TlsAcceptor::from(store.server_config(&[ALPN_H2, ALPN_HTTP11])),
        }
    }

    /// Runs the server handshake, bounded by [`HANDSHAKE_TIMEOUT`].
    pub async fn accept<I>(&self, io: I) -> io::Result<Accepted<I>>
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let tls = tokio::time::timeout(HANDSHAKE_TIMEOUT, self.acceptor.accept(io))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        let conn = tls.get_ref().1;
        let peer = peer_identity(conn.peer_certificates());
        let alpn = match conn.alpn_protocol() {
            Some(ALPN_H2) => Alpn::H2,
            Some(ALPN_HTTP11) => Alpn::Http1,
            _ => Alpn::None,
        };
        Ok(Accepted {
            io: tls,
            peer,
            alpn,
        })
    }
}

/// The calling service as metrics label it: service account and namespace of its identity.
pub fn peer_of(id: &SpiffeId) -> Peer {
    Peer::new(&id.service_account, &id.namespace)
}

/// How the proxy originates mTLS to one upstream identity: one client config per ALPN use.
pub struct UpstreamTls {
    /// The identity the endpoints must present.
    pub expected: SpiffeId,
    h2: TlsConnector,
    h1: TlsConnector,
    opaque: TlsConnector,
    server_name: ServerName<'static>,
}

/// Which kind of upstream connection is wanted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpstreamUse {
    /// Multiplexed HTTP/2 (the normal mesh hop).
    H2,
    /// HTTP/1.1 (upgrades such as WebSocket).
    Http1,
    /// Opaque bytes (TCP, CONNECT).
    Opaque,
}

impl UpstreamTls {
    /// Connectors presenting `store`'s certificate and requiring `expected` of the server.
    pub fn new(store: &Arc<IdentityStore>, expected: SpiffeId) -> Self {
        let connector =
            |alpn: &[&[u8]]| TlsConnector::from(store.client_config(Some(expected.clone()), alpn));
        // SNI carries the expected identity's service account and namespace as a DNS-style
        // name; verification never relies on it.
        let sni = format!("{}.{}.mesh", expected.service_account, expected.namespace);
        let server_name = ServerName::try_from(sni)
            .unwrap_or_else(|_| ServerName::try_from("mesh.trellis").expect("a valid DNS name"));
        Self {
            h2: connector(&[ALPN_H2]),
            h1: connector(&[ALPN_HTTP11]),
            opaque: connector(&[]),
            server_name,
            expected,
        }
    }

    /// Runs the client handshake for `usage` over `io`.
    pub async fn connect<I>(
        &self,
        io: I,
        usage: UpstreamUse,
    ) -> io::Result<tokio_rustls::client::TlsStream<I>>
    where
        I: AsyncRead + AsyncWrite + Unpin,
    {
        let connector = match usage {
            UpstreamUse::H2 => &self.h2,
            UpstreamUse::Http1 => &self.h1,
            UpstreamUse::Opaque => &self.opaque,
        };
        tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            connector.connect(self.server_name.clone(), io),
        )
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))?
    }
}

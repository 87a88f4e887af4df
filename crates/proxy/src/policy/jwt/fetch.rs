//! Fetching one JWKS document.
//!
//! - `http://`: a plain HTTP/1.1 GET, first through the mesh's outbound listener when there is
//!   one (see [`super::JwksCache`]'s `connect_to`), so in-mesh key servers are reached over
//!   mTLS; a host the mesh does not know (the listener answers `503` with
//!   `x-trellis-error: unknown-service`) is then fetched from the host directly.
//! - `https://`: an HTTP/1.1 GET over TLS straight to the host (an identity provider outside
//!   the mesh), the server's certificate verified for the URI's host name against the
//!   system's trust store, loaded once with `rustls-native-certs` (which reads
//!   `SSL_CERT_FILE` / `SSL_CERT_DIR` instead when either is set).
//! - `file:///absolute/path`: read from disk.
//!
//! Every document is at most [`MAX_JWKS_BYTES`]; the caller bounds the time.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use tokio_rustls::TlsConnector;

/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// Where a remote key set comes from.
#[derive(Clone, Debug)]
pub(super) enum JwksSource {
    Http(http::Uri),
    Https(http::Uri),
    File(String),
}

impl JwksSource {
    /// Reads a `jwksUri`; an error says why it cannot be fetched.
    pub(super) fn parse(uri: &str) -> Result<JwksSource, String> {
        if let Some(path) = uri.strip_prefix("file://") {
            if !path.starts_with('/') || path.len() < 2 {
                return Err(format!(
                    "{uri:?} names no absolute path (file:///path/to/jwks.json)"
                ));
            }
            return Ok(JwksSource::File(path.to_string()));
        }
        let tls = uri.starts_with("https://");
        if !tls && !uri.starts_with("http://") {
            return Err(format!(
                "{uri:?} is not an http://, https:// or file:// URI"
            ));
        }
        let parsed: http::Uri = uri.parse().map_err(|e| format!("{uri:?}: {e}"))?;
        if parsed.host().is_none_or(str::is_empty) {
            return Err(format!("{uri:?} names no host"));
        }
        Ok(if tls {
            JwksSource::Https(parsed)
        } else {
            JwksSource::Http(parsed)
        })
    }
}

/// Fetches documents: holds where `http://` fetches go first and, once an `https://` fetch
/// needed it, the TLS client over the system's trust store. Clones share the trust store.
#[derive(Clone)]
pub(super) struct Fetcher {
    connect_to: Option<SocketAddr>,
    web_pki: Arc<OnceLock<TlsConnector>>,
}

impl Fetcher {
    /// A fetcher sending `http://` fetches to `connect_to` first (the mesh's outbound
    /// listener), when given.
    pub(super) fn new(connect_to: Option<SocketAddr>) -> Self {
        Fetcher {
            connect_to,
            web_pki: Arc::new(OnceLock::new()),
        }
    }

    /// The document `source` names.
    pub(super) async fn fetch(&self, source: &JwksSource) -> Result<String, String> {
        match source {
            JwksSource::File(path) => {
                let path = path.clone();
                let bytes = tokio::task::spawn_blocking(move || read_at_most(&path))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                if bytes.len() > MAX_JWKS_BYTES {
                    return Err(format!("larger than {MAX_JWKS_BYTES} bytes"));
                }
                String::from_utf8(bytes).map_err(|_| "not UTF-8".into())
            }
            JwksSource::Http(uri) => fetch_http(uri, self.connect_to).await,
            JwksSource::Https(uri) => {
                let tls = self.web_pki().await?;
                get(uri, Via::Tls(&tls))
                    .await
                    .map_err(GetError::into_message)
            }
        }
    }

    /// The TLS client for `https://` fetches, loading the trust store on first use. A failed
    /// load is not kept: the next fetch tries again.
    async fn web_pki(&self) -> Result<TlsConnector, String> {
        if let Some(tls) = self.web_pki.get() {
            return Ok(tls.clone());
        }
        let loaded = tokio::task::spawn_blocking(load_web_pki)
            .await
            .map_err(|e| e.to_string())??;
        Ok(self.web_pki.get_or_init(|| loaded).clone())
    }
}

/// The file at `path`, or its first `MAX_JWKS_BYTES + 1` bytes if it is longer: enough to
/// refuse it without reading a huge (or endless, like `/dev/zero`) file whole.
fn read_at_most(path: &str) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_JWKS_BYTES as u64 + 1)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// A TLS client trusting the system's roots (or `SSL_CERT_FILE` / `SSL_CERT_DIR`), speaking
/// HTTP/1.1; rustls verifies the chain and that the certificate names the host.
fn load_web_pki() -> Result<TlsConnector, String> {
    let found = rustls_native_certs::load_native_certs();
    for error in &found.errors {
        tracing::warn!(%error, "reading trusted roots for https JWKS");
    }
    let mut roots = rustls::RootCertStore::empty();
    let (added, ignored) = roots.add_parsable_certificates(found.certs);
    if ignored > 0 {
        tracing::debug!(added, ignored, "unusable trusted roots skipped");
    }
    if roots.is_empty() {
        return Err(
            "no trusted root certificates for https (install the system's CA \
                    certificates, or set SSL_CERT_FILE or SSL_CERT_DIR)"
                .into(),
        );
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("tls: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// GETs `uri` over HTTP/1.1: through `connect_to` (the mesh's outbound listener) when given,
/// else from the URI's host. When the outbound listener answers that the host is no service
/// of the mesh (`503` with `x-trellis-error: unknown-service`), there is no mesh route to it,
/// so the document is fetched from the host directly instead.
async fn fetch_http(uri: &http::Uri, connect_to: Option<SocketAddr>) -> Result<String, String> {
    let first = match connect_to {
        Some(proxy) => Via::Proxy(proxy),
        None => Via::Direct,
    };
    match get(uri, first).await {
        Err(GetError::UnknownToMesh) => {
            tracing::debug!(%uri, "JWKS host is not a mesh service; fetching it directly");
            get(uri, Via::Direct).await.map_err(GetError::into_message)
        }
        other => other.map_err(GetError::into_message),
    }
}

/// How one GET reaches the server.
enum Via<'a> {
    /// Plain HTTP to a forward proxy (the outbound listener), the request in absolute form.
    Proxy(SocketAddr),
    /// Plain HTTP to the URI's host.
    Direct,
    /// TLS to the URI's host.
    Tls(&'a TlsConnector),
}

/// Why one GET produced no document.
enum GetError {
    /// The outbound listener does not know the URI's host.
    UnknownToMesh,
    /// Anything else, as a message for the status page and the log.
    Failed(String),
}

impl GetError {
    fn into_message(self) -> String {
        match self {
            GetError::UnknownToMesh => "status 503 (x-trellis-error: unknown-service)".into(),
            GetError::Failed(why) => why,
        }
    }
}

impl From<String> for GetError {
    fn from(why: String) -> Self {
        GetError::Failed(why)
    }
}

/// GETs `uri` over a fresh HTTP/1.1 connection made as `via` says.
async fn get(uri: &http::Uri, via: Via<'_>) -> Result<String, GetError> {
    let authority = uri.authority().ok_or("no host".to_string())?;
    let host = authority
        .host()
        .trim_start_matches('[')
        .trim_end_matches(']');
    let port = authority
        .port_u16()
        .unwrap_or(if matches!(via, Via::Tls(_)) { 443 } else { 80 });
    let stream = match via {
        Via::Proxy(addr) => tokio::net::TcpStream::connect(addr).await,
        Via::Direct | Via::Tls(_) => tokio::net::TcpStream::connect((host, port)).await,
    }
    .map_err(|e| format!("connect: {e}"))?;
    let origin_form = || -> Result<http::Uri, GetError> {
        uri.path_and_query()
            .map_or("/", |p| p.as_str())
            .parse()
            .map_err(|e| GetError::Failed(format!("{e}")))
    };
    match via {
        Via::Proxy(_) => exchange(TokioIo::new(stream), uri.clone(), authority, true).await,
        Via::Direct => exchange(TokioIo::new(stream), origin_form()?, authority, false).await,
        Via::Tls(tls) => {
            let name = rustls::pki_types::ServerName::try_from(host.to_string())
                .map_err(|_| format!("{host:?} is not a valid TLS server name"))?;
            let stream = tls
                .connect(name, stream)
                .await
                .map_err(|e| format!("tls: {e}"))?;
            exchange(TokioIo::new(stream), origin_form()?, authority, false).await
        }
    }
}

/// Sends one GET for `target` over `io` and reads a 200's body. `via_mesh`: `io` leads to the
/// outbound listener, whose unknown-service answer is told apart.
async fn exchange<T>(
    io: T,
    target: http::Uri,
    authority: &http::uri::Authority,
    via_mesh: bool,
) -> Result<String, GetError>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(io)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let conn = tokio::spawn(conn);
    let request = http::Request::get(target)
        .header(http::header::HOST, authority.as_str())
        .header(http::header::ACCEPT, "application/json")
        .header(http::header::USER_AGENT, "trellis-proxy")
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let result = async {
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("request: {e}"))?;
        if via_mesh
            && response.status() == http::StatusCode::SERVICE_UNAVAILABLE
            && response
                .headers()
                .get("x-trellis-error")
                .is_some_and(|v| v == "unknown-service")
        {
            return Err(GetError::UnknownToMesh);
        }
        if response.status() != http::StatusCode::OK {
            return Err(format!("status {}", response.status()).into());
        }
        let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| format!("body: {e}"))?
            .to_bytes();
        String::from_utf8(body.to_vec()).map_err(|_| "body is not UTF-8".to_string().into())
    }
    .await;
    drop(sender);
    conn.abort();
    result
}

//! Fetching one JWKS document: `http://` URIs with a plain HTTP/1.1 GET, `file://` paths read
//! from disk. `https://` is refused at compile time for now (the proxy has no web PKI roots):
//! serve the JWKS over `http://`, through the mesh's outbound listener (see
//! [`super::JwksCache`]'s `connect_to`) so in-mesh key servers are reached over mTLS; hosts
//! the mesh does not know are then fetched directly.

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;

/// Largest JWKS document accepted.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// Where a remote key set comes from.
#[derive(Clone, Debug)]
pub(super) enum JwksSource {
    Http(http::Uri),
    File(String),
}

impl JwksSource {
    /// Reads a `jwksUri`; an error says why it cannot be fetched.
    pub(super) fn parse(uri: &str) -> Result<JwksSource, String> {
        if let Some(path) = uri.strip_prefix("file://") {
            if path.is_empty() {
                return Err(format!("{uri:?} names no file"));
            }
            return Ok(JwksSource::File(path.to_string()));
        }
        if uri.starts_with("https://") {
            return Err(format!(
                "{uri:?}: https JWKS URIs are not supported yet (the proxy holds no web PKI \
                 roots); serve the JWKS over http:// through the mesh, from a file:// path, or \
                 inline in `jwks`"
            ));
        }
        if !uri.starts_with("http://") {
            return Err(format!("{uri:?} is not an http:// or file:// URI"));
        }
        let parsed: http::Uri = uri.parse().map_err(|e| format!("{uri:?}: {e}"))?;
        if parsed.host().is_none_or(str::is_empty) {
            return Err(format!("{uri:?} names no host"));
        }
        Ok(JwksSource::Http(parsed))
    }

    /// Fetches the document, over HTTP to `connect_to` when given (see [`fetch_http`]).
    pub(super) async fn fetch(&self, connect_to: Option<SocketAddr>) -> Result<String, String> {
        match self {
            JwksSource::File(path) => {
                let path = path.clone();
                let bytes = tokio::task::spawn_blocking(move || std::fs::read(path))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                if bytes.len() > MAX_JWKS_BYTES {
                    return Err(format!("larger than {MAX_JWKS_BYTES} bytes"));
                }
                String::from_utf8(bytes).map_err(|_| "not UTF-8".into())
            }
            JwksSource::Http(uri) => fetch_http(uri, connect_to).await,
        }
    }
}

/// GETs `uri` over HTTP/1.1: through `connect_to` (the mesh's outbound listener) when given,
/// else from the URI's host. When the outbound listener answers that the host is no service
/// of the mesh (`503` with `x-trellis-error: unknown-service`), there is no mesh route to it,
/// so the document is fetched from the host directly instead.
async fn fetch_http(uri: &http::Uri, connect_to: Option<SocketAddr>) -> Result<String, String> {
    match get(uri, connect_to).await {
        Err(GetError::UnknownToMesh) => {
            tracing::debug!(%uri, "JWKS host is not a mesh service; fetching it directly");
            get(uri, None).await.map_err(GetError::into_message)
        }
        other => other.map_err(GetError::into_message),
    }
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

/// GETs `uri` over a fresh HTTP/1.1 connection, to `connect_to` when given (the request is
/// then sent in absolute form, as to a forward proxy) or to the URI's host.
async fn get(uri: &http::Uri, connect_to: Option<SocketAddr>) -> Result<String, GetError> {
    let authority = uri.authority().ok_or("no host".to_string())?;
    let stream = match connect_to {
        Some(addr) => tokio::net::TcpStream::connect(addr).await,
        None => {
            let host = authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']');
            tokio::net::TcpStream::connect((host, authority.port_u16().unwrap_or(80))).await
        }
    }
    .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let conn = tokio::spawn(conn);
    let target = match connect_to {
        Some(_) => uri.clone(),
        None => uri
            .path_and_query()
            .map_or("/", |p| p.as_str())
            .parse()
            .map_err(|e| format!("{e}"))?,
    };
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
        if connect_to.is_some()
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

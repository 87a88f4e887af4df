//! Minimal clients for tests: one-shot HTTP/1.1 GET and a WebSocket echo round trip.

use std::io;
use std::net::SocketAddr;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::header::HOST;
use http::{HeaderMap, HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_tungstenite::connect_async;
use tokio_tungstenite::tungstenite::{self, Message};

/// Why a test client call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting or talking to the server failed.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// The request could not be built (bad URI, header name or value).
    #[error("invalid request: {0}")]
    Request(#[from] http::Error),
    /// The HTTP exchange failed.
    #[error("http: {0}")]
    Http(#[from] hyper::Error),
    /// The WebSocket handshake or exchange failed.
    #[error("websocket: {0}")]
    WebSocket(#[from] tungstenite::Error),
    /// The WebSocket closed before echoing the message.
    #[error("websocket closed before the echo arrived")]
    NoEcho,
}

/// Sends one `GET` over a fresh HTTP/1.1 connection to `addr` and reads the whole response.
///
/// `target` is sent as the request target: origin-form (`/path?q`) or absolute-form
/// (`http://host/path`, as to a forward proxy). `Host` defaults to the URI's authority, else
/// `addr`, unless `headers` sets it.
pub async fn http1_get(
    addr: SocketAddr,
    target: &str,
    headers: &[(&str, &str)],
) -> Result<(StatusCode, HeaderMap, Bytes), ClientError> {
    let uri: Uri = target.parse().map_err(http::Error::from)?;
    let mut builder = Request::get(&uri);
    for (name, value) in headers {
        builder = builder.header(*name, *value);
    }
    let mut request = builder.body(Empty::<Bytes>::new())?;
    if !request.headers().contains_key(HOST) {
        let host = match uri.authority() {
            Some(authority) => HeaderValue::from_str(authority.as_str()),
            None => HeaderValue::from_str(&addr.to_string()),
        };
        request
            .headers_mut()
            .insert(HOST, host.map_err(http::Error::from)?);
    }

    let stream = TcpStream::connect(addr).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    let connection = tokio::spawn(connection);
    let response = sender.send_request(request).await?;
    let (parts, body) = response.into_parts();
    let body = body.collect().await?.to_bytes();
    drop(sender);
    connection.abort();
    Ok((parts.status, parts.headers, body))
}

/// Connects to `url` (`ws://host:port/path`), sends `text` as one text message and returns the
/// first text message received back, then closes the socket.
pub async fn ws_echo(url: &str, text: &str) -> Result<String, ClientError> {
    let (mut ws, _response) = connect_async(url).await?;
    ws.send(Message::text(text)).await?;
    let mut echoed = None;
    while let Some(message) = ws.next().await {
        if let Message::Text(reply) = message? {
            echoed = Some(reply.as_str().to_owned());
            break;
        }
    }
    // Best effort: the echo already arrived, a failed close does not change the result.
    let _ = ws.close(None).await;
    echoed.ok_or(ClientError::NoEcho)
}

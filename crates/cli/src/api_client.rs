//! A small JSON client for the control plane's HTTP API.

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use std::time::Duration;
use tokio::net::TcpStream;

/// Sends one request with `headers` and `body`; returns the status and the raw body.
async fn send(
    api: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: String,
) -> anyhow::Result<(u16, Bytes)> {
    let stream = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(api))
        .await
        .map_err(|_| anyhow::anyhow!("connecting to the control plane API at {api} timed out"))?
        .with_context(|| {
            format!(
                "cannot reach the control plane API at {api} (is `trellis control` running? --api)"
            )
        })?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(path)
        .header("host", api);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = tokio::time::timeout(
        Duration::from_secs(30),
        tx.send_request(req.body(Full::new(Bytes::from(body)))?),
    )
    .await
    .context("the control plane API did not answer within 30s")??;
    let status = resp.status().as_u16();
    let bytes = resp.into_body().collect().await?.to_bytes();
    Ok((status, bytes))
}

/// Sends one request; returns the JSON body of a 2xx answer, or the API's error message.
pub async fn call(
    api: &str,
    method: &str,
    path: &str,
    body: Option<Value>,
) -> anyhow::Result<Value> {
    let (status, bytes) = send(
        api,
        method,
        path,
        &[("content-type", "application/json")],
        body.map(|b| b.to_string()).unwrap_or_default(),
    )
    .await?;
    let json: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    if !(200..300).contains(&status) {
        let msg = json["error"].as_str().map_or_else(
            || String::from_utf8_lossy(&bytes).into_owned(),
            str::to_string,
        );
        let status =
            hyper::StatusCode::from_u16(status).map_or(status.to_string(), |s| s.to_string());
        bail!("{msg} (HTTP {status})");
    }
    Ok(json)
}

/// A GET whose JSON body matters whatever the status (e.g. `/health` answers 503 with
/// details): the status and the JSON body.
pub async fn get_any_status(api: &str, path: &str) -> anyhow::Result<(u16, Value)> {
    let (status, bytes) = send(api, "GET", path, &[], String::new()).await?;
    Ok((
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

/// Sends a text body (a YAML file named `file`); returns the status and JSON body whatever
/// the status.
pub async fn call_raw(
    api: &str,
    method: &str,
    path: &str,
    file: Option<&str>,
    body: String,
) -> anyhow::Result<(u16, Value)> {
    let mut headers = vec![("content-type", "application/yaml")];
    if let Some(f) = file {
        headers.push(("x-trellis-file", f));
    }
    let (status, bytes) = send(api, method, path, &headers, body).await?;
    Ok((
        status,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    ))
}

/// Runs `f` on a small runtime (CLI commands are one-shot).
pub fn block_on<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f))
}

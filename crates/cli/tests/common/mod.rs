//! Shared pieces of the end-to-end tests: the binary's path and small clients.
#![allow(dead_code, unused_imports)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
pub use trellis_testkit::proxy::{free_addr, sample, Trellis};

/// The `trellis` binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_trellis");

/// Starts a proxy from `yaml` with `extra` flags and waits until it is ready.
pub async fn proxy(yaml: &str, admin: SocketAddr, extra: &[&str]) -> Trellis {
    Trellis::start(BIN, yaml, admin, extra).await
}

/// Sends requests over one HTTP/2 prior-knowledge connection (clones share it).
#[derive(Clone)]
pub struct H2 {
    tx: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
}

impl H2 {
    /// Connects with the HTTP/2 preface (h2c).
    pub async fn connect(addr: SocketAddr) -> Self {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (tx, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .expect("h2 handshake");
        tokio::spawn(conn);
        Self { tx }
    }

    /// Sends a built request: (status, headers, body).
    pub async fn send(&self, req: http::Request<Full<Bytes>>) -> (u16, http::HeaderMap, Bytes) {
        let resp = self
            .tx
            .clone()
            .send_request(req)
            .await
            .expect("h2 response");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("h2 body").to_bytes();
        (parts.status.as_u16(), parts.headers, body)
    }

    /// One request: (status, headers, body).
    pub async fn request(
        &self,
        method: &str,
        uri: &str,
        body: &'static [u8],
    ) -> (u16, http::HeaderMap, Bytes) {
        let req = http::Request::builder()
            .method(method)
            .uri(uri)
            .body(Full::new(Bytes::from_static(body)))
            .expect("request");
        let resp = self
            .tx
            .clone()
            .send_request(req)
            .await
            .expect("h2 response");
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.expect("h2 body").to_bytes();
        (parts.status.as_u16(), parts.headers, body)
    }
}

/// Runs `curl` with `args` and `env` off the async threads; returns (exit code, stdout).
/// Panics if curl is missing: the test command installs it.
pub async fn curl_env(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    let env: Vec<(String, String)> = env
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new("curl")
            .args(["-sS", "--max-time", "10"])
            .args(&args)
            .envs(env)
            .output()
            .expect("curl must be installed (bash .ci/run installs it)");
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    })
    .await
    .expect("curl task")
}

/// Runs `curl` with `args`; returns (exit code, stdout).
pub async fn curl(args: &[&str]) -> (i32, String) {
    curl_env(args, &[]).await
}

/// Parses the JSON of the origin's `/echo`.
pub fn json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

/// Polls `f` every 25 ms until it returns `Some`, or panics with `what` after `limit`.
pub async fn eventually<T, F, Fut>(limit: std::time::Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(std::time::Instant::now() < deadline, "timed out: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
}

/// A workload joined to `control` as `service.namespace` (with `--label` for each of
/// `labels`): an inbound port in front of `app` and an outbound HTTP proxy listener. Returns
/// the proxy and its outbound address.
pub async fn joined(
    control: &trellis_testkit::proxy::Control,
    service: &str,
    namespace: &str,
    app: SocketAddr,
    labels: &[&str],
) -> (Trellis, SocketAddr) {
    joined_with(control, service, namespace, app, labels, "").await
}

/// Like [`joined`], with `extra_yaml` (whole top-level bootstrap sections) appended to the
/// bootstrap file.
pub async fn joined_with(
    control: &trellis_testkit::proxy::Control,
    service: &str,
    namespace: &str,
    app: SocketAddr,
    labels: &[&str],
    extra_yaml: &str,
) -> (Trellis, SocketAddr) {
    let (admin, inbound, outbound) = (free_addr(), free_addr(), free_addr());
    let yaml = format!(
        "service: {service}\nnamespace: {namespace}\nadmin: {admin}\noutbound: {{ listen: {outbound} }}\n\
         inbound:\n  - listen: {inbound}\n    app: {app}\n{extra_yaml}"
    );
    let token = control.token(service, namespace, &[]);
    let grpc = control.grpc.to_string();
    let mut args = vec!["--control", &grpc, "--token", token.to_str().unwrap()];
    let labels: Vec<String> = labels.iter().map(|l| format!("--label={l}")).collect();
    args.extend(labels.iter().map(String::as_str));
    (proxy(&yaml, admin, &args).await, outbound)
}

/// The entry of `host` (e.g. `user-profile.edtech`) under `routes` in an admin `/config`
/// body: its cluster, routes and TCP routes as the proxy runs them.
pub fn config_host(config: &str, host: &str) -> serde_json::Value {
    let config: serde_json::Value = serde_json::from_str(config).expect("/config is JSON");
    config["routes"]
        .as_array()
        .expect("routes")
        .iter()
        .find(|h| h["host"] == host)
        .unwrap_or_else(|| panic!("no host {host} in {config}"))
        .clone()
}

/// The names of a [`config_host`] entry's routes, in the order the proxy tries them.
pub fn route_names(host: &serde_json::Value) -> Vec<String> {
    host["routes"]
        .as_array()
        .expect("routes")
        .iter()
        .map(|r| r["name"].as_str().expect("route name").to_string())
        .collect()
}

/// Applies `yaml` (written to `dir/name`) with `trellis apply -f`, which must succeed.
pub fn apply(
    control: &trellis_testkit::proxy::Control,
    dir: &trellis_testkit::proxy::TempDir,
    name: &str,
    yaml: &str,
) {
    let file = dir.path().join(name);
    std::fs::write(&file, yaml).unwrap();
    let (code, o, e) = control.cli(&["apply", "-f", file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{o}{e}");
}

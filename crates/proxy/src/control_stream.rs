//! The proxy's config stream to the control plane: register, receive snapshots, apply them,
//! ACK or NACK, report the local app's readiness; reconnect with backoff across every
//! replica (`--control a,b,c`) for as long as the proxy runs.
//!
//! The stream is mTLS with the workload certificate. While it is down the proxy keeps its
//! last config (static stability); nothing is dropped for being idle.

use crate::identity_client::{backoff, channel, ControlConfig};
use crate::pushed::Pushed;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use trellis_api::proto::config::config_client::ConfigClient;
use trellis_api::proto::config::proxy_message::Message;
use trellis_api::proto::config::{Ack, Health, Hello, ProxyMessage};
use trellis_identity::tls::ALPN_H2;
use trellis_identity::{IdentityStore, SpiffeId};

/// Applies a checked config; the error is the NACK reason.
pub trait Apply: Send + Sync + 'static {
    /// Applies `pushed` or explains why not (the running config then stays).
    fn apply(&self, pushed: Pushed) -> Result<(), String>;
    /// The version running now (0: none).
    fn version(&self) -> u64;
    /// Whether the stream is up (for metrics).
    fn connected(&self, up: bool);
}

/// Runs the stream forever.
pub async fn run(
    cfg: ControlConfig,
    hello: Hello,
    store: Arc<IdentityStore>,
    control_id: SpiffeId,
    ready: watch::Receiver<bool>,
    apply: Arc<dyn Apply>,
) {
    let mut attempt = 0u32;
    let mut next = 0usize;
    loop {
        let addr = cfg.addrs[next % cfg.addrs.len()].clone();
        next += 1;
        let mut hello = hello.clone();
        hello.version = apply.version();
        hello.ready = *ready.borrow();
        match session(&addr, hello, &store, &control_id, ready.clone(), &apply).await {
            Ok(()) => {
                tracing::warn!(control = %addr, "config stream closed by the control plane; reconnecting");
                attempt = 0;
            }
            Err((e, was_up)) => {
                if was_up {
                    attempt = 0;
                }
                tracing::warn!(control = %addr, error = %e, "config stream down; keeping the current config");
            }
        }
        apply.connected(false);
        let wait = if attempt == 0 {
            Duration::from_millis(100 + fastrand::u64(..200))
        } else {
            backoff(attempt - 1).min(Duration::from_secs(5))
        };
        attempt += 1;
        tokio::time::sleep(wait).await;
    }
}

/// One connection: `Err((why, whether it had been up))`.
async fn session(
    addr: &str,
    hello: Hello,
    store: &Arc<IdentityStore>,
    control_id: &SpiffeId,
    mut ready: watch::Receiver<bool>,
    apply: &Arc<dyn Apply>,
) -> Result<(), (String, bool)> {
    let mut sent_ready = hello.ready;
    let tls = store.client_config(Some(control_id.clone()), &[ALPN_H2]);
    let ch = channel(addr, tls, None).await.map_err(|e| (e, false))?;
    let (tx, rx) = mpsc::channel::<ProxyMessage>(8);
    let _ = tx
        .send(ProxyMessage {
            message: Some(Message::Hello(hello)),
        })
        .await;
    let outgoing =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut incoming = ConfigClient::new(ch)
        .stream(outgoing)
        .await
        .map_err(|s| (format!("{}: {}", s.code(), s.message()), false))?
        .into_inner();
    apply.connected(true);
    tracing::info!(control = %addr, "config stream up");
    // Readiness may have changed while connecting: the first wake-up compares.
    ready.mark_changed();
    let mut probing = true;
    loop {
        tokio::select! {
            msg = incoming.message() => {
                let snapshot = match msg {
                    Ok(Some(s)) => s,
                    Ok(None) => return Ok(()),
                    Err(s) => return Err((format!("{}: {}", s.code(), s.message()), true)),
                };
                let version = snapshot.version;
                let result = Pushed::from_snapshot(snapshot).and_then(|p| apply.apply(p));
                let error = match result {
                    Ok(()) => {
                        tracing::info!(version, "config applied");
                        String::new()
                    }
                    Err(e) => {
                        tracing::warn!(version, error = %e, "config refused (NACK); keeping the current one");
                        e
                    }
                };
                let ack = ProxyMessage { message: Some(Message::Ack(Ack { version, error })) };
                if tx.send(ack).await.is_err() {
                    return Err(("stream closed".into(), true));
                }
            }
            r = ready.changed(), if probing => {
                if r.is_err() {
                    // No probe: the app counts as ready for the proxy's lifetime.
                    probing = false;
                    continue;
                }
                let now = *ready.borrow_and_update();
                if now == sent_ready { continue; }
                sent_ready = now;
                let health = ProxyMessage { message: Some(Message::Health(Health { ready: now })) };
                if tx.send(health).await.is_err() {
                    return Err(("stream closed".into(), true));
                }
            }
        }
    }
}

/// Probes `GET path` on the local app every second; publishes readiness changes.
pub async fn probe_app(app: std::net::SocketAddr, path: String, tx: watch::Sender<bool>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let request = format!("GET {path} HTTP/1.1\r\nHost: {app}\r\nConnection: close\r\nUser-Agent: trellis-probe\r\n\r\n");
    loop {
        let attempt = async {
            let mut s = tokio::net::TcpStream::connect(app).await.ok()?;
            s.write_all(request.as_bytes()).await.ok()?;
            let mut buf = [0u8; 32];
            let n = s.read(&mut buf).await.ok()?;
            let head = std::str::from_utf8(&buf[..n]).ok()?;
            let code: u16 = head.split(' ').nth(1)?.parse().ok()?;
            Some((200..400).contains(&code))
        };
        let ok = tokio::time::timeout(Duration::from_secs(1), attempt)
            .await
            .ok()
            .flatten()
            .unwrap_or(false);
        tx.send_if_modified(|v| {
            if *v != ok {
                tracing::info!(ready = ok, path = %path, "local app readiness changed");
                *v = ok;
                true
            } else {
                false
            }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

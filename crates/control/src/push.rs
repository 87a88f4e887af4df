//! Config push: the `trellis.config.v1.Config` stream each proxy holds, and the compiler loop
//! that feeds every stream.
//!
//! A stream starts with the proxy's `Hello` (registration); from then on the proxy is sent a
//! snapshot whenever what concerns it changes, and answers with ACK or NACK, recorded under
//! `status/<instance>` for `trellis status`. When the stream ends, the registration goes.

use crate::compile::Compiled;
use crate::identity::PeerInfo;
use crate::registry::{registry_key, status_key, Nack, PortInfo, SyncStatus, Workload};
use crate::state::{now, valid_id, State};
use crate::store::Store;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};
use trellis_api::proto::config::config_server::Config;
use trellis_api::proto::config::proxy_message::Message;
use trellis_api::proto::config::{Hello, ProxyMessage, Snapshot};

/// Rebuilds the compiled view whenever resources or registrations change, and publishes it.
/// Bursts (a thousand proxies connecting) are coalesced over a few milliseconds.
pub async fn compile_forever(
    store: Arc<Store>,
    root_namespace: String,
    tx: watch::Sender<Arc<Compiled>>,
) {
    let mut resources = store.subscribe("resources/");
    let mut registry = store.subscribe("registry/");
    loop {
        resources.borrow_and_update();
        registry.borrow_and_update();
        match load(&store).await {
            Ok((docs, workloads, revision)) => {
                let root = root_namespace.clone();
                let built = tokio::task::spawn_blocking(move || {
                    Compiled::build(revision, &docs, &workloads, &root)
                })
                .await;
                match built {
                    Ok(c) => {
                        for s in &c.skipped {
                            tracing::error!(error = %s, "stored resource does not parse; not pushed");
                        }
                        let (services, endpoints) = c.counts();
                        tracing::debug!(revision, services, endpoints, "config compiled");
                        tx.send_replace(Arc::new(c));
                    }
                    Err(e) => tracing::error!(error = %e, "config compiler failed"),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "reading the store failed; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        }
        tokio::select! {
            r = resources.changed() => if r.is_err() { return },
            r = registry.changed() => if r.is_err() { return },
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

type Loaded = (Vec<(String, String)>, Vec<Workload>, u64);

async fn load(store: &Store) -> Result<Loaded, crate::store::StoreError> {
    let (docs, r1) = store.list("resources/").await?;
    let (regs, r2) = store.list("registry/").await?;
    let workloads = regs
        .iter()
        .filter_map(|(k, e)| match serde_json::from_str::<Workload>(&e.value) {
            Ok(w) => Some(w),
            Err(err) => {
                tracing::warn!(key = %k, error = %err, "ignoring a malformed registration");
                None
            }
        })
        .collect();
    let docs = docs.into_iter().map(|(k, e)| (k, e.value)).collect();
    Ok((docs, workloads, r1.max(r2)))
}

/// The `Config` service of one replica.
pub struct PushService {
    /// Identity state (which service a proxy's token names).
    pub state: Arc<State>,
    /// Where registrations and statuses go.
    pub store: Arc<Store>,
    /// The latest compiled view.
    pub compiled: watch::Receiver<Arc<Compiled>>,
    /// This replica's name (its gRPC address).
    pub replica: String,
}

type SnapshotStream = Pin<Box<dyn futures_util::Stream<Item = Result<Snapshot, Status>> + Send>>;

#[tonic::async_trait]
impl Config for PushService {
    type StreamStream = SnapshotStream;

    async fn stream(
        &self,
        request: Request<Streaming<ProxyMessage>>,
    ) -> Result<Response<SnapshotStream>, Status> {
        let info = request
            .extensions()
            .get::<PeerInfo>()
            .cloned()
            .unwrap_or_default();
        let identity = info.identity.ok_or_else(|| {
            Status::unauthenticated("config streams need mTLS with a workload certificate")
        })?;
        let mut inbound = request.into_inner();
        let hello = match tokio::time::timeout(Duration::from_secs(10), inbound.message()).await {
            Ok(Ok(Some(ProxyMessage {
                message: Some(Message::Hello(h)),
            }))) => h,
            Ok(Err(s)) => return Err(s),
            _ => {
                return Err(Status::invalid_argument(
                    "the first message on a config stream must be Hello",
                ))
            }
        };
        let workload = self
            .registration(&hello, &identity, info.remote)
            .await
            .inspect_err(|s| tracing::warn!(identity = %identity, error = %s.message(), "registration refused"))?;
        self.store
            .put_ephemeral(
                &registry_key(&workload.instance),
                serde_json::to_string(&workload).unwrap_or_default(),
            )
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        tracing::info!(instance = %workload.instance, service = %workload.service, namespace = %workload.namespace, address = %workload.address, "proxy registered");
        let (tx, rx) = mpsc::channel(4);
        let session = Session {
            store: self.store.clone(),
            compiled: self.compiled.clone(),
            workload,
            status: SyncStatus::default(),
            last_sent: None,
        };
        tokio::spawn(session.run(inbound, tx));
        let stream = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|s| (Ok(s), rx))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

impl PushService {
    /// Checks a Hello against the caller's certificate and builds its registry entry.
    async fn registration(
        &self,
        hello: &Hello,
        identity: &trellis_identity::SpiffeId,
        remote: Option<std::net::SocketAddr>,
    ) -> Result<Workload, Status> {
        if !valid_id(&hello.instance) {
            return Err(Status::invalid_argument(
                "instance must be 1-64 letters, digits, '-', '_' or '.'",
            ));
        }
        // The service a proxy registers as is the one its join token names; proxies with
        // certificates from elsewhere may only use their service account's name.
        let allowed = match self.state.renewal_token(&hello.instance, identity).await {
            Ok(token) => token.service,
            Err(crate::state::TokenRefusal::Unavailable(e)) => {
                return Err(Status::unavailable(e));
            }
            Err(crate::state::TokenRefusal::Revoked(id)) => {
                return Err(Status::permission_denied(format!(
                    "join token {id} was revoked"
                )));
            }
            Err(_) => identity.service_account.clone(),
        };
        if hello.service != allowed {
            return Err(Status::permission_denied(format!(
                "{identity} may register as service {allowed:?}, not {:?}",
                hello.service
            )));
        }
        // No port is fine: a workload that only calls others registers to get its config.
        if hello.ports.len() > 32 {
            return Err(Status::invalid_argument("at most 32 ports"));
        }
        let mut ports = Vec::new();
        for p in &hello.ports {
            let port = u16::try_from(p.port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| {
                    Status::invalid_argument(format!("port {} is out of range", p.port))
                })?;
            if !["auto", "http1", "http2", "grpc", "tcp"].contains(&p.protocol.as_str()) {
                return Err(Status::invalid_argument(format!(
                    "port {port}: protocol {:?} is not one of auto, http1, http2, grpc, tcp",
                    p.protocol
                )));
            }
            ports.push(PortInfo {
                port,
                protocol: p.protocol.clone(),
            });
        }
        if hello.labels.len() > 64
            || hello
                .labels
                .iter()
                .any(|(k, v)| k.is_empty() || k.len() > 253 || v.len() > 253)
        {
            return Err(Status::invalid_argument(
                "at most 64 labels; keys 1-253 bytes, values up to 253",
            ));
        }
        let address = if hello.address.is_empty() {
            remote
                .map(|r| r.ip().to_string())
                .ok_or_else(|| Status::invalid_argument("no address"))?
        } else {
            hello
                .address
                .parse::<IpAddr>()
                .map_err(|_| {
                    Status::invalid_argument(format!("address {:?} is not an IP", hello.address))
                })?
                .to_string()
        };
        Ok(Workload {
            instance: hello.instance.clone(),
            service: hello.service.clone(),
            namespace: identity.namespace.clone(),
            identity: identity.to_string(),
            address,
            ports,
            labels: hello.labels.clone().into_iter().collect(),
            ready: hello.ready,
            replica: self.replica.clone(),
            connected_at: now(),
            session: format!("{:016x}", fastrand::u64(..)),
        })
    }
}

/// One proxy's stream.
struct Session {
    store: Arc<Store>,
    compiled: watch::Receiver<Arc<Compiled>>,
    workload: Workload,
    status: SyncStatus,
    /// Fingerprint of the last snapshot sent (to tell real changes apart).
    last_sent: Option<u64>,
}

impl Session {
    async fn run(mut self, mut inbound: Streaming<ProxyMessage>, tx: mpsc::Sender<Snapshot>) {
        let instance = self.workload.instance.clone();
        self.compiled.mark_changed();
        loop {
            tokio::select! {
                r = self.compiled.changed() => {
                    if r.is_err() { break; }
                    let compiled = self.compiled.borrow_and_update().clone();
                    if !self.send(&compiled, &tx).await { break; }
                }
                msg = inbound.message() => match msg {
                    Ok(Some(ProxyMessage { message: Some(m) })) => self.received(m).await,
                    Ok(Some(_)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(instance = %instance, error = %e, "config stream broke");
                        break;
                    }
                },
            }
        }
        let _ = self
            .store
            .delete_ephemeral_if(&registry_key(&instance), &self.registered())
            .await;
        let _ = self
            .store
            .delete_ephemeral_if(&status_key(&instance), &self.status_json())
            .await;
        tracing::info!(instance = %instance, service = %self.workload.service, "proxy disconnected; endpoint removed");
    }

    /// Sends the proxy its snapshot if it changed. `false` when the proxy is gone.
    async fn send(&mut self, compiled: &Compiled, tx: &mpsc::Sender<Snapshot>) -> bool {
        let (snapshot, fingerprint) = compiled.for_proxy(&self.workload);
        if self.last_sent == Some(fingerprint) {
            return true;
        }
        if tx.send(snapshot).await.is_err() {
            return false;
        }
        self.last_sent = Some(fingerprint);
        self.status.sent = compiled.revision;
        self.save_status().await;
        true
    }

    async fn received(&mut self, m: Message) {
        match m {
            Message::Ack(ack) if ack.error.is_empty() => {
                self.status.acked = self.status.acked.max(ack.version);
            }
            Message::Ack(ack) => {
                tracing::warn!(instance = %self.workload.instance, version = ack.version, error = %ack.error, "proxy refused a config (NACK)");
                self.status.last_nack = Some(Nack {
                    version: ack.version,
                    error: ack.error.chars().take(2048).collect(),
                    at: now(),
                });
            }
            Message::Health(h) => {
                if h.ready != self.workload.ready {
                    self.workload.ready = h.ready;
                    tracing::info!(instance = %self.workload.instance, ready = h.ready, "workload readiness changed");
                    let _ = self
                        .store
                        .put_ephemeral(&registry_key(&self.workload.instance), self.registered())
                        .await;
                }
                return;
            }
            Message::Hello(_) => return,
        }
        self.save_status().await;
    }

    /// The registry value this session wrote.
    fn registered(&self) -> String {
        serde_json::to_string(&self.workload).unwrap_or_default()
    }

    fn status_json(&self) -> String {
        serde_json::to_string(&self.status).unwrap_or_default()
    }

    async fn save_status(&self) {
        if let Err(e) = self
            .store
            .put_ephemeral(&status_key(&self.workload.instance), self.status_json())
            .await
        {
            tracing::warn!(error = %e, "recording a proxy's sync status failed");
        }
    }
}

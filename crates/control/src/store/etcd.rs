//! The etcd store: keys under `/trellis/`, atomic commits as etcd transactions, ephemeral keys
//! on one lease per replica kept alive in the background, and one watch on the whole prefix
//! feeding the subscribers (so a change made through another replica wakes this one).

use super::{Entry, Op, StoreError, Watchers, EPHEMERAL_TTL};
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

const PREFIX: &str = "/trellis/";

/// See the module docs.
pub struct Etcd {
    endpoints: Vec<String>,
    shared: Arc<Shared>,
}

struct Shared {
    members: Members,
    watchers: Watchers,
    lease: AtomicI64,
    /// Ephemeral keys this replica holds, re-put when the lease has to be replaced.
    ephemeral: Mutex<BTreeMap<String, String>>,
    revision: std::sync::atomic::AtomicU64,
}

fn err(e: etcd_client::Error) -> StoreError {
    StoreError::Etcd(e.to_string())
}

/// Whether an etcd failure is worth another try (a member down, a leader election).
fn transient(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Unknown
        ),
        _ => false,
    }
}

/// One client per cluster member: a request goes to the current member, and a transient
/// failure moves to the next one (the client's own balancing keeps choosing a dead member).
struct Members {
    clients: Vec<Client>,
    current: std::sync::atomic::AtomicUsize,
}

impl Members {
    /// The current member's client and its index.
    fn client(&self) -> (usize, Client) {
        let i = self.current.load(Ordering::Relaxed) % self.clients.len();
        (i, self.clients[i].clone())
    }

    /// Moves past member `i` (unless another task already did).
    fn next(&self, i: usize) {
        let _ = self.current.compare_exchange(
            i,
            (i + 1) % self.clients.len(),
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// Runs `op` on a member, retrying transient failures on the next members for about
    /// three seconds.
    async fn retry<T, F, Fut>(&self, mut op: F) -> Result<T, StoreError>
    where
        F: FnMut(Client) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        let mut wait = Duration::from_millis(20);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            let (i, client) = self.client();
            match op(client).await {
                Ok(v) => return Ok(v),
                Err(e) if transient(&e) && tokio::time::Instant::now() + wait < deadline => {
                    tracing::debug!(error = %e, "etcd request failed; trying the next member");
                    self.next(i);
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_millis(400));
                }
                Err(e) => return Err(err(e)),
            }
        }
    }
}

fn key(k: &str) -> String {
    format!("{PREFIX}{k}")
}

fn revision_of(h: Option<&etcd_client::ResponseHeader>) -> u64 {
    h.map_or(0, |h| h.revision().max(0) as u64)
}

impl Etcd {
    /// Connects and starts the lease keeper and the watch.
    pub async fn connect(endpoints: &[String]) -> Result<Self, StoreError> {
        let opts = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2));
        let mut clients = Vec::new();
        for ep in endpoints {
            clients.push(
                Client::connect([ep.as_str()], Some(opts.clone()))
                    .await
                    .map_err(|e| StoreError::Etcd(format!("{ep}: {e}")))?,
            );
        }
        let members = Members {
            clients,
            current: Default::default(),
        };
        let status = members
            .retry(|c| async move { c.maintenance_client().status().await })
            .await
            .map_err(|e| StoreError::Etcd(format!("{}: {e}", endpoints.join(","))))?;
        let revision = revision_of(status.header());
        let lease = members
            .retry(|c| async move {
                c.lease_client()
                    .grant(EPHEMERAL_TTL.as_secs() as i64, None)
                    .await
            })
            .await?
            .id();
        let shared = Arc::new(Shared {
            members,
            watchers: Watchers::default(),
            lease: AtomicI64::new(lease),
            ephemeral: Mutex::new(BTreeMap::new()),
            revision: revision.into(),
        });
        tokio::spawn(keep_lease(shared.clone()));
        tokio::spawn(watch_all(shared.clone(), revision));
        Ok(Self {
            endpoints: endpoints.to_vec(),
            shared,
        })
    }

    pub(super) fn describe(&self) -> String {
        format!("etcd ({})", self.endpoints.join(","))
    }

    fn members(&self) -> &Members {
        &self.shared.members
    }

    pub(super) async fn get(&self, k: &str) -> Result<Option<Entry>, StoreError> {
        let resp = self
            .members()
            .retry(|c| async move { c.kv_client().get(key(k), None).await })
            .await?;
        Ok(resp.kvs().first().map(|kv| Entry {
            value: String::from_utf8_lossy(kv.value()).into_owned(),
            mod_revision: kv.mod_revision().max(0) as u64,
        }))
    }

    pub(super) async fn list(
        &self,
        prefix: &str,
    ) -> Result<(Vec<(String, Entry)>, u64), StoreError> {
        let resp = self
            .members()
            .retry(|c| async move {
                c.kv_client()
                    .get(key(prefix), Some(GetOptions::new().with_prefix()))
                    .await
            })
            .await?;
        let mut out: Vec<(String, Entry)> = resp
            .kvs()
            .iter()
            .map(|kv| {
                let k = String::from_utf8_lossy(kv.key());
                (
                    k.strip_prefix(PREFIX).unwrap_or(&k).to_string(),
                    Entry {
                        value: String::from_utf8_lossy(kv.value()).into_owned(),
                        mod_revision: kv.mod_revision().max(0) as u64,
                    },
                )
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok((out, revision_of(resp.header())))
    }

    pub(super) async fn commit(&self, ops: Vec<Op>) -> Result<u64, StoreError> {
        let txn_ops: Vec<TxnOp> = ops
            .iter()
            .map(|op| match op {
                Op::Put(k, v) => TxnOp::put(key(k), v.as_bytes(), None),
                Op::Delete(k) => TxnOp::delete(key(k), None),
            })
            .collect();
        {
            let mut eph = self
                .shared
                .ephemeral
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            for op in &ops {
                if let Op::Delete(k) = op {
                    eph.remove(k);
                }
            }
        }
        let resp = self
            .members()
            .retry(|c| {
                let txn = Txn::new().and_then(txn_ops.clone());
                async move { c.kv_client().txn(txn).await }
            })
            .await?;
        Ok(revision_of(resp.header()))
    }

    pub(super) async fn create(&self, values: Vec<(String, String)>) -> Result<bool, StoreError> {
        let when: Vec<Compare> = values
            .iter()
            .map(|(k, _)| Compare::create_revision(key(k), CompareOp::Equal, 0))
            .collect();
        let then: Vec<TxnOp> = values
            .iter()
            .map(|(k, v)| TxnOp::put(key(k), v.as_bytes(), None))
            .collect();
        let resp = self
            .members()
            .retry(|c| {
                let txn = Txn::new().when(when.clone()).and_then(then.clone());
                async move { c.kv_client().txn(txn).await }
            })
            .await?;
        Ok(resp.succeeded())
    }

    pub(super) async fn put_ephemeral(&self, k: &str, value: String) -> Result<(), StoreError> {
        self.shared
            .ephemeral
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(k.to_string(), value.clone());
        self.members()
            .retry(|c| {
                let lease = self.shared.lease.load(Ordering::Acquire);
                let value = value.clone();
                async move {
                    c.kv_client()
                        .put(key(k), value, Some(PutOptions::new().with_lease(lease)))
                        .await
                }
            })
            .await?;
        Ok(())
    }

    pub(super) async fn delete_if(&self, k: &str, value: &str) -> Result<(), StoreError> {
        {
            let mut eph = self
                .shared
                .ephemeral
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if eph.get(k).is_some_and(|v| v == value) {
                eph.remove(k);
            }
        }
        self.members()
            .retry(|c| {
                let txn = Txn::new()
                    .when([Compare::value(key(k), CompareOp::Equal, value.as_bytes())])
                    .and_then([TxnOp::delete(key(k), None)]);
                async move { c.kv_client().txn(txn).await }
            })
            .await?;
        Ok(())
    }

    pub(super) fn subscribe(&self, prefix: &str) -> watch::Receiver<u64> {
        let revision = self.shared.revision.load(Ordering::Acquire);
        self.shared.watchers.subscribe(prefix, revision)
    }

    pub(super) async fn health(&self) -> Result<String, StoreError> {
        let members = self
            .members()
            .retry(|c| async move { c.cluster_client().member_list().await })
            .await?;
        let status = self
            .members()
            .retry(|c| async move { c.maintenance_client().status().await })
            .await?;
        Ok(format!(
            "etcd {} ({} members, leader {:x}, revision {})",
            status.version(),
            members.members().len(),
            status.leader(),
            revision_of(status.header())
        ))
    }
}

/// Keeps this replica's lease alive; when it is lost (etcd unreachable for longer than its
/// TTL), grants a new one and puts the ephemeral keys back on it.
async fn keep_lease(shared: Arc<Shared>) {
    let period = EPHEMERAL_TTL / 3;
    loop {
        let (member, client) = shared.members.client();
        let id = shared.lease.load(Ordering::Acquire);
        let alive = async {
            let (mut keeper, mut stream) = client.lease_client().keep_alive(id).await?;
            loop {
                keeper.keep_alive().await?;
                match stream.message().await? {
                    Some(r) if r.ttl() > 0 => {}
                    _ => return Ok::<(), etcd_client::Error>(()),
                }
                tokio::time::sleep(period).await;
            }
        }
        .await;
        if let Err(e) = alive {
            tracing::warn!(error = %e, "etcd lease keep-alive failed; trying the next member");
            shared.members.next(member);
            tokio::time::sleep(period / 4).await;
            continue;
        }
        // Lease expired or the stream broke: make sure we hold a live lease.
        let ttl = client
            .lease_client()
            .time_to_live(id, None)
            .await
            .map(|r| r.ttl())
            .unwrap_or(-1);
        if ttl > 0 {
            continue;
        }
        match client
            .lease_client()
            .grant(EPHEMERAL_TTL.as_secs() as i64, None)
            .await
        {
            Ok(g) => {
                shared.lease.store(g.id(), Ordering::Release);
                let keys = shared
                    .ephemeral
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .clone();
                tracing::info!(keys = keys.len(), "etcd lease replaced; re-registering");
                for (k, v) in keys {
                    let _ = client
                        .kv_client()
                        .put(key(&k), v, Some(PutOptions::new().with_lease(g.id())))
                        .await;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot grant an etcd lease; retrying");
                tokio::time::sleep(period).await;
            }
        }
    }
}

/// Watches `/trellis/` and wakes the subscribers of every changed key. After a broken watch
/// it resumes from the last revision seen, or tells everyone to reload if that was compacted.
async fn watch_all(shared: Arc<Shared>, mut revision: u64) {
    loop {
        let (member, client) = shared.members.client();
        let opts = WatchOptions::new()
            .with_prefix()
            .with_start_revision(revision as i64 + 1);
        let result = async {
            let mut stream = client.watch_client().watch(PREFIX, Some(opts)).await?;
            while let Some(resp) = stream.message().await? {
                if resp.compact_revision() > 0 {
                    // Missed history: everyone reloads.
                    revision = resp.compact_revision().max(0) as u64;
                    shared.watchers.all(revision);
                    return Ok::<(), etcd_client::Error>(());
                }
                let rev = revision_of(resp.header());
                let keys: Vec<String> = resp
                    .events()
                    .iter()
                    .filter_map(|e| e.kv())
                    .map(|kv| {
                        let k = String::from_utf8_lossy(kv.key());
                        k.strip_prefix(PREFIX).unwrap_or(&k).to_string()
                    })
                    .collect();
                if !keys.is_empty() {
                    revision = revision.max(rev);
                    shared.revision.store(revision, Ordering::Release);
                    shared
                        .watchers
                        .changed(keys.iter().map(String::as_str), revision);
                }
            }
            Ok(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "etcd watch broke; resuming on the next member");
            shared.members.next(member);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

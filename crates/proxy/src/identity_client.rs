//! Obtaining and renewing the workload certificate from the control plane.
//!
//! The key pair is generated here, in memory, for every certificate; only the CSR travels.
//! The first certificate is bought with the join token, over TLS pinned to the CA the token
//! names. Renewals present the current certificate over mTLS instead (falling back to the
//! token if that fails), at about 70% of the lifetime with jitter, retrying with backoff
//! while the control plane is away; the current certificate keeps serving meanwhile.

use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tonic::Code;
use trellis_api::proto::identity::identity_client::IdentityClient;
use trellis_api::proto::identity::CertifyRequest;
use trellis_identity::csr::WorkloadKey;
use trellis_identity::tls::{pinned_client_config, CertInfo, ALPN_H2};
use trellis_identity::token::JoinToken;
use trellis_identity::{IdentityStore, SpiffeId};

/// The control plane's identity namespace and service account.
pub(crate) const CONTROL_NS: &str = "trellis-system";
pub(crate) const CONTROL_SA: &str = "trellis-control";

/// How to reach the control plane and prove who we are.
#[derive(Clone, Debug)]
pub struct ControlConfig {
    /// `host:port` of each control plane replica, tried in turn.
    pub addrs: Vec<String>,
    /// The join token.
    pub token: JoinToken,
    /// This proxy process's random id.
    pub instance: String,
    /// What to report as our address.
    pub address: String,
    /// Where the certificate (and the last config) are kept across restarts.
    pub state_dir: Option<std::path::PathBuf>,
}

/// Why a certificate could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum CertifyError {
    /// The control plane refused us for good (revoked or expired token, wrong identity).
    #[error("the control plane refused: {0}")]
    Refused(String),
    /// The control plane could not be reached or failed; worth retrying.
    #[error("{0}")]
    Unavailable(String),
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A gRPC channel to one control plane replica over `tls` (pinned or mTLS).
pub(crate) async fn channel(
    addr: &str,
    tls: Arc<rustls::ClientConfig>,
    request_timeout: Option<Duration>,
) -> Result<tonic::transport::Channel, String> {
    let target = addr.to_string();
    let connector = tower::service_fn(move |_uri: http::Uri| {
        let (target, tls) = (target.clone(), tls.clone());
        async move {
            let tcp = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(&target))
                .await
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")
                })??;
            let _ = tcp.set_nodelay(true);
            let name =
                rustls::pki_types::ServerName::try_from("trellis-control.trellis-system.mesh")
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
            let io = TlsConnector::from(tls).connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(io))
        }
    });
    let mut endpoint = tonic::transport::Endpoint::from_static("http://trellis-control")
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5));
    if let Some(t) = request_timeout {
        endpoint = endpoint.timeout(t);
    }
    endpoint
        .connect_with_connector(connector)
        .await
        .map_err(|e| format!("{addr}: {e}: {}", source_chain(&e)))
}

/// One Certify call against one replica.
async fn certify_once(
    addr: &str,
    tls: Arc<rustls::ClientConfig>,
    request: CertifyRequest,
) -> Result<trellis_api::proto::identity::CertifyResponse, CertifyError> {
    let channel = channel(addr, tls, Some(Duration::from_secs(10)))
        .await
        .map_err(CertifyError::Unavailable)?;
    match IdentityClient::new(channel).certify(request).await {
        Ok(r) => Ok(r.into_inner()),
        Err(s) => match s.code() {
            Code::PermissionDenied | Code::InvalidArgument | Code::Unauthenticated => {
                Err(CertifyError::Refused(s.message().to_string()))
            }
            _ => Err(CertifyError::Unavailable(format!(
                "{addr}: {}",
                s.message()
            ))),
        },
    }
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = Vec::new();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push(s.to_string());
        cur = s.source();
    }
    out.join(": ")
}

/// Gets a certificate for `id` and installs it in `store`. Uses the current certificate
/// (mTLS) when the store has a valid one, else the token.
pub async fn certify(
    cfg: &ControlConfig,
    id: &SpiffeId,
    store: &Arc<IdentityStore>,
) -> Result<CertInfo, CertifyError> {
    let key = WorkloadKey::generate()
        .map_err(|e| CertifyError::Refused(format!("generating a key: {e}")))?;
    let csr = key
        .csr_pem(id)
        .map_err(|e| CertifyError::Refused(format!("building the CSR: {e}")))?;
    let control_id = SpiffeId::new(&id.trust_domain, CONTROL_NS, CONTROL_SA)
        .map_err(|e| CertifyError::Refused(e.to_string()))?;
    let renewing = store.info().is_some_and(|i| i.not_after > now());
    let mut last = CertifyError::Unavailable("no control plane address".into());
    for addr in &cfg.addrs {
        // Prefer mTLS with the current certificate; the token is the fallback and the start.
        let mut attempts = Vec::new();
        if renewing {
            attempts.push((
                store.client_config(Some(control_id.clone()), &[ALPN_H2]),
                String::new(),
            ));
        }
        attempts.push((
            pinned_client_config(&cfg.token.ca_pin, control_id.clone(), &[ALPN_H2]),
            cfg.token.to_string(),
        ));
        for (tls, token) in attempts {
            let request = CertifyRequest {
                token,
                csr_pem: csr.clone(),
                instance: cfg.instance.clone(),
                address: cfg.address.clone(),
            };
            match certify_once(addr, tls, request).await {
                Ok(resp) => {
                    let info = store
                        .install_der(&resp.chain_pem, key.private_key_der(), &resp.bundle_pem)
                        .map_err(|e| {
                            CertifyError::Unavailable(format!(
                                "{addr} sent an unusable certificate: {e}"
                            ))
                        })?;
                    if &info.identity != id {
                        return Err(CertifyError::Refused(format!(
                            "the control plane issued {} instead of {id}",
                            info.identity
                        )));
                    }
                    if let Some(dir) = &cfg.state_dir {
                        save_certificate(
                            dir,
                            &resp.chain_pem,
                            &key.private_key_pem(),
                            &resp.bundle_pem,
                        );
                    }
                    return Ok(info);
                }
                Err(e) => last = e,
            }
        }
    }
    Err(last)
}

/// Backoff between attempts: 0.5 s doubling to 30 s, with jitter.
pub(crate) fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(500).saturating_mul(1 << attempt.min(6));
    let capped = base.min(Duration::from_secs(30));
    capped.mul_f64(0.8 + fastrand::f64() * 0.4)
}

/// Gets the first certificate, retrying while the control plane is unreachable. Returns an
/// error only when the control plane refuses for good, or on `cancel`.
pub async fn first_certificate(
    cfg: &ControlConfig,
    id: &SpiffeId,
    store: &Arc<IdentityStore>,
    cancel: &CancellationToken,
) -> Result<CertInfo, CertifyError> {
    let mut attempt = 0;
    loop {
        match certify(cfg, id, store).await {
            Ok(info) => return Ok(info),
            Err(e @ CertifyError::Refused(_)) => return Err(e),
            Err(e) => {
                let wait = backoff(attempt);
                tracing::warn!(error = %e, retry_in = ?wait, "cannot obtain a certificate yet");
                attempt += 1;
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = cancel.cancelled() => return Err(CertifyError::Unavailable("stopped".into())),
                }
            }
        }
    }
}

/// When to renew a certificate issued now and expiring at `not_after`: at 70% of its
/// lifetime, give or take 5% of it.
fn renew_in(not_after: u64) -> Duration {
    let lifetime = not_after.saturating_sub(now()) as f64;
    Duration::from_secs_f64((lifetime * (0.65 + fastrand::f64() * 0.10)).max(1.0))
}

/// Renews forever in the background.
pub async fn renew_forever(
    cfg: ControlConfig,
    id: SpiffeId,
    store: Arc<IdentityStore>,
    first: CertInfo,
) {
    let mut wait = renew_in(first.not_after);
    loop {
        tokio::time::sleep(wait).await;
        let mut attempt = 0;
        loop {
            match certify(&cfg, &id, &store).await {
                Ok(info) => {
                    tracing::info!(identity = %info.identity, serial = %info.serial, not_after = info.not_after, "certificate renewed");
                    wait = renew_in(info.not_after);
                    break;
                }
                Err(e) => {
                    let left = store
                        .info()
                        .map_or(0, |i| i.not_after.saturating_sub(now()));
                    let retry = if left > 0 {
                        backoff(attempt).min(Duration::from_secs(left))
                    } else {
                        backoff(attempt)
                    };
                    tracing::warn!(error = %e, expires_in_s = left, retry_in = ?retry, "certificate renewal failed; serving with the current one");
                    attempt += 1;
                    tokio::time::sleep(retry).await;
                }
            }
        }
    }
}

/// Keeps the certificate in the state directory so a restart can serve without the control
/// plane. Failures are logged: the certificate in memory still works.
fn save_certificate(dir: &std::path::Path, chain: &str, key: &str, bundle: &str) {
    use crate::pushed::state_dir::{write, BUNDLE, CERT, KEY};
    let result = write(dir, KEY, key.as_bytes(), true)
        .and_then(|()| write(dir, BUNDLE, bundle.as_bytes(), false))
        .and_then(|()| write(dir, CERT, chain.as_bytes(), false));
    if let Err(e) = result {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot save the certificate in the state directory");
    }
}

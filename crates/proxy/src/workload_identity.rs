//! Where the workload's identity comes from: static files in the bootstrap, or the control
//! plane (`--control`/`--token`), and the inbound mTLS default that follows from having one.

use crate::config::{Bootstrap, MtlsMode};
use crate::identity_client::{self, ControlConfig};
use crate::ProxyError;
use std::sync::Arc;
use trellis_identity::IdentityStore;

/// The workload identity, if the proxy has one. With a control plane this waits for the first
/// certificate (retrying while the control plane is away) and starts the renewal loop.
pub async fn obtain(
    boot: &Bootstrap,
    control: Option<&ControlConfig>,
) -> Result<Option<Arc<IdentityStore>>, ProxyError> {
    let Some(control) = control else {
        return load_identity(boot);
    };
    if boot.identity.is_some() {
        return Err(ProxyError::Identity(
            "use either identity files or a control plane, not both".into(),
        ));
    }
    let id = boot.spiffe_id().ok_or_else(|| {
        ProxyError::Identity("service, namespace or service account is not a valid identity".into())
    })?;
    let store = IdentityStore::new();
    let saved = control
        .state_dir
        .as_deref()
        .and_then(|dir| load_saved(dir, &id, &store));
    let first = match saved {
        Some(info) => {
            tracing::info!(identity = %info.identity, serial = %info.serial, not_after = info.not_after, "serving with the certificate from the state directory; renewing in the background");
            info
        }
        None => {
            let never = tokio_util::sync::CancellationToken::new();
            let first = identity_client::first_certificate(control, &id, &store, &never)
                .await
                .map_err(|e| ProxyError::Identity(e.to_string()))?;
            tracing::info!(identity = %first.identity, serial = %first.serial, not_after = first.not_after, "workload certificate obtained from the control plane");
            first
        }
    };
    tokio::spawn(identity_client::renew_forever(
        control.clone(),
        id,
        store.clone(),
        first,
    ));
    Ok(Some(store))
}

/// The inbound mode when no PeerAuthentication says otherwise: the bootstrap's `mtls:`, else
/// STRICT with an identity and DISABLE without one.
pub fn default_mode(boot: &Bootstrap, has_identity: bool) -> Result<MtlsMode, ProxyError> {
    match (boot.mtls, has_identity) {
        (Some(MtlsMode::Disable), _) => Ok(MtlsMode::Disable),
        (Some(mode), true) => Ok(mode),
        (Some(mode), false) => Err(ProxyError::Identity(format!(
            "mtls: {mode:?} needs a workload identity (identity: files, or a control plane)"
        ))),
        (None, true) => Ok(MtlsMode::Strict),
        (None, false) => {
            tracing::warn!("no workload identity: inbound accepts plaintext only (mtls DISABLE)");
            Ok(MtlsMode::Disable)
        }
    }
}

/// The static identity of the bootstrap file, checked against this workload's name.
fn load_identity(boot: &Bootstrap) -> Result<Option<Arc<IdentityStore>>, ProxyError> {
    let Some(files) = &boot.identity else {
        return Ok(None);
    };
    let read = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .map_err(|e| ProxyError::Identity(format!("{}: {e}", p.display())))
    };
    let store = IdentityStore::new();
    let info = store
        .install(
            &read(&files.cert)?,
            &read(&files.key)?,
            &read(&files.trust_bundle)?,
        )
        .map_err(|e| ProxyError::Identity(format!("{}: {e}", files.cert.display())))?;
    if let Some(me) = boot.spiffe_id() {
        if info.identity != me {
            return Err(ProxyError::Identity(format!(
                "{} holds {}, but this workload is {me}",
                files.cert.display(),
                info.identity
            )));
        }
    }
    tracing::info!(identity = %info.identity, not_after = info.not_after, "workload identity loaded");
    Ok(Some(store))
}

/// The certificate saved in the state directory, installed in `store`, if it is this
/// workload's and has more than a minute left.
fn load_saved(
    dir: &std::path::Path,
    id: &trellis_identity::SpiffeId,
    store: &Arc<IdentityStore>,
) -> Option<trellis_identity::tls::CertInfo> {
    use crate::pushed::state_dir::{BUNDLE, CERT, KEY};
    let read = |name| std::fs::read_to_string(dir.join(name)).ok();
    let (cert, key, bundle) = (read(CERT)?, read(KEY)?, read(BUNDLE)?);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    match store.install(&cert, &key, &bundle) {
        Ok(info) if &info.identity == id && info.not_after > now + 60 => Some(info),
        Ok(info) => {
            tracing::info!(identity = %info.identity, not_after = info.not_after, "the saved certificate is not usable (other identity or expiring); asking the control plane");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "the saved certificate does not load; asking the control plane");
            None
        }
    }
}

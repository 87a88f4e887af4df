//! The identity service (gRPC over TLS): workloads trade a join token, or their current
//! certificate, plus a CSR for a workload certificate.

use crate::state::{State, StateError, TokenRefusal};
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};
use trellis_api::proto::identity::identity_server::Identity;
use trellis_api::proto::identity::{CertifyRequest, CertifyResponse};
use trellis_identity::ca::CaError;
use trellis_identity::SpiffeId;

/// What the TLS layer learned about the caller (a tonic connection extension).
#[derive(Clone, Debug, Default)]
pub struct PeerInfo {
    /// The client's address.
    pub remote: Option<std::net::SocketAddr>,
    /// The SPIFFE ID of a verified client certificate, if one was presented.
    pub identity: Option<SpiffeId>,
}

/// The `trellis.identity.v1.Identity` service.
pub struct IdentityService {
    /// Durable state: CA, tokens, ledger.
    pub state: Arc<State>,
    /// Lifetime of workload certificates.
    pub cert_ttl: Duration,
}

fn refusal_status(r: TokenRefusal) -> Status {
    match r {
        TokenRefusal::Malformed => Status::invalid_argument(r.to_string()),
        TokenRefusal::Unknown(_) => Status::unauthenticated(r.to_string()),
        TokenRefusal::Revoked(_) | TokenRefusal::Expired(_) => {
            Status::permission_denied(r.to_string())
        }
        TokenRefusal::Unavailable(_) => Status::unavailable(r.to_string()),
    }
}

#[tonic::async_trait]
impl Identity for IdentityService {
    async fn certify(
        &self,
        request: Request<CertifyRequest>,
    ) -> Result<Response<CertifyResponse>, Status> {
        let info = request
            .extensions()
            .get::<PeerInfo>()
            .cloned()
            .unwrap_or_default();
        let (peer, tls_peer) = (info.remote, info.identity);
        let req = request.into_inner();
        if req.csr_pem.len() > 16 * 1024 {
            return Err(Status::invalid_argument("CSR too large"));
        }
        let (allowed, token_id) = if !req.token.is_empty() {
            let (id, rec) = self
                .state
                .check_token(&req.token)
                .await
                .map_err(refusal_status)?;
            (id, rec.id)
        } else if let Some(id) = tls_peer {
            // A renewal: the certificate proves the identity; the token it joined with must
            // not have been revoked since.
            let token = self
                .state
                .renewal_token(&req.instance, &id)
                .await
                .map_err(refusal_status)?;
            (id, token.id)
        } else {
            return Err(Status::unauthenticated(
                "a join token, or a valid mesh certificate presented over mTLS, is required",
            ));
        };
        let ttl = self.cert_ttl;
        let address = if req.address.is_empty() {
            peer.map(|p| p.to_string()).unwrap_or_default()
        } else {
            req.address
        };
        let result = self
            .state
            .certify(
                &req.csr_pem,
                &allowed,
                ttl,
                &req.instance,
                &address,
                &token_id,
            )
            .await;
        match result {
            Ok((issued, bundle)) => {
                tracing::info!(identity = %issued.id, serial = %issued.serial, not_after = issued.not_after, "issued a workload certificate");
                Ok(Response::new(CertifyResponse {
                    chain_pem: issued.chain_pem,
                    bundle_pem: bundle,
                    not_after: issued.not_after,
                    identity: issued.id.to_string(),
                }))
            }
            Err(StateError::Ca(e @ CaError::WrongIdentity { .. })) => {
                tracing::warn!(error = %e, "refused a CSR");
                Err(Status::permission_denied(e.to_string()))
            }
            Err(StateError::Invalid(m)) => Err(Status::invalid_argument(m)),
            Err(StateError::Ca(e @ CaError::BadCsr(_))) => {
                Err(Status::invalid_argument(e.to_string()))
            }
            Err(e) => {
                tracing::error!(error = %e, "certify failed");
                Err(Status::internal(e.to_string()))
            }
        }
    }
}

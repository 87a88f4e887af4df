//! The control plane's HTTP API (JSON), used by the `trellis` CLI. Listens on loopback by
//! default; it can mint tokens, so do not expose it.

use crate::state::{now, State, StateError};
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::{json, Value};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use trellis_api::duration::Duration as ConfigDuration;

/// What the API handlers share.
pub struct Api {
    /// Durable state.
    pub state: Arc<State>,
    /// Applied resources.
    pub resources: Arc<crate::resources::ResourceStore>,
    /// Told when the CA changed, so the serving certificate is re-issued.
    pub ca_changed: Arc<Notify>,
    /// Default join token lifetime.
    pub default_token_ttl: Duration,
    /// Validity of roots created by a rotation.
    pub ca_validity: Duration,
}

/// Serves the API until `shutdown`.
pub async fn serve(listener: TcpListener, api: Arc<Api>, shutdown: CancellationToken) {
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "API accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let api = api.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let api = api.clone();
                async move { Ok::<_, Infallible>(route(&api, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn reply(status: StatusCode, body: Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn error(status: StatusCode, msg: impl std::fmt::Display) -> Response<Full<Bytes>> {
    reply(status, json!({ "error": msg.to_string() }))
}

async fn body_json<T: for<'de> Deserialize<'de>>(
    req: Request<Incoming>,
) -> Result<T, Response<Full<Bytes>>> {
    body_json_limited(req, 64 * 1024).await
}

async fn body_json_limited<T: for<'de> Deserialize<'de>>(
    req: Request<Incoming>,
    limit: usize,
) -> Result<T, Response<Full<Bytes>>> {
    let bytes = Limited::new(req.into_body(), limit)
        .collect()
        .await
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("reading the body: {e}")))?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    service: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    service_account: Option<String>,
    #[serde(default)]
    ttl: Option<ConfigDuration>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Rotate {
    step: String,
}

fn state_error(e: StateError) -> Response<Full<Bytes>> {
    match e {
        StateError::Invalid(m) => error(StatusCode::BAD_REQUEST, m),
        other => error(StatusCode::INTERNAL_SERVER_ERROR, other),
    }
}

async fn route(api: &Api, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match (req.method().clone(), segments.as_slice()) {
        (Method::GET, ["api", "v1", "health"]) => match api.state.store().health().await {
            Ok(store) => reply(
                StatusCode::OK,
                json!({ "status": "ok", "trust_domain": api.state.trust_domain(), "store": store }),
            ),
            Err(e) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({ "status": "store unavailable", "error": e.to_string(), "trust_domain": api.state.trust_domain(), "store": api.state.store().describe() }),
            ),
        },
        (Method::GET, ["api", "v1", "status"]) => match crate::ops::status(api).await {
            Ok(v) => reply(StatusCode::OK, v),
            Err(e) => state_error(e),
        },
        (Method::GET, ["api", "v1", "backup"]) => match crate::ops::backup(api).await {
            Ok(v) => reply(StatusCode::OK, v),
            Err(e) => state_error(e),
        },
        (Method::POST, ["api", "v1", "restore"]) => {
            let force = query(&req).get("force").is_some_and(|v| v == "true");
            let archive: crate::ops::Backup = match body_json_limited(req, 256 << 20).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            match crate::ops::restore(api, archive, force).await {
                Ok(v) => reply(StatusCode::OK, v),
                Err(e) => state_error(e),
            }
        }
        (Method::POST, ["api", "v1", "tokens"]) => {
            let new: NewToken = match body_json(req).await {
                Ok(n) => n,
                Err(r) => return r,
            };
            let ttl = new.ttl.map_or(api.default_token_ttl, |d| d.0);
            let ns = new.namespace.as_deref().unwrap_or("default");
            match api
                .state
                .create_token(&new.service, ns, new.service_account.as_deref(), ttl)
                .await
            {
                Ok((token, rec)) => reply(
                    StatusCode::CREATED,
                    json!({
                        "token": token,
                        "id": rec.id,
                        "identity": format!("spiffe://{}/ns/{}/sa/{}", api.state.trust_domain(), rec.namespace, rec.service_account),
                        "expires_at": rec.expires_at,
                    }),
                ),
                Err(e) => state_error(e),
            }
        }
        (Method::GET, ["api", "v1", "tokens"]) => {
            let tokens = match api.state.tokens().await {
                Ok(t) => t,
                Err(e) => return state_error(e),
            };
            let tokens: Vec<Value> = tokens
                .into_iter()
                .map(|t| {
                    json!({
                        "id": t.id, "service": t.service, "namespace": t.namespace,
                        "service_account": t.service_account, "created_at": t.created_at,
                        "expires_at": t.expires_at, "revoked": t.revoked,
                        "expired": now() >= t.expires_at,
                    })
                })
                .collect();
            reply(StatusCode::OK, json!({ "tokens": tokens }))
        }
        (Method::DELETE, ["api", "v1", "tokens", id]) => match api.state.revoke_token(id).await {
            Ok(rec) => reply(StatusCode::OK, json!({ "id": rec.id, "revoked": true })),
            Err(StateError::Invalid(m)) => error(StatusCode::NOT_FOUND, m),
            Err(e) => state_error(e),
        },
        (Method::GET, ["api", "v1", "certs"]) => {
            let ca = api.state.with_ca(|ca| {
                json!({
                    "pin": ca.pin(),
                    "not_after": ca.not_after(),
                    "trust_roots": ca.bundle().len(),
                })
            });
            let (rotation, workloads) =
                match (api.state.rotation_phase().await, api.state.certs().await) {
                    (Ok(r), Ok(w)) => (r, w),
                    (Err(e), _) | (_, Err(e)) => return state_error(e),
                };
            reply(
                StatusCode::OK,
                json!({
                    "now": now(),
                    "ca": ca,
                    "rotation": rotation,
                    "workloads": workloads,
                }),
            )
        }
        (Method::POST, ["api", "v1", "ca", "rotate"]) => {
            let r: Rotate = match body_json(req).await {
                Ok(r) => r,
                Err(resp) => return resp,
            };
            match api.state.rotate(&r.step, api.ca_validity).await {
                Ok(phase) => {
                    api.ca_changed.notify_one();
                    let (pin, roots) = api.state.with_ca(|ca| (ca.pin(), ca.bundle().len()));
                    reply(
                        StatusCode::OK,
                        json!({ "phase": phase, "signing_pin": pin, "trust_roots": roots }),
                    )
                }
                Err(e) => state_error(e),
            }
        }
        (Method::POST, ["api", "v1", "resources"]) => apply(api, req).await,
        (Method::GET, ["api", "v1", "resources"]) => {
            let q = query(&req);
            let listed = api
                .resources
                .list(
                    q.get("kind").map(String::as_str),
                    q.get("namespace").map(String::as_str),
                    q.get("name").map(String::as_str),
                )
                .await;
            match (listed, api.resources.version().await) {
                (Ok(items), Ok(version)) => reply(
                    StatusCode::OK,
                    json!({ "version": version, "items": items }),
                ),
                (Err(e), _) | (_, Err(e)) => state_error(e),
            }
        }
        (Method::DELETE, ["api", "v1", "resources", kind, namespace, name]) => {
            match api.resources.delete(kind, namespace, name).await {
                Ok(true) => reply(
                    StatusCode::OK,
                    json!({ "deleted": format!("{kind}/{namespace}/{name}"), "version": api.resources.version().await.unwrap_or(0) }),
                ),
                Ok(false) => error(
                    StatusCode::NOT_FOUND,
                    format!("{kind}/{namespace}/{name} not found"),
                ),
                Err(e) => state_error(e),
            }
        }
        _ => error(
            StatusCode::NOT_FOUND,
            format!("no such endpoint: {} {path}", req.method()),
        ),
    }
}

fn query(req: &Request<Incoming>) -> std::collections::HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `POST /api/v1/resources[?dryRun=true]`: a YAML file (multi-document). The file name for
/// error messages comes from the `x-trellis-file` header. All or nothing: one invalid
/// document rejects the whole request and nothing changes.
async fn apply(api: &Api, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let dry_run = query(&req).get("dryRun").is_some_and(|v| v == "true");
    let file = req
        .headers()
        .get("x-trellis-file")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("request")
        .to_string();
    let bytes = match Limited::new(req.into_body(), 4 * 1024 * 1024)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => return error(StatusCode::BAD_REQUEST, format!("reading the body: {e}")),
    };
    let Ok(text) = std::str::from_utf8(&bytes) else {
        return error(StatusCode::BAD_REQUEST, "the body is not UTF-8 text");
    };
    let (loaded, errors) = trellis_api::resources::parse(std::path::Path::new(&file), text);
    if !errors.is_empty() {
        let messages: Vec<String> = errors.iter().map(|e| e.to_string()).collect();
        return reply(
            StatusCode::BAD_REQUEST,
            json!({ "error": messages.join("\n"), "errors": messages }),
        );
    }
    match api.resources.apply(&loaded, dry_run).await {
        Ok((changes, version)) => reply(
            StatusCode::OK,
            json!({ "dry_run": dry_run, "version": version, "changes": changes }),
        ),
        Err(e) => state_error(e),
    }
}

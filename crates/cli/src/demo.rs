//! `trellis demo`: an education platform on a real mesh.
//!
//! A `trellis control` process (CA, identity, discovery, config push), and six services, each
//! a tiny built-in HTTP app behind its own `trellis proxy` process that joined with a token,
//! registered itself and talks mTLS to the others: `frontend` calls `user-authentication`,
//! `user-profile`, `content-delivery`, `exam-engine` and `scoring-service`, found through the
//! registry (no endpoint is configured anywhere). The mesh policies — mTLS, who may read scores
//! (AuthorizationPolicy), exam-call timeout and retries (VirtualService) — are Istio YAML
//! applied to the control plane and pushed to the proxies. A gentle load generator calls the
//! frontend.
//! Ctrl-C (or `--duration`) stops everything cleanly.

use crate::api_client::call;
use anyhow::{bail, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration as StdDuration, Instant};
use tokio::net::{TcpListener, TcpStream};
use trellis_api::duration::Duration;

/// `trellis demo` options.
#[derive(clap::Args)]
pub struct DemoArgs {
    /// Stop by itself after this long (default: run until Ctrl-C).
    #[arg(long)]
    duration: Option<Duration>,
    /// Requests per second from the load generator.
    #[arg(long, default_value_t = 5)]
    rps: u32,
}

/// The services the frontend calls.
const BACKENDS: [&str; 5] = [
    "user-authentication",
    "user-profile",
    "content-delivery",
    "exam-engine",
    "scoring-service",
];
const NAMESPACE: &str = "edtech";

const MESH_POLICIES: &str = "\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: default
  namespace: istio-system
spec:
  mtls:
    mode: STRICT
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: frontend-edge
  namespace: edtech
spec:
  selector:
    matchLabels:
      app: frontend
  mtls:
    mode: PERMISSIVE
---
# Scores are read by the frontend only: any other identity gets 403.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: scores-readers
  namespace: edtech
spec:
  selector:
    matchLabels:
      app: scoring-service
  action: ALLOW
  rules:
  - from: [{ source: { principals: [cluster.local/ns/edtech/sa/frontend] } }]
    to: [{ operation: { methods: [GET] } }]
---
# Exam calls get a 2 s budget and up to two retries on gateway errors.
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: exam-engine
  namespace: edtech
spec:
  hosts: [exam-engine]
  http:
  - name: exams
    timeout: 2s
    retries: { attempts: 2, perTryTimeout: 500ms, retryOn: \"gateway-error,connect-failure\" }
    route: [{ destination: { host: exam-engine } }]
";

fn free_port() -> anyhow::Result<SocketAddr> {
    // Bound and released; never the same port twice (the kernel may hand it out again).
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let addr = StdListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .context("finding a free port")?;
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&addr.port()) {
            given.push(addr.port());
            return Ok(addr);
        }
    }
}

/// A child process of ours, stopped with SIGTERM (graceful drain) when dropped.
struct Child_ {
    name: String,
    child: Child,
}

impl Child_ {
    fn spawn(name: &str, dir: &Path, args: &[String]) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating the trellis binary")?;
        let log = std::fs::File::create(dir.join(format!("{name}.log")))?;
        let child = Command::new(exe)
            .args(args)
            .env(
                "TRELLIS_LOG",
                std::env::var("TRELLIS_DEMO_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self {
            name: name.to_string(),
            child,
        })
    }
}

impl Drop for Child_ {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + StdDuration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(StdDuration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        eprintln!("{} did not stop in time; killed", self.name);
    }
}

/// Sends one HTTP/1.1 request on a fresh connection and returns (status, body).
async fn http_get(addr: SocketAddr, target: &str, host: &str) -> anyhow::Result<(u16, Bytes)> {
    let stream = TcpStream::connect(addr).await?;
    let (mut tx, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let req = Request::get(target)
        .header("host", host)
        .body(Full::new(Bytes::new()))?;
    let resp = tokio::time::timeout(StdDuration::from_secs(5), tx.send_request(req)).await??;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

async fn serve_app<F, Fut>(listener: TcpListener, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send,
{
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let h = handler.clone();
        tokio::spawn(async move {
            let svc = service_fn(move |req| {
                let h = h.clone();
                async move { Ok::<_, Infallible>(h(req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn json_response(status: u16, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
    r
}

async fn wait_until(what: &str, mut ok: impl AsyncFnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + StdDuration::from_secs(30);
    while Instant::now() < deadline {
        if ok().await {
            return Ok(());
        }
        tokio::time::sleep(StdDuration::from_millis(50)).await;
    }
    bail!("{what} within 30s (logs are in the demo directory)")
}

/// One service of the demo: its app, proxy and addresses.
struct Service {
    name: &'static str,
    admin: SocketAddr,
    inbound: SocketAddr,
    app: TcpListener,
}

impl Service {
    async fn new(name: &'static str) -> anyhow::Result<Self> {
        Ok(Self {
            name,
            admin: free_port()?,
            inbound: free_port()?,
            app: TcpListener::bind("127.0.0.1:0").await?,
        })
    }

    /// The proxy's bootstrap: who it is and its ports. Where the other services are, and
    /// the mTLS policy, come from the control plane.
    fn bootstrap(&self, outbound: Option<SocketAddr>) -> anyhow::Result<String> {
        Ok(format!(
            "service: {}\nnamespace: {NAMESPACE}\nlabels: {{ app: {}, version: v1 }}\nadmin: {}\n\
             outbound: {{ listen: {} }}\n\
             inbound:\n  - listen: {}\n    app: {}\n\
             readiness_path: /healthz\n",
            self.name,
            self.name,
            self.admin,
            outbound.map_or("null".into(), |a| a.to_string()),
            self.inbound,
            self.app.local_addr()?,
        ))
    }
}

/// Runs the demo until Ctrl-C or `--duration`.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_async(args))
}

async fn start_proxy(
    svc: &Service,
    yaml: String,
    dir: &Path,
    api: &str,
    grpc: SocketAddr,
) -> anyhow::Result<Child_> {
    let created = call(
        api,
        "POST",
        "/api/v1/tokens",
        Some(serde_json::json!({ "service": svc.name, "namespace": NAMESPACE, "ttl": "1h" })),
    )
    .await?;
    let token_file: PathBuf = dir.join(format!("{}.token", svc.name));
    std::fs::write(&token_file, created["token"].as_str().unwrap_or_default())?;
    let config = dir.join(format!("{}.yaml", svc.name));
    std::fs::write(&config, yaml)?;
    Child_::spawn(
        svc.name,
        dir,
        &[
            "proxy".into(),
            "--config".into(),
            config.display().to_string(),
            "--control".into(),
            grpc.to_string(),
            "--token".into(),
            token_file.display().to_string(),
            "--state-dir".into(),
            dir.join(format!("{}-state", svc.name))
                .display()
                .to_string(),
            "--drain-timeout".into(),
            "2s".into(),
        ],
    )
}

async fn run_async(args: DemoArgs) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("trellis-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let (grpc, http) = (free_port()?, free_port()?);
    let api = http.to_string();
    let control = Child_::spawn(
        "control",
        &dir,
        &[
            "control".into(),
            "--state-dir".into(),
            dir.join("control-state").display().to_string(),
            "--grpc".into(),
            grpc.to_string(),
            "--http".into(),
            api.clone(),
        ],
    )?;
    wait_until("the control plane did not start", async || {
        call(&api, "GET", "/api/v1/health", None).await.is_ok()
    })
    .await?;

    let mut backends = Vec::new();
    for name in BACKENDS {
        backends.push(Service::new(name).await?);
    }
    let frontend = Service::new("frontend").await?;
    let frontend_out = free_port()?;
    // Istio YAML, as a team would keep it in Git: mTLS STRICT mesh-wide, except that the
    // frontend, the edge of the platform, also takes plaintext from browsers; only the
    // frontend may read scores; exam calls are bounded and retried. Applied to the control
    // plane, which pushes each proxy what concerns it.
    let policies = dir.join("mesh-policies.yaml");
    std::fs::write(&policies, MESH_POLICIES)?;
    let (code, answer) = crate::api_client::call_raw(
        &api,
        "POST",
        "/api/v1/resources",
        Some("mesh-policies.yaml"),
        MESH_POLICIES.to_string(),
    )
    .await
    .context("applying the mesh policies")?;
    if code != 200 {
        bail!("applying the mesh policies: {answer}");
    }
    let mut proxies = Vec::new();
    for b in &backends {
        proxies.push(start_proxy(b, b.bootstrap(None)?, &dir, &api, grpc).await?);
    }
    let yaml = frontend.bootstrap(Some(frontend_out))?;
    proxies.push(start_proxy(&frontend, yaml, &dir, &api, grpc).await?);

    // The apps: each backend answers with a small JSON document; the frontend calls them all
    // through its proxy, as an unmodified app using http_proxy would.
    let mut admins = Vec::new();
    for b in backends {
        let name = b.name;
        admins.push((name, b.admin));
        tokio::spawn(serve_app(b.app, move |req: Request<Incoming>| async move {
            json_response(
                200,
                serde_json::json!({ "service": name, "path": req.uri().path() }),
            )
        }));
    }
    admins.push(("frontend", frontend.admin));
    tokio::spawn(serve_app(
        frontend.app,
        move |req: Request<Incoming>| async move {
            if req.uri().path() == "/healthz" {
                return json_response(200, serde_json::json!({ "ready": true }));
            }
            let mut parts = serde_json::Map::new();
            for name in BACKENDS {
                let target = format!("http://{name}.{NAMESPACE}/api/v1/student/7");
                match http_get(frontend_out, &target, &format!("{name}.{NAMESPACE}")).await {
                    Ok((200, body)) => {
                        parts.insert(
                            name.into(),
                            serde_json::from_slice(&body).unwrap_or_default(),
                        );
                    }
                    Ok((code, _)) => {
                        return json_response(
                            502,
                            serde_json::json!({ "error": format!("{name} answered {code}") }),
                        )
                    }
                    Err(e) => {
                        return json_response(
                            502,
                            serde_json::json!({ "error": format!("{name}: {e}") }),
                        )
                    }
                }
            }
            json_response(
                200,
                serde_json::json!({ "page": "dashboard", "parts": parts }),
            )
        },
    ));
    for (name, admin) in &admins {
        wait_until(&format!("the {name} proxy was not ready"), async || {
            matches!(http_get(*admin, "/ready", "localhost").await, Ok((200, _)))
        })
        .await?;
    }
    wait_until("the six proxies did not register and sync", async || {
        let Ok(st) = call(&api, "GET", "/api/v1/status", None).await else {
            return false;
        };
        let proxies = st["proxies"].as_array().cloned().unwrap_or_default();
        proxies.len() == 6
            && proxies
                .iter()
                .all(|p| p["in_sync"] == true && p["ready"] == true)
    })
    .await?;

    println!("Trellis demo is running: a control plane and six services, mTLS between every pair.");
    println!(
        "  mesh policies (Istio YAML):         {}",
        policies.display()
    );
    println!("  authorization policies:             trellis get AuthorizationPolicy --api {api}");
    println!(
        "  scoring-service's authz decisions:  curl -s http://{}/metrics | grep trellis_authz",
        admins[4].1
    );
    println!(
        "  the frontend (through its proxy):   curl http://{}/",
        frontend.inbound
    );
    println!("  proxies, versions, sync:            trellis status --api {api}");
    println!("  identities and expiry:              trellis certs --api {api}");
    println!("  health checks:                      trellis check --api {api}");
    println!(
        "  frontend proxy metrics:             curl http://{}/metrics",
        frontend.admin
    );
    println!(
        "  a backend proxy's certificate:      curl http://{}/certs",
        admins[1].1
    );
    println!("  logs and configs:                   {}", dir.display());
    println!("Load: {} requests/s to the frontend (each fans out to 5 services). Ctrl-C stops everything.", args.rps);

    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let load = {
        let (ok, failed, target) = (ok.clone(), failed.clone(), frontend.inbound);
        let period = StdDuration::from_secs_f64(1.0 / f64::from(args.rps.max(1)));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let (ok, failed) = (ok.clone(), failed.clone());
                tokio::spawn(async move {
                    match http_get(target, "/", "frontend.edtech").await {
                        Ok((200, _)) => ok.fetch_add(1, Ordering::Relaxed),
                        other => {
                            if failed.fetch_add(1, Ordering::Relaxed) < 3 {
                                let why = match other {
                                    Ok((code, body)) => {
                                        format!("{code} {}", String::from_utf8_lossy(&body))
                                    }
                                    Err(e) => e.to_string(),
                                };
                                eprintln!("request failed: {why}");
                            }
                            0
                        }
                    };
                });
            }
        })
    };
    let report = {
        let (ok, failed) = (ok.clone(), failed.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(StdDuration::from_secs(5));
            tick.tick().await;
            loop {
                tick.tick().await;
                println!(
                    "requests: {} ok, {} failed",
                    ok.load(Ordering::Relaxed),
                    failed.load(Ordering::Relaxed)
                );
            }
        })
    };

    match args.duration {
        Some(d) => tokio::time::sleep(d.0).await,
        None => {
            tokio::signal::ctrl_c().await?;
        }
    }
    load.abort();
    report.abort();
    // Let requests already sent finish before the proxies drain.
    tokio::time::sleep(StdDuration::from_millis(300)).await;
    println!("stopping...");
    drop(proxies);
    drop(control);
    let _ = std::fs::remove_dir_all(&dir);
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!("demo finished: {ok} requests ok, {failed} failed");
    if ok == 0 {
        bail!("no request succeeded");
    }
    Ok(())
}

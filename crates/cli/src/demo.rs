//! `trellis demo`: two services of an education platform, each behind its own
//! `trellis proxy` process, with a gentle load generator.
//!
//! ```text
//! load -> frontend proxy (inbound) -> frontend app -> frontend proxy (outbound, HTTP proxy)
//!      -> user-profile proxy (inbound) -> user-profile app
//! ```
//! The control-plane issue grows this into the full mesh; until then each proxy runs from a
//! static bootstrap file written to a temporary directory.

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

fn free_port() -> anyhow::Result<SocketAddr> {
    let l = StdListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?)
}

/// A child `trellis proxy`, stopped with SIGTERM (graceful drain) when dropped.
struct ProxyProcess {
    name: &'static str,
    child: Child,
    admin: SocketAddr,
}

impl ProxyProcess {
    fn start(
        name: &'static str,
        dir: &Path,
        yaml: &str,
        admin: SocketAddr,
    ) -> anyhow::Result<Self> {
        let file: PathBuf = dir.join(format!("{name}.yaml"));
        std::fs::write(&file, yaml)?;
        let exe = std::env::current_exe().context("locating the trellis binary")?;
        let child = Command::new(exe)
            .args(["proxy", "--config"])
            .arg(&file)
            .args(["--drain-timeout", "2s", "--log-level", "warn"])
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting the {name} proxy"))?;
        Ok(Self { name, child, admin })
    }
}

impl Drop for ProxyProcess {
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
        eprintln!("{} proxy did not drain in time; killed", self.name);
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
    let resp = tx.send_request(req).await?;
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

async fn wait_ready(admin: SocketAddr, name: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + StdDuration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok((200, _)) = http_get(admin, "/ready", "localhost").await {
            return Ok(());
        }
        tokio::time::sleep(StdDuration::from_millis(50)).await;
    }
    bail!("the {name} proxy did not become ready within 10s")
}

/// Runs the demo until Ctrl-C or `--duration`.
pub fn run(args: DemoArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run_async(args))
}

async fn run_async(args: DemoArgs) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("trellis-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;

    let profile_app = TcpListener::bind("127.0.0.1:0").await?;
    let frontend_app = TcpListener::bind("127.0.0.1:0").await?;
    let profile_app_addr = profile_app.local_addr()?;
    let frontend_app_addr = frontend_app.local_addr()?;
    let (profile_in, profile_admin) = (free_port()?, free_port()?);
    let (frontend_in, frontend_out, frontend_admin) = (free_port()?, free_port()?, free_port()?);

    let profile_proxy = ProxyProcess::start(
        "user-profile",
        &dir,
        &format!(
            "service: user-profile\nnamespace: edtech\nlabels: {{ app: user-profile, version: v1 }}\n\
             admin: {profile_admin}\noutbound: {{ listen: null }}\n\
             inbound:\n  - listen: {profile_in}\n    app: {profile_app_addr}\n"
        ),
        profile_admin,
    )?;
    let frontend_proxy = ProxyProcess::start(
        "frontend",
        &dir,
        &format!(
            "service: frontend\nnamespace: edtech\nlabels: {{ app: frontend, version: v1 }}\n\
             admin: {frontend_admin}\noutbound: {{ listen: {frontend_out} }}\n\
             inbound:\n  - listen: {frontend_in}\n    app: {frontend_app_addr}\n\
             upstreams:\n  - service: user-profile\n    endpoints: [{profile_in}]\n    timeout: 2s\n"
        ),
        frontend_admin,
    )?;

    tokio::spawn(serve_app(
        profile_app,
        |req: Request<Incoming>| async move {
            let id = req
                .uri()
                .path()
                .rsplit('/')
                .next()
                .unwrap_or("0")
                .to_string();
            json_response(
                200,
                serde_json::json!({"user": id, "name": format!("student-{id}"), "courses": 3}),
            )
        },
    ));
    tokio::spawn(serve_app(
        frontend_app,
        move |_req: Request<Incoming>| async move {
            // The frontend reaches user-profile through its proxy, as an HTTP proxy client.
            match http_get(
                frontend_out,
                "http://user-profile.edtech/profile/7",
                "user-profile.edtech",
            )
            .await
            {
                Ok((200, body)) => {
                    let profile: serde_json::Value =
                        serde_json::from_slice(&body).unwrap_or_default();
                    json_response(
                        200,
                        serde_json::json!({"page": "dashboard", "profile": profile}),
                    )
                }
                Ok((code, _)) => json_response(
                    502,
                    serde_json::json!({"error": format!("user-profile answered {code}")}),
                ),
                Err(e) => json_response(502, serde_json::json!({"error": e.to_string()})),
            }
        },
    ));

    wait_ready(profile_proxy.admin, profile_proxy.name).await?;
    wait_ready(frontend_proxy.admin, frontend_proxy.name).await?;

    println!("Trellis demo is running.");
    println!("  frontend (through its proxy):  curl http://{frontend_in}/");
    println!("  user-profile via the mesh:     curl -x http://{frontend_out} http://user-profile.edtech/profile/1");
    println!("  frontend proxy metrics:        curl http://{frontend_admin}/metrics");
    println!("  user-profile proxy metrics:    curl http://{profile_admin}/metrics");
    println!("  effective config:              curl http://{frontend_admin}/config");
    println!(
        "Load: {} requests/s to the frontend. Ctrl-C stops everything.",
        args.rps
    );

    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let load = {
        let (ok, failed) = (ok.clone(), failed.clone());
        let period = StdDuration::from_secs_f64(1.0 / f64::from(args.rps.max(1)));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                match http_get(frontend_in, "/", "frontend.edtech").await {
                    Ok((200, _)) => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
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
    println!("stopping...");
    drop(frontend_proxy);
    drop(profile_proxy);
    let _ = std::fs::remove_dir_all(&dir);
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!("demo finished: {ok} requests ok, {failed} failed");
    if ok == 0 {
        bail!("no request succeeded");
    }
    Ok(())
}

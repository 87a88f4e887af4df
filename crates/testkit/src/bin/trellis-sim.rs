//! `trellis-sim`: simulates N proxies on one control plane, for the control plane scale
//! benchmark (`bench/control_scale.sh`, not a test).
//!
//! Each simulated proxy opens its own TLS connection and `Config.Stream`, exactly like a real
//! proxy (mTLS with a workload certificate, the control plane's SPIFFE ID verified), registers
//! with a Hello (instance `sim-0001`..., one port each) and ACKs every snapshot it receives,
//! recording the snapshot's version, size and arrival time. All simulated proxies share one
//! certificate (issued offline with `trellis ca issue`): without a ledger record for the
//! instance, the control plane lets a proxy register as its certificate's service account.
//!
//! Once all N are connected and have ACKed a snapshot (a line on stderr), the simulator runs the
//! measurement itself: `--rounds` times it waits for the push traffic to settle, notes every
//! proxy's version, runs the next `--apply-cmd` (cycling through them, via `sh -c`), and waits
//! until every proxy has ACKed a snapshot newer than the one it had (and at least the version
//! the command printed as JSON `{"version": N}`, if it did). Per round it reports apply → first
//! snapshot, the percentiles over proxies, apply → last ACK, and the control plane's CPU time.
//! It samples the control plane's RSS (`--control-pid`) before connecting, once all are
//! connected and after the rounds. The JSON summary goes to stdout; progress to stderr.
//!
//! Snapshots are decoded only as far as their version (prost skips the rest), except for the
//! first simulated proxy, which decodes them fully to report services and endpoints; the
//! simulator shares the machine with the control plane, so it keeps its own work small.
//!
//! Everything is bounded by `--timeout` (a watchdog exits the process 30 s after it).

use clap::Parser;
use hyper_util::rt::TokioIo;
use prost::Message as _;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tonic::codec::{Codec, DecodeBuf, Decoder};
use tonic::Status;
use trellis_api::proto::config::proxy_message::Message;
use trellis_api::proto::config::{Ack, Hello, Port, ProxyMessage, Snapshot};
use trellis_identity::tls::ALPN_H2;
use trellis_identity::{IdentityStore, SpiffeId};

#[derive(Parser, Debug)]
#[command(
    name = "trellis-sim",
    about = "Simulate N proxies on a Trellis control plane and time config pushes"
)]
struct Args {
    /// The control plane's gRPC address (host:port).
    #[arg(long)]
    control: String,
    /// Workload certificate (PEM chain) every simulated proxy presents.
    #[arg(long)]
    cert: PathBuf,
    /// Its key.
    #[arg(long)]
    key: PathBuf,
    /// Trust bundle (PEM) the control plane's certificate must chain to.
    #[arg(long)]
    bundle: PathBuf,
    /// Number of simulated proxies.
    #[arg(long, default_value_t = 1000)]
    proxies: usize,
    /// Service every simulated proxy registers as (the certificate's service account).
    #[arg(long, default_value = "sim")]
    service: String,
    /// Trust domain (of the control plane's identity).
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// New connections per second while ramping up.
    #[arg(long, default_value_t = 200.0)]
    connect_rate: f64,
    /// First inbound port; proxy i registers port base+i.
    #[arg(long, default_value_t = 10000)]
    base_port: u32,
    /// Instance id prefix (`<prefix>0001`...).
    #[arg(long, default_value = "sim-")]
    instance_prefix: String,
    /// Command to run each round (`sh -c`); repeat the flag to cycle through several.
    #[arg(long)]
    apply_cmd: Vec<String>,
    /// Measured rounds.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Quiet time (no snapshot received by any proxy) required before each round, ms.
    #[arg(long, default_value_t = 500)]
    settle_ms: u64,
    /// Give up on a round after this many seconds.
    #[arg(long, default_value_t = 30)]
    round_timeout: u64,
    /// The control plane's PID (RSS and CPU time from /proc).
    #[arg(long)]
    control_pid: Option<u32>,
    /// Command run once after the rounds (`sh -c`), whose stdout is `trellis status -o json`;
    /// the summary then reports how many proxies the control plane counts in sync.
    #[arg(long)]
    status_cmd: Option<String>,
    /// Overall time limit, seconds.
    #[arg(long, default_value_t = 120)]
    timeout: u64,
    /// Worker threads of the simulator's runtime (0: one per CPU).
    #[arg(long, default_value_t = 0)]
    threads: usize,
}

/// The fields of a Snapshot the simulator reads: prost skips the others.
#[derive(Clone, PartialEq, prost::Message)]
struct SnapshotHead {
    #[prost(uint64, tag = "1")]
    version: u64,
}

/// What one received snapshot is reduced to.
struct Received {
    version: u64,
    bytes: usize,
    /// Services and endpoints (full decode only).
    detail: Option<(usize, usize, usize)>,
}

/// A codec that encodes `ProxyMessage`s as usual and decodes snapshots as `Received`.
#[derive(Clone, Copy)]
struct SimCodec {
    full: bool,
}

struct SimDecoder {
    full: bool,
}

impl Decoder for SimDecoder {
    type Item = Received;
    type Error = Status;
    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Received>, Status> {
        use bytes::Buf as _;
        let bytes = buf.remaining();
        let bad = |e: prost::DecodeError| Status::internal(format!("decoding a snapshot: {e}"));
        if self.full {
            let s = Snapshot::decode(buf).map_err(bad)?;
            let list =
                trellis_api::proto::config::ServiceList::decode(s.services.clone()).map_err(bad)?;
            let endpoints = list.services.iter().map(|s| s.endpoints.len()).sum();
            Ok(Some(Received {
                version: s.version,
                bytes,
                detail: Some((list.services.len(), endpoints, s.resources.len())),
            }))
        } else {
            let s = SnapshotHead::decode(buf).map_err(bad)?;
            Ok(Some(Received {
                version: s.version,
                bytes,
                detail: None,
            }))
        }
    }
}

impl Codec for SimCodec {
    type Encode = ProxyMessage;
    type Decode = Received;
    type Encoder = <tonic_prost::ProstCodec<ProxyMessage, Snapshot> as Codec>::Encoder;
    type Decoder = SimDecoder;
    fn encoder(&mut self) -> Self::Encoder {
        tonic_prost::ProstCodec::<ProxyMessage, Snapshot>::default().encoder()
    }
    fn decoder(&mut self) -> SimDecoder {
        SimDecoder { full: self.full }
    }
}

/// One received snapshot, as recorded.
#[derive(Clone, Copy)]
struct Rec {
    version: u64,
    at: Instant,
    acked_at: Instant,
    bytes: u32,
}

/// What the coordinator knows of one simulated proxy.
#[derive(Default)]
struct Sim {
    recs: Mutex<Vec<Rec>>,
    /// Latest version ACKed (the ACK queued on the stream).
    acked: AtomicU64,
    up: AtomicBool,
    /// Streams opened (more than 1: it reconnected).
    sessions: AtomicU32,
    last_error: Mutex<Option<String>>,
    detail: Mutex<Option<(usize, usize, usize)>>,
}

/// Shared by every simulated proxy.
struct World {
    sims: Vec<Sim>,
    /// Incremented on every snapshot received by any proxy.
    received: AtomicU64,
    /// When the last snapshot was received by any proxy (ns since `epoch`).
    last_rx_ns: AtomicU64,
    epoch: Instant,
}

fn source_chain(e: &dyn std::error::Error) -> String {
    let mut out = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push(s.to_string());
        cur = s.source();
    }
    out.join(": ")
}

/// A gRPC channel over its own TLS connection (what the proxy's `identity_client::channel` does).
async fn channel(
    addr: &str,
    tls: Arc<rustls::ClientConfig>,
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
    tonic::transport::Endpoint::from_static("http://trellis-control")
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_with_connector(connector)
        .await
        .map_err(|e| source_chain(&e))
}

struct ProxyCtx {
    index: usize,
    addr: String,
    hello: Hello,
    store: Arc<IdentityStore>,
    control_id: SpiffeId,
    world: Arc<World>,
    stop: CancellationToken,
}

/// One simulated proxy: a stream, reopened with a short backoff if it breaks, until `stop`.
async fn run_proxy(ctx: ProxyCtx) {
    let mut attempt = 0u32;
    while !ctx.stop.is_cancelled() {
        let r = tokio::select! {
            r = session(&ctx) => r,
            _ = ctx.stop.cancelled() => return,
        };
        let sim = &ctx.world.sims[ctx.index];
        sim.up.store(false, Ordering::Relaxed);
        let e = match r {
            Ok(()) => "stream closed by the control plane".to_string(),
            Err(e) => e,
        };
        *sim.last_error.lock().unwrap() = Some(e);
        attempt += 1;
        let wait = Duration::from_millis((200u64 << attempt.min(4)) + fastrand_ms(200));
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = ctx.stop.cancelled() => return,
        }
    }
}

fn fastrand_ms(max: u64) -> u64 {
    // Jitter without another dependency: the low bits of the clock.
    (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64))
        % max.max(1)
}

async fn session(ctx: &ProxyCtx) -> Result<(), String> {
    let sim = &ctx.world.sims[ctx.index];
    // One client config per proxy (its own session cache), like separate proxy processes.
    let tls = ctx
        .store
        .client_config(Some(ctx.control_id.clone()), &[ALPN_H2]);
    let ch = channel(&ctx.addr, tls).await?;
    let (tx, rx) = mpsc::channel::<ProxyMessage>(8);
    let mut hello = ctx.hello.clone();
    hello.version = sim.acked.load(Ordering::Relaxed);
    let _ = tx
        .send(ProxyMessage {
            message: Some(Message::Hello(hello)),
        })
        .await;
    let outgoing =
        futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|m| (m, rx)) });
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await.map_err(|e| format!("not ready: {e}"))?;
    let path = http::uri::PathAndQuery::from_static("/trellis.config.v1.Config/Stream");
    let codec = SimCodec {
        full: ctx.index == 0,
    };
    let mut incoming = grpc
        .streaming(tonic::Request::new(outgoing), path, codec)
        .await
        .map_err(|s| format!("{}: {}", s.code(), s.message()))?
        .into_inner();
    sim.sessions.fetch_add(1, Ordering::Relaxed);
    sim.up.store(true, Ordering::Relaxed);
    loop {
        let r = match incoming.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return Ok(()),
            Err(s) => return Err(format!("{}: {}", s.code(), s.message())),
        };
        let at = Instant::now();
        let ack = ProxyMessage {
            message: Some(Message::Ack(Ack {
                version: r.version,
                error: String::new(),
            })),
        };
        if tx.send(ack).await.is_err() {
            return Err("stream closed".into());
        }
        let acked_at = Instant::now();
        if let Some(d) = r.detail {
            *sim.detail.lock().unwrap() = Some(d);
        }
        sim.recs.lock().unwrap().push(Rec {
            version: r.version,
            at,
            acked_at,
            bytes: r.bytes as u32,
        });
        sim.acked.fetch_max(r.version, Ordering::Release);
        ctx.world.received.fetch_add(1, Ordering::Release);
        ctx.world.last_rx_ns.fetch_max(
            at.duration_since(ctx.world.epoch).as_nanos() as u64,
            Ordering::Relaxed,
        );
    }
}

/// `/proc/PID/status` field in kB.
fn proc_status_kb(pid: &str, field: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// utime + stime of PID, ms.
fn cpu_ms(pid: &str) -> Option<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Some(ticks as f64 * 1000.0 / hz)
}

fn mb(kb: Option<u64>) -> Value {
    kb.map_or(Value::Null, |k| {
        json!((k as f64 / 1024.0 * 10.0).round() / 10.0)
    })
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e5).round() / 100.0
}

/// Nearest-rank percentile of sorted values.
fn pct(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn median(v: &[f64]) -> Value {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return Value::Null;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    json!((m * 100.0).round() / 100.0)
}

fn num(x: f64) -> Value {
    if x.is_finite() {
        json!((x * 100.0).round() / 100.0)
    } else {
        Value::Null
    }
}

/// Waits until no proxy has received a snapshot for `quiet` (or `until`). Returns whether it got quiet.
async fn settle(world: &World, quiet: Duration, until: Instant) -> bool {
    loop {
        let last = world.epoch + Duration::from_nanos(world.last_rx_ns.load(Ordering::Relaxed));
        let now = Instant::now();
        if now.saturating_duration_since(last) >= quiet {
            return true;
        }
        if now >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `cmd` with `sh -c`; (success, stdout, stderr, duration).
async fn run_cmd(cmd: &str, limit: Duration) -> (bool, String, String, Duration) {
    let t = Instant::now();
    let child = tokio::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn();
    let child = match child {
        Ok(c) => c,
        Err(e) => return (false, String::new(), e.to_string(), t.elapsed()),
    };
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(Ok(o)) => (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
            t.elapsed(),
        ),
        Ok(Err(e)) => (false, String::new(), e.to_string(), t.elapsed()),
        Err(_) => (false, String::new(), "timed out".into(), t.elapsed()),
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let limit = Duration::from_secs(args.timeout);
    // The watchdog: whatever happens, the process ends.
    std::thread::spawn(move || {
        std::thread::sleep(limit + Duration::from_secs(30));
        eprintln!("trellis-sim: watchdog: still running 30 s after --timeout; exiting");
        std::process::exit(3);
    });
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if args.threads > 0 {
        rt.worker_threads(args.threads);
    }
    let rt = match rt.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("trellis-sim: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    match rt.block_on(run(args)) {
        Ok((summary, ok)) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&summary).unwrap_or_default()
            );
            if ok {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::from(1)
            }
        }
        Err(e) => {
            eprintln!("trellis-sim: {e}");
            std::process::ExitCode::from(2)
        }
    }
}

fn log(world_epoch: Instant, msg: &str) {
    eprintln!(
        "[trellis-sim {:8.3}s] {msg}",
        world_epoch.elapsed().as_secs_f64()
    );
}

async fn run(args: Args) -> Result<(Value, bool), String> {
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout);
    let read =
        |p: &PathBuf| std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
    let store = IdentityStore::new();
    let info = store
        .install(&read(&args.cert)?, &read(&args.key)?, &read(&args.bundle)?)
        .map_err(|e| e.to_string())?;
    if info.identity.service_account != args.service {
        eprintln!(
            "trellis-sim: warning: the certificate is {} but proxies register as service {:?}; the control plane will refuse them unless a token says otherwise",
            info.identity, args.service
        );
    }
    let control_id = SpiffeId::new(&args.trust_domain, "trellis-system", "trellis-control")
        .map_err(|e| e.to_string())?;
    let pid = args.control_pid.map(|p| p.to_string());
    let rss = |f: &str| pid.as_deref().and_then(|p| proc_status_kb(p, f));
    let control_cpu = || pid.as_deref().and_then(cpu_ms);
    let self_cpu = || cpu_ms("self");

    let n = args.proxies;
    let world = Arc::new(World {
        sims: (0..n).map(|_| Sim::default()).collect(),
        received: AtomicU64::new(0),
        last_rx_ns: AtomicU64::new(0),
        epoch: started,
    });
    let rss_before = rss("VmRSS:");
    let cpu_before = control_cpu();
    log(
        started,
        &format!(
            "control plane RSS before connecting: {} MB; connecting {n} proxies to {} at {}/s",
            mb(rss_before),
            args.control,
            args.connect_rate
        ),
    );

    // ---- ramp up -------------------------------------------------------------------------
    let stop = CancellationToken::new();
    let interval = Duration::from_secs_f64(1.0 / args.connect_rate.max(0.001));
    let ramp_start = Instant::now();
    let mut tasks = Vec::with_capacity(n);
    {
        let mut labels = std::collections::HashMap::new();
        labels.insert("app".to_string(), args.service.clone());
        for i in 0..n {
            let hello = Hello {
                instance: format!("{}{:04}", args.instance_prefix, i + 1),
                service: args.service.clone(),
                labels: labels.clone(),
                address: "127.0.0.1".into(),
                ports: vec![Port {
                    port: args.base_port + i as u32,
                    protocol: "http1".into(),
                }],
                ready: true,
                version: 0,
            };
            let ctx = ProxyCtx {
                index: i,
                addr: args.control.clone(),
                hello,
                store: store.clone(),
                control_id: control_id.clone(),
                world: world.clone(),
                stop: stop.clone(),
            };
            // Paced against the start so that a slow spawn does not lower the rate.
            let at = ramp_start + interval.mul_f64(i as f64);
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep_until(at.into()).await;
                run_proxy(ctx).await
            }));
        }
    }
    let ramp_limit =
        (ramp_start + interval.mul_f64(n as f64) + Duration::from_secs(60)).min(deadline);
    let mut all_up_at = None;
    let mut all_acked_at = None;
    let mut last_report = Instant::now();
    loop {
        let up = world
            .sims
            .iter()
            .filter(|s| s.up.load(Ordering::Relaxed))
            .count();
        let acked = world
            .sims
            .iter()
            .filter(|s| s.acked.load(Ordering::Relaxed) > 0)
            .count();
        if up == n && all_up_at.is_none() {
            all_up_at = Some(ramp_start.elapsed());
        }
        if up == n && acked == n {
            all_acked_at = Some(ramp_start.elapsed());
            break;
        }
        if Instant::now() >= ramp_limit {
            break;
        }
        if last_report.elapsed() >= Duration::from_secs(2) {
            last_report = Instant::now();
            log(
                started,
                &format!(
                    "{up}/{n} streams up, {acked} ACKed a snapshot, {} snapshots received so far",
                    world.received.load(Ordering::Relaxed)
                ),
            );
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ramp_snapshots = world.received.load(Ordering::Relaxed);
    let errors: Vec<String> = world
        .sims
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            s.last_error
                .lock()
                .unwrap()
                .as_ref()
                .map(|e| format!("proxy {}: {e}", i + 1))
        })
        .take(5)
        .collect();
    let mut summary = json!({
        "proxies": n,
        "control": args.control,
        "connect_rate_per_s": args.connect_rate,
        "connect": {
            "seconds_to_all_streams_up": all_up_at.map(|d| num(d.as_secs_f64())),
            "seconds_to_all_acked_a_snapshot": all_acked_at.map(|d| num(d.as_secs_f64())),
            "snapshots_received_during_ramp": ramp_snapshots,
        },
    });
    let Some(all_acked) = all_acked_at else {
        summary["error"] = json!(format!(
            "not every proxy connected and ACKed a snapshot in time; first errors: {errors:?}"
        ));
        summary["control_rss_mb"] =
            json!({ "before_connect": mb(rss_before), "now": mb(rss("VmRSS:")) });
        stop.cancel();
        return Ok((summary, false));
    };
    log(
        started,
        &format!(
            "all {n} proxies connected and ACKed an initial snapshot after {:.2} s ({ramp_snapshots} snapshots received during the ramp)",
            all_acked.as_secs_f64()
        ),
    );
    let settled = settle(
        &world,
        Duration::from_millis(args.settle_ms.max(1000)),
        deadline,
    )
    .await;
    let cpu_connected = control_cpu();
    let rss_connected = rss("VmRSS:");
    let settle_snapshots = world.received.load(Ordering::Relaxed) - ramp_snapshots;
    summary["connect"]["snapshots_received_while_settling"] = json!(settle_snapshots);
    summary["connect"]["settled"] = json!(settled);
    summary["connect"]["control_cpu_seconds"] = match (cpu_before, cpu_connected) {
        (Some(a), Some(b)) => num((b - a) / 1000.0),
        _ => Value::Null,
    };
    log(
        started,
        &format!(
            "settled; control plane RSS with {n} proxies connected: {} MB",
            mb(rss_connected)
        ),
    );

    // ---- rounds --------------------------------------------------------------------------
    let mut rounds = Vec::new();
    let mut ok = true;
    let (mut last_acks, mut p50s, mut firsts) = (Vec::new(), Vec::new(), Vec::new());
    for r in 0..(if args.apply_cmd.is_empty() {
        0
    } else {
        args.rounds
    }) {
        let cmd = &args.apply_cmd[r % args.apply_cmd.len()];
        if !settle(&world, Duration::from_millis(args.settle_ms), deadline).await {
            ok = false;
            rounds
                .push(json!({ "round": r + 1, "error": "pushes never settled before the round" }));
            break;
        }
        let base: Vec<u64> = world
            .sims
            .iter()
            .map(|s| s.acked.load(Ordering::Acquire))
            .collect();
        let base_len: Vec<usize> = world
            .sims
            .iter()
            .map(|s| s.recs.lock().unwrap().len())
            .collect();
        let cpu0 = control_cpu();
        let scpu0 = self_cpu();
        let t0 = Instant::now();
        let (cmd_ok, out, err, cmd_time) =
            run_cmd(cmd, Duration::from_secs(args.round_timeout)).await;
        let printed_version = serde_json::from_str::<Value>(out.trim())
            .ok()
            .and_then(|v| v["version"].as_u64());
        if !cmd_ok {
            ok = false;
            rounds.push(json!({
                "round": r + 1, "command": cmd, "error": format!("command failed: {}", err.trim()),
            }));
            break;
        }
        let round_limit = (t0 + Duration::from_secs(args.round_timeout)).min(deadline);
        let done = |i: usize, s: &Sim| {
            let v = s.acked.load(Ordering::Acquire);
            v > base[i] && printed_version.is_none_or(|pv| v >= pv)
        };
        let complete = loop {
            let missing = world
                .sims
                .iter()
                .enumerate()
                .filter(|(i, s)| !done(*i, s))
                .count();
            if missing == 0 {
                break true;
            }
            if Instant::now() >= round_limit {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        let t_done = t0.elapsed();
        // Let the control plane finish what it does after the last ACK (recording status) for
        // the CPU figure, but not longer than the settle time.
        settle(&world, Duration::from_millis(args.settle_ms), deadline).await;
        let cpu1 = control_cpu();
        let scpu1 = self_cpu();
        let (mut first_rx, mut last_ack, mut rx_ms, mut extra, mut missing, mut sizes) =
            (f64::INFINITY, 0f64, Vec::new(), 0usize, 0usize, Vec::new());
        let mut version_seen = 0u64;
        for (i, s) in world.sims.iter().enumerate() {
            let recs = s.recs.lock().unwrap();
            let new: Vec<&Rec> = recs[base_len[i]..]
                .iter()
                .filter(|x| x.version > base[i])
                .collect();
            let Some(hit) = new
                .iter()
                .find(|x| printed_version.is_none_or(|pv| x.version >= pv))
            else {
                missing += 1;
                continue;
            };
            extra += new.len() - 1;
            version_seen = version_seen.max(hit.version);
            let first = new[0];
            first_rx = first_rx.min(ms(first.at.duration_since(t0)));
            rx_ms.push(ms(hit.at.duration_since(t0)));
            last_ack = last_ack.max(ms(hit.acked_at.duration_since(t0)));
            sizes.push(hit.bytes as f64);
        }
        rx_ms.sort_by(|a, b| a.total_cmp(b));
        sizes.sort_by(|a, b| a.total_cmp(b));
        let round = json!({
            "round": r + 1,
            "command": cmd,
            "command_output": out.lines().take(3).collect::<Vec<_>>().join(" | "),
            "command_ms": ms(cmd_time),
            "version": version_seen,
            "complete": complete,
            "proxies_missing": missing,
            "extra_snapshots": extra,
            "apply_to_first_snapshot_ms": num(first_rx),
            "apply_to_snapshot_p50_ms": num(pct(&rx_ms, 50.0)),
            "apply_to_snapshot_p90_ms": num(pct(&rx_ms, 90.0)),
            "apply_to_snapshot_p99_ms": num(pct(&rx_ms, 99.0)),
            "apply_to_last_ack_ms": if complete { num(last_ack) } else { Value::Null },
            "wait_ms": ms(t_done),
            "snapshot_bytes_median": num(pct(&sizes, 50.0)),
            "control_cpu_ms": match (cpu0, cpu1) { (Some(a), Some(b)) => num(b - a), _ => Value::Null },
            "sim_cpu_ms": match (scpu0, scpu1) { (Some(a), Some(b)) => num(b - a), _ => Value::Null },
        });
        log(
            started,
            &format!(
                "round {}: `{cmd}` -> version {version_seen}: first snapshot {:.1} ms, p50 {:.1} ms, last ACK {} ms ({} missing, {} extra), control CPU {} ms",
                r + 1,
                first_rx,
                pct(&rx_ms, 50.0),
                if complete { format!("{last_ack:.1}") } else { "–".into() },
                missing,
                extra,
                round["control_cpu_ms"]
            ),
        );
        if complete {
            last_acks.push(last_ack);
            p50s.push(pct(&rx_ms, 50.0));
            firsts.push(first_rx);
        } else {
            ok = false;
        }
        rounds.push(round);
    }
    let rss_after = rss("VmRSS:");
    let hwm = rss("VmHWM:");
    summary["rounds"] = json!(rounds);
    summary["summary"] = json!({
        "rounds_complete": last_acks.len(),
        "apply_to_last_ack_ms_median": median(&last_acks),
        "apply_to_last_ack_ms_max": last_acks.iter().copied().reduce(f64::max).map_or(Value::Null, num),
        "apply_to_last_ack_ms_min": last_acks.iter().copied().reduce(f64::min).map_or(Value::Null, num),
        "apply_to_snapshot_p50_ms_median": median(&p50s),
        "apply_to_first_snapshot_ms_median": median(&firsts),
    });
    summary["control_rss_mb"] = json!({
        "before_connect": mb(rss_before),
        "connected": mb(rss_connected),
        "after_rounds": mb(rss_after),
        "peak_vmhwm": mb(hwm),
    });
    summary["sim"] = json!({
        "rss_mb": mb(proc_status_kb("self", "VmRSS:")),
        "cpu_seconds_total": self_cpu().map_or(Value::Null, |c| num(c / 1000.0)),
        "threads": args.threads,
    });
    let detail = *world.sims[0].detail.lock().unwrap();
    if let Some((services, endpoints, resources)) = detail {
        summary["snapshot_of_proxy_1"] =
            json!({ "services": services, "endpoints": endpoints, "resources": resources });
    }
    let reconnects: u32 = world
        .sims
        .iter()
        .map(|s| s.sessions.load(Ordering::Relaxed).saturating_sub(1))
        .sum();
    let down = world
        .sims
        .iter()
        .filter(|s| !s.up.load(Ordering::Relaxed))
        .count();
    summary["reconnects"] = json!(reconnects);
    summary["streams_down_at_end"] = json!(down);
    if reconnects > 0 || down > 0 {
        ok = false;
        let errors: Vec<String> = world
            .sims
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                s.last_error
                    .lock()
                    .unwrap()
                    .as_ref()
                    .map(|e| format!("proxy {}: {e}", i + 1))
            })
            .take(5)
            .collect();
        summary["stream_errors"] = json!(errors);
    }

    // ---- the control plane's view --------------------------------------------------------
    if let Some(cmd) = &args.status_cmd {
        let (_, out, err, took) = run_cmd(cmd, Duration::from_secs(30)).await;
        match serde_json::from_str::<Value>(&out) {
            Ok(v) => {
                let proxies = v["proxies"].as_array().cloned().unwrap_or_default();
                let ours: Vec<&Value> = proxies
                    .iter()
                    .filter(|p| {
                        p["instance"]
                            .as_str()
                            .is_some_and(|i| i.starts_with(&args.instance_prefix))
                    })
                    .collect();
                let in_sync = ours.iter().filter(|p| p["in_sync"] == true).count();
                let latest = ours
                    .iter()
                    .filter_map(|p| p["acked_version"].as_u64())
                    .max()
                    .unwrap_or(0);
                let at_latest = ours
                    .iter()
                    .filter(|p| p["acked_version"].as_u64() == Some(latest))
                    .count();
                summary["control_status"] = json!({
                    "proxies_listed": ours.len(),
                    "in_sync": in_sync,
                    "acked_latest_version": at_latest,
                    "latest_acked_version": latest,
                    "command_ms": ms(took),
                });
                if in_sync != n || ours.len() != n {
                    ok = false;
                }
            }
            Err(e) => {
                summary["control_status"] =
                    json!({ "error": format!("{e}: {}", err.trim()), "command_ms": ms(took) });
                ok = false;
            }
        }
    }
    summary["ok"] = json!(ok);
    summary["elapsed_s"] = num(started.elapsed().as_secs_f64());
    stop.cancel();
    let _ = tokio::time::timeout(
        Duration::from_secs(5),
        futures_util::future::join_all(tasks),
    )
    .await;
    Ok((summary, ok))
}

//! `trellis`: the proxy, and (as they land) the control plane and the CLI commands.

mod api_client;
mod cmd;
mod demo;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::process::ExitCode;
use trellis_api::duration::Duration;

#[derive(Parser)]
#[command(name = "trellis", version, about = "Trellis service mesh")]
struct Cli {
    /// Log filter for stderr logs (e.g. info, debug, trellis_proxy=debug).
    #[arg(long, global = true, env = "TRELLIS_LOG", default_value = "info")]
    log_level: String,
    /// The control plane's HTTP API, for the commands that talk to it.
    #[arg(
        long,
        global = true,
        env = "TRELLIS_API",
        default_value = "127.0.0.1:15014"
    )]
    api: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the data-plane proxy from a static bootstrap file.
    Proxy(ProxyArgs),
    /// Run the control plane: CA and identity service, HTTP API.
    Control(cmd::control::ControlArgs),
    /// Validate and apply resource files (Istio YAML) to the control plane.
    Apply {
        /// Files or directories.
        #[arg(short = 'f', long = "filename", required = true)]
        files: Vec<PathBuf>,
        /// Validate and print the changes against what is live, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Show resources stored on the control plane.
    Get {
        /// Kind (VirtualService, vs, destinationrules, ...).
        kind: String,
        /// One resource by name.
        name: Option<String>,
        /// Namespace filter.
        #[arg(short, long)]
        namespace: Option<String>,
        /// Output format.
        #[arg(short, long, value_parser = ["table", "yaml", "json"], default_value = "table")]
        output: String,
    },
    /// Delete a resource from the control plane.
    Delete {
        /// Kind.
        kind: String,
        /// Name.
        name: String,
        /// Namespace.
        #[arg(short, long, default_value = "default")]
        namespace: String,
    },
    /// Join tokens: create, list, revoke.
    #[command(subcommand)]
    Token(cmd::token::TokenCommand),
    /// Every proxy's identity and certificate expiry, and the CA's.
    Certs {
        /// Output format.
        #[arg(short, long, value_parser = ["table", "json"], default_value = "table")]
        output: String,
    },
    /// Check the mesh: control plane and its store reachable, proxies in sync, CA and
    /// workload certificates not expiring. Exits 1 when a check fails.
    Check {
        /// Output format.
        #[arg(short, long, value_parser = ["table", "json"], default_value = "table")]
        output: String,
    },
    /// Every connected proxy: address, readiness, config version and sync state, certificate
    /// expiry. Exits 1 when a proxy is not in sync or refused its latest config.
    Status {
        /// Output format.
        #[arg(short, long, value_parser = ["table", "json"], default_value = "table")]
        output: String,
    },
    /// Save everything durable on the control plane (CA and its private key, tokens,
    /// certificate ledger, resources) to FILE (mode 0600).
    Backup {
        /// The archive to write.
        file: PathBuf,
        /// Overwrite FILE if it exists.
        #[arg(long)]
        force: bool,
    },
    /// Restore a `trellis backup` archive into the control plane (same trust domain). Refused
    /// when it already has tokens or resources, unless --force (which replaces them).
    Restore {
        /// The archive.
        file: PathBuf,
        /// Replace what the control plane has.
        #[arg(long)]
        force: bool,
    },
    /// Check Istio YAML offline (like `istioctl analyze`): schema, weights, hosts, subsets,
    /// shadowed routes, conflicting and risky policies. Exits 1 when there is an error.
    Analyze {
        /// Files or directories (every .yaml/.yml file under them).
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Output format.
        #[arg(short, long, value_parser = ["text", "json"], default_value = "text")]
        output: String,
        /// Also ask the control plane (`--api`): check cluster hosts against its registered
        /// services instead of trusting every `svc.ns` name, and count its proxies' `tcp`
        /// inbound ports as TCP ports (`http-on-tcp-port`).
        #[arg(long)]
        registered: bool,
    },
    /// Certificate authority: rotate the root, issue static identity files.
    #[command(subcommand)]
    Ca(cmd::ca::CaCommand),
    /// Run a small demo mesh on this machine (Ctrl-C stops it).
    Demo(demo::DemoArgs),
    /// Check a bootstrap file and print the effective config as JSON.
    Validate {
        /// The bootstrap file.
        #[arg(long)]
        config: PathBuf,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum AccessLogFormat {
    /// One JSON object per request on stdout.
    Json,
    /// No access log.
    Off,
}

#[derive(clap::Args)]
struct ProxyArgs {
    /// The static bootstrap file.
    #[arg(long)]
    config: PathBuf,
    /// Access log on stdout.
    #[arg(long, value_enum, default_value = "off")]
    access_log: AccessLogFormat,
    /// Longest a graceful drain waits for in-flight requests (SIGTERM, POST /shutdown).
    #[arg(long, default_value = "30s")]
    drain_timeout: Duration,
    /// Metric series of a destination idle this long are dropped.
    #[arg(long, default_value = "10m")]
    metrics_retention: Duration,
    /// Worker threads (default: the CPUs this process may run on).
    #[arg(long)]
    workers: Option<usize>,
    /// Control plane gRPC address(es), `host:port[,host:port...]`: the workload certificate
    /// is obtained and renewed there, the workload registers, and config is pushed from
    /// there. Tried in turn; the proxy fails over between them.
    #[arg(long, value_delimiter = ',')]
    control: Vec<String>,
    /// File holding the join token (`trellis token create`); needed with --control.
    #[arg(long)]
    token: Option<PathBuf>,
    /// Keep the certificate and the last accepted config here, and start from them when the
    /// control plane is unreachable (static stability).
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// Workload label `key=value` (repeatable), added to the bootstrap's `labels`.
    #[arg(long = "label", value_parser = parse_label)]
    labels: Vec<(String, String)>,
    /// IP other workloads reach this one at (default: the address the control plane sees).
    #[arg(long)]
    advertise: Option<std::net::IpAddr>,
}

fn init_logs(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .compact()
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logs(&cli.log_level);
    match cli.command {
        Command::Proxy(args) => run_proxy(args),
        Command::Validate { config } => match trellis_proxy::config::Bootstrap::load(&config) {
            Ok(b) => {
                println!("{}", serde_json::to_string_pretty(&b).unwrap_or_default());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        },
        Command::Control(args) => report(cmd::control::run(args)),
        Command::Token(c) => report(cmd::token::run(&cli.api, c)),
        Command::Apply { files, dry_run } => match cmd::resources::apply(&cli.api, &files, dry_run)
        {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Get {
            kind,
            name,
            namespace,
            output,
        } => report(cmd::resources::get(
            &cli.api,
            &kind,
            name.as_deref(),
            namespace.as_deref(),
            &output,
        )),
        Command::Delete {
            kind,
            name,
            namespace,
        } => report(cmd::resources::delete(&cli.api, &kind, &name, &namespace)),
        Command::Certs { output } => report(cmd::certs::certs(&cli.api, output == "json")),
        Command::Check { output } => report_ok(cmd::certs::check(&cli.api, output == "json")),
        Command::Status { output } => report_ok(cmd::ops::status(&cli.api, output == "json")),
        Command::Backup { file, force } => report(cmd::ops::backup(&cli.api, &file, force)),
        Command::Restore { file, force } => report(cmd::ops::restore(&cli.api, &file, force)),
        Command::Analyze {
            paths,
            output,
            registered,
        } => cmd::analyze::run(
            &paths,
            output == "json",
            registered.then_some(cli.api.as_str()),
        ),
        Command::Ca(c) => report(cmd::ca::run(&cli.api, c)),
        Command::Demo(args) => match demo::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// For commands whose `Ok(false)` means "ran, and found a problem" (exit 1).
fn report_ok(r: anyhow::Result<bool>) -> ExitCode {
    match r {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not key=value")),
    }
}

fn run_proxy(args: ProxyArgs) -> ExitCode {
    let mut boot = match trellis_proxy::config::Bootstrap::load(&args.config) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    boot.labels.extend(args.labels.iter().cloned());
    let control = match control_config(&args, &boot) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(2);
        }
    };
    let opts = trellis_proxy::RunOptions {
        access_log: matches!(args.access_log, AccessLogFormat::Json),
        drain_timeout: args.drain_timeout.0,
        metrics_retention: args.metrics_retention.0,
        control,
        advertise: args.advertise,
    };
    let result = build_runtime(args.workers)
        .and_then(|rt| rt.block_on(trellis_proxy::run(boot, opts)).context("proxy"));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn control_config(
    args: &ProxyArgs,
    boot: &trellis_proxy::config::Bootstrap,
) -> anyhow::Result<Option<trellis_proxy::identity_client::ControlConfig>> {
    if args.control.is_empty() {
        anyhow::ensure!(args.token.is_none(), "--token needs --control");
        return Ok(None);
    }
    let file = args
        .token
        .as_ref()
        .context("--control needs --token FILE (create one with `trellis token create`)")?;
    let text = std::fs::read_to_string(file).with_context(|| format!("{}", file.display()))?;
    let token = text
        .trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
    let address = boot
        .inbound
        .iter()
        .map(|i| i.listen.to_string())
        .collect::<Vec<_>>()
        .join(",");
    Ok(Some(trellis_proxy::identity_client::ControlConfig {
        addrs: args.control.clone(),
        token,
        instance: instance_id(args.state_dir.as_deref(), &boot.service)?,
        address,
        state_dir: args.state_dir.clone(),
    }))
}

/// This proxy's instance id: kept in the state directory so a restarted proxy is the same
/// instance to the control plane (its certificate ledger entry and renewals).
fn instance_id(state_dir: Option<&std::path::Path>, service: &str) -> anyhow::Result<String> {
    let fresh = format!("{service}-{:08x}", std::process::id() ^ fastrand_seed());
    let Some(dir) = state_dir else {
        return Ok(fresh);
    };
    let file = dir.join(trellis_proxy::pushed::state_dir::INSTANCE);
    if let Ok(saved) = std::fs::read_to_string(&file) {
        let saved = saved.trim();
        if !saved.is_empty() {
            return Ok(saved.to_string());
        }
    }
    trellis_proxy::pushed::state_dir::write(
        dir,
        trellis_proxy::pushed::state_dir::INSTANCE,
        fresh.as_bytes(),
        false,
    )
    .with_context(|| format!("{}", file.display()))?;
    Ok(fresh)
}

/// A few random bits for instance ids, without another dependency.
fn fastrand_seed() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos())
}

fn build_runtime(workers: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let workers = workers
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
        .max(1);
    // One worker: a single-threaded runtime avoids work-stealing overhead entirely.
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    builder
        .enable_all()
        .build()
        .context("starting the async runtime")
}

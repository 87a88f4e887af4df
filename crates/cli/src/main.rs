//! `trellis`: the proxy, and (as they land) the control plane and the CLI commands.

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
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the data-plane proxy from a static bootstrap file.
    Proxy(ProxyArgs),
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
        Command::Demo(args) => match demo::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::FAILURE
            }
        },
    }
}

fn run_proxy(args: ProxyArgs) -> ExitCode {
    let boot = match trellis_proxy::config::Bootstrap::load(&args.config) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let opts = trellis_proxy::RunOptions {
        access_log: matches!(args.access_log, AccessLogFormat::Json),
        drain_timeout: args.drain_timeout.0,
        metrics_retention: args.metrics_retention.0,
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

fn build_runtime(workers: Option<usize>) -> anyhow::Result<tokio::runtime::Runtime> {
    let workers = workers
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
        .max(1);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

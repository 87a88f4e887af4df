//! `trellis control`.

use anyhow::Context as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use trellis_api::duration::Duration;
use trellis_control::state::CaSource;
use trellis_control::ControlOptions;

/// `trellis control` options.
#[derive(clap::Args)]
pub struct ControlArgs {
    /// State directory: the embedded store's data (CA, tokens, certificate ledger,
    /// resources in `store.json`, mode 0600).
    #[arg(long, default_value = "trellis-state")]
    state_dir: PathBuf,
    /// Where the mesh state lives: `embedded` (in --state-dir), or
    /// `etcd://host:port[,host:port...]` for several replicas sharing one etcd cluster.
    #[arg(long, default_value = "embedded", env = "TRELLIS_STORE")]
    store: String,
    /// Trust domain of mesh identities.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// gRPC listener (identity service; proxies connect here).
    #[arg(long, default_value = "127.0.0.1:15012")]
    grpc: SocketAddr,
    /// HTTP API listener (the CLI connects here). Keep it on loopback.
    #[arg(long, default_value = "127.0.0.1:15014")]
    http: SocketAddr,
    /// Use this CA certificate (root or intermediate, PEM; intermediates after it) instead
    /// of creating one.
    #[arg(long, requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// The key of --ca-cert.
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// Roots to trust (required when --ca-cert is an intermediate; may hold several roots).
    #[arg(long, requires = "ca_cert")]
    ca_bundle: Option<PathBuf>,
    /// Validity of a root CA this control plane creates.
    #[arg(long, default_value = "365d")]
    ca_validity: Duration,
    /// Lifetime of workload certificates.
    #[arg(long, default_value = "24h")]
    workload_cert_ttl: Duration,
    /// Default lifetime of join tokens.
    #[arg(long, default_value = "24h")]
    token_ttl: Duration,
    /// Extra DNS names for the control plane's serving certificate.
    #[arg(long)]
    dns_name: Vec<String>,
    /// A directory of resource YAML (e.g. a Git checkout) to load and watch; changes are
    /// validated and applied, an invalid change is rejected and the last good config stays.
    #[arg(long)]
    config_dir: Option<PathBuf>,
    /// Namespace whose policies without a selector apply to the whole mesh.
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
}

/// Runs the control plane until SIGTERM or SIGINT.
pub fn run(args: ControlArgs) -> anyhow::Result<()> {
    let opts = ControlOptions {
        state_dir: args.state_dir,
        store: args.store,
        trust_domain: args.trust_domain,
        grpc: args.grpc,
        http: args.http,
        ca: CaSource {
            cert: args.ca_cert,
            key: args.ca_key,
            bundle: args.ca_bundle,
            validity: args.ca_validity.0,
        },
        workload_cert_ttl: args.workload_cert_ttl.0,
        token_ttl: args.token_ttl.0,
        dns_names: args.dns_name,
        config_dir: args.config_dir,
        root_namespace: args.root_namespace,
    };
    // One worker per CPU: pushing to many proxies is parallel work.
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(trellis_control::run(opts))
        .context("control plane")
}

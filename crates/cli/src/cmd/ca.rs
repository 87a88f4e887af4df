//! `trellis ca rotate` and `trellis ca issue`.

use crate::api_client::{block_on, call};
use anyhow::Context as _;
use serde_json::json;
use std::path::PathBuf;
use std::time::Duration as StdDuration;
use trellis_api::duration::Duration;
use trellis_control::state::{CaSource, State};
use trellis_identity::SpiffeId;

/// CA commands.
#[derive(clap::Subcommand)]
pub enum CaCommand {
    /// Rotate the root CA without downtime, one step at a time:
    /// `prepare` (trust a new root beside the old), wait one workload certificate lifetime,
    /// `activate` (the new root signs), wait one lifetime, `finish` (drop the old root).
    Rotate {
        /// prepare | activate | finish
        #[arg(long, value_parser = ["prepare", "activate", "finish"])]
        step: String,
    },
    /// Issue a workload certificate and key to files, offline, from a control plane state
    /// directory (for proxies run with static identity files).
    Issue {
        /// The control plane state directory holding the CA.
        #[arg(long)]
        state_dir: PathBuf,
        /// Trust domain.
        #[arg(long, default_value = "cluster.local")]
        trust_domain: String,
        /// Service (and default service account).
        #[arg(long)]
        service: String,
        /// Namespace.
        #[arg(long, default_value = "default")]
        namespace: String,
        /// Service account.
        #[arg(long)]
        service_account: Option<String>,
        /// Lifetime.
        #[arg(long, default_value = "24h")]
        ttl: Duration,
        /// Directory for `<service>.pem`, `<service>-key.pem` and `ca.pem` (the bundle).
        #[arg(long)]
        out_dir: PathBuf,
    },
}

/// Runs a CA command.
pub fn run(api: &str, cmd: CaCommand) -> anyhow::Result<()> {
    match cmd {
        CaCommand::Rotate { step } => {
            let v = block_on(call(
                api,
                "POST",
                "/api/v1/ca/rotate",
                Some(json!({ "step": step })),
            ))??;
            println!(
                "CA rotation: {} (signing root {}, {} trusted root(s))",
                v["phase"].as_str().unwrap_or("?"),
                &v["signing_pin"].as_str().unwrap_or("?")
                    [..16.min(v["signing_pin"].as_str().unwrap_or("").len())],
                v["trust_roots"]
            );
        }
        CaCommand::Issue {
            state_dir,
            trust_domain,
            service,
            namespace,
            service_account,
            ttl,
            out_dir,
        } => {
            let state = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?
                .block_on(async {
                    let store = trellis_control::store::Store::open("embedded", &state_dir).await?;
                    let ca = CaSource {
                        validity: StdDuration::from_secs(365 * 86_400),
                        ..Default::default()
                    };
                    anyhow::Ok(State::open(std::sync::Arc::new(store), &trust_domain, &ca).await?)
                })?;
            let id = SpiffeId::new(
                &trust_domain,
                &namespace,
                service_account.as_deref().unwrap_or(&service),
            )?;
            let (issued, key, bundle) = state.with_ca(|ca| {
                ca.issue(&id, &[], &[], ttl.0)
                    .map(|(i, k)| (i, k, ca.bundle_pem()))
            })?;
            std::fs::create_dir_all(&out_dir).with_context(|| out_dir.display().to_string())?;
            let write = |name: String, data: &str, mode: u32| -> anyhow::Result<()> {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let path = out_dir.join(name);
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(mode)
                    .open(&path)
                    .with_context(|| path.display().to_string())?;
                f.write_all(data.as_bytes())?;
                Ok(())
            };
            write(format!("{service}.pem"), &issued.chain_pem, 0o644)?;
            write(format!("{service}-key.pem"), &key, 0o600)?;
            write("ca.pem".into(), &bundle, 0o644)?;
            println!(
                "issued {id} (serial {}), files in {}",
                issued.serial,
                out_dir.display()
            );
        }
    }
    Ok(())
}

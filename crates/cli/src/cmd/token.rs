//! `trellis token create|list|revoke`.

use crate::api_client::{block_on, call};
use anyhow::Context as _;
use serde_json::json;
use std::path::PathBuf;
use trellis_api::duration::Duration;

/// Join token commands.
#[derive(clap::Subcommand)]
pub enum TokenCommand {
    /// Create a join token for a workload; prints the token.
    Create {
        /// Service the workload runs.
        #[arg(long)]
        service: String,
        /// Its namespace.
        #[arg(long, default_value = "default")]
        namespace: String,
        /// Service account (identity `sa`); defaults to the service.
        #[arg(long)]
        service_account: Option<String>,
        /// How long the token can be used to join (default: the control plane's, 24h).
        #[arg(long)]
        ttl: Option<Duration>,
        /// Also write the token to this file (mode 0600).
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// List tokens (never their secrets).
    List,
    /// Revoke a token: it can no longer join, and proxies that joined with it can no
    /// longer renew (their current certificates run out).
    Revoke {
        /// Token id (the second field of the token, or from `trellis token list`).
        id: String,
    },
}

/// Runs a token command against the API at `api`.
pub fn run(api: &str, cmd: TokenCommand) -> anyhow::Result<()> {
    match cmd {
        TokenCommand::Create {
            service,
            namespace,
            service_account,
            ttl,
            out,
        } => {
            let mut body = json!({ "service": service, "namespace": namespace });
            if let Some(sa) = service_account {
                body["service_account"] = json!(sa);
            }
            if let Some(ttl) = ttl {
                body["ttl"] = json!(ttl.to_string());
            }
            let resp = block_on(call(api, "POST", "/api/v1/tokens", Some(body)))??;
            let token = resp["token"].as_str().context("the API sent no token")?;
            if let Some(path) = out {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create(true)
                    .truncate(true)
                    .mode(0o600)
                    .open(&path)
                    .with_context(|| path.display().to_string())?;
                writeln!(f, "{token}")?;
                eprintln!(
                    "token for {} written to {}",
                    resp["identity"].as_str().unwrap_or("?"),
                    path.display()
                );
            }
            println!("{token}");
        }
        TokenCommand::List => {
            let resp = block_on(call(api, "GET", "/api/v1/tokens", None))??;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            println!(
                "{:<14} {:<28} {:<16} {:<16} STATE",
                "ID", "SERVICE.NAMESPACE", "SERVICE ACCOUNT", "EXPIRES"
            );
            for t in resp["tokens"].as_array().into_iter().flatten() {
                let state = if t["revoked"].as_bool() == Some(true) {
                    "revoked"
                } else if t["expired"].as_bool() == Some(true) {
                    "expired"
                } else {
                    "active"
                };
                println!(
                    "{:<14} {:<28} {:<16} {:<16} {state}",
                    t["id"].as_str().unwrap_or(""),
                    format!(
                        "{}.{}",
                        t["service"].as_str().unwrap_or(""),
                        t["namespace"].as_str().unwrap_or("")
                    ),
                    t["service_account"].as_str().unwrap_or(""),
                    super::relative(t["expires_at"].as_u64().unwrap_or(0), now),
                );
            }
        }
        TokenCommand::Revoke { id } => {
            block_on(call(api, "DELETE", &format!("/api/v1/tokens/{id}"), None))??;
            println!("token {id} revoked");
        }
    }
    Ok(())
}

//! `trellis analyze PATH... [-o text|json]`: offline checks of Istio YAML, like
//! `istioctl analyze`. Loads the files, runs `trellis_api::analyze` and prints the findings.
//! Exit code: 0 when there is no error (warnings only included), 1 with errors, 2 when a PATH
//! does not exist or (with `--registered`) the control plane cannot be asked.

use serde_json::json;
use std::path::PathBuf;
use std::process::ExitCode;
use trellis_api::analyze::{analyze_with_registry, counts, summary, RegisteredWorkload, Registry};
use trellis_api::resources::load;

/// Runs the command.
pub fn run(paths: &[PathBuf], json_out: bool, registry_api: Option<&str>) -> ExitCode {
    if let Some(missing) = paths.iter().find(|p| !p.exists()) {
        eprintln!("error: {}: no such file or directory", missing.display());
        return ExitCode::from(2);
    }
    let (mut loaded, mut errors) = (Vec::new(), Vec::new());
    for p in paths {
        let (ok, err) = load(p);
        loaded.extend(ok);
        errors.extend(err);
    }
    let registry = match registry_api.map(registry).transpose() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: asking the control plane for registered services: {e:#}");
            return ExitCode::from(2);
        }
    };
    let findings = analyze_with_registry(&loaded, &errors, registry.as_ref());
    let (n_errors, n_warnings) = counts(&findings);
    if json_out {
        let v = json!({ "findings": findings, "errors": n_errors, "warnings": n_warnings });
        println!(
            "{}",
            serde_json::to_string_pretty(&v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
        );
    } else {
        for f in &findings {
            println!("{f}");
        }
        println!("{}", summary(&findings));
    }
    if n_errors > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// What the control plane at `api` has registered: its services (fully qualified) and its
/// workloads' labels and inbound ports.
fn registry(api: &str) -> anyhow::Result<Registry> {
    let status =
        crate::api_client::block_on(crate::api_client::call(api, "GET", "/api/v1/status", None))??;
    let workloads: Vec<RegisteredWorkload> = status["proxies"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            Some(RegisteredWorkload {
                service: p["service"].as_str()?.to_string(),
                namespace: p["namespace"].as_str()?.to_string(),
                labels: p["labels"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                    .collect(),
                ports: p["ports"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|port| {
                        let number = u16::try_from(port["port"].as_u64()?).ok()?;
                        Some((number, port["protocol"].as_str()?.to_string()))
                    })
                    .collect(),
            })
        })
        .collect();
    let services = workloads
        .iter()
        .map(|w| {
            format!(
                "{}.{}.svc.{}",
                w.service,
                w.namespace,
                trellis_api::names::DEFAULT_CLUSTER_DOMAIN
            )
        })
        .collect();
    Ok(Registry {
        services,
        workloads,
    })
}

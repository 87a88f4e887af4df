//! `trellis apply`, `trellis get`, `trellis delete`: resources on the control plane.

use crate::api_client::{block_on, call_raw};
use anyhow::{bail, Context as _};
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Canonical kind for what users type (`vs`, `virtualservices`, `VirtualService`, ...).
pub fn canonical_kind(kind: &str) -> anyhow::Result<&'static str> {
    let lower = kind.to_ascii_lowercase();
    let singular = lower
        .strip_suffix("ies")
        .map(|s| format!("{s}y"))
        .or_else(|| lower.strip_suffix('s').map(str::to_string));
    for k in std::iter::once(lower.as_str()).chain(singular.as_deref()) {
        let found = match k {
            "virtualservice" | "vs" => "VirtualService",
            "destinationrule" | "dr" => "DestinationRule",
            "serviceentry" | "se" => "ServiceEntry",
            "authorizationpolicy" | "ap" => "AuthorizationPolicy",
            "peerauthentication" | "pa" => "PeerAuthentication",
            "requestauthentication" | "ra" => "RequestAuthentication",
            "httproute" => "HTTPRoute",
            "mesh" => "Mesh",
            "ratelimit" | "rl" => "RateLimit",
            _ => continue,
        };
        return Ok(found);
    }
    bail!("unknown kind {kind:?} (try VirtualService, DestinationRule, ServiceEntry, AuthorizationPolicy, PeerAuthentication, RequestAuthentication, HTTPRoute, Mesh, RateLimit)")
}

fn yaml_files(path: &Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| path.display().to_string())?
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        for e in entries {
            if e.is_dir() || e.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                yaml_files(&e, out)?;
            }
        }
        Ok(())
    } else if path.exists() {
        out.push(path.to_path_buf());
        Ok(())
    } else {
        bail!("{}: no such file or directory", path.display())
    }
}

/// `trellis apply -f PATH... [--dry-run]`: every file is validated first; if any is invalid
/// nothing is applied.
pub fn apply(api: &str, paths: &[PathBuf], dry_run: bool) -> anyhow::Result<bool> {
    let mut files = Vec::new();
    for p in paths {
        yaml_files(p, &mut files)?;
    }
    let texts: Vec<(String, String)> = files
        .iter()
        .map(|f| {
            Ok((
                f.display().to_string(),
                std::fs::read_to_string(f).with_context(|| f.display().to_string())?,
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    // Pass 1: validate everything (a dry run per file).
    let mut invalid = false;
    let mut planned = Vec::new();
    for (name, text) in &texts {
        let (status, v) = block_on(call_raw(
            api,
            "POST",
            "/api/v1/resources?dryRun=true",
            Some(name),
            text.clone(),
        ))??;
        if status == 400 {
            invalid = true;
            for e in v["errors"].as_array().into_iter().flatten() {
                eprintln!("error: {}", e.as_str().unwrap_or(""));
            }
            if v["errors"].is_null() {
                eprintln!(
                    "error: {}: {}",
                    name,
                    v["error"].as_str().unwrap_or("invalid")
                );
            }
        } else if status >= 300 {
            bail!(
                "{}: {}",
                name,
                v["error"].as_str().unwrap_or("the control plane refused")
            );
        } else {
            planned.push(v);
        }
    }
    if invalid {
        eprintln!("nothing applied");
        return Ok(false);
    }
    let print = |v: &Value, suffix: &str| {
        for c in v["changes"].as_array().into_iter().flatten() {
            println!(
                "{} {}{suffix}",
                c["object"].as_str().unwrap_or(""),
                c["action"].as_str().unwrap_or("")
            );
            if let Some(diff) = c["diff"].as_str().filter(|d| !d.is_empty()) {
                print!("{diff}");
            }
        }
    };
    if dry_run {
        for v in &planned {
            print(v, " (dry run)");
        }
        return Ok(true);
    }
    // Pass 2: apply.
    for (name, text) in &texts {
        let (status, v) = block_on(call_raw(
            api,
            "POST",
            "/api/v1/resources",
            Some(name),
            text.clone(),
        ))??;
        if status >= 300 {
            bail!(
                "{}: {}",
                name,
                v["error"].as_str().unwrap_or("the control plane refused")
            );
        }
        print(&v, "");
    }
    Ok(true)
}

/// `trellis get KIND [NAME] [-n NS] [-o table|yaml|json]`.
pub fn get(
    api: &str,
    kind: &str,
    name: Option<&str>,
    namespace: Option<&str>,
    output: &str,
) -> anyhow::Result<()> {
    let kind = canonical_kind(kind)?;
    let mut path = format!("/api/v1/resources?kind={kind}");
    if let Some(n) = name {
        path.push_str(&format!("&name={n}"));
    }
    if let Some(ns) = namespace {
        path.push_str(&format!("&namespace={ns}"));
    }
    let v = block_on(crate::api_client::call(api, "GET", &path, None))??;
    let items = v["items"].as_array().cloned().unwrap_or_default();
    if name.is_some() && items.is_empty() {
        bail!("{kind} {} not found", name.unwrap_or_default());
    }
    match output {
        "json" => println!(
            "{}",
            serde_json::to_string_pretty(&if name.is_some() {
                items[0].clone()
            } else {
                Value::Array(items)
            })?
        ),
        "yaml" => {
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    println!("---");
                }
                print!("{}", serde_yaml_ng::to_string(item)?);
            }
        }
        _ => {
            println!("{:<24} {:<20} NAME", "KIND", "NAMESPACE");
            for item in &items {
                println!(
                    "{:<24} {:<20} {}",
                    item["kind"].as_str().unwrap_or(""),
                    item["metadata"]["namespace"].as_str().unwrap_or("default"),
                    item["metadata"]["name"].as_str().unwrap_or("")
                );
            }
        }
    }
    Ok(())
}

/// `trellis delete KIND NAME [-n NS]`.
pub fn delete(api: &str, kind: &str, name: &str, namespace: &str) -> anyhow::Result<()> {
    let kind = canonical_kind(kind)?;
    block_on(crate::api_client::call(
        api,
        "DELETE",
        &format!("/api/v1/resources/{kind}/{namespace}/{name}"),
        None,
    ))??;
    println!("{kind}/{namespace}/{name} deleted");
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn kinds_as_users_type_them() {
        for (typed, kind) in [
            ("vs", "VirtualService"),
            ("virtualservices", "VirtualService"),
            ("VirtualService", "VirtualService"),
            ("destinationrules", "DestinationRule"),
            ("serviceentries", "ServiceEntry"),
            ("authorizationpolicies", "AuthorizationPolicy"),
            ("pa", "PeerAuthentication"),
            ("httproutes", "HTTPRoute"),
            ("ratelimits", "RateLimit"),
        ] {
            assert_eq!(super::canonical_kind(typed).unwrap(), kind, "{typed}");
        }
        assert!(super::canonical_kind("gadgets").is_err());
    }
}

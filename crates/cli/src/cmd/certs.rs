//! `trellis certs` (every proxy's identity and expiry) and `trellis check` (control plane and
//! store reachable, proxies in sync, certificates not expiring).

use super::ops::{service_of, SyncState};
use crate::api_client::{block_on, call, get_any_status};
use serde_json::{json, Value};

/// The CA warns when it expires within this.
const CA_WARN_SECS: u64 = 30 * 86_400;
/// A workload certificate warns when it expires within this...
const WORKLOAD_WARN_SECS: u64 = 7 * 86_400;
/// ...or, for short-lived auto-rotated certificates, when less than this share of its
/// lifetime is left (its renewal at ~70% is overdue).
const OVERDUE_SHARE: f64 = 0.2;

fn fetch(api: &str) -> anyhow::Result<Value> {
    block_on(call(api, "GET", "/api/v1/certs", None))?
}

/// `trellis certs [-o json]`.
pub fn certs(api: &str, json_out: bool) -> anyhow::Result<()> {
    let v = fetch(api)?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let now = v["now"].as_u64().unwrap_or(0);
    println!(
        "CA {} expires {} ({} trusted root(s), rotation: {})",
        &v["ca"]["pin"].as_str().unwrap_or("?")
            [..16.min(v["ca"]["pin"].as_str().unwrap_or("").len())],
        super::relative(v["ca"]["not_after"].as_u64().unwrap_or(0), now),
        v["ca"]["trust_roots"],
        v["rotation"].as_str().unwrap_or("?"),
    );
    println!(
        "{:<52} {:<28} {:<18} {:<14} ADDRESS",
        "IDENTITY", "INSTANCE", "EXPIRES", "SERIAL"
    );
    let mut rows: Vec<&Value> = v["workloads"].as_array().into_iter().flatten().collect();
    rows.sort_by_key(|r| {
        (
            r["identity"].as_str().unwrap_or("").to_string(),
            r["instance"].as_str().unwrap_or("").to_string(),
        )
    });
    for r in rows {
        let serial = r["serial"].as_str().unwrap_or("");
        println!(
            "{:<52} {:<28} {:<18} {:<14} {}",
            r["identity"].as_str().unwrap_or(""),
            r["instance"].as_str().unwrap_or(""),
            super::relative(r["not_after"].as_u64().unwrap_or(0), now),
            &serial[..serial.len().min(12)],
            r["address"].as_str().unwrap_or(""),
        );
    }
    Ok(())
}

/// Severity of one finding.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Level {
    Ok,
    Warn,
    Fail,
}

/// The proxies of `/api/v1/status` that are not in sync or refused their latest config.
fn sync_findings(api: &str, findings: &mut Vec<(Level, String)>) {
    let v = match block_on(call(api, "GET", "/api/v1/status", None)) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) | Err(e) => {
            findings.push((Level::Fail, format!("proxy status unavailable: {e:#}")));
            return;
        }
    };
    let proxies = v["proxies"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    let mut bad = 0;
    for p in proxies {
        let who = format!(
            "{} ({})",
            service_of(p),
            p["instance"].as_str().unwrap_or("?")
        );
        match SyncState::of(p) {
            SyncState::InSync => continue,
            SyncState::Stale { acked, sent } => findings.push((
                Level::Fail,
                format!("{who}: not in sync (accepted config version {acked}, sent {sent})"),
            )),
            SyncState::Nack { version, error } => findings.push((
                Level::Fail,
                format!("{who}: refused config version {version}: {error}"),
            )),
        }
        bad += 1;
    }
    if bad == 0 {
        findings.push((
            Level::Ok,
            format!(
                "{} prox{} in sync with config version {}",
                proxies.len(),
                if proxies.len() == 1 { "y" } else { "ies" },
                v["config_version"]
            ),
        ));
    }
}

/// `trellis check [-o json]`: exit 1 when something fails.
pub fn check(api: &str, json_out: bool) -> anyhow::Result<bool> {
    let mut findings: Vec<(Level, String)> = Vec::new();
    let healthy = match block_on(get_any_status(api, "/api/v1/health"))? {
        Err(e) => {
            findings.push((Level::Fail, format!("control plane unreachable: {e:#}")));
            false
        }
        Ok((200, v)) => {
            findings.push((Level::Ok, format!("control plane reachable at {api}")));
            findings.push((
                Level::Ok,
                format!("store: {}", v["store"].as_str().unwrap_or("?")),
            ));
            true
        }
        Ok((status, v)) => {
            findings.push((Level::Ok, format!("control plane reachable at {api}")));
            let store = v["store"].as_str().unwrap_or("?");
            let error = v["error"].as_str().unwrap_or("no details");
            findings.push((
                Level::Fail,
                format!("store {store} unavailable (HTTP {status}): {error}"),
            ));
            false
        }
    };
    if healthy {
        sync_findings(api, &mut findings);
        let v = fetch(api)?;
        let now = v["now"].as_u64().unwrap_or(0);
        let ca_end = v["ca"]["not_after"].as_u64().unwrap_or(0);
        let when = super::relative(ca_end, now);
        findings.push(if ca_end <= now {
            (Level::Fail, format!("CA certificate expired {when}"))
        } else if ca_end - now < CA_WARN_SECS {
            (Level::Warn, format!("CA certificate expires {when} (under 30 days): rotate it (`trellis ca rotate`)"))
        } else {
            (Level::Ok, format!("CA certificate expires {when}"))
        });
        for r in v["workloads"].as_array().into_iter().flatten() {
            let id = r["identity"].as_str().unwrap_or("?");
            let instance = r["instance"].as_str().unwrap_or("?");
            let end = r["not_after"].as_u64().unwrap_or(0);
            let issued = r["issued_at"].as_u64().unwrap_or(0);
            let when = super::relative(end, now);
            let lifetime = end.saturating_sub(issued).max(1);
            let left = end.saturating_sub(now);
            let overdue = if lifetime <= WORKLOAD_WARN_SECS {
                (left as f64) < OVERDUE_SHARE * lifetime as f64
            } else {
                left < WORKLOAD_WARN_SECS
            };
            findings.push(if end <= now {
                (
                    Level::Fail,
                    format!("{id} ({instance}): certificate expired {when}"),
                )
            } else if overdue {
                (
                    Level::Warn,
                    format!(
                        "{id} ({instance}): certificate expires {when} and has not been renewed"
                    ),
                )
            } else {
                (
                    Level::Ok,
                    format!("{id} ({instance}): certificate expires {when}"),
                )
            });
        }
    }
    let worst = findings.iter().map(|f| f.0).max().unwrap_or(Level::Ok);
    if json_out {
        let items: Vec<Value> = findings
            .iter()
            .map(|(l, m)| json!({ "level": match l { Level::Ok => "ok", Level::Warn => "warn", Level::Fail => "fail" }, "message": m }))
            .collect();
        println!(
            "{}",
            serde_json::to_string_pretty(
                &json!({ "ok": worst != Level::Fail, "findings": items })
            )?
        );
    } else {
        for (l, m) in &findings {
            let tag = match l {
                Level::Ok => "ok  ",
                Level::Warn => "WARN",
                Level::Fail => "FAIL",
            };
            println!("[{tag}] {m}");
        }
    }
    Ok(worst != Level::Fail)
}

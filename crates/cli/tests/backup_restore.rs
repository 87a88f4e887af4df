//! `trellis backup` / `trellis restore` between two control planes (CA, tokens, resources),
//! `trellis status`, and what `trellis check` says about the store and proxy sync.

mod common;

use common::*;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use trellis_testkit::client::http1_get;
use trellis_testkit::proxy::{Control, TempDir};

const STRICT: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: strict-edtech
  namespace: edtech
spec:
  mtls: { mode: STRICT }
";

/// GET on a control plane's API: the JSON body of a 200.
async fn api_get(control: &Control, path: &str) -> serde_json::Value {
    let (status, _, body) = http1_get(control.api, path, &[]).await.unwrap();
    assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
    json(&body)
}

async fn ca_pin(control: &Control) -> String {
    api_get(control, "/api/v1/certs").await["ca"]["pin"]
        .as_str()
        .unwrap()
        .to_string()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn a_backup_restores_the_ca_tokens_and_resources_into_a_fresh_control_plane() {
    let a = Control::start(BIN, &[]).await;
    let token = a.token("grades", "edtech", &[]);
    let token_id = std::fs::read_to_string(&token)
        .unwrap()
        .trim()
        .split('.')
        .nth(1)
        .unwrap()
        .to_string();
    let dir = TempDir::new("backup");
    let pa = dir.path().join("strict.yaml");
    std::fs::write(&pa, STRICT).unwrap();
    let (code, out, err) = a.cli(&["apply", "-f", pa.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}{err}");
    let pin_a = ca_pin(&a).await;

    // The backup: mode 0600, a summary of what is in it.
    let file = dir.path().join("mesh.backup");
    let f = file.to_str().unwrap();
    let (code, out, err) = a.cli(&["backup", f]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("1 token,") && out.contains("1 resource,") && out.contains("CA key"),
        "{out}"
    );
    assert!(err.contains("CA private key"), "{err}");
    assert_eq!(mode(&file), 0o600);
    let archive = json(&std::fs::read(&file).unwrap());
    assert_eq!(archive["format"], "trellis-backup/v1");
    assert_eq!(archive["trust_domain"], "cluster.local");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

    // An existing file is kept unless --force.
    let before = std::fs::read(&file).unwrap();
    let (code, _, err) = a.cli(&["backup", f]);
    assert_eq!(code, Some(1));
    assert!(
        err.starts_with("error: ") && err.contains("already exists") && err.contains("--force"),
        "{err}"
    );
    assert_eq!(std::fs::read(&file).unwrap(), before);
    let (code, out, err) = a.cli(&["backup", f, "--force"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert_eq!(mode(&file), 0o600);

    // A fresh control plane has its own CA until the restore.
    let b = Control::start(BIN, &[]).await;
    assert_ne!(ca_pin(&b).await, pin_a);
    let (code, out, err) = b.cli(&["restore", f]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains(&pin_a), "{out}");
    assert_eq!(ca_pin(&b).await, pin_a);
    let (code, out, _) = b.cli(&["certs", "-o", "json"]);
    assert_eq!(code, Some(0));
    assert_eq!(json(out.as_bytes())["ca"]["pin"], pin_a.as_str());

    let (code, out, err) = b.cli(&["get", "peerauthentication"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains("PeerAuthentication")
            && out.contains("edtech")
            && out.contains("strict-edtech"),
        "{out}"
    );
    let tokens = api_get(&b, "/api/v1/tokens").await;
    let restored = tokens["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["id"] == token_id.as_str())
        .unwrap_or_else(|| panic!("token {token_id} not on B: {tokens}"));
    assert_eq!(restored["service"], "grades");
    assert_eq!(restored["revoked"], false);
    let (code, out, _) = b.cli(&["check"]);
    assert_eq!(code, Some(0), "{out}");

    // Restoring over what is now there is refused, unless forced.
    let (code, out, err) = b.cli(&["restore", f]);
    assert_eq!(code, Some(1), "{out}");
    assert!(
        err.starts_with("error: ") && err.contains("already has") && err.contains("force"),
        "{err}"
    );
    let (code, out, err) = b.cli(&["restore", f, "--force"]);
    assert_eq!(code, Some(0), "{out}{err}");

    // The restored state is durable: a restart of B keeps A's CA.
    let state = b.kill();
    let b = Control::start_in(BIN, state, &[]).await;
    assert_eq!(ca_pin(&b).await, pin_a);
}

#[tokio::test]
async fn restore_refuses_what_is_not_a_backup_of_this_mesh() {
    let a = Control::start(BIN, &[]).await;
    let dir = TempDir::new("bad-backup");
    let restore = |name: &str, text: &str| {
        let file = dir.path().join(name);
        std::fs::write(&file, text).unwrap();
        let (code, out, err) = a.cli(&["restore", file.to_str().unwrap()]);
        assert_ne!(code, Some(0), "{name}: {out}{err}");
        assert!(err.starts_with("error: "), "{name}: {err}");
        err
    };
    let err = restore("notes.txt", "this is not JSON\n");
    assert!(
        err.contains("notes.txt")
            && err.contains("not a Trellis backup")
            && err.contains("not JSON"),
        "{err}"
    );
    let err = restore("other.json", r#"{"hello": "world"}"#);
    assert!(err.contains("not a Trellis backup"), "{err}");
    let err = restore(
        "future.json",
        r#"{"format": "trellis-backup/v9", "keys": {}}"#,
    );
    assert!(
        err.contains("not a Trellis backup") && err.contains("trellis-backup/v9"),
        "{err}"
    );
    let err = restore(
        "nokeys.json",
        r#"{"format": "trellis-backup/v1", "created_at": 1, "trust_domain": "cluster.local", "keys": {}}"#,
    );
    assert!(err.contains("ca/cert.pem"), "{err}");
    let (code, _, err) = a.cli(&["restore", dir.path().join("missing").to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(err.contains("missing"), "{err}");

    // A backup of another trust domain is refused by the control plane.
    let other = Control::start(BIN, &["--trust-domain", "other.example"]).await;
    let file = dir.path().join("other.backup");
    let (code, out, err) = other.cli(&["backup", file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{out}{err}");
    let (code, _, err) = a.cli(&["restore", file.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(
        err.starts_with("error: ") && err.contains("trust domain other.example"),
        "{err}"
    );

    // Nothing was restored.
    let (_, out, _) = a.cli(&["check"]);
    assert!(out.contains("store: embedded"), "{out}");
}

#[tokio::test]
async fn status_with_no_proxies_and_check_reports_the_store() {
    let control = Control::start(BIN, &[]).await;
    let (code, out, err) = control.cli(&["status"]);
    assert_eq!(code, Some(0), "{out}{err}");
    let mut lines = out.lines();
    let header = lines.next().unwrap();
    assert!(
        header.starts_with("config version ") && header.contains("0 proxies"),
        "{out}"
    );
    let columns = lines.next().unwrap();
    for c in [
        "SERVICE",
        "INSTANCE",
        "ADDRESS",
        "READY",
        "VERSION",
        "SYNC",
        "CERT EXPIRES",
        "REPLICA",
    ] {
        assert!(columns.contains(c), "{columns}");
    }
    assert_eq!(lines.next(), None, "{out}");

    let (code, out, _) = control.cli(&["status", "-o", "json"]);
    assert_eq!(code, Some(0));
    let v = json(out.as_bytes());
    assert_eq!(v["proxies"], serde_json::json!([]));
    assert!(v["config_version"].is_u64() && v["now"].is_u64(), "{v}");

    let (code, out, _) = control.cli(&["check"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("[ok  ] store: embedded ("), "{out}");
    assert!(out.contains("[ok  ] 0 proxies in sync"), "{out}");
    assert!(out.contains("CA certificate expires"), "{out}");

    // Unreachable: status reports the API error and exits 1.
    let api = control.api;
    drop(control);
    let out = std::process::Command::new(BIN)
        .args(["status"])
        .env("TRELLIS_API", api.to_string())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("error: cannot reach"));
}

#[tokio::test]
async fn check_fails_when_the_store_is_unavailable() {
    let mut etcd = trellis_testkit::EtcdCluster::start(1);
    let control = Control::start(BIN, &["--store", &etcd.store_url()]).await;
    let (code, out, _) = control.cli(&["check"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("[ok  ] store: etcd"), "{out}");
    etcd.kill(0);
    let (code, out, err) = control.cli(&["check"]);
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(
        out.contains("[ok  ] control plane reachable") && out.contains("[FAIL] store etcd"),
        "{out}"
    );
    assert!(out.contains("unavailable"), "{out}");
}

#[tokio::test]
async fn status_lists_a_joined_proxy_in_sync() {
    let control = Control::start(BIN, &[]).await;
    let token = control.token("grades", "edtech", &[]);
    let (admin, inbound, app) = (free_addr(), free_addr(), free_addr());
    let grpc = control.grpc.to_string();
    let _proxy = proxy(
        &format!(
            "service: grades\nnamespace: edtech\nadmin: {admin}\noutbound: {{ listen: null }}\n\
             inbound:\n  - listen: {inbound}\n    app: {app}\n"
        ),
        admin,
        &["--control", &grpc, "--token", token.to_str().unwrap()],
    )
    .await;
    trellis_testkit::wait::wait_for(
        "the proxy is listed in sync",
        std::time::Duration::from_secs(10),
        || {
            let (code, out, _) = control.cli(&["status"]);
            async move { code == Some(0) && out.contains("grades.edtech") }
        },
    )
    .await;
    let (code, out, _) = control.cli(&["status"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.lines().next().unwrap().contains("1 proxy, 1 in sync"),
        "{out}"
    );
    let row = out
        .lines()
        .find(|l| l.starts_with("grades.edtech"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(row.contains(&inbound.to_string()), "{row}");
    assert!(row.contains(" yes "), "{row}");
    assert!(row.contains("in sync"), "{row}");
    assert!(row.contains("in 23h") || row.contains("in 1d"), "{row}");
    let (code, out, _) = control.cli(&["check"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("[ok  ] 1 proxy in sync"), "{out}");
}

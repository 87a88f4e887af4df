//! `trellis apply/get/delete` against a real control plane: validation before storage, dry
//! runs with diffs, all-or-nothing, persistence across a restart.

mod common;

use common::*;
use trellis_testkit::proxy::{Control, TempDir};

const CANARY: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  namespace: edtech
spec:
  hosts: [reviews]
  http:
  - route:
    - destination: { host: reviews, subset: v1 }
      weight: 90
    - destination: { host: reviews, subset: v2 }
      weight: 10
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata:
  name: reviews
  namespace: edtech
spec:
  host: reviews
  subsets:
  - { name: v1, labels: { version: v1 } }
  - { name: v2, labels: { version: v2 } }
";

#[tokio::test]
async fn apply_get_delete_with_dry_run_and_validation() {
    let control = Control::start(BIN, &[]).await;
    let dir = TempDir::new("apply");
    let file = dir.path().join("canary.yaml");
    std::fs::write(&file, CANARY).unwrap();
    let f = file.to_str().unwrap();

    let (code, out, err) = control.cli(&["apply", "-f", f]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("VirtualService/edtech/reviews created"),
        "{out}"
    );
    assert!(
        out.contains("DestinationRule/edtech/reviews created"),
        "{out}"
    );

    let (code, out, _) = control.cli(&["get", "vs"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("VirtualService") && out.contains("edtech") && out.contains("reviews"),
        "{out}"
    );
    let (code, out, _) = control.cli(&[
        "get",
        "virtualservice",
        "reviews",
        "-n",
        "edtech",
        "-o",
        "json",
    ]);
    assert_eq!(code, Some(0));
    assert_eq!(
        json(out.as_bytes())["spec"]["http"][0]["route"][1]["weight"],
        10
    );

    // A dry run shows the diff against what is live and changes nothing.
    std::fs::write(
        &file,
        CANARY
            .replace("weight: 90", "weight: 75")
            .replace("weight: 10", "weight: 25"),
    )
    .unwrap();
    let (code, out, _) = control.cli(&["apply", "-f", f, "--dry-run"]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("VirtualService/edtech/reviews configured (dry run)"),
        "{out}"
    );
    assert!(
        out.contains("-  weight: 90") || out.contains("-      weight: 90"),
        "{out}"
    );
    assert!(
        out.contains("DestinationRule/edtech/reviews unchanged"),
        "{out}"
    );
    let (_, out, _) = control.cli(&["get", "vs", "reviews", "-n", "edtech", "-o", "json"]);
    assert_eq!(
        json(out.as_bytes())["spec"]["http"][0]["route"][1]["weight"],
        10,
        "dry run changed nothing"
    );

    // An invalid file is refused with file and line, and nothing of the batch is applied.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(&bad, "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: { name: ratings, namespace: edtech }\nspec:\n  host: ratings\n  trafficPolicy:\n    loadBalancer:\n      simple: FASTEST\n").unwrap();
    let (code, _, err) = control.cli(&["apply", "-f", dir.path().to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("bad.yaml:8: DestinationRule/ratings: spec.trafficPolicy.loadBalancer.simple"),
        "{err}"
    );
    assert!(err.contains("nothing applied"), "{err}");
    let (_, out, _) = control.cli(&["get", "vs", "reviews", "-n", "edtech", "-o", "json"]);
    assert_eq!(
        json(out.as_bytes())["spec"]["http"][0]["route"][1]["weight"],
        10
    );
    std::fs::remove_file(&bad).unwrap();

    // The real apply, then a restart of the control plane keeps it.
    let (code, out, _) = control.cli(&["apply", "-f", f]);
    assert_eq!(code, Some(0));
    assert!(
        out.contains("VirtualService/edtech/reviews configured"),
        "{out}"
    );
    let state = control.kill();
    let control = Control::start_in(BIN, state, &[]).await;
    let (_, out, _) = control.cli(&["get", "vs", "reviews", "-n", "edtech", "-o", "yaml"]);
    assert!(out.contains("weight: 25"), "{out}");

    let (code, out, _) = control.cli(&["delete", "vs", "reviews", "-n", "edtech"]);
    assert_eq!(code, Some(0), "{out}");
    let (code, _, err) = control.cli(&["get", "vs", "reviews", "-n", "edtech"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("not found"), "{err}");
    let (code, _, err) = control.cli(&["get", "gadgets"]);
    assert_eq!(code, Some(1));
    assert!(err.contains("unknown kind"), "{err}");
}

#[tokio::test]
async fn a_watched_config_directory_is_applied_and_bad_changes_are_rejected() {
    let dir = TempDir::new("gitops");
    let repo = dir.path().join("repo");
    std::fs::create_dir_all(repo.join("edtech")).unwrap();
    std::fs::write(repo.join("edtech/canary.yaml"), CANARY).unwrap();
    let control = Control::start(BIN, &["--config-dir", repo.to_str().unwrap()]).await;
    let weight = || {
        let (code, out, _) = control.cli(&["get", "vs", "reviews", "-n", "edtech", "-o", "json"]);
        (code == Some(0)).then(|| {
            json(out.as_bytes())["spec"]["http"][0]["route"][1]["weight"]
                .as_u64()
                .unwrap()
        })
    };
    trellis_testkit::wait::wait_for(
        "the directory is loaded",
        std::time::Duration::from_secs(5),
        || {
            let w = weight();
            async move { w == Some(10) }
        },
    )
    .await;

    // An invalid change is rejected as a whole; the last good config stays.
    std::fs::write(
        repo.join("edtech/canary.yaml"),
        CANARY.replace("weight: 10", "weight: 10\n      bogus: true"),
    )
    .unwrap();
    trellis_testkit::wait::wait_for(
        "the rejection is logged",
        std::time::Duration::from_secs(5),
        || {
            let log = control.log();
            async move { log.contains("config directory rejected") && log.contains("canary.yaml") }
        },
    )
    .await;
    assert_eq!(weight(), Some(10));

    // A good change is applied; a removed file removes its resources.
    std::fs::write(
        repo.join("edtech/canary.yaml"),
        CANARY
            .replace("weight: 90", "weight: 50")
            .replace("weight: 10", "weight: 50"),
    )
    .unwrap();
    trellis_testkit::wait::wait_for(
        "the change is applied",
        std::time::Duration::from_secs(5),
        || {
            let w = weight();
            async move { w == Some(50) }
        },
    )
    .await;
    std::fs::remove_file(repo.join("edtech/canary.yaml")).unwrap();
    trellis_testkit::wait::wait_for(
        "the resources are removed",
        std::time::Duration::from_secs(5),
        || {
            let w = weight();
            async move { w.is_none() }
        },
    )
    .await;
}

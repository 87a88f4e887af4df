//! `trellis analyze` on checked-in YAML, through the real binary.
//!
//! The binary runs in `tests/analyze/` with relative paths, so the printed file names (and
//! the golden files `bad.expected`, `tcp-ports.expected`) do not depend on where the
//! repository is. After an intended change of the output, regenerate the golden files with
//! `TRELLIS_BLESS=1 cargo test -p trellis-cli --test analyze`.

mod common;

use common::BIN;
use std::path::PathBuf;
use std::process::{Command, Stdio};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/analyze")
}

/// Runs `trellis analyze ARGS` in `tests/analyze/`: (exit code, stdout, stderr).
fn analyze(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(BIN)
        .arg("analyze")
        .args(args)
        .current_dir(dir())
        .stdin(Stdio::null())
        .output()
        .expect("running trellis");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn good_config_is_clean() {
    let (code, out, err) = analyze(&["good"]);
    assert_eq!(out, "0 errors, 0 warnings\n", "stderr: {err}");
    assert_eq!(code, Some(0));
}

#[test]
fn bad_config_matches_the_golden_file() {
    let (code, out, err) = analyze(&["bad"]);
    let golden = dir().join("bad.expected");
    if std::env::var_os("TRELLIS_BLESS").is_some() {
        std::fs::write(&golden, &out).expect("writing bad.expected");
    }
    let want = std::fs::read_to_string(&golden).expect("reading bad.expected");
    assert_eq!(out, want, "stderr: {err}");
    assert_eq!(code, Some(1));
    // Every rule is exercised.
    for code in [
        "schema",
        "weights",
        "unknown-host",
        "unknown-subset",
        "shadowed-route",
        "conflict",
        "duplicate",
        "single-clause-rules",
        "path-wildcard",
        "not-values-empty",
        "custom-action",
        "empty-allow",
    ] {
        assert!(
            out.contains(&format!("[{code}] ")),
            "no {code} finding:\n{out}"
        );
    }
}

#[test]
fn the_user_data_policies_give_exactly_their_warnings() {
    let (code, out, _) = analyze(&["bad/authz.yaml"]);
    assert_eq!(code, Some(1)); // the CUSTOM policy in the same file
    let of = |name: &str| -> Vec<String> {
        out.lines()
            .filter(|l| l.contains(&format!("AuthorizationPolicy/default/{name}: ")))
            .map(|l| l.split(']').next().unwrap_or("").to_string())
            .collect()
    };
    assert_eq!(of("user-data-protection"), ["warning[single-clause-rules"]);
    assert_eq!(
        of("user-data-protection-any-role"),
        ["warning[single-clause-rules", "warning[not-values-empty"]
    );
}

#[test]
fn http_rules_on_tcp_ports_match_their_golden_file() {
    let (code, out, err) = analyze(&["tcp-ports"]);
    let golden = dir().join("tcp-ports.expected");
    if std::env::var_os("TRELLIS_BLESS").is_some() {
        std::fs::write(&golden, &out).expect("writing tcp-ports.expected");
    }
    let want = std::fs::read_to_string(&golden).expect("reading tcp-ports.expected");
    assert_eq!(out, want, "stderr: {err}");
    assert_eq!(code, Some(0), "warnings only");
    let of = |name: &str| -> Vec<&str> {
        out.lines()
            .filter(|l| l.contains(&format!("AuthorizationPolicy/edtech/{name}: ")))
            .collect()
    };
    let readers = of("grades-db-readers");
    assert_eq!(readers.len(), 1, "{out}");
    assert!(
        readers[0].starts_with("warning[http-on-tcp-port] ")
            && readers[0].contains("port 5432 is TCP (ServiceEntry/edtech/grades-db)")
            && readers[0].contains("(to[0].operation.methods)")
            && readers[0].ends_with("never allows a connection on it"),
        "{}",
        readers[0]
    );
    let admin = of("grades-db-admin");
    assert_eq!(admin.len(), 1, "{out}");
    assert!(
        admin[0].contains("(to[0].operation.paths, when[0] request.auth.claims[role])")
            && admin[0].contains(
                "this DENY rule denies every connection to the port that its other fields match"
            ),
        "{}",
        admin[0]
    );
    assert!(of("grades-db-ok").is_empty(), "{out}");
}

#[test]
fn json_output_parses_and_counts_match() {
    let (code, out, err) = analyze(&["-o", "json", "bad"]);
    assert_eq!(code, Some(1), "stderr: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    let findings = v["findings"].as_array().expect("findings");
    let count = |level: &str| findings.iter().filter(|f| f["level"] == level).count();
    assert_eq!(v["errors"].as_u64(), Some(count("error") as u64));
    assert_eq!(v["warnings"].as_u64(), Some(count("warning") as u64));
    assert!(count("error") > 0 && count("warning") > 0);
    let (text_code, text, _) = analyze(&["bad"]);
    assert_eq!(text_code, Some(1));
    let summary = format!("{} errors, {} warnings\n", v["errors"], v["warnings"]);
    assert!(text.ends_with(&summary), "{text}");
    let weights = findings
        .iter()
        .find(|f| f["code"] == "weights")
        .expect("a weights finding");
    assert_eq!(weights["file"], "bad/routes.yaml");
    assert_eq!(weights["object"], "VirtualService/edtech/reviews");
    assert!(weights["line"].as_u64().is_some());
    assert!(weights["message"]
        .as_str()
        .is_some_and(|m| m.contains("110")));
}

#[test]
fn warnings_only_exit_zero() {
    let (code, out, err) = analyze(&["warnings"]);
    assert!(out.ends_with("0 errors, 3 warnings\n"), "{out}{err}");
    assert_eq!(code, Some(0));
    let (code, out, _) = analyze(&["-o", "json", "warnings", "good"]);
    assert_eq!(code, Some(0));
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(
        (v["errors"].as_u64(), v["warnings"].as_u64()),
        (Some(0), Some(3))
    );
}

#[test]
fn a_missing_path_exits_2() {
    let (code, out, err) = analyze(&["good", "no-such-dir"]);
    assert_eq!(code, Some(2));
    assert!(out.is_empty(), "{out}");
    assert!(
        err.contains("no-such-dir: no such file or directory"),
        "{err}"
    );
}

//! `trellis demo`, the README's first command: a control plane and six proxies with mTLS.

mod common;

#[test]
fn demo_runs_a_six_service_mtls_mesh_and_stops_cleanly() {
    let (code, out, err) =
        trellis_testkit::proxy::run(common::BIN, &["demo", "--duration", "3s", "--rps", "20"]);
    assert_eq!(code, Some(0), "stdout: {out}\nstderr: {err}");
    assert!(out.contains("Trellis demo is running"), "{out}");
    let last = out.lines().last().unwrap_or_default();
    assert!(last.starts_with("demo finished: "), "{out}");
    assert!(last.ends_with(" 0 failed"), "{out}");
    let ok: u64 = last
        .trim_start_matches("demo finished: ")
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(ok >= 20, "{out}");
}

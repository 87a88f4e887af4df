//! `trellis.dev/v1alpha1` RateLimit enforced by the inbound proxy, end to end: a caller
//! sends as fast as it can through its outbound listener; the callee's proxy lets through
//! what the token bucket allows (within 5%), answers the rest 429 with `retry-after`, never
//! limits requests the limit does not match, and counts every refusal.

mod common;

use common::*;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use trellis_testkit::origin::http::HttpOrigin;
use trellis_testkit::proxy::{Control, TempDir};

const RATE: u64 = 50;

const LIMIT: &str = r#"apiVersion: trellis.dev/v1alpha1
kind: RateLimit
metadata: { name: echo-limit, namespace: default }
spec:
  selector: { matchLabels: { app: user-profile } }
  limits:
  - name: echo
    requestsPerUnit: 50
    unit: SECOND
    burst: 50
    match:
      path: { prefix: /echo }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_bucket_limits_inbound_requests_accurately() {
    let control = Control::start(BIN, &[]).await;
    let origin = HttpOrigin::start().await.unwrap();
    let (profile, _) = joined(
        &control,
        "user-profile",
        "default",
        origin.addr(),
        &["app=user-profile"],
    )
    .await;
    // Same namespace, other labels: the selector leaves it unlimited.
    let (other, _) = joined(&control, "grades", "default", origin.addr(), &[]).await;
    let app = HttpOrigin::start().await.unwrap();
    let (_front, front_out) = joined(&control, "frontend", "default", app.addr(), &[]).await;

    let dir = TempDir::new("ratelimit");
    let f = dir.path().join("limit.yaml");
    std::fs::write(&f, LIMIT).unwrap();
    let (code, o, e) = control.cli(&["apply", "-f", f.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{o}{e}");
    eventually(
        Duration::from_secs(5),
        "the limit reaches user-profile",
        || async {
            let (_, cfg) = profile.admin_get("/config").await;
            cfg.contains("echo-limit").then_some(())
        },
    )
    .await;
    let (_, cfg) = other.admin_get("/config").await;
    assert!(
        !cfg.contains("echo-limit"),
        "not sent to unselected workloads"
    );

    let h2 = H2::connect(front_out).await;
    // Readiness on a path the limit does not match (it takes no tokens).
    eventually(
        Duration::from_secs(5),
        "frontend reaches user-profile",
        || async {
            let (s, _, _) = h2
                .request("GET", "http://user-profile.default/status/200", b"")
                .await;
            (s == 200).then_some(())
        },
    )
    .await;

    let (allowed, limited, other_status) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let unmatched_ok = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let run = Duration::from_secs(3);
    let mut tasks = Vec::new();
    for t in 0..4 {
        let h2 = h2.clone();
        let (allowed, limited, other_status, unmatched_ok) = (
            allowed.clone(),
            limited.clone(),
            other_status.clone(),
            unmatched_ok.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut last = start;
            let mut i = 0u64;
            while start.elapsed() < run {
                i += 1;
                // Every 10th request of task 0 is one the limit does not match.
                if t == 0 && i.is_multiple_of(10) {
                    let (s, _, _) = h2
                        .request("GET", "http://user-profile.default/status/200", b"")
                        .await;
                    if s == 200 {
                        unmatched_ok.fetch_add(1, Ordering::Relaxed);
                    } else {
                        other_status.fetch_add(1, Ordering::Relaxed);
                    }
                    continue;
                }
                let (s, headers, body) = h2
                    .request("GET", &format!("http://user-profile.default/echo/{t}"), b"")
                    .await;
                last = Instant::now();
                match s {
                    200 => {
                        allowed.fetch_add(1, Ordering::Relaxed);
                    }
                    429 => {
                        assert_eq!(headers["x-trellis-error"], "rate-limited", "{body:?}");
                        let retry: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
                        assert!(retry >= 1, "retry-after {retry}");
                        limited.fetch_add(1, Ordering::Relaxed);
                    }
                    _ => {
                        other_status.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            last
        }));
    }
    let mut last = start;
    for t in tasks {
        last = last.max(t.await.unwrap());
    }
    let elapsed = (last - start).as_secs_f64();
    let (allowed, limited) = (
        allowed.load(Ordering::Relaxed),
        limited.load(Ordering::Relaxed),
    );
    assert_eq!(other_status.load(Ordering::Relaxed), 0, "only 200 or 429");
    assert!(
        unmatched_ok.load(Ordering::Relaxed) > 0,
        "unmatched requests are never limited"
    );
    let expected = RATE as f64 + RATE as f64 * elapsed;
    let error = (allowed as f64 - expected).abs() / expected;
    eprintln!(
        "allowed {allowed}, expected {expected:.1} over {elapsed:.3} s ({:.2}% off); {limited} limited",
        error * 100.0
    );
    assert!(
        error <= 0.05,
        "allowed {allowed}, expected {expected:.1} over {elapsed:.3} s ({:.1}% off); {limited} limited",
        error * 100.0
    );
    assert!(
        limited > allowed,
        "the caller sent faster than the limit: {limited}"
    );

    // Every refusal is counted under the limit's label.
    let m = profile.metrics().await;
    let counted = sample(
        &m,
        "trellis_ratelimited_total",
        &[("limit", "default/echo-limit/echo")],
    )
    .unwrap_or(0.0);
    assert_eq!(counted as u64, limited, "{m}");

    // The unselected workload is not limited.
    for _ in 0..(2 * RATE + 10) {
        let (s, _, body) = h2.request("GET", "http://grades.default/echo/x", b"").await;
        assert_eq!(s, 200, "{body:?}");
    }
}

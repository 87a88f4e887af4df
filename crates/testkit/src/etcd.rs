//! A real etcd cluster on loopback, for tests of the control plane's etcd store.
//!
//! [`EtcdCluster::start`] starts N `etcd` processes (from `PATH`; `scripts/test.sh` installs
//! the `etcd-server` package) with client and peer URLs on `127.0.0.1` ports from
//! [`free_addr`], each in its own process group with its own temporary directory (data dir
//! and captured stderr), and waits until every member reports `"health":"true"` on
//! `/health`. Dropping the cluster kills every member and removes the directories.

use crate::proxy::{free_addr, TempDir};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long [`EtcdCluster::start`] waits for the cluster to become healthy.
const READY_DEADLINE: Duration = Duration::from_secs(20);
/// Lines of each member's stderr included in a start-up failure message.
const LOG_TAIL_LINES: usize = 30;

/// One etcd process.
struct Member {
    name: String,
    client: SocketAddr,
    peer: SocketAddr,
    /// `None` once killed.
    child: Option<Child>,
    /// Holds `data/` and `stderr`; removed on drop (after the process is killed).
    dir: TempDir,
}

impl Member {
    fn log_path(&self) -> PathBuf {
        self.dir.path().join("stderr")
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on the process group we created for our own child.
            unsafe {
                libc::kill(-(child.id() as i32), libc::SIGKILL);
            }
            let _ = child.wait();
        }
    }
}

/// A running etcd cluster of one or more members on loopback.
pub struct EtcdCluster {
    members: Vec<Member>,
}

impl EtcdCluster {
    /// Starts a new cluster of `members` members (1 or 3 in practice) and waits up to 20 s
    /// until every member is healthy.
    ///
    /// Blocks the calling thread while waiting, so it can be used from sync and async tests.
    ///
    /// # Panics
    /// When `etcd` is not on `PATH`, when a member exits during start-up, or when the cluster
    /// is not healthy within the deadline (with the tail of each member's stderr).
    pub fn start(members: usize) -> Self {
        assert!(members >= 1, "an etcd cluster needs at least one member");
        let etcd = find_on_path("etcd").unwrap_or_else(|| {
            panic!("etcd not found: install etcd-server (scripts/test.sh does)")
        });

        static N: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let token = format!(
            "trellis-{}-{}-{nanos}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );

        let mut cluster = Self {
            members: (0..members)
                .map(|i| Member {
                    name: format!("m{i}"),
                    client: free_addr(),
                    peer: free_addr(),
                    child: None,
                    dir: TempDir::new("etcd"),
                })
                .collect(),
        };
        let initial_cluster = cluster
            .members
            .iter()
            .map(|m| format!("{}=http://{}", m.name, m.peer))
            .collect::<Vec<_>>()
            .join(",");

        // From here on, a panic drops `cluster`, which kills what was started.
        for m in &mut cluster.members {
            let err = std::fs::File::create(m.log_path()).expect("etcd stderr file");
            let client_url = format!("http://{}", m.client);
            let peer_url = format!("http://{}", m.peer);
            let mut cmd = Command::new(&etcd);
            // ETCD_* variables from the environment would override the flags below.
            for (k, _) in std::env::vars_os() {
                if k.to_string_lossy().starts_with("ETCD_") {
                    cmd.env_remove(k);
                }
            }
            cmd.arg("--name")
                .arg(&m.name)
                .arg("--data-dir")
                .arg(m.dir.path().join("data"))
                .args(["--listen-client-urls", &client_url])
                .args(["--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &initial_cluster])
                .args(["--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", &token])
                .args(["--heartbeat-interval", "50"])
                .args(["--election-timeout", "500"])
                .args(["--logger", "zap", "--log-outputs", "stderr"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(err)
                .process_group(0);
            m.child = Some(
                cmd.spawn()
                    .unwrap_or_else(|e| panic!("starting {}: {e}", etcd.display())),
            );
        }

        let deadline = Instant::now() + READY_DEADLINE;
        loop {
            if cluster.members.iter().all(|m| healthy(m.client)) {
                return cluster;
            }
            let exited = cluster.members.iter_mut().find_map(|m| {
                let status = m.child.as_mut()?.try_wait().ok()??;
                m.child = None;
                Some((m.name.clone(), status))
            });
            if let Some((name, status)) = exited {
                panic!(
                    "etcd member {name} exited during start-up with {status}\n{}",
                    cluster.log_tails()
                );
            }
            assert!(
                Instant::now() < deadline,
                "etcd cluster of {members} not healthy within {READY_DEADLINE:?}\n{}",
                cluster.log_tails()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every member's client address, `127.0.0.1:port`, in member order.
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client.to_string()).collect()
    }

    /// The store URL naming every member: `etcd://127.0.0.1:a,127.0.0.1:b,...`.
    pub fn store_url(&self) -> String {
        format!("etcd://{}", self.endpoints().join(","))
    }

    /// Kills member `i` (SIGKILL to its process group). Its data dir stays until drop.
    ///
    /// # Panics
    /// When `i` is out of range.
    pub fn kill(&mut self, i: usize) {
        self.members[i].kill();
    }

    /// Everything member `i` has written to stderr so far.
    pub fn log(&self, i: usize) -> String {
        std::fs::read_to_string(self.members[i].log_path()).unwrap_or_default()
    }

    /// The last lines of each member's stderr, for failure messages.
    fn log_tails(&self) -> String {
        self.members
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let log = self.log(i);
                let lines: Vec<&str> = log.lines().collect();
                let tail = lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n");
                format!(
                    "--- etcd {} (client {}, peer {}) stderr, last {LOG_TAIL_LINES} lines ---\n{tail}\n",
                    m.name, m.client, m.peer
                )
            })
            .collect()
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for m in &mut self.members {
            m.kill();
        }
        // Each member's TempDir (data dir and log) is removed as `members` drops.
    }
}

/// `name` in a `PATH` directory, if there and executable.
fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Whether `GET /health` on a member's client address answers 200 with `"health":"true"`.
fn healthy(client: SocketAddr) -> bool {
    let attempt = || -> std::io::Result<bool> {
        let timeout = Duration::from_secs(1);
        let mut s = TcpStream::connect_timeout(&client, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        write!(
            s,
            "GET /health HTTP/1.1\r\nHost: {client}\r\nConnection: close\r\n\r\n"
        )?;
        let mut resp = Vec::new();
        s.read_to_end(&mut resp)?;
        let resp = String::from_utf8_lossy(&resp);
        let ok_status = resp
            .lines()
            .next()
            .is_some_and(|l| l.split(' ').nth(1) == Some("200"));
        Ok(ok_status && resp.contains(r#""health":"true""#))
    };
    attempt().unwrap_or(false)
}

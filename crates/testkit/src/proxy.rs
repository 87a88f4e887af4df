//! Starting the built `trellis` binary as a real process.
//!
//! Tests pass the binary's path (`env!("CARGO_BIN_EXE_trellis")`), a bootstrap YAML and
//! extra flags; [`Trellis::start`] writes the file to a fresh temporary directory, starts the
//! process in its own process group with stdout (the access log) and stderr captured to files,
//! and waits until `/ready` answers 200. Dropping the handle kills the whole group.

use crate::client;
use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A free loopback address: bound and released, and never the same port twice in this
/// process (the kernel happily hands a just-released port out again).
pub fn free_addr() -> SocketAddr {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let addr = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("binding an ephemeral loopback port");
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if !given.contains(&addr.port()) {
            given.push(addr.port());
            return addr;
        }
    }
}

/// A temporary directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// Creates a new empty directory under the system temp dir.
    pub fn new(tag: &str) -> Self {
        static N: AtomicU64 = AtomicU64::new(0);
        let p = std::env::temp_dir().join(format!(
            "trellis-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).expect("creating a temp dir");
        Self(p)
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running `trellis` process.
pub struct Trellis {
    child: Child,
    admin: SocketAddr,
    dir: TempDir,
    exited: Option<ExitStatus>,
}

impl Trellis {
    /// Starts `trellis proxy --config <yaml> <extra>` and waits for `/ready` on `admin`.
    pub async fn start(bin: &str, yaml: &str, admin: SocketAddr, extra: &[&str]) -> Self {
        Self::start_with_env(bin, yaml, admin, extra, &[]).await
    }

    /// Like [`Trellis::start`], with `env` set for the process (e.g. `SSL_CERT_FILE`).
    pub async fn start_with_env(
        bin: &str,
        yaml: &str,
        admin: SocketAddr,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let mut t = Self::spawn_with_env(bin, yaml, admin, extra, env);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((status, _, _)) = client::http1_get(admin, "/ready", &[]).await {
                if status == 200 {
                    return t;
                }
            }
            if let Ok(Some(status)) = t.child.try_wait() {
                panic!("trellis exited early with {status}: {}", t.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "trellis not ready within 20s: {}",
                t.stderr()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts the process without waiting for readiness (for tests of bad config).
    pub fn spawn(bin: &str, yaml: &str, admin: SocketAddr, extra: &[&str]) -> Self {
        Self::spawn_with_env(bin, yaml, admin, extra, &[])
    }

    /// Like [`Trellis::spawn`], with `env` set for the process.
    pub fn spawn_with_env(
        bin: &str,
        yaml: &str,
        admin: SocketAddr,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        let dir = TempDir::new("proxy");
        let config = dir.path().join("proxy.yaml");
        std::fs::write(&config, yaml).expect("writing the bootstrap file");
        let out = std::fs::File::create(dir.path().join("stdout")).expect("stdout file");
        let err = std::fs::File::create(dir.path().join("stderr")).expect("stderr file");
        let child = Command::new(bin)
            .arg("proxy")
            .arg("--config")
            .arg(&config)
            .args(extra)
            .env(
                "TRELLIS_LOG",
                std::env::var("TRELLIS_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .process_group(0)
            .spawn()
            .expect("starting trellis");
        Self {
            child,
            admin,
            dir,
            exited: None,
        }
    }

    /// The admin address.
    pub fn admin(&self) -> SocketAddr {
        self.admin
    }

    /// The config file path.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("proxy.yaml")
    }

    /// Everything written to stdout so far (the access log).
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout")).unwrap_or_default()
    }

    /// Everything written to stderr so far (logs).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    /// GET on the admin server: (status, body).
    pub async fn admin_get(&self, path: &str) -> (u16, String) {
        let (status, _, body) = client::http1_get(self.admin, path, &[])
            .await
            .expect("admin request");
        (status.as_u16(), String::from_utf8_lossy(&body).into_owned())
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        self.admin_get("/metrics").await.1
    }

    /// Sends a signal to the process.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child.
        unsafe {
            libc::kill(self.child.id() as i32, sig);
        }
    }

    /// Waits up to `deadline` for the process to exit; panics if it does not.
    pub async fn wait_exit(&mut self, deadline: Duration) -> ExitStatus {
        let end = Instant::now() + deadline;
        loop {
            if let Some(s) = self.exited {
                return s;
            }
            if let Ok(Some(s)) = self.child.try_wait() {
                self.exited = Some(s);
                return s;
            }
            assert!(
                Instant::now() < end,
                "trellis did not exit within {deadline:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Trellis {
    fn drop(&mut self) {
        if self.exited.is_none() {
            // SAFETY: kill(2) on the process group we created for the child.
            unsafe {
                libc::kill(-(self.child.id() as i32), libc::SIGKILL);
            }
            let _ = self.child.wait();
        }
    }
}

/// Runs `trellis <args>` to completion: (exit code, stdout, stderr).
pub fn run(bin: &str, args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(bin)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("running trellis");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The value of the first sample of `metric` whose labels contain every `name="value"` in
/// `labels`, from Prometheus text.
pub fn sample(metrics: &str, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(metric)
                .is_some_and(|rest| rest.starts_with('{') || rest.starts_with(' '))
        })
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// A running `trellis control`.
pub struct Control {
    child: Child,
    dir: TempDir,
    bin: String,
    /// gRPC (identity service) address.
    pub grpc: SocketAddr,
    /// HTTP API address.
    pub api: SocketAddr,
}

impl Control {
    /// Starts `trellis control` with a fresh state directory and `extra` flags, and waits
    /// until its API answers.
    pub async fn start(bin: &str, extra: &[&str]) -> Self {
        let dir = TempDir::new("control");
        Self::start_in(bin, dir, extra).await
    }

    /// Like [`Control::start`] with a given state directory (to restart on the same state).
    pub async fn start_in(bin: &str, dir: TempDir, extra: &[&str]) -> Self {
        Self::start_at(bin, dir, free_addr(), free_addr(), extra).await
    }

    /// Like [`Control::start_in`] on given addresses (a restart where proxies expect it).
    pub async fn start_at(
        bin: &str,
        dir: TempDir,
        grpc: SocketAddr,
        api: SocketAddr,
        extra: &[&str],
    ) -> Self {
        let err = std::fs::File::create(dir.path().join("control.log")).expect("log file");
        let child = Command::new(bin)
            .arg("control")
            .arg("--state-dir")
            .arg(dir.path().join("state"))
            .args(["--grpc", &grpc.to_string(), "--http", &api.to_string()])
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(err)
            .process_group(0)
            .spawn()
            .expect("starting trellis control");
        let c = Self {
            child,
            dir,
            bin: bin.to_string(),
            grpc,
            api,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((s, _, _)) = client::http1_get(api, "/api/v1/health", &[]).await {
                if s == 200 {
                    return c;
                }
            }
            assert!(
                Instant::now() < deadline,
                "control plane not ready: {}",
                c.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// The control plane's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("control.log")).unwrap_or_default()
    }

    /// The state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// Runs a `trellis` CLI command against this control plane: (exit code, stdout, stderr).
    pub fn cli(&self, args: &[&str]) -> (Option<i32>, String, String) {
        let out = Command::new(&self.bin)
            .args(args)
            .env("TRELLIS_API", self.api.to_string())
            .stdin(Stdio::null())
            .output()
            .expect("running trellis");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Creates a join token with `trellis token create` and writes it to a file.
    pub fn token(&self, service: &str, namespace: &str, extra: &[&str]) -> PathBuf {
        static N: AtomicU64 = AtomicU64::new(0);
        let path = self.dir.path().join(format!(
            "{service}.{namespace}.{}.token",
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let mut args = vec![
            "token",
            "create",
            "--service",
            service,
            "--namespace",
            namespace,
        ];
        let out = path.to_str().expect("utf-8 path").to_string();
        args.extend(["--out", &out]);
        args.extend(extra);
        let (code, stdout, stderr) = self.cli(&args);
        assert_eq!(code, Some(0), "token create failed: {stdout}{stderr}");
        path
    }

    /// Stops the process (SIGKILL) and hands back its state directory.
    pub fn kill(mut self) -> TempDir {
        // SAFETY: kill(2) on our own child's process group.
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.wait();
        let dir = TempDir(std::mem::take(&mut self.dir.0));
        std::mem::forget(self);
        dir
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's process group.
        unsafe {
            libc::kill(-(self.child.id() as i32), libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

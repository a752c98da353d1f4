//! Helpers for integration tests: a real `kvcoord serve` process and clients.
#![allow(dead_code)]

pub mod redis_fixture;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use kvcoord::client::{Client, ClientConfig, WorkerClient, WorkerHandle};
use kvcoord_harness::TpWorker;
use kvcoord_memory::{Dtype, KvLayout};
use kvcoord_transport::{ConnectOptions, Connection, Endpoint, InstanceKey};

/// The binary whose `serve` command the tests start: `kvcoord` for this
/// package's tests, `kvcoord-harness` (the same `serve` code) for the tests
/// that belong to the harness package.
pub fn server_binary() -> &'static str {
    option_env!("CARGO_BIN_EXE_kvcoord")
        .or(option_env!("CARGO_BIN_EXE_kvcoord-harness"))
        .expect("tests run under cargo, which names the binaries")
}

/// A coordinator process on a private socket.
pub struct ServerProcess {
    child: Option<Child>,
    pub socket: PathBuf,
    args: Vec<String>,
}

impl ServerProcess {
    pub fn start(dir: &Path, extra: &[&str]) -> ServerProcess {
        let mut s = ServerProcess {
            child: None,
            socket: dir.join("kv.sock"),
            args: extra.iter().map(|a| a.to_string()).collect(),
        };
        s.restart();
        s
    }

    /// Starts the process (again) with the same arguments and waits until it listens.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "kill the old server first");
        let stderr = if std::env::var_os("KVCOORD_TEST_LOG").is_some() { Stdio::inherit() } else { Stdio::null() };
        let child = Command::new(server_binary())
            .args(["serve", "--socket"])
            .arg(&self.socket)
            .args(&self.args)
            .args(if self.args.iter().any(|a| a == "--admin") { &[][..] } else { &["--admin", "off"][..] })
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn kvcoord serve");
        self.child = Some(child);
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&self.socket).is_err() {
            assert!(start.elapsed() < Duration::from_secs(10), "server did not start listening");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("the server runs").id()
    }

    pub fn endpoint(&self) -> Endpoint {
        Endpoint::Unix(self.socket.clone())
    }

    /// SIGKILL.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then wait (at most `limit`) for the exit status.
    pub fn terminate(&mut self, limit: Duration) -> Option<ExitStatus> {
        let mut c = self.child.take()?;
        send_signal(&c, nix::sys::signal::Signal::SIGTERM);
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = c.kill();
        None
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn send_signal(child: &Child, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), sig).expect("signal");
}

/// A small layout: 4 layers x 256 blocks of 16 tokens x 4 heads x 64 (bf16):
/// 8 KiB block planes, 1 MiB per 256-token chunk, 16 MiB per rank.
pub fn small_layout() -> KvLayout {
    KvLayout::mha(4, 256, 16, 4, 64, Dtype::Bf16)
}

/// A client through the actix adapter (what actor-system hosts use).
pub fn client(endpoint: Endpoint) -> WorkerHandle {
    let mut cfg = ClientConfig::new(endpoint);
    cfg.request_timeout = Duration::from_secs(5);
    cfg.register_timeout = Duration::from_secs(30);
    WorkerClient::start(cfg)
}

/// The tokio client core (what engines and the Python binding use).
pub fn core_client(endpoint: Endpoint) -> Client {
    let mut cfg = ClientConfig::new(endpoint);
    cfg.request_timeout = Duration::from_secs(5);
    cfg.register_timeout = Duration::from_secs(30);
    Client::start(cfg)
}

/// The tokio client core presenting `token` in its handshake.
pub fn core_client_with_token(endpoint: Endpoint, token: &str) -> Client {
    let mut cfg = ClientConfig::new(endpoint).with_token(token);
    cfg.request_timeout = Duration::from_secs(5);
    cfg.register_timeout = Duration::from_secs(30);
    Client::start(cfg)
}

/// A registered TP worker whose client presents `token` (e.g. the admin's).
pub async fn worker_with_token(server: &ServerProcess, engine: u64, rank: u32, world: u32, token: &str) -> TpWorker {
    let key = InstanceKey { engine, rank };
    let client = core_client_with_token(server.endpoint(), token);
    TpWorker::register(client, key, "test-model", world, small_layout(), 256).await.expect("register")
}

/// A raw connection presenting `token`.
pub async fn raw_with_token(server: &ServerProcess, token: &str) -> std::sync::Arc<Connection> {
    let opts = ConnectOptions { token: Some(token.to_string()), ..ConnectOptions::default() };
    Connection::open(&server.endpoint(), &opts).await.expect("connect")
}

/// A registered TP worker with its own client.
pub async fn worker(server: &ServerProcess, engine: u64, rank: u32, world: u32) -> TpWorker {
    let key = InstanceKey { engine, rank };
    TpWorker::register(core_client(server.endpoint()), key, "test-model", world, small_layout(), 256)
        .await
        .expect("register")
}

/// A raw connection (no re-registration logic), to provoke server errors.
pub async fn raw(server: &ServerProcess) -> std::sync::Arc<Connection> {
    Connection::open(&server.endpoint(), &ConnectOptions::default()).await.expect("connect")
}

/// Polls `f` until it is true or `limit` passes.
pub async fn eventually(limit: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// Descriptors process `pid` has open.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0)
}

/// Resident memory of process `pid` (VmRSS), in bytes.
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb << 10)
        .unwrap_or(0)
}

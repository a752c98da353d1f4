//! Real Redis servers for the remote-tier tests: a standalone `redis-server`
//! on a free loopback port, or a 3-node Redis Cluster (cluster-enabled,
//! created with `redis-cli --cluster create`), each in its own temporary
//! directory, killed when dropped. A missing `redis-server` FAILS the test
//! (CI installs Debian's redis-server; see `.ci/run`).

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 (bound and released; fine for tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port").local_addr().unwrap().port()
}

/// One `redis-server` process.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    cluster: bool,
    /// `requirepass`, when set.
    password: Option<String>,
}

fn redis_server_binary() -> &'static str {
    let found = Command::new("redis-server").arg("--version").stdout(Stdio::null()).status();
    assert!(
        found.is_ok_and(|s| s.success()),
        "redis-server is not installed: the remote-tier tests need a real one (apt-get install -y redis-server; \
         .ci/run installs it)"
    );
    "redis-server"
}

impl RedisServer {
    /// A standalone server on a free port, no persistence.
    pub fn start(dir: &Path) -> RedisServer {
        Self::start_on(dir, free_port(), false)
    }

    /// A standalone server that requires `password` (`requirepass`).
    pub fn start_with_password(dir: &Path, password: &str) -> RedisServer {
        let port = free_port();
        let dir = dir.join(format!("redis-{port}"));
        std::fs::create_dir_all(&dir).expect("redis dir");
        let mut s = RedisServer { child: None, port, dir, cluster: false, password: Some(password.to_string()) };
        s.restart();
        s
    }

    /// A server on `port` (e.g. the same port again after [`RedisServer::kill`]).
    pub fn start_on(dir: &Path, port: u16, cluster: bool) -> RedisServer {
        let dir = dir.join(format!("redis-{port}"));
        std::fs::create_dir_all(&dir).expect("redis dir");
        let mut s = RedisServer { child: None, port, dir, cluster, password: None };
        s.restart();
        s
    }

    /// Starts the process again (same port, same directory) and waits until it answers.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "kill it first");
        let mut cmd = Command::new(redis_server_binary());
        cmd.args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--protected-mode", "no"]);
        if let Some(p) = &self.password {
            cmd.args(["--requirepass", p]);
        }
        if self.cluster {
            cmd.args(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]).args([
                "--cluster-node-timeout",
                "1000",
                "--cluster-require-full-coverage",
                "no",
            ]);
        }
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("spawn redis-server");
        self.child = Some(child);
        let start = Instant::now();
        while self.cli(&["PING"]).trim() != "PONG" {
            assert!(start.elapsed() < Duration::from_secs(10), "redis-server on port {} did not start", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() && start.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Runs `redis-cli -p PORT args...` and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        match &self.password {
            Some(p) => cli(self.port, &[&["--no-auth-warning", "-a", p], args].concat()),
            None => cli(self.port, args),
        }
    }

    /// Every key this node holds.
    pub fn keys(&self) -> Vec<String> {
        self.cli(&["--scan"]).lines().map(str::to_string).filter(|l| !l.is_empty()).collect()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `redis-cli -p port args...`, stdout as text.
pub fn cli(port: u16, args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stderr(Stdio::null())
        .output()
        .expect("redis-cli runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A Redis Cluster of 3 primaries, no replicas.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start(dir: &Path) -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..3).map(|_| RedisServer::start_on(dir, free_port(), true)).collect();
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli --cluster create runs");
        assert!(out.status.success(), "cluster create failed: {}", String::from_utf8_lossy(&out.stdout));
        let start = Instant::now();
        while !nodes.iter().all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok")) {
            assert!(start.elapsed() < Duration::from_secs(20), "the cluster did not become ok");
            std::thread::sleep(Duration::from_millis(50));
        }
        RedisCluster { nodes }
    }

    /// The `--remote-cluster` value: every node's URL, comma-separated.
    pub fn urls(&self) -> String {
        self.nodes.iter().map(RedisServer::url).collect::<Vec<_>>().join(",")
    }
}

//! Bounded resources and socket hardening (issue #18), against real
//! `kvcoord serve` processes: every abuse gets its exact answer (a typed
//! `Refused`/`Undecodable` frame and a close, or backpressure), the server's
//! descriptors and memory stay bounded, and a valid client is served during
//! and after.

mod common;

use std::fs::File;
use std::io::{IoSlice, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use kvcoord_harness::prefix_hashes;
use kvcoord_transport::frame;
use kvcoord_transport::*;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};

const T: Duration = Duration::from_secs(5);
const MIB: u64 = 1 << 20;

fn hello_bytes(name: &str) -> Vec<u8> {
    let hello = ClientFrame::Hello(Hello { protocol: PROTOCOL_VERSION, client: name.into(), token: None });
    frame::encode(&hello, 0, 1 << 20).unwrap()
}

fn ping_bytes(id: u64) -> Vec<u8> {
    let req = ClientFrame::Request(Request { id: RequestId(id), deadline_ms: 5000, body: RequestBody::Ping });
    frame::encode(&req, 0, 1 << 20).unwrap()
}

/// Reads one whole server frame; `None` at end of stream.
fn read_frame(s: &mut UnixStream) -> Option<ServerFrame> {
    let mut h = [0u8; frame::HEADER_BYTES];
    s.read_exact(&mut h).ok()?;
    let len = u32::from_le_bytes(h[..4].try_into().unwrap()) as usize;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).ok()?;
    Some(frame::decode(&payload).expect("the server's frames decode"))
}

/// Whether the server has closed `s` (end of stream, or a reset after it).
fn closed(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        Ok(_) => false,
    }
}

fn connect(socket: &Path) -> UnixStream {
    let s = UnixStream::connect(socket).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s
}

/// A blocking raw connection that has done the handshake.
fn handshaken(socket: &Path) -> UnixStream {
    let mut s = connect(socket);
    s.write_all(&hello_bytes("raw")).unwrap();
    assert!(matches!(read_frame(&mut s), Some(ServerFrame::Welcome(_))));
    s
}

fn send_with_fds(s: &UnixStream, bytes: &[u8], fds: &[RawFd]) -> nix::Result<usize> {
    sendmsg::<()>(
        s.as_raw_fd(),
        &[IoSlice::new(bytes)],
        &[ControlMessage::ScmRights(fds)],
        MsgFlags::MSG_NOSIGNAL,
        None,
    )
}

fn expect_refused(f: Option<ServerFrame>, kind: ErrorKind, says: &str) {
    match f {
        Some(ServerFrame::Refused(e)) => {
            assert_eq!(e.kind, kind, "{e}");
            assert!(e.message.contains(says), "{:?} lacks {says:?}", e.message);
        }
        other => panic!("expected Refused({kind:?}), got {other:?}"),
    }
}

fn expect_undecodable(f: Option<ServerFrame>, says: &str) {
    match f {
        Some(ServerFrame::Undecodable(e)) => {
            assert_eq!(e.kind, ErrorKind::InvalidArgument, "{e}");
            assert!(e.message.contains(says), "{:?} lacks {says:?}", e.message);
        }
        other => panic!("expected Undecodable, got {other:?}"),
    }
}

async fn ping(c: &Arc<Connection>) {
    let r = c.request(RequestBody::Ping, T, vec![]).await;
    assert!(matches!(r, Ok(ReplyBody::Pong { .. })), "{r:?}");
}

/// A server started through `sh` (for a umask or a descriptor limit).
struct Shelled {
    child: Child,
    socket: PathBuf,
}

impl Shelled {
    fn start(prefix: &str, socket: &Path, args: &[&str], env: &[(&str, &str)], stderr: Option<File>) -> Shelled {
        let mut cmd = Command::new("sh");
        cmd.arg("-c").arg(format!("{prefix} exec \"$0\" serve \"$@\"")).arg(server_binary());
        cmd.args(["--admin", "off"]).args(args).stdout(Stdio::null());
        if !args.contains(&"--socket") && !env.iter().any(|(k, _)| *k == "XDG_RUNTIME_DIR") {
            cmd.arg("--socket").arg(socket);
        }
        cmd.envs(env.iter().copied());
        cmd.stderr(stderr.map(Stdio::from).unwrap_or(Stdio::null()));
        let child = cmd.spawn().unwrap();
        let start = Instant::now();
        while UnixStream::connect(socket).is_err() {
            assert!(start.elapsed() < Duration::from_secs(10), "server did not start listening");
            std::thread::sleep(Duration::from_millis(2));
        }
        Shelled { child, socket: socket.to_path_buf() }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn endpoint(&self) -> Endpoint {
        Endpoint::Unix(self.socket.clone())
    }
}

impl Drop for Shelled {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn open(endpoint: &Endpoint) -> Arc<Connection> {
    Connection::open(endpoint, &ConnectOptions::default()).await.expect("connect")
}

/// CPU time (user + system) of `pid`, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(')').unwrap().1.split_whitespace().collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

// 1. Descriptors.

#[actix_rt::test]
async fn descriptors_beyond_a_frames_declared_count_are_closed_and_the_fd_count_returns_to_base() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let good = raw(&server).await;
    ping(&good).await;
    let pid = server.pid();
    let base = open_fds(pid);
    let devnull = File::open("/dev/null").unwrap();
    let fds = vec![devnull.as_raw_fd(); 200];
    let mut peak = base;
    // 50 frames of 200 descriptors each, declaring none: 10,000 in all.
    for i in 0..50u64 {
        let mut s = handshaken(&server.socket);
        send_with_fds(&s, &ping_bytes(i), &fds).unwrap();
        expect_undecodable(read_frame(&mut s), "file descriptors arrived that no frame declared");
        assert!(closed(&mut s), "the server closes after refusing the frame");
        peak = peak.max(open_fds(pid));
        if i % 10 == 0 {
            ping(&good).await;
        }
    }
    // A frame declaring 1 descriptor that carries 3: the 2 extra are refused.
    let mut s = handshaken(&server.socket);
    let f = frame::encode(
        &ClientFrame::Request(Request { id: RequestId(1), deadline_ms: 5000, body: RequestBody::Ping }),
        1,
        1 << 20,
    )
    .unwrap();
    send_with_fds(&s, &f, &fds[..3]).unwrap();
    expect_undecodable(read_frame(&mut s), "2 file descriptors arrived");
    assert!(closed(&mut s));
    drop(s);
    assert!(eventually(T, async || open_fds(pid) <= base).await, "fd count back to base {base}: {}", open_fds(pid));
    eprintln!("fd flood: base {base} descriptors, peak after each refusal {peak}, end {}", open_fds(pid));
    assert!(peak <= base + 2, "descriptors stayed bounded: base {base}, peak {peak}");
    ping(&good).await;
    ping(&raw(&server).await).await;
}

#[actix_rt::test]
async fn descriptors_that_hit_the_servers_fd_limit_mid_receive_are_all_closed() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("kv.sock");
    let server = Shelled::start("ulimit -n 128 &&", &socket, &[], &[], None);
    let pid = server.pid();
    let good = open(&server.endpoint()).await;
    ping(&good).await;
    let base = open_fds(pid);
    let devnull = File::open("/dev/null").unwrap();
    // More than the server may open: the kernel installs what fits, then
    // truncates; the reader must close the ones it got.
    let fds = vec![devnull.as_raw_fd(); 200];
    for i in 0..5 {
        let mut s = handshaken(&socket);
        send_with_fds(&s, &ping_bytes(i), &fds).unwrap();
        expect_undecodable(read_frame(&mut s), "file descriptors arrived");
        assert!(closed(&mut s));
    }
    assert!(eventually(T, async || open_fds(pid) <= base).await, "base {base}, now {}", open_fds(pid));
    ping(&good).await;
    ping(&open(&server.endpoint()).await).await;
}

// 2. Connection cap, idle timeout, accept failures.

#[actix_rt::test]
async fn over_the_connection_cap_a_connection_is_refused_with_a_reason_and_others_are_served() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &["--max-connections", "3"]);
    let good = raw(&server).await;
    let a = handshaken(&server.socket);
    let _b = handshaken(&server.socket);
    for _ in 0..20 {
        let mut over = connect(&server.socket);
        over.write_all(&hello_bytes("one too many")).unwrap();
        expect_refused(read_frame(&mut over), ErrorKind::Unavailable, "max_connections");
        assert!(closed(&mut over));
        ping(&good).await;
    }
    drop(a);
    let late = {
        let ep = server.endpoint();
        let mut got = None;
        eventually(T, async || {
            got = Connection::open(&ep, &ConnectOptions::default()).await.ok();
            got.is_some()
        })
        .await;
        got.expect("a place is free again once a connection closed")
    };
    ping(&late).await;
    ping(&good).await;
}

#[actix_rt::test]
async fn an_idle_connection_is_closed_with_refused_timeout_and_an_active_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &["--idle-timeout-ms", "300"]);
    let good = raw(&server).await;
    let mut idle = handshaken(&server.socket);
    let started = Instant::now();
    let reader = std::thread::spawn(move || {
        let f = read_frame(&mut idle);
        (f, closed(&mut idle), started.elapsed())
    });
    for _ in 0..12 {
        ping(&good).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (f, was_closed, after) = reader.join().unwrap();
    expect_refused(f, ErrorKind::Timeout, "idle");
    assert!(was_closed);
    assert!(after >= Duration::from_millis(300) && after < Duration::from_secs(3), "{after:?}");
    assert!(!good.is_dead(), "a connection that keeps asking stays open");
    ping(&good).await;
}

#[actix_rt::test]
async fn accept_failures_at_the_descriptor_limit_back_off_with_rate_limited_warnings() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("kv.sock");
    let log_path = dir.path().join("server.log");
    let log = File::create(&log_path).unwrap();
    let server = Shelled::start("ulimit -n 64 &&", &socket, &[], &[], Some(log));
    let pid = server.pid();
    let good = open(&server.endpoint()).await;
    // Far more connections than descriptors: accept fails with EMFILE.
    let hogs: Vec<UnixStream> = (0..120).map(|_| UnixStream::connect(&socket).unwrap()).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (cpu0, t0) = (cpu_ticks(pid), Instant::now());
    let log_before = std::fs::read_to_string(&log_path).unwrap().matches("accept failed").count();
    for _ in 0..10 {
        ping(&good).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = (cpu_ticks(pid) - cpu0) as f64 / 100.0;
    let warnings = std::fs::read_to_string(&log_path).unwrap().matches("accept failed").count() - log_before;
    eprintln!("at EMFILE for {secs:.1}s: {cpu:.2}s CPU, {warnings} accept warnings");
    assert!(cpu < 0.25 * secs, "the accept loop spins: {cpu}s CPU in {secs}s");
    assert!(warnings as f64 <= 1.5 * secs + 1.0, "{warnings} warnings in {secs}s");
    drop(hogs);
    // Once descriptors are free, new clients are served again.
    let mut late = None;
    let ep = server.endpoint();
    eventually(Duration::from_secs(10), async || {
        late = Connection::open(&ep, &ConnectOptions::default()).await.ok();
        late.is_some()
    })
    .await;
    ping(&late.expect("served after the flood")).await;
    ping(&good).await;
}

// 3. Frame buffers grow with received bytes.

#[actix_rt::test]
async fn headers_declaring_8_mib_frames_cost_only_the_bytes_that_arrived() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let good = raw(&server).await;
    ping(&good).await;
    let pid = server.pid();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let base = rss_bytes(pid);
    let declared = frame::DEFAULT_MAX_FRAME_BYTES;
    let mut header = declared.to_le_bytes().to_vec();
    header.push(0);
    let conns: Vec<UnixStream> = (0..64)
        .map(|_| {
            let mut s = handshaken(&server.socket);
            s.write_all(&header).unwrap();
            s
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    ping(&good).await;
    let grown = rss_bytes(pid).saturating_sub(base);
    eprintln!("64 headers of {} MiB: VmRSS {} -> +{} KiB", declared >> 20, base >> 10, grown >> 10);
    assert!(grown < 16 * MIB, "RSS grew by {grown} bytes for 64 unfilled frames (64 x 8 MiB declared)");
    drop(conns);
    ping(&good).await;
}

// 4. Bad first frames get a Refused frame before the close.

#[actix_rt::test]
async fn bad_first_frames_are_refused_with_a_reason_before_the_close() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let good = raw(&server).await;
    let base = open_fds(server.pid());

    // Oversized: more than a hello may be, whatever the frame limit.
    let mut s = connect(&server.socket);
    s.write_all(&[0, 0, 0x10, 0, 0]).unwrap();
    expect_refused(read_frame(&mut s), ErrorKind::InvalidArgument, "exceeds the 65536-byte limit");
    assert!(closed(&mut s));

    // Truncated: half a hello, then the client stops writing.
    let mut s = connect(&server.socket);
    let hello = hello_bytes("half");
    s.write_all(&hello[..hello.len() / 2]).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    expect_refused(read_frame(&mut s), ErrorKind::InvalidArgument, "closed mid-frame");
    assert!(closed(&mut s));

    // Too many descriptors declared.
    let mut s = connect(&server.socket);
    let mut hello = hello_bytes("fds");
    hello[4] = 5;
    s.write_all(&hello).unwrap();
    expect_refused(read_frame(&mut s), ErrorKind::InvalidArgument, "at most 4 allowed");
    assert!(closed(&mut s));

    // Descriptors the hello did not declare.
    let devnull = File::open("/dev/null").unwrap();
    let mut s = connect(&server.socket);
    send_with_fds(&s, &hello_bytes("stray"), &[devnull.as_raw_fd(); 200]).unwrap();
    expect_refused(read_frame(&mut s), ErrorKind::InvalidArgument, "file descriptors arrived");
    assert!(closed(&mut s));

    // A request instead of a hello.
    let mut s = connect(&server.socket);
    s.write_all(&ping_bytes(1)).unwrap();
    expect_refused(read_frame(&mut s), ErrorKind::InvalidArgument, "first frame must be Hello");
    assert!(closed(&mut s));

    ping(&good).await;
    ping(&raw(&server).await).await;
    assert!(eventually(T, async || open_fds(server.pid()) <= base + 1).await);
}

// 5. Backpressure.

#[actix_rt::test]
async fn a_client_that_pipelines_200k_pings_and_never_reads_stalls_itself_not_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let good = raw(&server).await;
    ping(&good).await;
    let pid = server.pid();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let base = rss_bytes(pid);
    const PINGS: u64 = 200_000;
    let flood = handshaken(&server.socket);
    let stopper = flood.try_clone().unwrap();
    let written = Arc::new(AtomicU64::new(0));
    let total: u64 = (0..PINGS).map(|i| ping_bytes(i + 1).len() as u64).sum();
    let w = written.clone();
    let writer = std::thread::spawn(move || {
        let mut flood = flood;
        let mut batch = Vec::new();
        for i in 0..PINGS {
            batch.extend(ping_bytes(i + 1));
            if batch.len() >= 4096 || i + 1 == PINGS {
                if flood.write_all(&batch).is_err() {
                    return false;
                }
                w.fetch_add(batch.len() as u64, Ordering::Relaxed);
                batch.clear();
            }
        }
        true
    });
    let mut slowest = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        ping(&good).await;
        slowest = slowest.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let grown = rss_bytes(pid).saturating_sub(base);
    let sent = written.load(Ordering::Relaxed);
    eprintln!(
        "pipelined pings: {sent} of {total} bytes accepted by the server's socket, VmRSS +{} KiB, other client's slowest ping {slowest:?}",
        grown >> 10
    );
    assert!(!writer.is_finished(), "the server read every request although no reply was read");
    assert!(sent < total / 2, "{sent} of {total} bytes taken");
    assert!(grown < 32 * MIB, "RSS grew by {grown}");
    assert!(slowest < Duration::from_secs(1));
    stopper.shutdown(std::net::Shutdown::Both).unwrap();
    assert!(!writer.join().unwrap(), "the flood stops when its connection is shut");
    ping(&good).await;
    ping(&raw(&server).await).await;
}

// 6. Lease memory.

#[actix_rt::test]
async fn ten_thousand_expired_leases_are_all_given_back() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &["--lease-ttl-ms", "300"]);
    let mut w = worker(&server, 5, 0, 1).await;
    let hashes = prefix_hashes("test-model", 5, 0, 16, 256);
    w.store_prefix(&hashes).await.unwrap();
    let pid = server.pid();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let base = rss_bytes(pid);
    let conn = raw(&server).await;
    // Two rounds: if expired leases kept their entries or hash vectors, the
    // second round would need as much new memory as the first.
    let (mut after, mut peaks) = (Vec::new(), Vec::new());
    for round in 0..2 {
        let mut leased = 0;
        for _ in 0..20 {
            let lookups = (0..500).map(|_| {
                let body = RequestBody::LookupModel(LookupByModel {
                    model: "test-model".into(),
                    world_size: 1,
                    chunks: hashes.clone(),
                    lease: true,
                });
                conn.request(body, T, vec![])
            });
            for r in futures::future::join_all(lookups).await {
                match r.unwrap() {
                    ReplyBody::Found { chunks: 16, lease: Some(_) } => leased += 1,
                    other => panic!("{other:?}"),
                }
            }
        }
        assert_eq!(leased, 10_000);
        let peak = rss_bytes(pid);
        peaks.push(peak);
        let stats = w.client.stats().await.unwrap();
        assert!(stats.leases > 0 && stats.pinned_objects == 16, "leases live until their TTL");
        assert!(
            eventually(Duration::from_secs(5), async || {
                let s = w.client.stats().await.unwrap();
                s.leases == 0 && s.pinned_objects == 0
            })
            .await,
            "every expired lease is released and unpins its objects"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        let end = rss_bytes(pid);
        eprintln!(
            "round {round}, 10k leases: VmRSS base {} KiB, peak +{} KiB, after expiry +{} KiB",
            base >> 10,
            peak.saturating_sub(base) >> 10,
            end.saturating_sub(base) >> 10
        );
        after.push(end);
    }
    // A round that leaked its leases would keep about its whole peak growth
    // (10k lease entries with their hash lists); the allocator's own slack
    // between rounds measured up to ~2.6 MiB. Allow two thirds of a round.
    let round_cost = peaks[0].saturating_sub(base);
    assert!(
        after[1] <= after[0] + round_cost * 2 / 3,
        "the second round grew RSS by more than 2/3 of a round ({round_cost} bytes): {after:?} (base {base})"
    );
    // The objects are evictable and servable again.
    assert_eq!(w.client.lookup(w.key, hashes.clone(), false).await.chunks, 16);
}

// 7. The socket file.

fn socket_mode(p: &Path) -> u32 {
    std::fs::metadata(p).unwrap().permissions().mode() & 0o777
}

#[actix_rt::test]
async fn the_socket_is_0600_under_any_umask_and_the_default_lives_in_a_private_directory() {
    for umask in ["022", "000"] {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("kv.sock");
        let server = Shelled::start(&format!("umask {umask} &&"), &socket, &[], &[], None);
        assert_eq!(socket_mode(&socket), 0o600, "umask {umask}");
        ping(&open(&server.endpoint()).await).await;
    }
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("kv.sock");
    let server = Shelled::start("umask 077 &&", &socket, &["--socket-mode", "0660"], &[], None);
    assert_eq!(socket_mode(&socket), 0o660, "an explicit mode, whatever the umask");
    drop(server);

    // No --socket: $XDG_RUNTIME_DIR/kvcoord/kvcoord.sock, in a 0700 directory
    // (an existing one of ours is tightened).
    let runtime = tempfile::tempdir().unwrap();
    let private = runtime.path().join("kvcoord");
    std::fs::create_dir(&private).unwrap();
    std::fs::set_permissions(&private, std::fs::Permissions::from_mode(0o755)).unwrap();
    let socket = private.join("kvcoord.sock");
    let xdg = runtime.path().to_str().unwrap();
    let server = Shelled::start("umask 000 &&", &socket, &[], &[("XDG_RUNTIME_DIR", xdg)], None);
    assert_eq!(socket_mode(&socket), 0o600);
    assert_eq!(socket_mode(&private), 0o700);
    ping(&open(&server.endpoint()).await).await;
    let status = Command::new(server_binary()).arg("status").env("XDG_RUNTIME_DIR", xdg).output().unwrap();
    assert!(status.status.success(), "`kvcoord status` finds the default socket too");
}

// 8. Logs.

#[actix_rt::test]
async fn client_names_are_escaped_and_capped_in_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("kv.sock");
    let log_path = dir.path().join("server.log");
    let server = Shelled::start("", &socket, &[], &[], Some(File::create(&log_path).unwrap()));
    let name = format!("evil\nINFO forged line\x1b[31m{}", "x".repeat(5000));
    let opts = ConnectOptions { client_name: name, ..Default::default() };
    let c = Connection::open(&server.endpoint(), &opts).await.unwrap();
    ping(&c).await;
    let good = open(&server.endpoint()).await;
    ping(&good).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("evil\\nINFO forged line\\u{1b}[31m"), "{log}");
    assert!(!log.lines().any(|l| l.starts_with("INFO forged")), "a forged log line");
    assert!(log.contains("...(+"), "the name is capped");
    assert!(log.lines().all(|l| l.len() < 1000), "no line carries the 5000-byte name");
}

// 9. Flags.

#[test]
fn the_new_limits_have_flags_and_environment_variables_and_bad_values_name_the_key() {
    let out = Command::new(server_binary())
        .args(["serve", "--print-config", "--max-connections", "7", "--idle-timeout-ms", "0"])
        .args(["--socket-mode", "0660", "--socket-group", "0"])
        .env("KVCOORD_MAX_IN_FLIGHT_PER_SESSION", "8")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let config = String::from_utf8_lossy(&out.stdout);
    for line in [
        "max_connections = 7",
        "idle_timeout_ms = 0",
        "socket_mode = \"0660\"",
        "socket_group = \"0\"",
        "max_in_flight_per_session = 8",
    ] {
        assert!(config.contains(line), "{line} missing from\n{config}");
    }
    for (flag, value, key) in [
        ("--max-connections", "0", "max_connections"),
        ("--max-in-flight-per-session", "0", "max_in_flight_per_session"),
        ("--idle-timeout-ms", "5", "idle_timeout_ms"),
        ("--socket-mode", "0999", "socket_mode"),
        ("--lease-ttl-ms", "0", "lease_ttl_ms"),
        ("--grace-ms", "18446744073709551615", "grace_ms"),
    ] {
        let out = Command::new(server_binary())
            .args(["serve", flag, value, "--socket", "/tmp/kvcoord-never.sock"])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{flag} {value}");
        assert!(String::from_utf8_lossy(&out.stderr).contains(key), "{flag} {value}");
    }
}

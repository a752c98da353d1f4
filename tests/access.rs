//! Access control against a real `kvcoord serve`: instance ownership and
//! secrets, leases bound to their tenant, tokens on TCP, TLS, the admin
//! role, peer credentials on the socket, tenant namespaces and quotas. Each
//! refusal is checked for its exact error kind, and the owner (or another
//! client) is checked to be served correctly alongside.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use kvcoord_client::{Client, ClientConfig};
use kvcoord_harness::{prefix_hashes, TpWorker};
use kvcoord_memory::{HostKvCache, MemoryHandle};
use kvcoord_transport::handshake::HandshakeError;
use kvcoord_transport::{
    ConnectError, ConnectOptions, Connection, Endpoint, ErrorKind, FaultTarget, InstanceKey, InstanceSecret,
    LookupByModel, LookupPrefix, RegisterKvCache, ReplyBody, RequestBody, RequestError, RetrieveChunks, StoreChunks,
};

const T: Duration = Duration::from_secs(5);

fn kind<T: std::fmt::Debug>(r: Result<T, RequestError>) -> ErrorKind {
    r.expect_err("expected an error").kind()
}

/// Writes `token` into a 0600 file in `dir`.
fn token_file(dir: &Path, name: &str, token: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("{token}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
    p
}

fn register_body(key: InstanceKey, model: &str, secret: Option<InstanceSecret>) -> RequestBody {
    let layout = small_layout();
    RequestBody::Register(RegisterKvCache {
        instance: key,
        model: model.into(),
        world_size: 1,
        layout,
        memory: MemoryHandle::HostFd { size: layout.total_bytes() },
        secret,
    })
}

/// The server's endpoints and admin address, as its status tells them.
async fn endpoints(server: &ServerProcess) -> (Vec<String>, Option<String>) {
    match raw(server).await.request(RequestBody::Status, T, vec![]).await.unwrap() {
        ReplyBody::Status(r) => (r.endpoints, r.admin),
        other => panic!("{other:?}"),
    }
}

async fn tcp_endpoint(server: &ServerProcess) -> Endpoint {
    let (all, _) = endpoints(server).await;
    let tcp = all.iter().find_map(|e| e.strip_prefix("tcp://")).expect("a TCP endpoint");
    Endpoint::Tcp(tcp.to_string())
}

fn refusal(r: Result<Arc<Connection>, ConnectError>) -> ErrorKind {
    match r {
        Err(ConnectError::Handshake(HandshakeError::Refused(e))) => e.kind,
        other => panic!("expected a refused handshake, got {other:?}"),
    }
}

#[actix_rt::test]
async fn every_cross_session_action_on_an_instance_is_denied_and_the_owner_is_still_served() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let mut a = worker(&server, 0xa, 0, 1).await;
    let h = prefix_hashes("test-model", 1, 0, 2, 256);
    let (blocks, _) = a.store_prefix(&h).await.unwrap();
    let per_chunk: Vec<u32> = (100..132).collect();

    // B: another connection of the same user and tenant.
    let b = raw(&server).await;
    let store = RequestBody::Store(StoreChunks {
        instance: a.key,
        chunks: h.clone(),
        block_ids: per_chunk.clone(),
        ready_event: None,
    });
    assert_eq!(kind(b.request(store, T, vec![]).await), ErrorKind::PermissionDenied, "store from A's memory");
    let retrieve = RequestBody::Retrieve(RetrieveChunks {
        instance: a.key,
        chunks: h.clone(),
        block_ids: per_chunk,
        lease: None,
        done_event: None,
    });
    assert_eq!(kind(b.request(retrieve, T, vec![]).await), ErrorKind::PermissionDenied, "write into A's blocks");
    for lease in [true, false] {
        let lookup = RequestBody::Lookup(LookupPrefix { instance: a.key, chunks: h.clone(), lease });
        assert_eq!(
            kind(b.request(lookup, T, vec![]).await),
            ErrorKind::PermissionDenied,
            "lookup on A (lease {lease})"
        );
    }
    let unregister = RequestBody::Unregister { instance: a.key };
    assert_eq!(kind(b.request(unregister, T, vec![]).await), ErrorKind::PermissionDenied, "unregister A");
    // Register A's key with B's own memfd: without a secret, then with a made-up one.
    let mine = HostKvCache::create("b-memory", small_layout()).unwrap();
    for secret in [None, Some(InstanceSecret([7; 16]))] {
        let fd = vec![mine.fd().try_clone_to_owned().unwrap()];
        let r = b.request(register_body(a.key, "test-model", secret), T, fd).await;
        assert_eq!(kind(r), ErrorKind::PermissionDenied, "take over A's key (secret {secret:?})");
    }
    let fault = b.request(RequestBody::InjectFault(FaultTarget::Instance(a.key)), T, vec![]).await;
    assert_eq!(kind(fault), ErrorKind::Unauthorized, "fault injection is off");

    // A is served as before: its chunks, its blocks, no re-registration.
    let found = a.client.lookup(a.key, h.clone(), true).await;
    assert_eq!(found.chunks, 2);
    let (r, v) = a.retrieve_and_verify(&h, &blocks, found.lease).await.unwrap();
    assert_eq!((r.prefix_retrieved(), v.corrupt_chunks), (2, 0));
    assert_eq!(a.client.reregistrations(), 0);
    let stats = a.client.stats().await.unwrap();
    assert_eq!((stats.instances, stats.registrations), (1, 1));
    // B's connection still works for what is its own.
    assert!(matches!(b.request(RequestBody::Ping, T, vec![]).await, Ok(ReplyBody::Pong { .. })));
}

#[actix_rt::test]
async fn a_reconnecting_client_takes_its_instance_back_with_its_secret() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &["--grace-ms", "10000"]);
    let mut a = worker(&server, 0xb, 0, 1).await;
    let h = prefix_hashes("test-model", 2, 0, 2, 256);
    let (blocks, _) = a.store_prefix(&h).await.unwrap();
    let epoch = a.client.ping().await.unwrap();
    // The connection drops (same server, same epoch): the client registers
    // again on the new one, presenting the secret, and is the owner again.
    let conn = a.client.link().borrow().connection.clone().expect("connected");
    conn.close();
    let link = a.client.link();
    let live =
        |l: &kvcoord_transport::LinkState| l.connections >= 2 && l.connection.as_ref().is_some_and(|c| !c.is_dead());
    assert!(eventually(T, async || live(&link.borrow())).await, "reconnected");
    let (r, v) = a.retrieve_and_verify(&h, &blocks, None).await.unwrap();
    assert_eq!((r.prefix_retrieved(), v.corrupt_chunks), (2, 0), "{:?}", r.error);
    assert_eq!(a.client.ping().await.unwrap(), epoch);
    assert_eq!(a.client.reregistrations(), 1, "one registration round on the new connection");
    let stats = a.client.stats().await.unwrap();
    assert_eq!((stats.instances, stats.registrations, stats.reregistrations), (1, 1, 1));
}

#[actix_rt::test]
async fn leases_are_usable_by_the_tenant_that_took_them_and_no_other() {
    let dir = tempfile::tempdir().unwrap();
    let b_token = "tenant-b-token-0123456789";
    let config = dir.path().join("kvcoord.toml");
    let b_file = token_file(dir.path(), "b.token", b_token);
    std::fs::write(&config, format!("[[tenants]]\nname = \"b\"\ntoken_file = {:?}\n", b_file)).unwrap();
    let server = ServerProcess::start(dir.path(), &["--config", config.to_str().unwrap()]);
    let mut a = worker(&server, 0xc, 0, 1).await;
    let h = prefix_hashes("test-model", 3, 0, 2, 256);
    let (blocks, _) = a.store_prefix(&h).await.unwrap();

    // The engine's scheduler: another process of the same tenant, no registration.
    let scheduler = core_client(server.endpoint());
    let found = scheduler.lookup_model("test-model", 1, h.clone(), true).await;
    assert_eq!(found.chunks, 2);
    let lease = found.lease.expect("a lease");

    // Another tenant can neither release nor use it.
    let other = raw_with_token(&server, b_token).await;
    let release = other.request(RequestBody::ReleaseLease { lease }, T, vec![]).await;
    assert_eq!(kind(release), ErrorKind::PermissionDenied);
    let mine = HostKvCache::create("b-memory", small_layout()).unwrap();
    let b_key = InstanceKey { engine: 0xd, rank: 0 };
    let fd = vec![mine.fd().try_clone_to_owned().unwrap()];
    other.request(register_body(b_key, "test-model", None), T, fd).await.unwrap();
    let retrieve = RequestBody::Retrieve(RetrieveChunks {
        instance: b_key,
        chunks: h.clone(),
        block_ids: (0..32).collect(),
        lease: Some(lease),
        done_event: None,
    });
    assert_eq!(kind(other.request(retrieve, T, vec![]).await), ErrorKind::PermissionDenied, "another tenant's lease");

    // The worker (same tenant, another session) retrieves with it.
    let (r, v) = a.retrieve_and_verify(&h, &blocks, Some(lease)).await.unwrap();
    assert_eq!((r.prefix_retrieved(), v.corrupt_chunks), (2, 0));
    assert_eq!(a.client.stats().await.unwrap().leases, 0, "the retrieve released it");
}

#[actix_rt::test]
async fn tcp_needs_a_token_and_refuses_a_wrong_one() {
    let dir = tempfile::tempdir().unwrap();
    let token = "default-tcp-token-0123456789";
    let file = token_file(dir.path(), "tcp.token", token);
    let server = ServerProcess::start(dir.path(), &["--tcp", "127.0.0.1:0", "--token-file", file.to_str().unwrap()]);
    let tcp = tcp_endpoint(&server).await;
    assert_eq!(refusal(Connection::open(&tcp, &ConnectOptions::default()).await), ErrorKind::Unauthorized, "no token");
    let wrong = ConnectOptions { token: Some(format!("{token}x")), ..ConnectOptions::default() };
    assert_eq!(refusal(Connection::open(&tcp, &wrong).await), ErrorKind::Unauthorized, "wrong token");
    let right = ConnectOptions { token: Some(token.into()), ..ConnectOptions::default() };
    let conn = Connection::open(&tcp, &right).await.unwrap();
    assert_eq!(conn.welcome().tenant, "default");
    assert!(!conn.welcome().admin);
    assert!(matches!(conn.request(RequestBody::Ping, T, vec![]).await, Ok(ReplyBody::Pong { .. })));
    // Privileged requests over TCP need the admin role too.
    assert_eq!(kind(conn.request(RequestBody::Clear, T, vec![]).await), ErrorKind::PermissionDenied);
    // The Unix socket is unaffected.
    assert!(matches!(raw(&server).await.request(RequestBody::Ping, T, vec![]).await, Ok(ReplyBody::Pong { .. })));
}

fn serve_exit(args: &[&str]) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("kv.sock");
    let mut child = Command::new(server_binary())
        .args(["serve", "--admin", "off", "--socket"])
        .arg(&socket)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if let Some(status) = child.try_wait().unwrap() {
            let mut err = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut err).unwrap();
            return (status.code(), err);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
    (None, String::new())
}

#[test]
fn tcp_on_a_public_address_without_a_token_or_tls_does_not_start() {
    let (code, err) = serve_exit(&["--tcp", "0.0.0.0:0"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("`tcp`") && err.contains("token"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let file = token_file(dir.path(), "t", "public-tcp-token-0123456789");
    let (code, err) = serve_exit(&["--tcp", "0.0.0.0:0", "--token-file", file.to_str().unwrap()]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("`tcp`") && err.contains("tls_cert"), "off loopback TLS is required: {err}");
    let (code, err) = serve_exit(&["--tcp", "127.0.0.1:0"]);
    assert_eq!(code, Some(2), "loopback needs a token too: {err}");
}

#[test]
fn print_config_redacts_the_admin_token() {
    let out = Command::new(server_binary())
        .args(["serve", "--print-config", "--admin-token", "very-secret-admin-token"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("very-secret-admin-token"), "{text}");
    assert!(text.contains("admin_token = \"<redacted>\""), "{text}");
}

#[actix_rt::test]
async fn tls_over_tcp_serves_with_the_servers_ca_and_refuses_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    let (cert_file, key_file) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_file, cert.cert.pem()).unwrap();
    std::fs::write(&key_file, cert.signing_key.serialize_pem()).unwrap();
    let other = rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
    let other_ca = dir.path().join("other.pem");
    std::fs::write(&other_ca, other.cert.pem()).unwrap();
    let token = "tls-tenant-token-0123456789";
    let file = token_file(dir.path(), "t", token);
    let server = ServerProcess::start(
        dir.path(),
        &[
            "--tcp",
            "127.0.0.1:0",
            "--token-file",
            file.to_str().unwrap(),
            "--tls-cert",
            cert_file.to_str().unwrap(),
            "--tls-key",
            key_file.to_str().unwrap(),
        ],
    );
    let tcp = tcp_endpoint(&server).await;

    // The client core over TLS with the server's certificate as its CA.
    let cfg = ClientConfig::new(tcp.clone()).with_token(token).with_tls_ca(&cert_file).unwrap();
    let client = Client::start(cfg);
    let stats = client.stats().await;
    assert!(stats.is_ok(), "{stats:?}");

    // Plain TCP to a TLS listener, or TLS trusting another CA: no connection.
    let plain = ConnectOptions { token: Some(token.into()), ..ConnectOptions::default() };
    assert!(Connection::open(&tcp, &plain).await.is_err(), "plain TCP to a TLS listener");
    let wrong_ca = kvcoord_transport::tls::client_config(&other_ca).unwrap();
    let opts = ConnectOptions { token: Some(token.into()), tls: Some(wrong_ca), ..ConnectOptions::default() };
    match Connection::open(&tcp, &opts).await {
        Err(ConnectError::Io { source, .. }) => assert!(source.to_string().contains("certificate"), "{source}"),
        other => panic!("expected a certificate error, got {other:?}"),
    }
    // The server keeps serving.
    assert!(client.ping().await.is_ok());
}

#[actix_rt::test]
async fn privileged_requests_need_the_admin_role() {
    let dir = tempfile::tempdir().unwrap();
    let admin_token = "admin-token-0123456789";
    let server = ServerProcess::start(dir.path(), &["--fault-injection", "--admin-token", admin_token]);
    let mut w = worker(&server, 0xe, 0, 1).await;
    let h = prefix_hashes("test-model", 4, 0, 2, 256);
    w.store_prefix(&h).await.unwrap();
    let plain = raw(&server).await;
    assert!(!plain.welcome().admin);
    assert_eq!(kind(plain.request(RequestBody::Clear, T, vec![]).await), ErrorKind::PermissionDenied);
    let fault = plain.request(RequestBody::InjectFault(FaultTarget::CopyLane(0)), T, vec![]).await;
    assert_eq!(kind(fault), ErrorKind::PermissionDenied);
    match plain.request(RequestBody::Status, T, vec![]).await.unwrap() {
        ReplyBody::Status(r) => assert!(r.instances.is_empty() && r.instances_hidden && r.stats.instances == 1),
        other => panic!("{other:?}"),
    }
    let wrong = ConnectOptions { token: Some("admin-token-012345678".into()), ..ConnectOptions::default() };
    assert_eq!(refusal(Connection::open(&server.endpoint(), &wrong).await), ErrorKind::Unauthorized);
    assert_eq!(w.client.stats().await.unwrap().objects, 2, "nothing was cleared");

    let admin = raw_with_token(&server, admin_token).await;
    assert!(admin.welcome().admin);
    match admin.request(RequestBody::Status, T, vec![]).await.unwrap() {
        ReplyBody::Status(r) => assert_eq!(r.instances.len(), 1),
        other => panic!("{other:?}"),
    }
    assert_eq!(admin.request(RequestBody::Clear, T, vec![]).await.unwrap(), ReplyBody::Cleared { objects: 2 });
    // The worker is still served after the clear.
    w.store_prefix(&h).await.unwrap();
    assert_eq!(w.client.stats().await.unwrap().objects, 2);
}

/// A TOML configuration with tenants `a` (quota `quota`), `b`, and `c`
/// sharing `a`'s namespace; returns the path and each tenant's token.
fn tenants_config(dir: &Path, quota: &str) -> (PathBuf, [String; 3]) {
    let tokens = ["tenant-a-token-0123456789", "tenant-b-token-0123456789", "tenant-c-token-0123456789"];
    let files: Vec<PathBuf> = ["a", "b", "c"].iter().zip(tokens).map(|(n, t)| token_file(dir, n, t)).collect();
    let toml = format!(
        "[[tenants]]\nname = \"a\"\ntoken_file = {:?}\nl1_quota = {quota:?}\n\n\
         [[tenants]]\nname = \"b\"\ntoken_file = {:?}\n\n\
         [[tenants]]\nname = \"c\"\ntoken_file = {:?}\nnamespace = \"a\"\n",
        files[0], files[1], files[2]
    );
    let path = dir.join("tenants.toml");
    std::fs::write(&path, toml).unwrap();
    (path, tokens.map(String::from))
}

#[actix_rt::test]
async fn tenants_never_read_each_others_chunks_unless_they_share_a_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let (config, [a_token, b_token, c_token]) = tenants_config(dir.path(), "1GiB");
    let server = ServerProcess::start(dir.path(), &["--config", config.to_str().unwrap()]);
    let mut a = worker_with_token(&server, 0x1a, 0, 1, &a_token).await;
    let h = prefix_hashes("test-model", 5, 0, 3, 256);
    a.store_prefix(&h).await.unwrap();

    // b: same model name, same hashes, its own instance: sees nothing, gets nothing.
    let mut b = worker_with_token(&server, 0x1b, 0, 1, &b_token).await;
    let b_sched = core_client_with_token(server.endpoint(), &b_token);
    assert_eq!(b_sched.lookup_model("test-model", 1, h.clone(), true).await.chunks, 0);
    assert_eq!(b.client.lookup(b.key, h.clone(), false).await.chunks, 0);
    let (r, _) = b.retrieve_and_verify(&h, &[], None).await.unwrap();
    assert_eq!(r.prefix_retrieved(), 0, "b's retrieve of a's hashes finds nothing");
    // b storing other bytes under the same hashes does not plant them in a's cache.
    let garbage = b.pick_blocks(3, &[]);
    b.scribble(&garbage).unwrap();
    b.store(&h, &garbage).await.unwrap();
    let (r, v) = a.retrieve_and_verify(&h, &[], None).await.unwrap();
    assert_eq!((r.prefix_retrieved(), v.corrupt_chunks), (3, 0), "a reads its own bytes");

    // c shares a's namespace: it finds a's chunks.
    let c_sched = core_client_with_token(server.endpoint(), &c_token);
    assert_eq!(c_sched.lookup_model("test-model", 1, h.clone(), false).await.chunks, 3);
    // The default tenant (the socket without a token) sees nothing either.
    let d_sched = core_client(server.endpoint());
    assert_eq!(d_sched.lookup_model("test-model", 1, h.clone(), false).await.chunks, 0);
}

#[actix_rt::test]
async fn a_tenant_over_its_quota_loses_its_own_oldest_chunks_and_nobody_elses() {
    let dir = tempfile::tempdir().unwrap();
    // Chunks are 1 MiB: a may hold 4.
    let (config, [a_token, b_token, _]) = tenants_config(dir.path(), "4MiB");
    let server = ServerProcess::start(
        dir.path(),
        &["--config", config.to_str().unwrap(), "--l1-size", "64MiB", "--admin", "127.0.0.1:0"],
    );
    let mut b = worker_with_token(&server, 0x2b, 0, 1, &b_token).await;
    let hb = prefix_hashes("test-model", 6, 0, 4, 256);
    let (_, outcomes) = b.store_prefix(&hb).await.unwrap();
    assert!(outcomes.iter().all(|o| *o == kvcoord_transport::StoreOutcome::Stored), "b's stores: {outcomes:?}");
    let mut a = worker_with_token(&server, 0x2a, 0, 1, &a_token).await;
    let ha = prefix_hashes("test-model", 7, 0, 6, 256);
    for chunk in ha.chunks(2) {
        let (_, outcomes) = a.store_prefix(chunk).await.unwrap();
        assert!(outcomes.iter().all(|o| *o == kvcoord_transport::StoreOutcome::Stored), "{outcomes:?}");
    }
    // b's older chunks all stayed; a kept its 4 newest.
    assert_eq!(b.client.lookup(b.key, hb.clone(), false).await.chunks, 4);
    assert_eq!(a.client.lookup(a.key, ha.clone(), false).await.chunks, 0, "a's first chunk went");
    assert_eq!(a.client.lookup(a.key, ha[2..].to_vec(), false).await.chunks, 4);

    let (_, admin) = endpoints(&server).await;
    let text = http_get(&admin.unwrap(), "/metrics");
    let metric = |name: &str, tenant: &str| -> f64 {
        let prefix = format!("{name}{{tenant=\"{tenant}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("{prefix} in {text}"))
            .parse()
            .unwrap()
    };
    assert_eq!(metric("kvcoord_tenant_evictions_total", "a"), 2.0);
    assert_eq!(metric("kvcoord_tenant_evictions_total", "b"), 0.0);
    assert_eq!(metric("kvcoord_tenant_l1_used_bytes", "a"), (4 << 20) as f64);
    assert_eq!(metric("kvcoord_tenant_l1_quota_bytes", "a"), (4 << 20) as f64);
    assert_eq!(metric("kvcoord_tenant_bytes_stored_total", "a"), (6 << 20) as f64);
    assert_eq!(metric("kvcoord_tenant_lookup_hit_chunks_total", "b"), 4.0);
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()
}

/// A directory anyone may enter (the test runs as root; the peers below
/// run as `nobody`).
fn open_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    dir
}

const NOBODY: u32 = 65534;

fn running_as_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[actix_rt::test]
async fn a_socket_peer_of_another_uid_is_refused_unless_allowed() {
    if !running_as_root() {
        eprintln!("skipped: needs root to run a peer as another uid");
        return;
    }
    for (allow, expect_ok) in [(None, false), (Some(NOBODY), true)] {
        let dir = open_dir();
        let mut args = vec!["--socket-mode".to_string(), "0666".into()];
        if let Some(uid) = allow {
            args.extend(["--allow-uid".into(), uid.to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let server = ServerProcess::start(dir.path(), &args);
        let socket = server.socket.clone();
        let out = tokio::task::spawn_blocking(move || {
            Command::new(server_binary())
                .args(["status", "--socket"])
                .arg(&socket)
                .uid(NOBODY)
                .gid(NOBODY)
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.success(), expect_ok, "allow {allow:?}: {err}");
        if !expect_ok {
            assert!(err.contains("Unauthorized") && err.contains("uid 65534"), "{err}");
        }
        // The server's own user is served all along.
        assert!(matches!(raw(&server).await.request(RequestBody::Ping, T, vec![]).await, Ok(ReplyBody::Pong { .. })));
    }
}

#[actix_rt::test]
async fn a_client_hands_its_memory_only_to_a_server_of_its_own_uid_or_root() {
    if !running_as_root() {
        eprintln!("skipped: needs root to run a server as another uid");
        return;
    }
    let dir = open_dir();
    let socket = dir.path().join("kv.sock");
    let mut server = Command::new(server_binary())
        .args(["serve", "--admin", "off", "--socket-mode", "0666", "--allow-uid", "0", "--socket"])
        .arg(&socket)
        .uid(NOBODY)
        .gid(NOBODY)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let up =
        eventually(Duration::from_secs(10), async || std::os::unix::net::UnixStream::connect(&socket).is_ok()).await;
    assert!(up, "the server (uid nobody) listens");
    let client = core_client(Endpoint::Unix(socket.clone()));
    let key = InstanceKey { engine: 0xf, rank: 0 };
    let r = TpWorker::register(client.clone(), key, "test-model", 1, small_layout(), 256).await;
    match r {
        Err(RequestError::UntrustedServer(why)) => assert!(why.contains("uid 65534"), "{why}"),
        Err(other) => panic!("expected UntrustedServer, got {other:?}"),
        Ok(_) => panic!("the memfd went to a server of another uid"),
    }
    assert_eq!(RequestError::UntrustedServer(String::new()).kind(), ErrorKind::PermissionDenied);
    // Requests that hand over no memory still work, and trusting the uid explicitly lets it register.
    assert!(client.ping().await.is_ok());
    let mut cfg = ClientConfig::new(Endpoint::Unix(socket));
    cfg.reconnect.connect.trusted_server_uids = vec![NOBODY];
    let trusting = Client::start(cfg);
    let w = TpWorker::register(trusting, key, "test-model", 1, small_layout(), 256).await;
    assert!(w.is_ok(), "{:?}", w.err());
    let _ = server.kill();
    let _ = server.wait();
}

#[actix_rt::test]
async fn lookups_by_model_refuse_nul_in_the_name() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let conn = raw(&server).await;
    let h = prefix_hashes("test-model", 8, 0, 1, 256);
    let body = RequestBody::LookupModel(LookupByModel {
        model: "a\0test-model".into(),
        world_size: 1,
        chunks: h,
        lease: false,
    });
    assert_eq!(kind(conn.request(body, T, vec![]).await), ErrorKind::InvalidArgument);
    let mine = HostKvCache::create("nul", small_layout()).unwrap();
    let fd = vec![mine.fd().try_clone_to_owned().unwrap()];
    let r = conn.request(register_body(InstanceKey { engine: 1, rank: 0 }, "a\0m", None), T, fd).await;
    assert_eq!(kind(r), ErrorKind::InvalidArgument);
}

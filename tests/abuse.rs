//! The bad-input and abuse matrix (issue #18, item 7), against real
//! `kvcoord serve` processes: one test per case, each asserting the exact
//! answer (a reply's `ErrorKind`, or the `Refused`/`Undecodable` frame the
//! server sends before it closes, or the one success the abuse must get),
//! and that a separate valid client (registered, storing and retrieving
//! real bytes and checking every one) is served before, during and after,
//! and that the server's descriptor count returns to where it was.
//!
//! Not repeated here (see `tests/hardening.rs`): descriptor floods and
//! descriptors at the fd limit, the connection cap, one idle connection,
//! accept failures at EMFILE, 8 MiB headers, bad first frames (oversized,
//! truncated, too many descriptors, stray descriptors, a request before the
//! hello), 200k pipelined pings, lease expiry, the socket's mode and
//! directory, client names in the log, the limits' flags.
//!
//! Access control is part of the matrix: another session's instance or
//! another tenant's lease, privileged requests without the admin role, a
//! missing or wrong token. Bad values are sent on the abuser's own instance
//! (`Owned`), so they meet the check they are named after, not the
//! ownership check; fault-injection cases connect with the admin token
//! (`AsAdmin`).
//!
//! A new case is one entry of `abuse_cases!` at the end: its name (the
//! behaviour), the server's extra flags (`$DIR` is the case's directory,
//! where `tenants.toml`, `tenant-b.token` and `tcp.token` are written), what
//! the abuse must get, and the abuse (a request, raw bytes, or a script).

mod common;

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use futures::future::LocalBoxFuture;
use kvcoord_harness::{prefix_hashes, TpWorker};
use kvcoord_memory::{CudaIpcLayer, Dtype, KvLayout, MemoryHandle};
use kvcoord_transport::frame::{self, HEADER_BYTES};
use kvcoord_transport::handshake::HandshakeError;
use kvcoord_transport::*;
use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use ErrorKind::*;
use Expect::*;

const T: Duration = Duration::from_secs(10);
/// The valid client: its instance, and its model (`common::worker`'s).
const VALID: InstanceKey = InstanceKey { engine: 0xA11CE, rank: 0 };
const MODEL: &str = "test-model";
/// The abuser's own engine.
const OWN: InstanceKey = InstanceKey { engine: 0xBAD, rank: 0 };
const UNKNOWN: InstanceKey = InstanceKey { engine: 0xDEAD, rank: 3 };
/// The admin token of the cases that pass `--admin-token`.
const ADMIN: &str = "abuse-admin-token-0123456789";
/// Tenant `b`'s token (`$DIR/tenants.toml`), and the TCP token (`$DIR/tcp.token`).
const TENANT_B: &str = "abuse-tenant-b-token-0123456789";
const TCP_TOKEN: &str = "abuse-tcp-token-0123456789";
/// Wrong tokens: one character off a real one.
const WRONG_ADMIN: &str = "abuse-admin-token-012345678X";
const WRONG_TCP: &str = "abuse-tcp-token-012345678X";
/// Chunks per valid round (1 MiB each with `small_layout`).
const ROUND_CHUNKS: usize = 2;

// -- What the abuse gets, and what it must get.

/// What the server answered an abuse (shown through `Debug` when a case fails).
#[derive(Debug)]
#[allow(dead_code)]
enum Seen {
    Reply(Result<ReplyBody, WireError>),
    /// This frame, then the server closed the connection.
    Refused(WireError),
    Undecodable(WireError),
    /// Anything else (no reply, a frame and no close, ...).
    Other(String),
}

#[derive(Clone, Copy)]
enum Expect {
    /// A reply with this error kind.
    Error(ErrorKind),
    /// `Refused` with this kind, then a close.
    Refused(ErrorKind),
    /// `Undecodable` with this kind, then a close.
    Undecodable(ErrorKind),
    /// A successful reply of this shape (what today's protocol answers).
    Reply(&'static str, fn(&ReplyBody) -> bool),
}

impl Expect {
    fn matches(&self, seen: &Seen) -> bool {
        match (self, seen) {
            (Error(k), Seen::Reply(Err(e))) => e.kind == *k,
            (Refused(k), Seen::Refused(e)) | (Undecodable(k), Seen::Undecodable(e)) => e.kind == *k,
            (Reply(_, shape), Seen::Reply(Ok(body))) => shape(body),
            _ => false,
        }
    }

    fn describe(&self) -> String {
        match self {
            Error(k) => format!("a reply Err({k:?})"),
            Refused(k) => format!("Refused({k:?}) and a close"),
            Undecodable(k) => format!("Undecodable({k:?}) and a close"),
            Reply(what, _) => format!("the reply {what}"),
        }
    }
}

fn seen(r: Result<ReplyBody, RequestError>) -> Seen {
    match r {
        Ok(body) => Seen::Reply(Ok(body)),
        Err(RequestError::Server(e)) => Seen::Reply(Err(e)),
        Err(e) => Seen::Other(format!("no reply: {e}")),
    }
}

// -- The abuses.

/// Where the abuse goes.
#[derive(Clone)]
struct Target {
    socket: PathBuf,
    endpoint: Endpoint,
}

type Script = fn(Target) -> LocalBoxFuture<'static, Seen>;

enum Abuse {
    /// One request on a fresh connection.
    Request(RequestBody),
    /// One request on a fresh connection that first registered its own
    /// instance `OWN` (`small_layout`, like the valid client's).
    Owned(RequestBody),
    /// One request on a fresh connection presenting the admin token.
    AsAdmin(RequestBody),
    /// One request carrying these descriptors.
    WithFds(RequestBody, Vec<OwnedFd>),
    /// Raw bytes after a handshake.
    AfterHello(Vec<u8>),
    /// Raw bytes as the first frame.
    First(Vec<u8>),
    Script(Script),
}

impl Abuse {
    async fn run(self, t: Target) -> Seen {
        match self {
            Abuse::Request(body) => seen(open(&t).await.request(body, T, vec![]).await),
            Abuse::Owned(body) => {
                let c = open(&t).await;
                scripts::register_own_small(&c).await;
                seen(c.request(body, T, vec![]).await)
            }
            Abuse::AsAdmin(body) => {
                let c = open_with_token(&t, ADMIN).await;
                assert!(c.welcome().admin, "the admin token gives the admin role");
                seen(c.request(body, T, vec![]).await)
            }
            Abuse::WithFds(body, fds) => seen(open(&t).await.request(body, T, fds).await),
            Abuse::AfterHello(bytes) => {
                let mut c = RawConn::handshaken(&t).await;
                c.send(&bytes).await;
                c.outcome().await
            }
            Abuse::First(bytes) => {
                let mut c = RawConn::connect(&t).await;
                c.send(&bytes).await;
                c.outcome().await
            }
            Abuse::Script(script) => script(t).await,
        }
    }
}

async fn open(t: &Target) -> Arc<Connection> {
    Connection::open(&t.endpoint, &ConnectOptions::default()).await.expect("connect")
}

async fn open_with_token(t: &Target, token: &str) -> Arc<Connection> {
    let opts = ConnectOptions { token: Some(token.into()), ..ConnectOptions::default() };
    Connection::open(&t.endpoint, &opts).await.expect("connect")
}

/// What a handshake got: a refusal is `Seen::Refused`.
fn handshake_seen(r: Result<Arc<Connection>, ConnectError>) -> Seen {
    match r {
        Err(ConnectError::Handshake(HandshakeError::Refused(e))) => Seen::Refused(e),
        Err(e) => Seen::Other(format!("connect failed otherwise: {e}")),
        Ok(c) => Seen::Other(format!("welcomed: {:?}", c.welcome())),
    }
}

/// A raw connection: frames as bytes, with descriptors when asked.
struct RawConn(tokio::net::UnixStream);

impl RawConn {
    async fn connect(t: &Target) -> RawConn {
        RawConn(tokio::net::UnixStream::connect(&t.socket).await.expect("connect"))
    }

    async fn handshaken(t: &Target) -> RawConn {
        let mut c = RawConn::connect(t).await;
        c.send(&hello(PROTOCOL_VERSION, None)).await;
        match c.frame().await {
            Some(ServerFrame::Welcome(_)) => c,
            other => panic!("no welcome: {other:?}"),
        }
    }

    /// Writes `bytes`; a server that already closed is not an error here.
    async fn send(&mut self, bytes: &[u8]) {
        let _ = self.0.write_all(bytes).await;
    }

    async fn send_fds(&mut self, bytes: &[u8], fds: &[RawFd]) {
        let raw = self.0.as_raw_fd();
        let sent = loop {
            self.0.writable().await.unwrap();
            let r = self.0.try_io(tokio::io::Interest::WRITABLE, || {
                let cmsg = [ControlMessage::ScmRights(fds)];
                sendmsg::<()>(raw, &[std::io::IoSlice::new(bytes)], &cmsg, MsgFlags::MSG_NOSIGNAL, None)
                    .map_err(std::io::Error::from)
            });
            match r {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => panic!("sendmsg: {e}"),
            }
        };
        self.send(&bytes[sent..]).await;
    }

    /// The next whole frame; `None` at the end of the stream or after `T`.
    async fn frame(&mut self) -> Option<ServerFrame> {
        let read = async {
            let mut h = [0u8; HEADER_BYTES];
            self.0.read_exact(&mut h).await.ok()?;
            let mut payload = vec![0u8; u32::from_le_bytes(h[..4].try_into().unwrap()) as usize];
            self.0.read_exact(&mut payload).await.ok()?;
            Some(frame::decode(&payload).expect("the server's frames decode"))
        };
        tokio::time::timeout(T, read).await.ok().flatten()
    }

    /// Whether the server closes the connection (within `T`); if not, what
    /// came instead.
    async fn closes(&mut self) -> Result<(), String> {
        let mut b = [0u8; 64];
        match tokio::time::timeout(T, self.0.read(&mut b)).await {
            Ok(Ok(0)) => Ok(()),
            Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(()),
            Ok(Ok(n)) => Err(format!("{n} more bytes: {:?}", &b[..n])),
            Ok(Err(e)) => Err(format!("read error {e}")),
            Err(_) => Err("no close within 10 s".into()),
        }
    }

    /// What the server sends next: a reply, or a closing frame and the close.
    async fn outcome(&mut self) -> Seen {
        let closing = match self.frame().await {
            Some(ServerFrame::Reply(r)) => return Seen::Reply(r.result),
            Some(ServerFrame::Refused(e)) => Seen::Refused(e),
            Some(ServerFrame::Undecodable(e)) => Seen::Undecodable(e),
            Some(f) => return Seen::Other(format!("unexpected {f:?}")),
            None => return Seen::Other("no frame: closed silently or nothing within 10 s".into()),
        };
        match self.closes().await {
            Ok(()) => closing,
            Err(instead) => Seen::Other(format!("{closing:?}, then not closed: {instead}")),
        }
    }
}

// -- Bytes and bodies.

fn hello(protocol: u32, token: Option<&str>) -> Vec<u8> {
    let token = token.map(String::from);
    frame::encode(&ClientFrame::Hello(Hello { protocol, client: "abuse".into(), token }), 0, 1 << 20).unwrap()
}

fn request_frame(body: RequestBody, deadline_ms: u32, fds: u8) -> Vec<u8> {
    let req = ClientFrame::Request(Request { id: RequestId(1), deadline_ms, body });
    frame::encode(&req, fds, frame::HARD_MAX_FRAME_BYTES).unwrap()
}

fn ping_frame() -> Vec<u8> {
    request_frame(RequestBody::Ping, 5000, 0)
}

/// A frame of `payload` (any bytes) declaring `fds` descriptors.
fn raw_frame(payload: &[u8], fds: u8) -> Vec<u8> {
    let mut f = (payload.len() as u32).to_le_bytes().to_vec();
    f.push(fds);
    f.extend_from_slice(payload);
    f
}

/// `frame` with the first `from` in its payload replaced by `to`.
fn patched(frame: Vec<u8>, from: &[u8], to: &[u8]) -> Vec<u8> {
    let payload = &frame[HEADER_BYTES..];
    let at = payload.windows(from.len()).position(|w| w == from).expect("pattern in the frame");
    let new = [&payload[..at], to, &payload[at + from.len()..]].concat();
    raw_frame(&new, frame[4])
}

fn hashes(n: usize, seed: u64) -> Vec<ChunkHash> {
    (0..n as u64)
        .map(|i| ChunkHash(*blake3::hash(&[seed.to_le_bytes(), i.to_le_bytes()].concat()).as_bytes()))
        .collect()
}

/// Blocks per chunk of `small_layout` at 256-token chunks.
const BPC: usize = 16;

fn store(instance: InstanceKey, chunks: usize, block_ids: Vec<u32>) -> RequestBody {
    RequestBody::Store(StoreChunks { instance, chunks: hashes(chunks, 1), block_ids, ready_event: None })
}

fn retrieve(instance: InstanceKey, chunks: usize, block_ids: Vec<u32>, lease: Option<LeaseId>) -> RequestBody {
    RequestBody::Retrieve(RetrieveChunks { instance, chunks: hashes(chunks, 2), block_ids, lease, done_event: None })
}

/// How `lookup`'s first chunk hash is encoded: its length, its 32 bytes.
fn hash_bytes() -> Vec<u8> {
    [&[32u8][..], &hashes(1, 3)[0].0].concat()
}

fn lookup(instance: InstanceKey, chunks: usize) -> RequestBody {
    RequestBody::Lookup(LookupPrefix { instance, chunks: hashes(chunks, 3), lease: true })
}

fn lookup_model(model: &str, chunks: usize) -> RequestBody {
    let chunks = hashes(chunks, 4);
    RequestBody::LookupModel(LookupByModel { model: model.into(), world_size: 1, chunks, lease: true })
}

fn register(
    instance: InstanceKey,
    world_size: u32,
    model: &str,
    layout: KvLayout,
    memory: MemoryHandle,
) -> RequestBody {
    RequestBody::Register(RegisterKvCache { instance, model: model.into(), world_size, layout, memory, secret: None })
}

/// A register of `instance` with `small_layout` on host memory, presenting `secret`.
fn register_small(instance: InstanceKey, secret: Option<InstanceSecret>) -> RequestBody {
    let size = small().total_bytes();
    let memory = MemoryHandle::HostFd { size };
    RequestBody::Register(RegisterKvCache {
        instance,
        model: MODEL.into(),
        world_size: 1,
        layout: small(),
        memory,
        secret,
    })
}

/// A register of the abuser's own instance with `layout` on host memory
/// declared as `size` bytes.
fn register_own(layout: KvLayout, size: u64) -> RequestBody {
    register(OWN, 1, MODEL, layout, MemoryHandle::HostFd { size })
}

fn memfd(len: u64) -> OwnedFd {
    kvcoord_memory::sealed_memfd("abuse", len).unwrap()
}

fn small() -> KvLayout {
    small_layout()
}

fn ids(n: usize, value: u32) -> Vec<u32> {
    vec![value; n]
}

fn is_pong(b: &ReplyBody) -> bool {
    matches!(b, ReplyBody::Pong { .. })
}

// -- Scripts: abuses of more than one step.
mod scripts {
    use super::*;

    pub async fn request_on(c: &Connection, body: RequestBody, fds: Vec<OwnedFd>) -> Result<ReplyBody, RequestError> {
        c.request(body, T, fds).await
    }

    /// Registers the abuser's own instance on `c` (a 1 MiB MLA cache).
    pub async fn register_own_instance(c: &Connection) -> (KvLayout, u64) {
        let layout = KvLayout::mla(2, 32, 16, 512, Dtype::Bf16);
        let size = layout.total_bytes();
        let r = request_on(c, register_own(layout, size), vec![memfd(size)]).await;
        assert!(matches!(r, Ok(ReplyBody::Registered { already: false, .. })), "{r:?}");
        (layout, size)
    }

    /// Registers the abuser's own instance on `c` with `small_layout` (256
    /// blocks of 16 tokens, like the valid client's).
    pub async fn register_own_small(c: &Connection) {
        let r = request_on(c, register_small(OWN, None), vec![memfd(small().total_bytes())]).await;
        assert!(matches!(r, Ok(ReplyBody::Registered { already: false, .. })), "{r:?}");
    }

    /// A lease on the valid client's first round (2 chunks every worker has
    /// stored), taken by a default-tenant session on `c`.
    pub async fn lease_on_the_first_round(c: &Connection) -> Result<LeaseId, Seen> {
        let chunks = prefix_hashes(MODEL, VALID.engine, 1, ROUND_CHUNKS, 256);
        let body = RequestBody::LookupModel(LookupByModel { model: MODEL.into(), world_size: 1, chunks, lease: true });
        match request_on(c, body, vec![]).await {
            Ok(ReplyBody::Found { chunks: 2, lease: Some(l) }) => Ok(l),
            other => Err(Seen::Other(format!("no lease: {other:?}"))),
        }
    }

    /// Tenant `b` retrieves into its own instance with a default-tenant lease.
    pub fn retrieve_with_another_tenants_lease(t: Target) -> LocalBoxFuture<'static, Seen> {
        Box::pin(async move {
            let taker = open(&t).await;
            let lease = match lease_on_the_first_round(&taker).await {
                Ok(l) => l,
                Err(s) => return s,
            };
            let b = open_with_token(&t, TENANT_B).await;
            register_own_small(&b).await;
            let chunks = prefix_hashes(MODEL, VALID.engine, 1, ROUND_CHUNKS, 256);
            let body = RequestBody::Retrieve(RetrieveChunks {
                instance: OWN,
                chunks,
                block_ids: (0..32).collect(),
                lease: Some(lease),
                done_event: None,
            });
            seen(request_on(&b, body, vec![]).await)
        })
    }

    /// Tenant `b` releases a default-tenant lease.
    pub fn release_another_tenants_lease(t: Target) -> LocalBoxFuture<'static, Seen> {
        Box::pin(async move {
            let taker = open(&t).await;
            let lease = match lease_on_the_first_round(&taker).await {
                Ok(l) => l,
                Err(s) => return s,
            };
            let b = open_with_token(&t, TENANT_B).await;
            seen(request_on(&b, RequestBody::ReleaseLease { lease }, vec![]).await)
        })
    }

    /// The server's TCP endpoint, as its status tells it.
    async fn tcp_endpoint(t: &Target) -> Endpoint {
        let c = open(t).await;
        let all = match request_on(&c, RequestBody::Status, vec![]).await {
            Ok(ReplyBody::Status(r)) => r.endpoints,
            other => panic!("status: {other:?}"),
        };
        let tcp = all.iter().find_map(|e| e.strip_prefix("tcp://")).expect("a TCP endpoint");
        Endpoint::Tcp(tcp.to_string())
    }

    pub fn tcp_hello_without_a_token(t: Target) -> LocalBoxFuture<'static, Seen> {
        Box::pin(async move {
            let tcp = tcp_endpoint(&t).await;
            handshake_seen(Connection::open(&tcp, &ConnectOptions::default()).await)
        })
    }

    pub fn tcp_hello_with_a_wrong_token(t: Target) -> LocalBoxFuture<'static, Seen> {
        Box::pin(async move {
            let tcp = tcp_endpoint(&t).await;
            let opts = ConnectOptions { token: Some(WRONG_TCP.into()), ..ConnectOptions::default() };
            handshake_seen(Connection::open(&tcp, &opts).await)
        })
    }

    pub fn requests_after_unregister(t: Target) -> LocalBoxFuture<'static, Seen> {
        Box::pin(async move {
            let c = open(&t).await;
            register_own_instance(&c).await;
            let r = request_on(&c, RequestBody::Unregister { instance: OWN }, vec![]).await;
            assert!(matches!(r, Ok(ReplyBody::Unregistered)), "{r:?}");
            seen(request_on(&c, store(OWN, 1, ids(BPC, 0)), vec![]).await)
        })
    }

    pub fn unregister_twice(t: Target) -> LocalBoxFuture<'static, Seen> {
        Box::pin(async move {
            let c = open(&t).await;
            register_own_instance(&c).await;
            assert!(request_on(&c, RequestBody::Unregister { instance: OWN }, vec![]).await.is_ok());
            seen(request_on(&c, RequestBody::Unregister { instance: OWN }, vec![]).await)
        })
    }

    pub fn register_twice_with_the_same_memory(t: Target) -> LocalBoxFuture<'static, Seen> {
        Box::pin(async move {
            let c = open(&t).await;
            let layout = KvLayout::mla(2, 32, 16, 512, Dtype::Bf16);
            let size = layout.total_bytes();
            let fd = memfd(size);
            let again = fd.try_clone().unwrap();
            assert!(request_on(&c, register_own(layout, size), vec![fd]).await.is_ok());
            seen(request_on(&c, register_own(layout, size), vec![again]).await)
        })
    }

    pub fn release_a_lease_twice(t: Target) -> LocalBoxFuture<'static, Seen> {
        Box::pin(async move {
            let c = open(&t).await;
            let lease = match lease_on_the_first_round(&c).await {
                Ok(l) => l,
                Err(s) => return s,
            };
            let r = request_on(&c, RequestBody::ReleaseLease { lease }, vec![]).await;
            assert!(matches!(r, Ok(ReplyBody::LeaseReleased)), "{r:?}");
            seen(request_on(&c, RequestBody::ReleaseLease { lease }, vec![]).await)
        })
    }

    pub fn lookup_a_million_chunks(t: Target) -> LocalBoxFuture<'static, Seen> {
        Box::pin(async move {
            let opts = ConnectOptions { max_frame_bytes: frame::HARD_MAX_FRAME_BYTES, ..Default::default() };
            let c = Connection::open(&t.endpoint, &opts).await.expect("connect");
            let chunks = vec![ChunkHash([7; 32]); 1 << 20];
            let body =
                RequestBody::LookupModel(LookupByModel { model: MODEL.into(), world_size: 1, chunks, lease: true });
            seen(request_on(&c, body, vec![]).await)
        })
    }

    pub fn register_an_unsealed_memfd(t: Target) -> LocalBoxFuture<'static, Seen> {
        Box::pin(async move {
            use nix::sys::memfd::{memfd_create, MFdFlags};
            let layout = KvLayout::mla(2, 32, 16, 512, Dtype::Bf16);
            let file = std::fs::File::from(memfd_create("unsealed", MFdFlags::MFD_CLOEXEC).unwrap());
            file.set_len(layout.total_bytes()).unwrap();
            let c = open(&t).await;
            seen(request_on(&c, register_own(layout, layout.total_bytes()), vec![file.into()]).await)
        })
    }

    pub fn register_dev_zero(t: Target) -> LocalBoxFuture<'static, Seen> {
        Box::pin(async move {
            let layout = KvLayout::mla(2, 32, 16, 512, Dtype::Bf16);
            let zero = std::fs::File::open("/dev/zero").unwrap();
            let c = open(&t).await;
            seen(request_on(&c, register_own(layout, layout.total_bytes()), vec![zero.into()]).await)
        })
    }

    /// A frame declaring one descriptor that carries four.
    pub fn register_carrying_three_extra_descriptors(t: Target) -> LocalBoxFuture<'static, Seen> {
        Box::pin(async move {
            let layout = KvLayout::mla(2, 32, 16, 512, Dtype::Bf16);
            let fd = memfd(layout.total_bytes());
            let mut c = RawConn::handshaken(&t).await;
            let f = request_frame(register_own(layout, layout.total_bytes()), 5000, 1);
            c.send_fds(&f, &[fd.as_raw_fd(); 4]).await;
            c.outcome().await
        })
    }

    /// A ping declaring and carrying four descriptors: served, and the
    /// descriptors closed (the case's descriptor check).
    pub fn ping_carrying_four_declared_descriptors(t: Target) -> LocalBoxFuture<'static, Seen> {
        Box::pin(async move {
            let devnull = std::fs::File::open("/dev/null").unwrap();
            let mut c = RawConn::handshaken(&t).await;
            c.send_fds(&request_frame(RequestBody::Ping, 5000, 4), &[devnull.as_raw_fd(); 4]).await;
            c.outcome().await
        })
    }

    /// 200 pings on one connection, each declaring and carrying four
    /// descriptors (800 in all): every one answered, every descriptor closed.
    pub fn a_flood_of_declared_descriptors(t: Target) -> LocalBoxFuture<'static, Seen> {
        Box::pin(async move {
            let devnull = std::fs::File::open("/dev/null").unwrap();
            let mut c = RawConn::handshaken(&t).await;
            for _ in 0..200 {
                c.send_fds(&request_frame(RequestBody::Ping, 5000, 4), &[devnull.as_raw_fd(); 4]).await;
            }
            for i in 0..200 {
                match c.outcome().await {
                    Seen::Reply(Ok(ReplyBody::Pong { .. })) if i < 199 => {}
                    last @ Seen::Reply(Ok(ReplyBody::Pong { .. })) => return last,
                    other => return Seen::Other(format!("ping {i}: {other:?}")),
                }
            }
            unreachable!()
        })
    }

    pub fn request_cut_off_by_a_half_close(t: Target) -> LocalBoxFuture<'static, Seen> {
        Box::pin(async move {
            let mut c = RawConn::handshaken(&t).await;
            let f = request_frame(store(OWN, 1, ids(BPC, 0)), 5000, 0);
            c.send(&f[..f.len() / 2]).await;
            c.0.shutdown().await.unwrap();
            c.outcome().await
        })
    }

    /// The same outcome on every one of `conns`, or the first that differs.
    pub async fn all_same(conns: &mut [RawConn]) -> Seen {
        let mut first: Option<Seen> = None;
        for (i, c) in conns.iter_mut().enumerate() {
            let s = c.outcome().await;
            match &first {
                None => first = Some(s),
                Some(f) if format!("{f:?}") == format!("{s:?}") => {}
                Some(f) => return Seen::Other(format!("connection {i} saw {s:?}, the first saw {f:?}")),
            }
        }
        first.unwrap_or(Seen::Other("no connections".into()))
    }

    pub fn a_flood_of_idle_connections(t: Target) -> LocalBoxFuture<'static, Seen> {
        Box::pin(async move {
            let mut conns = Vec::new();
            for _ in 0..200 {
                conns.push(RawConn::handshaken(&t).await);
            }
            all_same(&mut conns).await
        })
    }

    pub fn a_flood_of_connections_that_never_say_hello(t: Target) -> LocalBoxFuture<'static, Seen> {
        Box::pin(async move {
            let mut conns = Vec::new();
            for _ in 0..100 {
                conns.push(RawConn::connect(&t).await);
            }
            all_same(&mut conns).await
        })
    }
}

// -- The valid client, and one case's run.

/// A registered TP worker storing and retrieving real bytes, checking each.
struct ValidClient {
    worker: TpWorker,
    rounds: u64,
}

impl ValidClient {
    async fn start(server: &ServerProcess) -> ValidClient {
        ValidClient { worker: worker(server, VALID.engine, VALID.rank, 1).await, rounds: 0 }
    }

    /// Stores a new prompt's chunks, retrieves them into other blocks and
    /// checks every byte.
    async fn round(&mut self, case: &str, when: &str) {
        self.rounds += 1;
        let hashes = prefix_hashes(MODEL, VALID.engine, self.rounds, ROUND_CHUNKS, 256);
        let (blocks, outcomes) =
            self.worker.store_prefix(&hashes).await.unwrap_or_else(|e| panic!("{case}: valid store {when}: {e}"));
        assert!(outcomes.iter().all(|o| *o == StoreOutcome::Stored), "{case}: valid store {when}: {outcomes:?}");
        let (r, v) = self.worker.retrieve_and_verify(&hashes, &blocks, None).await.unwrap();
        assert_eq!(r.prefix_retrieved(), ROUND_CHUNKS, "{case}: valid retrieve {when}: {r:?}");
        assert_eq!(v.corrupt_chunks, 0, "{case}: valid retrieve {when}: corrupt bytes");
        assert_eq!(v.bytes_verified, ROUND_CHUNKS as u64 * small_layout().chunk_object_bytes(BPC as u32));
    }
}

/// Writes the cases' credentials into `dir`: tenant `b` in `tenants.toml`
/// with its token file, and the TCP token file (each 0600).
fn write_credentials(dir: &std::path::Path) {
    use std::os::unix::fs::PermissionsExt;
    let secret = |name: &str, token: &str| {
        let p = dir.join(name);
        std::fs::write(&p, format!("{token}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        p
    };
    let b = secret("tenant-b.token", TENANT_B);
    secret("tcp.token", TCP_TOKEN);
    std::fs::write(dir.join("tenants.toml"), format!("[[tenants]]\nname = \"b\"\ntoken_file = {b:?}\n")).unwrap();
}

/// Runs one case: a server with `flags`, a valid client served before,
/// during and after the abuse, the abuse's exact answer, descriptors back.
async fn run_case(case: &str, flags: &[&str], expect: Expect, abuse: Abuse) {
    let dir = tempfile::tempdir().unwrap();
    write_credentials(dir.path());
    let at = dir.path().to_str().unwrap();
    let mut args: Vec<String> = ["--grace-ms", "100", "--backend", "host"].map(String::from).to_vec();
    args.extend(flags.iter().map(|f| f.replace("$DIR", at)));
    let server = ServerProcess::start(dir.path(), &args.iter().map(String::as_str).collect::<Vec<_>>());
    let target = Target { socket: server.socket.clone(), endpoint: server.endpoint() };
    let mut valid = ValidClient::start(&server).await;
    valid.round(case, "before").await;
    let base = open_fds(server.pid());

    let done = AtomicBool::new(false);
    let abused = async {
        let s = abuse.run(target.clone()).await;
        done.store(true, Ordering::Release);
        s
    };
    let during = async {
        loop {
            valid.round(case, "during").await;
            if done.load(Ordering::Acquire) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let (seen, ()) = tokio::join!(abused, during);
    assert!(expect.matches(&seen), "{case}: expected {}, got {seen:?}", expect.describe());

    valid.round(case, "after").await;
    let fresh = open(&target).await;
    assert!(matches!(fresh.request(RequestBody::Ping, T, vec![]).await, Ok(ReplyBody::Pong { .. })));
    drop(fresh);
    let pid = server.pid();
    assert!(
        eventually(Duration::from_secs(5), async || open_fds(pid) <= base).await,
        "{case}: the server holds {} descriptors, {base} before the abuse",
        open_fds(pid)
    );
}

macro_rules! abuse_cases {
    ($( $(#[$doc:meta])* $name:ident: [$($flag:expr),*] => $expect:expr, $abuse:expr; )*) => {
        $(
            $(#[$doc])*
            #[actix_rt::test]
            async fn $name() {
                run_case(stringify!($name), &[$($flag),*], $expect, $abuse).await;
            }
        )*
    };
}

use Abuse::{AfterHello, AsAdmin, First, Owned, Request as Req, Script as Run, WithFds};

abuse_cases! {
    // Frames after the handshake: each gets `Undecodable` and a close.
    frame_over_the_limit_after_the_handshake: [] => Undecodable(InvalidArgument),
        AfterHello([&(frame::DEFAULT_MAX_FRAME_BYTES + 1).to_le_bytes()[..], &[0, 1, 2, 3]].concat());
    empty_frame_after_the_handshake: [] => Undecodable(InvalidArgument), AfterHello(raw_frame(&[], 0));
    garbage_payload_after_the_handshake: [] => Undecodable(InvalidArgument),
        AfterHello(raw_frame(&[0xff; 300], 0));
    request_frame_with_trailing_bytes: [] => Undecodable(InvalidArgument),
        AfterHello(raw_frame(&[&ping_frame()[HEADER_BYTES..], &[0u8; 3][..]].concat(), 0));
    request_with_an_unknown_body_variant: [] => Undecodable(InvalidArgument),
        // ClientFrame::Request, id 1, deadline 5, body variant 99.
        AfterHello(raw_frame(&[1, 1, 5, 99], 0));
    hello_after_the_handshake: [] => Undecodable(InvalidArgument), AfterHello(hello(PROTOCOL_VERSION, None));
    frame_declaring_a_descriptor_it_does_not_carry: [] => Undecodable(InvalidArgument),
        AfterHello(request_frame(RequestBody::Ping, 5000, 1));
    frame_declaring_five_descriptors_after_the_handshake: [] => Undecodable(InvalidArgument),
        AfterHello(request_frame(RequestBody::Ping, 5000, 5));
    lookup_with_a_zero_length_chunk_hash: [] => Undecodable(InvalidArgument),
        AfterHello(patched(request_frame(lookup(VALID, 1), 5000, 0), &hash_bytes(), &[0]));
    lookup_with_a_31_byte_chunk_hash: [] => Undecodable(InvalidArgument),
        AfterHello(patched(request_frame(lookup(VALID, 1), 5000, 0), &hash_bytes(), &hash_bytes()[..32]));
    request_cut_off_by_a_half_close: [] => Undecodable(InvalidArgument), Run(scripts::request_cut_off_by_a_half_close);
    register_frame_carrying_three_extra_descriptors: [] => Undecodable(InvalidArgument),
        Run(scripts::register_carrying_three_extra_descriptors);
    ping_carrying_four_declared_descriptors_is_answered_and_they_are_closed: [] => Reply("Pong", is_pong),
        Run(scripts::ping_carrying_four_declared_descriptors);
    a_flood_of_800_declared_descriptors_is_answered_and_all_are_closed: [] => Reply("Pong", is_pong),
        Run(scripts::a_flood_of_declared_descriptors);
    ping_with_a_zero_deadline_is_answered: [] => Reply("Pong", is_pong),
        AfterHello(request_frame(RequestBody::Ping, 0, 0));
    ping_with_a_u32_max_deadline_is_answered: [] => Reply("Pong", is_pong),
        AfterHello(request_frame(RequestBody::Ping, u32::MAX, 0));

    // The handshake.
    hello_with_protocol_version_2: [] => Refused(ProtocolMismatch), First(hello(2, None));
    hello_with_protocol_version_u32_max: [] => Refused(ProtocolMismatch), First(hello(u32::MAX, None));
    socket_hello_with_a_wrong_token_is_refused: ["--admin-token", ADMIN] => Refused(Unauthorized),
        First(hello(PROTOCOL_VERSION, Some(WRONG_ADMIN)));
    tcp_hello_without_a_token_is_refused: ["--tcp", "127.0.0.1:0", "--token-file", "$DIR/tcp.token"] => Refused(Unauthorized),
        Run(scripts::tcp_hello_without_a_token);
    tcp_hello_with_a_wrong_token_is_refused: ["--tcp", "127.0.0.1:0", "--token-file", "$DIR/tcp.token"] => Refused(Unauthorized),
        Run(scripts::tcp_hello_with_a_wrong_token);

    // Connection floods.
    a_flood_of_200_idle_connections_is_closed_with_timeout: ["--idle-timeout-ms", "1000"] => Refused(Timeout),
        Run(scripts::a_flood_of_idle_connections);
    a_flood_of_100_connections_that_never_say_hello_is_refused_with_timeout: [] => Refused(Timeout),
        Run(scripts::a_flood_of_connections_that_never_say_hello);

    // Register: zero, huge, out-of-range and foreign values.
    register_with_world_size_zero: [] => Error(InvalidArgument),
        Req(register(OWN, 0, MODEL, small(), MemoryHandle::HostFd { size: small().total_bytes() }));
    register_a_rank_outside_the_world: [] => Error(InvalidArgument),
        Req(register(InstanceKey { engine: OWN.engine, rank: 4 }, 4, MODEL, small(), MemoryHandle::HostFd { size: 1 << 24 }));
    register_with_an_empty_model_name: [] => Error(InvalidArgument),
        Req(register(OWN, 1, "", small(), MemoryHandle::HostFd { size: small().total_bytes() }));
    register_a_layout_with_zero_layers: [] => Error(InvalidArgument),
        Req(register_own(KvLayout::mha(0, 256, 16, 4, 64, Dtype::Bf16), 1 << 24));
    register_a_layout_of_u32_max_everything: [] => Error(InvalidArgument),
        Req(register_own(KvLayout::mha(u32::MAX, u32::MAX, u32::MAX, u32::MAX, u32::MAX, Dtype::F32), u64::MAX));
    register_blocks_that_do_not_divide_the_chunk: [] => Error(InvalidArgument),
        Req(register_own(KvLayout::mha(4, 256, 24, 4, 64, Dtype::Bf16), 1 << 26));
    register_a_layout_whose_chunk_is_16_gib: [] => Error(InvalidArgument),
        Req(register_own(KvLayout::mha(1024, 16, 16, 64, 128, Dtype::F32), u64::MAX));
    register_a_layout_larger_than_its_declared_memory: [] => Error(InvalidArgument),
        WithFds(register_own(small(), small().total_bytes() - 1), vec![memfd(small().total_bytes() - 1)]);
    register_memory_declared_larger_than_the_memfd: [] => Error(LayoutMismatch),
        WithFds(register_own(small(), small().total_bytes()), vec![memfd(4096)]);
    register_host_memory_without_its_memfd: [] => Error(InvalidArgument),
        Req(register_own(small(), small().total_bytes()));
    register_an_unsealed_memfd: [] => Error(InvalidArgument), Run(scripts::register_an_unsealed_memfd);
    register_dev_zero_as_memory: [] => Error(LayoutMismatch), Run(scripts::register_dev_zero);
    register_cuda_memory_on_a_host_coordinator: [] => Error(InvalidArgument),
        Req(register(OWN, 1, MODEL, small(), MemoryHandle::CudaIpc {
            device_uuid: [1; 16],
            layers: vec![CudaIpcLayer { handle: vec![0; 64], offset: 0, size: 1 << 22 }; 4],
        }));
    register_a_registered_instance_again_with_another_layout: [] => Error(LayoutMismatch),
        Owned(register(OWN, 1, MODEL, KvLayout::mla(2, 32, 16, 512, Dtype::Bf16), MemoryHandle::HostFd { size: 1 << 20 }));
    register_the_same_memory_twice_is_idempotent: [] => Reply("Registered { already: true }", |b| matches!(b, ReplyBody::Registered { already: true, .. })),
        Run(scripts::register_twice_with_the_same_memory);

    // Store and retrieve.
    store_on_an_unknown_instance: [] => Error(NotRegistered), Req(store(UNKNOWN, 1, ids(BPC, 0)));
    store_with_no_chunks: [] => Error(InvalidArgument), Owned(store(OWN, 0, vec![]));
    store_with_block_ids_past_the_end: [] => Error(InvalidArgument), Owned(store(OWN, 1, ids(BPC, 256)));
    store_with_u32_max_block_ids: [] => Error(InvalidArgument), Owned(store(OWN, 1, ids(BPC, u32::MAX)));
    store_with_too_few_block_ids: [] => Error(InvalidArgument), Owned(store(OWN, 2, ids(BPC, 0)));
    store_with_4097_chunks: [] => Error(InvalidArgument), Owned(store(OWN, 4097, ids(4097 * BPC, 0)));
    store_with_a_ready_event_on_host_memory: [] => Error(InvalidArgument),
        Owned(RequestBody::Store(StoreChunks { instance: OWN, chunks: hashes(1, 99), block_ids: (200..216).collect(), ready_event: Some(vec![0; 64]) }));
    retrieve_from_an_unknown_instance: [] => Error(NotRegistered), Req(retrieve(UNKNOWN, 1, ids(BPC, 0), None));
    retrieve_with_no_chunks: [] => Error(InvalidArgument), Owned(retrieve(OWN, 0, vec![], None));
    retrieve_into_block_ids_past_the_end: [] => Error(InvalidArgument), Owned(retrieve(OWN, 1, ids(BPC, 1 << 20), None));
    retrieve_chunks_never_stored_finds_them_missing: [] => Reply("Retrieved([Missing])", |b| matches!(b, ReplyBody::Retrieved(o) if o == &[RetrieveOutcome::Missing])),
        Owned(retrieve(OWN, 1, (240..256).collect(), None));
    retrieve_with_a_lease_that_never_existed: [] => Reply("Retrieved([Missing; 2])", |b| matches!(b, ReplyBody::Retrieved(o) if o == &[RetrieveOutcome::Missing; 2])),
        Owned(retrieve(OWN, 2, (224..256).collect(), Some(LeaseId(0x1234_5678))));

    // Another session's instance (the valid client's): every action on it is denied.
    store_from_another_sessions_instance_is_denied: [] => Error(PermissionDenied), Req(store(VALID, 1, (200..216).collect()));
    retrieve_into_another_sessions_instance_is_denied: [] => Error(PermissionDenied),
        Req(retrieve(VALID, 1, (240..256).collect(), None));
    lookup_with_a_lease_on_another_sessions_instance_is_denied: [] => Error(PermissionDenied), Req(lookup(VALID, 1));
    unregister_another_sessions_instance_is_denied: [] => Error(PermissionDenied), Req(RequestBody::Unregister { instance: VALID });
    register_another_sessions_instance_key_is_denied: [] => Error(PermissionDenied),
        WithFds(register_small(VALID, None), vec![memfd(small().total_bytes())]);
    register_another_sessions_instance_key_with_a_made_up_secret_is_denied: [] => Error(PermissionDenied),
        WithFds(register_small(VALID, Some(InstanceSecret([7; 16]))), vec![memfd(small().total_bytes())]);

    // Another tenant's lease.
    retrieve_with_another_tenants_lease_is_denied: ["--config", "$DIR/tenants.toml"] => Error(PermissionDenied),
        Run(scripts::retrieve_with_another_tenants_lease);
    release_another_tenants_lease_is_denied: ["--config", "$DIR/tenants.toml"] => Error(PermissionDenied),
        Run(scripts::release_another_tenants_lease);

    // Lookups and leases.
    lookup_on_an_unknown_instance: [] => Error(NotRegistered), Req(lookup(UNKNOWN, 1));
    lookup_with_no_chunks: [] => Error(InvalidArgument), Owned(lookup(OWN, 0));
    lookup_with_4097_chunks: [] => Error(InvalidArgument), Owned(lookup(OWN, 4097));
    lookup_model_of_an_unknown_model_finds_nothing: [] => Reply("Found { 0, no lease }", |b| matches!(b, ReplyBody::Found { chunks: 0, lease: None })),
        Req(lookup_model("no-such-model", 8));
    lookup_model_with_a_1_mib_model_name_finds_nothing: [] => Reply("Found { 0, no lease }", |b| matches!(b, ReplyBody::Found { chunks: 0, lease: None })),
        Req(lookup_model(&"m".repeat(1 << 20), 1));
    lookup_model_with_4097_chunks: [] => Error(InvalidArgument), Req(lookup_model(MODEL, 4097));
    lookup_model_of_a_million_chunks_in_a_64_mib_frame: ["--max-frame-bytes", "67108864"] => Error(InvalidArgument),
        Run(scripts::lookup_a_million_chunks);
    release_a_lease_that_never_existed: [] => Error(InvalidArgument), Req(RequestBody::ReleaseLease { lease: LeaseId(42) });
    release_a_lease_twice: [] => Error(InvalidArgument), Run(scripts::release_a_lease_twice);

    // Unregister.
    unregister_an_unknown_instance: [] => Error(NotRegistered), Req(RequestBody::Unregister { instance: UNKNOWN });
    requests_after_unregister_are_not_registered: [] => Error(NotRegistered), Run(scripts::requests_after_unregister);
    unregister_twice: [] => Error(NotRegistered), Run(scripts::unregister_twice);

    // Privileged requests without the admin role.
    clear_without_the_admin_role_is_denied: ["--admin-token", ADMIN] => Error(PermissionDenied), Req(RequestBody::Clear);
    inject_a_fault_without_the_admin_role_is_denied: ["--fault-injection", "--admin-token", ADMIN] => Error(PermissionDenied),
        Req(RequestBody::InjectFault(FaultTarget::Instance(VALID)));
    status_without_the_admin_role_hides_the_instances: ["--admin-token", ADMIN] => Reply("Status, instances hidden",
        |b| matches!(b, ReplyBody::Status(r) if r.instances.is_empty() && r.instances_hidden && r.stats.instances == 1)),
        Req(RequestBody::Status);

    // Fault injection, as the admin.
    inject_a_fault_without_fault_injection_enabled: ["--admin-token", ADMIN] => Error(Unauthorized),
        AsAdmin(RequestBody::InjectFault(FaultTarget::Instance(VALID)));
    inject_a_fault_into_a_copy_lane_that_does_not_exist: ["--fault-injection", "--admin-token", ADMIN] => Error(InvalidArgument),
        AsAdmin(RequestBody::InjectFault(FaultTarget::CopyLane(u32::MAX)));
    inject_a_fault_into_an_unknown_instance: ["--fault-injection", "--admin-token", ADMIN] => Error(NotRegistered),
        AsAdmin(RequestBody::InjectFault(FaultTarget::Instance(UNKNOWN)));
}

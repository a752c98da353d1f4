//! The coordinator's main job against a real `kvcoord serve` process over its
//! Unix socket: bit-exact store -> retrieve, lookup semantics, eviction with
//! leases, and typed errors for bad input.

mod common;

use std::time::Duration;

use common::*;
use kvcoord_harness::prefix_hashes;
use kvcoord_memory::{HostKvCache, MemoryHandle};
use kvcoord_transport::frame;
use kvcoord_transport::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(5);

#[actix_rt::test]
async fn tp1_store_then_retrieve_into_other_blocks_is_bit_exact() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let mut w = worker(&server, 1, 0, 1).await;
    for p in 0..3 {
        let hashes = prefix_hashes("test-model", 1, p, 3, 256);
        let (blocks, outcomes) = w.store_prefix(&hashes).await.unwrap();
        assert_eq!(outcomes, vec![StoreOutcome::Stored; 3]);
        let found = w.client.lookup(w.key, hashes.clone(), true).await;
        assert_eq!(found.chunks, 3);
        let (r, v) = w.retrieve_and_verify(&hashes, &blocks, found.lease).await.unwrap();
        assert_eq!(r.outcomes, vec![RetrieveOutcome::Retrieved; 3]);
        assert_eq!((v.chunks_retrieved, v.corrupt_chunks), (3, 0));
        assert_eq!(v.bytes_verified, 3 << 20);
    }
    let (_, again) = w.store_prefix(&prefix_hashes("test-model", 1, 0, 3, 256)).await.unwrap();
    assert_eq!(again, vec![StoreOutcome::AlreadyPresent; 3]);
    let stats = w.client.stats().await.unwrap();
    assert_eq!((stats.objects, stats.leases, stats.instances), (9, 0, 1), "retrieves released their leases");
}

#[actix_rt::test]
async fn tp4_store_then_retrieve_is_bit_exact_on_every_rank() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &["--copy-lanes", "2"]);
    let mut ws = Vec::new();
    for rank in 0..4 {
        ws.push(worker(&server, 7, rank, 4).await);
    }
    let hashes = prefix_hashes("test-model", 7, 0, 4, 256);
    let stored = futures::future::join_all(ws.iter_mut().map(|w| w.store_prefix(&hashes))).await;
    let placed: Vec<Vec<u32>> = stored.into_iter().map(|r| r.unwrap().0).collect();
    let found = ws[2].client.lookup(ws[2].key, hashes.clone(), true).await;
    assert_eq!(found.chunks, 4);
    let got = futures::future::join_all(
        ws.iter_mut().zip(&placed).map(|(w, a)| w.retrieve_and_verify(&hashes, a, found.lease)),
    )
    .await;
    for (r, v) in got.into_iter().map(Result::unwrap) {
        assert_eq!(r.prefix_retrieved(), 4);
        assert_eq!((v.chunks_retrieved, v.corrupt_chunks), (4, 0));
    }
    assert_eq!(ws[0].client.stats().await.unwrap().leases, 0, "every rank's retrieve released its share");
}

#[actix_rt::test]
async fn lookup_counts_contiguous_chunks_only_when_every_rank_holds_them() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let mut r0 = worker(&server, 3, 0, 2).await;
    let mut r1 = worker(&server, 3, 1, 2).await;
    let h = prefix_hashes("test-model", 3, 0, 4, 256);
    r0.store_prefix(&h).await.unwrap();
    r1.store_prefix(&h[..1]).await.unwrap();
    r1.store_prefix(&h[2..]).await.unwrap();
    assert_eq!(r0.client.lookup(r0.key, h.clone(), false).await.chunks, 1, "chunk 1 lacks rank 1");
    assert_eq!(r1.client.lookup(r1.key, h[2..].to_vec(), false).await.chunks, 2, "a prefix starting later");
    r1.store_prefix(&h[1..2]).await.unwrap();
    assert_eq!(r1.client.lookup(r1.key, h.clone(), false).await.chunks, 4);
    let other = prefix_hashes("test-model", 3, 99, 2, 256);
    assert_eq!(r0.client.lookup(r0.key, other, false).await.chunks, 0);
}

#[actix_rt::test]
async fn lookup_by_model_from_a_client_that_registered_nothing_leases_what_the_workers_retrieve() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    // The scheduler: its own connection, no registration.
    let scheduler = core_client(server.endpoint());
    let mut link = scheduler.link();
    tokio::time::timeout(T, link.wait_for(|s| s.connection.is_some())).await.unwrap().unwrap();
    let h = prefix_hashes("test-model", 11, 0, 3, 256);
    let unknown = scheduler.lookup_model("no-such-model", 2, h.clone(), true).await;
    assert_eq!((unknown.chunks, unknown.lease, unknown.error), (0, None, None), "an unknown model is a plain miss");

    let mut r0 = worker(&server, 11, 0, 2).await;
    let mut r1 = worker(&server, 11, 1, 2).await;
    let (b0, _) = r0.store_prefix(&h).await.unwrap();
    assert_eq!(scheduler.lookup_model("test-model", 2, h.clone(), false).await.chunks, 0, "rank 1 holds none yet");
    let (b1, _) = r1.store_prefix(&h).await.unwrap();
    assert_eq!(scheduler.lookup_model("test-model", 4, h.clone(), false).await.chunks, 0, "another TP degree");
    let found = scheduler.lookup_model("test-model", 2, h.clone(), true).await;
    assert_eq!((found.chunks, found.error.clone()), (3, None));
    assert!(found.lease.is_some());
    assert_eq!(scheduler.stats().await.unwrap().leases, 1);

    // Each worker retrieves into other blocks with the scheduler's lease.
    for (w, stored) in [(&mut r0, &b0), (&mut r1, &b1)] {
        let (r, v) = w.retrieve_and_verify(&h, stored, found.lease).await.unwrap();
        assert_eq!((r.prefix_retrieved(), v.chunks_retrieved, v.corrupt_chunks), (3, 3, 0));
    }
    assert_eq!(scheduler.stats().await.unwrap().leases, 0, "both ranks' retrieves released the lease");
    let empty = scheduler.call(
        RequestBody::LookupModel(LookupByModel {
            model: "test-model".into(),
            world_size: 2,
            chunks: vec![],
            lease: false,
        }),
        T,
    );
    assert_eq!(kind(empty.await), ErrorKind::InvalidArgument);
}

#[actix_rt::test]
async fn eviction_under_a_small_l1_never_evicts_a_leased_chunk_nor_serves_other_bytes() {
    let dir = tempfile::tempdir().unwrap();
    // 8 MiB of L1 holds 8 chunks of 1 MiB (plus page rounding: 7 or 8).
    let server = ServerProcess::start(dir.path(), &["--l1-size", "8MiB"]);
    let mut w = worker(&server, 5, 0, 1).await;
    let leased = prefix_hashes("test-model", 5, 0, 3, 256);
    let (leased_blocks, _) = w.store_prefix(&leased).await.unwrap();
    let lease = w.client.lookup(w.key, leased.clone(), true).await;
    assert_eq!(lease.chunks, 3);
    for p in 1..=6 {
        let (_, o) = w.store_prefix(&prefix_hashes("test-model", 5, p, 3, 256)).await.unwrap();
        assert!(!o.contains(&StoreOutcome::SkippedNoMemory), "unleased chunks are evictable");
    }
    let stats = w.client.stats().await.unwrap();
    assert!(stats.evictions >= 10, "evictions: {}", stats.evictions);
    assert!(stats.l1_used <= 8 << 20);
    assert_eq!(w.client.lookup(w.key, leased.clone(), false).await.chunks, 3, "leased chunks survived");
    let (r, v) = w.retrieve_and_verify(&leased, &leased_blocks, lease.lease).await.unwrap();
    assert_eq!((r.prefix_retrieved(), v.corrupt_chunks), (3, 0));
    for p in 1..=6 {
        let h = prefix_hashes("test-model", 5, p, 3, 256);
        let (r, v) = w.retrieve_and_verify(&h, &[], None).await.unwrap();
        let got = r.outcomes.iter().filter(|o| **o == RetrieveOutcome::Retrieved).count();
        assert_eq!(v.corrupt_chunks, 0, "prompt {p}: {got} chunks retrieved, none may hold other bytes");
    }
    // With every object leased there is no room: the store says so per chunk.
    let all: Vec<ChunkHash> = (0..=6).flat_map(|p| prefix_hashes("test-model", 5, p, 3, 256)).collect();
    let mut leases = Vec::new();
    for h in all.chunks(1) {
        if let Some(l) = w.client.lookup(w.key, h.to_vec(), true).await.lease {
            leases.push(l);
        }
    }
    let full_store = w.store_prefix(&prefix_hashes("test-model", 5, 50, 3, 256)).await.unwrap().1;
    assert!(full_store.contains(&StoreOutcome::SkippedNoMemory), "{full_store:?}");
}

fn register_body(key: InstanceKey, layout: kvcoord_memory::KvLayout, size: u64) -> RequestBody {
    RequestBody::Register(RegisterKvCache {
        instance: key,
        model: "test-model".into(),
        world_size: 1,
        layout,
        memory: MemoryHandle::HostFd { size },
        secret: None,
    })
}

fn kind(r: Result<ReplyBody, RequestError>) -> ErrorKind {
    match r {
        Err(RequestError::Server(e)) => e.kind,
        other => panic!("expected a server error, got {other:?}"),
    }
}

#[actix_rt::test]
async fn bad_inputs_get_typed_errors_and_the_server_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let conn = raw(&server).await;
    let layout = small_layout();
    let key = InstanceKey { engine: 9, rank: 0 };
    let h = prefix_hashes("test-model", 9, 0, 2, 256);
    let store = |ids: Vec<u32>, chunks: Vec<ChunkHash>| {
        RequestBody::Store(StoreChunks { instance: key, chunks, block_ids: ids, ready_event: None })
    };

    // Unknown instance.
    assert_eq!(kind(conn.request(store((0..32).collect(), h.clone()), T, vec![]).await), ErrorKind::NotRegistered);

    // Memory smaller than the layout.
    let small =
        HostKvCache::create("small", kvcoord_memory::KvLayout::mha(2, 256, 16, 4, 64, kvcoord_memory::Dtype::Bf16))
            .unwrap();
    let fd = small.fd().try_clone_to_owned().unwrap();
    let r = conn.request(register_body(key, layout, layout.total_bytes()), T, vec![fd]).await;
    assert_eq!(kind(r), ErrorKind::LayoutMismatch);

    // A good registration, then a different layout for the same instance.
    let cache = HostKvCache::create("good", layout).unwrap();
    let reg = |l: kvcoord_memory::KvLayout| {
        let fd = cache.fd().try_clone_to_owned().unwrap();
        conn.request(register_body(key, l, l.total_bytes()), T, vec![fd])
    };
    assert!(matches!(reg(layout).await.unwrap(), ReplyBody::Registered { already: false, .. }));
    let again = reg(layout).await.unwrap();
    assert!(matches!(again, ReplyBody::Registered { already: true, .. }), "same layout: idempotent");
    let other = kvcoord_memory::KvLayout::mha(4, 256, 16, 4, 32, kvcoord_memory::Dtype::Bf16);
    assert_eq!(kind(reg(other).await), ErrorKind::LayoutMismatch);

    // Block id out of range, wrong block count, empty requests.
    let mut ids: Vec<u32> = (0..32).collect();
    ids[5] = 256;
    assert_eq!(kind(conn.request(store(ids, h.clone()), T, vec![]).await), ErrorKind::InvalidArgument);
    assert_eq!(kind(conn.request(store((0..31).collect(), h.clone()), T, vec![]).await), ErrorKind::InvalidArgument);
    assert_eq!(kind(conn.request(store(vec![], vec![]), T, vec![]).await), ErrorKind::InvalidArgument);
    let empty_lookup = RequestBody::Lookup(LookupPrefix { instance: key, chunks: vec![], lease: false });
    assert_eq!(kind(conn.request(empty_lookup, T, vec![]).await), ErrorKind::InvalidArgument);
    let bad_rank = RequestBody::Register(RegisterKvCache {
        instance: InstanceKey { engine: 9, rank: 3 },
        model: "m".into(),
        world_size: 2,
        layout,
        memory: MemoryHandle::HostFd { size: layout.total_bytes() },
        secret: None,
    });
    assert_eq!(kind(conn.request(bad_rank, T, vec![]).await), ErrorKind::InvalidArgument);
    let no_fd =
        conn.request(register_body(InstanceKey { engine: 10, rank: 0 }, layout, layout.total_bytes()), T, vec![]);
    assert_eq!(kind(no_fd.await), ErrorKind::InvalidArgument, "host memory without its memfd");
    let release = conn.request(RequestBody::ReleaseLease { lease: LeaseId(12345) }, T, vec![]).await;
    assert_eq!(kind(release), ErrorKind::InvalidArgument);
    let fault = conn.request(RequestBody::InjectFault(FaultTarget::CopyLane(0)), T, vec![]).await;
    assert_eq!(kind(fault), ErrorKind::Unauthorized, "fault injection is off by default");

    // The same connection still serves good requests.
    let ok = conn.request(store((0..32).collect(), h.clone()), T, vec![]).await.unwrap();
    assert_eq!(ok, ReplyBody::Stored(vec![StoreOutcome::Stored; 2]));
    assert!(matches!(conn.request(RequestBody::Ping, T, vec![]).await.unwrap(), ReplyBody::Pong { .. }));
}

async fn handshaken(server: &ServerProcess) -> tokio::net::UnixStream {
    let mut s = tokio::net::UnixStream::connect(&server.socket).await.unwrap();
    let hello = ClientFrame::Hello(Hello { protocol: PROTOCOL_VERSION, client: "raw".into(), token: None });
    s.write_all(&frame::encode(&hello, 0, 1 << 20).unwrap()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).await.unwrap();
    assert!(n > frame::HEADER_BYTES);
    s
}

async fn read_to_end_frame(s: &mut tokio::net::UnixStream) -> (ServerFrame, bool) {
    let mut all = Vec::new();
    let closed = tokio::time::timeout(T, s.read_to_end(&mut all)).await.is_ok();
    let len = u32::from_le_bytes(all[..4].try_into().unwrap()) as usize;
    (frame::decode(&all[frame::HEADER_BYTES..frame::HEADER_BYTES + len]).unwrap(), closed)
}

#[actix_rt::test]
async fn garbage_and_oversized_frames_get_a_typed_error_and_a_clean_disconnect() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let good = raw(&server).await;

    let mut s = handshaken(&server).await;
    s.write_all(&[6, 0, 0, 0, 0, 1, 2, 3, 250, 251, 252]).await.unwrap();
    let (f, closed) = read_to_end_frame(&mut s).await;
    assert!(matches!(f, ServerFrame::Undecodable(WireError { kind: ErrorKind::InvalidArgument, .. })), "{f:?}");
    assert!(closed, "the server closes after an undecodable frame");

    let mut s = handshaken(&server).await;
    s.write_all(&[0xff, 0xff, 0xff, 0x7f, 0]).await.unwrap();
    let (f, closed) = read_to_end_frame(&mut s).await;
    match f {
        ServerFrame::Undecodable(e) => assert!(e.message.contains("exceeds"), "{}", e.message),
        other => panic!("{other:?}"),
    }
    assert!(closed);

    assert!(matches!(good.request(RequestBody::Ping, T, vec![]).await.unwrap(), ReplyBody::Pong { .. }));
}

#[actix_rt::test]
async fn protocol_mismatch_against_the_server_is_refused_with_its_kind() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let opts = ConnectOptions { protocol: PROTOCOL_VERSION + 7, ..Default::default() };
    match Connection::open(&server.endpoint(), &opts).await {
        Err(ConnectError::Handshake(kvcoord_transport::handshake::HandshakeError::Refused(e))) => {
            assert_eq!(e.kind, ErrorKind::ProtocolMismatch)
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_bad_config_value_fails_start_naming_the_key() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvcoord"))
        .args(["serve", "--copy-lanes", "0", "--socket", "/tmp/kvcoord-never.sock"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "a configuration error exits 2");
    assert!(String::from_utf8_lossy(&out.stderr).contains("copy_lanes"));
}

#[test]
fn the_request_limits_have_flags_and_environment_variables() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvcoord"))
        .args(["serve", "--print-config", "--max-frame-bytes", "65536", "--max-chunks-per-request", "64"])
        .args(["--fault-injection"])
        .env("KVCOORD_MAX_DEADLINE_MS", "5000")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let config = String::from_utf8_lossy(&out.stdout);
    for line in
        ["max_frame_bytes = 65536", "max_chunks_per_request = 64", "max_deadline_ms = 5000", "fault_injection = true"]
    {
        assert!(config.contains(line), "{line} missing from\n{config}");
    }
    let old = std::process::Command::new(env!("CARGO_BIN_EXE_kvcoord"))
        .args(["serve", "--print-config", "--enable-fault-injection"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&old.stdout).contains("fault_injection = true"), "the old spelling still works");
    let zero = std::process::Command::new(env!("CARGO_BIN_EXE_kvcoord"))
        .args(["serve", "--max-deadline-ms", "0", "--socket", "/tmp/kvcoord-never.sock"])
        .output()
        .unwrap();
    assert_eq!(zero.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&zero.stderr).contains("max_deadline_ms"));
}

#[actix_rt::test]
async fn vllm_layouts_store_then_retrieve_into_other_blocks_is_bit_exact() {
    use kvcoord_harness::TpWorker;
    use kvcoord_memory::{Dtype, KvLayout, VllmLayout};
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    // 4 layers x 256 blocks of 16 tokens x 4 heads x (K|V of 2 x 64) bf16:
    // 16 KiB blocks, 1 MiB per chunk, as small_layout(); one buffer per rank.
    let cases = [
        (21, KvLayout::vllm(VllmLayout::Lbnhc, 4, 256, 16, 4, 64, Dtype::Bf16)),
        (22, KvLayout::vllm(VllmLayout::Blnhc, 4, 256, 16, 4, 64, Dtype::Bf16)),
        (23, KvLayout::vllm(VllmLayout::Blnhc, 4, 256, 16, 4, 64, Dtype::Bf16).at_offset(4096)),
        (24, KvLayout::vllm(VllmLayout::Lhbnc, 4, 256, 16, 4, 64, Dtype::Bf16)),
    ];
    for (engine, layout) in cases {
        let key = InstanceKey { engine, rank: 0 };
        let model = format!("vllm-{engine}");
        let mut w = TpWorker::register(core_client(server.endpoint()), key, &model, 1, layout, 256)
            .await
            .unwrap_or_else(|e| panic!("{layout:?}: {e}"));
        let hashes = prefix_hashes(&model, engine, 0, 3, 256);
        let (blocks, outcomes) = w.store_prefix(&hashes).await.unwrap();
        assert_eq!(outcomes, vec![StoreOutcome::Stored; 3], "{layout:?}");
        let found = w.client.lookup(w.key, hashes.clone(), true).await;
        assert_eq!(found.chunks, 3);
        let (r, v) = w.retrieve_and_verify(&hashes, &blocks, found.lease).await.unwrap();
        assert_eq!(r.outcomes, vec![RetrieveOutcome::Retrieved; 3], "{layout:?}");
        assert_eq!((v.chunks_retrieved, v.corrupt_chunks, v.bytes_verified), (3, 0, 3 << 20), "{layout:?}");
    }

    // A placement past the end of the memory, and one that overlaps itself.
    let conn = raw(&server).await;
    let layout = KvLayout::vllm(VllmLayout::Lbnhc, 4, 256, 16, 4, 64, Dtype::Bf16);
    let cache = HostKvCache::create("v", layout).unwrap();
    let reg = |l: KvLayout| {
        let fd = cache.fd().try_clone_to_owned().unwrap();
        conn.request(register_body(InstanceKey { engine: 30, rank: 0 }, l, layout.total_bytes()), T, vec![fd])
    };
    assert_eq!(kind(reg(layout.at_offset(1)).await), ErrorKind::InvalidArgument, "one byte past the end");
    let mut overlapping = layout;
    overlapping.placement.block_stride /= 2;
    assert_eq!(kind(reg(overlapping).await), ErrorKind::InvalidArgument, "blocks overlapping");
    let mut huge = layout;
    huge.placement.layer_stride = u64::MAX / 2;
    assert_eq!(kind(reg(huge).await), ErrorKind::InvalidArgument, "overflowing placement");
    assert!(matches!(reg(layout).await.unwrap(), ReplyBody::Registered { already: false, .. }));
}

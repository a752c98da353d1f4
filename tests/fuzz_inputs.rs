//! The fuzz targets' checks (`fuzz/src/lib.rs`, included here as it is) in
//! the normal test suite, on every committed input: the seeds each target
//! starts from (`fuzz/seeds/<target>/`) and every input that once failed a
//! target (`fuzz/regressions/<target>/`), so a fixed crash stays fixed
//! without cargo-fuzz or nightly.
//!
//! The seeds are generated here from real encoded frames and configurations;
//! `the_committed_seeds_are_generated_from_real_frames` fails when the
//! protocol changed under them. `KVCOORD_WRITE_FUZZ_SEEDS=1 cargo test
//! --release --test fuzz_inputs` writes them again.

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod checks;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kvcoord::config::ServerConfig;
use kvcoord_memory::{CudaIpcLayer, Dtype, KvLayout, MemoryHandle, VllmLayout};
use kvcoord_transport::frame::{self, HEADER_BYTES};
use kvcoord_transport::*;

type Check = fn(&[u8]);

/// `frame_stream` counts the process's descriptors around each run: the
/// tests here take this lock so that none opens files meanwhile.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

const TARGETS: [(&str, Check); 6] = [
    ("frame", checks::frame),
    ("frame_stream", checks::frame_stream),
    ("request_body", checks::request_body),
    ("request_roundtrip", checks::request_roundtrip),
    ("layout", checks::layout),
    ("config", checks::config),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// Files directly under `dir` (none if it does not exist), by name.
fn inputs(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(dir) else { return BTreeMap::new() };
    entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .map(|p| (p.file_name().unwrap().to_string_lossy().into_owned(), std::fs::read(&p).unwrap()))
        .collect()
}

#[test]
fn every_committed_seed_and_regression_input_passes_its_targets_checks() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let mut ran = 0;
    for (target, check) in TARGETS {
        for kind in ["seeds", "regressions"] {
            for (name, data) in inputs(&fuzz_dir().join(kind).join(target)) {
                let r = std::panic::catch_unwind(|| check(&data));
                assert!(r.is_ok(), "fuzz/{kind}/{target}/{name} fails the target's checks");
                ran += 1;
            }
        }
    }
    assert!(ran >= 40, "only {ran} committed inputs found under fuzz/");
}

/// A request of every kind, with the values a real client sends.
fn sample_requests() -> Vec<(&'static str, RequestBody)> {
    let key = InstanceKey { engine: 0x5eed, rank: 1 };
    let layout = KvLayout::mha(4, 256, 16, 4, 64, Dtype::Bf16);
    let chunks = kvcoord_transport::chunk_hashes(&(0..512).collect::<Vec<u32>>(), 256, b"test-model");
    let blocks: Vec<u32> = (0..32).collect();
    let register = |layout: KvLayout, memory| {
        RequestBody::Register(RegisterKvCache {
            instance: key,
            model: "test-model".into(),
            world_size: 2,
            layout,
            memory,
            secret: None,
        })
    };
    let ipc = MemoryHandle::CudaIpc {
        device_uuid: [7; 16],
        layers: (0..4).map(|l| CudaIpcLayer { handle: vec![l; 64], offset: 0, size: 1 << 20 }).collect(),
    };
    vec![
        ("ping", RequestBody::Ping),
        ("register", register(layout, MemoryHandle::HostFd { size: layout.total_bytes() })),
        (
            "register_vllm",
            register(
                KvLayout::vllm(VllmLayout::Lhbnc, 4, 64, 16, 2, 64, Dtype::F16),
                MemoryHandle::HostFd { size: 1 << 20 },
            ),
        ),
        (
            "register_mla",
            register(
                KvLayout::mla(2, 64, 16, 512, Dtype::Bf16).at_offset(4096),
                MemoryHandle::HostFd { size: 4 << 20 },
            ),
        ),
        ("register_cuda", register(layout, ipc)),
        ("unregister", RequestBody::Unregister { instance: key }),
        (
            "store",
            RequestBody::Store(StoreChunks {
                instance: key,
                chunks: chunks.clone(),
                block_ids: blocks.clone(),
                ready_event: None,
            }),
        ),
        (
            "store_event",
            RequestBody::Store(StoreChunks {
                instance: key,
                chunks: chunks[..1].to_vec(),
                block_ids: blocks[..16].to_vec(),
                ready_event: Some(vec![3; 64]),
            }),
        ),
        ("lookup", RequestBody::Lookup(LookupPrefix { instance: key, chunks: chunks.clone(), lease: true })),
        (
            "retrieve",
            RequestBody::Retrieve(RetrieveChunks {
                instance: key,
                chunks: chunks.clone(),
                block_ids: blocks,
                lease: Some(LeaseId(9)),
                done_event: Some(vec![5; 64]),
            }),
        ),
        ("release_lease", RequestBody::ReleaseLease { lease: LeaseId(u128::MAX) }),
        ("clear", RequestBody::Clear),
        ("stats", RequestBody::Stats),
        ("fault_lane", RequestBody::InjectFault(FaultTarget::CopyLane(1))),
        ("fault_instance", RequestBody::InjectFault(FaultTarget::Instance(key))),
        ("status", RequestBody::Status),
        (
            "lookup_model",
            RequestBody::LookupModel(LookupByModel { model: "test-model".into(), world_size: 2, chunks, lease: false }),
        ),
    ]
}

fn encoded<T: serde::Serialize>(msg: &T, fds: u8) -> Vec<u8> {
    frame::encode(msg, fds, frame::DEFAULT_MAX_FRAME_BYTES).unwrap()
}

fn hello() -> ClientFrame {
    ClientFrame::Hello(Hello { protocol: PROTOCOL_VERSION, client: "kvcoord-client/seed".into(), token: None })
}

/// Every seed, by target and file name.
fn seeds() -> BTreeMap<(&'static str, String), Vec<u8>> {
    let mut out = BTreeMap::new();
    let requests = sample_requests();
    let request = |id: u64, body: &RequestBody| {
        encoded(
            &ClientFrame::Request(Request { id: RequestId(id), deadline_ms: 5000, body: body.clone() }),
            body.fd_count() as u8,
        )
    };
    // frame: one whole frame each, and a connection's first frames.
    out.insert(("frame", "hello".into()), encoded(&hello(), 0));
    // Text beyond ASCII, so mutations reach other multi-byte characters.
    let utf8 = ClientFrame::Hello(Hello {
        protocol: PROTOCOL_VERSION,
        client: "клиент-ñ-名前 \u{1f600}".into(),
        token: Some("a-token".into()),
    });
    out.insert(("frame", "hello_utf8".into()), encoded(&utf8, 0));
    let mut session = encoded(&hello(), 0);
    for (i, (name, body)) in requests.iter().enumerate() {
        let f = request(i as u64 + 1, body);
        out.insert(("frame", (*name).into()), f.clone());
        // request_body: a selector byte for the body's type, then its bytes.
        out.insert(("request_body", format!("body_{name}")), [&[0u8][..], &f[HEADER_BYTES..]].concat());
        out.insert(("request_body", format!("request_{name}")), {
            let r = Request { id: RequestId(i as u64), deadline_ms: 1, body: body.clone() };
            [vec![7u8], encoded(&r, 0)[HEADER_BYTES..].to_vec()].concat()
        });
        let inner = match body {
            RequestBody::Register(r) => Some((1u8, encoded(r, 0))),
            RequestBody::Store(s) => Some((2, encoded(s, 0))),
            RequestBody::Lookup(l) => Some((3, encoded(l, 0))),
            RequestBody::LookupModel(l) => Some((4, encoded(l, 0))),
            RequestBody::Retrieve(r) => Some((5, encoded(r, 0))),
            RequestBody::InjectFault(t) => Some((6, encoded(t, 0))),
            RequestBody::Unregister { instance } => Some((8, encoded(instance, 0))),
            _ => None,
        };
        if let Some((selector, bytes)) = inner {
            out.insert(("request_body", (*name).into()), [vec![selector], bytes[HEADER_BYTES..].to_vec()].concat());
        }
        if !matches!(body, RequestBody::Register(_)) {
            session.extend(f);
        }
    }
    let welcome = ServerFrame::Welcome(Welcome {
        protocol: PROTOCOL_VERSION,
        epoch: ServerEpoch(0x1234_5678_9abc_def1),
        chunk_tokens: 256,
        limits: Limits { max_frame_bytes: frame::DEFAULT_MAX_FRAME_BYTES, max_chunks_per_request: 4096 },
        server: "kvcoord 0.1.0".into(),
        tenant: "default".into(),
        admin: false,
    });
    out.insert(("frame", "welcome".into()), encoded(&welcome, 0));
    let refused = ServerFrame::Refused(WireError::new(ErrorKind::ProtocolMismatch, "client speaks 2"));
    out.insert(("frame", "refused".into()), encoded(&refused, 0));
    let reply = ServerFrame::Reply(Reply {
        id: RequestId(3),
        result: Ok(ReplyBody::Stored(vec![StoreOutcome::Stored, StoreOutcome::AlreadyPresent])),
    });
    out.insert(("frame", "reply".into()), encoded(&reply, 0));
    out.insert(("frame", "session".into()), session.clone());
    // frame_stream: the session cut into pieces of several sizes, under
    // each frame limit; one truncated; one with a frame over the limit.
    for (limit, piece) in [(1u8, 1u8), (1, 7), (2, 64), (3, 255)] {
        out.insert(
            ("frame_stream", format!("session_limit{limit}_piece{piece}")),
            checks::stream_script(limit, &session, piece),
        );
    }
    out.insert(("frame_stream", "truncated".into()), checks::stream_script(2, &session[..session.len() - 3], 100));
    out.insert(("frame_stream", "over_limit".into()), checks::stream_script(0, &request(1, &requests[6].1), 50));
    // config: the defaults as `--print-config` prints them, and every key set.
    let print = |c: &ServerConfig| toml::to_string_pretty(c).unwrap().into_bytes();
    out.insert(("config", "default.toml".into()), print(&ServerConfig::default()));
    let full = ServerConfig {
        socket: "/run/kvcoord/kv.sock".into(),
        socket_mode: "0660".into(),
        socket_group: Some("kv".into()),
        tcp: Some("127.0.0.1:7070".into()),
        l1_size: bytesize::ByteSize::gib(64),
        l1_prealloc: true,
        chunk_tokens: 128,
        disk_dir: Some("/var/cache/kvcoord".into()),
        disk_size: bytesize::ByteSize::gib(500),
        admin_token: Some("secret".into()),
        fault_injection: true,
        ..ServerConfig::default()
    };
    out.insert(("config", "full.toml".into()), print(&full));
    out.insert(
        ("config", "partial.toml".into()),
        b"l1_size = \"64 MiB\"\nchunk_tokens = 512\ncopy_lanes = 4\n".to_vec(),
    );
    let integers = b"l1_size = 67108864\ndisk_size = 1048576\ngrace_ms = 1\n";
    out.insert(("config", "integers.toml".into()), integers.to_vec());
    out
}

#[test]
fn the_committed_seeds_are_generated_from_real_frames() {
    let _alone = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let write = std::env::var_os("KVCOORD_WRITE_FUZZ_SEEDS").is_some();
    let seeds = seeds();
    let mut stale = Vec::new();
    for ((target, name), bytes) in &seeds {
        let path = fuzz_dir().join("seeds").join(target).join(name);
        assert!(bytes.len() <= 4096, "{target}/{name}: seeds stay small ({} bytes)", bytes.len());
        if write {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, bytes).unwrap();
        } else if std::fs::read(&path).ok().as_ref() != Some(bytes) {
            stale.push(format!("{target}/{name}"));
        }
    }
    // No seed left behind that the generator no longer makes.
    for (target, _) in TARGETS {
        for name in inputs(&fuzz_dir().join("seeds").join(target)).keys() {
            if !seeds.contains_key(&(target, name.clone())) {
                if write {
                    std::fs::remove_file(fuzz_dir().join("seeds").join(target).join(name)).unwrap();
                } else {
                    stale.push(format!("{target}/{name} (not generated)"));
                }
            }
        }
    }
    assert!(
        stale.is_empty(),
        "fuzz seeds out of date: {stale:?}; run KVCOORD_WRITE_FUZZ_SEEDS=1 cargo test --release --test fuzz_inputs"
    );
}

//! The CUDA backend against a real `kvcoord serve --backend cuda` process:
//! registration by IPC with its typed errors. (The GPU check's end-to-end
//! path with worker processes is the harness's: tests/gpu_check.rs.)
//!
//! Without a CUDA driver (CI) the GPU tests print "skipped: no CUDA driver"
//! and pass; the host-backend refusal of IPC memory runs everywhere.

mod common;

use std::time::Duration;

use common::*;
use kvcoord_harness::prefix_hashes;
use kvcoord_memory::cuda::{driver_present, CudaDevice, DeviceKvCache};
use kvcoord_memory::{CudaIpcLayer, Dtype, KvLayout, MemoryHandle};
use kvcoord_transport::*;

const T: Duration = Duration::from_secs(30);

fn cuda_available() -> bool {
    if !driver_present() || CudaDevice::all().map(|d| d.is_empty()).unwrap_or(true) {
        eprintln!("skipped: no CUDA driver");
        return false;
    }
    true
}

fn register(key: InstanceKey, layout: KvLayout, memory: MemoryHandle) -> RequestBody {
    RequestBody::Register(RegisterKvCache {
        instance: key,
        model: "cuda-test".into(),
        world_size: 1,
        layout,
        memory,
        secret: None,
    })
}

fn kind(r: Result<ReplyBody, RequestError>) -> ErrorKind {
    match r {
        Err(RequestError::Server(e)) => e.kind,
        other => panic!("expected a server error, got {other:?}"),
    }
}

fn fake_ipc(layers: u32) -> MemoryHandle {
    let layer = CudaIpcLayer { handle: vec![7; 64], offset: 0, size: 1 << 20 };
    MemoryHandle::CudaIpc { device_uuid: [3; 16], layers: vec![layer; layers as usize] }
}

#[actix_rt::test]
async fn cuda_ipc_memory_on_the_host_backend_is_refused_with_invalid_argument() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &["--backend", "host"]);
    let conn = raw(&server).await;
    let layout = small_layout();
    let r = conn.request(register(InstanceKey { engine: 1, rank: 0 }, layout, fake_ipc(4)), T, vec![]).await;
    assert_eq!(kind(r), ErrorKind::InvalidArgument);
    assert!(matches!(conn.request(RequestBody::Ping, T, vec![]).await, Ok(ReplyBody::Pong { .. })));
}

#[actix_rt::test]
async fn cuda_backend_requested_without_a_driver_fails_start_or_serves_cuda() {
    let dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvcoord"))
        .args(["serve", "--backend", "cuda", "--admin", "off", "--socket"])
        .arg(dir.path().join("kv.sock"))
        .args(["--print-config"])
        .output()
        .unwrap();
    assert!(out.status.success(), "the config itself is valid");
    if driver_present() {
        return;
    }
    eprintln!("skipped: no CUDA driver (checking that --backend cuda refuses to start instead)");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kvcoord"))
        .args(["serve", "--backend", "cuda", "--admin", "off", "--socket"])
        .arg(dir.path().join("kv.sock"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no CUDA driver"), "{err}");
}

#[actix_rt::test]
async fn cuda_registration_checks_device_layers_sizes_and_handles() {
    if !cuda_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &["--backend", "cuda", "--l1-size", "256MiB"]);
    let conn = raw(&server).await;
    let device = CudaDevice::open(0).unwrap();
    let layout = KvLayout::mha(4, 64, 16, 4, 64, Dtype::Bf16);
    let cache = DeviceKvCache::allocate(device.clone(), layout).unwrap();
    let MemoryHandle::CudaIpc { device_uuid, layers } = cache.memory_handle() else { unreachable!() };
    let key = InstanceKey { engine: 5, rank: 0 };

    // A GPU this coordinator does not serve.
    let other = MemoryHandle::CudaIpc { device_uuid: [0xEE; 16], layers: layers.clone() };
    assert_eq!(kind(conn.request(register(key, layout, other), T, vec![]).await), ErrorKind::InvalidArgument);
    // Fewer layers than the layout.
    let short = MemoryHandle::CudaIpc { device_uuid, layers: layers[..3].to_vec() };
    assert_eq!(kind(conn.request(register(key, layout, short), T, vec![]).await), ErrorKind::LayoutMismatch);
    // A layout larger than the allocations.
    let big = KvLayout::mha(4, 128, 16, 4, 64, Dtype::Bf16);
    let mem = cache.memory_handle();
    assert_eq!(kind(conn.request(register(key, big, mem), T, vec![]).await), ErrorKind::LayoutMismatch);
    // A handle that is not a CUDA IPC handle.
    let mut bad = layers.clone();
    bad[0].handle = vec![0x42; 64];
    let garbage = MemoryHandle::CudaIpc { device_uuid, layers: bad };
    assert_eq!(kind(conn.request(register(key, layout, garbage), T, vec![]).await), ErrorKind::InvalidArgument);

    // The real registration works, and a malformed ready event is refused.
    let ok = conn.request(register(key, layout, cache.memory_handle()), T, vec![]).await;
    assert!(matches!(ok, Ok(ReplyBody::Registered { already: false, .. })), "{ok:?}");
    let h = prefix_hashes("cuda-test", 5, 0, 1, 256);
    let store = RequestBody::Store(StoreChunks {
        instance: key,
        chunks: h.clone(),
        block_ids: (0..16).collect(),
        ready_event: Some(vec![1, 2, 3]),
    });
    assert_eq!(kind(conn.request(store, T, vec![]).await), ErrorKind::InvalidArgument);
    let store =
        RequestBody::Store(StoreChunks { instance: key, chunks: h, block_ids: (0..16).collect(), ready_event: None });
    assert!(matches!(conn.request(store, T, vec![]).await, Ok(ReplyBody::Stored(o)) if o == [StoreOutcome::Stored]));
}

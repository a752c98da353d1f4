//! Host data plane: store and retrieve GB/s (request to verified reply) with
//! N TP clients, beside memcpy of the same bytes on N threads and the same
//! gathers done in-process; and the cold first fill of L1.

use std::path::Path;
use std::time::Instant;

use crate::pattern::{prefix_hashes, vllm_like_layout};
use crate::tp_worker::TpWorker;
use kvcoord_client::{Client, ClientConfig};
use kvcoord_memory::{Arena, HostMapping};
use kvcoord_transport::*;

use super::report::*;

/// Store and retrieve with `ranks` TP clients; false if any byte was wrong.
pub(crate) async fn data_plane(
    plan: &Plan,
    socket: &Path,
    ranks: u32,
    engine: u64,
    cold_l1: bool,
    rows: &mut Vec<Row>,
) -> bool {
    // 256 MiB per round in all: 8 chunks of 32 MiB shared among the ranks.
    let chunks = 8 / ranks as usize;
    let layout = vllm_like_layout(512);
    let mut ws = Vec::new();
    for rank in 0..ranks {
        let client = Client::start(ClientConfig::new(Endpoint::Unix(socket.to_path_buf())));
        let key = InstanceKey { engine, rank };
        ws.push(TpWorker::register(client, key, "bench-model", ranks, layout, 256).await.expect("register"));
    }
    // The first rounds fill L1 (512 MiB): the arena takes its slabs from the
    // system then. They are timed apart, as the cold fill.
    let warm_rounds = 2;
    let (mut cold, mut store, mut retrieve, mut bytes, mut gather, mut corrupt) = (0.0, 0.0, 0.0, 0u64, 0.0, 0);
    let arena = Arena::host(1 << 30);
    for r in 0..warm_rounds + plan.timed_rounds {
        let h = prefix_hashes("bench-model", engine, r, chunks, 256);
        let placed: Vec<Vec<u32>> = ws
            .iter_mut()
            .map(|w| {
                let b = w.pick_blocks(chunks, &[]);
                w.write_chunks(&h, &b).expect("write");
                b
            })
            .collect();
        let t = Instant::now();
        let stored =
            futures::future::join_all(ws.iter().zip(&placed).map(|(w, b)| w.client.store(w.key, h.clone(), b.clone())))
                .await;
        let took = t.elapsed().as_secs_f64();
        for s in stored {
            assert!(s.expect("store").iter().all(|o| *o == StoreOutcome::Stored), "round {r}: not stored");
        }
        if r < warm_rounds {
            cold += took;
            continue;
        }
        store += took;
        let others: Vec<Vec<u32>> = ws
            .iter_mut()
            .zip(&placed)
            .map(|(w, avoid)| {
                let b = w.pick_blocks(chunks, avoid);
                w.scribble(&b).expect("scribble");
                b
            })
            .collect();
        let t = Instant::now();
        let got = futures::future::join_all(
            ws.iter().zip(&others).map(|(w, b)| w.client.retrieve(w.key, h.clone(), b.clone(), None)),
        )
        .await;
        retrieve += t.elapsed().as_secs_f64();
        for ((w, b), g) in ws.iter_mut().zip(&others).zip(&got) {
            let v = w.verify_chunks(&h, b, g.prefix_retrieved()).expect("verify");
            corrupt += v.corrupt_chunks + chunks - g.prefix_retrieved();
            bytes += v.bytes_verified;
        }
        // The same gathers in-process, no coordinator.
        for (w, b) in ws.iter().zip(&placed) {
            let mapping =
                HostMapping::open(w.blocks.cache.fd().try_clone_to_owned().expect("dup"), &layout).expect("map");
            let ids = layout.chunk_blocks(256, chunks, b).expect("valid");
            let objs: Vec<_> = (0..chunks)
                .map(|_| arena.allocate(layout.chunk_object_bytes(16)).expect("arena").expect("room"))
                .collect();
            let t = Instant::now();
            for (i, o) in objs.iter().enumerate() {
                kvcoord_memory::copy::gather(&layout, &mapping, ids.chunk(i), o).expect("gather");
            }
            gather += t.elapsed().as_secs_f64();
        }
    }
    // memcpy of the same number of bytes in chunk-sized pieces, on as many
    // threads as there are clients (the coordinator copies on that many
    // lanes at once), so parallel is compared with parallel.
    let memcpy = parallel_memcpy_secs(bytes as usize, layout.chunk_object_bytes(16) as usize, ranks as usize);
    let gbs = |s: f64| bytes as f64 / s / 1e9;
    let cold_bytes = (warm_rounds * ranks as u64 * chunks as u64 * layout.chunk_object_bytes(16)) as f64;
    let tag = |what: &str| format!("host {what}, {ranks} TP client{}", if ranks > 1 { "s" } else { "" });
    let memcpy_name = if ranks > 1 { "memcpy, N threads" } else { "memcpy" };
    for (what, secs, base, bsecs) in [
        ("store", store, memcpy_name, memcpy),
        ("store", store, "in-process gather", gather),
        ("retrieve", retrieve, memcpy_name, memcpy),
    ] {
        rows.push(Row {
            scenario: tag(what),
            metric: "GB/s",
            kvcoord: gbs(secs),
            baseline_name: base,
            baseline: gbs(bsecs),
            unit: "GB/s",
        });
    }
    if cold_l1 {
        rows.push(Row {
            scenario: tag("store, cold L1 (first fill)"),
            metric: "GB/s",
            kvcoord: cold_bytes / cold / 1e9,
            baseline_name: memcpy_name,
            baseline: gbs(memcpy),
            unit: "GB/s",
        });
    }
    for w in &ws {
        let _ = w.client.unregister(w.key).await;
        w.client.close();
    }
    corrupt == 0
}

/// Seconds `threads` threads take to copy `bytes` in all, `piece` bytes at a
/// time, each between its own buffers; best of three, so a stray neighbour
/// does not flatter kvcoord.
fn parallel_memcpy_secs(bytes: usize, piece: usize, threads: usize) -> f64 {
    let threads = threads.max(1);
    let per_thread = bytes / piece / threads;
    let mut buffers: Vec<(Vec<u8>, Vec<u8>)> = (0..threads).map(|_| (vec![7u8; piece], vec![0u8; piece])).collect();
    (0..3)
        .map(|_| {
            let t = Instant::now();
            std::thread::scope(|scope| {
                for (src, dst) in buffers.iter_mut() {
                    scope.spawn(move || {
                        for _ in 0..per_thread {
                            dst.copy_from_slice(std::hint::black_box(src));
                            std::hint::black_box(&mut *dst);
                        }
                    });
                }
            });
            t.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

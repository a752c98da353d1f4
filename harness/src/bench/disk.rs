//! Disk tier: lookup hit rate and retrieve GB/s after a SIGKILL + restart,
//! beside the same before the restart.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::pattern::{prefix_hashes, vllm_like_layout};
use crate::tp_worker::TpWorker;
use kvcoord_client::{Client, ClientConfig};
use kvcoord_transport::*;

use crate::child::{wait_listening, Server};

use super::report::*;

/// Stores prompts with the disk tier on, then compares hit rate and retrieve
/// speed before and after a SIGKILL + restart.
pub(crate) async fn disk_tier(plan: &Plan, dir: &Path, rows: &mut Vec<Row>) -> bool {
    const CHUNKS: usize = 8;
    let (socket, log, disk) = (dir.join("disk.sock"), dir.join("disk.log"), dir.join("disk"));
    let args = ["--l1-size", "2GiB", "--disk-size", "4GiB", "--disk-dir", disk.to_str().expect("utf-8 path")];
    let mut server = Server::start(&socket, &log, &args).expect("start");
    if !wait_listening(&socket, Duration::from_secs(10)) {
        return false;
    }
    let client = Client::start(ClientConfig::new(Endpoint::Unix(socket.clone())));
    let key = InstanceKey { engine: 31, rank: 0 };
    let mut w = TpWorker::register(client, key, "bench-model", 1, vllm_like_layout(512), 256).await.expect("register");
    let rounds = plan.timed_rounds.max(2);
    let prompts: Vec<Vec<ChunkHash>> = (0..rounds).map(|r| prefix_hashes("bench-model", 31, r, CHUNKS, 256)).collect();
    let total = rounds * CHUNKS as u64;
    let flushed = async |w: &TpWorker, objects: u64| {
        for _ in 0..6000 {
            if w.client.stats().await.is_ok_and(|s| s.disk_objects >= objects && s.disk_backlog == 0) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    };
    // Store at the pace of an engine whose writes the disk keeps up with: each
    // prompt drains before the next (a full queue skips writes, by design).
    for (i, h) in prompts.iter().enumerate() {
        w.store_prefix(h).await.expect("store");
        if !flushed(&w, (i as u64 + 1) * CHUNKS as u64).await {
            return false;
        }
    }
    // Hit rate and retrieve speed over every prompt; false on a wrong byte.
    async fn pass(w: &mut TpWorker, prompts: &[Vec<ChunkHash>]) -> Option<(f64, f64)> {
        let (mut hits, mut asked, mut bytes, mut secs) = (0u64, 0u64, 0u64, 0.0);
        for h in prompts {
            let found = w.client.lookup(w.key, h.clone(), false).await;
            hits += found.chunks as u64;
            asked += h.len() as u64;
            let blocks = w.pick_blocks(h.len(), &[]);
            w.scribble(&blocks).expect("scribble");
            let t = Instant::now();
            let got = w.client.retrieve(w.key, h.clone(), blocks.clone(), None).await;
            secs += t.elapsed().as_secs_f64();
            let v = w.verify_chunks(h, &blocks, got.prefix_retrieved()).expect("verify");
            if v.corrupt_chunks > 0 {
                return None;
            }
            bytes += v.bytes_verified;
        }
        Some((hits as f64 * 100.0 / asked as f64, bytes as f64 / secs / 1e9))
    }
    let Some((hit_before, gbs_before)) = pass(&mut w, &prompts).await else { return false };
    server.kill();
    // Read after the restart from the disk, not from the page cache, where allowed.
    let cold = std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok();
    server = Server::start(&socket, &log, &args).expect("restart");
    if !wait_listening(&socket, Duration::from_secs(30)) {
        return false;
    }
    for _ in 0..3000 {
        if w.client.reregistrations() >= 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let Some((hit_after, gbs_after)) = pass(&mut w, &prompts).await else { return false };
    let cache = if cold { "page cache dropped" } else { "page cache warm" };
    rows.push(Row {
        scenario: format!("disk tier: lookup hit rate after restart ({total} chunks)"),
        metric: "%",
        kvcoord: hit_after,
        baseline_name: "before restart",
        baseline: hit_before,
        unit: "%",
    });
    rows.push(Row {
        scenario: format!("disk tier: retrieve after restart ({cache})"),
        metric: "GB/s",
        kvcoord: gbs_after,
        baseline_name: "before restart",
        baseline: gbs_before,
        unit: "GB/s",
    });
    w.client.close();
    drop(server);
    true
}

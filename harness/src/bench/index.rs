//! Index scale: resident memory per entry and lookups of 1, 64 and
//! 4096-chunk prefixes against an index of many chunk entries.

use std::path::Path;
use std::time::Duration;

use kvcoord_client::{Client, ClientConfig};
use kvcoord_transport::*;

use crate::child::{wait_listening, Server};

use super::control_plane::*;
use super::report::*;

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

pub(crate) async fn index_scale(plan: &Plan, dir: &Path, rows: &mut Vec<Row>) -> bool {
    let entries = plan.index_entries;
    let socket = dir.join("index.sock");
    let arena = (entries as u64 * 256).next_power_of_two().max(1 << 30);
    let server =
        Server::start(&socket, &dir.join("index.log"), &["--l1-size", &format!("{arena}B"), "--copy-lanes", "1"])
            .expect("start");
    if !wait_listening(&socket, Duration::from_secs(10)) {
        return false;
    }
    let client = Client::start(ClientConfig::new(Endpoint::Unix(socket.clone())));
    let key = InstanceKey { engine: 77, rank: 0 };
    let _cache = register_tiny(&client, key, 1).await;
    let before = rss_bytes(server.pid());
    let before_slabs = client.stats().await.map(|s| s.l1_slab_bytes).unwrap_or(0);
    // Synthetic distinct keys (hashing 10M token prefixes would dominate).
    let hash = |i: usize| {
        let mut h = [0u8; 32];
        h[..8].copy_from_slice(&(i as u64).to_le_bytes());
        h[8..16].copy_from_slice(&0x006b_7663_6f6f_7264_u64.to_le_bytes());
        ChunkHash(h)
    };
    let mut i = 0;
    while i < entries {
        let n = 4096.min(entries - i);
        let chunks: Vec<ChunkHash> = (i..i + n).map(hash).collect();
        let body = RequestBody::Store(StoreChunks {
            instance: key,
            chunks,
            block_ids: (0..n as u32).collect(),
            ready_event: None,
        });
        client.call(body, Duration::from_secs(30)).await.expect("store");
        i += n;
    }
    let stats = client.stats().await.expect("stats");
    let index_bytes = rss_bytes(server.pid()).saturating_sub(before) - (stats.l1_slab_bytes - before_slabs);
    rows.push(Row {
        scenario: format!("index: resident memory per entry ({} entries)", stats.objects),
        metric: "bytes",
        kvcoord: index_bytes as f64 / stats.objects.max(1) as f64,
        baseline_name: "target",
        baseline: 128.0,
        unit: "B",
    });
    for prefix in [1usize, 64, 4096] {
        let start = entries / 2;
        let body = lookup_body(77, (start..start + prefix).map(hash).collect());
        let lat = sequential(&client, &body, (plan.samples / 5).max(200)).await;
        let echo_like = sequential(&client, &RequestBody::Ping, (plan.samples / 5).max(200)).await;
        for (p, metric) in [(0.5, "p50"), (0.99, "p99")] {
            rows.push(Row {
                scenario: format!("index: lookup {prefix}-chunk prefix (all hits)"),
                metric,
                kvcoord: percentile(&lat, p),
                baseline_name: "ping",
                baseline: percentile(&echo_like, p),
                unit: "us",
            });
        }
    }
    client.close();
    true
}

//! The shared remote tier against real Redis servers (a standalone
//! `redis-server` and a 3-node Redis Cluster, started by the fixtures in
//! `common/redis_fixture.rs`): coordinators with separate sockets, small
//! L1s and no shared disk share chunks bit-exact; a remote that dies gives
//! typed misses within the deadline and comes back by itself; a corrupted
//! value is a miss, never wrong bytes; a cluster node down misses only its
//! own slots.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::redis_fixture::{RedisCluster, RedisServer};
use common::*;
use kvcoord::client::Client;
use kvcoord::server::keys::{LayoutFingerprint, ObjectNamespace};
use kvcoord::server::remote_format::object_key;
use kvcoord_harness::prefix_hashes;
use kvcoord_transport::*;

/// A coordinator on the remote tier with a small L1 and no disk.
fn coordinator(dir: &std::path::Path, name: &str, remote: &[&str]) -> ServerProcess {
    let dir = dir.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut args = vec!["--l1-size", "64MiB", "--remote-timeout-ms", "500"];
    args.extend_from_slice(remote);
    ServerProcess::start(&dir, &args)
}

async fn remote_writes_reach(client: &Client, n: u64) -> bool {
    eventually(Duration::from_secs(20), async || client.stats().await.is_ok_and(|s| s.remote_writes >= n)).await
}

async fn remote_is(client: &Client, up: bool) -> bool {
    eventually(Duration::from_secs(20), async || client.stats().await.is_ok_and(|s| (s.remote_up == 1) == up)).await
}

/// The Redis key of a test-model chunk of rank `rank` (world size `world`).
fn key_of(world: u32, rank: u32, hash: &ChunkHash) -> String {
    let ns = ObjectNamespace {
        model: Arc::from("test-model"),
        world_size: world,
        layout: LayoutFingerprint::of(&small_layout(), 256),
    };
    String::from_utf8(object_key("kvcoord", &ns, rank, hash)).unwrap()
}

#[actix_rt::test]
async fn two_coordinators_share_chunks_bit_exact_through_redis() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path());
    let url = redis.url();
    let a = coordinator(dir.path(), "a", &["--remote", &url]);
    let b = coordinator(dir.path(), "b", &["--remote", &url]);
    // Two ranks on each coordinator, different engines.
    let mut wa = vec![worker(&a, 1, 0, 2).await, worker(&a, 1, 1, 2).await];
    let mut wb = vec![worker(&b, 2, 0, 2).await, worker(&b, 2, 1, 2).await];
    let prompts: Vec<Vec<ChunkHash>> = (0..6).map(|p| prefix_hashes("test-model", 31, p, 3, 256)).collect();
    // At the pace of a remote that keeps up: each prompt is written behind
    // before the next (a full queue drops its oldest writes, by design).
    for (i, h) in prompts.iter().enumerate() {
        for w in &mut wa {
            w.store_prefix(h).await.unwrap();
        }
        assert!(remote_writes_reach(&wa[0].client, 6 * (i as u64 + 1)).await, "prompt {i} written behind");
    }
    assert_eq!(wa[0].client.stats().await.unwrap().remote_dropped_writes, 0);

    for h in &prompts {
        let found = wb[0].client.lookup(wb[0].key, h.clone(), true).await;
        assert_eq!(found.chunks, 3, "B finds every chunk of every rank in the remote tier");
        for w in &mut wb {
            let (r, v) = w.retrieve_and_verify(h, &[], found.lease).await.unwrap();
            assert_eq!((r.prefix_retrieved(), v.corrupt_chunks), (3, 0), "identical bytes through Redis");
            assert_eq!(v.bytes_verified, 3 << 20);
        }
    }
    let s = wb[0].client.stats().await.unwrap();
    assert_eq!(s.remote_rejected, 0);
    assert_eq!(s.remote_bytes_in, 36 * ((1 << 20) + kvcoord::server::remote_format::HEADER_BYTES as u64));
    assert_eq!(s.objects, 36, "remote hits are promoted into B's L1");
    // A second retrieve on B is served from its L1: no more remote reads.
    let (r, _) = wb[0].retrieve_and_verify(&prompts[0], &[], None).await.unwrap();
    assert_eq!(r.prefix_retrieved(), 3);
    assert_eq!(wb[0].client.stats().await.unwrap().remote_bytes_in, s.remote_bytes_in);
    assert_eq!(redis.keys().len(), 36, "one key per (chunk, rank), all under the prefix");
    assert!(redis.keys().iter().all(|k| k.starts_with("kvcoord:v1:")));
}

#[actix_rt::test]
async fn redis_killed_mid_run_gives_typed_misses_without_hanging_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = RedisServer::start(dir.path());
    let url = redis.url();
    let a = coordinator(dir.path(), "a", &["--remote", &url]);
    let b = coordinator(dir.path(), "b", &["--remote", &url]);
    let mut wa = worker(&a, 1, 0, 1).await;
    let mut wb = worker(&b, 2, 0, 1).await;
    let first: Vec<ChunkHash> = prefix_hashes("test-model", 41, 0, 4, 256);
    wa.store_prefix(&first).await.unwrap();
    assert!(remote_writes_reach(&wa.client, 4).await);

    redis.kill();
    // Lookups and retrieves that need the remote end as misses, well within
    // their deadline (the client's request timeout is 5 s).
    let t = Instant::now();
    let found = wb.client.lookup(wb.key, first.clone(), false).await;
    assert!(found.error.is_none(), "a miss, not an error: {:?}", found.error);
    assert_eq!(found.chunks, 0);
    let (r, v) = wb.retrieve_and_verify(&first, &[], None).await.unwrap();
    assert!(r.error.is_none(), "typed per-chunk misses, not an error: {:?}", r.error);
    assert_eq!(r.outcomes, vec![RetrieveOutcome::Missing; 4]);
    assert_eq!(v.corrupt_chunks, 0);
    assert!(t.elapsed() < Duration::from_secs(3), "no hang: {:?}", t.elapsed());
    assert!(remote_is(&wb.client, false).await, "B's stats say the remote is down");
    let status = raw(&b).await.request(RequestBody::Status, Duration::from_secs(5), Vec::new()).await.unwrap();
    let ReplyBody::Status(report) = status else { panic!("status reply") };
    let remote = report.remote.expect("remote health in the status");
    assert!(!remote.up && remote.last_error.is_some(), "{remote:?}");

    // Stores never wait on the remote, and A keeps serving from L1.
    let second: Vec<ChunkHash> = prefix_hashes("test-model", 41, 1, 4, 256);
    let t = Instant::now();
    let (_, outcomes) = wa.store_prefix(&second).await.unwrap();
    assert_eq!(outcomes, vec![StoreOutcome::Stored; 4]);
    assert!(t.elapsed() < Duration::from_secs(1), "a store took {:?} with the remote down", t.elapsed());
    let (r, v) = wa.retrieve_and_verify(&first, &[], None).await.unwrap();
    assert_eq!((r.prefix_retrieved(), v.corrupt_chunks), (4, 0), "nothing local is lost");

    // Redis comes back (empty: no persistence). The tier reconnects by
    // itself, the queued writes go out, and B hits again.
    redis.restart();
    assert!(remote_is(&wa.client, true).await, "A reconnects by itself");
    assert!(remote_is(&wb.client, true).await, "B reconnects by itself");
    assert!(remote_writes_reach(&wa.client, 8).await, "the writes queued while it was down go out");
    let found = wb.client.lookup(wb.key, second.clone(), false).await;
    assert_eq!(found.chunks, 4);
    let (r, v) = wb.retrieve_and_verify(&second, &[], None).await.unwrap();
    assert_eq!((r.prefix_retrieved(), v.corrupt_chunks), (4, 0));
    let s = wb.client.stats().await.unwrap();
    assert!(s.remote_failed_calls >= 1 && s.remote_misses >= 4, "{s:?}");
}

#[actix_rt::test]
async fn a_value_corrupted_with_redis_cli_is_a_miss_not_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start(dir.path());
    let url = redis.url();
    let a = coordinator(dir.path(), "a", &["--remote", &url]);
    let b = coordinator(dir.path(), "b", &["--remote", &url]);
    let mut wa = worker(&a, 1, 0, 1).await;
    let mut wb = worker(&b, 2, 0, 1).await;
    let hashes: Vec<ChunkHash> = prefix_hashes("test-model", 51, 0, 4, 256);
    wa.store_prefix(&hashes).await.unwrap();
    assert!(remote_writes_reach(&wa.client, 4).await);

    // Flip bytes inside chunk 2's payload, and truncate chunk 3's value.
    let flipped = key_of(1, 0, &hashes[2]);
    assert_eq!(redis.cli(&["SETRANGE", &flipped, "5000", "XXXX"]).trim(), (1 << 20 | 40).to_string());
    let truncated = key_of(1, 0, &hashes[3]);
    assert_eq!(redis.cli(&["SET", &truncated, "not a kvcoord object"]).trim(), "OK");

    let (r, v) = wb.retrieve_and_verify(&hashes, &[], None).await.unwrap();
    assert_eq!(
        r.outcomes,
        vec![
            RetrieveOutcome::Retrieved,
            RetrieveOutcome::Retrieved,
            RetrieveOutcome::Missing,
            RetrieveOutcome::Missing
        ]
    );
    assert_eq!(v.corrupt_chunks, 0, "the chunks served are exact");
    let s = wb.client.stats().await.unwrap();
    assert_eq!(s.remote_rejected, 2, "both refused values are counted");
    assert_eq!(s.objects, 2, "refused values never reach L1");
}

#[actix_rt::test]
async fn a_cluster_node_down_misses_only_its_slots() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = RedisCluster::start(dir.path());
    let urls = cluster.urls();
    let a = coordinator(dir.path(), "a", &["--remote-cluster", &urls]);
    let b = coordinator(dir.path(), "b", &["--remote-cluster", &urls]);
    let mut wa = worker(&a, 1, 0, 1).await;
    let wb = worker(&b, 2, 0, 1).await;
    // 24 one-chunk prompts: their keys spread over the three nodes.
    let prompts: Vec<Vec<ChunkHash>> = (0..24).map(|p| prefix_hashes("test-model", 61, p, 1, 256)).collect();
    for (i, h) in prompts.iter().enumerate() {
        wa.store_prefix(h).await.unwrap();
        assert!(remote_writes_reach(&wa.client, i as u64 + 1).await, "prompt {i} written behind");
    }
    let on_node: Vec<Vec<String>> = cluster.nodes.iter().map(RedisServer::keys).collect();
    assert_eq!(on_node.iter().map(Vec::len).sum::<usize>(), 24);
    let victim = (0..3).max_by_key(|&i| on_node[i].len()).unwrap();
    assert!(!on_node[victim].is_empty() && on_node[victim].len() < 24);

    cluster.nodes[victim].kill();
    let t = Instant::now();
    let mut found = Vec::new();
    for h in &prompts {
        let r = wb.client.lookup(wb.key, h.clone(), false).await;
        assert!(r.error.is_none(), "{:?}", r.error);
        found.push(r.chunks == 1);
    }
    let expected: Vec<bool> = prompts.iter().map(|h| !on_node[victim].contains(&key_of(1, 0, &h[0]))).collect();
    assert_eq!(found, expected, "exactly the dead node's chunks miss");
    assert!(t.elapsed() < Duration::from_secs(20), "24 lookups took {:?}", t.elapsed());
    assert_eq!(wb.client.stats().await.unwrap().remote_up, 1, "the cluster is up while a primary answers");
}

#[actix_rt::test]
async fn a_password_protected_redis_is_reached_with_the_url_password_which_is_never_shown() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start_with_password(dir.path(), "s3cret-pw");
    let good = format!("redis://:s3cret-pw@127.0.0.1:{}", redis.port);
    let a = coordinator(dir.path(), "a", &["--remote", &good]);
    let mut w = worker(&a, 1, 0, 1).await;
    let hashes: Vec<ChunkHash> = prefix_hashes("test-model", 71, 0, 2, 256);
    w.store_prefix(&hashes).await.unwrap();
    assert!(remote_writes_reach(&w.client, 2).await, "authenticated writes land");
    assert_eq!(redis.keys().len(), 2);
    let status = raw(&a).await.request(RequestBody::Status, Duration::from_secs(5), Vec::new()).await.unwrap();
    let ReplyBody::Status(report) = status else { panic!("status reply") };
    let shown = serde_json::to_string(&report).unwrap();
    assert!(!shown.contains("s3cret-pw"), "{shown}");
    assert!(report.remote.unwrap().endpoint.contains(":***@"));

    // A wrong password: the tier stays down, stores still succeed locally.
    let bad = format!("redis://:wrong@127.0.0.1:{}", redis.port);
    let b = coordinator(dir.path(), "b", &["--remote", &bad]);
    let mut wb = worker(&b, 2, 0, 1).await;
    let (_, outcomes) = wb.store_prefix(&hashes).await.unwrap();
    assert_eq!(outcomes, vec![StoreOutcome::Stored; 2]);
    let found = wb.client.lookup(wb.key, prefix_hashes("test-model", 71, 1, 2, 256), false).await;
    assert!(found.error.is_none() && found.chunks == 0);
    assert!(remote_is(&wb.client, false).await, "refused credentials leave the tier down");
    assert_eq!(redis.keys().len(), 2, "nothing written with a wrong password");
}

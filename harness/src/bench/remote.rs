//! Remote tier: two coordinators on one real `redis-server` (started here,
//! on a free loopback port). Store GB/s (stores into coordinator A until A
//! has written every object to Redis) and retrieve GB/s (coordinator B, whose
//! L1 misses, reads every object back and scatters it; bytes verified),
//! beside raw `SET`/`GET` of the same value sizes with the same client (the
//! `redis` crate's connection manager) in the same run; and the latency of a
//! lookup of a 64-chunk prefix that misses L1 (one batched probe), beside one
//! raw pipeline of the same 64 `EXISTS`.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use kvcoord_client::{Client, ClientConfig};
use kvcoord_memory::{Dtype, KvLayout};
use kvcoord_transport::*;

use crate::child::{wait_listening, Server};
use crate::pattern::prefix_hashes;
use crate::tp_worker::TpWorker;

use super::report::*;

/// Chunks stored and read back; 64 is also the lookup's prefix.
const CHUNKS: usize = 64;
/// Chunks per store or retrieve request.
const PER_REQUEST: usize = 8;
/// Writes in flight (the coordinator's `--remote-writers`, and the raw SETs').
const WRITERS: usize = 4;

/// 16 layers x 8 heads x 64 (bf16), 16-token blocks: a 256-token chunk is
/// an 8 MiB object per rank.
fn layout() -> KvLayout {
    KvLayout::mha(16, 1024, 16, 8, 64, Dtype::Bf16)
}

struct RedisChild(Child);

impl Drop for RedisChild {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_redis(dir: &Path) -> Option<(RedisChild, u16)> {
    let port = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| eprintln!("kvcoord bench: remote tier needs redis-server: {e}"))
        .ok()?;
    let child = RedisChild(child);
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if start.elapsed() > Duration::from_secs(10) {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Some((child, port))
}

async fn worker(socket: &Path, engine: u64) -> TpWorker {
    let client = Client::start(ClientConfig::new(Endpoint::Unix(socket.to_path_buf())));
    let key = InstanceKey { engine, rank: 0 };
    TpWorker::register(client, key, "bench-remote", 1, layout(), 256).await.expect("register")
}

/// The remote-tier scenario; false if a byte came back wrong or a step failed.
pub(crate) async fn remote_tier(plan: &Plan, dir: &Path, rows: &mut Vec<Row>) -> bool {
    let Some((_redis, port)) = start_redis(dir) else { return false };
    let url = format!("redis://127.0.0.1:{port}");
    let writers = WRITERS.to_string();
    let start = |name: &str, l1: &'static str| {
        let socket = dir.join(format!("remote-{name}.sock"));
        // L1 taken at start, as in steady state: no first-touch page faults
        // inside the timed copies.
        let args = [
            "--l1-size",
            l1,
            "--l1-prealloc",
            "--remote",
            &url,
            "--remote-queue-size",
            "1GiB",
            "--remote-writers",
            &writers,
            "--remote-timeout-ms",
            "10000",
        ];
        let server = Server::start(&socket, &dir.join(format!("remote-{name}.log")), &args).expect("start");
        (server, socket)
    };
    let ((_a, socket_a), (_b, socket_b)) = (start("a", "3GiB"), start("b", "1GiB"));
    if !wait_listening(&socket_a, Duration::from_secs(60)) || !wait_listening(&socket_b, Duration::from_secs(60)) {
        return false;
    }
    // The same client and limits as the coordinators' remote tier.
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(10)))
        .set_response_timeout(Some(Duration::from_secs(10)));
    let raw = match redis::Client::open(url.as_str()) {
        Ok(c) => c.get_connection_manager_with_config(config).await,
        Err(e) => Err(e),
    };
    let Ok(raw) = raw else { return false };
    let rounds = plan.timed_rounds.clamp(1, 3);
    let object = layout().chunk_object_bytes(16) as usize;
    let mut a = worker(&socket_a, 41).await;
    let (mut store, mut set, mut retrieve, mut get, mut lookup, mut exists) = (0.0, 0.0, 0.0, 0.0, vec![], vec![]);
    for round in 0..rounds {
        // Redis holds one round at a time (memory), and new prompts each
        // round keep B's L1 missing every chunk.
        let _: () = redis::cmd("FLUSHALL").query_async(&mut raw.clone()).await.expect("FLUSHALL");
        let hashes = prefix_hashes("bench-remote", 41, round, CHUNKS, 256);
        let placed = a.pick_blocks(CHUNKS, &[]);
        a.write_chunks(&hashes, &placed).expect("write the chunks' contents");
        let before = a.client.stats().await.map(|s| s.remote_writes).unwrap_or(0);
        let per = placed.len() / CHUNKS;
        let t = Instant::now();
        for (h, blocks) in hashes.chunks(PER_REQUEST).zip(placed.chunks(PER_REQUEST * per)) {
            let outcomes = a.store(h, blocks).await.expect("store");
            assert!(outcomes.iter().all(|o| *o == StoreOutcome::Stored));
        }
        let mut written = false;
        while t.elapsed() < Duration::from_secs(120) {
            if a.client.stats().await.is_ok_and(|s| s.remote_writes >= before + CHUNKS as u64) {
                written = true;
                break;
            }
            tokio::time::sleep(Duration::from_micros(500)).await;
        }
        if !written {
            eprintln!("kvcoord bench: remote writes did not finish");
            return false;
        }
        store += (CHUNKS * object) as f64 / t.elapsed().as_secs_f64() / 1e9;

        // Raw SET of values of the same size (header included), WRITERS at once.
        let value = vec![0x5Au8; object + 40];
        let t = Instant::now();
        let sets = (0..WRITERS).map(|w| {
            let (mut c, value) = (raw.clone(), &value);
            async move {
                for i in (w..CHUNKS).step_by(WRITERS) {
                    let _: () = redis::cmd("SET")
                        .arg(format!("raw:{round}:{i}"))
                        .arg(value.as_slice())
                        .query_async(&mut c)
                        .await
                        .expect("raw SET");
                }
            }
        });
        futures::future::join_all(sets).await;
        set += (CHUNKS * object) as f64 / t.elapsed().as_secs_f64() / 1e9;

        let mut b = worker(&socket_b, 100 + round).await;
        // Lookups of the 64-chunk prefix: B's L1 misses, the remote holds all.
        for _ in 0..plan.samples.min(200) {
            let t = Instant::now();
            let found = b.client.lookup(b.key, hashes.clone(), false).await;
            lookup.push(t.elapsed());
            if found.chunks as usize != CHUNKS {
                eprintln!("kvcoord bench: remote lookup found {} of {CHUNKS}", found.chunks);
                return false;
            }
            let mut pipe = redis::pipe();
            for i in 0..CHUNKS {
                pipe.cmd("EXISTS").arg(format!("raw:{round}:{i}"));
            }
            let t = Instant::now();
            let n: Vec<i64> = pipe.query_async(&mut raw.clone()).await.expect("raw EXISTS");
            exists.push(t.elapsed());
            assert_eq!(n.iter().sum::<i64>(), CHUNKS as i64);
        }

        // Retrieve on B (every object from Redis), PER_REQUEST chunks a request.
        let (mut secs, mut bytes) = (0.0, 0u64);
        for h in hashes.chunks(PER_REQUEST) {
            let blocks = b.pick_blocks(h.len(), &[]);
            b.scribble(&blocks).expect("scribble");
            let t = Instant::now();
            let got = b.client.retrieve(b.key, h.to_vec(), blocks.clone(), None).await;
            secs += t.elapsed().as_secs_f64();
            let v = b.verify_chunks(h, &blocks, got.prefix_retrieved()).expect("verify");
            if v.corrupt_chunks > 0 || got.prefix_retrieved() != h.len() {
                eprintln!("kvcoord bench: remote retrieve got {} of {}", got.prefix_retrieved(), h.len());
                return false;
            }
            bytes += v.bytes_verified;
        }
        retrieve += bytes as f64 / secs / 1e9;
        // Raw GET: the same sizes, one pipeline of PER_REQUEST GETs at a time.
        let t = Instant::now();
        for first in (0..CHUNKS).step_by(PER_REQUEST) {
            let mut pipe = redis::pipe();
            for i in first..first + PER_REQUEST {
                pipe.cmd("GET").arg(format!("raw:{round}:{i}"));
            }
            let got: Vec<Vec<u8>> = pipe.query_async(&mut raw.clone()).await.expect("raw GET");
            assert!(got.iter().all(|v| v.len() == object + 40));
        }
        get += (CHUNKS * object) as f64 / t.elapsed().as_secs_f64() / 1e9;
        b.client.close();
    }
    let n = rounds as f64;
    let mb = object >> 20;
    rows.push(Row {
        scenario: format!("remote tier: store {CHUNKS} x {mb} MiB chunks (until in Redis)"),
        metric: "GB/s",
        kvcoord: store / n,
        baseline_name: "raw SET, same client",
        baseline: set / n,
        unit: "GB/s",
    });
    rows.push(Row {
        scenario: format!("remote tier: retrieve {CHUNKS} x {mb} MiB chunks, L1 miss"),
        metric: "GB/s",
        kvcoord: retrieve / n,
        baseline_name: "raw GET, same client",
        baseline: get / n,
        unit: "GB/s",
    });
    lookup.sort();
    exists.sort();
    rows.push(Row {
        scenario: format!("remote tier: lookup {CHUNKS}-chunk prefix, L1 miss p50"),
        metric: "us",
        kvcoord: percentile(&lookup, 0.5),
        baseline_name: "raw 64 EXISTS pipe",
        baseline: percentile(&exists, 0.5),
        unit: "us",
    });
    rows.push(Row {
        scenario: format!("remote tier: lookup {CHUNKS}-chunk prefix, L1 miss p99"),
        metric: "us",
        kvcoord: percentile(&lookup, 0.99),
        baseline_name: "raw 64 EXISTS pipe",
        baseline: percentile(&exists, 0.99),
        unit: "us",
    });
    a.client.close();
    true
}

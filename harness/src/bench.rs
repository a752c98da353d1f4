//! `kvcoord bench`: measured speed, each number beside a baseline measured in
//! the same run. The coordinator is a real `kvcoord serve` child process and
//! the clients are the real client (processes where the scenario says so);
//! nothing takes a path production requests do not take.
//!
//! 1. Control plane: ping and 64-chunk lookup latency, one at a time, and
//!    pipelined lookup throughput from 1 client and from 8 client processes,
//!    beside a minimal echo server with the same socket type, handshake and
//!    framing.
//! 2. Host data plane: store and retrieve GB/s (request to verified reply)
//!    with 1 and 4 TP clients, beside single-thread memcpy of the same bytes
//!    and the same gather done in-process.
//! 3. Recovery: 8 TP clients under load, SIGKILL + restart, time from the new
//!    server listening to all 8 registered again and to the first store.
//! 4. Index scale: lookups of 1, 64 and 4096-chunk prefixes against an index
//!    of many chunk entries, and resident memory per entry.
//! 5. Disk tier: lookup hit rate and retrieve GB/s after a SIGKILL + restart,
//!    beside the same before the restart.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::pattern::{prefix_hashes, vllm_like_layout};
use crate::tp_worker::TpWorker;
use kvcoord_client::{Client, ClientConfig};
use kvcoord_memory::{Arena, Dtype, HostKvCache, HostMapping, KvLayout, MemoryHandle};
use kvcoord_transport::frame::DEFAULT_MAX_FRAME_BYTES;
use kvcoord_transport::stream::{write_loop, OutFrame};
use kvcoord_transport::*;

use crate::child::{wait_listening, Server};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// A short run (about 30 seconds on 2 cores).
    #[arg(long)]
    quick: bool,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// One lookup-load client process (8 of them run at once).
#[derive(clap::Args)]
pub struct LookupLoadArgs {
    #[arg(long)]
    socket: PathBuf,
    #[arg(long)]
    engine: u64,
    #[arg(long)]
    millis: u64,
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Register first (needed against kvcoord, not against the echo).
    #[arg(long)]
    register: bool,
}

struct Row {
    scenario: String,
    metric: &'static str,
    kvcoord: f64,
    baseline_name: &'static str,
    baseline: f64,
    unit: &'static str,
}

struct Plan {
    samples: usize,
    pipeline: Duration,
    timed_rounds: u64,
    cycles: usize,
    index_entries: usize,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

fn welcome() -> Welcome {
    Welcome {
        protocol: PROTOCOL_VERSION,
        epoch: ServerEpoch(1),
        chunk_tokens: 256,
        limits: Limits { max_frame_bytes: DEFAULT_MAX_FRAME_BYTES, max_chunks_per_request: 4096 },
        server: "echo".into(),
    }
}

/// A minimal echo server: the same handshake, framing and reply writer as
/// kvcoord, answering every request with a pong at once.
fn start_echo(socket: PathBuf) {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async move {
            let listener = Listener::bind(&Endpoint::Unix(socket)).await.expect("echo bind");
            while let Ok((mut r, mut w, _)) = listener.accept(DEFAULT_MAX_FRAME_BYTES).await {
                tokio::spawn(async move {
                    if handshake::welcome(&mut r, &mut w, &welcome(), Duration::from_secs(5)).await.is_err() {
                        return;
                    }
                    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                    tokio::spawn(write_loop(w, rx));
                    while let Ok((ClientFrame::Request(req), _)) = r.read::<ClientFrame>().await {
                        let pong = Ok(ReplyBody::Pong { epoch: ServerEpoch(1) });
                        let reply = ServerFrame::Reply(Reply { id: req.id, result: pong });
                        let bytes = frame::encode(&reply, 0, DEFAULT_MAX_FRAME_BYTES).expect("encode");
                        if tx.send(OutFrame { bytes, fds: Vec::new() }).is_err() {
                            return;
                        }
                    }
                });
            }
        });
    });
}

/// The client engines use (`kvcoord_client::Client`), connected; the echo
/// baseline is measured through the same client, so both sides pay for it.
async fn connect(socket: &Path) -> Client {
    let client = Client::start(ClientConfig::new(Endpoint::Unix(socket.to_path_buf())));
    let mut link = client.link();
    let _ = tokio::time::timeout(Duration::from_secs(10), link.wait_for(|s| s.connection.is_some())).await;
    client
}

async fn sequential(client: &Client, body: &RequestBody, n: usize) -> Vec<Duration> {
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let r = client.call(body.clone(), Duration::from_secs(5)).await;
        lat.push(t.elapsed());
        r.expect("request");
    }
    lat.sort();
    lat
}

/// Requests completed by `window` concurrent loops until `stop`.
async fn pipelined(client: Client, body: RequestBody, window: usize, stop: Instant) -> u64 {
    let tasks: Vec<_> = (0..window)
        .map(|_| {
            let (c, b) = (client.clone(), body.clone());
            actix_rt::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < stop {
                    c.call(b.clone(), Duration::from_secs(5)).await.expect("request");
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut total = 0;
    for task in tasks {
        total += task.await.expect("task");
    }
    total
}

/// A tiny layout for clients whose bytes do not matter: 1 layer, 4096 blocks
/// of 256 tokens, MLA hidden 1, fp8: 256-byte chunk objects.
fn tiny_layout() -> KvLayout {
    KvLayout::mla(1, 4096, 256, 1, Dtype::Fp8)
}

async fn register_tiny(client: &Client, key: InstanceKey, world: u32) -> HostKvCache {
    let layout = tiny_layout();
    let cache = HostKvCache::create("bench", layout).expect("memfd");
    let request = RegisterKvCache {
        instance: key,
        model: "bench-model".into(),
        world_size: world,
        layout,
        memory: MemoryHandle::HostFd { size: layout.total_bytes() },
    };
    client.register(request, Some(cache.fd())).await.expect("register");
    cache
}

fn lookup_body(engine: u64, chunks: Vec<ChunkHash>) -> RequestBody {
    RequestBody::Lookup(LookupPrefix { instance: InstanceKey { engine, rank: 0 }, chunks, lease: false })
}

/// `kvcoord lookup-load`: prints how many pipelined lookups it completed.
pub fn lookup_load(args: LookupLoadArgs) -> ExitCode {
    actix_rt::System::new().block_on(async move {
        let client = Client::start(ClientConfig::new(Endpoint::Unix(args.socket.clone())));
        let _cache = if args.register {
            Some(register_tiny(&client, InstanceKey { engine: args.engine, rank: 0 }, 1).await)
        } else {
            None
        };
        let body = lookup_body(args.engine, prefix_hashes("bench-model", 1, 0, 64, 256));
        let stop = Instant::now() + Duration::from_millis(args.millis);
        println!("{}", pipelined(client, body, args.window, stop).await);
        ExitCode::SUCCESS
    })
}

/// Runs 8 lookup-load processes at once; returns requests per second.
fn eight_processes(socket: &Path, register: bool, millis: u64) -> f64 {
    let exe = std::env::current_exe().expect("own path");
    let t = Instant::now();
    let children: Vec<_> = (0..8)
        .map(|i| {
            let mut c = Command::new(&exe);
            c.args(["lookup-load", "--engine", &(900 + i).to_string(), "--millis", &millis.to_string(), "--socket"])
                .arg(socket)
                .stdout(Stdio::piped())
                .stderr(Stdio::null());
            if register {
                c.arg("--register");
            }
            c.spawn().expect("spawn lookup-load")
        })
        .collect();
    let total: u64 = children
        .into_iter()
        .map(|c| {
            String::from_utf8_lossy(&c.wait_with_output().expect("wait").stdout).trim().parse::<u64>().unwrap_or(0)
        })
        .sum();
    // Each process runs `millis` after its own start-up; count that window.
    total as f64 / (millis as f64 / 1e3).min(t.elapsed().as_secs_f64())
}

pub fn run(args: BenchArgs) -> ExitCode {
    let dir = std::env::temp_dir().join(format!("kvcoord-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let code = actix_rt::System::new().block_on(bench(args, dir.clone()));
    let _ = std::fs::remove_dir_all(&dir);
    code
}

async fn control_plane(plan: &Plan, socket: &Path, echo: &Path, rows: &mut Vec<Row>) {
    let (kv, ec) = (connect(socket).await, connect(echo).await);
    let _cache = register_tiny(&kv, InstanceKey { engine: 1, rank: 0 }, 1).await;
    let lookup = lookup_body(1, prefix_hashes("bench-model", 1, 0, 64, 256));
    for (name, body) in [("ping", RequestBody::Ping), ("lookup 64 chunks", lookup.clone())] {
        let (a, b) = (sequential(&kv, &body, plan.samples).await, sequential(&ec, &body, plan.samples).await);
        for (p, metric) in [(0.5, "p50"), (0.99, "p99"), (0.999, "p99.9")] {
            rows.push(Row {
                scenario: format!("{name}, one at a time"),
                metric,
                kvcoord: percentile(&a, p),
                baseline_name: "echo",
                baseline: percentile(&b, p),
                unit: "us",
            });
        }
    }
    let secs = plan.pipeline.as_secs_f64();
    let a = pipelined(kv.clone(), lookup.clone(), 256, Instant::now() + plan.pipeline).await as f64 / secs;
    let b = pipelined(ec.clone(), lookup.clone(), 256, Instant::now() + plan.pipeline).await as f64 / secs;
    rows.push(Row {
        scenario: "lookup 64 chunks, 256 in flight, 1 client".into(),
        metric: "rate",
        kvcoord: a,
        baseline_name: "echo",
        baseline: b,
        unit: "req/s",
    });
    let millis = plan.pipeline.as_millis() as u64;
    let a = eight_processes(socket, true, millis);
    let b = eight_processes(echo, false, millis);
    rows.push(Row {
        scenario: "lookup 64 chunks, 8 client processes x 64".into(),
        metric: "rate",
        kvcoord: a,
        baseline_name: "echo",
        baseline: b,
        unit: "req/s",
    });
}

/// Store and retrieve with `ranks` TP clients; false if any byte was wrong.
async fn data_plane(plan: &Plan, socket: &Path, ranks: u32, engine: u64, cold_l1: bool, rows: &mut Vec<Row>) -> bool {
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

async fn recovery(plan: &Plan, server: &mut Server, socket: &Path, log: &Path, rows: &mut Vec<Row>) -> bool {
    let mut ws = Vec::new();
    for e in 0..8u64 {
        let client = Client::start(ClientConfig::new(Endpoint::Unix(socket.to_path_buf())));
        let key = InstanceKey { engine: 5000 + e, rank: 0 };
        let cache = register_tiny(&client, key, 1).await;
        ws.push((client, key, cache));
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loads: Vec<_> = ws
        .iter()
        .map(|(c, k, _)| {
            let (c, k, stop) = (c.clone(), *k, stop.clone());
            actix_rt::spawn(async move {
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let h = prefix_hashes("bench-model", k.engine, i % 64, 4, 256);
                    let _ = c.store(k, h, (0..4).map(|b| ((i * 4 + b) % 4096) as u32).collect()).await;
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        })
        .collect();
    let (mut to_registered, mut to_store) = (Vec::new(), Vec::new());
    let prober = &ws[0];
    for cycle in 1..=plan.cycles as u64 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        server.kill();
        *server = Server::start(socket, log, &["--l1-size", "512MiB"]).expect("restart");
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let listening = Instant::now();
        let mut stored_at = None;
        loop {
            if stored_at.is_none() {
                let h = prefix_hashes("bench-model", prober.1.engine, 100_000 + cycle, 1, 256);
                if prober.0.store(prober.1, h, vec![0]).await.is_ok() {
                    stored_at = Some(listening.elapsed());
                }
            }
            if ws.iter().all(|(c, _, _)| c.reregistrations() >= cycle) {
                to_registered.push(listening.elapsed());
                break;
            }
            if listening.elapsed() > Duration::from_secs(30) {
                return false;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        while stored_at.is_none() {
            let h = prefix_hashes("bench-model", prober.1.engine, 100_000 + cycle, 1, 256);
            if prober.0.store(prober.1, h, vec![0]).await.is_ok() {
                stored_at = Some(listening.elapsed());
            }
        }
        to_store.push(stored_at.expect("stored"));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in loads {
        let _ = l.await;
    }
    for (what, mut v) in [("all 8 clients registered again", to_registered), ("first successful store", to_store)] {
        v.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        rows.push(Row {
            scenario: format!("recovery: listening -> {what} ({} cycles)", v.len()),
            metric: "median",
            kvcoord: ms(v[v.len() / 2]),
            baseline_name: "max",
            baseline: ms(v[v.len() - 1]),
            unit: "ms",
        });
    }
    for (c, _, _) in &ws {
        c.close();
    }
    true
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

async fn index_scale(plan: &Plan, dir: &Path, rows: &mut Vec<Row>) -> bool {
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

/// Stores prompts with the disk tier on, then compares hit rate and retrieve
/// speed before and after a SIGKILL + restart.
async fn disk_tier(plan: &Plan, dir: &Path, rows: &mut Vec<Row>) -> bool {
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

async fn bench(args: BenchArgs, dir: PathBuf) -> ExitCode {
    let plan = if args.quick {
        Plan { samples: 5_000, pipeline: Duration::from_secs(2), timed_rounds: 2, cycles: 3, index_entries: 1_000_000 }
    } else {
        Plan {
            samples: 50_000,
            pipeline: Duration::from_secs(5),
            timed_rounds: 8,
            cycles: 10,
            index_entries: 10_000_000,
        }
    };
    let (socket, echo, log) = (dir.join("kv.sock"), dir.join("echo.sock"), dir.join("server.log"));
    let mut server = Server::start(&socket, &log, &["--l1-size", "512MiB"]).expect("start kvcoord serve");
    start_echo(echo.clone());
    if !wait_listening(&socket, Duration::from_secs(10)) || !wait_listening(&echo, Duration::from_secs(10)) {
        eprintln!("kvcoord bench: servers did not start");
        return ExitCode::from(1);
    }
    let bar = indicatif::ProgressBar::new(6);
    bar.set_style(indicatif::ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} {msg}").expect("template"));
    let mut rows = Vec::new();
    bar.set_message("control plane");
    control_plane(&plan, &socket, &echo, &mut rows).await;
    bar.inc(1);
    bar.set_message("host data plane, 1 TP client");
    let mut ok = data_plane(&plan, &socket, 1, 11, true, &mut rows).await;
    bar.inc(1);
    bar.set_message("host data plane, 4 TP clients");
    ok &= data_plane(&plan, &socket, 4, 12, false, &mut rows).await;
    bar.inc(1);
    bar.set_message("recovery");
    ok &= recovery(&plan, &mut server, &socket, &log, &mut rows).await;
    bar.inc(1);
    bar.set_message("index scale");
    drop(server);
    ok &= index_scale(&plan, &dir, &mut rows).await;
    bar.inc(1);
    bar.set_message("disk tier");
    ok &= disk_tier(&plan, &dir, &mut rows).await;
    bar.finish_and_clear();

    println!("kvcoord bench{}", if args.quick { " --quick" } else { "" });
    println!("{:<58} {:>6} {:>11} {:>18} {:>11} {:>7}", "scenario", "metric", "kvcoord", "baseline", "", "ratio");
    for r in &rows {
        println!(
            "{:<58} {:>6} {:>11.1} {:>18} {:>11.1} {:>7.2}  {}",
            r.scenario,
            r.metric,
            r.kvcoord,
            r.baseline_name,
            r.baseline,
            r.kvcoord / r.baseline,
            r.unit
        );
    }
    if let Some(path) = args.json {
        if let Err(e) = std::fs::write(&path, rows_as_json(&rows)) {
            eprintln!("kvcoord bench: {}: {e}", path.display());
        }
    }
    if !ok {
        eprintln!("kvcoord bench: a scenario failed (corrupt bytes or no recovery)");
        return ExitCode::from(1);
    }
    ExitCode::SUCCESS
}

/// JSON without another dependency: the rows are flat and their strings plain.
fn rows_as_json(rows: &[Row]) -> String {
    let items: Vec<String> = rows
        .iter()
        .map(|r| {
            format!(
                "{{\"scenario\":{:?},\"metric\":{:?},\"kvcoord\":{},\"baseline_name\":{:?},\"baseline\":{},\"unit\":{:?}}}",
                r.scenario, r.metric, r.kvcoord, r.baseline_name, r.baseline, r.unit
            )
        })
        .collect();
    format!("[{}]\n", items.join(","))
}

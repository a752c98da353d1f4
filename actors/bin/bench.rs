//! `kvcoord bench`: measured speed, each number beside a baseline measured in
//! the same run. The coordinator is a real `kvcoord serve` child process and
//! the client is the real client; nothing takes a path production requests
//! do not take.
//!
//! Scenarios: control-plane latency (ping, 64-chunk lookup) against a
//! minimal echo server using the same socket type and framing; pipelined
//! lookup throughput against the same echo; host data-plane store and
//! retrieve GB/s against single-thread memcpy and an in-process gather.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvcoord::client::{WorkerClient, WorkerConfig};
use kvcoord::workload::{prefix_hashes, vllm_like_layout, TpWorker};
use kvcoord_gpu::{Arena, HostMapping};
use kvcoord_transport::frame::DEFAULT_MAX_FRAME_BYTES;
use kvcoord_transport::stream::{write_loop, OutFrame};
use kvcoord_transport::*;

use crate::child::{wait_listening, Server};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// A short run (under 2 minutes on 2 cores).
    #[arg(long)]
    quick: bool,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

struct Row {
    scenario: &'static str,
    metric: String,
    kvcoord: f64,
    baseline_name: &'static str,
    baseline: f64,
    unit: &'static str,
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

/// A minimal echo server: the same handshake, framing and reply writer as
/// kvcoord, answering every request with a pong at once.
fn start_echo(socket: PathBuf) {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        rt.block_on(async move {
            let listener = Listener::bind(&Endpoint::Unix(socket)).await.expect("echo bind");
            let welcome = Welcome {
                protocol: PROTOCOL_VERSION,
                epoch: ServerEpoch(1),
                chunk_tokens: 256,
                limits: Limits { max_frame_bytes: DEFAULT_MAX_FRAME_BYTES, max_chunks_per_request: 4096 },
                server: "echo".into(),
            };
            while let Ok((mut r, mut w, _)) = listener.accept(DEFAULT_MAX_FRAME_BYTES).await {
                let welcome = welcome.clone();
                tokio::spawn(async move {
                    if handshake::welcome(&mut r, &mut w, &welcome, Duration::from_secs(5)).await.is_err() {
                        return;
                    }
                    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
                    tokio::spawn(write_loop(w, rx));
                    while let Ok((ClientFrame::Request(req), _)) = r.read::<ClientFrame>().await {
                        let reply = ServerFrame::Reply(Reply {
                            id: req.id,
                            result: Ok(ReplyBody::Pong { epoch: ServerEpoch(1) }),
                        });
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

async fn sequential(conn: &Connection, body: &RequestBody, n: usize) -> Vec<Duration> {
    let mut lat = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        conn.request(body.clone(), Duration::from_secs(5), Vec::new()).await.expect("request");
        lat.push(t.elapsed());
    }
    lat.sort();
    lat
}

async fn pipelined(conn: Arc<Connection>, body: RequestBody, window: usize, for_: Duration) -> f64 {
    let stop = Instant::now() + for_;
    let tasks: Vec<_> = (0..window)
        .map(|_| {
            let (c, b) = (conn.clone(), body.clone());
            actix_rt::spawn(async move {
                let mut n = 0u64;
                while Instant::now() < stop {
                    c.request(b.clone(), Duration::from_secs(5), Vec::new()).await.expect("request");
                    n += 1;
                }
                n
            })
        })
        .collect();
    let t = Instant::now();
    let mut total = 0;
    for task in tasks {
        total += task.await.expect("task");
    }
    total as f64 / t.elapsed().as_secs_f64()
}

pub fn run(args: BenchArgs) -> ExitCode {
    let dir = std::env::temp_dir().join(format!("kvcoord-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let code = actix_rt::System::new().block_on(bench(args, dir.clone()));
    let _ = std::fs::remove_dir_all(&dir);
    code
}

async fn bench(args: BenchArgs, dir: PathBuf) -> ExitCode {
    let socket = dir.join("kv.sock");
    let echo = dir.join("echo.sock");
    let _server = Server::start(&socket, &dir.join("server.log"), &["--l1-size", "2GiB"]).expect("start kvcoord serve");
    start_echo(echo.clone());
    if !wait_listening(&socket, Duration::from_secs(10)) || !wait_listening(&echo, Duration::from_secs(10)) {
        eprintln!("kvcoord bench: servers did not start");
        return ExitCode::from(1);
    }
    let (n, secs, rounds) =
        if args.quick { (5_000, Duration::from_secs(2), 2) } else { (50_000, Duration::from_secs(5), 8) };
    let bar = indicatif::ProgressBar::new(6);
    bar.set_style(indicatif::ProgressStyle::with_template("{spinner} [{bar:30}] {pos}/{len} {msg}").expect("template"));
    let mut rows = Vec::new();

    // Control plane.
    let opts = ConnectOptions::default();
    let kv = Connection::open(&Endpoint::Unix(socket.clone()), &opts).await.expect("connect kvcoord");
    let ec = Connection::open(&Endpoint::Unix(echo.clone()), &opts).await.expect("connect echo");
    let client = WorkerClient::start(WorkerConfig::new(Endpoint::Unix(socket.clone())));
    let key = InstanceKey { engine: 1, rank: 0 };
    let mut w = TpWorker::register(client, key, "bench-model", 1, vllm_like_layout(512), 256).await.expect("register");
    let lookup = RequestBody::Lookup(LookupPrefix {
        instance: key,
        chunks: prefix_hashes("bench-model", 1, 0, 64, 256),
        lease: false,
    });

    bar.set_message("ping latency");
    let (a, b) = (sequential(&kv, &RequestBody::Ping, n).await, sequential(&ec, &RequestBody::Ping, n).await);
    for (p, name) in [(0.5, "p50"), (0.99, "p99"), (0.999, "p99.9")] {
        rows.push(Row {
            scenario: "ping",
            metric: name.into(),
            kvcoord: percentile(&a, p),
            baseline_name: "echo",
            baseline: percentile(&b, p),
            unit: "us",
        });
    }
    bar.inc(1);
    bar.set_message("lookup latency");
    let (a, b) = (sequential(&kv, &lookup, n).await, sequential(&ec, &lookup, n).await);
    for (p, name) in [(0.5, "p50"), (0.99, "p99"), (0.999, "p99.9")] {
        rows.push(Row {
            scenario: "lookup 64 chunks",
            metric: name.into(),
            kvcoord: percentile(&a, p),
            baseline_name: "echo",
            baseline: percentile(&b, p),
            unit: "us",
        });
    }
    bar.inc(1);
    bar.set_message("pipelined lookups");
    let a = pipelined(kv.clone(), lookup.clone(), 256, secs).await;
    let b = pipelined(ec.clone(), lookup.clone(), 256, secs).await;
    rows.push(Row {
        scenario: "lookup 64 chunks, 256 in flight, 1 client",
        metric: "throughput".into(),
        kvcoord: a,
        baseline_name: "echo",
        baseline: b,
        unit: "req/s",
    });
    bar.inc(1);

    // Data plane: 8 chunks (256 MiB) per request, vLLM-like layout, random blocks.
    bar.set_message("host store/retrieve");
    let chunks = 8;
    let (mut store_s, mut retrieve_s, mut bytes, mut corrupt) = (0.0, 0.0, 0u64, 0usize);
    let mut gather_s = 0.0;
    let mapping =
        HostMapping::open(w.cache.fd().try_clone_to_owned().expect("dup"), &vllm_like_layout(512)).expect("map");
    let arena = Arena::host(1 << 30);
    let layout = vllm_like_layout(512);
    for r in 0..rounds {
        let h = prefix_hashes("bench-model", 1, 1000 + r, chunks, 256);
        let blocks = w.pick_blocks(chunks, &[]);
        w.write_chunks(&h, &blocks);
        let t = Instant::now();
        let o = w.client.store(key, h.clone(), blocks.clone()).await.expect("store");
        store_s += t.elapsed().as_secs_f64();
        assert!(o.iter().all(|o| *o == StoreOutcome::Stored), "{o:?}");
        let other = w.pick_blocks(chunks, &blocks);
        w.scribble(&other);
        let t = Instant::now();
        let got = w.client.retrieve(key, h.clone(), other.clone(), None).await;
        retrieve_s += t.elapsed().as_secs_f64();
        let v = w.verify_chunks(&h, &other, got.prefix_retrieved());
        corrupt += v.corrupt_chunks + chunks - got.prefix_retrieved();
        bytes += v.bytes_verified;
        // In-process gather of the same blocks, no coordinator.
        let ids = layout.chunk_blocks(256, chunks, &blocks).expect("valid");
        let objs: Vec<_> =
            (0..chunks).map(|_| arena.allocate(layout.chunk_object_bytes(16)).unwrap().unwrap()).collect();
        let t = Instant::now();
        for (i, o) in objs.iter().enumerate() {
            kvcoord_gpu::copy::gather(&layout, &mapping, ids.chunk(i), o).expect("gather");
        }
        gather_s += t.elapsed().as_secs_f64();
    }
    bar.inc(1);
    // Single-thread memcpy of the same number of bytes, in 32 MiB pieces.
    let piece = layout.chunk_object_bytes(16) as usize;
    let src = vec![7u8; piece];
    let mut dst = vec![0u8; piece];
    let t = Instant::now();
    for _ in 0..(bytes as usize / piece) {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
    }
    let memcpy_s = t.elapsed().as_secs_f64();
    bar.inc(2);
    bar.finish_and_clear();
    let gbs = |s: f64| bytes as f64 / s / 1e9;
    rows.push(Row {
        scenario: "host store (8 x 32 MiB chunks/request)",
        metric: "GB/s".into(),
        kvcoord: gbs(store_s),
        baseline_name: "memcpy",
        baseline: gbs(memcpy_s),
        unit: "GB/s",
    });
    rows.push(Row {
        scenario: "host store (8 x 32 MiB chunks/request)",
        metric: "GB/s".into(),
        kvcoord: gbs(store_s),
        baseline_name: "in-process gather",
        baseline: gbs(gather_s),
        unit: "GB/s",
    });
    rows.push(Row {
        scenario: "host retrieve (8 x 32 MiB chunks/request)",
        metric: "GB/s".into(),
        kvcoord: gbs(retrieve_s),
        baseline_name: "memcpy",
        baseline: gbs(memcpy_s),
        unit: "GB/s",
    });

    println!(
        "kvcoord bench{} ({} MiB moved each way, {} samples per latency)",
        if args.quick { " --quick" } else { "" },
        bytes >> 20,
        n
    );
    println!("{:<44} {:>10} {:>12} {:>18} {:>12} {:>7}", "scenario", "metric", "kvcoord", "baseline", "", "ratio");
    for r in &rows {
        println!(
            "{:<44} {:>10} {:>12.1} {:>18} {:>12.1} {:>7.2}  {}",
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
    if corrupt > 0 {
        eprintln!("kvcoord bench: {corrupt} chunks failed verification");
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

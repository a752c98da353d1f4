//! `kvcoord gpu-check`: the CUDA backend's end-to-end check on a GPU machine.
//! It measures contiguous pinned DMA (the baseline), starts `kvcoord serve
//! --backend cuda`, runs N TP worker processes (`kvcoord gpu-worker`) that
//! register their device KV caches by IPC, and drives them in lock step:
//! a timed store of every chunk, a timed retrieve into other blocks with
//! every byte verified afterwards, then a SIGKILL and restart of the
//! coordinator after which the workers (re-registered by their clients)
//! store, retrieve and verify again. Prints one table; exits non-zero on any
//! failed correctness step.
//!
//! Workers talk to this process over stdin ("go") and stdout (one result line
//! per phase), so each phase starts at once on every worker.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, ExitCode, Stdio};
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::gpu_baselines::{engine_baseline, pinned_dma_baseline};
use crate::gpu_blocks::GpuBlocks;
use crate::pattern::{prefix_hashes, vllm_like_layout};
use crate::tp_worker::TpWorker;
use futures::StreamExt;
use kvcoord_client::{Client, ClientConfig};
use kvcoord_memory::cuda::CopyMethod;
use kvcoord_memory::cuda::CudaDevice;
use kvcoord_transport::{ChunkHash, InstanceKey, RetrieveOutcome, StoreOutcome};

use crate::child::{wait_listening, Server};

/// The environment variable a worker process reads the run's admin token from.
const ADMIN_TOKEN_ENV: &str = "KVCOORD_GPU_CHECK_ADMIN_TOKEN";

const CHUNK_TOKENS: u32 = 256;
const MODEL: &str = "gpu-check-model";

#[derive(clap::Args)]
pub struct GpuCheckArgs {
    /// TP worker processes.
    #[arg(long, default_value_t = 2)]
    procs: u32,
    /// Chunks (32 MiB each) every worker stores and retrieves in the timed phases.
    #[arg(long, default_value_t = 64)]
    chunks: u32,
    /// Requests (one chunk each) every worker keeps in flight.
    #[arg(long, default_value_t = 8)]
    inflight: usize,
    /// Timed store + retrieve rounds (L1 is cleared between rounds).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Timed stores carry no "KV ready" event (to measure what waiting on
    /// one costs; the data is written and synchronised before the clock).
    #[arg(long)]
    no_ready_event: bool,
    /// Put worker r on device r mod (device count) instead of all on device 0.
    #[arg(long)]
    spread: bool,
    /// CUDA streams per direction of the coordinator's GPU workers.
    #[arg(long, default_value_t = 2)]
    gpu_streams: u32,
    /// The coordinator's GPU copy method.
    #[arg(long, value_enum, default_value_t = kvcoord::config::GpuCopy::Staged)]
    gpu_copy: kvcoord::config::GpuCopy,
    /// Only measure the copy engine alone with batched DMA (`cuMemcpyBatchAsync`)
    /// beside the kernel and the contiguous DMA baseline, then exit.
    #[arg(long, hide = true)]
    probe_dma_batch: bool,
    /// Bytes of the contiguous DMA baseline copy.
    #[arg(long, default_value_t = 1 << 30)]
    dma_bytes: usize,
}

#[derive(clap::Args)]
pub struct GpuWorkerArgs {
    #[arg(long)]
    socket: PathBuf,
    #[arg(long)]
    engine: u64,
    #[arg(long)]
    rank: u32,
    #[arg(long)]
    world_size: u32,
    #[arg(long)]
    device: i32,
    #[arg(long)]
    chunks: u32,
    #[arg(long)]
    inflight: usize,
    #[arg(long)]
    rounds: u32,
    #[arg(long)]
    no_ready_event: bool,
}

struct WorkerProc {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl WorkerProc {
    fn go(&mut self) -> std::io::Result<()> {
        writeln!(self.stdin, "go")?;
        self.stdin.flush()
    }

    /// The next line starting with `tag`, split in words after it.
    fn expect(&mut self, tag: &str) -> Result<Vec<String>, String> {
        let mut line = String::new();
        loop {
            line.clear();
            if self.stdout.read_line(&mut line).map_err(|e| e.to_string())? == 0 {
                return Err(format!("worker exited while waiting for `{tag}`"));
            }
            if let Some(rest) = line.trim().strip_prefix(tag) {
                return Ok(rest.split_whitespace().map(str::to_string).collect());
            }
            if let Some(err) = line.trim().strip_prefix("error") {
                return Err(format!("worker: {err}"));
            }
        }
    }
}

impl Drop for WorkerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn num(words: &[String], key: &str) -> f64 {
    words.iter().position(|w| w == key).and_then(|i| words.get(i + 1)).and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
}

pub fn run(args: GpuCheckArgs) -> ExitCode {
    match check(args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("kvcoord gpu-check: {e}");
            ExitCode::from(1)
        }
    }
}

fn check(args: GpuCheckArgs) -> Result<bool, String> {
    if !kvcoord_memory::cuda::driver_present() {
        println!("skipped: no CUDA driver");
        return Ok(true);
    }
    let devices = CudaDevice::all().map_err(|e| e.to_string())?;
    if devices.is_empty() {
        println!("skipped: no CUDA device");
        return Ok(true);
    }
    let used: Vec<usize> = if args.spread { (0..devices.len().min(args.procs as usize)).collect() } else { vec![0] };
    println!(
        "# kvcoord gpu-check: {} worker processes, {} chunk(s) of 32 MiB each, {} in flight",
        args.procs, args.chunks, args.inflight
    );
    let mut dma = (0.0, 0.0);
    let mut engine_alone = (0.0, 0.0);
    for &i in &used {
        let d = &devices[i];
        let (d2h, h2d) = pinned_dma_baseline(d, args.dma_bytes, 5).map_err(|e| e.to_string())?;
        println!(
            "device {i}: {} {}  contiguous pinned DMA: D2H {d2h:.1} GB/s, H2D {h2d:.1} GB/s",
            d.name(),
            d.uuid_string()
        );
        for method in [CopyMethod::Direct, CopyMethod::Staged] {
            let streams = args.gpu_streams as usize;
            let (g, s) =
                engine_baseline(d, method, streams, args.dma_bytes, 32 << 10, 1024, 5).map_err(|e| e.to_string())?;
            println!(
                "device {i}: copy engine alone, {method:?} (32 KiB blocks, 1024 per job): gather {g:.1} GB/s, scatter {s:.1} GB/s"
            );
            if method == args.gpu_copy.method() {
                engine_alone = (engine_alone.0 + g, engine_alone.1 + s);
            }
        }
        dma = (dma.0 + d2h, dma.1 + h2d);
    }
    if args.probe_dma_batch {
        for &i in &used {
            let (g, s) = engine_baseline(
                &devices[i],
                CopyMethod::DmaBatch,
                args.gpu_streams as usize,
                args.dma_bytes,
                32 << 10,
                1024,
                5,
            )
            .map_err(|e| e.to_string())?;
            println!("device {i}: batched DMA alone (32 KiB blocks, 1024 per batch): gather {g:.1} GB/s, scatter {s:.1} GB/s");
        }
        return Ok(true);
    }
    drop(devices);

    let dir = std::env::temp_dir().join(format!("kvcoord-memory-check-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let socket = dir.join("kv.sock");
    let log = dir.join("server.log");
    let object = 32u64 << 20;
    let l1 = (args.procs as u64 * (args.chunks as u64 + 16) * object).next_multiple_of(1 << 30);
    let l1_arg = format!("{}MiB", l1 >> 20);
    let streams = args.gpu_streams.to_string();
    let copy = format!("{:?}", args.gpu_copy).to_lowercase();
    // Rank 0 clears L1 between rounds: a privileged request, so the workers
    // connect with this run's admin token (given to them in the environment).
    let admin_token = format!("{:032x}", rand::random::<u128>());
    let server_args = [
        "--admin-token",
        &admin_token,
        "--backend",
        "cuda",
        "--l1-size",
        &l1_arg,
        "--l1-prealloc",
        "--grace-ms",
        "30000",
        "--gpu-streams",
        &streams,
        "--gpu-copy",
        &copy,
    ];
    let start_server = || -> Result<Server, String> {
        let t = Instant::now();
        let s = Server::start(&socket, &log, &server_args).map_err(|e| e.to_string())?;
        if !wait_listening(&socket, Duration::from_secs(120)) {
            return Err(format!("the coordinator did not start; log: {}", log.display()));
        }
        println!("coordinator up in {:.2} s (L1 {} GiB pinned at start)", t.elapsed().as_secs_f64(), l1 >> 30);
        Ok(s)
    };
    let mut server = start_server()?;
    let engine = rand::random::<u64>() >> 1;
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut workers = Vec::new();
    for rank in 0..args.procs {
        let device = if args.spread { used[rank as usize % used.len()] } else { 0 };
        let mut child = Command::new(&exe)
            .args(["gpu-worker", "--socket"])
            .arg(&socket)
            .args(["--engine", &engine.to_string(), "--rank", &rank.to_string()])
            .args(["--world-size", &args.procs.to_string(), "--device", &device.to_string()])
            .args(["--chunks", &args.chunks.to_string(), "--inflight", &args.inflight.to_string()])
            .args(["--rounds", &args.rounds.to_string()])
            .env(ADMIN_TOKEN_ENV, &admin_token)
            .args(if args.no_ready_event { &["--no-ready-event"][..] } else { &[][..] })
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let stdin = child.stdin.take().expect("piped");
        let stdout = BufReader::new(child.stdout.take().expect("piped"));
        workers.push(WorkerProc { child, stdin, stdout });
    }
    for w in &mut workers {
        w.expect("ready")?;
    }
    let mut ok = true;
    let phase = |workers: &mut Vec<WorkerProc>, tag: &str| -> Result<Vec<Vec<String>>, String> {
        for w in workers.iter_mut() {
            w.go().map_err(|e| e.to_string())?;
        }
        workers.iter_mut().map(|w| w.expect(tag)).collect()
    };
    // Each phase's rate is over its whole window, first start to last end,
    // from the workers' wall clocks (one machine, one clock); a direction's
    // rate is its bytes over the sum of its windows in every round.
    let window = |lines: &[Vec<String>]| -> (f64, f64, f64) {
        let bytes: f64 = lines.iter().map(|l| num(l, "bytes")).sum();
        let start = lines.iter().map(|l| num(l, "start")).fold(f64::INFINITY, f64::min);
        let end = lines.iter().map(|l| num(l, "end")).fold(0.0, f64::max);
        let failed: f64 = lines.iter().map(|l| num(l, "failed")).sum();
        (bytes, end - start, failed)
    };
    let (mut store, mut retrieve) = ((0.0, 0.0), (0.0, 0.0));
    let expected = args.procs as f64 * args.chunks as f64 * object as f64;
    for round in 0..args.rounds {
        let stored = phase(&mut workers, "stored")?;
        let (sb, ss, sf) = window(&stored);
        for w in &mut workers {
            w.expect("prepared")?;
        }
        let retrieved = phase(&mut workers, "retrieved")?;
        let (rb, rs, rf) = window(&retrieved);
        let verified: f64 = retrieved.iter().map(|l| num(l, "verified")).sum();
        let corrupt: f64 = retrieved.iter().map(|l| num(l, "corrupt")).sum();
        let good = sf == 0.0 && rf == 0.0 && corrupt == 0.0 && verified == expected;
        println!(
            "round {round}: store {:.2} GiB in {:.1} ms ({:.1} GB/s), retrieve in {:.1} ms ({:.1} GB/s); \
             {:.2} GiB verified byte for byte, {sf} failed store(s), {rf} failed retrieve(s), {corrupt} corrupt chunk(s): {}",
            sb / (1u64 << 30) as f64,
            ss * 1e3,
            sb / ss / 1e9,
            rs * 1e3,
            rb / rs / 1e9,
            verified / (1u64 << 30) as f64,
            if good { "ok" } else { "FAIL" }
        );
        ok &= good;
        store = (store.0 + sb, store.1 + ss);
        retrieve = (retrieve.0 + rb, retrieve.1 + rs);
        phase(&mut workers, "cleared")?;
    }
    let store_gbps = store.0 / store.1 / 1e9;
    let retrieve_gbps = retrieve.0 / retrieve.1 / 1e9;

    server.kill();
    println!("coordinator SIGKILLed");
    let _server = start_server()?;
    let restarted = phase(&mut workers, "restart")?;
    for (rank, l) in restarted.iter().enumerate() {
        let good = num(l, "corrupt") == 0.0 && num(l, "verified") > 0.0 && num(l, "reregistrations") >= 1.0;
        println!(
            "after restart, rank {rank}: re-registered {} time(s), first store after {:.0} ms, {:.0} MiB verified, {} corrupt: {}",
            num(l, "reregistrations"),
            num(l, "first_store_ms"),
            num(l, "verified") / (1 << 20) as f64,
            num(l, "corrupt"),
            if good { "ok" } else { "FAIL" }
        );
        ok &= good;
    }
    println!();
    println!("| copy | GB/s | vs contiguous pinned DMA |");
    println!("| --- | --- | --- |");
    println!("| contiguous pinned DMA D2H (sum over {} device(s)) | {:.1} | 1.00 |", used.len(), dma.0);
    println!("| contiguous pinned DMA H2D (sum over {} device(s)) | {:.1} | 1.00 |", used.len(), dma.1);
    println!("| copy engine alone, gather (no coordinator) | {:.1} | {:.2} |", engine_alone.0, engine_alone.0 / dma.0);
    println!("| copy engine alone, scatter (no coordinator) | {:.1} | {:.2} |", engine_alone.1, engine_alone.1 / dma.1);
    println!("| kvcoord store (device blocks -> L1), end to end | {store_gbps:.1} | {:.2} |", store_gbps / dma.0);
    println!(
        "| kvcoord retrieve (L1 -> device blocks), end to end | {retrieve_gbps:.1} | {:.2} |",
        retrieve_gbps / dma.1
    );
    println!();
    println!("{}", if ok { "gpu-check: PASS" } else { "gpu-check: FAIL" });
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ok)
}

/// One worker process of `gpu-check`.
pub fn worker(args: GpuWorkerArgs) -> ExitCode {
    let code = actix_rt::System::new().block_on(async move {
        match worker_phases(args).await {
            Ok(()) => 0,
            Err(e) => {
                println!("error {e}");
                1
            }
        }
    });
    ExitCode::from(code)
}

fn wait_go() -> Result<(), String> {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).map_err(|e| e.to_string())?;
    if line.trim() == "go" {
        Ok(())
    } else {
        Err("the check went away".into())
    }
}

fn wall_secs() -> f64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0)
}

/// Runs `futs` with `inflight` at a time; returns results and the wall-clock
/// start and end (seconds since the epoch).
async fn timed<T, F: std::future::Future<Output = T>>(futs: Vec<F>, inflight: usize) -> (Vec<T>, f64, f64) {
    let start = wall_secs();
    let out = futures::stream::iter(futs).buffered(inflight.max(1)).collect::<Vec<T>>().await;
    (out, start, wall_secs())
}

async fn worker_phases(args: GpuWorkerArgs) -> Result<(), String> {
    let device = CudaDevice::open(args.device).map_err(|e| e.to_string())?;
    let key = InstanceKey { engine: args.engine, rank: args.rank };
    let chunks = args.chunks as usize;
    let layout = vllm_like_layout(((2 * chunks + 8) * 16) as u32);
    let mut config = ClientConfig::new(kvcoord_transport::Endpoint::Unix(args.socket.clone()));
    config.token = std::env::var(ADMIN_TOKEN_ENV).ok();
    let client = Client::start(config);
    let staging_bytes = layout.chunk_object_bytes(16) as usize * chunks;
    let blocks = GpuBlocks::allocate(device, layout, staging_bytes).map_err(|e| e.to_string())?;
    let mut w = TpWorker::register_blocks(client, blocks, key, (MODEL, args.world_size), CHUNK_TOKENS)
        .await
        .map_err(|e| format!("register: {e}"))?;
    let bytes_per_chunk = layout.chunk_object_bytes(16);

    // Warm up (kernel JIT, first launches) on a prompt of its own.
    let warm = prefix_hashes(MODEL, args.engine, 1 << 40, 2, CHUNK_TOKENS);
    let (warm_blocks, _) = w.store_prefix(&warm).await.map_err(|e| format!("warm-up store: {e}"))?;
    w.retrieve_and_verify(&warm, &warm_blocks, None).await.map_err(|e| e.to_string())?;

    // The timed prompt's data is in the KV cache before the clock starts.
    let hashes = prefix_hashes(MODEL, args.engine, 0, chunks, CHUNK_TOKENS);
    let blocks = w.pick_blocks(chunks, &warm_blocks);
    w.write_chunks(&hashes, &blocks).map_err(|e| e.to_string())?;
    w.blocks.cache.synchronize().map_err(|e| e.to_string())?;
    println!("ready");

    let mut w = Rc::new(w);
    let no_ready_event = args.no_ready_event;
    for round in 0..args.rounds {
        wait_go()?;
        let stores = (0..chunks).map(|c| {
            let (w, h, b) = (w.clone(), vec![hashes[c]], blocks[c * 16..(c + 1) * 16].to_vec());
            async move {
                if no_ready_event {
                    // The data is on the device already (synchronised above).
                    w.client.store(w.key, h, b).await
                } else {
                    w.store(&h, &b).await
                }
            }
        });
        let (results, start, end) = timed(stores.collect(), args.inflight).await;
        let failed = results.iter().filter(|r| !matches!(r.as_deref(), Ok([StoreOutcome::Stored]))).count();
        println!("stored bytes {} start {start:.6} end {end:.6} failed {failed}", bytes_per_chunk * chunks as u64);
        drop(results);

        // Retrieve targets are scribbled before the clock starts.
        let mut inner = Rc::try_unwrap(w).map_err(|_| "worker still shared")?;
        let mut avoid = blocks.clone();
        avoid.extend(&warm_blocks);
        let targets = inner.pick_blocks(chunks, &avoid);
        inner.scribble(&targets).map_err(|e| e.to_string())?;
        w = Rc::new(inner);
        println!("prepared");
        wait_go()?;
        let retrieves = (0..chunks).map(|c| {
            let (w, h, b) = (w.clone(), vec![hashes[c]], targets[c * 16..(c + 1) * 16].to_vec());
            async move { w.client.retrieve(w.key, h, b, None).await }
        });
        let (results, start, end) = timed(retrieves.collect(), args.inflight).await;
        let failed = results.iter().filter(|r| r.error.is_some() || r.outcomes != [RetrieveOutcome::Retrieved]).count();
        let v = Rc::get_mut(&mut w).ok_or("worker still shared")?.verify_chunks(&hashes, &targets, chunks);
        let v = v.map_err(|e| e.to_string())?;
        println!(
            "retrieved bytes {} start {start:.6} end {end:.6} failed {failed} verified {} corrupt {}",
            bytes_per_chunk * chunks as u64,
            v.bytes_verified,
            v.corrupt_chunks
        );
        // Empty L1 so that the next round's stores copy again.
        wait_go()?;
        if args.rank == 0 {
            w.client.clear().await.map_err(|e| format!("clear after round {round}: {e}"))?;
        }
        println!("cleared");
    }

    // The coordinator is SIGKILLed and restarted before this "go".
    wait_go()?;
    let mut w = Rc::try_unwrap(w).map_err(|_| "worker still shared")?;
    let again: Vec<ChunkHash> = prefix_hashes(MODEL, args.engine, 2, 4, CHUNK_TOKENS);
    let t = Instant::now();
    let stored = loop {
        // The client fails fast while it reconnects; the engine would
        // recompute. Retry until the new coordinator answers.
        match w.store_prefix(&again).await {
            Ok((b, o)) if o.iter().all(|o| *o == StoreOutcome::Stored) => break b,
            _ if t.elapsed() < Duration::from_secs(60) => tokio::time::sleep(Duration::from_millis(20)).await,
            Ok((_, o)) => return Err(format!("store after restart: {o:?}")),
            Err(e) => return Err(format!("store after restart: {e}")),
        }
    };
    let first_store_ms = t.elapsed().as_secs_f64() * 1e3;
    let (r, v) = w.retrieve_and_verify(&again, &stored, None).await.map_err(|e| e.to_string())?;
    if let Some(e) = r.error {
        return Err(format!("retrieve after restart: {e}"));
    }
    println!(
        "restart reregistrations {} first_store_ms {first_store_ms:.1} verified {} corrupt {}",
        w.client.reregistrations(),
        v.bytes_verified,
        v.corrupt_chunks
    );
    Ok(())
}

//! `kvcoord demo`: the main job on an embedded default. Starts `kvcoord
//! serve` as a child process on a private socket, runs W TP worker clients
//! (one engine, world size W) through a prefix-caching workload, SIGKILLs the
//! coordinator mid-run, keeps the workload going through the outage, starts
//! the coordinator again and reports how the clients recovered.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::pattern::prefix_hashes;
use crate::tp_worker::TpWorker;
use kvcoord_client::{Client, ClientConfig};
use kvcoord_memory::{Dtype, KvLayout};
use kvcoord_transport::{Endpoint, InstanceKey, StoreOutcome};

use crate::child::{wait_listening, Server};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// TP worker clients (ranks of one engine).
    #[arg(long, default_value_t = 4)]
    workers: u32,
    /// Workload rounds (each: store a prompt on every rank, look it up,
    /// retrieve it into other blocks and verify).
    #[arg(long, default_value_t = 40)]
    rounds: u64,
    /// Chunks (256 tokens each) per prompt.
    #[arg(long, default_value_t = 4)]
    chunks: usize,
    /// Rounds run while the coordinator is down.
    #[arg(long, default_value_t = 3)]
    outage_rounds: u64,
}

#[derive(Default)]
struct Tally {
    stores_ok: u64,
    stores_failed: u64,
    lookups: u64,
    lookup_misses_from_errors: u64,
    retrieves_ok: u64,
    retrieves_failed: u64,
    bytes_verified: u64,
    corrupt_chunks: u64,
    slowest_request: Duration,
}

async fn round(workers: &mut [TpWorker], hashes: &[kvcoord_transport::ChunkHash], t: &mut Tally) {
    let started = Instant::now();
    let stores = futures::future::join_all(workers.iter_mut().map(|w| w.store_prefix(hashes))).await;
    let mut placed = Vec::new();
    for s in stores {
        match s {
            Ok((blocks, outcomes)) if outcomes.iter().all(|o| *o != StoreOutcome::SkippedNoMemory) => {
                t.stores_ok += 1;
                placed.push(blocks);
            }
            Ok((blocks, _)) => {
                t.stores_failed += 1;
                placed.push(blocks);
            }
            Err(_) => {
                t.stores_failed += 1;
                placed.push(Vec::new());
            }
        }
    }
    let found = workers[0].client.lookup(workers[0].key, hashes.to_vec(), true).await;
    t.lookups += 1;
    if found.error.is_some() {
        t.lookup_misses_from_errors += 1;
    }
    let n = found.chunks as usize;
    if n > 0 {
        let lease = found.lease;
        let retrieves = futures::future::join_all(
            workers.iter_mut().zip(&placed).map(|(w, avoid)| w.retrieve_and_verify(&hashes[..n], avoid, lease)),
        )
        .await;
        for (r, v) in retrieves.into_iter().map(|r| r.expect("the worker reads its own blocks")) {
            if r.error.is_none() && v.chunks_retrieved == n {
                t.retrieves_ok += 1;
            } else {
                t.retrieves_failed += 1;
            }
            t.bytes_verified += v.bytes_verified;
            t.corrupt_chunks += v.corrupt_chunks as u64;
        }
    }
    t.slowest_request = t.slowest_request.max(started.elapsed());
}

pub fn run(args: DemoArgs) -> ExitCode {
    let dir = std::env::temp_dir().join(format!("kvcoord-demo-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("kvcoord demo: {e}");
        return ExitCode::from(1);
    }
    let code = actix_rt::System::new().block_on(demo(args, dir.clone()));
    let _ = std::fs::remove_dir_all(&dir);
    code
}

async fn demo(args: DemoArgs, dir: PathBuf) -> ExitCode {
    let socket = dir.join("kv.sock");
    let log = dir.join("server.log");
    let fail = |msg: &str| {
        eprintln!("kvcoord demo: {msg}");
        ExitCode::from(1)
    };
    let mut server = match Server::start(&socket, &log, &["--l1-size", "1GiB", "--grace-ms", "5000"]) {
        Ok(s) => s,
        Err(e) => return fail(&format!("cannot start the coordinator: {e}")),
    };
    if !wait_listening(&socket, Duration::from_secs(10)) {
        return fail("the coordinator did not start listening");
    }
    // 8 layers x 256 blocks of 16 tokens x 8 heads x 64 (bf16): 64 MiB per rank,
    // 4 MiB per 256-token chunk.
    let layout = KvLayout::mha(8, 256, 16, 8, 64, Dtype::Bf16);
    let engine = rand::random::<u64>();
    let mut workers = Vec::new();
    for rank in 0..args.workers {
        let mut cfg = ClientConfig::new(Endpoint::Unix(socket.clone()));
        cfg.request_timeout = Duration::from_secs(5);
        let client = Client::start(cfg);
        match TpWorker::register(client, InstanceKey { engine, rank }, "demo-model", args.workers, layout, 256).await {
            Ok(w) => workers.push(w),
            Err(e) => return fail(&format!("rank {rank} could not register: {e}")),
        }
    }
    let bar = indicatif::ProgressBar::new(args.rounds);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} [{bar:40}] {pos}/{len} rounds  {msg}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    let kill_at = args.rounds / 2;
    let (mut before, mut outage, mut after) = (Tally::default(), Tally::default(), Tally::default());
    let mut recovery = None;
    for r in 0..args.rounds {
        // Every third round asks again for an earlier prompt: a cache hit.
        let prompt = if r % 3 == 2 { r - 2 } else { r };
        let hashes = prefix_hashes("demo-model", engine, prompt, args.chunks, 256);
        if r == kill_at {
            bar.set_message("SIGKILL coordinator");
            server.kill();
            for o in 0..args.outage_rounds {
                let hashes = prefix_hashes("demo-model", engine, 10_000 + o, args.chunks, 256);
                round(&mut workers, &hashes, &mut outage).await;
            }
            bar.set_message("restarting coordinator");
            let restarted_at = Instant::now();
            server = match Server::start(&socket, &log, &["--l1-size", "1GiB", "--grace-ms", "5000"]) {
                Ok(s) => s,
                Err(e) => return fail(&format!("cannot restart the coordinator: {e}")),
            };
            let limit = Duration::from_secs(30);
            while workers.iter().any(|w| w.client.reregistrations() == 0) && restarted_at.elapsed() < limit {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            if workers.iter().any(|w| w.client.reregistrations() == 0) {
                return fail("clients did not register again within 30 s");
            }
            recovery = Some(restarted_at.elapsed());
            bar.set_message(format!("all {} clients registered again", workers.len()));
        }
        round(&mut workers, &hashes, if r < kill_at { &mut before } else { &mut after }).await;
        bar.inc(1);
    }
    bar.finish_and_clear();
    let stats = workers[0].client.stats().await;
    println!(
        "kvcoord demo: {} TP workers, {} rounds, {} chunks of 256 tokens per prompt",
        args.workers, args.rounds, args.chunks
    );
    println!("{:<26} {:>10} {:>10} {:>10}", "", "before", "outage", "after");
    let row = |name: &str, f: &dyn Fn(&Tally) -> String| {
        println!("{:<26} {:>10} {:>10} {:>10}", name, f(&before), f(&outage), f(&after));
    };
    row("stores ok", &|t| t.stores_ok.to_string());
    row("stores failed (fast)", &|t| t.stores_failed.to_string());
    row("lookups", &|t| t.lookups.to_string());
    row("lookups missed on error", &|t| t.lookup_misses_from_errors.to_string());
    row("retrieves ok", &|t| t.retrieves_ok.to_string());
    row("retrieves failed", &|t| t.retrieves_failed.to_string());
    row("slowest round (ms)", &|t| t.slowest_request.as_millis().to_string());
    row("bytes verified", &|t| t.bytes_verified.to_string());
    row("corrupt chunks", &|t| t.corrupt_chunks.to_string());
    let recovery = recovery.unwrap_or_default();
    println!("restart -> all {} clients registered again: {:.1} ms", workers.len(), recovery.as_secs_f64() * 1e3);
    let rereg: Vec<u64> = workers.iter().map(|w| w.client.reregistrations()).collect();
    println!("re-registration rounds per client: {rereg:?}");
    if let Ok(s) = stats {
        println!(
            "server after restart: epoch {:016x}, {} instances, {} objects, {} MiB of L1 used",
            s.epoch,
            s.instances,
            s.objects,
            s.l1_used >> 20
        );
    }
    let corrupt = before.corrupt_chunks + outage.corrupt_chunks + after.corrupt_chunks;
    let verified = before.bytes_verified + after.bytes_verified;
    if corrupt > 0 || after.retrieves_ok == 0 || before.retrieves_ok == 0 || verified == 0 {
        return fail("the workload did not verify (see the table)");
    }
    println!("OK: every request resolved, no corrupt byte, {} MiB verified", verified >> 20);
    ExitCode::SUCCESS
}

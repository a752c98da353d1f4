//! TP worker clients as separate processes.
//!
//! The parent starts a coordinator embedded in itself (or uses `--connect
//! SOCKET`), then launches W copies of itself as TP worker processes. Each
//! worker allocates its paged KV cache in shared memory filled with a
//! deterministic per-rank pattern, registers it, stores a set of prompts,
//! looks them up (hits must cover every rank), retrieves them into
//! *different* blocks and verifies every byte. The parent prints a summary
//! and exits 0 only if every worker verified.
//!
//! With `--seed S` the prompts (their chunk hashes, hence every byte, which
//! is a function of chunk hash and rank) are the same in every run, so two
//! runs can split the work across coordinators that share a remote tier:
//! `--store-only` stores and exits; `--retrieve-only` (a run against another
//! coordinator) waits until every rank's chunks are found, retrieves them and
//! verifies every byte.
//!
//! `cargo run --release --example tp_workers -- [--workers 4] [--prompts 8] [--connect SOCKET]
//! [--seed S] [--store-only | --retrieve-only]`

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use kvcoord::{Coordinator, ServerConfig};
use kvcoord_client::{Client, ClientConfig};
use kvcoord_harness::{prefix_hashes, TpWorker};
use kvcoord_memory::{Dtype, KvLayout};
use kvcoord_transport::{Endpoint, InstanceKey};

const CHUNKS: usize = 4;

/// What a worker does with its prompts.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Store, look up, retrieve and verify.
    Both,
    /// Store only.
    Store,
    /// Look up, retrieve and verify chunks stored by an earlier run.
    Retrieve,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Both => "both",
            Mode::Store => "store",
            Mode::Retrieve => "retrieve",
        }
    }
    fn parse(s: &str) -> Mode {
        match s {
            "store" => Mode::Store,
            "retrieve" => Mode::Retrieve,
            _ => Mode::Both,
        }
    }
}

fn flag(name: &str) -> bool {
    std::env::args().any(|a| a == name)
}

fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1).cloned())
}

fn layout() -> KvLayout {
    KvLayout::mha(16, 256, 16, 8, 64, Dtype::Bf16)
}

/// One TP worker process: prints `verified <bytes> corrupt <n> hits <n>`.
/// Prompts are `seed`'s (the chunk hashes, hence every byte).
fn worker(socket: PathBuf, (engine, seed): (u64, u64), rank: u32, world: u32, prompts: u64, mode: Mode) -> i32 {
    actix_rt::System::new().block_on(async move {
        let client = Client::start(ClientConfig::new(Endpoint::Unix(socket)));
        let key = InstanceKey { engine, rank };
        let mut w = match TpWorker::register(client, key, "tp-model", world, layout(), 256).await {
            Ok(w) => w,
            Err(e) => {
                eprintln!("rank {rank}: register failed: {e}");
                return 1;
            }
        };
        let mut placed = Vec::new();
        for p in (0..prompts).filter(|_| mode != Mode::Retrieve) {
            let hashes = prefix_hashes("tp-model", seed, p, CHUNKS, 256);
            match w.store_prefix(&hashes).await {
                Ok((blocks, _)) => placed.push(blocks),
                Err(e) => {
                    eprintln!("rank {rank}: store failed: {e}");
                    return 1;
                }
            }
        }
        if mode == Mode::Store {
            println!("verified 0 corrupt 0 hits {}", placed.len() * CHUNKS);
            return 0;
        }
        if mode == Mode::Retrieve {
            placed = vec![Vec::new(); prompts as usize];
        }
        // Lookups count a chunk only when every rank holds it: wait for peers
        // (and, after another run stored them, for the remote tier).
        let (mut hits, mut verified, mut corrupt) = (0u64, 0u64, 0u64);
        for (p, avoid) in placed.iter().enumerate() {
            let hashes = prefix_hashes("tp-model", seed, p as u64, CHUNKS, 256);
            let start = Instant::now();
            let mut found = w.client.lookup(key, hashes.clone(), true).await;
            while (found.chunks as usize) < CHUNKS && start.elapsed() < Duration::from_secs(20) {
                tokio::time::sleep(Duration::from_millis(10)).await;
                if let Some(l) = found.lease {
                    let _ = w.client.release_lease(l).await;
                }
                found = w.client.lookup(key, hashes.clone(), true).await;
            }
            hits += found.chunks as u64;
            let (_, v) = w.retrieve_and_verify(&hashes[..found.chunks as usize], avoid, found.lease).await.unwrap();
            verified += v.bytes_verified;
            corrupt += v.corrupt_chunks as u64;
        }
        println!("verified {verified} corrupt {corrupt} hits {hits}");
        i32::from(corrupt > 0 || hits != prompts * CHUNKS as u64)
    })
}

fn main() {
    if let Some(rank) = arg("--rank") {
        let code = worker(
            arg("--socket").expect("--socket").into(),
            (
                arg("--engine").expect("--engine").parse().expect("engine"),
                arg("--seed").expect("--seed").parse().expect("seed"),
            ),
            rank.parse().expect("rank"),
            arg("--world").expect("--world").parse().expect("world"),
            arg("--prompts").expect("--prompts").parse().expect("prompts"),
            Mode::parse(&arg("--mode").unwrap_or_default()),
        );
        std::process::exit(code);
    }
    let workers: u32 = arg("--workers").map(|w| w.parse().expect("--workers N")).unwrap_or(4);
    let prompts: u64 = arg("--prompts").map(|w| w.parse().expect("--prompts N")).unwrap_or(8);
    let mode = match (flag("--store-only"), flag("--retrieve-only")) {
        (true, true) => {
            eprintln!("--store-only and --retrieve-only exclude each other");
            std::process::exit(2);
        }
        (true, false) => Mode::Store,
        (false, true) => Mode::Retrieve,
        (false, false) => Mode::Both,
    };
    if mode != Mode::Both && arg("--connect").is_none() {
        eprintln!("--store-only and --retrieve-only need --connect SOCKET (a coordinator that outlives this run)");
        std::process::exit(2);
    }
    let engine: u64 = rand::random();
    let seed: u64 = arg("--seed").map(|s| s.parse().expect("--seed N")).unwrap_or(engine);
    let dir = tempfile::tempdir().expect("temp dir");
    let socket = arg("--connect").map(PathBuf::from).unwrap_or_else(|| dir.path().join("kv.sock"));
    let embedded = arg("--connect").is_none();

    // The embedded coordinator runs on its own thread with its own actix System.
    if embedded {
        let config = ServerConfig {
            socket: socket.clone(),
            l1_size: bytesize::ByteSize::gib(1),
            admin: "off".into(),
            ..Default::default()
        };
        std::thread::spawn(move || {
            actix_rt::System::new().block_on(async move {
                let _c = Coordinator::start(config).await.expect("coordinator starts");
                futures::future::pending::<()>().await;
            })
        });
        let start = Instant::now();
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(start.elapsed() < Duration::from_secs(10), "coordinator did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let exe = std::env::current_exe().expect("own path");
    let started = Instant::now();
    let children: Vec<_> = (0..workers)
        .map(|rank| {
            Command::new(&exe)
                .arg("--socket")
                .arg(&socket)
                .args(["--engine", &engine.to_string(), "--rank", &rank.to_string()])
                .args(["--seed", &seed.to_string(), "--mode", mode.name()])
                .args(["--world", &workers.to_string(), "--prompts", &prompts.to_string()])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("spawn a worker process")
        })
        .collect();
    let children: Vec<_> = children
        .into_iter()
        .enumerate()
        .map(|(rank, c)| (rank, c.wait_with_output().expect("worker output")))
        .collect();
    let mut ok = true;
    let mut total = 0u64;
    println!("{:<6} {:>14} {:>8} {:>6}", "rank", "bytes verified", "corrupt", "hits");
    for (rank, out) in &children {
        let line = String::from_utf8_lossy(&out.stdout);
        let f: Vec<&str> = line.split_whitespace().collect();
        if !out.status.success() || f.len() != 6 {
            ok = false;
            eprintln!("rank {rank} failed: {}{}", line, String::from_utf8_lossy(&out.stderr));
            continue;
        }
        total += f[1].parse::<u64>().unwrap_or(0);
        println!("{:<6} {:>14} {:>8} {:>6}", rank, f[1], f[3], f[5]);
    }
    let what = match mode {
        Mode::Store => "stored (seed {seed})",
        _ => "verified byte for byte",
    };
    println!(
        "{} TP worker processes, {} prompts x {} chunks each: {} MiB {} in {:.2} s -> {}",
        workers,
        prompts,
        CHUNKS,
        if mode == Mode::Store {
            (workers as u64 * prompts * CHUNKS as u64 * layout().chunk_object_bytes(16)) >> 20
        } else {
            total >> 20
        },
        what.replace("{seed}", &seed.to_string()),
        started.elapsed().as_secs_f64(),
        if ok { "OK" } else { "FAILED" }
    );
    std::process::exit(if ok { 0 } else { 1 });
}

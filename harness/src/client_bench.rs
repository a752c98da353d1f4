//! `kvcoord-harness client-bench`: the Rust side of the Python-vs-Rust client
//! benchmark (`python/benches/client_vs_rust.py` runs both against the same
//! coordinator, one after the other, and prints them side by side).
//!
//! One TP worker on a host KV cache of `[layers, 2, blocks, 16, 8, 128]`
//! bf16 (the layout the Python side builds with `shared_tensor`) stores
//! `chunks` 256-token chunks per request from random blocks, retrieves them
//! into other blocks (verified after the clock), and looks up 64 chunks one
//! at a time with `LookupModel` (what the Python client's `lookup` sends).
//! Prints one JSON line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use kvcoord_client::{Client, ClientConfig};
use kvcoord_memory::{Dtype, KvLayout};
use kvcoord_transport::{Endpoint, InstanceKey, StoreOutcome};

use crate::pattern::prefix_hashes;
use crate::tp_worker::TpWorker;

#[derive(clap::Args)]
pub struct ClientBenchArgs {
    #[arg(long)]
    socket: PathBuf,
    #[arg(long, default_value_t = 32)]
    layers: u32,
    #[arg(long, default_value_t = 512)]
    blocks: u32,
    /// Chunks per store or retrieve request.
    #[arg(long, default_value_t = 8)]
    chunks: usize,
    /// Timed rounds (after one warm-up round).
    #[arg(long, default_value_t = 10)]
    rounds: u64,
    /// Lookups timed one at a time.
    #[arg(long, default_value_t = 2000)]
    lookups: usize,
    #[arg(long, default_value_t = 7100)]
    engine: u64,
}

pub fn run(args: ClientBenchArgs) -> ExitCode {
    match actix_rt::System::new().block_on(bench(args)) {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("client-bench: {e}");
            ExitCode::from(1)
        }
    }
}

async fn bench(args: ClientBenchArgs) -> Result<String, String> {
    let model = "client-bench";
    let layout = KvLayout::mha(args.layers, args.blocks, 16, 8, 128, Dtype::Bf16);
    let client = Client::start(ClientConfig::new(Endpoint::Unix(args.socket.clone())));
    let key = InstanceKey { engine: args.engine, rank: 0 };
    let mut w = TpWorker::register(client, key, model, 1, layout, 256).await.map_err(|e| e.to_string())?;
    let object_bytes = layout.chunk_object_bytes(16);
    let (mut store_s, mut retrieve_s, mut corrupt) = (0.0, 0.0, 0);
    for round in 0..=args.rounds {
        let hashes = prefix_hashes(model, args.engine, round, args.chunks, 256);
        let blocks = w.pick_blocks(args.chunks, &[]);
        w.write_chunks(&hashes, &blocks).map_err(|e| e.to_string())?;
        let t = Instant::now();
        let stored = w.client.store(key, hashes.clone(), blocks.clone()).await.map_err(|e| e.to_string())?;
        let took = t.elapsed().as_secs_f64();
        if stored.iter().any(|o| *o != StoreOutcome::Stored) {
            return Err(format!("round {round}: {stored:?}"));
        }
        let others = w.pick_blocks(args.chunks, &blocks);
        w.scribble(&others).map_err(|e| e.to_string())?;
        let t = Instant::now();
        let got = w.client.retrieve(key, hashes.clone(), others.clone(), None).await;
        let rtook = t.elapsed().as_secs_f64();
        if let Some(e) = got.error {
            return Err(format!("retrieve: {e}"));
        }
        corrupt += w.verify_chunks(&hashes, &others, got.prefix_retrieved()).map_err(|e| e.to_string())?.corrupt_chunks;
        if round > 0 {
            store_s += took;
            retrieve_s += rtook;
        }
    }
    let lookup = prefix_hashes(model, args.engine, 1 << 30, 64, 256);
    let mut lat = Vec::with_capacity(args.lookups);
    for _ in 0..args.lookups {
        let t = Instant::now();
        let r = w.client.lookup_model(model, 1, lookup.clone(), false).await;
        lat.push(t.elapsed());
        if let Some(e) = r.error {
            return Err(format!("lookup: {e}"));
        }
    }
    lat.sort();
    let p50 = lat[lat.len() / 2].as_secs_f64() * 1e6;
    let bytes = (args.rounds * args.chunks as u64 * object_bytes) as f64;
    let _ = w.client.unregister(key).await;
    w.client.close();
    tokio::time::sleep(Duration::from_millis(10)).await;
    Ok(format!(
        "{{\"client\": \"rust\", \"store_gbs\": {:.3}, \"retrieve_gbs\": {:.3}, \"lookup64_p50_us\": {:.1}, \"corrupt_chunks\": {corrupt}}}",
        bytes / store_s / 1e9,
        bytes / retrieve_s / 1e9,
        p50
    ))
}

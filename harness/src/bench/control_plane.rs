//! Control plane: ping and 64-chunk lookup latency one at a time, and
//! pipelined lookup throughput from one client and from 8 client processes
//! (`kvcoord-harness lookup-load`), through `Client`, beside the echo server
//! reached through the same client.

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use crate::pattern::prefix_hashes;
use kvcoord_client::{Client, ClientConfig};
use kvcoord_memory::{Dtype, HostKvCache, KvLayout, MemoryHandle};
use kvcoord_transport::*;

use super::report::*;

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

/// The client engines use (`kvcoord_client::Client`), connected; the echo
/// baseline is measured through the same client, so both sides pay for it.
pub(crate) async fn connect(socket: &Path) -> Client {
    let client = Client::start(ClientConfig::new(Endpoint::Unix(socket.to_path_buf())));
    let mut link = client.link();
    let _ = tokio::time::timeout(Duration::from_secs(10), link.wait_for(|s| s.connection.is_some())).await;
    client
}

pub(crate) async fn sequential(client: &Client, body: &RequestBody, n: usize) -> Vec<Duration> {
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
pub(crate) async fn pipelined(client: Client, body: RequestBody, window: usize, stop: Instant) -> u64 {
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

pub(crate) async fn register_tiny(client: &Client, key: InstanceKey, world: u32) -> HostKvCache {
    let layout = tiny_layout();
    let cache = HostKvCache::create("bench", layout).expect("memfd");
    let request = RegisterKvCache {
        instance: key,
        model: "bench-model".into(),
        world_size: world,
        layout,
        memory: MemoryHandle::HostFd { size: layout.total_bytes() },
        secret: None,
    };
    client.register(request, Some(cache.fd())).await.expect("register");
    cache
}

pub(crate) fn lookup_body(engine: u64, chunks: Vec<ChunkHash>) -> RequestBody {
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

pub(crate) async fn control_plane(plan: &Plan, socket: &Path, echo: &Path, rows: &mut Vec<Row>) {
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

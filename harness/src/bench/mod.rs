//! `kvcoord-harness bench`: measured speed, each number beside a baseline measured in
//! the same run. The coordinator is a real `kvcoord serve` child process and
//! the clients are the real client (processes where the scenario says so);
//! nothing takes a path production requests do not take.
//!
//! 1. Control plane: ping and 64-chunk lookup latency, one at a time, and
//!    pipelined lookup throughput from 1 client and from 8 client processes,
//!    beside a minimal echo server with the same socket type, handshake and
//!    framing.
//! 2. Host data plane: store and retrieve GB/s (request to verified reply)
//!    with 1 and 4 TP clients, beside memcpy of the same bytes on as many threads
//!    and the same gathers done in-process.
//! 3. Recovery: 8 TP clients under load, SIGKILL at random moments + restart
//!    (200 cycles), time from the new server listening to all 8 registered
//!    again and to the first store: median, p99, max.
//! 4. Index scale: lookups of 1, 64 and 4096-chunk prefixes against an index
//!    of many chunk entries, and resident memory per entry.
//! 5. Disk tier: lookup hit rate and retrieve GB/s after a SIGKILL + restart,
//!    beside the same before the restart.
//! 6. Remote tier (a real `redis-server`): store and retrieve GB/s of
//!    256-token chunks through two coordinators, beside raw SET/GET of the
//!    same sizes with the same client; 64-chunk lookup latency on an L1 miss
//!    beside one raw pipeline of 64 EXISTS.

mod control_plane;
mod data_plane;
mod disk;
mod echo;
mod index;
mod recovery;
mod remote;
mod report;

pub use control_plane::{lookup_load, LookupLoadArgs};

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use crate::child::{wait_listening, Server};

use control_plane::control_plane;
use data_plane::data_plane;
use disk::disk_tier;
use echo::start_echo;
use index::index_scale;
use recovery::recovery;
use remote::remote_tier;
use report::*;

#[derive(clap::Args)]
pub struct BenchArgs {
    /// A short run (about 30 seconds on 2 cores).
    #[arg(long)]
    quick: bool,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Run only this scenario: `remote`.
    #[arg(long, value_parser = ["remote"])]
    only: Option<String>,
}

pub fn run(args: BenchArgs) -> ExitCode {
    let dir = std::env::temp_dir().join(format!("kvcoord-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let code = actix_rt::System::new().block_on(bench(args, dir.clone()));
    let _ = std::fs::remove_dir_all(&dir);
    code
}

async fn bench(args: BenchArgs, dir: PathBuf) -> ExitCode {
    let plan = if args.quick {
        Plan { samples: 5_000, pipeline: Duration::from_secs(2), timed_rounds: 2, cycles: 3, index_entries: 1_000_000 }
    } else {
        Plan {
            samples: 50_000,
            pipeline: Duration::from_secs(5),
            timed_rounds: 8,
            cycles: 200,
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
    let mut ok = true;
    if args.only.is_none() {
        ok = all_but_remote(&plan, &dir, &mut server, (&socket, &echo, &log), &bar, &mut rows).await;
    } else {
        drop(server);
    }
    bar.set_message("remote tier");
    ok &= remote_tier(&plan, &dir, &mut rows).await;
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

/// Scenarios 1 to 5.
async fn all_but_remote(
    plan: &Plan,
    dir: &std::path::Path,
    server: &mut Server,
    (socket, echo, log): (&std::path::Path, &std::path::Path, &std::path::Path),
    bar: &indicatif::ProgressBar,
    rows: &mut Vec<Row>,
) -> bool {
    control_plane(plan, socket, echo, rows).await;
    bar.inc(1);
    bar.set_message("host data plane, 1 TP client");
    let mut ok = data_plane(plan, socket, 1, 11, true, rows).await;
    bar.inc(1);
    bar.set_message("host data plane, 4 TP clients");
    ok &= data_plane(plan, socket, 4, 12, false, rows).await;
    bar.inc(1);
    bar.set_message("recovery");
    ok &= recovery(plan, server, socket, log, rows).await;
    bar.inc(1);
    bar.set_message("index scale");
    ok &= index_scale(plan, dir, rows).await;
    bar.inc(1);
    bar.set_message("disk tier");
    ok &= disk_tier(plan, dir, rows).await;
    ok
}

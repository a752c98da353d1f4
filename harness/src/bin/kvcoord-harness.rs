//! `kvcoord-harness`: the demo, the benchmarks and the GPU check, plus the
//! hidden process roles they start (a coordinator, load generators, GPU
//! workers). A coordinator started here runs the very `serve` command of the
//! `kvcoord` binary.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use kvcoord_harness::{bench, client_bench, demo, gpu_check, load};

#[derive(Parser)]
#[command(name = "kvcoord-harness", version, about = "kvcoord's demo, benchmarks and GPU check")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the main job on an embedded default: a coordinator child process,
    /// TP worker clients, a prefix-caching workload, and a SIGKILL + restart
    /// of the coordinator in the middle.
    Demo(demo::DemoArgs),
    /// Measure speed, each number beside a baseline measured in the same run.
    Bench(bench::BenchArgs),
    /// The CUDA backend's end-to-end check and bandwidth benchmark (GPU machines).
    GpuCheck(gpu_check::GpuCheckArgs),
    /// The Rust client's side of the Python-vs-Rust client benchmark
    /// (python/benches/client_vs_rust.py), against a running coordinator.
    ClientBench(client_bench::ClientBenchArgs),
    /// A coordinator process (`kvcoord serve`), for the commands above.
    #[command(hide = true)]
    Serve(Box<kvcoord::cli::serve::ServeArgs>),
    /// One GPU TP worker client process (used by `gpu-check`).
    #[command(hide = true)]
    GpuWorker(gpu_check::GpuWorkerArgs),
    /// One pipelined-lookup client process (used by `bench`).
    #[command(hide = true)]
    LookupLoad(bench::LookupLoadArgs),
    /// One TP worker client process storing in a loop (used by tests).
    #[command(hide = true)]
    Load(load::LoadArgs),
}

fn main() {
    let code = match Cli::parse().command {
        Command::Serve(args) => std::process::exit(kvcoord::cli::serve::run(*args)),
        Command::Demo(args) => demo::run(args),
        Command::Bench(args) => bench::run(args),
        Command::GpuCheck(args) => gpu_check::run(args),
        Command::ClientBench(args) => client_bench::run(args),
        Command::GpuWorker(args) => gpu_check::worker(args),
        Command::LookupLoad(args) => bench::lookup_load(args),
        Command::Load(args) => load::run(args),
    };
    // Copy-lane arbiter threads need no orderly join at exit.
    std::process::exit(if code == ExitCode::SUCCESS { 0 } else { 1 });
}

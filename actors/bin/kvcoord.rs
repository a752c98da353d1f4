//! The `kvcoord` command: `serve` runs the standalone coordinator and
//! `status` shows a running one. The demo, benchmarks and GPU check are the
//! harness's (`kvcoord-harness`), not the shipped binary's.

mod status;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "kvcoord", version, about = "A KV-cache coordinator for LLM inference")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the coordinator.
    Serve(Box<kvcoord::serve::ServeArgs>),
    /// Show a running coordinator: instances, L1, hit rates.
    Status(status::StatusArgs),
}

fn main() {
    let code = match Cli::parse().command {
        Command::Serve(args) => kvcoord::serve::run(*args),
        Command::Status(args) => status::run(args),
    };
    // Exit at once with the real code: copy-lane arbiter threads need no
    // orderly join.
    std::process::exit(code);
}

//! The `kvcoord` command line as a library function, so the `kvcoord`
//! binary and the Python package's `kvcoord` command are one program:
//! `serve` runs the coordinator, `status` shows a running one.
//!
//! It must never hold coordinator logic: it parses, resolves configuration,
//! and calls into `server`.

pub mod serve;
pub mod status;

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
    Serve(Box<serve::ServeArgs>),
    /// Show a running coordinator: instances, L1, hit rates.
    Status(status::StatusArgs),
}

/// Runs the command line `args` (the first is the program name); returns
/// the process exit code. Help, version and usage errors print and return
/// clap's code.
pub fn run<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return e.exit_code();
        }
    };
    match cli.command {
        Command::Serve(args) => serve::run(*args),
        Command::Status(args) => status::run(args),
    }
}

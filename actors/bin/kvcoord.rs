//! The `kvcoord` binary: [`kvcoord::cli`] (`serve`, `status`). The demo,
//! benchmarks and GPU check are the harness's (`kvcoord-harness`), not the
//! shipped binary's.

fn main() {
    let code = kvcoord::cli::run(std::env::args_os());
    // Exit at once with the real code: copy-lane arbiter threads need no
    // orderly join.
    std::process::exit(code);
}

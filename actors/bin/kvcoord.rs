//! The `kvcoord` command.
fn main() {
    eprintln!("kvcoord: not implemented yet (the coordinator lands with the coordinator issue)");
    std::process::exit(2);
}

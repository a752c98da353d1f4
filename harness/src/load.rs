//! `kvcoord load`: one TP worker client process that registers and stores
//! prompts in a loop until killed. Tests SIGKILL it mid-store to check that
//! the coordinator reclaims a dead client's instance, leases and memory.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::pattern::prefix_hashes;
use crate::tp_worker::TpWorker;
use kvcoord_client::{Client, ClientConfig};
use kvcoord_memory::{Dtype, KvLayout};
use kvcoord_transport::{Endpoint, InstanceKey};

#[derive(clap::Args)]
pub struct LoadArgs {
    #[arg(long)]
    socket: PathBuf,
    #[arg(long, default_value_t = 1)]
    engine: u64,
    #[arg(long, default_value_t = 0)]
    rank: u32,
    #[arg(long, default_value_t = 1)]
    world_size: u32,
    /// Stop after this many stores (0: until killed).
    #[arg(long, default_value_t = 0)]
    stores: u64,
}

pub fn run(args: LoadArgs) -> ExitCode {
    actix_rt::System::new().block_on(async move {
        let client = Client::start(ClientConfig::new(Endpoint::Unix(args.socket)));
        let key = InstanceKey { engine: args.engine, rank: args.rank };
        let layout = KvLayout::mha(4, 128, 16, 4, 64, Dtype::Bf16);
        let mut w = match TpWorker::register(client, key, "load-model", args.world_size, layout, 256).await {
            Ok(w) => w,
            Err(e) => {
                eprintln!("register failed: {e}");
                return ExitCode::from(1);
            }
        };
        println!("registered");
        let mut i = 0u64;
        loop {
            let hashes = prefix_hashes("load-model", args.engine, i, 2, 256);
            let _ = w.store_prefix(&hashes).await;
            let _ = w.client.lookup(key, hashes, true).await;
            i += 1;
            if args.stores != 0 && i >= args.stores {
                return ExitCode::SUCCESS;
            }
        }
    })
}

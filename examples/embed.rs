//! Embedding kvcoord in a host process: start the coordinator's actor system
//! inside this process, connect one TP worker client to it, store a prompt,
//! look it up, retrieve it into other blocks, verify, and shut down.
//!
//! `cargo run --release --example embed`

use std::time::Duration;

use kvcoord::client::{Client, ClientConfig, WorkerClient};
use kvcoord::{Coordinator, ServerConfig};
use kvcoord_harness::{prefix_hashes, TpWorker};
use kvcoord_memory::{Dtype, KvLayout};
use kvcoord_transport::InstanceKey;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt().with_env_filter("warn").init();
    let dir = tempfile::tempdir()?;
    let config = ServerConfig {
        socket: dir.path().join("kv.sock"),
        l1_size: bytesize::ByteSize::mib(256),
        admin: "127.0.0.1:0".into(),
        ..ServerConfig::default()
    };
    actix_rt::System::new().block_on(async move {
        let coordinator = Coordinator::start(config).await?;
        let endpoint = coordinator.endpoints()[0].clone();
        println!("coordinator embedded at {endpoint}, epoch {:016x}", coordinator.epoch().0);
        if let Some(admin) = coordinator.admin_addr() {
            println!("admin API at http://{admin}/status and /metrics");
        }

        // The client as an actor of this system; the worker uses its API,
        // and the actor (so the connection) lives as long as `client`.
        let client = WorkerClient::start(ClientConfig::new(endpoint));
        let layout = KvLayout::mha(8, 128, 16, 8, 64, Dtype::Bf16);
        let key = InstanceKey { engine: 42, rank: 0 };
        let mut worker = TpWorker::register(Client::clone(&client), key, "embedded-model", 1, layout, 256).await?;

        let prompt = prefix_hashes("embedded-model", 42, 0, 4, 256);
        let (blocks, stored) = worker.store_prefix(&prompt).await?;
        println!("stored 4 chunks: {stored:?}");
        let found = worker.client.lookup(key, prompt.clone(), true).await;
        println!("lookup: {} of 4 chunks held", found.chunks);
        let (result, verified) = worker.retrieve_and_verify(&prompt, &blocks, found.lease).await.unwrap();
        println!(
            "retrieved {} chunks into other blocks: {} bytes verified, {} corrupt",
            result.prefix_retrieved(),
            verified.bytes_verified,
            verified.corrupt_chunks
        );
        if let Some(stats) = coordinator.stats().await {
            println!(
                "stats: {} objects, {} KiB of L1, {} instance(s)",
                stats.objects,
                stats.l1_used >> 10,
                stats.instances
            );
        }
        worker.client.close();
        coordinator.shutdown().await;
        tokio::time::sleep(Duration::from_millis(10)).await;
        if verified.corrupt_chunks > 0 || result.prefix_retrieved() != 4 {
            return Err("verification failed".into());
        }
        Ok(())
    })
}

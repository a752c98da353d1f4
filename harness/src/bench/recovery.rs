//! Recovery: 8 TP clients under load, SIGKILL at a random moment (20-200 ms
//! after the previous recovery, so the kill lands anywhere in the load's
//! requests) + restart, time from the new server listening to all 8
//! registered again and to the first store; median, p99 and max over the
//! cycles (200 in the full run).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};

use crate::pattern::prefix_hashes;
use kvcoord_client::{Client, ClientConfig};
use kvcoord_transport::*;

use crate::child::Server;

use super::control_plane::*;
use super::report::*;

pub(crate) async fn recovery(plan: &Plan, server: &mut Server, socket: &Path, log: &Path, rows: &mut Vec<Row>) -> bool {
    let mut ws = Vec::new();
    for e in 0..8u64 {
        let client = Client::start(ClientConfig::new(Endpoint::Unix(socket.to_path_buf())));
        let key = InstanceKey { engine: 5000 + e, rank: 0 };
        let cache = register_tiny(&client, key, 1).await;
        ws.push((client, key, cache));
    }
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let loads: Vec<_> = ws
        .iter()
        .map(|(c, k, _)| {
            let (c, k, stop) = (c.clone(), *k, stop.clone());
            actix_rt::spawn(async move {
                let mut i = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let h = prefix_hashes("bench-model", k.engine, i % 64, 4, 256);
                    let _ = c.store(k, h, (0..4).map(|b| ((i * 4 + b) % 4096) as u32).collect()).await;
                    i += 1;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            })
        })
        .collect();
    let (mut to_registered, mut to_store) = (Vec::new(), Vec::new());
    let prober = &ws[0];
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6b76);
    for cycle in 1..=plan.cycles as u64 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(20..=200))).await;
        server.kill();
        *server = Server::start(socket, log, &["--l1-size", "512MiB"]).expect("restart");
        while std::os::unix::net::UnixStream::connect(socket).is_err() {
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        let listening = Instant::now();
        let mut stored_at = None;
        loop {
            if stored_at.is_none() {
                let h = prefix_hashes("bench-model", prober.1.engine, 100_000 + cycle, 1, 256);
                if prober.0.store(prober.1, h, vec![0]).await.is_ok() {
                    stored_at = Some(listening.elapsed());
                }
            }
            if ws.iter().all(|(c, _, _)| c.reregistrations() >= cycle) {
                to_registered.push(listening.elapsed());
                break;
            }
            if listening.elapsed() > Duration::from_secs(30) {
                return false;
            }
            tokio::time::sleep(Duration::from_micros(200)).await;
        }
        while stored_at.is_none() {
            let h = prefix_hashes("bench-model", prober.1.engine, 100_000 + cycle, 1, 256);
            if prober.0.store(prober.1, h, vec![0]).await.is_ok() {
                stored_at = Some(listening.elapsed());
            }
        }
        to_store.push(stored_at.expect("stored"));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for l in loads {
        let _ = l.await;
    }
    for (what, mut v) in [("all 8 clients registered again", to_registered), ("first successful store", to_store)] {
        v.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let at = |p: f64| ms(v[((v.len() as f64 * p) as usize).min(v.len() - 1)]);
        for (metric, value) in [("median", at(0.5)), ("p99", at(0.99))] {
            rows.push(Row {
                scenario: format!("recovery: listening -> {what} ({} cycles)", v.len()),
                metric,
                kvcoord: value,
                baseline_name: "max",
                baseline: ms(v[v.len() - 1]),
                unit: "ms",
            });
        }
    }
    for (c, _, _) in &ws {
        c.close();
    }
    true
}

//! Tier 2 on local disk: a restarted coordinator comes back warm, torn or
//! corrupt objects are dropped and never served, and capacity is kept.

mod common;

use std::time::Duration;

use common::*;
use kvcoord::client::Client;
use kvcoord_harness::prefix_hashes;
use kvcoord_transport::*;

/// Stats once the client has found the restarted server (its first request
/// may fail fast on the connection the restart broke).
async fn stats_after_restart(client: &Client) -> ServerStats {
    assert!(eventually(Duration::from_secs(10), async || client.reregistrations() >= 1).await);
    client.stats().await.unwrap()
}

async fn flushed(client: &Client, objects: u64) -> bool {
    eventually(Duration::from_secs(20), async || {
        client.stats().await.is_ok_and(|s| s.disk_objects >= objects && s.disk_backlog == 0)
    })
    .await
}

#[actix_rt::test]
async fn a_restarted_server_comes_back_warm_from_its_disk_tier() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    let mut server = ServerProcess::start(dir.path(), &["--disk-dir", disk.to_str().unwrap(), "--disk-size", "1GiB"]);
    let mut w = worker(&server, 21, 0, 1).await;
    let prompts: Vec<Vec<ChunkHash>> = (0..10).map(|p| prefix_hashes("test-model", 21, p, 2, 256)).collect();
    for h in &prompts {
        w.store_prefix(h).await.unwrap();
    }
    assert!(flushed(&w.client, 20).await, "all 20 chunks written behind");

    server.kill();
    server.restart();
    let stats = stats_after_restart(&w.client).await;
    assert_eq!((stats.disk_recovered, stats.disk_corrupt), (20, 0));
    assert_eq!(stats.objects, 0, "L1 starts empty");
    let mut found = 0;
    for h in &prompts {
        found += w.client.lookup(w.key, h.clone(), false).await.chunks;
    }
    assert!(found >= 19, "lookup finds {found} of 20 chunks after the restart");
    for h in &prompts {
        let (r, v) = w.retrieve_and_verify(h, &[], None).await.unwrap();
        assert_eq!((r.prefix_retrieved(), v.corrupt_chunks), (2, 0), "identical bytes from disk");
    }
    let stats = w.client.stats().await.unwrap();
    assert_eq!(stats.disk_hits, 20);
    assert_eq!(stats.objects, 20, "retrieved chunks are promoted back to L1");
    assert_eq!(w.client.reregistrations(), 1);
}

fn objects_on_disk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "kvc"))
        .collect();
    v.sort();
    v
}

#[actix_rt::test]
async fn torn_and_flipped_objects_on_disk_are_reported_and_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    let mut server = ServerProcess::start(dir.path(), &["--disk-dir", disk.to_str().unwrap()]);
    let mut w = worker(&server, 22, 0, 1).await;
    let prompts: Vec<Vec<ChunkHash>> = (0..10).map(|p| prefix_hashes("test-model", 22, p, 1, 256)).collect();
    for h in &prompts {
        w.store_prefix(h).await.unwrap();
    }
    assert!(flushed(&w.client, 10).await);
    server.kill();

    let files = objects_on_disk(&disk);
    assert_eq!(files.len(), 10);
    // A torn write: the tail is gone.
    let torn = std::fs::OpenOptions::new().write(true).open(&files[0]).unwrap();
    torn.set_len(torn.metadata().unwrap().len() - 100).unwrap();
    // A flipped bit in the payload.
    let mut bytes = std::fs::read(&files[1]).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x10;
    std::fs::write(&files[1], bytes).unwrap();
    // A write that never got renamed.
    std::fs::write(disk.join(".deadbeef.kvc.tmp"), b"partial").unwrap();

    server.restart();
    let stats = stats_after_restart(&w.client).await;
    assert_eq!(stats.disk_recovered, 9, "the torn object is dropped at start");
    assert_eq!(stats.disk_corrupt, 2, "the torn object and the stray temporary file");
    assert!(!disk.join(".deadbeef.kvc.tmp").exists());

    let (mut served, mut missing) = (0, 0);
    for h in &prompts {
        let (r, v) = w.retrieve_and_verify(h, &[], None).await.unwrap();
        assert_eq!(v.corrupt_chunks, 0, "a corrupt object is never returned");
        match r.outcomes[0] {
            RetrieveOutcome::Retrieved => served += 1,
            RetrieveOutcome::Missing => missing += 1,
        }
    }
    assert_eq!((served, missing), (8, 2));
    let stats = w.client.stats().await.unwrap();
    assert_eq!(stats.disk_corrupt, 3, "the flipped object is caught by its checksum at read");
    assert_eq!(stats.disk_objects, 8);
    assert_eq!(objects_on_disk(&disk).len(), 8, "corrupt files are deleted");
}

#[actix_rt::test]
async fn the_disk_tier_keeps_its_capacity_by_evicting_the_oldest() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    // 1 MiB chunks (plus a header) into 3.5 MiB: at most 3 fit.
    let server = ServerProcess::start(dir.path(), &["--disk-dir", disk.to_str().unwrap(), "--disk-size", "3584KiB"]);
    let mut w = worker(&server, 23, 0, 1).await;
    for p in 0..6 {
        w.store_prefix(&prefix_hashes("test-model", 23, p, 1, 256)).await.unwrap();
        assert!(
            eventually(Duration::from_secs(10), async || w.client.stats().await.is_ok_and(|s| s.disk_backlog == 0))
                .await
        );
    }
    let stats = w.client.stats().await.unwrap();
    assert_eq!(stats.disk_writes, 6);
    assert_eq!(stats.disk_objects, 3);
    assert!(stats.disk_used <= 3584 * 1024);
    assert_eq!(objects_on_disk(&disk).len(), 3);
}

/// A tiny tmpfs, so the disk really fills up; unmounted on drop.
struct TinyDisk(std::path::PathBuf);

impl TinyDisk {
    fn mount(at: &std::path::Path, size: &str) -> Option<TinyDisk> {
        std::fs::create_dir_all(at).ok()?;
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| TinyDisk(at.to_path_buf()))
    }
}

impl Drop for TinyDisk {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[actix_rt::test]
async fn a_full_disk_is_counted_and_logged_and_stores_go_on_in_l1() {
    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("disk");
    let Some(_tiny) = TinyDisk::mount(&disk, "3m") else {
        println!("skipped: cannot mount a tmpfs here (needs root), so the disk cannot be made full");
        return;
    };
    // The configured size is far above what the 3 MiB filesystem holds.
    let server = ServerProcess::start(dir.path(), &["--disk-dir", disk.to_str().unwrap(), "--disk-size", "1GiB"]);
    let mut w = worker(&server, 24, 0, 1).await;
    let prompts: Vec<Vec<ChunkHash>> = (0..6).map(|p| prefix_hashes("test-model", 24, p, 1, 256)).collect();
    for h in &prompts {
        assert_eq!(w.store_prefix(h).await.unwrap().1, vec![StoreOutcome::Stored]);
    }
    let drained = eventually(Duration::from_secs(10), async || {
        w.client.stats().await.is_ok_and(|s| s.disk_backlog == 0 && s.disk_writes + s.disk_write_errors == 6)
    })
    .await;
    assert!(drained);
    let stats = w.client.stats().await.unwrap();
    assert!(stats.disk_write_errors >= 3, "{stats:?}");
    assert!(stats.disk_writes >= 1);
    for h in &prompts {
        let (r, v) = w.retrieve_and_verify(h, &[], None).await.unwrap();
        assert_eq!((r.prefix_retrieved(), v.corrupt_chunks), (1, 0), "L1 still serves everything");
    }
    let leftovers = std::fs::read_dir(&disk)
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_name().to_string_lossy().ends_with(".tmp"))
        .count();
    assert_eq!(leftovers, 0, "failed writes leave no temporary files");
}

//! Behaviour that needs client processes of the harness (`kvcoord-harness
//! load`): a TP worker killed in the middle of its work leaves nothing behind.
//! These tests belong to the harness package, so cargo builds its binary.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

#[actix_rt::test]
async fn a_client_killed_mid_store_leaves_nothing_behind_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &["--grace-ms", "300"]);
    let mut load = Command::new(env!("CARGO_BIN_EXE_kvcoord-harness"))
        .args(["load", "--engine", "77", "--socket"])
        .arg(&server.socket)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let watcher = client(server.endpoint());
    let busy = eventually(Duration::from_secs(10), async || {
        watcher.stats().await.is_ok_and(|s| s.instances == 1 && s.leases > 0 && s.stores > 5)
    })
    .await;
    assert!(busy, "the load client registered, stored and took leases");
    load.kill().unwrap();
    load.wait().unwrap();
    let gone = eventually(Duration::from_secs(5), async || {
        watcher.stats().await.is_ok_and(|s| {
            s.instances == 0 && s.leases == 0 && s.mapped_bytes == 0 && s.writing_objects == 0 && s.pinned_objects == 0
        })
    })
    .await;
    let s = watcher.stats().await.unwrap();
    assert!(gone, "after the grace: {s:?}");
    assert_eq!(s.reclaimed_instances, 1);
}

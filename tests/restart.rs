//! Restart and fault resilience against real `kvcoord serve` processes: the
//! coordinator is SIGKILLed and started again, its actors are crashed on
//! purpose, and its clients die; nothing hangs, nothing is corrupt, nothing
//! of a dead client stays.

mod common;

use std::time::{Duration, Instant};

use common::*;
use kvcoord_harness::{prefix_hashes, TpWorker};
use kvcoord_transport::*;

#[actix_rt::test]
async fn store_after_server_restart_reregisters_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(dir.path(), &[]);
    let mut w = worker(&server, 11, 0, 1).await;
    let h = prefix_hashes("test-model", 11, 0, 2, 256);
    assert_eq!(w.store_prefix(&h).await.unwrap().1, vec![StoreOutcome::Stored; 2]);
    let old_epoch = w.client.ping().await.unwrap();

    server.kill();
    server.restart();
    // No operator action and no client restart: the next store just works.
    let h2 = prefix_hashes("test-model", 11, 1, 2, 256);
    let ok = eventually(Duration::from_secs(10), async || w.store_prefix(&h2).await.is_ok()).await;
    assert!(ok, "store succeeds after the restart");
    assert_ne!(w.client.ping().await.unwrap(), old_epoch);
    let (r, v) = w.retrieve_and_verify(&h2, &[], None).await.unwrap();
    assert_eq!((r.prefix_retrieved(), v.corrupt_chunks), (2, 0));
    assert_eq!(w.client.reregistrations(), 1, "registered again exactly once for the new epoch");
    assert_eq!(w.client.lookup(w.key, h, false).await.chunks, 0, "the old server's L1 is gone");
}

#[actix_rt::test]
async fn while_the_server_is_down_stores_fail_fast_and_lookups_and_retrieves_miss() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(dir.path(), &[]);
    let mut w = worker(&server, 12, 0, 1).await;
    let h = prefix_hashes("test-model", 12, 0, 2, 256);
    w.store_prefix(&h).await.unwrap();
    server.kill();
    let t = Instant::now();
    let err = w.store_prefix(&h).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
    let found = w.client.lookup(w.key, h.clone(), true).await;
    assert_eq!((found.chunks, found.error.as_ref().map(|e| e.kind())), (0, Some(ErrorKind::Unavailable)));
    let (r, _) = w.retrieve_and_verify(&h, &[], None).await.unwrap();
    assert_eq!(r.outcomes, vec![RetrieveOutcome::Missing; 2]);
    assert!(t.elapsed() < Duration::from_secs(1), "three requests took {:?} while the server was down", t.elapsed());
    assert_eq!(w.client.reregistrations(), 0);
}

#[actix_rt::test]
async fn misses_and_bad_arguments_never_trigger_registration() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let w = worker(&server, 13, 0, 1).await;
    let h = prefix_hashes("test-model", 13, 0, 2, 256);
    assert_eq!(w.client.lookup(w.key, h.clone(), false).await.chunks, 0);
    let bad = w.client.store(w.key, h.clone(), vec![0; 3]).await.unwrap_err();
    assert_eq!(bad.kind(), ErrorKind::InvalidArgument);
    let (_, r) = (0, w.client.retrieve(w.key, h, vec![999; 32], None).await);
    assert_eq!(r.error.unwrap().kind(), ErrorKind::InvalidArgument);
    assert_eq!(w.client.reregistrations(), 0);
    assert_eq!(w.client.stats().await.unwrap().registrations, 1);
}

/// Stores, looks up and retrieves in a loop until `stop`; returns
/// (slowest request, corrupt chunks, successful rounds after `stop_at`).
async fn load_loop(mut w: TpWorker, stop: Instant) -> (Duration, usize, u64, TpWorker) {
    let (mut slowest, mut corrupt, mut ok) = (Duration::ZERO, 0, 0u64);
    let mut p = 0;
    while Instant::now() < stop {
        let h = prefix_hashes("test-model", w.key.engine, p, 2, 256);
        p += 1;
        let t = Instant::now();
        let stored = w.store_prefix(&h).await;
        slowest = slowest.max(t.elapsed());
        let t = Instant::now();
        let found = w.client.lookup(w.key, h.clone(), true).await;
        slowest = slowest.max(t.elapsed());
        if let Ok((blocks, _)) = stored {
            let t = Instant::now();
            let (r, v) = w.retrieve_and_verify(&h[..found.chunks as usize], &blocks, found.lease).await.unwrap();
            slowest = slowest.max(t.elapsed());
            corrupt += v.corrupt_chunks;
            if r.error.is_none() && found.chunks == 2 {
                ok += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    (slowest, corrupt, ok, w)
}

#[actix_rt::test]
async fn eight_clients_with_requests_in_flight_when_the_server_dies_all_resolve_and_recover() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(dir.path(), &[]);
    let mut ws = Vec::new();
    for e in 0..8 {
        ws.push(worker(&server, 100 + e, 0, 1).await);
    }
    let stop = Instant::now() + Duration::from_secs(3);
    let loads: Vec<_> = ws.into_iter().map(|w| actix_rt::spawn(load_loop(w, stop))).collect();
    tokio::time::sleep(Duration::from_millis(700)).await;
    server.kill();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.restart();
    for l in loads {
        let (slowest, corrupt, ok, w) = l.await.unwrap();
        // Request deadline is 5 s; nothing may come near it.
        assert!(slowest < Duration::from_secs(2), "slowest request {slowest:?}");
        assert_eq!(corrupt, 0);
        assert!(ok > 0);
        assert_eq!(w.client.reregistrations(), 1, "engine {} registered again once", w.key.engine);
        let h = prefix_hashes("test-model", w.key.engine, 5000, 2, 256);
        let mut w = w;
        assert!(w.store_prefix(&h).await.is_ok(), "engine {} recovered", w.key.engine);
    }
}

#[actix_rt::test]
async fn twenty_kill_restart_cycles_under_load_never_hang_or_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(dir.path(), &[]);
    let mut ws = Vec::new();
    for e in 0..3 {
        ws.push(worker(&server, 200 + e, 0, 1).await);
    }
    for cycle in 1..=20u64 {
        let h = prefix_hashes("test-model", 0, cycle, 2, 256);
        for w in ws.iter_mut() {
            let (blocks, _) = w.store_prefix(&h).await.unwrap_or_else(|e| panic!("cycle {cycle}: {e}"));
            let found = w.client.lookup(w.key, h.clone(), true).await;
            let (r, v) = w.retrieve_and_verify(&h, &blocks, found.lease).await.unwrap();
            assert_eq!((r.prefix_retrieved(), v.corrupt_chunks), (2, 0), "cycle {cycle}");
        }
        server.kill();
        let t = Instant::now();
        for w in ws.iter_mut() {
            assert!(w.store_prefix(&h).await.is_err());
        }
        assert!(t.elapsed() < Duration::from_secs(2), "failing fast took {:?}", t.elapsed());
        server.restart();
        let all_back =
            eventually(Duration::from_secs(10), async || ws.iter().all(|w| w.client.reregistrations() == cycle)).await;
        assert!(all_back, "cycle {cycle}: every client registered again exactly once");
    }
}

#[actix_rt::test]
async fn an_injected_actor_crash_causes_one_reregistration_per_affected_client() {
    let dir = tempfile::tempdir().unwrap();
    // Fault injection needs the admin role.
    let token = "restart-test-admin-token";
    let server =
        ServerProcess::start(dir.path(), &["--enable-fault-injection", "--copy-lanes", "2", "--admin-token", token]);
    let mut a = worker_with_token(&server, 301, 0, 1, token).await;
    let mut b = worker_with_token(&server, 302, 0, 1, token).await;
    let h = prefix_hashes("test-model", 300, 0, 2, 256);

    a.client.inject_fault(FaultTarget::Instance(a.key)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (blocks, _) = a.store_prefix(&h).await.expect("store after the crash");
    let (r, v) = a.retrieve_and_verify(&h, &blocks, None).await.unwrap();
    assert_eq!((r.prefix_retrieved(), v.corrupt_chunks), (2, 0));
    assert_eq!(a.client.reregistrations(), 1);
    b.store_prefix(&h).await.expect("the other client is unaffected");
    assert_eq!(b.client.reregistrations(), 0);

    // A copy-lane crash drops the instances routed to it (one of the two).
    b.client.inject_fault(FaultTarget::CopyLane(0)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let h2 = prefix_hashes("test-model", 300, 1, 2, 256);
    a.store_prefix(&h2).await.expect("a serves after the worker restart");
    b.store_prefix(&h2).await.expect("b serves after the worker restart");
    assert_eq!(a.client.reregistrations() + b.client.reregistrations(), 2, "exactly one more, for the affected client");
    let stats = a.client.stats().await.unwrap();
    assert_eq!(stats.actor_restarts, 2);
    assert_eq!(stats.instances, 2);
}

#[actix_rt::test]
async fn concurrent_not_registered_replies_cause_exactly_one_reregistration() {
    let dir = tempfile::tempdir().unwrap();
    let token = "restart-test-admin-token";
    let server = ServerProcess::start(dir.path(), &["--fault-injection", "--admin-token", token]);
    let w = worker(&server, 400, 0, 1).await;
    // The registration disappears behind the client's back (its actor dies;
    // another session may not unregister it).
    let admin = raw_with_token(&server, token).await;
    let crash = RequestBody::InjectFault(FaultTarget::Instance(w.key));
    admin.request(crash, Duration::from_secs(5), vec![]).await.unwrap();
    assert!(
        eventually(Duration::from_secs(5), async || {
            let s = admin.request(RequestBody::Stats, Duration::from_secs(5), vec![]).await;
            matches!(s, Ok(ReplyBody::Stats(s)) if s.instances == 0)
        })
        .await,
        "the crashed instance's registration is dropped"
    );
    let h = prefix_hashes("test-model", 400, 0, 2, 256);
    let lookups = (0..16).map(|_| w.client.lookup(w.key, h.clone(), false));
    for r in futures::future::join_all(lookups).await {
        assert_eq!(r.error, None, "every lookup succeeds after the one re-registration");
    }
    assert_eq!(w.client.reregistrations(), 1);
    assert_eq!(w.client.stats().await.unwrap().registrations, 2);
}

#[actix_rt::test]
async fn a_reconnect_within_the_grace_period_keeps_the_registration() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &["--grace-ms", "2000"]);
    let conn = raw(&server).await;
    let layout = small_layout();
    let cache = kvcoord_memory::HostKvCache::create("keep", layout).unwrap();
    let key = InstanceKey { engine: 500, rank: 0 };
    let body = RequestBody::Register(RegisterKvCache {
        instance: key,
        model: "test-model".into(),
        world_size: 1,
        layout,
        memory: kvcoord_memory::MemoryHandle::HostFd { size: layout.total_bytes() },
        secret: None,
    });
    let fd = || vec![cache.fd().try_clone_to_owned().unwrap()];
    let ReplyBody::Registered { secret, .. } = conn.request(body.clone(), Duration::from_secs(5), fd()).await.unwrap()
    else {
        panic!("not registered")
    };
    conn.close();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let again = raw(&server).await;
    // The new connection takes the instance over by presenting its secret.
    let RequestBody::Register(mut with_secret) = body else { unreachable!() };
    with_secret.secret = Some(secret);
    let r = again.request(RequestBody::Register(with_secret), Duration::from_secs(5), fd()).await.unwrap();
    assert_eq!(r, ReplyBody::Registered { already: true, secret });
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let ReplyBody::Stats(s) = again.request(RequestBody::Stats, Duration::from_secs(5), vec![]).await.unwrap() else {
        panic!()
    };
    assert_eq!((s.instances, s.reclaimed_instances), (1, 0));
}

#[actix_rt::test]
async fn sigterm_shuts_down_gracefully_and_exits_0() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(dir.path(), &["--shutdown-timeout-ms", "2000"]);
    let mut w = worker(&server, 600, 0, 1).await;
    w.store_prefix(&prefix_hashes("test-model", 600, 0, 2, 256)).await.unwrap();
    let status = server.terminate(Duration::from_secs(10)).expect("exits within 10 s");
    assert!(status.success(), "{status:?}");
    assert!(!server.socket.exists(), "the socket file is removed");
    let err = w.store_prefix(&prefix_hashes("test-model", 600, 1, 2, 256)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Unavailable);
}

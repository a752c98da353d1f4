//! `BlockingClient` and `Pending` from plain (non-async) test threads against
//! a tiny fake coordinator built from kvcoord-transport's listener and
//! handshake: blocking calls, replies polled and waited for with timeouts,
//! taken once, and abandoned when the client goes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvcoord_client::{BlockingClient, ClientConfig, Pending, PendingError};
use kvcoord_transport::frame::DEFAULT_MAX_FRAME_BYTES;
use kvcoord_transport::handshake;
use kvcoord_transport::*;

/// Answers ping, lookup by model (`chunks` = chunks asked, lease 7) and
/// store; never answers a retrieve.
struct FakeServer {
    _runtime: tokio::runtime::Runtime,
    endpoint: Endpoint,
    epoch: ServerEpoch,
    _dir: tempfile::TempDir,
}

impl FakeServer {
    fn start() -> FakeServer {
        let dir = tempfile::tempdir().unwrap();
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let endpoint = Endpoint::Unix(dir.path().join("fake.sock"));
        let epoch = ServerEpoch::random();
        let listener = runtime.block_on(Listener::bind(&endpoint)).unwrap();
        runtime.spawn(async move {
            while let Ok((mut r, mut w, _)) = listener.accept(DEFAULT_MAX_FRAME_BYTES).await {
                tokio::spawn(async move {
                    let welcome = Welcome {
                        protocol: PROTOCOL_VERSION,
                        epoch,
                        chunk_tokens: 256,
                        limits: Limits { max_frame_bytes: DEFAULT_MAX_FRAME_BYTES, max_chunks_per_request: 64 },
                        server: "fake".into(),
                        tenant: "default".into(),
                        admin: false,
                    };
                    if handshake::welcome(&mut r, &mut w, &welcome, Duration::from_secs(1)).await.is_err() {
                        return;
                    }
                    while let Ok((ClientFrame::Request(req), _)) = r.read::<ClientFrame>().await {
                        let result = match req.body {
                            RequestBody::Ping => Ok(ReplyBody::Pong { epoch }),
                            RequestBody::LookupModel(l) => {
                                Ok(ReplyBody::Found { chunks: l.chunks.len() as u32, lease: Some(LeaseId(7)) })
                            }
                            RequestBody::Store(s) => Ok(ReplyBody::Stored(vec![StoreOutcome::Stored; s.chunks.len()])),
                            RequestBody::Retrieve(_) => continue,
                            _ => Err(WireError::new(ErrorKind::InvalidArgument, "not in the fake")),
                        };
                        if w.send(&ServerFrame::Reply(Reply { id: req.id, result })).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        FakeServer { _runtime: runtime, endpoint, epoch, _dir: dir }
    }
}

fn client(endpoint: &Endpoint, request_timeout: Duration) -> BlockingClient {
    let mut cfg = ClientConfig::new(endpoint.clone());
    cfg.request_timeout = request_timeout;
    BlockingClient::start(cfg, 1).unwrap()
}

fn hashes(n: u8) -> Vec<ChunkHash> {
    (0..n).map(|i| ChunkHash([i; 32])).collect()
}

#[test]
fn blocking_calls_and_a_pending_reply_taken_once() {
    let server = FakeServer::start();
    let c = client(&server.endpoint, Duration::from_secs(5));
    assert_eq!(c.wait_connected(Duration::from_secs(5)).unwrap(), server.epoch);
    assert_eq!(c.ping().unwrap(), server.epoch);
    let found = c.lookup_model("m", 2, hashes(3), true);
    assert_eq!((found.chunks, found.lease, found.error), (3, Some(LeaseId(7)), None));
    let key = InstanceKey { engine: 1, rank: 0 };
    assert_eq!(c.store(key, hashes(2), vec![0, 1], None).unwrap(), vec![StoreOutcome::Stored; 2]);

    let pending: Pending<_> = c.spawn(|core| async move { core.lookup_model("m", 1, hashes(4), false).await });
    let got = pending.wait(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(got.chunks, 4);
    assert!(pending.is_ready(), "a taken reply stays done");
    assert_eq!(pending.wait(Some(Duration::from_millis(1))).err(), Some(PendingError::Taken));
}

#[test]
fn a_pending_reply_is_not_ready_until_it_comes_and_ends_at_the_deadline() {
    let server = FakeServer::start();
    let c = client(&server.endpoint, Duration::from_millis(300));
    c.wait_connected(Duration::from_secs(5)).unwrap();
    let key = InstanceKey { engine: 1, rank: 0 };
    let start = Instant::now();
    let pending = c.spawn(move |core| async move { core.retrieve(key, hashes(1), vec![0], None).await });
    assert!(!pending.is_ready());
    assert_eq!(pending.wait(Some(Duration::from_millis(50))).err(), Some(PendingError::NotYet));
    assert!(!pending.is_ready(), "waiting without a value put it back");
    let r = pending.wait(None).unwrap();
    assert_eq!(r.outcomes, vec![RetrieveOutcome::Missing]);
    assert_eq!(r.error, Some(RequestError::Timeout));
    let took = start.elapsed();
    assert!(took >= Duration::from_millis(250) && took < Duration::from_secs(3), "{took:?}");
}

#[test]
fn a_reply_whose_client_is_dropped_ends_at_once_and_never_hangs() {
    let server = FakeServer::start();
    let c = Arc::new(client(&server.endpoint, Duration::from_secs(30)));
    c.wait_connected(Duration::from_secs(5)).unwrap();
    let key = InstanceKey { engine: 1, rank: 0 };
    let pending = c.spawn(move |core| async move { core.retrieve(key, hashes(1), vec![0], None).await });
    drop(Arc::try_unwrap(c).ok().expect("one owner"));
    let start = Instant::now();
    // Dropping the client closes its connection and then its runtime: the
    // request ends either with the connection's error (if the close reached
    // it first) or abandoned (if the runtime went first). Never a hang, never
    // a success.
    match pending.wait(Some(Duration::from_secs(10))) {
        Err(PendingError::Abandoned) => {}
        Ok(r) => assert!(r.error.is_some(), "a retrieve cut off by the close reports its error: {r:?}"),
        Err(other) => panic!("the pending reply must end, not {other:?}"),
    }
    assert!(start.elapsed() < Duration::from_secs(5));
}

#[test]
fn no_coordinator_means_disconnected_within_the_wait_and_fast_failures() {
    let dir = tempfile::tempdir().unwrap();
    let c = client(&Endpoint::Unix(dir.path().join("none.sock")), Duration::from_secs(5));
    let start = Instant::now();
    assert_eq!(c.wait_connected(Duration::from_millis(200)), Err(RequestError::Disconnected));
    assert!(start.elapsed() < Duration::from_secs(2));
    let key = InstanceKey { engine: 1, rank: 0 };
    assert_eq!(c.store(key, hashes(1), vec![0], None).unwrap_err().kind(), ErrorKind::Unavailable);
    let found = c.lookup_model("m", 1, hashes(1), true);
    assert_eq!((found.chunks, found.error.map(|e| e.kind())), (0, Some(ErrorKind::Unavailable)));
    c.close();
    assert_eq!(c.ping().unwrap_err(), RequestError::Closed);
}

//! Behaviour of framing, handshake, connections and reconnection against a
//! minimal in-test server built from the crate's own listener and handshake.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvcoord_transport::frame::{self, FrameError, DEFAULT_MAX_FRAME_BYTES};
use kvcoord_transport::handshake::{self, HandshakeError};
use kvcoord_transport::stream::FrameReader;
use kvcoord_transport::*;
use tokio::io::AsyncWriteExt;
use tokio::sync::Mutex;
use tokio::task::JoinSet;

#[derive(Clone, Copy)]
enum Behaviour {
    /// Answer every ping with a pong at once.
    Echo,
    /// Never answer.
    Hold,
    /// Collect this many requests, then answer them in reverse order.
    Reverse(usize),
}

/// A minimal server: handshake, then answer requests as `Behaviour` says.
struct TestServer {
    tasks: JoinSet<()>,
    epoch: ServerEpoch,
    endpoint: Endpoint,
}

fn welcome(epoch: ServerEpoch) -> Welcome {
    Welcome {
        protocol: PROTOCOL_VERSION,
        epoch,
        chunk_tokens: 256,
        limits: Limits { max_frame_bytes: DEFAULT_MAX_FRAME_BYTES, max_chunks_per_request: 4096 },
        server: "test".into(),
        tenant: "default".into(),
        admin: false,
    }
}

impl TestServer {
    async fn start(endpoint: Endpoint, behaviour: Behaviour) -> TestServer {
        let listener = Listener::bind(&endpoint).await.unwrap();
        let endpoint = listener.local_endpoint();
        let epoch = ServerEpoch::random();
        let mut tasks = JoinSet::new();
        let conns = Arc::new(Mutex::new(JoinSet::new()));
        tasks.spawn(async move {
            let _keep = conns.clone();
            loop {
                let Ok((mut r, mut w, _)) = listener.accept(DEFAULT_MAX_FRAME_BYTES).await else { return };
                conns.lock().await.spawn(async move {
                    if handshake::welcome(&mut r, &mut w, &welcome(epoch), Duration::from_secs(1)).await.is_err() {
                        return;
                    }
                    let mut held = Vec::new();
                    while let Ok((ClientFrame::Request(req), _)) = r.read::<ClientFrame>().await {
                        let reply = Reply { id: req.id, result: Ok(ReplyBody::Pong { epoch }) };
                        match behaviour {
                            Behaviour::Echo => w.send(&ServerFrame::Reply(reply)).await.unwrap(),
                            Behaviour::Hold => held.push(reply),
                            Behaviour::Reverse(n) => {
                                held.push(reply);
                                if held.len() == n {
                                    for reply in held.drain(..).rev() {
                                        w.send(&ServerFrame::Reply(reply)).await.unwrap();
                                    }
                                }
                            }
                        }
                    }
                });
            }
        });
        TestServer { tasks, epoch, endpoint }
    }

    /// Drops the listener and every connection at once.
    fn kill(mut self) {
        self.tasks.abort_all();
        // The accept task owns the connection set through `_keep`; aborting it
        // drops the set, which aborts every connection task.
        std::mem::drop(self.tasks.try_join_next());
    }
}

fn sock(dir: &tempfile::TempDir) -> Endpoint {
    Endpoint::Unix(dir.path().join("kv.sock"))
}

#[tokio::test]
async fn out_of_order_replies_reach_their_own_requests() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(sock(&dir), Behaviour::Reverse(8)).await;
    let conn = Connection::open(&server.endpoint, &ConnectOptions::default()).await.unwrap();
    let reqs = (0..8).map(|_| conn.request(RequestBody::Ping, Duration::from_secs(5), vec![]));
    let replies = futures::future::join_all(reqs).await;
    for r in replies {
        assert_eq!(r.unwrap(), ReplyBody::Pong { epoch: server.epoch });
    }
    assert_eq!(conn.in_flight(), 0);
}

#[tokio::test]
async fn request_past_its_deadline_fails_with_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(sock(&dir), Behaviour::Hold).await;
    let conn = Connection::open(&server.endpoint, &ConnectOptions::default()).await.unwrap();
    let t = Instant::now();
    let err = conn.request(RequestBody::Ping, Duration::from_millis(50), vec![]).await.unwrap_err();
    assert_eq!(err, RequestError::Timeout);
    assert!(t.elapsed() < Duration::from_millis(500), "took {:?}", t.elapsed());
    assert!(err.is_retriable());
    assert_eq!(conn.in_flight(), 0, "a timed-out request leaves no waiter behind");
}

#[tokio::test]
async fn server_dropped_with_100_requests_in_flight_fails_them_all_within_100ms() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(sock(&dir), Behaviour::Hold).await;
    let conn = Connection::open(&server.endpoint, &ConnectOptions::default()).await.unwrap();
    let mut set = JoinSet::new();
    for _ in 0..100 {
        let c = conn.clone();
        set.spawn(async move {
            let r = c.request(RequestBody::Ping, Duration::from_secs(30), vec![]).await;
            (r, Instant::now())
        });
    }
    while conn.in_flight() < 100 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let dropped_at = Instant::now();
    server.kill();
    let mut failed = 0;
    while let Some(res) = set.join_next().await {
        let (r, at) = res.unwrap();
        assert_eq!(r.unwrap_err(), RequestError::ConnectionLost);
        assert!(at.duration_since(dropped_at) < Duration::from_millis(100), "failed after {:?}", at - dropped_at);
        failed += 1;
    }
    assert_eq!(failed, 100);
    let err = conn.request(RequestBody::Ping, Duration::from_secs(1), vec![]).await.unwrap_err();
    assert_eq!(err, RequestError::ConnectionLost, "a dead connection refuses new requests at once");
}

#[tokio::test]
async fn server_back_on_the_same_socket_is_reconnected_with_its_new_epoch() {
    let dir = tempfile::tempdir().unwrap();
    let server = TestServer::start(sock(&dir), Behaviour::Echo).await;
    let first_epoch = server.epoch;
    let client = ReconnectingClient::start(server.endpoint.clone(), ReconnectOptions::default());
    let mut link = client.subscribe();
    link.wait_for(|s| s.connections == 1).await.unwrap();
    assert_eq!(link.borrow().epoch, Some(first_epoch));
    server.kill();
    let server = TestServer::start(sock(&dir), Behaviour::Echo).await;
    let state = tokio::time::timeout(Duration::from_secs(5), link.wait_for(|s| s.connections == 2))
        .await
        .expect("reconnected by itself")
        .unwrap()
        .clone();
    assert_eq!(state.epoch, Some(server.epoch));
    assert_ne!(state.epoch, Some(first_epoch));
    let conn = client.connection(Duration::from_secs(1)).await.unwrap();
    assert_eq!(
        conn.request(RequestBody::Ping, Duration::from_secs(1), vec![]).await.unwrap(),
        ReplyBody::Pong { epoch: server.epoch }
    );
    client.close();
    assert_eq!(client.connection(Duration::from_millis(10)).await.unwrap_err(), RequestError::Closed);
}

#[tokio::test]
async fn while_disconnected_requests_fail_fast_after_the_configured_wait() {
    let dir = tempfile::tempdir().unwrap();
    let client = ReconnectingClient::start(sock(&dir), ReconnectOptions::default());
    let t = Instant::now();
    let err = client.connection(Duration::from_millis(20)).await.unwrap_err();
    assert_eq!(err, RequestError::Disconnected);
    assert!(t.elapsed() < Duration::from_millis(300));
    assert!(client.subscribe().borrow().last_error.is_some());
}

#[tokio::test]
async fn a_listener_that_never_answers_fails_connect_within_its_deadline() {
    // A bound TCP socket whose backlog accepts connections but that never reads.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let endpoint = Endpoint::Tcp(silent.local_addr().unwrap().to_string());
    let opts = ConnectOptions { handshake_timeout: Duration::from_millis(100), ..Default::default() };
    let t = Instant::now();
    let err = Connection::open(&endpoint, &opts).await.err().unwrap();
    assert!(matches!(err, ConnectError::Handshake(HandshakeError::Timeout(_))), "{err}");
    assert!(t.elapsed() < Duration::from_millis(1000));

    let client = ReconnectingClient::start(endpoint, ReconnectOptions { connect: opts, ..ReconnectOptions::default() });
    let t = Instant::now();
    assert_eq!(client.connection(Duration::from_millis(150)).await.unwrap_err(), RequestError::Disconnected);
    assert!(t.elapsed() < Duration::from_millis(1000));
}

#[tokio::test]
async fn protocol_mismatch_is_refused_clearly_on_both_sides() {
    let dir = tempfile::tempdir().unwrap();
    let listener = Listener::bind(&sock(&dir)).await.unwrap();
    let endpoint = listener.local_endpoint();
    let server = tokio::spawn(async move {
        let (mut r, mut w, _) = listener.accept(DEFAULT_MAX_FRAME_BYTES).await.unwrap();
        handshake::welcome(&mut r, &mut w, &welcome(ServerEpoch(7)), Duration::from_secs(1)).await
    });
    let opts = ConnectOptions { protocol: PROTOCOL_VERSION + 1, ..Default::default() };
    let err = Connection::open(&endpoint, &opts).await.err().unwrap();
    match err {
        ConnectError::Handshake(HandshakeError::Refused(e)) => {
            assert_eq!(e.kind, ErrorKind::ProtocolMismatch);
            assert!(e.message.contains(&format!("{}", PROTOCOL_VERSION + 1)), "{}", e.message);
        }
        other => panic!("expected a refusal, got {other}"),
    }
    let server_side = server.await.unwrap().unwrap_err();
    assert!(matches!(server_side, HandshakeError::ProtocolMismatch { theirs, .. } if theirs == PROTOCOL_VERSION + 1));
}

/// A reader over one end of a socket pair whose other end the test writes.
async fn raw_pair(max: u32) -> (FrameReader, tokio::net::UnixStream) {
    let (a, b) = tokio::net::UnixStream::pair().unwrap();
    let (r, _w) = kvcoord_transport::stream::unix_pair(a, max);
    std::mem::forget(_w);
    (r, b)
}

#[tokio::test]
async fn oversized_frame_is_refused_before_allocating() {
    let (mut r, mut peer) = raw_pair(1024).await;
    // Claims 4 GiB - 1; the reader must refuse on the header alone.
    peer.write_all(&[0xff, 0xff, 0xff, 0xff, 0]).await.unwrap();
    let err = r.read::<ClientFrame>().await.unwrap_err();
    assert!(matches!(err, FrameError::TooLarge { len: 0xffff_ffff, max: 1024 }), "{err}");
}

#[tokio::test]
async fn garbage_payload_is_a_decode_error_not_a_panic() {
    let (mut r, mut peer) = raw_pair(1024).await;
    let mut bytes = vec![200, 0, 0, 0, 0];
    bytes.extend((0..200u32).map(|i| (i * 37 + 11) as u8));
    peer.write_all(&bytes).await.unwrap();
    assert!(matches!(r.read::<ClientFrame>().await.unwrap_err(), FrameError::Decode(_)));
}

#[tokio::test]
async fn unknown_variant_is_a_decode_error() {
    let (mut r, mut peer) = raw_pair(1024).await;
    // Variant index 9 of ClientFrame does not exist.
    peer.write_all(&[1, 0, 0, 0, 0, 9]).await.unwrap();
    assert!(matches!(r.read::<ClientFrame>().await.unwrap_err(), FrameError::Decode(_)));
}

#[tokio::test]
async fn truncated_frame_is_reported_as_truncated() {
    let (mut r, mut peer) = raw_pair(1024).await;
    let f = frame::encode(
        &ClientFrame::Request(Request { id: RequestId(1), deadline_ms: 5, body: RequestBody::Ping }),
        0,
        1024,
    )
    .unwrap();
    peer.write_all(&f[..f.len() - 1]).await.unwrap();
    drop(peer);
    assert!(matches!(r.read::<ClientFrame>().await.unwrap_err(), FrameError::Truncated { .. }));
}

#[tokio::test]
async fn frame_declaring_descriptors_that_never_came_is_refused() {
    let (mut r, mut peer) = raw_pair(1024).await;
    let f = frame::encode(
        &ClientFrame::Request(Request { id: RequestId(1), deadline_ms: 5, body: RequestBody::Ping }),
        1,
        1024,
    )
    .unwrap();
    peer.write_all(&f).await.unwrap();
    assert!(matches!(r.read::<ClientFrame>().await.unwrap_err(), FrameError::FdMismatch { declared: 1, received: 0 }));
}

#[tokio::test]
async fn a_declared_length_costs_nothing_until_its_bytes_arrive_and_the_buffer_shrinks_after() {
    let (mut r, mut peer) = raw_pair(frame::DEFAULT_MAX_FRAME_BYTES).await;
    let start = r.buffer_capacity();
    let big = ClientFrame::Hello(Hello { protocol: 1, client: "x".repeat(4 << 20), token: None });
    let bytes = frame::encode(&big, 0, frame::DEFAULT_MAX_FRAME_BYTES).unwrap();
    peer.write_all(&bytes[..frame::HEADER_BYTES + 10]).await.unwrap();
    let read = tokio::spawn(async move {
        let f = r.read::<ClientFrame>().await.map(|(f, _)| f);
        (f, r)
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    peer.write_all(&bytes[frame::HEADER_BYTES + 10..]).await.unwrap();
    let (f, mut r) = read.await.unwrap();
    assert_eq!(f.unwrap(), big);
    assert!(r.buffer_capacity() <= 2 * bytes.len(), "grew to {}", r.buffer_capacity());
    let ping = ClientFrame::Request(Request { id: RequestId(1), deadline_ms: 5, body: RequestBody::Ping });
    peer.write_all(&frame::encode(&ping, 0, 1024).unwrap()).await.unwrap();
    assert_eq!(r.read::<ClientFrame>().await.unwrap().0, ping);
    assert_eq!(r.buffer_capacity(), start, "back to its first size once the large frame is gone");
}

#[tokio::test]
async fn descriptors_no_frame_declared_are_refused() {
    use std::os::fd::AsRawFd;
    let (mut r, peer) = raw_pair(1024).await;
    let devnull = std::fs::File::open("/dev/null").unwrap();
    let ping = ClientFrame::Request(Request { id: RequestId(1), deadline_ms: 5, body: RequestBody::Ping });
    let f = frame::encode(&ping, 0, 1024).unwrap();
    let peer = peer.into_std().unwrap();
    nix::sys::socket::sendmsg::<()>(
        peer.as_raw_fd(),
        &[std::io::IoSlice::new(&f)],
        &[nix::sys::socket::ControlMessage::ScmRights(&[devnull.as_raw_fd(); 3])],
        nix::sys::socket::MsgFlags::empty(),
        None,
    )
    .unwrap();
    assert!(matches!(r.read::<ClientFrame>().await.unwrap_err(), FrameError::StrayFds { count: 3 }));
}

//! One client connection to one server (so one server epoch): many requests
//! in flight, replies matched by id in any order, a deadline per request, and
//! every in-flight request failed at once when the connection drops.
//!
//! Race-free completion is guaranteed here: each request's whole result (the
//! reply body, or a typed error) travels as ONE value through its own
//! `oneshot` channel, and the waiter's only way to see completion is to
//! receive that value. There is no separate "done" flag to observe early.
//!
//! This module must never reconnect (that is `reconnect.rs`) nor retry.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, watch};

use crate::endpoint::Endpoint;
use crate::error::{ErrorKind, WireError};
use crate::frame::{self, FrameError};
use crate::handshake::{self, HandshakeError};
use crate::protocol::{ClientFrame, ReplyBody, Request, RequestBody, RequestId, ServerEpoch, ServerFrame, Welcome};
use crate::stream::{write_loop, FrameReader, FrameWriter, OutFrame};

/// How a request failed, seen from the client.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The server answered with a typed error.
    #[error("server: {0}")]
    Server(WireError),
    /// No reply within the request's deadline.
    #[error("no reply within the deadline")]
    Timeout,
    /// The connection dropped before the reply came (or before sending).
    #[error("connection lost")]
    ConnectionLost,
    /// Not connected (a reconnecting client is between connections).
    #[error("not connected to the coordinator")]
    Disconnected,
    /// The request could not be encoded (e.g. larger than the frame limit).
    #[error("cannot send request: {0}")]
    Encode(String),
    /// The client was closed.
    #[error("client closed")]
    Closed,
    /// The request would hand memory (a memfd, CUDA IPC handles) to a server
    /// this client does not trust: one running as another uid than ours or
    /// root (or the allowed ones), or one whose uid cannot be known (TCP).
    #[error("{0}")]
    UntrustedServer(String),
}

impl RequestError {
    /// The protocol's error kind for this failure.
    pub fn kind(&self) -> ErrorKind {
        match self {
            RequestError::Server(e) => e.kind,
            RequestError::Timeout => ErrorKind::Timeout,
            RequestError::ConnectionLost | RequestError::Disconnected => ErrorKind::Unavailable,
            RequestError::Encode(_) => ErrorKind::InvalidArgument,
            RequestError::Closed => ErrorKind::ShuttingDown,
            RequestError::UntrustedServer(_) => ErrorKind::PermissionDenied,
        }
    }

    pub fn is_retriable(&self) -> bool {
        self.kind().is_retriable()
    }
}

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect to {endpoint}: {source}")]
    Io { endpoint: String, source: std::io::Error },
    #[error("connect to {0} timed out")]
    Timeout(String),
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
}

/// Options of one connection.
#[derive(Clone)]
pub struct ConnectOptions {
    pub client_name: String,
    pub connect_timeout: Duration,
    pub handshake_timeout: Duration,
    pub max_frame_bytes: u32,
    /// The protocol version to announce (tests use this to provoke a mismatch).
    pub protocol: u32,
    /// The token to present in the hello (a tenant's or the admin's).
    pub token: Option<String>,
    /// TLS over TCP, trusting the CAs of this configuration
    /// (`kvcoord_transport::tls::client_config`).
    pub tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    /// Server uids trusted with our memory (memfds, CUDA IPC handles),
    /// besides our own uid and root, which always are.
    pub trusted_server_uids: Vec<u32>,
}

impl std::fmt::Debug for ConnectOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnectOptions")
            .field("client_name", &self.client_name)
            .field("connect_timeout", &self.connect_timeout)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("max_frame_bytes", &self.max_frame_bytes)
            .field("protocol", &self.protocol)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .field("tls", &self.tls.is_some())
            .field("trusted_server_uids", &self.trusted_server_uids)
            .finish()
    }
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            client_name: format!("kvcoord-client/{}", std::process::id()),
            connect_timeout: Duration::from_secs(1),
            handshake_timeout: Duration::from_secs(2),
            max_frame_bytes: frame::DEFAULT_MAX_FRAME_BYTES,
            protocol: crate::protocol::PROTOCOL_VERSION,
            token: None,
            tls: None,
            trusted_server_uids: Vec::new(),
        }
    }
}

/// Who the server is, as far as this client can tell, and whether it may
/// be handed our memory.
#[derive(Clone, Debug)]
enum ServerTrust {
    /// A Unix socket peer running as a trusted uid.
    Trusted,
    /// Why memory must not be sent to it.
    Untrusted(String),
}

impl ServerTrust {
    fn of(peer: Option<crate::endpoint::PeerCredentials>, extra: &[u32]) -> ServerTrust {
        let me = nix::unistd::geteuid().as_raw();
        match peer {
            Some(c) if c.uid == me || c.uid == 0 || extra.contains(&c.uid) => ServerTrust::Trusted,
            Some(c) => ServerTrust::Untrusted(format!(
                "the server at this socket runs as uid {}, not as our uid {me} or root; \
                 not sending it our KV-cache memory (trust it with ConnectOptions::trusted_server_uids)",
                c.uid
            )),
            None => ServerTrust::Untrusted(
                "KV-cache memory is only handed to a server on a Unix socket, whose uid can be checked".into(),
            ),
        }
    }
}

type Completion = oneshot::Sender<Result<ReplyBody, RequestError>>;

struct InFlight {
    open: bool,
    waiters: HashMap<u64, Completion>,
}

/// A live connection. Dropping the last handle closes it.
pub struct Connection {
    welcome: Welcome,
    outgoing: mpsc::UnboundedSender<OutFrame>,
    in_flight: Arc<Mutex<InFlight>>,
    next_id: AtomicU64,
    max_frame: u32,
    passes_fds: bool,
    trust: ServerTrust,
    shutdown: watch::Sender<bool>,
    dead: watch::Receiver<bool>,
}

/// Removes a waiter whose request future was dropped (cancelled) or timed out.
struct WaiterGuard<'a> {
    in_flight: &'a Mutex<InFlight>,
    id: u64,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        self.in_flight.lock().waiters.remove(&self.id);
    }
}

impl Connection {
    /// Connects to `endpoint` and does the handshake.
    pub async fn open(endpoint: &Endpoint, opts: &ConnectOptions) -> Result<Arc<Connection>, ConnectError> {
        let connect = endpoint.connect_with(opts.max_frame_bytes, opts.tls.as_ref());
        let (mut reader, mut writer, peer) = tokio::time::timeout(opts.connect_timeout, connect)
            .await
            .map_err(|_| ConnectError::Timeout(endpoint.to_string()))?
            .map_err(|source| ConnectError::Io { endpoint: endpoint.to_string(), source })?;
        let welcome = handshake::hello(
            &mut reader,
            &mut writer,
            &opts.client_name,
            opts.token.as_deref(),
            opts.protocol,
            opts.handshake_timeout,
        )
        .await?;
        let max_frame = welcome.limits.max_frame_bytes.min(opts.max_frame_bytes);
        let trust = ServerTrust::of(peer, &opts.trusted_server_uids);
        Ok(Self::start(reader, writer, welcome, max_frame, endpoint.passes_fds(), trust))
    }

    fn start(
        reader: FrameReader,
        writer: FrameWriter,
        welcome: Welcome,
        max_frame: u32,
        passes_fds: bool,
        trust: ServerTrust,
    ) -> Arc<Connection> {
        let (tx, rx) = mpsc::unbounded_channel();
        let in_flight = Arc::new(Mutex::new(InFlight { open: true, waiters: HashMap::new() }));
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (dead_tx, dead) = watch::channel(false);
        let conn = Arc::new(Connection {
            welcome,
            outgoing: tx,
            in_flight: in_flight.clone(),
            next_id: AtomicU64::new(1),
            max_frame,
            passes_fds,
            trust,
            shutdown,
            dead,
        });
        tokio::spawn(run_io(reader, writer, rx, in_flight, shutdown_rx, dead_tx));
        conn
    }

    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    pub fn epoch(&self) -> ServerEpoch {
        self.welcome.epoch
    }

    /// Whether the connection has dropped.
    pub fn is_dead(&self) -> bool {
        *self.dead.borrow()
    }

    /// Resolves when the connection has dropped (for any reason).
    pub async fn dead(&self) {
        let mut rx = self.dead.clone();
        let _ = rx.wait_for(|d| *d).await;
    }

    /// Closes the connection; in-flight requests fail with `ConnectionLost`.
    pub fn close(&self) {
        let _ = self.shutdown.send(true);
    }

    /// Requests currently waiting for a reply.
    pub fn in_flight(&self) -> usize {
        self.in_flight.lock().waiters.len()
    }

    /// Sends one request and waits for its reply, at most `timeout`.
    /// `fds` travel with the frame (Unix sockets only).
    pub async fn request(
        &self,
        body: RequestBody,
        timeout: Duration,
        fds: Vec<OwnedFd>,
    ) -> Result<ReplyBody, RequestError> {
        if !fds.is_empty() && !self.passes_fds {
            return Err(RequestError::Encode("file descriptors can only be passed over a Unix socket".into()));
        }
        if let (RequestBody::Register(_), ServerTrust::Untrusted(why)) = (&body, &self.trust) {
            return Err(RequestError::UntrustedServer(why.clone()));
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let deadline_ms = timeout.as_millis().min(u32::MAX as u128) as u32;
        let frame = ClientFrame::Request(Request { id: RequestId(id), deadline_ms, body });
        let bytes =
            frame::encode(&frame, fds.len() as u8, self.max_frame).map_err(|e| RequestError::Encode(e.to_string()))?;
        let (tx, rx) = oneshot::channel();
        {
            let mut f = self.in_flight.lock();
            if !f.open {
                return Err(RequestError::ConnectionLost);
            }
            f.waiters.insert(id, tx);
        }
        let _guard = WaiterGuard { in_flight: &self.in_flight, id };
        if self.outgoing.send(OutFrame { bytes, fds }).is_err() {
            return Err(RequestError::ConnectionLost);
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(result)) => result,
            Ok(Err(_)) => Err(RequestError::ConnectionLost),
            Err(_) => Err(RequestError::Timeout),
        }
    }
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("epoch", &self.welcome.epoch)
            .field("dead", &self.is_dead())
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        let _ = self.shutdown.send(true);
    }
}

/// Fails every waiter at once and refuses new ones.
fn fail_all(in_flight: &Mutex<InFlight>) {
    let waiters = {
        let mut f = in_flight.lock();
        f.open = false;
        std::mem::take(&mut f.waiters)
    };
    for (_, w) in waiters {
        let _ = w.send(Err(RequestError::ConnectionLost));
    }
}

async fn run_io(
    mut reader: FrameReader,
    writer: FrameWriter,
    rx: mpsc::UnboundedReceiver<OutFrame>,
    in_flight: Arc<Mutex<InFlight>>,
    mut shutdown: watch::Receiver<bool>,
    dead: watch::Sender<bool>,
) {
    let write = write_loop(writer, rx);
    let read = async {
        loop {
            match reader.read::<ServerFrame>().await {
                Ok((ServerFrame::Reply(reply), _)) => {
                    let waiter = in_flight.lock().waiters.remove(&reply.id.0);
                    if let Some(w) = waiter {
                        let _ = w.send(reply.result.map_err(RequestError::Server));
                    }
                }
                Ok((ServerFrame::Undecodable(e) | ServerFrame::Refused(e), _)) => {
                    tracing::warn!(error = %e, "server closed the connection");
                    return;
                }
                Ok((ServerFrame::Welcome(_), _)) => {
                    tracing::warn!("unexpected second welcome; closing");
                    return;
                }
                Err(FrameError::Closed) => return,
                Err(e) => {
                    tracing::debug!(error = %e, "connection read failed");
                    return;
                }
            }
        }
    };
    tokio::select! {
        _ = read => {}
        _ = write => {}
        _ = shutdown.wait_for(|s| *s) => {}
    }
    fail_all(&in_flight);
    let _ = dead.send(true);
}

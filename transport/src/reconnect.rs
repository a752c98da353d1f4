//! A client that stays connected by itself: on any drop it reconnects with
//! jittered exponential backoff (first retry at once, then from
//! `backoff_initial` doubling to `backoff_max`), publishes every
//! (re)connection with the server's epoch to its owner, and fails requests
//! fast while disconnected (after waiting at most the caller's `wait`).
//!
//! This module owns the reconnect loop only. It must never re-register or
//! retry requests: that is the owner's decision (see the worker client).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::connection::{ConnectOptions, Connection, RequestError};
use crate::endpoint::Endpoint;
use crate::protocol::ServerEpoch;

/// Reconnect behaviour.
#[derive(Clone, Debug)]
pub struct ReconnectOptions {
    pub connect: ConnectOptions,
    /// Sleep after the first failed attempt (jittered to 50-100%).
    pub backoff_initial: Duration,
    /// Upper bound of the backoff.
    pub backoff_max: Duration,
}

impl Default for ReconnectOptions {
    fn default() -> Self {
        ReconnectOptions {
            connect: ConnectOptions::default(),
            backoff_initial: Duration::from_millis(5),
            backoff_max: Duration::from_millis(500),
        }
    }
}

/// What the owner sees: the current connection, and how many there have been.
#[derive(Clone)]
pub struct LinkState {
    /// The live connection, if any.
    pub connection: Option<Arc<Connection>>,
    /// Connections made so far (1 after the first, 2 after a reconnect, ...).
    pub connections: u64,
    /// Epoch of the most recent connection.
    pub epoch: Option<ServerEpoch>,
    /// Why the last attempt failed, if it did.
    pub last_error: Option<String>,
    /// The client was closed.
    pub closed: bool,
    /// The server's refusal of the last handshake, if it refused one that
    /// retrying cannot fix (`Unauthorized`: a missing or wrong token, a uid
    /// not allowed; `ProtocolMismatch`), until a connection succeeds.
    pub refused: Option<crate::error::WireError>,
}

/// A self-reconnecting client. Cheap to clone; closes when `close` is called
/// or the last clone drops.
#[derive(Clone)]
pub struct ReconnectingClient {
    inner: Arc<Inner>,
}

struct Inner {
    endpoint: Endpoint,
    state: watch::Sender<LinkState>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.state.send_modify(|s| s.closed = true);
    }
}

impl ReconnectingClient {
    /// Starts connecting to `endpoint` in the background; returns at once.
    pub fn start(endpoint: Endpoint, opts: ReconnectOptions) -> Self {
        let (state, _) = watch::channel(LinkState {
            connection: None,
            connections: 0,
            epoch: None,
            last_error: None,
            closed: false,
            refused: None,
        });
        let inner = Arc::new(Inner { endpoint, state });
        tokio::spawn(reconnect_loop(Arc::downgrade(&inner), opts));
        ReconnectingClient { inner }
    }

    pub fn endpoint(&self) -> &Endpoint {
        &self.inner.endpoint
    }

    /// Watches the link: every (re)connection changes `connections` and `epoch`.
    pub fn subscribe(&self) -> watch::Receiver<LinkState> {
        self.inner.state.subscribe()
    }

    /// The live connection, waiting at most `wait` for one.
    pub async fn connection(&self, wait: Duration) -> Result<Arc<Connection>, RequestError> {
        let mut rx = self.inner.state.subscribe();
        let ready = |s: &LinkState| s.closed || s.connection.as_ref().is_some_and(|c| !c.is_dead());
        let state = match tokio::time::timeout(wait, rx.wait_for(ready)).await {
            Ok(Ok(s)) => s.clone(),
            Ok(Err(_)) => return Err(RequestError::Closed),
            Err(_) => return Err(RequestError::Disconnected),
        };
        if state.closed {
            return Err(RequestError::Closed);
        }
        state.connection.ok_or(RequestError::Disconnected)
    }

    /// Stops reconnecting and closes the live connection.
    pub fn close(&self) {
        self.inner.state.send_modify(|s| {
            s.closed = true;
            if let Some(c) = s.connection.take() {
                c.close();
            }
        });
    }
}

async fn reconnect_loop(inner: std::sync::Weak<Inner>, opts: ReconnectOptions) {
    let mut backoff = opts.backoff_initial;
    loop {
        let Some(this) = inner.upgrade() else { return };
        let mut rx = this.state.subscribe();
        if rx.borrow().closed {
            return;
        }
        let endpoint = this.endpoint.clone();
        drop(this);
        let attempt = tokio::select! {
            r = Connection::open(&endpoint, &opts.connect) => r,
            _ = rx.wait_for(|s| s.closed) => return,
        };
        let Some(this) = inner.upgrade() else { return };
        match attempt {
            Ok(conn) => {
                backoff = opts.backoff_initial;
                let epoch = conn.epoch();
                tracing::info!(endpoint = %endpoint, epoch = epoch.0, "connected");
                let mut closed = false;
                this.state.send_modify(|s| {
                    closed = s.closed;
                    if !closed {
                        s.connection = Some(conn.clone());
                        s.connections += 1;
                        s.epoch = Some(epoch);
                        s.last_error = None;
                        s.refused = None;
                    }
                });
                drop(this);
                if closed {
                    conn.close();
                    return;
                }
                tokio::select! {
                    _ = conn.dead() => {}
                    _ = rx.wait_for(|s| s.closed) => { conn.close(); return; }
                }
                tracing::info!(endpoint = %endpoint, epoch = epoch.0, "disconnected; reconnecting");
                let Some(this) = inner.upgrade() else { return };
                this.state.send_modify(|s| {
                    if s.connection.as_ref().is_some_and(|c| Arc::ptr_eq(c, &conn)) {
                        s.connection = None;
                    }
                });
                // Reconnect at once after a drop: the first retry is immediate.
            }
            Err(e) => {
                tracing::debug!(endpoint = %endpoint, error = %e, "connect failed");
                let refused = match &e {
                    crate::connection::ConnectError::Handshake(crate::handshake::HandshakeError::Refused(w))
                        if !w.is_retriable() =>
                    {
                        Some(w.clone())
                    }
                    _ => None,
                };
                this.state.send_modify(|s| {
                    s.last_error = Some(e.to_string());
                    s.refused = refused;
                });
                drop(this);
                let sleep = backoff.mul_f64(rand::random_range(0.5..=1.0));
                backoff = (backoff * 2).min(opts.backoff_max);
                tokio::select! {
                    _ = tokio::time::sleep(sleep) => {}
                    _ = rx.wait_for(|s| s.closed) => return,
                }
            }
        }
    }
}

//! The session actor: one per client connection. It turns incoming frames
//! into requests, serves each concurrently, and queues exactly one reply per
//! request for the connection's writer. When the connection closes it tells
//! the supervisor, which starts the grace period for the client's instances.
//!
//! It must never hold state about instances: it routes through shared state.
//! Undecodable, oversized or malformed frames get an `Undecodable` frame and
//! a clean disconnect.
//!
//! Bounded per connection: at most `max_in_flight_per_session` requests are
//! served at once, each holding a permit from reading its frame until its
//! reply is queued, and the reply queue holds at most as many replies. When
//! the permits run out the session stops reading the socket, so a client
//! that pipelines requests and never reads its replies stalls itself (the
//! kernel's socket buffers fill) instead of growing the server. A connection
//! with nothing in flight that sent nothing for `idle_timeout_ms` is closed
//! with `Refused(Timeout)`.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use kvcoord_transport::frame::{self, FrameError};
use kvcoord_transport::stream::{FrameReader, OutFrame};
use kvcoord_transport::{ClientFrame, ErrorKind, Reply, Request, ServerFrame, WireError};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::access::Principal;
use super::logsafe::RateLimit;
use super::requests;
use super::state::{ConnectionSlot, InFlight, ServerShared};
use super::supervisor::{SessionClosed, Supervisor};

type IncomingFrame = (Result<(ClientFrame, Vec<OwnedFd>), FrameError>, OwnedSemaphorePermit);

/// Warnings one session may log a second (the rest are counted).
const WARNINGS_PER_SECOND: u32 = 5;

pub struct Session {
    id: u64,
    /// Who the connection's credentials say it is.
    principal: Principal,
    peer: String,
    shared: Arc<ServerShared>,
    supervisor: Addr<Supervisor>,
    out: mpsc::Sender<OutFrame>,
    /// Requests being served whose reply is not queued yet.
    serving: Arc<AtomicUsize>,
    last_received: Instant,
    warnings: RateLimit,
    _slot: ConnectionSlot,
}

impl Session {
    /// Starts a session over a connection that has completed its handshake.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        id: u64,
        principal: Principal,
        peer: String,
        reader: FrameReader,
        out: mpsc::Sender<OutFrame>,
        slot: ConnectionSlot,
        shared: Arc<ServerShared>,
        supervisor: Addr<Supervisor>,
    ) -> Addr<Session> {
        let permits = Arc::new(Semaphore::new(shared.config.max_in_flight_per_session as usize));
        let frames = futures::stream::unfold(Some((reader, permits.clone())), |state| async move {
            let (mut reader, permits) = state?;
            // No permit, no read: backpressure reaches the client's socket.
            let permit = permits.clone().acquire_owned().await.ok()?;
            let item = reader.read::<ClientFrame>().await;
            let next = if item.is_ok() { Some((reader, permits)) } else { None };
            Some(((item, permit), next))
        });
        Session::create(move |ctx| {
            ctx.add_stream(frames);
            Session {
                id,
                principal,
                peer,
                shared,
                supervisor,
                out,
                serving: Arc::new(AtomicUsize::new(0)),
                last_received: Instant::now(),
                warnings: RateLimit::new(WARNINGS_PER_SECOND),
                _slot: slot,
            }
        })
    }

    /// Logs a warning the peer provoked, at most [`WARNINGS_PER_SECOND`].
    fn warn(&mut self, error: &dyn std::fmt::Display, what: &str) {
        if let Some(suppressed) = self.warnings.allow() {
            tracing::warn!(session = self.id, error = %error, suppressed, "{what}");
        }
    }

    /// Closes the connection if it is idle past the configured timeout.
    /// Once only: actix's interval calls this back to back when its thread
    /// fell behind by more than a period, and a stopping session has already
    /// sent its `Refused(Timeout)`.
    fn check_idle(&mut self, ctx: &mut Context<Self>) {
        if ctx.state().stopping() {
            return;
        }
        let idle = Duration::from_millis(self.shared.config.idle_timeout_ms);
        if self.serving.load(Ordering::Acquire) == 0 && self.last_received.elapsed() >= idle {
            tracing::info!(session = self.id, idle_ms = idle.as_millis() as u64, "idle connection closed");
            self.send_frame(&ServerFrame::Refused(WireError::new(
                ErrorKind::Timeout,
                format!("connection idle for {} ms (idle_timeout_ms); closing", idle.as_millis()),
            )));
            ctx.stop();
        }
    }

    fn send_frame(&self, f: &ServerFrame) {
        let bytes = match frame::encode(f, 0, self.shared.config.max_frame_bytes) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "reply could not be encoded");
                return;
            }
        };
        // Only before closing: a full queue means the peer reads nothing.
        let _ = self.out.try_send(OutFrame { bytes, fds: Vec::new() });
    }

    fn serve(&self, req: Request, fds: Vec<OwnedFd>, permit: OwnedSemaphorePermit) {
        let (shared, supervisor, out, session, who) =
            (self.shared.clone(), self.supervisor.clone(), self.out.clone(), self.id, self.principal);
        let in_flight = InFlight::new(&shared);
        let serving = self.serving.clone();
        serving.fetch_add(1, Ordering::AcqRel);
        actix_rt::spawn(async move {
            let _in_flight = in_flight;
            let id = req.id;
            let op = req.body.op();
            let started = std::time::Instant::now();
            let result = requests::serve(&shared, &supervisor, (session, who), req, fds).await;
            shared.metrics.record(op, result.as_ref().map(|_| ()), started.elapsed());
            if let Err(e) = &result {
                tracing::debug!(session, op, error = %e, "request failed");
            }
            let max = shared.config.max_frame_bytes;
            let bytes = frame::encode(&ServerFrame::Reply(Reply { id, result }), 0, max).unwrap_or_else(|e| {
                let err = WireError::new(ErrorKind::Internal, format!("reply could not be encoded: {e}"));
                frame::encode(&ServerFrame::Reply(Reply { id, result: Err(err) }), 0, max)
                    .expect("a small error reply always fits the frame limit")
            });
            // Waits while the reply queue is full (the peer is not reading),
            // holding the permit, so the session reads no more requests.
            let _ = out.send(OutFrame { bytes, fds: Vec::new() }).await;
            drop(permit);
            serving.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

impl Actor for Session {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.shared.sessions.fetch_add(1, Ordering::Relaxed);
        let idle = self.shared.config.idle_timeout_ms;
        if idle > 0 {
            let every = Duration::from_millis(idle / 4).clamp(Duration::from_millis(25), Duration::from_secs(5));
            ctx.run_interval(every, Self::check_idle);
        }
        tracing::debug!(session = self.id, peer = %self.peer, "session started");
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.shared.sessions.fetch_sub(1, Ordering::Relaxed);
        self.supervisor.do_send(SessionClosed { session: self.id });
        tracing::debug!(session = self.id, "session ended");
    }
}

impl StreamHandler<IncomingFrame> for Session {
    fn handle(&mut self, (item, permit): IncomingFrame, ctx: &mut Self::Context) {
        self.last_received = Instant::now();
        match item {
            Ok((ClientFrame::Request(req), fds)) => self.serve(req, fds, permit),
            Ok((ClientFrame::Hello(_), _)) => {
                self.send_frame(&ServerFrame::Undecodable(WireError::new(
                    ErrorKind::InvalidArgument,
                    "Hello after the handshake",
                )));
                ctx.stop();
            }
            Err(FrameError::Closed) => ctx.stop(),
            Err(FrameError::Io(e)) => {
                tracing::debug!(session = self.id, error = %e, "connection error");
                ctx.stop();
            }
            Err(e) => {
                self.warn(&e, "bad frame; closing the connection");
                self.send_frame(&ServerFrame::Undecodable(WireError::new(ErrorKind::InvalidArgument, e.to_string())));
                ctx.stop();
            }
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

//! The session actor: one per client connection. It turns incoming frames
//! into requests, serves each concurrently, and queues exactly one reply per
//! request for the connection's writer. When the connection closes it tells
//! the supervisor, which starts the grace period for the client's instances.
//!
//! It must never hold state about instances: it routes through shared state.
//! Undecodable, oversized or malformed frames get an `Undecodable` frame and
//! a clean disconnect.

use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use actix::prelude::*;
use kvcoord_transport::frame::{self, FrameError};
use kvcoord_transport::stream::{FrameReader, OutFrame};
use kvcoord_transport::{ClientFrame, ErrorKind, Reply, Request, ServerFrame, WireError};
use tokio::sync::mpsc;

use super::requests;
use super::state::{InFlight, ServerShared};
use super::supervisor::{SessionClosed, Supervisor};

type IncomingFrame = Result<(ClientFrame, Vec<OwnedFd>), FrameError>;

pub struct Session {
    id: u64,
    peer: String,
    shared: Arc<ServerShared>,
    supervisor: Addr<Supervisor>,
    out: mpsc::UnboundedSender<OutFrame>,
}

impl Session {
    /// Starts a session over a connection that has completed its handshake.
    pub fn start(
        id: u64,
        peer: String,
        reader: FrameReader,
        out: mpsc::UnboundedSender<OutFrame>,
        shared: Arc<ServerShared>,
        supervisor: Addr<Supervisor>,
    ) -> Addr<Session> {
        let frames = futures::stream::unfold(Some(reader), |reader| async move {
            let mut reader = reader?;
            let item: IncomingFrame = reader.read::<ClientFrame>().await;
            let next = if item.is_ok() { Some(reader) } else { None };
            Some((item, next))
        });
        Session::create(move |ctx| {
            ctx.add_stream(frames);
            Session { id, peer, shared, supervisor, out }
        })
    }

    fn send_frame(&self, f: &ServerFrame) {
        let bytes = match frame::encode(f, 0, self.shared.config.max_frame_bytes) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "reply could not be encoded");
                return;
            }
        };
        let _ = self.out.send(OutFrame { bytes, fds: Vec::new() });
    }

    fn serve(&self, req: Request, fds: Vec<OwnedFd>) {
        let (shared, supervisor, out, session) =
            (self.shared.clone(), self.supervisor.clone(), self.out.clone(), self.id);
        let in_flight = InFlight::new(&shared);
        actix_rt::spawn(async move {
            let _in_flight = in_flight;
            let id = req.id;
            let op = req.body.op();
            let started = std::time::Instant::now();
            let result = requests::serve(&shared, &supervisor, session, req, fds).await;
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
            let _ = out.send(OutFrame { bytes, fds: Vec::new() });
        });
    }
}

impl Actor for Session {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Self::Context) {
        self.shared.sessions.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(session = self.id, peer = %self.peer, "session started");
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.shared.sessions.fetch_sub(1, Ordering::Relaxed);
        self.supervisor.do_send(SessionClosed { session: self.id });
        tracing::debug!(session = self.id, "session ended");
    }
}

impl StreamHandler<IncomingFrame> for Session {
    fn handle(&mut self, item: IncomingFrame, ctx: &mut Self::Context) {
        match item {
            Ok((ClientFrame::Request(req), fds)) => self.serve(req, fds),
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
                tracing::warn!(session = self.id, error = %e, "bad frame; closing the connection");
                self.send_frame(&ServerFrame::Undecodable(WireError::new(ErrorKind::InvalidArgument, e.to_string())));
                ctx.stop();
            }
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

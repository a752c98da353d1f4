//! Serving one request: each operation's routing, validation and deadline.
//! Every path ends in exactly one `Result`, which the session turns into the
//! request's one reply.
//!
//! Lookups, lease releases, clear and ping are answered here from shared
//! state, never queued behind copies (a lookup that misses L1 and disk asks
//! the remote tier too, within its deadline: `lookup.rs`). Stores and retrieves go to the
//! instance's actor and are bounded by their deadline through a [`JobGate`]:
//! a copy that has not started by the deadline never starts (reply
//! `Timeout`); one that has started is waited for, so a client told
//! "timeout" never sees its blocks written later.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use kvcoord_transport::{ErrorKind, ReplyBody, Request, RequestBody, WireError};
use tokio::time::Instant;

use super::copy_lane::JobGate;
use super::counters::Counters;
use super::instance::{self, InstanceActor};
use super::lookup::Lookup;
use super::state::{InstanceRoute, ServerShared};
use super::supervisor::{GetStats, GetStatus, InjectFault, Register, Supervisor, Unregister};

fn not_registered() -> WireError {
    WireError::new(ErrorKind::NotRegistered, "instance is not registered with this server; register again")
}

fn timeout() -> WireError {
    WireError::new(ErrorKind::Timeout, "deadline passed")
}

fn route(shared: &ServerShared, key: &kvcoord_transport::InstanceKey) -> Result<InstanceRoute, WireError> {
    let route = shared.route(key).ok_or_else(not_registered)?;
    route.touch(shared);
    Ok(route)
}

fn check_chunks(shared: &ServerShared, n: usize) -> Result<(), WireError> {
    let max = shared.config.max_chunks_per_request as usize;
    if n == 0 {
        return Err(WireError::new(ErrorKind::InvalidArgument, "request names no chunks"));
    }
    if n > max {
        return Err(WireError::new(ErrorKind::InvalidArgument, format!("{n} chunks in one request; at most {max}")));
    }
    Ok(())
}

/// Runs a store or retrieve at its instance, bounded by `deadline`.
async fn copy_at<M>(
    addr: Addr<InstanceActor>,
    msg: M,
    gate: Arc<JobGate>,
    deadline: Instant,
) -> Result<ReplyBody, WireError>
where
    M: Message<Result = Result<ReplyBody, WireError>> + Send + 'static,
    InstanceActor: Handler<M>,
{
    let reply = addr.send(msg);
    tokio::pin!(reply);
    let result = tokio::select! {
        r = &mut reply => r,
        _ = tokio::time::sleep_until(deadline) => {
            if gate.cancel() {
                return Err(timeout());
            }
            reply.await
        }
    };
    // The instance actor is gone (dropped or crashed): its registration is.
    result.map_err(|_| not_registered())?
}

/// Serves one request from session `session`.
pub async fn serve(
    shared: &Arc<ServerShared>,
    supervisor: &Addr<Supervisor>,
    session: u64,
    req: Request,
    mut fds: Vec<OwnedFd>,
) -> Result<ReplyBody, WireError> {
    if shared.is_shutting_down() {
        return Err(WireError::new(ErrorKind::ShuttingDown, "the coordinator is shutting down"));
    }
    let budget = Duration::from_millis((req.deadline_ms as u64).clamp(1, shared.config.max_deadline_ms));
    let deadline = Instant::now() + budget;
    let control = |r: Result<Result<ReplyBody, WireError>, MailboxError>| {
        r.map_err(|_| WireError::new(ErrorKind::Unavailable, "supervisor unavailable"))?
    };
    match req.body {
        RequestBody::Ping => Ok(ReplyBody::Pong { epoch: shared.epoch }),
        RequestBody::Register(request) => {
            let fd = if fds.is_empty() { None } else { Some(fds.remove(0)) };
            let sent = supervisor.send(Register { request, fd, session });
            tokio::time::timeout_at(deadline, sent).await.map_err(|_| timeout()).map(control)?
        }
        RequestBody::Unregister { instance } => control(supervisor.send(Unregister { key: instance }).await),
        RequestBody::Store(s) => {
            check_chunks(shared, s.chunks.len())?;
            let r = route(shared, &s.instance)?;
            Counters::add(&shared.counters.stores, 1);
            let gate = Arc::new(JobGate::default());
            let msg = instance::StoreChunks {
                chunks: s.chunks,
                block_ids: s.block_ids,
                ready_event: s.ready_event,
                gate: gate.clone(),
            };
            copy_at(r.addr, msg, gate, deadline).await
        }
        RequestBody::Retrieve(s) => {
            check_chunks(shared, s.chunks.len())?;
            let r = route(shared, &s.instance)?;
            Counters::add(&shared.counters.retrieves, 1);
            let gate = Arc::new(JobGate::default());
            let msg = instance::RetrieveChunks {
                chunks: s.chunks,
                block_ids: s.block_ids,
                lease: s.lease,
                done_event: s.done_event,
                gate: gate.clone(),
                deadline: deadline.into_std(),
            };
            copy_at(r.addr, msg, gate, deadline).await
        }
        RequestBody::Lookup(l) => {
            check_chunks(shared, l.chunks.len())?;
            let r = route(shared, &l.instance)?;
            let (found, lease) = Lookup {
                l1: &shared.l1,
                remote: shared.tiers.remote.as_ref().map(|t| (t, r.namespace.clone())),
                model: r.model,
                world_size: r.world_size,
                hashes: &l.chunks,
                lease: l.lease,
                session,
                deadline: deadline.into_std(),
            }
            .run()
            .await;
            let c = &shared.counters;
            Counters::add(&c.lookups, 1);
            Counters::add(&c.lookup_asked_chunks, l.chunks.len() as u64);
            Counters::add(&c.lookup_hit_chunks, found as u64);
            Ok(ReplyBody::Found { chunks: found, lease })
        }
        RequestBody::LookupModel(l) => {
            // From a process that need not have registered (a scheduler):
            // by model name, which is never interned here, so an unknown one
            // finds nothing and leaves no trace.
            check_chunks(shared, l.chunks.len())?;
            let (found, lease) = match shared.l1.find_model(&l.model, l.world_size) {
                Some(model) => {
                    // The remote keys need a layout: that of a registered
                    // instance of the model (none: L1 and disk only).
                    let remote = shared.tiers.remote.as_ref().zip(shared.namespace_of(model, l.world_size));
                    Lookup {
                        l1: &shared.l1,
                        remote,
                        model,
                        world_size: l.world_size,
                        hashes: &l.chunks,
                        lease: l.lease,
                        session,
                        deadline: deadline.into_std(),
                    }
                    .run()
                    .await
                }
                None => (0, None),
            };
            let c = &shared.counters;
            Counters::add(&c.lookups, 1);
            Counters::add(&c.lookup_asked_chunks, l.chunks.len() as u64);
            Counters::add(&c.lookup_hit_chunks, found as u64);
            Ok(ReplyBody::Found { chunks: found, lease })
        }
        RequestBody::ReleaseLease { lease } => {
            if shared.l1.release(lease) {
                Ok(ReplyBody::LeaseReleased)
            } else {
                Err(WireError::new(ErrorKind::InvalidArgument, "no such lease (released or expired)"))
            }
        }
        RequestBody::Clear => Ok(ReplyBody::Cleared { objects: shared.l1.clear() }),
        RequestBody::Stats => {
            let stats = supervisor
                .send(GetStats)
                .await
                .map_err(|_| WireError::new(ErrorKind::Unavailable, "supervisor unavailable"))?;
            Ok(ReplyBody::Stats(Box::new(stats)))
        }
        RequestBody::Status => {
            let report = supervisor
                .send(GetStatus)
                .await
                .map_err(|_| WireError::new(ErrorKind::Unavailable, "supervisor unavailable"))?;
            Ok(ReplyBody::Status(Box::new(report)))
        }
        RequestBody::InjectFault(target) => {
            if !shared.config.fault_injection {
                return Err(WireError::new(
                    ErrorKind::Unauthorized,
                    "fault injection is disabled (start the server with --fault-injection)",
                ));
            }
            control(supervisor.send(InjectFault(target)).await)
        }
    }
}

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
//!
//! Access rules (checked here, before anything is routed): a store,
//! retrieve or lookup on an instance is served only for the session that
//! owns it (`PermissionDenied` otherwise); a lease is used or released only
//! by sessions of the tenant that took it; clear, fault injection and the
//! full status need the admin role; lookups by model see only the session's
//! tenant's namespace.

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use kvcoord_transport::{ErrorKind, ReplyBody, Request, RequestBody, WireError};
use tokio::time::Instant;

use super::access::{needs_admin, Principal};
use super::copy_lane::JobGate;
use super::counters::Counters;
use super::instance::{self, InstanceActor};
use super::keys::qualified_model;
use super::lookup::Lookup;
use super::state::{InstanceRoute, ServerShared};
use super::supervisor::{GetStats, GetStatus, InjectFault, Register, Supervisor, Unregister};

fn not_registered() -> WireError {
    WireError::new(ErrorKind::NotRegistered, "instance is not registered with this server; register again")
}

fn timeout() -> WireError {
    WireError::new(ErrorKind::Timeout, "deadline passed")
}

fn permission_denied(msg: impl Into<String>) -> WireError {
    WireError::new(ErrorKind::PermissionDenied, msg)
}

/// The route of `key`, if `session` owns the instance.
fn route(
    shared: &ServerShared,
    key: &kvcoord_transport::InstanceKey,
    session: u64,
) -> Result<InstanceRoute, WireError> {
    let route = shared.route(key).ok_or_else(not_registered)?;
    if route.owner.load(std::sync::atomic::Ordering::Acquire) != session {
        return Err(permission_denied(format!(
            "instance {}/{} belongs to another session; register it from this one (with its secret) first",
            key.engine, key.rank
        )));
    }
    route.touch(shared);
    Ok(route)
}

/// A lease may be used (or released) only by its principal's sessions. An
/// unknown (expired, released) lease is nobody's: the caller decides.
fn check_lease(shared: &ServerShared, lease: kvcoord_transport::LeaseId, who: Principal) -> Result<(), WireError> {
    match shared.l1.lease_tenant(lease) {
        Some(t) if t != who.tenant => Err(permission_denied("the lease was taken by another tenant")),
        _ => Ok(()),
    }
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

/// Serves one request from session `session`, authenticated as `who`.
pub async fn serve(
    shared: &Arc<ServerShared>,
    supervisor: &Addr<Supervisor>,
    (session, who): (u64, Principal),
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
            let sent = supervisor.send(Register { request, fd, session, tenant: who.tenant });
            tokio::time::timeout_at(deadline, sent).await.map_err(|_| timeout()).map(control)?
        }
        RequestBody::Unregister { instance } => control(supervisor.send(Unregister { key: instance, session }).await),
        RequestBody::Store(s) => {
            check_chunks(shared, s.chunks.len())?;
            let r = route(shared, &s.instance, session)?;
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
            let r = route(shared, &s.instance, session)?;
            if let Some(lease) = s.lease {
                check_lease(shared, lease, who)?;
            }
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
            let r = route(shared, &l.instance, session)?;
            let (found, lease) = Lookup {
                l1: &shared.l1,
                remote: shared.tiers.remote.as_ref().map(|t| (t, r.namespace.clone())),
                model: r.model,
                world_size: r.world_size,
                hashes: &l.chunks,
                lease: l.lease,
                who: (session, who.tenant),
                deadline: deadline.into_std(),
            }
            .run()
            .await;
            count_lookup(shared, who, l.chunks.len(), found);
            Ok(ReplyBody::Found { chunks: found, lease })
        }
        RequestBody::LookupModel(l) => {
            // From a process that need not have registered (a scheduler):
            // by model name, which is never interned here, so an unknown one
            // finds nothing and leaves no trace.
            // The model is looked for in the session's tenant's namespace only.
            check_chunks(shared, l.chunks.len())?;
            if l.model.contains('\0') {
                return Err(WireError::new(ErrorKind::InvalidArgument, "a model name may not contain NUL"));
            }
            let namespace = &shared.access.tenant(who.tenant).namespace;
            let (found, lease) = match shared.l1.find_model(&qualified_model(namespace, &l.model), l.world_size) {
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
                        who: (session, who.tenant),
                        deadline: deadline.into_std(),
                    }
                    .run()
                    .await
                }
                None => (0, None),
            };
            count_lookup(shared, who, l.chunks.len(), found);
            Ok(ReplyBody::Found { chunks: found, lease })
        }
        RequestBody::ReleaseLease { lease } => {
            check_lease(shared, lease, who)?;
            if shared.l1.release(lease) {
                Ok(ReplyBody::LeaseReleased)
            } else {
                Err(WireError::new(ErrorKind::InvalidArgument, "no such lease (released or expired)"))
            }
        }
        RequestBody::Clear if !who.admin => Err(needs_admin("clear")),
        RequestBody::Clear => {
            let objects = shared.l1.clear();
            tracing::info!(session, objects, "L1 cleared by an admin session");
            Ok(ReplyBody::Cleared { objects })
        }
        RequestBody::Stats => {
            let stats = supervisor
                .send(GetStats)
                .await
                .map_err(|_| WireError::new(ErrorKind::Unavailable, "supervisor unavailable"))?;
            Ok(ReplyBody::Stats(Box::new(stats)))
        }
        RequestBody::Status => {
            let mut report = supervisor
                .send(GetStatus)
                .await
                .map_err(|_| WireError::new(ErrorKind::Unavailable, "supervisor unavailable"))?;
            // The full status (instance keys, models, owners) is the admin's.
            if !who.admin {
                report.hide_instances();
            }
            Ok(ReplyBody::Status(Box::new(report)))
        }
        RequestBody::InjectFault(target) => {
            if !shared.config.fault_injection {
                return Err(WireError::new(
                    ErrorKind::Unauthorized,
                    "fault injection is disabled (start the server with --fault-injection)",
                ));
            }
            if !who.admin {
                return Err(needs_admin("fault injection"));
            }
            control(supervisor.send(InjectFault(target)).await)
        }
    }
}

fn count_lookup(shared: &ServerShared, who: Principal, asked: usize, found: u32) {
    let c = &shared.counters;
    Counters::add(&c.lookups, 1);
    Counters::add(&c.lookup_asked_chunks, asked as u64);
    Counters::add(&c.lookup_hit_chunks, found as u64);
    let t = shared.tenant_counters(who.tenant);
    Counters::add(&t.lookup_asked_chunks, asked as u64);
    Counters::add(&t.lookup_hit_chunks, found as u64);
}

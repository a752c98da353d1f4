//! The supervisor: owns the server epoch's registry of instances and the
//! lifetime of every child actor (copy lanes, a device's lane being its GPU
//! worker, and instance actors).
//!
//! - A copy lane that dies (panic or stop) is restarted on a fresh arbiter
//!   thread, and every instance routed to it is dropped: its memory was
//!   opened (mapped, or on the dead lane's device context) by that lane.
//! - An instance actor that dies has its registration dropped.
//!
//! In both cases the clients get `NotRegistered` on their next request and
//! register again; the process stays up.
//! - A closed session's instances are reclaimed after the grace period unless
//!   a new connection registers them again first.
//!
//! Ownership: an instance belongs to the session that registered it. Its
//! register returns a random secret; another session of the same tenant that
//! presents it takes the instance over (a client reconnecting), any other
//! register of the key, and any unregister not from the owner, is
//! `PermissionDenied`.
//!
//! It must never run copies or answer data-path requests itself.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use kvcoord_transport::{
    ErrorKind, FaultTarget, InstanceKey, InstanceSecret, InstanceStatus, RegisterKvCache, RemoteStatus, ReplyBody,
    ServerStats, StatusReport, WireError,
};
use subtle::ConstantTimeEq;

use kvcoord_memory::cuda::CudaDevice;
use kvcoord_memory::MemoryHandle;

use super::access::TenantId;
use super::copy_lane::{CopyLane, Crash, MemoryIdentity, OpenMemory};
use super::counters::Counters;
use super::instance::{CrashInstance, DataPath, InstanceActor, Retire};
use super::keys::{qualified_model, LayoutFingerprint, ModelId, ObjectNamespace};
use super::routing::{route, LaneKind};
use super::state::{InstanceRoute, ServerShared};
use super::supervision::ChildExited;
use super::tier::{Tier, Tiers};

struct Lane {
    addr: Addr<CopyLane>,
    arbiter: Arbiter,
    generation: u64,
    /// The device this lane is the GPU worker of; `None` for a host copy lane.
    device: Option<Arc<CudaDevice>>,
}

struct InstanceEntry {
    addr: Addr<InstanceActor>,
    generation: u64,
    owner: u64,
    /// The route's copy of `owner`, read by sessions on every request.
    owner_cell: Arc<std::sync::atomic::AtomicU64>,
    tenant: TenantId,
    secret: InstanceSecret,
    orphaned: bool,
    lane: usize,
    model_name: String,
    world_size: u32,
    layout: kvcoord_memory::KvLayout,
    identity: MemoryIdentity,
    last_seen: Arc<std::sync::atomic::AtomicU64>,
}

pub struct Supervisor {
    shared: Arc<ServerShared>,
    lanes: Vec<Lane>,
    instances: HashMap<InstanceKey, InstanceEntry>,
    next_generation: u64,
    next_lane: usize,
}

/// Register one instance (from session `session`).
#[derive(Message)]
#[rtype(result = "Result<ReplyBody, WireError>")]
pub struct Register {
    pub request: RegisterKvCache,
    pub fd: Option<OwnedFd>,
    pub session: u64,
    pub tenant: TenantId,
}

/// Unregister one instance (from session `session`, which must own it).
#[derive(Message)]
#[rtype(result = "Result<ReplyBody, WireError>")]
pub struct Unregister {
    pub key: InstanceKey,
    pub session: u64,
}

/// A session's connection closed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SessionClosed {
    pub session: u64,
}

#[derive(Message)]
#[rtype(result = "()")]
struct Reclaim {
    key: InstanceKey,
    session: u64,
}

#[derive(Message)]
#[rtype(result = "Result<ReplyBody, WireError>")]
pub struct InjectFault(pub FaultTarget);

#[derive(Message)]
#[rtype(result = "ServerStats")]
pub struct GetStats;

#[derive(Message)]
#[rtype(result = "StatusReport")]
pub struct GetStatus;

impl Supervisor {
    pub fn new(shared: Arc<ServerShared>) -> Self {
        Supervisor { shared, lanes: Vec::new(), instances: HashMap::new(), next_generation: 1, next_lane: 0 }
    }

    fn generation(&mut self) -> u64 {
        self.next_generation += 1;
        self.next_generation
    }

    fn start_lane(&mut self, lane: u32, device: Option<Arc<CudaDevice>>, ctx: &mut Context<Self>) -> Lane {
        let generation = self.generation();
        let arbiter = Arbiter::new();
        let me = ctx.address().recipient();
        let c = &self.shared.config;
        let d = device.clone().map(|d| (d, c.gpu_streams as usize, c.gpu_copy.method()));
        // The lane (and a device's copy engine) is built on its own thread.
        let addr = CopyLane::start_in_arbiter(&arbiter.handle(), move |_| CopyLane::new(lane, generation, me, d));
        Lane { addr, arbiter, generation, device }
    }

    /// The lane a new registration's copies go to (see `routing.rs`).
    fn route(&mut self, memory: &MemoryHandle) -> Result<usize, WireError> {
        let kinds: Vec<LaneKind> = self
            .lanes
            .iter()
            .map(|l| l.device.as_ref().map_or(LaneKind::Host, |d| LaneKind::Device(d.uuid())))
            .collect();
        route(&kinds, memory, &mut self.next_lane)
    }

    /// Drops a registration: no new request reaches it; requests already
    /// queued at it fail with `NotRegistered`; its memory is released when
    /// its in-flight copies end.
    fn drop_instance(&mut self, key: &InstanceKey, why: &str) {
        if let Some(e) = self.instances.remove(key) {
            self.shared.routes.remove(key);
            self.shared.mapped_bytes.fetch_sub(e.layout.total_bytes(), std::sync::atomic::Ordering::Relaxed);
            e.addr.do_send(Retire);
            tracing::info!(
                engine = key.engine, rank = key.rank, model = %super::logsafe::Sanitized(&e.model_name), session = e.owner, reason = why,
                "instance dropped"
            );
        }
    }
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        // Host copy lanes first (memfd clients), then one lane (GPU worker) per device.
        for lane in 0..self.shared.config.copy_lanes.max(1) {
            let l = self.start_lane(lane, None, ctx);
            self.lanes.push(l);
        }
        for device in self.shared.devices.clone() {
            let l = self.start_lane(self.lanes.len() as u32, Some(device), ctx);
            self.lanes.push(l);
        }
        ctx.run_interval(Duration::from_millis(500), |act, _| {
            let n = act.shared.l1.expire_leases(Instant::now());
            if n > 0 {
                tracing::debug!(leases = n, "expired leases released");
            }
        });
        tracing::info!(epoch = self.shared.epoch.0, lanes = self.lanes.len(), "supervisor started");
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        for lane in &self.lanes {
            lane.arbiter.stop();
        }
    }
}

fn invalid(msg: impl Into<String>) -> WireError {
    WireError::new(ErrorKind::InvalidArgument, msg)
}

/// Everything a register request is checked for before its memory is
/// opened: rank and world size, model name, layout (checked arithmetic),
/// chunk size, and that the placement fits the declared memory. Public for
/// the fuzz target `request_body` (`fuzz/`).
pub fn check_register(r: &RegisterKvCache, chunk_tokens: u32) -> Result<(), WireError> {
    if r.world_size == 0 || r.instance.rank >= r.world_size {
        return Err(invalid(format!("rank {} is outside world size {}", r.instance.rank, r.world_size)));
    }
    if r.model.is_empty() {
        return Err(invalid("model name is empty"));
    }
    if r.model.contains('\0') {
        return Err(invalid("a model name may not contain NUL"));
    }
    r.layout.validate().map_err(|e| invalid(e.to_string()))?;
    let per_chunk = r.layout.blocks_per_chunk(chunk_tokens).map_err(|e| invalid(e.to_string()))?;
    if r.layout.chunk_object_bytes(per_chunk) > kvcoord_memory::arena::MAX_SLAB_BYTES {
        return Err(invalid("one chunk of this layout would be 4 GiB or more; use smaller chunks"));
    }
    match &r.memory {
        // The memfd's real size is checked against `size` when it is mapped.
        kvcoord_memory::MemoryHandle::HostFd { size } => r.layout.fits_in(*size).map_err(|e| {
            invalid(format!("the layout's placement does not fit the registered memory of {size} bytes: {e}"))
        }),
        kvcoord_memory::MemoryHandle::CudaIpc { .. } => Ok(()),
    }
}

impl Handler<Register> for Supervisor {
    type Result = AtomicResponse<Self, Result<ReplyBody, WireError>>;

    fn handle(&mut self, msg: Register, _: &mut Self::Context) -> Self::Result {
        let mut r = msg.request;
        // Equal placements, however described, make equal chunk objects.
        r.layout = r.layout.normalized();
        let key = r.instance;
        if let Err(e) = check_register(&r, self.shared.config.chunk_tokens) {
            return AtomicResponse::new(Box::pin(fut::ready(Err(e))));
        }
        let (session, tenant) = (msg.session, msg.tenant);
        if let Some(e) = self.instances.get(&key) {
            let holds_secret = r.secret.is_some_and(|s| bool::from(s.0.ct_eq(&e.secret.0)));
            if e.tenant != tenant || (e.owner != session && !holds_secret) {
                let err = WireError::new(
                    ErrorKind::PermissionDenied,
                    format!(
                        "instance {}/{} is registered by another session; only its owner, or a new connection \
                         of the same tenant presenting its secret, may register it",
                        key.engine, key.rank
                    ),
                );
                return AtomicResponse::new(Box::pin(fut::ready(Err(err))));
            }
            if e.layout != r.layout || e.model_name != r.model || e.world_size != r.world_size {
                let err = WireError::new(
                    ErrorKind::LayoutMismatch,
                    format!(
                        "instance {}/{} is registered with model {} (world size {}) and layout {:?}",
                        key.engine, key.rank, e.model_name, e.world_size, e.layout
                    ),
                );
                return AtomicResponse::new(Box::pin(fut::ready(Err(err))));
            }
        }
        let lane = match self.instances.get(&key).filter(|e| self.lanes[e.lane].device.is_some() == r.memory.is_cuda())
        {
            Some(e) => e.lane,
            None => match self.route(&r.memory) {
                Ok(lane) => lane,
                Err(e) => return AtomicResponse::new(Box::pin(fut::ready(Err(e)))),
            },
        };
        let open = self.lanes[lane].addr.send(OpenMemory { layout: r.layout, handle: r.memory.clone(), fd: msg.fd });
        AtomicResponse::new(Box::pin(
            async move { open.await.map_err(|_| WireError::new(ErrorKind::Unavailable, "copy lane restarted")) }
                .into_actor(self)
                .map(move |opened, act, ctx| {
                    let (memory, identity) = opened??;
                    if let Some(e) = act.instances.get_mut(&key) {
                        if e.identity == identity {
                            e.owner = session;
                            e.owner_cell.store(session, std::sync::atomic::Ordering::Release);
                            e.orphaned = false;
                            Counters::add(&act.shared.counters.reregistrations, 1);
                            tracing::info!(engine = key.engine, rank = key.rank, session, "instance registered again");
                            return Ok(ReplyBody::Registered { already: true, secret: e.secret });
                        }
                        act.drop_instance(&key, "registered again with new memory");
                    }
                    // The tenant's namespace is part of the model's id, so of every object key.
                    let qualified = qualified_model(&act.shared.access.tenant(tenant).namespace, &r.model);
                    let model: ModelId = act.shared.l1.model_id(&qualified, r.world_size);
                    let namespace = Arc::new(ObjectNamespace {
                        model: Arc::from(&*qualified),
                        world_size: r.world_size,
                        layout: LayoutFingerprint::of(&r.layout, act.shared.config.chunk_tokens),
                    });
                    let generation = act.generation();
                    let actor = InstanceActor::new(
                        key,
                        (model, namespace.clone()),
                        r.layout,
                        act.shared.config.chunk_tokens,
                        memory,
                        act.lanes[lane].addr.clone(),
                        DataPath {
                            l1: act.shared.l1.clone(),
                            tiers: act.shared.tiers.clone(),
                            counters: act.shared.counters.clone(),
                            tenant,
                            tenant_counters: act.shared.tenant_counters(tenant).clone(),
                        },
                        ctx.address().recipient(),
                        generation,
                    );
                    let addr = actor.start();
                    let seen = act.shared.started.elapsed().as_millis() as u64;
                    let last_seen = Arc::new(std::sync::atomic::AtomicU64::new(seen));
                    let owner_cell = Arc::new(std::sync::atomic::AtomicU64::new(session));
                    let route = InstanceRoute {
                        addr: addr.clone(),
                        model,
                        world_size: r.world_size,
                        rank: key.rank,
                        namespace,
                        last_seen: last_seen.clone(),
                        owner: owner_cell.clone(),
                        tenant,
                    };
                    let secret = InstanceSecret::random();
                    act.shared.routes.insert(key, route);
                    act.shared.mapped_bytes.fetch_add(r.layout.total_bytes(), std::sync::atomic::Ordering::Relaxed);
                    Counters::add(&act.shared.counters.registrations, 1);
                    act.instances.insert(
                        key,
                        InstanceEntry {
                            addr,
                            generation,
                            owner: session,
                            owner_cell,
                            tenant,
                            secret,
                            orphaned: false,
                            lane,
                            model_name: r.model.clone(),
                            world_size: r.world_size,
                            layout: r.layout,
                            identity,
                            last_seen,
                        },
                    );
                    tracing::info!(
                        engine = key.engine, rank = key.rank, model = %super::logsafe::Sanitized(&r.model), world_size = r.world_size,
                        session, lane, bytes = r.layout.total_bytes(), "instance registered"
                    );
                    Ok(ReplyBody::Registered { already: false, secret })
                }),
        ))
    }
}

impl Handler<Unregister> for Supervisor {
    type Result = Result<ReplyBody, WireError>;
    fn handle(&mut self, msg: Unregister, _: &mut Self::Context) -> Self::Result {
        match self.instances.get(&msg.key) {
            None => return Err(WireError::new(ErrorKind::NotRegistered, "instance is not registered")),
            Some(e) if e.owner != msg.session => {
                return Err(WireError::new(
                    ErrorKind::PermissionDenied,
                    "the instance belongs to another session; only its owner may unregister it",
                ))
            }
            Some(_) => {}
        }
        self.drop_instance(&msg.key, "unregistered");
        Ok(ReplyBody::Unregistered)
    }
}

impl Handler<SessionClosed> for Supervisor {
    type Result = ();
    fn handle(&mut self, msg: SessionClosed, ctx: &mut Self::Context) {
        let grace = Duration::from_millis(self.shared.config.grace_ms);
        let mut owned = Vec::new();
        for (key, e) in self.instances.iter_mut().filter(|(_, e)| e.owner == msg.session) {
            e.orphaned = true;
            owned.push(*key);
        }
        tracing::info!(
            session = msg.session,
            instances = owned.len(),
            grace_ms = grace.as_millis() as u64,
            "session closed"
        );
        for key in owned {
            ctx.notify_later(Reclaim { key, session: msg.session }, grace);
        }
        let session = msg.session;
        ctx.run_later(grace, move |act, _| {
            act.shared.l1.release_session(session);
        });
    }
}

impl Handler<Reclaim> for Supervisor {
    type Result = ();
    fn handle(&mut self, msg: Reclaim, _: &mut Self::Context) {
        let still_orphaned = self.instances.get(&msg.key).is_some_and(|e| e.owner == msg.session && e.orphaned);
        if still_orphaned {
            self.drop_instance(&msg.key, "client gone past the grace period");
            Counters::add(&self.shared.counters.reclaimed_instances, 1);
        }
    }
}

impl Handler<ChildExited> for Supervisor {
    type Result = ();
    fn handle(&mut self, msg: ChildExited, ctx: &mut Self::Context) {
        match msg {
            ChildExited::Instance { key, generation } => {
                if self.instances.get(&key).is_some_and(|e| e.generation == generation) {
                    tracing::warn!(
                        engine = key.engine,
                        rank = key.rank,
                        "instance actor died; dropping its registration"
                    );
                    Counters::add(&self.shared.counters.actor_restarts, 1);
                    self.drop_instance(&key, "instance actor died");
                }
            }
            ChildExited::CopyLane { lane, generation } => {
                let i = lane as usize;
                if self.lanes.get(i).is_none_or(|l| l.generation != generation) || self.shared.is_shutting_down() {
                    return;
                }
                tracing::warn!(lane, "copy lane died; restarting it and dropping its instances");
                Counters::add(&self.shared.counters.actor_restarts, 1);
                let device = self.lanes[i].device.clone();
                let fresh = self.start_lane(lane, device, ctx);
                let old = std::mem::replace(&mut self.lanes[i], fresh);
                old.arbiter.stop();
                let affected: Vec<InstanceKey> =
                    self.instances.iter().filter(|(_, e)| e.lane == i).map(|(k, _)| *k).collect();
                for key in affected {
                    self.drop_instance(&key, "its copy lane died");
                }
            }
        }
    }
}

impl Handler<InjectFault> for Supervisor {
    type Result = Result<ReplyBody, WireError>;
    fn handle(&mut self, msg: InjectFault, _: &mut Self::Context) -> Self::Result {
        tracing::warn!(target = ?msg.0, "fault injection");
        match msg.0 {
            FaultTarget::CopyLane(i) => {
                let lane = self.lanes.get(i as usize).ok_or_else(|| invalid(format!("no copy lane {i}")))?;
                lane.addr.do_send(Crash);
            }
            FaultTarget::Instance(key) => {
                let e = self
                    .instances
                    .get(&key)
                    .ok_or_else(|| WireError::new(ErrorKind::NotRegistered, "no such instance"))?;
                e.addr.do_send(CrashInstance);
            }
        }
        Ok(ReplyBody::FaultInjected)
    }
}

/// The tiers' figures (the `disk_*` and `remote_*` fields of the stats).
fn tier_stats(tiers: &Tiers) -> ServerStats {
    let remote = remote_stats(tiers.remote.as_deref());
    let Some(s) = tiers.local.as_deref().map(Tier::stats) else { return remote };
    ServerStats {
        disk_capacity: s.capacity,
        disk_used: s.used,
        disk_objects: s.objects,
        disk_backlog: s.backlog,
        disk_hits: s.hits,
        disk_writes: s.writes,
        disk_write_errors: s.write_errors,
        disk_corrupt: s.corrupt,
        disk_recovered: s.recovered,
        disk_skipped: s.skipped,
        ..remote
    }
}

fn remote_stats(tier: Option<&dyn Tier>) -> ServerStats {
    let Some(s) = tier.map(Tier::stats) else { return ServerStats::default() };
    ServerStats {
        remote_up: u64::from(s.up),
        remote_hits: s.hits,
        remote_misses: s.misses,
        remote_bytes_in: s.bytes_in,
        remote_bytes_out: s.bytes_out,
        remote_writes: s.writes,
        remote_dropped_writes: s.skipped,
        remote_queue_depth: s.queued,
        remote_queue_bytes: s.backlog,
        remote_rejected: s.corrupt,
        remote_failed_calls: s.errors,
        ..ServerStats::default()
    }
}

impl Handler<GetStatus> for Supervisor {
    type Result = MessageResult<GetStatus>;
    fn handle(&mut self, _: GetStatus, ctx: &mut Self::Context) -> Self::Result {
        let now = self.shared.started.elapsed().as_millis() as u64;
        let mut instances: Vec<InstanceStatus> = self
            .instances
            .iter()
            .map(|(k, e)| InstanceStatus {
                engine: k.engine,
                rank: k.rank,
                model: e.model_name.clone(),
                world_size: e.world_size,
                layout: e.layout,
                bytes: e.layout.total_bytes(),
                owner_session: e.owner,
                orphaned: e.orphaned,
                idle_ms: now.saturating_sub(e.last_seen.load(std::sync::atomic::Ordering::Relaxed)),
            })
            .collect();
        instances.sort_by(|a, b| (&a.model, a.engine, a.rank).cmp(&(&b.model, b.engine, b.rank)));
        let stats = self.handle(GetStats, ctx).0;
        MessageResult(StatusReport {
            version: env!("CARGO_PKG_VERSION").to_string(),
            epoch: format!("{:016x}", self.shared.epoch.0),
            uptime_ms: now,
            backend: self.shared.backend.to_string(),
            devices: self
                .lanes
                .iter()
                .enumerate()
                .map(|(i, l)| match &l.device {
                    Some(d) => format!("gpu worker {i}: {} {}", d.name(), d.uuid_string()),
                    None => format!("host copy lane {i}"),
                })
                .collect(),
            endpoints: self.shared.endpoints.clone(),
            admin: self.shared.admin.get().cloned(),
            instances,
            stats,
            instances_hidden: false,
            remote: self.shared.tiers.remote.as_ref().and_then(|t| t.health()).map(|h| RemoteStatus {
                endpoint: h.endpoint,
                up: h.up,
                since_ms: h.since.elapsed().as_millis() as u64,
                last_error: h.last_error,
            }),
        })
    }
}

impl Handler<GetStats> for Supervisor {
    type Result = MessageResult<GetStats>;
    fn handle(&mut self, _: GetStats, _: &mut Self::Context) -> Self::Result {
        let s = &self.shared;
        let c = &s.counters;
        let u = s.l1.usage();
        MessageResult(ServerStats {
            epoch: s.epoch.0,
            uptime_ms: s.started.elapsed().as_millis() as u64,
            backend: s.backend.to_string(),
            sessions: s.sessions.load(std::sync::atomic::Ordering::Relaxed),
            instances: self.instances.len() as u64,
            mapped_bytes: s.mapped_bytes.load(std::sync::atomic::Ordering::Relaxed),
            l1_capacity: u.capacity,
            l1_used: u.used,
            l1_slab_bytes: u.slab_bytes,
            objects: u.objects,
            writing_objects: u.writing,
            evictions: u.evictions,
            leases: u.leases,
            pinned_objects: u.pinned,
            stores: Counters::get(&c.stores),
            retrieves: Counters::get(&c.retrieves),
            lookups: Counters::get(&c.lookups),
            lookup_asked_chunks: Counters::get(&c.lookup_asked_chunks),
            lookup_hit_chunks: Counters::get(&c.lookup_hit_chunks),
            bytes_stored: Counters::get(&c.bytes_stored),
            bytes_retrieved: Counters::get(&c.bytes_retrieved),
            registrations: Counters::get(&c.registrations),
            reregistrations: Counters::get(&c.reregistrations),
            connections: Counters::get(&c.connections),
            actor_restarts: Counters::get(&c.actor_restarts),
            reclaimed_instances: Counters::get(&c.reclaimed_instances),
            ..tier_stats(&s.tiers)
        })
    }
}

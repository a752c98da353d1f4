//! State every server actor and session reads: the epoch, configuration, the
//! L1 store and the tier below it, the routing table of registered instances,
//! and the counters.
//!
//! The routing table is written only by the supervisor; sessions read it to
//! send a request straight to its instance actor. This module must never
//! decide anything: it only holds what others decide.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use actix::Addr;
use dashmap::DashMap;
use kvcoord_transport::{InstanceKey, ServerEpoch};

use super::access::{AccessTable, TenantId};
use super::counters::{Counters, TenantCounters};
use super::instance::InstanceActor;
use super::keys::{ModelId, ObjectNamespace};
use super::l1::L1Store;
use super::metrics::Metrics;
use super::tier::Tiers;
use crate::config::ServerConfig;

/// Where requests for one registered instance go.
#[derive(Clone)]
pub struct InstanceRoute {
    pub addr: Addr<InstanceActor>,
    pub model: ModelId,
    pub world_size: u32,
    pub rank: u32,
    /// What names its objects beyond this process (remote lookups).
    pub namespace: Arc<ObjectNamespace>,
    /// Milliseconds after server start of the instance's last request.
    pub last_seen: Arc<AtomicU64>,
    /// The session that owns it now (the supervisor moves it on a re-attach).
    pub owner: Arc<AtomicU64>,
    /// The tenant it was registered by.
    pub tenant: TenantId,
}

impl InstanceRoute {
    /// Notes a request for this instance.
    pub fn touch(&self, shared: &ServerShared) {
        self.last_seen.store(shared.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
}

/// Shared server state. One per running coordinator.
pub struct ServerShared {
    pub epoch: ServerEpoch,
    pub config: ServerConfig,
    pub backend: &'static str,
    /// The CUDA devices served (empty on the host backend), one copy lane (GPU worker) each.
    pub devices: Vec<Arc<kvcoord_memory::cuda::CudaDevice>>,
    pub l1: Arc<L1Store>,
    pub routes: DashMap<InstanceKey, InstanceRoute>,
    pub counters: Arc<Counters>,
    pub started: Instant,
    pub shutting_down: AtomicBool,
    pub in_flight: AtomicUsize,
    pub sessions: AtomicU64,
    /// Client connections open now (handshaking or not), at most
    /// `config.max_connections`: see [`ConnectionSlot`].
    pub open_connections: AtomicUsize,
    pub mapped_bytes: AtomicU64,
    pub metrics: Metrics,
    /// Where clients connect (Unix socket first).
    pub endpoints: Vec<String>,
    /// Where the admin HTTP API listens, once it does.
    pub admin: OnceLock<String>,
    /// The tiers below L1 (disk, remote), as configured.
    pub tiers: Tiers,
    /// Tenants, tokens and who may use the socket.
    pub access: AccessTable,
    /// Per-tenant counters (index: tenant id).
    pub tenant_counters: Vec<Arc<TenantCounters>>,
}

impl ServerShared {
    /// The route of `key`, cloned out so no map reference is held.
    pub fn route(&self, key: &InstanceKey) -> Option<InstanceRoute> {
        self.routes.get(key).map(|r| r.value().clone())
    }

    /// The namespace of a registered instance of (model, world size), for
    /// lookups by model name from processes that registered nothing.
    pub fn namespace_of(&self, model: ModelId, world_size: u32) -> Option<Arc<ObjectNamespace>> {
        self.routes.iter().find(|r| r.model == model && r.world_size == world_size).map(|r| r.namespace.clone())
    }

    /// `tenant`'s counters.
    pub fn tenant_counters(&self, tenant: TenantId) -> &Arc<TenantCounters> {
        &self.tenant_counters[tenant.0 as usize]
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }
}

/// Counts one request as in flight until dropped (graceful shutdown waits
/// for the count to reach zero).
pub struct InFlight(Arc<ServerShared>);

impl InFlight {
    pub fn new(shared: &Arc<ServerShared>) -> Self {
        shared.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(shared.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

/// One of the `max_connections` places for an open connection, given back
/// when dropped (with the connection).
pub struct ConnectionSlot(Arc<ServerShared>);

impl ConnectionSlot {
    /// A place, unless `max_connections` connections are open.
    pub fn try_take(shared: &Arc<ServerShared>) -> Option<Self> {
        let max = shared.config.max_connections as usize;
        shared
            .open_connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .ok()
            .map(|_| ConnectionSlot(shared.clone()))
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.open_connections.fetch_sub(1, Ordering::AcqRel);
    }
}

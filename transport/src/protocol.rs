//! The wire protocol: every frame either end may send, versioned as a whole
//! by [`PROTOCOL_VERSION`]. The envelope (handshake, request id, deadline,
//! one reply per request carrying the same id) is final; bodies may grow.
//!
//! This module owns the message types only. It must never do I/O (that is
//! `stream.rs`) nor encode bytes (that is `frame.rs`).

use kvcoord_memory::{KvLayout, MemoryHandle};
use serde::{Deserialize, Serialize};

use crate::chunk_hash::ChunkHash;
use crate::error::WireError;

/// Bumped on any incompatible change to any frame. 3: a layout carries its
/// placement in the registered memory (`kvcoord_memory::Placement`). 4: the
/// remote tier's figures in `ServerStats` and its health in `StatusReport`;
/// a retrieve's `done_event`; a hello may carry a token, the welcome names
/// the tenant and role, a register returns (and a re-attach presents) the
/// instance's secret, lease ids are random 128-bit values.
pub const PROTOCOL_VERSION: u32 = 4;

/// A random value chosen at every server start. A client that sees a new
/// epoch knows the server lost every registration.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServerEpoch(pub u64);

impl ServerEpoch {
    /// A fresh random epoch (never zero, so zero can mean "none yet").
    pub fn random() -> Self {
        ServerEpoch(rand::random::<u64>() | 1)
    }
}

/// The id a client gives a request; the reply carries it back.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RequestId(pub u64);

/// A lease on the chunks a lookup found, so they stay until retrieved: a
/// random 128-bit value, usable only by sessions of the principal (tenant
/// credential) that took it.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LeaseId(pub u128);

/// The secret an instance's registration returns: whoever presents it (on
/// a new connection after a reconnect) may take the instance over again;
/// nobody else may act on the instance. Random, 128 bits; never logged.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Copy, PartialEq, Eq, Hash)]
pub struct InstanceSecret(pub [u8; 16]);

impl InstanceSecret {
    /// A fresh secret from the operating system's CSPRNG (via `rand`'s
    /// thread RNG, seeded from `getrandom`).
    pub fn random() -> Self {
        InstanceSecret(rand::random())
    }
}

impl std::fmt::Debug for InstanceSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InstanceSecret(<redacted>)")
    }
}

/// One registered TP rank of one engine: the engine picks `engine` (random at
/// its start, shared by its ranks); `rank` is the TP rank.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InstanceKey {
    pub engine: u64,
    pub rank: u32,
}

/// First frame from a client.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq)]
pub struct Hello {
    pub protocol: u32,
    pub client: String,
    /// A tenant's or the admin's token: required over TCP, optional on the
    /// Unix socket (where the peer's uid is checked). Never logged.
    pub token: Option<String>,
}

impl std::fmt::Debug for Hello {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hello")
            .field("protocol", &self.protocol)
            .field("client", &self.client)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// Limits the server enforces, told to the client at handshake.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest frame (payload bytes) either end may send.
    pub max_frame_bytes: u32,
    /// Most chunks in one store, lookup or retrieve.
    pub max_chunks_per_request: u32,
}

/// The server's answer to [`Hello`].
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Welcome {
    pub protocol: u32,
    pub epoch: ServerEpoch,
    pub chunk_tokens: u32,
    pub limits: Limits,
    /// Server name and version, for logs.
    pub server: String,
    /// The tenant this connection acts as (chosen by its credentials).
    pub tenant: String,
    /// Whether the connection has the admin role (privileged requests).
    pub admin: bool,
}

/// Everything a client sends.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum ClientFrame {
    Hello(Hello),
    Request(Request),
}

/// Everything a server sends.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum ServerFrame {
    Welcome(Welcome),
    /// The handshake was refused (protocol mismatch, bad first frame, over
    /// the connection cap), or an established connection is being closed by
    /// the server (idle timeout); the server closes after it.
    Refused(WireError),
    Reply(Reply),
    /// The client sent a frame the server could not decode; the server closes.
    Undecodable(WireError),
}

/// A request: an id, a time budget, and what to do.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub id: RequestId,
    /// Milliseconds the client will wait, counted from when it sent the
    /// request. The server gives up (and replies `Timeout`) after that.
    pub deadline_ms: u32,
    pub body: RequestBody,
}

/// The reply to exactly one request.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub id: RequestId,
    pub result: Result<ReplyBody, WireError>,
}

/// Register one TP rank's KV cache: what it holds and where its bytes are
/// (`layout`, whose placement must lie inside the memory), and the memory.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RegisterKvCache {
    pub instance: InstanceKey,
    pub model: String,
    pub world_size: u32,
    pub layout: KvLayout,
    pub memory: MemoryHandle,
    /// The secret an earlier register of this instance returned: presented
    /// by a new connection to take the instance over (a reconnect). `None`
    /// for a first register.
    pub secret: Option<InstanceSecret>,
}

/// Store chunks: `block_ids` holds `blocks_per_chunk` ids per chunk, in order.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct StoreChunks {
    pub instance: InstanceKey,
    pub chunks: Vec<ChunkHash>,
    pub block_ids: Vec<u32>,
    /// CUDA backend: IPC handle of the engine's "KV ready" event to wait on.
    pub ready_event: Option<Vec<u8>>,
}

/// How many leading chunks of a prefix are held for every rank.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct LookupPrefix {
    pub instance: InstanceKey,
    pub chunks: Vec<ChunkHash>,
    /// Take a lease on the chunks found (for every rank), released by their
    /// retrieve, by `ReleaseLease`, or when its time-to-live runs out.
    pub lease: bool,
}

/// [`LookupPrefix`] by model instead of by instance, for a process that
/// registered nothing (an engine's scheduler is another process than its
/// workers). An unknown model finds 0 chunks.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct LookupByModel {
    pub model: String,
    pub world_size: u32,
    pub chunks: Vec<ChunkHash>,
    /// As in [`LookupPrefix`]; the lease belongs to this connection's
    /// principal (its tenant credential), so another process of the same
    /// tenant (a TP worker) may retrieve with it.
    pub lease: bool,
}

/// Copy chunks back into blocks; `block_ids` as in [`StoreChunks`].
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RetrieveChunks {
    pub instance: InstanceKey,
    pub chunks: Vec<ChunkHash>,
    pub block_ids: Vec<u32>,
    /// The lookup's lease; this rank's share of it is released after the copy.
    pub lease: Option<LeaseId>,
    /// IPC handle of an interprocess CUDA event of the engine (CUDA memory
    /// only). With one, the server records it on its copy stream after the
    /// scatter and replies as soon as the copy is queued: the engine's stream
    /// waits on the event instead of its CPU waiting for the reply.
    pub done_event: Option<Vec<u8>>,
}

/// Actors a fault-injection request can kill (only on a server started with
/// fault injection enabled).
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum FaultTarget {
    /// The copy-lane actor with this index (host lanes first, then one per
    /// device, that device's GPU worker).
    CopyLane(u32),
    /// The instance actor of this registration.
    Instance(InstanceKey),
}

/// What a request asks for.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum RequestBody {
    Ping,
    Register(RegisterKvCache),
    Unregister {
        instance: InstanceKey,
    },
    Store(StoreChunks),
    Lookup(LookupPrefix),
    Retrieve(RetrieveChunks),
    ReleaseLease {
        lease: LeaseId,
    },
    Clear,
    Stats,
    InjectFault(FaultTarget),
    /// Everything an operator wants to see: instances, L1, hit rates.
    Status,
    /// A lookup by model from a connection that need not have registered.
    LookupModel(LookupByModel),
}

impl RequestBody {
    /// A short name for logs and metrics.
    pub fn op(&self) -> &'static str {
        match self {
            RequestBody::Ping => "ping",
            RequestBody::Register(_) => "register",
            RequestBody::Unregister { .. } => "unregister",
            RequestBody::Store(_) => "store",
            RequestBody::Lookup(_) => "lookup",
            RequestBody::Retrieve(_) => "retrieve",
            RequestBody::ReleaseLease { .. } => "release_lease",
            RequestBody::Clear => "clear",
            RequestBody::Stats => "stats",
            RequestBody::InjectFault(_) => "inject_fault",
            RequestBody::Status => "status",
            RequestBody::LookupModel(_) => "lookup_model",
        }
    }

    /// File descriptors that must travel with this request's frame.
    pub fn fd_count(&self) -> usize {
        match self {
            RequestBody::Register(RegisterKvCache { memory: MemoryHandle::HostFd { .. }, .. }) => 1,
            _ => 0,
        }
    }
}

/// Per-chunk result of a store.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreOutcome {
    Stored,
    AlreadyPresent,
    SkippedNoMemory,
}

/// Per-chunk result of a retrieve.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetrieveOutcome {
    Retrieved,
    Missing,
}

/// Counters and gauges of a running server.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerStats {
    pub epoch: u64,
    pub uptime_ms: u64,
    pub backend: String,
    pub sessions: u64,
    pub instances: u64,
    pub mapped_bytes: u64,
    pub l1_capacity: u64,
    pub l1_used: u64,
    /// L1 memory taken from the system so far (slabs, faulted in).
    pub l1_slab_bytes: u64,
    pub objects: u64,
    pub writing_objects: u64,
    pub evictions: u64,
    pub leases: u64,
    pub pinned_objects: u64,
    pub stores: u64,
    pub retrieves: u64,
    pub lookups: u64,
    pub lookup_asked_chunks: u64,
    pub lookup_hit_chunks: u64,
    pub bytes_stored: u64,
    pub bytes_retrieved: u64,
    pub registrations: u64,
    /// Registers of an instance that was already registered (reconnects).
    pub reregistrations: u64,
    /// Client connections accepted so far.
    pub connections: u64,
    pub actor_restarts: u64,
    pub reclaimed_instances: u64,
    /// Disk tier (all zero when it is off).
    pub disk_capacity: u64,
    pub disk_used: u64,
    pub disk_objects: u64,
    /// Bytes queued for writing behind.
    pub disk_backlog: u64,
    /// Objects read back from disk.
    pub disk_hits: u64,
    pub disk_writes: u64,
    /// Writes that failed (disk full, I/O error); those objects stay L1-only.
    pub disk_write_errors: u64,
    /// Objects found torn or corrupt (at start or at read) and dropped.
    pub disk_corrupt: u64,
    /// Objects found intact at start.
    pub disk_recovered: u64,
    /// Objects not written because the write-behind queue was full.
    pub disk_skipped: u64,
    /// Remote tier (all zero when it is off): 1 when it answers.
    pub remote_up: u64,
    /// Keys asked of it (probed or read) found, and not found or unanswered.
    pub remote_hits: u64,
    pub remote_misses: u64,
    pub remote_bytes_in: u64,
    pub remote_bytes_out: u64,
    pub remote_writes: u64,
    /// Pending writes dropped, oldest first, because the queue was full.
    pub remote_dropped_writes: u64,
    pub remote_queue_depth: u64,
    pub remote_queue_bytes: u64,
    /// Values refused (corrupt, truncated, foreign): misses, never served.
    pub remote_rejected: u64,
    /// Calls that failed (timeouts, connection errors, error replies).
    pub remote_failed_calls: u64,
}

/// What a successful request returns.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum ReplyBody {
    Pong {
        epoch: ServerEpoch,
    },
    /// `already`: the same layout was registered before (idempotent).
    /// `secret`: present it to take the instance over from a new connection.
    Registered {
        already: bool,
        secret: InstanceSecret,
    },
    Unregistered,
    Stored(Vec<StoreOutcome>),
    /// `chunks` leading chunks are held for every rank of the world size.
    Found {
        chunks: u32,
        lease: Option<LeaseId>,
    },
    Retrieved(Vec<RetrieveOutcome>),
    LeaseReleased,
    Cleared {
        objects: u64,
    },
    Stats(Box<ServerStats>),
    FaultInjected,
    Status(Box<StatusReport>),
}

/// One registered instance, as an operator sees it.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct InstanceStatus {
    pub engine: u64,
    pub rank: u32,
    pub model: String,
    pub world_size: u32,
    pub layout: KvLayout,
    /// Bytes of registered KV-cache memory.
    pub bytes: u64,
    /// The session (connection) that registered it last.
    pub owner_session: u64,
    /// The owner's connection closed; the instance goes after the grace period.
    pub orphaned: bool,
    /// Milliseconds since its last request.
    pub idle_ms: u64,
}

impl StatusReport {
    /// Leaves the instances out (for an asker without the admin role).
    pub fn hide_instances(&mut self) {
        self.instances = Vec::new();
        self.instances_hidden = true;
    }
}

/// A running coordinator, for `kvcoord status` and the admin `/status`.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct StatusReport {
    pub version: String,
    /// The epoch as 16 hex digits.
    pub epoch: String,
    pub uptime_ms: u64,
    pub backend: String,
    /// Copy devices: GPUs on the CUDA backend, copy lanes on the host backend.
    pub devices: Vec<String>,
    pub endpoints: Vec<String>,
    pub admin: Option<String>,
    pub instances: Vec<InstanceStatus>,
    pub stats: ServerStats,
    /// The instances were left out: the asker lacks the admin role.
    pub instances_hidden: bool,
    /// The remote tier's health, when one is configured.
    pub remote: Option<RemoteStatus>,
}

/// The remote tier as an operator sees it.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RemoteStatus {
    /// Its URL(s), passwords redacted.
    pub endpoint: String,
    pub up: bool,
    /// Milliseconds since it last went up or down.
    pub since_ms: u64,
    pub last_error: Option<String>,
}

//! The instance actor: one per registered TP rank. It holds the rank's layout
//! and opened memory, validates every store and retrieve against the layout,
//! reserves or reads L1 objects, has chunks missing from L1 read back from
//! the tier below (on the tier's threads, awaited without blocking the
//! actor), and hands the copy to its copy lane (its device's GPU worker for
//! CUDA memory).
//!
//! It must never copy bytes itself nor run a copy past its deadline. Its
//! memory is shared with in-flight jobs through an `Arc`, so when the
//! instance goes away the memory is released only after those copies finish.
//! It reaches the rest of the server only through its [`DataPath`] (L1, the
//! tier below, the counters) and its copy lane, never through the shared
//! server state or the route table.

use std::sync::Arc;

use actix::prelude::*;
use futures::future::{BoxFuture, FutureExt};
use kvcoord_memory::{ChunkBlocks, KvLayout};
use kvcoord_transport::{
    ChunkHash, ErrorKind, InstanceKey, LeaseId, ReplyBody, RetrieveOutcome, StoreOutcome, WireError,
};

use super::access::TenantId;
use super::copy_lane::{CopyLane, GatherJob, JobGate, OpenedMemory, ScatterJob, ScatterSource};
use super::counters::{Counters, TenantCounters};
use super::keys::{ModelId, ObjectKey, ObjectNamespace};
use super::l1::{L1Store, Reservation};
use super::supervision::{ChildExited, DeathNotice};
use super::tier::{Buffer, TierRead, Tiers, WriteBehind};

/// Store these chunks from these blocks.
#[derive(Message)]
#[rtype(result = "Result<ReplyBody, WireError>")]
pub struct StoreChunks {
    pub chunks: Vec<ChunkHash>,
    pub block_ids: Vec<u32>,
    /// IPC handle of the engine's "KV ready" event, for CUDA memory.
    pub ready_event: Option<Vec<u8>>,
    pub gate: Arc<JobGate>,
}

/// Retrieve these chunks into these blocks.
#[derive(Message)]
#[rtype(result = "Result<ReplyBody, WireError>")]
pub struct RetrieveChunks {
    pub chunks: Vec<ChunkHash>,
    pub block_ids: Vec<u32>,
    pub lease: Option<LeaseId>,
    /// IPC handle of the engine's "copy done" event, for CUDA memory: the
    /// reply comes once the copy is queued.
    pub done_event: Option<Vec<u8>>,
    pub gate: Arc<JobGate>,
    /// The request's deadline: remote reads end before it (as misses).
    pub deadline: std::time::Instant,
}

/// Stop (unregistered or reclaimed).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Retire;

/// Fault injection: panic inside a handler.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CrashInstance;

/// What an instance actor reaches besides its own registration.
#[derive(Clone)]
pub struct DataPath {
    pub l1: Arc<L1Store>,
    /// The tiers below L1 (disk, remote), as configured.
    pub tiers: Tiers,
    pub counters: Arc<Counters>,
    /// The tenant charged for the objects it stores (and promotes).
    pub tenant: TenantId,
    pub tenant_counters: Arc<TenantCounters>,
}

pub struct InstanceActor {
    pub key: InstanceKey,
    pub model: ModelId,
    /// Model name, world size and layout: what names objects beyond this process.
    pub namespace: Arc<ObjectNamespace>,
    pub layout: KvLayout,
    pub chunk_tokens: u32,
    pub memory: OpenedMemory,
    pub lane: Addr<CopyLane>,
    pub data: DataPath,
    notice: DeathNotice,
}

impl InstanceActor {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        key: InstanceKey,
        (model, namespace): (ModelId, Arc<ObjectNamespace>),
        layout: KvLayout,
        chunk_tokens: u32,
        memory: OpenedMemory,
        lane: Addr<CopyLane>,
        data: DataPath,
        supervisor: Recipient<ChildExited>,
        generation: u64,
    ) -> Self {
        let notice = DeathNotice::new(supervisor, ChildExited::Instance { key, generation });
        InstanceActor { key, model, namespace, layout, chunk_tokens, memory, lane, data, notice }
    }

    fn validate(&self, chunks: &[ChunkHash], block_ids: &[u32]) -> Result<ChunkBlocks, WireError> {
        if chunks.is_empty() {
            return Err(WireError::new(ErrorKind::InvalidArgument, "request names no chunks"));
        }
        self.layout
            .chunk_blocks(self.chunk_tokens, chunks.len(), block_ids)
            .map_err(|e| WireError::new(ErrorKind::InvalidArgument, e.to_string()))
    }

    fn object_key(&self, hash: ChunkHash) -> ObjectKey {
        ObjectKey { model: self.model, rank: self.key.rank, hash }
    }

    /// Where a chunk to retrieve is: L1, else the local tier, else the
    /// remote tier (read into a new L1 object, promoted once scattered, when
    /// there is room; else into a buffer, for host memory only), else
    /// nowhere. A local tier read starts now, on the tier's threads; a
    /// remote read is added to `remote_reads`, which the caller sends as one
    /// batch. The future resolves when the read is done, to `None` if the
    /// object could not be read back whole and verified.
    fn source(
        &self,
        key: ObjectKey,
        bytes: u64,
        remote_reads: &mut Vec<TierRead>,
    ) -> BoxFuture<'static, Option<ScatterSource>> {
        let l1 = &self.data.l1;
        if let Some(guard) = l1.read(&key) {
            return futures::future::ready(Some(ScatterSource::L1(guard))).boxed();
        }
        let (tier, batch) = match (&self.data.tiers.local, &self.data.tiers.remote) {
            (Some(local), _) if local.contains(&key) => (local, None),
            (_, Some(remote)) => (remote, Some(remote_reads)),
            _ => return futures::future::ready(None).boxed(),
        };
        let start = |read: TierRead| match batch {
            Some(batch) => batch.push(read),
            None => tier.read(read),
        };
        let namespace = self.namespace.clone();
        match l1.reserve_for(key, bytes, self.data.tenant) {
            Ok(Reservation::Write(ticket)) => {
                let (read, done) = TierRead::new(key, namespace, ticket);
                start(read);
                async move { read_back(done.await).map(ScatterSource::Promoted) }.boxed()
            }
            Ok(Reservation::AlreadyPresent) => futures::future::ready(l1.read(&key).map(ScatterSource::L1)).boxed(),
            // The copy kernel reads only pinned memory: no buffer for CUDA.
            _ if matches!(self.memory, OpenedMemory::Cuda(_)) => futures::future::ready(None).boxed(),
            _ => {
                let (read, done) = TierRead::new(key, namespace, Buffer::zeroed(bytes as usize));
                start(read);
                async move { read_back(done.await).map(ScatterSource::Buffer) }.boxed()
            }
        }
    }
}

/// The part of a retrieve's remaining time remote reads may use; the rest is
/// for the copy.
const REMOTE_READ_SHARE: (u32, u32) = (3, 4);

impl Actor for InstanceActor {
    type Context = Context<Self>;

    fn stopped(&mut self, _: &mut Self::Context) {
        let _ = &self.notice;
        tracing::debug!(engine = self.key.engine, rank = self.key.rank, "instance actor stopped");
    }
}

/// The bytes of a tier read that succeeded; a failed (or unanswered) read
/// drops them, so an unfilled write ticket discards itself.
fn read_back<D, E, R>(done: Result<(D, Result<(), E>), R>) -> Option<D> {
    match done {
        Ok((bytes, Ok(()))) => Some(bytes),
        _ => None,
    }
}

fn lane_gone(_: MailboxError) -> WireError {
    WireError::new(ErrorKind::Unavailable, "the copy lane restarted; retry")
}

impl Handler<StoreChunks> for InstanceActor {
    type Result = ResponseFuture<Result<ReplyBody, WireError>>;

    fn handle(&mut self, msg: StoreChunks, _: &mut Self::Context) -> Self::Result {
        let prepared = (|| {
            let blocks = self.validate(&msg.chunks, &msg.block_ids)?;
            let bytes = self.layout.chunk_object_bytes(blocks.blocks_per_chunk());
            let mut tickets = Vec::with_capacity(msg.chunks.len());
            let mut outcomes = Vec::with_capacity(msg.chunks.len());
            for &hash in &msg.chunks {
                let r = self
                    .data
                    .l1
                    .reserve_for(self.object_key(hash), bytes, self.data.tenant)
                    .map_err(|e| WireError::new(ErrorKind::Internal, format!("L1 memory could not grow: {e}")))?;
                match r {
                    Reservation::Write(t) => {
                        tickets.push(Some(t));
                        outcomes.push(StoreOutcome::Stored);
                    }
                    Reservation::AlreadyPresent => {
                        tickets.push(None);
                        outcomes.push(StoreOutcome::AlreadyPresent);
                    }
                    Reservation::NoSpace => {
                        tickets.push(None);
                        outcomes.push(StoreOutcome::SkippedNoMemory);
                    }
                }
            }
            Ok(GatherJob {
                layout: self.layout,
                memory: self.memory.clone(),
                blocks,
                tickets,
                outcomes,
                ready_event: msg.ready_event,
                gate: msg.gate,
            })
        })();
        let (lane, data) = (self.lane.clone(), self.data.clone());
        let keys: Vec<ObjectKey> = msg.chunks.iter().map(|&h| self.object_key(h)).collect();
        let namespace = self.namespace.clone();
        Box::pin(async move {
            let job = prepared?;
            if job.tickets.iter().all(Option::is_none) {
                return Ok(ReplyBody::Stored(job.outcomes));
            }
            let (outcomes, bytes) = lane.send(job).await.map_err(lane_gone)??;
            Counters::add(&data.counters.bytes_stored, bytes);
            Counters::add(&data.tenant_counters.bytes_stored, bytes);
            // Write behind: the store's reply does not wait for any tier.
            for tier in data.tiers.all() {
                for (key, _) in keys.iter().zip(&outcomes).filter(|(_, o)| **o == StoreOutcome::Stored) {
                    if let Some(object) = data.l1.read(key) {
                        let object = Box::new(object);
                        tier.write_behind(WriteBehind { key: *key, namespace: namespace.clone(), object });
                    }
                }
            }
            Ok(ReplyBody::Stored(outcomes))
        })
    }
}

impl Handler<RetrieveChunks> for InstanceActor {
    type Result = ResponseFuture<Result<ReplyBody, WireError>>;

    fn handle(&mut self, msg: RetrieveChunks, _: &mut Self::Context) -> Self::Result {
        let prepared = self.validate(&msg.chunks, &msg.block_ids).map(|blocks| {
            let bytes = self.layout.chunk_object_bytes(blocks.blocks_per_chunk());
            let mut remote_reads = Vec::new();
            let sources: Vec<_> =
                msg.chunks.iter().map(|&h| self.source(self.object_key(h), bytes, &mut remote_reads)).collect();
            if let (Some(remote), false) = (&self.data.tiers.remote, remote_reads.is_empty()) {
                let now = std::time::Instant::now();
                let left = msg.deadline.saturating_duration_since(now);
                remote.read_many(remote_reads, now + left * REMOTE_READ_SHARE.0 / REMOTE_READ_SHARE.1);
            }
            (blocks, sources)
        });
        let (layout, memory, gate) = (self.layout, self.memory.clone(), msg.gate);
        let (lane, data, rank, lease) = (self.lane.clone(), self.data.clone(), self.key.rank, msg.lease);
        let done_event = msg.done_event;
        Box::pin(async move {
            let (blocks, sources) = prepared?;
            // Tier reads finish on the tier's threads; the lane only copies.
            let objects = futures::future::join_all(sources).await;
            let job = ScatterJob { layout, memory, blocks, objects, done_event, gate };
            let result = if job.objects.iter().all(Option::is_none) {
                Ok(vec![RetrieveOutcome::Missing; job.objects.len()])
            } else {
                lane.send(job).await.map_err(lane_gone)?.map(|(o, bytes)| {
                    Counters::add(&data.counters.bytes_retrieved, bytes);
                    Counters::add(&data.tenant_counters.bytes_retrieved, bytes);
                    o
                })
            };
            if let Some(lease) = lease {
                data.l1.release_rank(lease, rank);
            }
            Ok(ReplyBody::Retrieved(result?))
        })
    }
}

impl Handler<Retire> for InstanceActor {
    type Result = ();
    fn handle(&mut self, _: Retire, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

impl Handler<CrashInstance> for InstanceActor {
    type Result = ();
    fn handle(&mut self, _: CrashInstance, _: &mut Self::Context) {
        panic!("injected fault: instance {:?} crashes", self.key);
    }
}

//! The GPU-worker actor: one per device (on the host backend, one per copy
//! lane), each on its own arbiter thread. It opens registered memory and runs
//! the gathers (store) and scatters (retrieve) of the instances routed to it.
//!
//! It owns the copy thread (and, on CUDA, the context and streams). It must
//! never touch the index except through the write tickets and object handles
//! a job carries, and never start a job whose deadline path cancelled it.

use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use kvcoord_gpu::host::HostMemoryError;
use kvcoord_gpu::{copy, ChunkBlocks, HostMapping, KvLayout, KvMemory, LayoutError, MemoryHandle, ObjectBytes};
use kvcoord_transport::{ErrorKind, RetrieveOutcome, StoreOutcome, WireError};

use super::disk::{Buffer, DiskTier};
use super::l1::{ObjectKey, ReadGuard, WriteTicket};
use super::supervision::{ChildExited, DeathNotice};

/// Decides, exactly once, whether a copy job runs or is cancelled: the worker
/// calls `start`, the request's deadline path calls `cancel`; whichever comes
/// first wins. A retrieve that has started is always waited for, so a client
/// told "timeout" never has its blocks written afterwards.
#[derive(Default)]
pub struct JobGate(AtomicU8);

const PENDING: u8 = 0;
const STARTED: u8 = 1;
const CANCELLED: u8 = 2;

impl JobGate {
    pub fn start(&self) -> bool {
        self.0.compare_exchange(PENDING, STARTED, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }
    pub fn cancel(&self) -> bool {
        self.0.compare_exchange(PENDING, CANCELLED, Ordering::AcqRel, Ordering::Acquire).is_ok()
    }
}

/// What identifies registered memory, to tell a repeated registration of the
/// same memory from new memory with the same layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemoryIdentity {
    /// (device, inode) of the memfd.
    Host(u64, u64),
    /// The IPC handles.
    Cuda(Vec<Vec<u8>>),
}

/// Memory opened for an instance. Dropped (unmapped) when the instance and
/// every in-flight copy holding it are gone.
pub type OpenedMemory = Arc<dyn KvMemory>;

/// Open registered memory on this worker's device.
#[derive(Message)]
#[rtype(result = "Result<(OpenedMemory, MemoryIdentity), WireError>")]
pub struct OpenMemory {
    pub layout: KvLayout,
    pub handle: MemoryHandle,
    pub fd: Option<OwnedFd>,
}

/// Gather chunks of blocks into L1 objects. `tickets[i]` is `Some` for the
/// chunks to write; `outcomes[i]` already holds the others' outcome.
#[derive(Message)]
#[rtype(result = "Result<(Vec<StoreOutcome>, u64), WireError>")]
pub struct GatherJob {
    pub layout: KvLayout,
    pub memory: OpenedMemory,
    pub blocks: ChunkBlocks,
    pub tickets: Vec<Option<WriteTicket>>,
    pub outcomes: Vec<StoreOutcome>,
    pub gate: Arc<JobGate>,
}

/// Where a retrieved chunk's bytes come from.
pub enum ScatterSource {
    /// A ready L1 object.
    L1(ReadGuard),
    /// The disk tier, read into a new L1 object (promoted on success).
    Promote(ObjectKey, WriteTicket),
    /// The disk tier, read into a buffer (L1 had no room).
    DiskOnly(ObjectKey, Buffer),
}

/// Scatter chunks into blocks; `objects[i]` is `None` for a missing chunk.
#[derive(Message)]
#[rtype(result = "Result<(Vec<RetrieveOutcome>, u64), WireError>")]
pub struct ScatterJob {
    pub layout: KvLayout,
    pub memory: OpenedMemory,
    pub blocks: ChunkBlocks,
    pub objects: Vec<Option<ScatterSource>>,
    pub disk: Option<Arc<DiskTier>>,
    pub gate: Arc<JobGate>,
}

/// Fault injection: panic inside a handler, as a bug would.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Crash;

pub struct GpuWorker {
    lane: u32,
    _notice: DeathNotice,
}

impl GpuWorker {
    pub fn new(lane: u32, generation: u64, supervisor: Recipient<ChildExited>) -> Self {
        GpuWorker { lane, _notice: DeathNotice::new(supervisor, ChildExited::Worker { lane, generation }) }
    }
}

impl Actor for GpuWorker {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Self::Context) {
        tracing::debug!(lane = self.lane, "gpu worker started");
    }
}

fn cancelled() -> WireError {
    WireError::new(ErrorKind::Timeout, "deadline passed before the copy started")
}

impl Handler<OpenMemory> for GpuWorker {
    type Result = Result<(OpenedMemory, MemoryIdentity), WireError>;

    fn handle(&mut self, msg: OpenMemory, _: &mut Self::Context) -> Self::Result {
        match msg.handle {
            MemoryHandle::HostFd { .. } => {
                let fd = msg.fd.ok_or_else(|| {
                    WireError::new(
                        ErrorKind::InvalidArgument,
                        "host memory must arrive as a memfd with the register frame (Unix socket only)",
                    )
                })?;
                let meta = std::fs::File::from(fd.try_clone().map_err(internal)?).metadata().map_err(internal)?;
                let identity = MemoryIdentity::Host(meta.dev(), meta.ino());
                let map = HostMapping::open(fd, &msg.layout).map_err(|e| match e {
                    HostMemoryError::Layout(LayoutError::MemorySize { .. }) => {
                        WireError::new(ErrorKind::LayoutMismatch, e.to_string())
                    }
                    HostMemoryError::Layout(_) | HostMemoryError::NotSealed => {
                        WireError::new(ErrorKind::InvalidArgument, e.to_string())
                    }
                    HostMemoryError::Io { .. } => internal(e),
                })?;
                Ok((Arc::new(map), identity))
            }
            MemoryHandle::CudaIpc { .. } => Err(WireError::new(
                ErrorKind::InvalidArgument,
                "this coordinator runs the host backend; CUDA IPC memory needs the CUDA backend",
            )),
        }
    }
}

fn internal(e: impl std::fmt::Display) -> WireError {
    WireError::new(ErrorKind::Internal, e.to_string())
}

impl Handler<GatherJob> for GpuWorker {
    type Result = Result<(Vec<StoreOutcome>, u64), WireError>;

    fn handle(&mut self, job: GatherJob, _: &mut Self::Context) -> Self::Result {
        if !job.gate.start() {
            return Err(cancelled());
        }
        let mut outcomes = job.outcomes;
        let mut bytes = 0;
        for (i, ticket) in job.tickets.into_iter().enumerate() {
            let Some(ticket) = ticket else { continue };
            copy::gather(&job.layout, job.memory.as_ref(), job.blocks.chunk(i), &ticket).map_err(internal)?;
            bytes += ticket.len() as u64;
            ticket.commit();
            outcomes[i] = StoreOutcome::Stored;
        }
        Ok((outcomes, bytes))
    }
}

impl Handler<ScatterJob> for GpuWorker {
    type Result = Result<(Vec<RetrieveOutcome>, u64), WireError>;

    fn handle(&mut self, job: ScatterJob, _: &mut Self::Context) -> Self::Result {
        if !job.gate.start() {
            return Err(cancelled());
        }
        let mut bytes = 0;
        let mut outcomes = Vec::with_capacity(job.objects.len());
        let scatter = |obj: &dyn ObjectBytes, i: usize| {
            copy::scatter(&job.layout, obj, job.memory.as_ref(), job.blocks.chunk(i)).map_err(internal)
        };
        // A disk object is served only if it reads back whole and its
        // checksum matches; otherwise it is dropped and reported missing.
        let from_disk =
            |key: &ObjectKey, into: &dyn ObjectBytes| job.disk.as_ref().is_some_and(|d| d.read_into(key, into).is_ok());
        for (i, object) in job.objects.into_iter().enumerate() {
            let served = match object {
                Some(ScatterSource::L1(obj)) => {
                    scatter(&obj, i)?;
                    Some(obj.len())
                }
                Some(ScatterSource::Promote(key, ticket)) if from_disk(&key, &ticket) => {
                    scatter(&ticket, i)?;
                    let n = ticket.len();
                    ticket.commit();
                    Some(n)
                }
                Some(ScatterSource::DiskOnly(key, buf)) if from_disk(&key, &buf) => {
                    scatter(&buf, i)?;
                    Some(buf.len())
                }
                _ => None,
            };
            match served {
                Some(n) => {
                    bytes += n as u64;
                    outcomes.push(RetrieveOutcome::Retrieved);
                }
                None => outcomes.push(RetrieveOutcome::Missing),
            }
        }
        Ok((outcomes, bytes))
    }
}

impl Handler<Crash> for GpuWorker {
    type Result = ();

    fn handle(&mut self, _: Crash, _: &mut Self::Context) {
        panic!("injected fault: gpu worker {} crashes", self.lane);
    }
}

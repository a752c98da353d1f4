//! The copy-lane actor: each lane runs on its own arbiter thread, opens the
//! registered memory of the instances routed to it and runs their gathers
//! (store) and scatters (retrieve). There are two kinds of lane:
//!
//! - a **host copy lane** (`--copy-lanes` of them) copies memfd memory with
//!   the CPU, on its own thread;
//! - a **device lane**, one per CUDA device, is "the GPU worker" of that
//!   device: it owns the device's [`CopyEngine`] (context, store streams,
//!   higher-priority retrieve streams, copy kernel). A job is queued on the
//!   GPU and the lane moves on; the job's reply is built when the engine
//!   hands back its payload after the copy finished, so "done" and the bytes
//!   arrive as one value.
//!
//! It must never touch the index except through the write tickets and object
//! handles a job carries, never start a job whose deadline path cancelled
//! it, and never do tier (disk) I/O: every object a job carries is already in
//! memory.

use std::os::fd::OwnedFd;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use kvcoord_memory::cuda::engine::chunk_segments;
use kvcoord_memory::cuda::ipc::IpcOpenError;
use kvcoord_memory::cuda::{CopyDirection, CopyEngine, CopyMethod, CudaDevice, IpcKvMemory, Segment};
use kvcoord_memory::host::HostMemoryError;
use kvcoord_memory::{copy, ChunkBlocks, HostMapping, KvLayout, KvMemory, LayoutError, MemoryHandle, ObjectBytes};
use kvcoord_transport::{ErrorKind, RetrieveOutcome, StoreOutcome, WireError};

use super::l1::{ReadGuard, WriteTicket};
use super::supervision::{ChildExited, DeathNotice};
use super::tier::Buffer;

/// Decides, exactly once, whether a copy job runs or is cancelled: the lane
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

/// Memory opened for an instance. Released (unmapped, or IPC-closed) when
/// the instance and every in-flight copy holding it are gone.
#[derive(Clone)]
pub enum OpenedMemory {
    /// A mapped memfd, copied by a host lane.
    Host(Arc<dyn KvMemory>),
    /// Device memory opened by CUDA IPC, copied by its device's engine.
    Cuda(Arc<IpcKvMemory>),
}

/// Open registered memory on this lane (its device, for CUDA memory).
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
    /// IPC handle of the engine's "KV ready" event (CUDA memory only).
    pub ready_event: Option<Vec<u8>>,
    pub gate: Arc<JobGate>,
}

/// Where a retrieved chunk's bytes are. Every source is already in memory:
/// objects of the tier below L1 were read (on the tier's threads) before the
/// job reached the lane.
pub enum ScatterSource {
    /// A ready L1 object.
    L1(ReadGuard),
    /// A new L1 object read back from the tier below, committed (promoted)
    /// once scattered.
    Promoted(WriteTicket),
    /// An object read back from the tier below into a buffer (L1 had no
    /// room); host memory only, the kernel reads only pinned memory.
    Buffer(Buffer),
}

/// Scatter chunks into blocks; `objects[i]` is `None` for a missing chunk.
#[derive(Message)]
#[rtype(result = "Result<(Vec<RetrieveOutcome>, u64), WireError>")]
pub struct ScatterJob {
    pub layout: KvLayout,
    pub memory: OpenedMemory,
    pub blocks: ChunkBlocks,
    pub objects: Vec<Option<ScatterSource>>,
    /// IPC handle of the engine's "copy done" event (CUDA memory only): it
    /// is recorded after the copy and the reply comes once the copy is queued.
    pub done_event: Option<Vec<u8>>,
    pub gate: Arc<JobGate>,
}

/// Fault injection: panic inside a handler, as a bug would.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Crash;

/// What a lane copies with.
enum Copier {
    /// Its own thread (memfd memory).
    Host,
    /// A device's copy engine; `Err` says why it could not start.
    Cuda(Arc<CudaDevice>, Result<CopyEngine, String>),
}

pub struct CopyLane {
    lane: u32,
    copier: Copier,
    _notice: DeathNotice,
}

impl CopyLane {
    /// Lane `lane`: a device's GPU worker (with that many streams per
    /// direction and that copy method) when `device` is given, else a host
    /// copy lane. Call on the lane's own arbiter thread.
    pub fn new(
        lane: u32,
        generation: u64,
        supervisor: Recipient<ChildExited>,
        device: Option<(Arc<CudaDevice>, usize, CopyMethod)>,
    ) -> Self {
        let copier = match device {
            None => Copier::Host,
            Some((d, streams, method)) => {
                let engine = CopyEngine::new(d.clone(), streams, method).map_err(|e| e.to_string());
                if let Err(e) = &engine {
                    tracing::error!(lane, device = %d.uuid_string(), error = %e, "copy engine failed to start");
                }
                Copier::Cuda(d, engine)
            }
        };
        CopyLane { lane, copier, _notice: DeathNotice::new(supervisor, ChildExited::CopyLane { lane, generation }) }
    }

    fn engine(&self) -> Result<&CopyEngine, WireError> {
        match &self.copier {
            Copier::Cuda(_, Ok(engine)) => Ok(engine),
            Copier::Cuda(_, Err(e)) => Err(WireError::new(ErrorKind::Unavailable, format!("copy engine down: {e}"))),
            Copier::Host => Err(WireError::new(ErrorKind::Internal, "CUDA memory routed to a host copy lane")),
        }
    }
}

impl Actor for CopyLane {
    type Context = Context<Self>;

    fn started(&mut self, _: &mut Self::Context) {
        match &self.copier {
            Copier::Host => tracing::debug!(lane = self.lane, "host copy lane started"),
            Copier::Cuda(d, _) => {
                tracing::info!(lane = self.lane, device = %d.uuid_string(), name = d.name(), "gpu worker started")
            }
        }
    }
}

fn cancelled() -> WireError {
    WireError::new(ErrorKind::Timeout, "deadline passed before the copy started")
}

impl Handler<OpenMemory> for CopyLane {
    type Result = Result<(OpenedMemory, MemoryIdentity), WireError>;

    fn handle(&mut self, msg: OpenMemory, _: &mut Self::Context) -> Self::Result {
        match msg.handle {
            MemoryHandle::HostFd { size } => {
                let fd = msg.fd.ok_or_else(|| {
                    WireError::new(
                        ErrorKind::InvalidArgument,
                        "host memory must arrive as a memfd with the register frame (Unix socket only)",
                    )
                })?;
                let meta = std::fs::File::from(fd.try_clone().map_err(internal)?).metadata().map_err(internal)?;
                if meta.len() != size {
                    return Err(WireError::new(
                        ErrorKind::LayoutMismatch,
                        format!("the memfd has {} bytes but was registered as {size} bytes", meta.len()),
                    ));
                }
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
                Ok((OpenedMemory::Host(Arc::new(map)), identity))
            }
            MemoryHandle::CudaIpc { device_uuid, layers } => {
                let Copier::Cuda(device, _) = &self.copier else {
                    return Err(WireError::new(ErrorKind::Internal, "CUDA memory routed to a host copy lane"));
                };
                if device.uuid() != device_uuid {
                    return Err(WireError::new(ErrorKind::Internal, "CUDA memory routed to another device's lane"));
                }
                let identity = MemoryIdentity::Cuda(layers.iter().map(|l| l.handle.clone()).collect());
                let mem = IpcKvMemory::open(device.clone(), &msg.layout, &layers).map_err(|e| match e {
                    IpcOpenError::LayoutMismatch(m) => WireError::new(ErrorKind::LayoutMismatch, m),
                    IpcOpenError::InvalidArgument(m) => WireError::new(ErrorKind::InvalidArgument, m),
                    IpcOpenError::Cuda(e) => internal(e),
                })?;
                Ok((OpenedMemory::Cuda(Arc::new(mem)), identity))
            }
        }
    }
}

fn internal(e: impl std::fmt::Display) -> WireError {
    WireError::new(ErrorKind::Internal, e.to_string())
}

impl Handler<GatherJob> for CopyLane {
    type Result = ResponseFuture<Result<(Vec<StoreOutcome>, u64), WireError>>;

    fn handle(&mut self, job: GatherJob, _: &mut Self::Context) -> Self::Result {
        match job.memory.clone() {
            OpenedMemory::Host(mem) => Box::pin(std::future::ready(gather_on_host(job, mem.as_ref()))),
            OpenedMemory::Cuda(mem) => match self.engine().and_then(|e| gather_on_device(e, job, mem)) {
                Ok(done) => Box::pin(async move { done.await.unwrap_or_else(|_| Err(engine_lost())) }),
                Err(e) => Box::pin(std::future::ready(Err(e))),
            },
        }
    }
}

fn gather_on_host(job: GatherJob, mem: &dyn KvMemory) -> Result<(Vec<StoreOutcome>, u64), WireError> {
    if job.ready_event.is_some() {
        return Err(WireError::new(ErrorKind::InvalidArgument, "a ready event needs CUDA-registered memory"));
    }
    if !job.gate.start() {
        return Err(cancelled());
    }
    let mut outcomes = job.outcomes;
    let mut bytes = 0;
    for (i, ticket) in job.tickets.into_iter().enumerate() {
        let Some(ticket) = ticket else { continue };
        copy::gather(&job.layout, mem, job.blocks.chunk(i), &ticket).map_err(internal)?;
        bytes += ticket.len() as u64;
        ticket.commit();
        outcomes[i] = StoreOutcome::Stored;
    }
    Ok((outcomes, bytes))
}

fn engine_lost() -> WireError {
    WireError::new(ErrorKind::Unavailable, "the copy engine stopped before the copy completed")
}

type CopyDone<T> = tokio::sync::oneshot::Receiver<Result<T, WireError>>;

/// Queues one kernel gathering every chunk with a ticket into its pinned L1
/// object; the tickets commit on the completion thread after the copy.
fn gather_on_device(
    engine: &CopyEngine,
    job: GatherJob,
    mem: Arc<IpcKvMemory>,
) -> Result<CopyDone<(Vec<StoreOutcome>, u64)>, WireError> {
    let wait = job
        .ready_event
        .as_deref()
        .map(|h| mem.ipc_event(h))
        .transpose()
        .map_err(|e| WireError::new(ErrorKind::InvalidArgument, e.to_string()))?;
    if !job.gate.start() {
        return Err(cancelled());
    }
    let mut segments: Vec<Segment> = Vec::new();
    for (i, ticket) in job.tickets.iter().enumerate() {
        if let Some(t) = ticket {
            let addr = t.as_ptr() as u64;
            chunk_segments(
                &job.layout,
                mem.layer_addrs(),
                job.blocks.chunk(i),
                addr,
                CopyDirection::Gather,
                &mut segments,
            );
        }
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    let (tickets, mut outcomes) = (job.tickets, job.outcomes);
    let done = move |r: Result<(), kvcoord_memory::cuda::CudaError>| {
        let _hold = mem;
        let result = r.map_err(internal).map(|_| {
            let mut bytes = 0;
            for (i, t) in tickets.into_iter().enumerate() {
                if let Some(t) = t {
                    bytes += t.len() as u64;
                    t.commit();
                    outcomes[i] = StoreOutcome::Stored;
                }
            }
            (outcomes, bytes)
        });
        let _ = tx.send(result);
    };
    // SAFETY: each segment reads one block plane of the instance's opened
    // layers (ids validated against its layout, regions checked against the
    // allocations at open) and writes inside one write ticket's pinned L1
    // object, which nobody else writes or reads until it commits. Both the
    // memory and the tickets are owned by `done`, which runs after the copy.
    unsafe { engine.submit(CopyDirection::Gather, &segments, wait, None, done) }.map_err(internal)?;
    Ok(rx)
}

impl Handler<ScatterJob> for CopyLane {
    type Result = ResponseFuture<Result<(Vec<RetrieveOutcome>, u64), WireError>>;

    fn handle(&mut self, job: ScatterJob, _: &mut Self::Context) -> Self::Result {
        match job.memory.clone() {
            OpenedMemory::Host(mem) => Box::pin(std::future::ready(scatter_on_host(job, mem.as_ref()))),
            OpenedMemory::Cuda(mem) => match self.engine().and_then(|e| scatter_on_device(e, job, mem)) {
                Ok(done) => Box::pin(async move { done.await.unwrap_or_else(|_| Err(engine_lost())) }),
                Err(e) => Box::pin(std::future::ready(Err(e))),
            },
        }
    }
}

fn scatter_on_host(job: ScatterJob, mem: &dyn KvMemory) -> Result<(Vec<RetrieveOutcome>, u64), WireError> {
    if job.done_event.is_some() {
        return Err(WireError::new(ErrorKind::InvalidArgument, "a done event needs CUDA-registered memory"));
    }
    if !job.gate.start() {
        return Err(cancelled());
    }
    let mut bytes = 0;
    let mut outcomes = Vec::with_capacity(job.objects.len());
    let scatter =
        |obj: &dyn ObjectBytes, i: usize| copy::scatter(&job.layout, obj, mem, job.blocks.chunk(i)).map_err(internal);
    for (i, object) in job.objects.into_iter().enumerate() {
        let served = match object {
            Some(ScatterSource::L1(obj)) => {
                scatter(&obj, i)?;
                Some(obj.len())
            }
            Some(ScatterSource::Promoted(ticket)) => {
                scatter(&ticket, i)?;
                let n = ticket.len();
                ticket.commit();
                Some(n)
            }
            Some(ScatterSource::Buffer(buf)) => {
                scatter(&buf, i)?;
                Some(buf.len())
            }
            None => None,
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

/// Queues one kernel scattering every servable chunk from pinned L1 into the
/// instance's blocks; the reply is built after the copy finished, or, with a
/// done event, once the copy is queued and the event recorded after it (the
/// engine's stream waits on the event). A buffer source is reported missing
/// (the kernel reads only pinned memory; the instance does not read one for
/// CUDA memory).
fn scatter_on_device(
    engine: &CopyEngine,
    job: ScatterJob,
    mem: Arc<IpcKvMemory>,
) -> Result<CopyDone<(Vec<RetrieveOutcome>, u64)>, WireError> {
    let signal = job
        .done_event
        .as_deref()
        .map(|h| mem.ipc_event(h))
        .transpose()
        .map_err(|e| WireError::new(ErrorKind::InvalidArgument, e.to_string()))?;
    if !job.gate.start() {
        return Err(cancelled());
    }
    let mut segments: Vec<Segment> = Vec::new();
    let mut outcomes = Vec::with_capacity(job.objects.len());
    let mut held = Vec::with_capacity(job.objects.len());
    let mut bytes = 0;
    for (i, object) in job.objects.into_iter().enumerate() {
        let source = match object {
            Some(s @ (ScatterSource::L1(_) | ScatterSource::Promoted(_))) => s,
            Some(ScatterSource::Buffer(_)) | None => {
                outcomes.push(RetrieveOutcome::Missing);
                continue;
            }
        };
        let obj: &dyn ObjectBytes = match &source {
            ScatterSource::L1(g) => g,
            ScatterSource::Promoted(t) => t,
            ScatterSource::Buffer(b) => b,
        };
        bytes += obj.len() as u64;
        let addr = obj.as_ptr() as u64;
        chunk_segments(
            &job.layout,
            mem.layer_addrs(),
            job.blocks.chunk(i),
            addr,
            CopyDirection::Scatter,
            &mut segments,
        );
        outcomes.push(RetrieveOutcome::Retrieved);
        held.push(source);
    }
    let (tx, rx) = tokio::sync::oneshot::channel();
    // With a done event the reply goes now (below) and this one is dropped.
    let (early, reply) = match signal {
        Some(_) => (Some((outcomes.clone(), bytes)), None),
        None => (None, Some(tx)),
    };
    let done = move |r: Result<(), kvcoord_memory::cuda::CudaError>| {
        let _hold = mem;
        let result = r.map_err(internal).map(|_| {
            for source in held {
                if let ScatterSource::Promoted(ticket) = source {
                    ticket.commit();
                }
            }
            (outcomes, bytes)
        });
        match reply {
            Some(tx) => drop(tx.send(result)),
            None => {
                if let Err(e) = result {
                    // The engine was told "queued"; a copy failing on the
                    // device after that leaves its context unusable anyway.
                    tracing::error!(error = %e, "a retrieve failed on the device after its early reply");
                }
            }
        }
    };
    // SAFETY: each segment reads one committed L1 object (held by a read
    // guard) or a promoted object this job alone writes (its write ticket),
    // both pinned, and writes one block plane of the instance's opened
    // layers (ids validated, regions checked at open). `done` owns the
    // guards, tickets and memory until the copy finished.
    unsafe { engine.submit(CopyDirection::Scatter, &segments, None, signal, done) }.map_err(internal)?;
    match early {
        Some(queued) => {
            let (tx, rx) = tokio::sync::oneshot::channel();
            let _ = tx.send(Ok(queued));
            Ok(rx)
        }
        None => Ok(rx),
    }
}

impl Handler<Crash> for CopyLane {
    type Result = ();

    fn handle(&mut self, _: Crash, _: &mut Self::Context) {
        panic!("injected fault: copy lane {} crashes", self.lane);
    }
}

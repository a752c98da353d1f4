//! A device's copy engine: the copy kernel (one CTA per block plane, 16-byte
//! vector accesses), store streams and higher-priority retrieve streams (two
//! of each, used in turn), and one completion thread per stream.
//!
//! A copy is submitted with the resources it touches (write tickets, read
//! guards, the opened IPC memory) as its payload. The completion thread waits
//! for the copy's event and only then hands the payload back — so a result is
//! one value delivered after the bytes landed, and nothing a kernel touches is
//! released while it runs, even if the submitter has gone away.
//!
//! The kernel is committed as PTX (`gpu/kernels/copy_segments.ptx`, generated
//! from `copy_segments.cu` beside it by the command written there) and
//! JIT-compiled by the driver when the engine starts: no CUDA toolkit is
//! needed to build or run kvcoord. This module must never decide what to
//! copy; it moves the segments it is given.

use std::ffi::{c_void, CString};
use std::sync::mpsc;
use std::sync::Arc;

use cudarc::driver::{result, sys};

use super::device::CudaDevice;
use super::driver::{op, CudaError};
use crate::copy::chunk_runs;
use crate::layout::{BlockId, KvLayout};

const PTX: &str = include_str!("../../kernels/copy_segments.ptx");
const KERNEL: &str = "kvc_copy_segments";
const THREADS_PER_CTA: u32 = 256;
/// Streams per direction unless told otherwise. Used in turn, one stream's
/// staging kernel overlaps another's DMA, so the link never waits for a
/// kernel.
pub const DEFAULT_STREAMS_PER_DIRECTION: usize = 2;

/// One contiguous run of bytes to copy, as the kernel reads it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub src: u64,
    pub dst: u64,
    pub len: u64,
}

/// How an engine moves segments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyMethod {
    /// Through a device staging buffer per stream: the kernel gathers the
    /// paged blocks into it (HBM to HBM, ~30 us per 32 MiB) and one
    /// contiguous DMA per object moves it to pinned L1 at the link's
    /// contiguous rate; a retrieve is the reverse. Costs
    /// [`STAGING_BYTES`] of device memory per stream (`--gpu-copy staged`).
    Staged,
    /// The copy kernel straight between device blocks and pinned host
    /// memory: one CTA per segment, 16-byte vector accesses over PCIe
    /// (`--gpu-copy direct`).
    Direct,
    /// One `cuMemcpyBatchAsync` per job: the copy engines (DMA), driven by
    /// the driver from the segment list.
    DmaBatch,
}

/// Which way a copy goes, and so which stream runs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CopyDirection {
    /// Device blocks into pinned L1 objects (store stream).
    Gather,
    /// Pinned L1 objects into device blocks (retrieve stream, higher priority).
    Scatter,
}

/// Appends the segments that move one chunk between per-layer device memory
/// (`layer_addrs`: each layer's base, from its IPC handle and offset; the
/// layout's layer offset and stride are not used here) and a contiguous
/// object at `object_addr`: one segment per run of each block, in object
/// order. Runs are not merged across blocks even where contiguous: the
/// kernel copies one segment per CTA, so fewer, larger segments would cost
/// it parallelism (a block-compact layout is one run, so one segment, per
/// block, as today's layout is one per block plane).
pub fn chunk_segments(
    layout: &KvLayout,
    layer_addrs: &[u64],
    blocks: &[BlockId],
    object_addr: u64,
    direction: CopyDirection,
    out: &mut Vec<Segment>,
) {
    out.extend(chunk_runs(layout, blocks).map(|r| {
        let (kv, object) = (layer_addrs[r.layer as usize] + r.in_layer, object_addr + r.object);
        match direction {
            CopyDirection::Gather => Segment { src: kv, dst: object, len: r.len },
            CopyDirection::Scatter => Segment { src: object, dst: kv, len: r.len },
        }
    }));
}

/// One run of host memory that moves by one DMA to or from staging.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostRun {
    pub host: u64,
    pub staged: u64,
    pub len: u64,
}

/// One fill of a staging buffer: the kernel's segments (between device
/// blocks and staging) and the host runs that move by DMA.
#[derive(Debug, PartialEq, Eq)]
pub struct StagingFill {
    pub kernel: Vec<Segment>,
    pub runs: Vec<HostRun>,
}

/// Splits a copy into fills of a staging buffer at `staging` of `capacity`
/// bytes. Each fill holds whole segments in order; the host sides of
/// consecutive segments that are contiguous (one L1 object) become one run.
pub fn plan_staging(
    direction: CopyDirection,
    segments: &[Segment],
    staging: u64,
    capacity: u64,
) -> Result<Vec<StagingFill>, CudaError> {
    let mut fills = Vec::new();
    let mut rest = segments;
    while !rest.is_empty() {
        let mut fill = StagingFill { kernel: Vec::new(), runs: Vec::new() };
        let mut used = 0u64;
        for s in rest {
            if s.len > capacity {
                return Err(CudaError::Invalid(format!("a {}-byte block exceeds the staging buffer", s.len)));
            }
            if used + s.len > capacity {
                break;
            }
            let staged = staging + used;
            let (host, seg) = match direction {
                CopyDirection::Gather => (s.dst, Segment { src: s.src, dst: staged, len: s.len }),
                CopyDirection::Scatter => (s.src, Segment { src: staged, dst: s.dst, len: s.len }),
            };
            match fill.runs.last_mut() {
                Some(r) if r.host + r.len == host && r.staged + r.len == staged => r.len += s.len,
                _ => fill.runs.push(HostRun { host, staged, len: s.len }),
            }
            fill.kernel.push(seg);
            used += s.len;
        }
        rest = &rest[fill.kernel.len()..];
        fills.push(fill);
    }
    Ok(fills)
}

type Completion = Box<dyn FnOnce(Result<(), CudaError>) + Send>;

struct Pending {
    event: usize,
    done: Completion,
    /// Segment tables the copy's kernels read, returned after it completed.
    tables: Vec<usize>,
}

/// Segments per kernel launch: one pinned table's worth.
const TABLE_SEGMENTS: usize = 4096;

/// Pinned, device-mapped buffers of [`TABLE_SEGMENTS`] segments that the
/// kernel reads its segment table from, reused once their copy completed.
/// (Uploading each table with a pageable copy instead made deep store queues
/// stall: the driver's staging for pageable copies ran out.)
struct TablePool {
    device: Arc<CudaDevice>,
    free: parking_lot::Mutex<Vec<usize>>,
}

impl TablePool {
    fn take(&self) -> Result<usize, CudaError> {
        if let Some(p) = self.free.lock().pop() {
            return Ok(p);
        }
        self.device.bind()?;
        let flags = sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_DEVICEMAP;
        // SAFETY: context bound; the buffer is owned by this pool (or by a
        // pending copy, which gives it back) and freed in `Drop`.
        let p = unsafe { result::malloc_host(TABLE_SEGMENTS * std::mem::size_of::<Segment>(), flags) }
            .map_err(op("cuMemHostAlloc"))?;
        Ok(p as usize)
    }

    fn give_back(&self, tables: Vec<usize>) {
        self.free.lock().extend(tables);
    }
}

impl Drop for TablePool {
    fn drop(&mut self) {
        if self.device.bind().is_err() {
            return;
        }
        for p in self.free.get_mut().drain(..) {
            // SAFETY: allocated by `take`, freed once; no copy holds it (the
            // pool is dropped only after every completion thread ended).
            let _ = unsafe { result::free_host(p as *mut c_void) };
        }
    }
}

/// Device staging memory per stream ([`CopyMethod::Staged`]).
pub const STAGING_BYTES: u64 = 64 << 20;

struct StreamLane {
    stream: sys::CUstream,
    completions: Option<mpsc::Sender<Pending>>,
    /// Staging buffer of [`STAGING_BYTES`] (0 when the method needs none).
    staging: sys::CUdeviceptr,
}

/// The copy engine of one device.
pub struct CopyEngine {
    device: Arc<CudaDevice>,
    module: sys::CUmodule,
    function: sys::CUfunction,
    /// Store streams (lowest priority).
    store: Vec<StreamLane>,
    /// Retrieve streams (highest priority: a retrieve is on a request's
    /// critical path, a store is not).
    retrieve: Vec<StreamLane>,
    next: std::sync::atomic::AtomicUsize,
    method: CopyMethod,
    tables: Arc<TablePool>,
}

// SAFETY: the handles are plain driver values usable from any thread once
// the context is bound (every method binds it). The completion senders are
// `Send`.
unsafe impl Send for CopyEngine {}

fn completion_thread(
    device: Arc<CudaDevice>,
    tables: Arc<TablePool>,
    name: &str,
) -> Result<mpsc::Sender<Pending>, CudaError> {
    let (tx, rx) = mpsc::channel::<Pending>();
    std::thread::Builder::new()
        .name(format!("kvc-{name}-done-{}", device.ordinal()))
        .spawn(move || {
            let bound = device.bind();
            // In submission order, which is this stream's completion order.
            for p in rx {
                let event = p.event as sys::CUevent;
                let r = bound.clone().and_then(|_| {
                    // SAFETY: `event` was created and recorded by `submit`
                    // and is destroyed only below, after this wait.
                    unsafe { result::event::synchronize(event) }.map_err(op("copy kernel"))
                });
                // SAFETY: created by `submit`, waited for above, destroyed once.
                let _ = unsafe { result::event::destroy(event) };
                tables.give_back(p.tables);
                (p.done)(r);
            }
        })
        .map_err(|e| CudaError::Invalid(format!("spawning the completion thread: {e}")))?;
    Ok(tx)
}

impl CopyEngine {
    /// Loads the kernel and creates `streams` store streams and `streams`
    /// retrieve streams on `device`, with staging buffers if `method` needs
    /// them.
    pub fn new(device: Arc<CudaDevice>, streams: usize, method: CopyMethod) -> Result<Self, CudaError> {
        device.bind()?;
        let ptx = CString::new(PTX).map_err(|_| CudaError::Invalid("PTX contains a NUL byte".into()))?;
        // SAFETY: `ptx` is a NUL-terminated PTX image that outlives the call.
        let module = unsafe { result::module::load_data(ptx.as_ptr().cast()) }.map_err(op("cuModuleLoadData"))?;
        // SAFETY: `module` was just loaded and is unloaded only in `Drop`.
        let function = unsafe { result::module::get_function(module, CString::new(KERNEL).expect("no NUL")) }
            .map_err(op("cuModuleGetFunction"))?;
        let (lowest, highest) = result::stream::get_priority_range().map_err(op("cuCtxGetStreamPriorityRange"))?;
        let device_for_tables = device.clone();
        let mut engine = CopyEngine {
            device,
            module,
            function,
            store: Vec::new(),
            retrieve: Vec::new(),
            next: std::sync::atomic::AtomicUsize::new(0),
            method,
            tables: Arc::new(TablePool { device: device_for_tables, free: parking_lot::Mutex::new(Vec::new()) }),
        };
        for _ in 0..streams.max(1) {
            for (lanes, priority, name) in
                [(&mut engine.store, lowest, "store"), (&mut engine.retrieve, highest, "retrieve")]
            {
                let stream = result::stream::create_with_priority(result::stream::StreamKind::NonBlocking, priority)
                    .map_err(op("cuStreamCreateWithPriority"))?;
                lanes.push(StreamLane { stream, completions: None, staging: 0 });
                let lane = lanes.last_mut().expect("just pushed");
                lane.completions = Some(completion_thread(engine.device.clone(), engine.tables.clone(), name)?);
                if method == CopyMethod::Staged {
                    // SAFETY: context bound; freed in `Drop` after the
                    // stream drained.
                    lane.staging = unsafe { result::malloc_sync(STAGING_BYTES as usize) }.map_err(op("cuMemAlloc"))?;
                }
            }
        }
        Ok(engine)
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.device
    }

    /// Queues the copy of `segments` on `direction`'s stream, after `wait`
    /// (an event of the client's, e.g. "KV ready") if given, and records
    /// `signal` (e.g. the client's "copy done") after it. `done` is called
    /// exactly once, from a completion thread, after the copy finished or
    /// failed. Every address must stay valid until then: pass what owns them
    /// in `done`'s captures.
    ///
    /// # Safety
    ///
    /// Every segment must name `len` readable bytes at `src` and writable
    /// bytes at `dst`, both device-accessible (device memory of this
    /// device's context, or pinned host memory), not overlapping, and not
    /// written by anyone else until `done` runs.
    pub unsafe fn submit(
        &self,
        direction: CopyDirection,
        segments: &[Segment],
        wait: Option<sys::CUevent>,
        signal: Option<sys::CUevent>,
        done: impl FnOnce(Result<(), CudaError>) + Send + 'static,
    ) -> Result<(), CudaError> {
        let lanes = match direction {
            CopyDirection::Gather => &self.store,
            CopyDirection::Scatter => &self.retrieve,
        };
        let lane = &lanes[self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % lanes.len()];
        let Some(completions) = &lane.completions else { return Err(CudaError::Invalid("engine stopped".into())) };
        self.device.bind()?;
        let stream = lane.stream;
        if let Some(ev) = wait {
            // SAFETY: `ev` is a live event (the caller's) and `stream` ours.
            unsafe { result::stream::wait_event(stream, ev, sys::CUevent_wait_flags::CU_EVENT_WAIT_DEFAULT) }
                .map_err(op("cuStreamWaitEvent"))?;
        }
        let mut event: sys::CUevent = std::ptr::null_mut();
        let flags =
            sys::CUevent_flags::CU_EVENT_BLOCKING_SYNC as u32 | sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
        // SAFETY: context bound; `event` is a valid out-pointer.
        unsafe { sys::cuEventCreate(&mut event, flags) }.result().map_err(op("cuEventCreate"))?;
        let mut tables = Vec::new();
        let launched = match (segments.is_empty(), self.method) {
            (true, _) => Ok(()),
            (false, CopyMethod::Direct) => self.launch(stream, segments, &mut tables),
            (false, CopyMethod::Staged) => self.staged(lane, direction, segments, &mut tables),
            (false, CopyMethod::DmaBatch) => Self::dma_batch(stream, segments),
        };
        // SAFETY: `event`, `signal` (the caller's) and `stream` are alive.
        let recorded = launched
            .and_then(|_| match signal {
                Some(ev) => unsafe { result::event::record(ev, stream) }.map_err(op("cuEventRecord (done event)")),
                None => Ok(()),
            })
            .and_then(|_| unsafe { result::event::record(event, stream) }.map_err(op("cuEventRecord")));
        if let Err(e) = recorded {
            // Whatever was queued must finish before the caller releases the
            // memory it names.
            // SAFETY: our stream and event; the event is destroyed once.
            unsafe {
                let _ = result::stream::synchronize(stream);
                let _ = result::event::destroy(event);
            }
            self.tables.give_back(tables);
            return Err(e);
        }
        completions.send(Pending { event: event as usize, done: Box::new(done), tables }).map_err(|lost| {
            // No thread will wait for this copy: wait here, so that what
            // `done` owns is released only after the copy ran.
            // SAFETY: our stream; the event is destroyed once.
            unsafe {
                let _ = result::stream::synchronize(stream);
                let _ = result::event::destroy(lost.0.event as sys::CUevent);
            }
            self.tables.give_back(lost.0.tables);
            CudaError::Invalid("completion thread gone".into())
        })
    }

    /// Queues the copy through the lane's staging buffer, one fill at a time
    /// (see [`plan_staging`]). Stream order keeps a fill from overwriting the
    /// staging buffer before the previous fill's copies out of it ran.
    fn staged(
        &self,
        lane: &StreamLane,
        direction: CopyDirection,
        segments: &[Segment],
        tables: &mut Vec<usize>,
    ) -> Result<(), CudaError> {
        let stream = lane.stream;
        for fill in plan_staging(direction, segments, lane.staging, STAGING_BYTES)? {
            if direction == CopyDirection::Gather {
                self.launch(stream, &fill.kernel, tables)?;
            }
            for run in &fill.runs {
                // SAFETY: `run.host` spans `run.len` bytes of pinned memory
                // the caller vouched for; the staging range lies inside the
                // lane's buffer (`plan_staging` keeps every fill within it).
                let r = unsafe {
                    match direction {
                        CopyDirection::Gather => {
                            sys::cuMemcpyDtoHAsync_v2(run.host as *mut c_void, run.staged, run.len as usize, stream)
                        }
                        CopyDirection::Scatter => {
                            sys::cuMemcpyHtoDAsync_v2(run.staged, run.host as *const c_void, run.len as usize, stream)
                        }
                    }
                };
                r.result().map_err(op("cuMemcpyAsync (staging)"))?;
            }
            if direction == CopyDirection::Scatter {
                self.launch(stream, &fill.kernel, tables)?;
            }
        }
        Ok(())
    }

    /// Queues every segment as one batched DMA (`cuMemcpyBatchAsync`).
    fn dma_batch(stream: sys::CUstream, segments: &[Segment]) -> Result<(), CudaError> {
        let mut dsts: Vec<u64> = segments.iter().map(|s| s.dst).collect();
        let mut srcs: Vec<u64> = segments.iter().map(|s| s.src).collect();
        let mut sizes: Vec<usize> = segments.iter().map(|s| s.len as usize).collect();
        // SAFETY: all-zero is a valid `CUmemcpyAttributes` (no location hints).
        let mut attr: sys::CUmemcpyAttributes = unsafe { std::mem::zeroed() };
        attr.srcAccessOrder = sys::CUmemcpySrcAccessOrder::CU_MEMCPY_SRC_ACCESS_ORDER_STREAM;
        attr.flags = sys::CUmemcpyFlags::CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE as u32;
        let mut attr_idx = 0usize;
        let mut fail_idx = usize::MAX;
        // SAFETY: the three arrays hold `segments.len()` entries each and
        // live through the call (the driver copies the descriptors); the
        // caller of `submit` guarantees every address range.
        unsafe {
            sys::cuMemcpyBatchAsync(
                dsts.as_mut_ptr(),
                srcs.as_mut_ptr(),
                sizes.as_mut_ptr(),
                segments.len(),
                &mut attr,
                &mut attr_idx,
                1,
                &mut fail_idx,
                stream,
            )
        }
        .result()
        .map_err(op("cuMemcpyBatchAsync"))
    }

    /// Writes the segments into pinned tables (taken from the pool and
    /// recorded in `tables` until the copy completes) and launches one CTA
    /// per segment, [`TABLE_SEGMENTS`] segments per launch.
    fn launch(&self, stream: sys::CUstream, segments: &[Segment], tables: &mut Vec<usize>) -> Result<(), CudaError> {
        for part in segments.chunks(TABLE_SEGMENTS) {
            let table = self.tables.take()?;
            tables.push(table);
            // SAFETY: `table` holds TABLE_SEGMENTS segments and `part` at
            // most that many; no kernel reads this table (it was free).
            unsafe { std::ptr::copy_nonoverlapping(part.as_ptr(), table as *mut Segment, part.len()) };
            let mut table_arg = table as u64;
            let mut count_arg = part.len() as u32;
            let mut params = [(&mut table_arg as *mut u64).cast::<c_void>(), (&mut count_arg as *mut u32).cast()];
            // SAFETY: the function takes (const Segment*, unsigned int),
            // matching `params`; the table is device-mapped pinned memory
            // (unified addressing) kept until the copy completed; the caller
            // guaranteed every segment's memory.
            unsafe {
                result::launch_kernel(self.function, (count_arg, 1, 1), (THREADS_PER_CTA, 1, 1), 0, stream, &mut params)
            }
            .map_err(op("cuLaunchKernel"))?;
        }
        Ok(())
    }
}

impl Drop for CopyEngine {
    fn drop(&mut self) {
        // Closing the channels lets the completion threads finish what is
        // queued and exit; they hold their own device reference.
        for lane in self.store.iter_mut().chain(self.retrieve.iter_mut()) {
            lane.completions.take();
        }
        if self.device.bind().is_err() {
            tracing::error!("could not bind the context to stop a copy engine");
            return;
        }
        // SAFETY: our streams and module. The streams are drained first, so
        // no kernel of the module is running when it is unloaded.
        unsafe {
            for lane in self.store.iter().chain(self.retrieve.iter()) {
                let _ = result::stream::synchronize(lane.stream);
                let _ = result::stream::destroy(lane.stream);
                if lane.staging != 0 {
                    let _ = result::free_sync(lane.staging);
                }
            }
            let _ = result::module::unload(self.module);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Dtype;

    fn seg(src: u64, dst: u64, len: u64) -> Segment {
        Segment { src, dst, len }
    }

    #[test]
    fn staging_fills_hold_whole_segments_and_merge_contiguous_host_runs() {
        // Two objects at host 10_000 and 50_000, three 100-byte blocks each,
        // device blocks scattered; staging of 400 bytes at 7_000.
        let segs = [
            seg(900, 10_000, 100),
            seg(300, 10_100, 100),
            seg(700, 10_200, 100),
            seg(100, 50_000, 100),
            seg(500, 50_100, 100),
            seg(200, 50_200, 100),
        ];
        let fills = plan_staging(CopyDirection::Gather, &segs, 7_000, 400).unwrap();
        assert_eq!(fills.len(), 2);
        assert_eq!(
            fills[0].kernel,
            [seg(900, 7_000, 100), seg(300, 7_100, 100), seg(700, 7_200, 100), seg(100, 7_300, 100)]
        );
        assert_eq!(
            fills[0].runs,
            [HostRun { host: 10_000, staged: 7_000, len: 300 }, HostRun { host: 50_000, staged: 7_300, len: 100 }]
        );
        assert_eq!(fills[1].kernel, [seg(500, 7_000, 100), seg(200, 7_100, 100)]);
        assert_eq!(fills[1].runs, [HostRun { host: 50_100, staged: 7_000, len: 200 }]);
    }

    #[test]
    fn scatter_fills_mirror_gather_fills() {
        let segs = [seg(10_000, 900, 100), seg(10_100, 300, 100), seg(20_000, 700, 100)];
        let fills = plan_staging(CopyDirection::Scatter, &segs, 7_000, 1_000).unwrap();
        assert_eq!(fills.len(), 1);
        assert_eq!(fills[0].kernel, [seg(7_000, 900, 100), seg(7_100, 300, 100), seg(7_200, 700, 100)]);
        assert_eq!(
            fills[0].runs,
            [HostRun { host: 10_000, staged: 7_000, len: 200 }, HostRun { host: 20_000, staged: 7_200, len: 100 }]
        );
    }

    #[test]
    fn a_block_larger_than_the_staging_buffer_is_refused() {
        assert!(plan_staging(CopyDirection::Gather, &[seg(0, 0, 401)], 7_000, 400).is_err());
        assert!(plan_staging(CopyDirection::Gather, &[], 7_000, 400).unwrap().is_empty());
    }

    #[test]
    fn segments_of_a_per_head_layout_are_one_per_head_run() {
        use crate::layout::VllmLayout;
        // LHBNC, 2 layers, 4 blocks, 2 heads of 4 tokens x C=8 (f16): 64-byte head runs.
        let layout = KvLayout::vllm(VllmLayout::Lhbnc, 2, 4, 4, 2, 4, Dtype::F16);
        let blocks = [layout.block(3).unwrap(), layout.block(0).unwrap()];
        let mut segs = Vec::new();
        chunk_segments(&layout, &[1000, 9000], &blocks, 50_000, CopyDirection::Gather, &mut segs);
        assert_eq!(segs.len(), 2 * 2 * 2);
        assert_eq!(segs[0], Segment { src: 1000 + 3 * 64, dst: 50_000, len: 64 });
        assert_eq!(segs[1], Segment { src: 1000, dst: 50_064, len: 64 });
        assert_eq!(segs[2], Segment { src: 1000 + 4 * 64 + 3 * 64, dst: 50_128, len: 64 }); // head 1
        assert_eq!(segs[5], Segment { src: 9000, dst: 50_320, len: 64 }); // layer 1, head 0
    }

    #[test]
    fn segments_walk_the_object_in_layer_plane_block_order() {
        let layout = KvLayout::mha(2, 8, 4, 1, 8, Dtype::F16); // 64-byte block planes
        let blocks = [layout.block(5).unwrap(), layout.block(1).unwrap()];
        let mut segs = Vec::new();
        chunk_segments(&layout, &[1000, 9000], &blocks, 50_000, CopyDirection::Gather, &mut segs);
        assert_eq!(segs.len(), 2 * 2 * 2);
        assert_eq!(segs[0], Segment { src: 1000 + 5 * 64, dst: 50_000, len: 64 });
        assert_eq!(segs[1], Segment { src: 1000 + 64, dst: 50_064, len: 64 });
        assert_eq!(segs[2], Segment { src: 1000 + (8 + 5) * 64, dst: 50_128, len: 64 }); // V plane
        assert_eq!(segs[4], Segment { src: 9000 + 5 * 64, dst: 50_256, len: 64 }); // layer 1
        let mut back = Vec::new();
        chunk_segments(&layout, &[1000, 9000], &blocks, 50_000, CopyDirection::Scatter, &mut back);
        assert!(segs.iter().zip(&back).all(|(g, s)| g.src == s.dst && g.dst == s.src));
    }
}

//! The baselines GPU numbers are printed beside, measured with the same
//! driver in the same run: contiguous pinned DMA each way, and the copy
//! engine alone (no coordinator, no client). They belong to the harness, not
//! to the copy engine they measure.

use std::ffi::c_void;
use std::sync::mpsc;
use std::sync::Arc;

use cudarc::driver::{result, sys, DriverError};
use kvcoord_memory::cuda::{CopyDirection, CopyEngine, CopyMethod, CudaDevice, CudaError, Segment};

fn op(op: &'static str) -> impl Fn(DriverError) -> CudaError {
    move |source| CudaError::Driver { op, source }
}

/// Contiguous pinned DMA between one device buffer and one pinned host
/// buffer, timed with events: the baseline the copy engine is measured
/// against. Returns (D2H GB/s, H2D GB/s), best of `reps`.
pub fn pinned_dma_baseline(device: &Arc<CudaDevice>, bytes: usize, reps: u32) -> Result<(f64, f64), CudaError> {
    device.bind()?;
    // SAFETY: context bound; every resource below is released before return,
    // after the stream has drained.
    unsafe {
        let stream = result::stream::create(result::stream::StreamKind::NonBlocking).map_err(op("cuStreamCreate"))?;
        let dev = result::malloc_sync(bytes).map_err(op("cuMemAlloc"))?;
        let host = result::malloc_host(bytes, sys::CU_MEMHOSTALLOC_PORTABLE).map_err(op("cuMemHostAlloc"))?;
        let host_slice = std::slice::from_raw_parts_mut(host.cast::<u8>(), bytes);
        host_slice.fill(1);
        let start = result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).map_err(op("cuEventCreate"))?;
        let end = result::event::create(sys::CUevent_flags::CU_EVENT_DEFAULT).map_err(op("cuEventCreate"))?;
        let mut best = (0f64, 0f64);
        let mut run = |d2h: bool| -> Result<f64, CudaError> {
            result::event::record(start, stream).map_err(op("cuEventRecord"))?;
            if d2h {
                result::memcpy_dtoh_async(host_slice, dev, stream).map_err(op("cuMemcpyDtoHAsync"))?;
            } else {
                result::memcpy_htod_async(dev, host_slice, stream).map_err(op("cuMemcpyHtoDAsync"))?;
            }
            result::event::record(end, stream).map_err(op("cuEventRecord"))?;
            result::event::synchronize(end).map_err(op("cuEventSynchronize"))?;
            let ms = result::event::elapsed(start, end).map_err(op("cuEventElapsedTime"))?;
            Ok(bytes as f64 / (ms as f64 / 1e3) / 1e9)
        };
        let mut outcome = Ok(());
        for _ in 0..reps.max(1) {
            match (run(true), run(false)) {
                (Ok(d), Ok(h)) => best = (best.0.max(d), best.1.max(h)),
                (Err(e), _) | (_, Err(e)) => {
                    outcome = Err(e);
                    break;
                }
            }
        }
        let _ = result::stream::synchronize(stream);
        let _ = result::event::destroy(start);
        let _ = result::event::destroy(end);
        let _ = result::free_host(host);
        let _ = result::free_sync(dev);
        let _ = result::stream::destroy(stream);
        outcome.map(|_| best)
    }
}

/// The copy engine alone, without the coordinator: `bytes` of `block_bytes`
/// blocks at random places in one device buffer gathered into contiguous
/// pinned memory (and scattered back), `chunk_blocks` blocks per kernel, every
/// kernel submitted at once. Wall-clock from first submit to last completion;
/// returns (gather GB/s, scatter GB/s), best of `reps`. It tells the kernel's
/// own efficiency apart from the coordinator's overhead.
pub fn engine_baseline(
    device: &Arc<CudaDevice>,
    method: CopyMethod,
    streams: usize,
    bytes: usize,
    block_bytes: usize,
    chunk_blocks: usize,
    reps: u32,
) -> Result<(f64, f64), CudaError> {
    let engine = CopyEngine::new(device.clone(), streams, method)?;
    let blocks = bytes / block_bytes;
    let bytes = blocks * block_bytes;
    // SAFETY: context bound by `CopyEngine::new` on this thread; both buffers
    // are freed below after every copy completed.
    let (dev, host) = unsafe {
        let dev = result::malloc_sync(bytes).map_err(op("cuMemAlloc"))?;
        let host = result::malloc_host(bytes, sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_DEVICEMAP)
            .map_err(op("cuMemHostAlloc"))?;
        (dev, host as u64)
    };
    // A fixed permutation of device blocks (paged, scattered).
    let mut order: Vec<u64> = (0..blocks as u64).collect();
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for i in (1..order.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        order.swap(i, (x % (i as u64 + 1)) as usize);
    }
    let run = |direction: CopyDirection| -> Result<f64, CudaError> {
        let (tx, rx) = mpsc::channel();
        let t = std::time::Instant::now();
        let mut kernels = 0;
        for (c, chunk) in order.chunks(chunk_blocks).enumerate() {
            let segs: Vec<Segment> = chunk
                .iter()
                .enumerate()
                .map(|(i, &b)| {
                    let d = dev + b * block_bytes as u64;
                    let h = host + ((c * chunk_blocks + i) * block_bytes) as u64;
                    match direction {
                        CopyDirection::Gather => Segment { src: d, dst: h, len: block_bytes as u64 },
                        CopyDirection::Scatter => Segment { src: h, dst: d, len: block_bytes as u64 },
                    }
                })
                .collect();
            let tx = tx.clone();
            // SAFETY: every segment lies inside `dev` or `host` (block
            // indices < blocks), each block once, and both buffers outlive
            // the completion (we wait for every `done` below).
            unsafe { engine.submit(direction, &segs, None, None, move |r| drop(tx.send(r))) }?;
            kernels += 1;
        }
        for _ in 0..kernels {
            rx.recv().map_err(|_| CudaError::Invalid("completion lost".into()))??;
        }
        Ok(bytes as f64 / t.elapsed().as_secs_f64() / 1e9)
    };
    let mut best = (0f64, 0f64);
    let mut outcome = Ok(());
    for _ in 0..reps.max(1) {
        match (run(CopyDirection::Gather), run(CopyDirection::Scatter)) {
            (Ok(g), Ok(s)) => best = (best.0.max(g), best.1.max(s)),
            (Err(e), _) | (_, Err(e)) => {
                outcome = Err(e);
                break;
            }
        }
    }
    drop(engine);
    // SAFETY: the engine (and its streams) drained and is gone.
    unsafe {
        let _ = result::free_host(host as *mut c_void);
        let _ = result::free_sync(dev);
    }
    outcome.map(|_| best)
}

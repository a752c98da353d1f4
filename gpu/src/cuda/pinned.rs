//! Pinned L1 slabs: page-locked host memory from `cuMemHostAlloc` with
//! `CU_MEMHOSTALLOC_PORTABLE | CU_MEMHOSTALLOC_DEVICEMAP` — usable by every
//! context and addressable by the copy kernel through unified addressing.
//! Never write-combined: the disk tier and the host backend read it from the
//! CPU.
//!
//! This module owns only allocation and release of those slabs; the arena
//! decides when to take one. It must never hand out memory it did not pin.

use std::sync::Arc;

use cudarc::driver::sys;

use super::device::CudaDevice;
use super::driver::op;
use crate::arena::{Slab, SlabSource};

/// Takes pinned slabs in the context of `device`.
pub struct PinnedSlabs {
    device: Arc<CudaDevice>,
}

impl PinnedSlabs {
    pub fn new(device: Arc<CudaDevice>) -> Self {
        PinnedSlabs { device }
    }
}

struct PinnedSlab {
    ptr: *mut u8,
    len: usize,
    device: Arc<CudaDevice>,
}

// SAFETY: the slab is plain page-locked host memory owned by this value;
// which thread frees it does not matter (`Drop` binds the context first).
unsafe impl Send for PinnedSlab {}
// SAFETY: `PinnedSlab` only hands out its address; access to the bytes is
// coordinated by the arena and the L1 store, as for host slabs.
unsafe impl Sync for PinnedSlab {}

impl Slab for PinnedSlab {
    fn ptr(&self) -> *mut u8 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
}

impl Drop for PinnedSlab {
    fn drop(&mut self) {
        if self.device.bind().is_err() {
            tracing::warn!("could not bind the context to free a pinned slab; leaking it");
            return;
        }
        // SAFETY: `ptr` came from `cuMemHostAlloc` in `allocate` and is freed
        // exactly once, here. The arena drops slabs only when the L1 store,
        // and with it every object handle and in-flight copy, is gone.
        if let Err(e) = unsafe { cudarc::driver::result::free_host(self.ptr.cast()) } {
            tracing::warn!(error = %e, "cuMemFreeHost failed");
        }
    }
}

impl SlabSource for PinnedSlabs {
    fn allocate(&self, bytes: usize) -> std::io::Result<Box<dyn Slab>> {
        let to_io = |e: super::driver::CudaError| std::io::Error::other(e.to_string());
        self.device.bind().map_err(to_io)?;
        let flags = sys::CU_MEMHOSTALLOC_PORTABLE | sys::CU_MEMHOSTALLOC_DEVICEMAP;
        // SAFETY: a context is current on this thread (bound above); the
        // returned pointer is owned by the `PinnedSlab` that frees it.
        let ptr = unsafe { cudarc::driver::result::malloc_host(bytes, flags) }
            .map_err(op("cuMemHostAlloc"))
            .map_err(to_io)?;
        tracing::debug!(bytes, "pinned L1 slab allocated");
        Ok(Box::new(PinnedSlab { ptr: ptr.cast(), len: bytes, device: self.device.clone() }))
    }

    fn name(&self) -> &'static str {
        "cuda-pinned"
    }
}

//! [`BlockAccess`] for a KV cache in device memory: registered by CUDA IPC,
//! written through a pinned staging buffer on the cache's stream, with a
//! "KV ready" event recorded after the writes so the coordinator's store
//! waits on the GPU, not the worker on its copies. Used by the GPU check.

use std::os::fd::BorrowedFd;
use std::sync::Arc;

use kvcoord_memory::arena::{Slab, SlabSource};
use kvcoord_memory::cuda::{CudaDevice, DeviceKvCache, PinnedSlabs, ReadyEvent};
use kvcoord_memory::{BlockId, KvLayout, MemoryHandle};

use crate::block_access::{BlockAccess, BlockError, PlaneRef};
use crate::pattern::{fill, matches};

/// A KV cache on a GPU, with the pinned buffer its patterns are written from.
pub struct GpuBlocks {
    pub cache: DeviceKvCache,
    ready: ReadyEvent,
    staging: Box<dyn Slab>,
}

impl GpuBlocks {
    /// Allocates the cache on `device` and a pinned staging buffer of
    /// `staging_bytes` (enough for the most planes written at once).
    pub fn allocate(device: Arc<CudaDevice>, layout: KvLayout, staging_bytes: usize) -> Result<Self, BlockError> {
        let cache = DeviceKvCache::allocate(device.clone(), layout).map_err(BlockError::from)?;
        let staging = PinnedSlabs::new(device.clone())
            .allocate(staging_bytes.next_multiple_of(4096))
            .map_err(BlockError::from)?;
        let ready = ReadyEvent::new(device).map_err(BlockError::from)?;
        Ok(GpuBlocks { cache, ready, staging })
    }
}

impl BlockAccess for GpuBlocks {
    fn layout(&self) -> &KvLayout {
        self.cache.layout()
    }

    fn memory_handle(&self) -> MemoryHandle {
        self.cache.memory_handle()
    }

    fn memory_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }

    fn write_patterns(&mut self, planes: &[PlaneRef]) -> Result<(), BlockError> {
        let plane_bytes = self.cache.layout().run_bytes() as usize;
        if planes.len() * plane_bytes > self.staging.len() {
            return Err(BlockError(format!("{} planes exceed the staging buffer", planes.len())));
        }
        // The previous writes must have left the staging buffer.
        self.cache.synchronize().map_err(BlockError::from)?;
        // SAFETY: the staging slab is pinned memory of `len()` bytes owned by
        // `self`, and no copy reads it any more (the stream was drained).
        let staging = unsafe { std::slice::from_raw_parts_mut(self.staging.ptr(), self.staging.len()) };
        for (p, piece) in planes.iter().zip(staging.chunks_mut(plane_bytes)) {
            fill(piece, p.seed);
            self.cache.write_block_async(p.layer, p.plane, p.block, piece).map_err(BlockError::from)?;
        }
        self.cache.record(&self.ready).map_err(BlockError::from)
    }

    fn check_patterns(&mut self, planes: &[PlaneRef]) -> Result<Vec<bool>, BlockError> {
        let mut buf = vec![0u8; self.cache.layout().run_bytes() as usize];
        planes
            .iter()
            .map(|p| {
                self.cache.read_block(p.layer, p.plane, p.block, &mut buf).map_err(BlockError::from)?;
                Ok(matches(&buf, p.seed))
            })
            .collect()
    }

    fn scribble(&mut self, blocks: &[BlockId]) -> Result<(), BlockError> {
        let layout = *self.cache.layout();
        let junk = vec![0xA5u8; layout.run_bytes() as usize];
        for &b in blocks {
            for layer in 0..layout.num_layers {
                for plane in 0..layout.runs() {
                    self.cache.write_block_async(layer, plane, b, &junk).map_err(BlockError::from)?;
                }
            }
        }
        self.cache.synchronize().map_err(BlockError::from)
    }

    fn ready_event(&self) -> Option<Vec<u8>> {
        Some(self.ready.handle())
    }
}

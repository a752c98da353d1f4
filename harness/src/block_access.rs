//! How the harness's TP worker reaches its own KV cache, whatever memory it
//! is in: [`BlockAccess`], implemented by [`HostBlocks`] (a sealed memfd)
//! here and by `GpuBlocks` (device memory) in `gpu_blocks.rs`. The worker's
//! logic is written once against this trait.

use std::os::fd::BorrowedFd;

use kvcoord_memory::{BlockId, HostKvCache, KvLayout, MemoryHandle};

use crate::pattern::{fill, matches};

/// One block plane of one chunk: where it is and the seed of its pattern.
#[derive(Clone, Copy, Debug)]
pub struct PlaneRef {
    pub layer: u32,
    pub plane: u32,
    pub block: BlockId,
    pub seed: u64,
}

/// Why the worker could not touch its own blocks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("KV cache access: {0}")]
pub struct BlockError(pub String);

impl BlockError {
    pub fn from(e: impl std::fmt::Display) -> Self {
        BlockError(e.to_string())
    }
}

/// A TP worker's own KV cache.
pub trait BlockAccess {
    fn layout(&self) -> &KvLayout;
    /// What the register request says about the memory.
    fn memory_handle(&self) -> MemoryHandle;
    /// The descriptor that travels with the register request (host memory).
    fn memory_fd(&self) -> Option<BorrowedFd<'_>>;
    /// Writes each plane's pattern. May return before the bytes land if
    /// [`BlockAccess::ready_event`] covers them.
    fn write_patterns(&mut self, planes: &[PlaneRef]) -> Result<(), BlockError>;
    /// Reads each plane back; for each, whether it holds its pattern.
    fn check_patterns(&mut self, planes: &[PlaneRef]) -> Result<Vec<bool>, BlockError>;
    /// Overwrites `blocks` (every layer and plane) with a byte no pattern is made of only.
    fn scribble(&mut self, blocks: &[BlockId]) -> Result<(), BlockError>;
    /// The IPC handle of an event recorded after the last write, which the
    /// coordinator's store waits on (GPU memory only).
    fn ready_event(&self) -> Option<Vec<u8>>;
}

/// A KV cache in a sealed memfd (the host backend).
pub struct HostBlocks {
    pub cache: HostKvCache,
}

impl HostBlocks {
    pub fn create(name: &str, layout: KvLayout) -> Result<Self, BlockError> {
        Ok(HostBlocks { cache: HostKvCache::create(name, layout).map_err(BlockError::from)? })
    }
}

impl BlockAccess for HostBlocks {
    fn layout(&self) -> &KvLayout {
        self.cache.layout()
    }

    fn memory_handle(&self) -> MemoryHandle {
        MemoryHandle::HostFd { size: self.cache.layout().total_bytes() }
    }

    fn memory_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.cache.fd())
    }

    fn write_patterns(&mut self, planes: &[PlaneRef]) -> Result<(), BlockError> {
        for p in planes {
            fill(self.cache.block_mut(p.layer, p.plane, p.block.get()).map_err(BlockError::from)?, p.seed);
        }
        Ok(())
    }

    fn check_patterns(&mut self, planes: &[PlaneRef]) -> Result<Vec<bool>, BlockError> {
        planes
            .iter()
            .map(|p| {
                Ok(matches(self.cache.block_mut(p.layer, p.plane, p.block.get()).map_err(BlockError::from)?, p.seed))
            })
            .collect()
    }

    fn scribble(&mut self, blocks: &[BlockId]) -> Result<(), BlockError> {
        let layout = *self.cache.layout();
        for b in blocks {
            for layer in 0..layout.num_layers {
                for plane in 0..layout.runs() {
                    self.cache.block_mut(layer, plane, b.get()).map_err(BlockError::from)?.fill(0xA5);
                }
            }
        }
        Ok(())
    }

    fn ready_event(&self) -> Option<Vec<u8>> {
        None
    }
}

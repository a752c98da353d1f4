//! A TP worker's workload on the CUDA backend: its KV cache in device memory,
//! registered by IPC, written through a pinned staging buffer on the cache's
//! stream, and stored with a "KV ready" event so the coordinator waits on the
//! GPU, not the worker on its copy. Used by `kvcoord gpu-worker` (the GPU
//! check) and the CUDA example.
//!
//! Every block's bytes are the same pure function of (chunk hash, rank,
//! layer, plane, block index within the chunk) as in [`crate::workload`], so
//! retrieved chunks are verified byte for byte. It must never take a path
//! that production requests do not: it uses [`WorkerHandle`].

use std::sync::Arc;

use kvcoord_memory::arena::{Slab, SlabSource};
use kvcoord_memory::cuda::{CudaDevice, CudaError, DeviceKvCache, PinnedSlabs, ReadyEvent};
use kvcoord_memory::{BlockId, KvLayout};
use kvcoord_transport::{ChunkHash, InstanceKey, RegisterKvCache, RequestError, StoreOutcome};
use rand::SeedableRng;

use crate::client::{RetrieveResult, WorkerHandle};
use crate::workload::{fill, matches, pattern_seed, pick_blocks, Verified};

/// One TP rank with its KV cache on a GPU.
pub struct GpuTpWorker {
    pub client: WorkerHandle,
    pub cache: DeviceKvCache,
    pub key: InstanceKey,
    pub chunk_tokens: u32,
    ready: ReadyEvent,
    staging: Box<dyn Slab>,
    rng: rand::rngs::StdRng,
}

fn encode(e: impl std::fmt::Display) -> RequestError {
    RequestError::Encode(e.to_string())
}

impl GpuTpWorker {
    /// Allocates the KV cache on `device`, a pinned staging buffer for
    /// `max_chunks` chunks, and registers the cache by IPC.
    pub async fn register(
        client: WorkerHandle,
        device: Arc<CudaDevice>,
        key: InstanceKey,
        (model, world_size): (&str, u32),
        layout: KvLayout,
        chunk_tokens: u32,
        max_chunks: usize,
    ) -> Result<Self, RequestError> {
        let cache = DeviceKvCache::allocate(device.clone(), layout).map_err(encode)?;
        let bpc = layout.blocks_per_chunk(chunk_tokens).map_err(encode)?;
        let staging_bytes = (layout.chunk_object_bytes(bpc) as usize * max_chunks).next_multiple_of(4096);
        let staging = PinnedSlabs::new(device.clone()).allocate(staging_bytes).map_err(encode)?;
        let ready = ReadyEvent::new(device).map_err(encode)?;
        let request = RegisterKvCache {
            instance: key,
            model: model.to_string(),
            world_size,
            layout,
            memory: cache.memory_handle(),
        };
        client.register(request, None).await?;
        let rng = rand::rngs::StdRng::seed_from_u64(key.engine ^ key.rank as u64);
        Ok(GpuTpWorker { client, cache, key, chunk_tokens, ready, staging, rng })
    }

    fn blocks_per_chunk(&self) -> usize {
        (self.chunk_tokens / self.cache.layout().block_tokens) as usize
    }

    fn block(&self, raw: u32) -> BlockId {
        self.cache.layout().block(raw).expect("picked blocks are in range")
    }

    /// Distinct random block ids for `chunks` chunks, avoiding `avoid`.
    pub fn pick_blocks(&mut self, chunks: usize, avoid: &[u32]) -> Vec<u32> {
        let (n, per_chunk) = (self.cache.layout().num_blocks, self.blocks_per_chunk());
        pick_blocks(&mut self.rng, n, chunks * per_chunk, avoid)
    }

    /// Queues the chunks' contents into `blocks` on the cache's stream and
    /// records the ready event after them; does not wait for the copies.
    pub fn write_chunks(&mut self, hashes: &[ChunkHash], blocks: &[u32]) -> Result<(), CudaError> {
        let layout = *self.cache.layout();
        let bpc = self.blocks_per_chunk();
        let plane_bytes = layout.block_bytes() as usize;
        let need = hashes.len() * bpc * layout.num_layers as usize * layout.planes() as usize * plane_bytes;
        if need > self.staging.len() {
            return Err(CudaError::Invalid(format!("{} chunks exceed the staging buffer", hashes.len())));
        }
        // The previous writes must have left the staging buffer.
        self.cache.synchronize()?;
        // SAFETY: the staging slab is pinned memory of `len()` bytes owned by
        // `self`, and no copy reads it any more (the stream was drained).
        let staging = unsafe { std::slice::from_raw_parts_mut(self.staging.ptr(), self.staging.len()) };
        let mut pieces = staging.chunks_mut(plane_bytes);
        for (c, hash) in hashes.iter().enumerate() {
            for layer in 0..layout.num_layers {
                for plane in 0..layout.planes() {
                    for i in 0..bpc {
                        let piece = pieces.next().expect("sized above");
                        fill(piece, pattern_seed(hash, self.key.rank, layer, plane, i as u32));
                        self.cache.write_block_async(layer, plane, self.block(blocks[c * bpc + i]), piece)?;
                    }
                }
            }
        }
        self.cache.record(&self.ready)
    }

    /// Stores chunks written by [`Self::write_chunks`]: the coordinator waits
    /// on the ready event before reading the blocks.
    pub async fn store(&self, hashes: &[ChunkHash], blocks: &[u32]) -> Result<Vec<StoreOutcome>, RequestError> {
        self.client.store_after(self.key, hashes.to_vec(), blocks.to_vec(), Some(self.ready.handle())).await
    }

    /// Writes a prompt's chunks into fresh blocks and stores them.
    pub async fn store_prefix(&mut self, hashes: &[ChunkHash]) -> Result<(Vec<u32>, Vec<StoreOutcome>), RequestError> {
        let blocks = self.pick_blocks(hashes.len(), &[]);
        self.write_chunks(hashes, &blocks).map_err(encode)?;
        let outcomes = self.store(hashes, &blocks).await?;
        Ok((blocks, outcomes))
    }

    /// Fills `blocks` with a byte that no pattern is made of only.
    pub fn scribble(&mut self, blocks: &[u32]) -> Result<(), CudaError> {
        let layout = *self.cache.layout();
        let junk = vec![0xA5u8; layout.block_bytes() as usize];
        for &b in blocks {
            for layer in 0..layout.num_layers {
                for plane in 0..layout.planes() {
                    self.cache.write_block_async(layer, plane, self.block(b), &junk)?;
                }
            }
        }
        self.cache.synchronize()
    }

    /// Reads back the first `chunks` chunks from `blocks` and checks them.
    pub fn verify_chunks(&self, hashes: &[ChunkHash], blocks: &[u32], chunks: usize) -> Result<Verified, CudaError> {
        let layout = *self.cache.layout();
        let bpc = self.blocks_per_chunk();
        let mut buf = vec![0u8; layout.block_bytes() as usize];
        let mut v = Verified { chunks_retrieved: chunks, ..Default::default() };
        for (c, hash) in hashes.iter().enumerate().take(chunks) {
            let mut ok = true;
            for layer in 0..layout.num_layers {
                for plane in 0..layout.planes() {
                    for i in 0..bpc {
                        self.cache.read_block(layer, plane, self.block(blocks[c * bpc + i]), &mut buf)?;
                        ok &= matches(&buf, pattern_seed(hash, self.key.rank, layer, plane, i as u32));
                        v.bytes_verified += buf.len() as u64;
                    }
                }
            }
            if !ok {
                v.corrupt_chunks += 1;
            }
        }
        Ok(v)
    }

    /// Retrieves a prompt's chunks into blocks other than `avoid` (scribbled
    /// first) and verifies every retrieved byte.
    pub async fn retrieve_and_verify(
        &mut self,
        hashes: &[ChunkHash],
        avoid: &[u32],
    ) -> Result<(RetrieveResult, Verified), CudaError> {
        let blocks = self.pick_blocks(hashes.len(), avoid);
        self.scribble(&blocks)?;
        let r = self.client.retrieve(self.key, hashes.to_vec(), blocks.clone(), None).await;
        let n = r.prefix_retrieved();
        let v = self.verify_chunks(hashes, &blocks, n)?;
        Ok((r, v))
    }
}

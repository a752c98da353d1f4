//! The harness's TP worker: one rank's prefix-caching workload over any
//! [`BlockAccess`] (host memfd or GPU memory), through the same
//! [`kvcoord_client::Client`] that engines use. Shared by the demo, bench,
//! gpu-check, load generators, examples and integration tests.
//!
//! It must never take a path that production requests do not.

use kvcoord_client::{Client, RetrieveResult};
use kvcoord_memory::{BlockId, KvLayout};
use kvcoord_transport::{ChunkHash, InstanceKey, LeaseId, RegisterKvCache, RequestError, StoreOutcome};
use rand::SeedableRng;

use crate::block_access::{BlockAccess, BlockError, HostBlocks, PlaneRef};
use crate::pattern::{pattern_seed, pick_blocks};

/// One TP rank: its KV cache and its client.
pub struct TpWorker<B: BlockAccess = HostBlocks> {
    pub client: Client,
    pub blocks: B,
    pub key: InstanceKey,
    pub model: String,
    pub world_size: u32,
    pub chunk_tokens: u32,
    rng: rand::rngs::StdRng,
}

/// How a retrieve went, checked.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    pub chunks_retrieved: usize,
    pub bytes_verified: u64,
    pub corrupt_chunks: usize,
}

impl TpWorker<HostBlocks> {
    /// Allocates a host KV cache (sealed memfd) and registers it.
    pub async fn register(
        client: Client,
        key: InstanceKey,
        model: &str,
        world_size: u32,
        layout: KvLayout,
        chunk_tokens: u32,
    ) -> Result<Self, RequestError> {
        let blocks = HostBlocks::create(&format!("kvcoord-rank{}", key.rank), layout)
            .map_err(|e| RequestError::Encode(e.to_string()))?;
        Self::register_blocks(client, blocks, key, (model, world_size), chunk_tokens).await
    }
}

impl<B: BlockAccess> TpWorker<B> {
    /// Registers `blocks` as this rank's KV cache.
    pub async fn register_blocks(
        client: Client,
        blocks: B,
        key: InstanceKey,
        (model, world_size): (&str, u32),
        chunk_tokens: u32,
    ) -> Result<Self, RequestError> {
        let request = RegisterKvCache {
            instance: key,
            model: model.to_string(),
            world_size,
            layout: *blocks.layout(),
            memory: blocks.memory_handle(),
            secret: None,
        };
        client.register(request, blocks.memory_fd()).await?;
        let rng = rand::rngs::StdRng::seed_from_u64(key.engine ^ key.rank as u64);
        Ok(TpWorker { client, blocks, key, model: model.to_string(), world_size, chunk_tokens, rng })
    }

    pub fn layout(&self) -> &KvLayout {
        self.blocks.layout()
    }

    fn blocks_per_chunk(&self) -> usize {
        (self.chunk_tokens / self.layout().block_tokens) as usize
    }

    /// Distinct random block ids for `chunks` chunks, avoiding `avoid`.
    pub fn pick_blocks(&mut self, chunks: usize, avoid: &[u32]) -> Vec<u32> {
        let (n, per_chunk) = (self.layout().num_blocks, self.blocks_per_chunk());
        pick_blocks(&mut self.rng, n, chunks * per_chunk, avoid)
    }

    fn block(&self, raw: u32) -> Result<BlockId, BlockError> {
        self.layout().block(raw).map_err(BlockError::from)
    }

    /// Every block plane of the chunks `hashes` placed in `blocks`, chunk by chunk.
    fn planes(&self, hashes: &[ChunkHash], blocks: &[u32]) -> Result<Vec<Vec<PlaneRef>>, BlockError> {
        let layout = *self.layout();
        let bpc = self.blocks_per_chunk();
        hashes
            .iter()
            .enumerate()
            .map(|(c, hash)| {
                let mut planes = Vec::with_capacity(layout.num_layers as usize * layout.runs() as usize * bpc);
                for layer in 0..layout.num_layers {
                    for plane in 0..layout.runs() {
                        for i in 0..bpc {
                            let block = self.block(blocks[c * bpc + i])?;
                            let seed = pattern_seed(hash, self.key.rank, layer, plane, i as u32);
                            planes.push(PlaneRef { layer, plane, block, seed });
                        }
                    }
                }
                Ok(planes)
            })
            .collect()
    }

    /// Writes the chunks' deterministic contents into `blocks`.
    pub fn write_chunks(&mut self, hashes: &[ChunkHash], blocks: &[u32]) -> Result<(), BlockError> {
        let planes: Vec<PlaneRef> = self.planes(hashes, blocks)?.into_iter().flatten().collect();
        self.blocks.write_patterns(&planes)
    }

    /// Checks the first `chunks` chunks in `blocks`; counts corrupt ones.
    pub fn verify_chunks(
        &mut self,
        hashes: &[ChunkHash],
        blocks: &[u32],
        chunks: usize,
    ) -> Result<Verified, BlockError> {
        let plane_bytes = self.layout().run_bytes();
        let mut v = Verified { chunks_retrieved: chunks, ..Default::default() };
        for chunk in self.planes(&hashes[..chunks], blocks)? {
            let ok = self.blocks.check_patterns(&chunk)?;
            v.bytes_verified += plane_bytes * ok.len() as u64;
            if !ok.iter().all(|&b| b) {
                v.corrupt_chunks += 1;
            }
        }
        Ok(v)
    }

    /// Overwrites `blocks` so a retrieve that writes nothing is caught.
    pub fn scribble(&mut self, blocks: &[u32]) -> Result<(), BlockError> {
        let ids = blocks.iter().map(|&b| self.block(b)).collect::<Result<Vec<_>, _>>()?;
        self.blocks.scribble(&ids)
    }

    /// Stores chunks already written into `blocks` (after the ready event
    /// on GPU memory).
    pub async fn store(&self, hashes: &[ChunkHash], blocks: &[u32]) -> Result<Vec<StoreOutcome>, RequestError> {
        self.client.store_after(self.key, hashes.to_vec(), blocks.to_vec(), self.blocks.ready_event()).await
    }

    /// Writes a prompt's chunks into fresh blocks and stores them.
    pub async fn store_prefix(&mut self, hashes: &[ChunkHash]) -> Result<(Vec<u32>, Vec<StoreOutcome>), RequestError> {
        let blocks = self.pick_blocks(hashes.len(), &[]);
        self.write_chunks(hashes, &blocks).map_err(|e| RequestError::Encode(e.to_string()))?;
        let outcomes = self.store(hashes, &blocks).await?;
        Ok((blocks, outcomes))
    }

    /// Retrieves a prompt's chunks into blocks other than `avoid` (scribbled
    /// first) and verifies every retrieved byte.
    pub async fn retrieve_and_verify(
        &mut self,
        hashes: &[ChunkHash],
        avoid: &[u32],
        lease: Option<LeaseId>,
    ) -> Result<(RetrieveResult, Verified), BlockError> {
        let blocks = self.pick_blocks(hashes.len(), avoid);
        self.scribble(&blocks)?;
        let r = self.client.retrieve(self.key, hashes.to_vec(), blocks.clone(), lease).await;
        let n = r.prefix_retrieved();
        let v = self.verify_chunks(hashes, &blocks, n)?;
        Ok((r, v))
    }
}

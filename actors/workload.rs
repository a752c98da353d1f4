//! A TP worker's prefix-caching workload, shared by the examples, `kvcoord
//! demo` and the integration tests so they all exercise the real client.
//!
//! Every block's bytes are a pure function of (chunk hash, rank, layer,
//! plane, block index within the chunk), so a chunk retrieved into any other
//! blocks can be verified byte for byte without keeping a copy. It must never
//! take a path that production requests do not: it uses [`WorkerHandle`].

use std::collections::HashSet;

use kvcoord_memory::{HostKvCache, KvLayout, MemoryHandle};
use kvcoord_transport::{chunk_hashes, ChunkHash, InstanceKey, RegisterKvCache, RequestError, StoreOutcome};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

use crate::client::{RetrieveResult, WorkerHandle};

/// The layout the benchmarks and examples use unless told otherwise: 32
/// layers, 16-token blocks, 8 KV heads of 128, bf16 (32 KiB per block plane).
pub fn vllm_like_layout(num_blocks: u32) -> KvLayout {
    KvLayout::mha(32, num_blocks, 16, 8, 128, kvcoord_memory::Dtype::Bf16)
}

/// Token ids of prompt `prefix` of an engine: the same on every rank.
pub fn prefix_tokens(seed: u64, prefix: u64, chunks: usize, chunk_tokens: u32) -> Vec<u32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ prefix.wrapping_mul(0x9E37_79B9_7F4A_7C15));
    (0..chunks * chunk_tokens as usize).map(|_| rng.random_range(0..128_000)).collect()
}

/// The chunk keys of prompt `prefix`.
pub fn prefix_hashes(model: &str, seed: u64, prefix: u64, chunks: usize, chunk_tokens: u32) -> Vec<ChunkHash> {
    chunk_hashes(&prefix_tokens(seed, prefix, chunks, chunk_tokens), chunk_tokens as usize, model.as_bytes())
}

fn splitmix(mut x: u64) -> impl FnMut() -> u64 {
    move || {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

pub(crate) fn pattern_seed(hash: &ChunkHash, rank: u32, layer: u32, plane: u32, i: u32) -> u64 {
    let h = u64::from_le_bytes(hash.0[..8].try_into().expect("8 bytes"));
    h ^ ((rank as u64) << 48) ^ ((layer as u64) << 32) ^ ((plane as u64) << 24) ^ i as u64
}

pub(crate) fn fill(dst: &mut [u8], seed: u64) {
    let mut next = splitmix(seed);
    for word in dst.chunks_mut(8) {
        let v = next().to_le_bytes();
        word.copy_from_slice(&v[..word.len()]);
    }
}

pub(crate) fn matches(src: &[u8], seed: u64) -> bool {
    let mut next = splitmix(seed);
    src.chunks(8).all(|word| word == &next().to_le_bytes()[..word.len()])
}

/// `count` distinct random block ids below `num_blocks`, none in `avoid`.
pub(crate) fn pick_blocks(rng: &mut rand::rngs::StdRng, num_blocks: u32, count: usize, avoid: &[u32]) -> Vec<u32> {
    let avoid: HashSet<u32> = avoid.iter().copied().collect();
    let mut all: Vec<u32> = (0..num_blocks).filter(|b| !avoid.contains(b)).collect();
    all.shuffle(rng);
    all.truncate(count);
    assert_eq!(all.len(), count, "KV cache too small for {count} blocks");
    all
}

/// One TP rank: its KV cache in shared memory and its worker client.
pub struct TpWorker {
    pub client: WorkerHandle,
    pub cache: HostKvCache,
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

impl TpWorker {
    /// Allocates the KV cache and registers it.
    pub async fn register(
        client: WorkerHandle,
        key: InstanceKey,
        model: &str,
        world_size: u32,
        layout: KvLayout,
        chunk_tokens: u32,
    ) -> Result<Self, RequestError> {
        let cache = HostKvCache::create(&format!("kvcoord-rank{}", key.rank), layout)
            .map_err(|e| RequestError::Encode(e.to_string()))?;
        let request = RegisterKvCache {
            instance: key,
            model: model.to_string(),
            world_size,
            layout,
            memory: MemoryHandle::HostFd { size: layout.total_bytes() },
        };
        client.register(request, Some(cache.fd())).await?;
        let rng = rand::rngs::StdRng::seed_from_u64(key.engine ^ key.rank as u64);
        Ok(TpWorker { client, cache, key, model: model.to_string(), world_size, chunk_tokens, rng })
    }

    fn blocks_per_chunk(&self) -> usize {
        (self.chunk_tokens / self.cache.layout().block_tokens) as usize
    }

    /// Distinct random block ids for `chunks` chunks, avoiding `avoid`.
    pub fn pick_blocks(&mut self, chunks: usize, avoid: &[u32]) -> Vec<u32> {
        let (n, per_chunk) = (self.cache.layout().num_blocks, self.blocks_per_chunk());
        pick_blocks(&mut self.rng, n, chunks * per_chunk, avoid)
    }

    /// Writes the chunks' deterministic contents into `blocks`.
    pub fn write_chunks(&mut self, hashes: &[ChunkHash], blocks: &[u32]) {
        let layout = *self.cache.layout();
        let bpc = self.blocks_per_chunk();
        for (c, hash) in hashes.iter().enumerate() {
            for layer in 0..layout.num_layers {
                for plane in 0..layout.planes() {
                    for i in 0..bpc {
                        let seed = pattern_seed(hash, self.key.rank, layer, plane, i as u32);
                        let block = self.cache.block_mut(layer, plane, blocks[c * bpc + i]).expect("valid block");
                        fill(block, seed);
                    }
                }
            }
        }
    }

    /// Checks the first `chunks` chunks in `blocks`; counts corrupt ones.
    pub fn verify_chunks(&mut self, hashes: &[ChunkHash], blocks: &[u32], chunks: usize) -> Verified {
        let layout = *self.cache.layout();
        let bpc = self.blocks_per_chunk();
        let mut v = Verified { chunks_retrieved: chunks, ..Default::default() };
        for (c, hash) in hashes.iter().enumerate().take(chunks) {
            let mut ok = true;
            for layer in 0..layout.num_layers {
                for plane in 0..layout.planes() {
                    for i in 0..bpc {
                        let seed = pattern_seed(hash, self.key.rank, layer, plane, i as u32);
                        let block = self.cache.block_mut(layer, plane, blocks[c * bpc + i]).expect("valid block");
                        ok &= matches(block, seed);
                        v.bytes_verified += block.len() as u64;
                    }
                }
            }
            if !ok {
                v.corrupt_chunks += 1;
            }
        }
        v
    }

    /// Fills `blocks` with a byte that no pattern is made of only.
    pub fn scribble(&mut self, blocks: &[u32]) {
        let layout = *self.cache.layout();
        for &b in blocks {
            for layer in 0..layout.num_layers {
                for plane in 0..layout.planes() {
                    self.cache.block_mut(layer, plane, b).expect("valid block").fill(0xA5);
                }
            }
        }
    }

    /// Writes a prompt's chunks into fresh blocks and stores them.
    pub async fn store_prefix(&mut self, hashes: &[ChunkHash]) -> Result<(Vec<u32>, Vec<StoreOutcome>), RequestError> {
        let blocks = self.pick_blocks(hashes.len(), &[]);
        self.write_chunks(hashes, &blocks);
        let outcomes = self.client.store(self.key, hashes.to_vec(), blocks.clone()).await?;
        Ok((blocks, outcomes))
    }

    /// Retrieves a prompt's chunks into blocks other than `avoid` and
    /// verifies every retrieved byte.
    pub async fn retrieve_and_verify(
        &mut self,
        hashes: &[ChunkHash],
        avoid: &[u32],
        lease: Option<kvcoord_transport::LeaseId>,
    ) -> (RetrieveResult, Verified) {
        let blocks = self.pick_blocks(hashes.len(), avoid);
        self.scribble(&blocks);
        let r = self.client.retrieve(self.key, hashes.to_vec(), blocks.clone(), lease).await;
        let n = r.prefix_retrieved();
        let v = self.verify_chunks(hashes, &blocks, n);
        (r, v)
    }
}

//! Deterministic KV contents and prompts. Every block plane's bytes are a
//! pure function of (chunk hash, rank, layer, plane, block index within the
//! chunk), so a chunk retrieved into any other blocks, by any process, can be
//! verified byte for byte without keeping a copy.

use std::collections::HashSet;

use kvcoord_memory::{Dtype, KvLayout};
use kvcoord_transport::{chunk_hashes, ChunkHash};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// The layout the benchmarks and examples use unless told otherwise: 32
/// layers, 16-token blocks, 8 KV heads of 128, bf16 (32 KiB per block plane).
pub fn vllm_like_layout(num_blocks: u32) -> KvLayout {
    KvLayout::mha(32, num_blocks, 16, 8, 128, Dtype::Bf16)
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

/// The seed of one block plane's pattern.
pub fn pattern_seed(hash: &ChunkHash, rank: u32, layer: u32, plane: u32, i: u32) -> u64 {
    let h = u64::from_le_bytes(hash.0[..8].try_into().expect("8 bytes"));
    h ^ ((rank as u64) << 48) ^ ((layer as u64) << 32) ^ ((plane as u64) << 24) ^ i as u64
}

/// Fills `dst` with the pattern of `seed`.
pub fn fill(dst: &mut [u8], seed: u64) {
    let mut next = splitmix(seed);
    for word in dst.chunks_mut(8) {
        let v = next().to_le_bytes();
        word.copy_from_slice(&v[..word.len()]);
    }
}

/// Whether `src` holds the pattern of `seed`.
pub fn matches(src: &[u8], seed: u64) -> bool {
    let mut next = splitmix(seed);
    src.chunks(8).all(|word| word == &next().to_le_bytes()[..word.len()])
}

/// `count` distinct random block ids below `num_blocks`, none in `avoid`.
pub fn pick_blocks(rng: &mut rand::rngs::StdRng, num_blocks: u32, count: usize, avoid: &[u32]) -> Vec<u32> {
    let avoid: HashSet<u32> = avoid.iter().copied().collect();
    let mut all: Vec<u32> = (0..num_blocks).filter(|b| !avoid.contains(b)).collect();
    all.shuffle(rng);
    all.truncate(count);
    assert_eq!(all.len(), count, "KV cache too small for {count} blocks");
    all
}

//! KV-cache layouts: the shape of one TP worker's paged KV cache, and the
//! arithmetic that turns (layer, plane, block) into a byte offset.
//!
//! This module owns every size and offset computation of the data path, and
//! the only way to make a [`BlockId`] or [`ChunkBlocks`]: by validating raw
//! ids against a layout. It must never touch memory.

use serde::{Deserialize, Serialize};

/// Element type of the KV cache.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Dtype {
    F16,
    Bf16,
    F32,
    Fp8,
}

impl Dtype {
    pub fn size(self) -> u64 {
        match self {
            Dtype::F16 | Dtype::Bf16 => 2,
            Dtype::F32 => 4,
            Dtype::Fp8 => 1,
        }
    }
}

/// What one token of one layer holds.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockShape {
    /// vLLM multi-head attention: per layer `[2, num_blocks, block_tokens, kv_heads, head_dim]`
    /// (a K plane, then a V plane).
    Mha { kv_heads: u32, head_dim: u32 },
    /// Multi-head latent attention: per layer `[num_blocks, block_tokens, hidden]` (one plane).
    Mla { hidden: u32 },
}

/// The layout of one TP worker's paged KV cache: `num_layers` layers laid out
/// one after the other, each `planes() * num_blocks * block_bytes()` bytes.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KvLayout {
    pub num_layers: u32,
    pub num_blocks: u32,
    pub block_tokens: u32,
    pub shape: BlockShape,
    pub dtype: Dtype,
}

/// Why a layout, a block id or a memory region was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("layout field `{0}` must be non-zero")]
    Zero(&'static str),
    #[error("layout is too large ({0} bytes overflow)")]
    Overflow(&'static str),
    #[error("chunk of {chunk_tokens} tokens is not a whole number of {block_tokens}-token blocks")]
    ChunkNotBlockAligned { chunk_tokens: u32, block_tokens: u32 },
    #[error("block id {id} out of range (layout has {num_blocks} blocks)")]
    BlockOutOfRange { id: u32, num_blocks: u32 },
    #[error("{got} block ids for {chunks} chunks; expected {expected} ({per_chunk} per chunk)")]
    BlockCount { got: usize, chunks: usize, expected: usize, per_chunk: u32 },
    #[error("memory of {got} bytes does not match the layout's {expected} bytes")]
    MemorySize { got: u64, expected: u64 },
}

/// A block id checked against the layout it indexes: always `< num_blocks`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct BlockId(u32);

impl BlockId {
    pub fn get(self) -> u32 {
        self.0
    }
}

/// The block ids of a whole number of chunks, each checked against a layout,
/// `blocks_per_chunk` ids per chunk in chunk order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChunkBlocks {
    ids: Vec<BlockId>,
    blocks_per_chunk: u32,
}

impl ChunkBlocks {
    pub fn chunk_count(&self) -> usize {
        self.ids.len() / self.blocks_per_chunk as usize
    }

    /// The blocks of chunk `i`, in token order.
    pub fn chunk(&self, i: usize) -> &[BlockId] {
        let n = self.blocks_per_chunk as usize;
        &self.ids[i * n..(i + 1) * n]
    }

    pub fn blocks_per_chunk(&self) -> u32 {
        self.blocks_per_chunk
    }
}

impl KvLayout {
    /// A vLLM-style MHA layout.
    pub fn mha(
        num_layers: u32,
        num_blocks: u32,
        block_tokens: u32,
        kv_heads: u32,
        head_dim: u32,
        dtype: Dtype,
    ) -> Self {
        KvLayout { num_layers, num_blocks, block_tokens, shape: BlockShape::Mha { kv_heads, head_dim }, dtype }
    }

    /// An MLA layout.
    pub fn mla(num_layers: u32, num_blocks: u32, block_tokens: u32, hidden: u32, dtype: Dtype) -> Self {
        KvLayout { num_layers, num_blocks, block_tokens, shape: BlockShape::Mla { hidden }, dtype }
    }

    /// Checks that every dimension is non-zero and that the total size fits in
    /// memory arithmetic (`u64`, and `usize` on this machine).
    pub fn validate(&self) -> Result<(), LayoutError> {
        let nonzero =
            [("num_layers", self.num_layers), ("num_blocks", self.num_blocks), ("block_tokens", self.block_tokens)];
        for (name, v) in nonzero {
            if v == 0 {
                return Err(LayoutError::Zero(name));
            }
        }
        match self.shape {
            BlockShape::Mha { kv_heads, head_dim } => {
                if kv_heads == 0 {
                    return Err(LayoutError::Zero("kv_heads"));
                }
                if head_dim == 0 {
                    return Err(LayoutError::Zero("head_dim"));
                }
            }
            BlockShape::Mla { hidden } => {
                if hidden == 0 {
                    return Err(LayoutError::Zero("hidden"));
                }
            }
        }
        let total = self.checked_total().ok_or(LayoutError::Overflow("total"))?;
        usize::try_from(total).map_err(|_| LayoutError::Overflow("total"))?;
        Ok(())
    }

    fn checked_total(&self) -> Option<u64> {
        let per_token = match self.shape {
            BlockShape::Mha { kv_heads, head_dim } => (kv_heads as u64).checked_mul(head_dim as u64)?,
            BlockShape::Mla { hidden } => hidden as u64,
        };
        per_token
            .checked_mul(self.dtype.size())?
            .checked_mul(self.block_tokens as u64)?
            .checked_mul(self.num_blocks as u64)?
            .checked_mul(self.planes() as u64)?
            .checked_mul(self.num_layers as u64)
    }

    /// Planes per layer: 2 (K and V) for MHA, 1 for MLA.
    pub fn planes(&self) -> u32 {
        match self.shape {
            BlockShape::Mha { .. } => 2,
            BlockShape::Mla { .. } => 1,
        }
    }

    /// Bytes of one block of one plane of one layer.
    pub fn block_bytes(&self) -> u64 {
        let per_token = match self.shape {
            BlockShape::Mha { kv_heads, head_dim } => kv_heads as u64 * head_dim as u64,
            BlockShape::Mla { hidden } => hidden as u64,
        };
        per_token * self.dtype.size() * self.block_tokens as u64
    }

    /// Bytes of one layer (all planes, all blocks).
    pub fn layer_bytes(&self) -> u64 {
        self.planes() as u64 * self.num_blocks as u64 * self.block_bytes()
    }

    /// Bytes of the whole KV cache.
    pub fn total_bytes(&self) -> u64 {
        self.num_layers as u64 * self.layer_bytes()
    }

    /// Byte offset of `block` of `plane` within one layer.
    pub fn offset_in_layer(&self, plane: u32, block: BlockId) -> u64 {
        (plane as u64 * self.num_blocks as u64 + block.0 as u64) * self.block_bytes()
    }

    /// Blocks in one chunk of `chunk_tokens` tokens.
    pub fn blocks_per_chunk(&self, chunk_tokens: u32) -> Result<u32, LayoutError> {
        if chunk_tokens == 0 || !chunk_tokens.is_multiple_of(self.block_tokens) {
            return Err(LayoutError::ChunkNotBlockAligned { chunk_tokens, block_tokens: self.block_tokens });
        }
        Ok(chunk_tokens / self.block_tokens)
    }

    /// Bytes of one chunk object in L1: every layer, every plane, every block
    /// of the chunk, in that order (see [`KvLayout::object_offset`]).
    pub fn chunk_object_bytes(&self, blocks_per_chunk: u32) -> u64 {
        self.num_layers as u64 * self.planes() as u64 * blocks_per_chunk as u64 * self.block_bytes()
    }

    /// Offset inside a chunk object of the `i`-th block of (`layer`, `plane`).
    pub fn object_offset(&self, blocks_per_chunk: u32, layer: u32, plane: u32, i: u32) -> u64 {
        ((layer as u64 * self.planes() as u64 + plane as u64) * blocks_per_chunk as u64 + i as u64) * self.block_bytes()
    }

    /// Validates one raw block id.
    pub fn block(&self, raw: u32) -> Result<BlockId, LayoutError> {
        if raw < self.num_blocks {
            Ok(BlockId(raw))
        } else {
            Err(LayoutError::BlockOutOfRange { id: raw, num_blocks: self.num_blocks })
        }
    }

    /// Validates the block ids of `chunks` chunks of `chunk_tokens` tokens.
    pub fn chunk_blocks(&self, chunk_tokens: u32, chunks: usize, raw: &[u32]) -> Result<ChunkBlocks, LayoutError> {
        let per_chunk = self.blocks_per_chunk(chunk_tokens)?;
        let expected = chunks * per_chunk as usize;
        if raw.len() != expected {
            return Err(LayoutError::BlockCount { got: raw.len(), chunks, expected, per_chunk });
        }
        let ids = raw.iter().map(|&r| self.block(r)).collect::<Result<Vec<_>, _>>()?;
        Ok(ChunkBlocks { ids, blocks_per_chunk: per_chunk })
    }

    /// Checks a memory region's size against the layout.
    pub fn check_memory_size(&self, got: u64) -> Result<(), LayoutError> {
        let expected = self.total_bytes();
        if got != expected {
            return Err(LayoutError::MemorySize { got, expected });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vllm_like() -> KvLayout {
        KvLayout::mha(32, 2048, 16, 8, 128, Dtype::Bf16)
    }

    #[test]
    fn vllm_block_is_32_kib_per_plane() {
        let l = vllm_like();
        assert_eq!(l.block_bytes(), 32 * 1024);
        assert_eq!(l.layer_bytes(), 2 * 2048 * 32 * 1024);
        assert_eq!(l.chunk_object_bytes(16), 32 * 2 * 16 * 32 * 1024);
    }

    #[test]
    fn block_ids_past_the_end_are_refused() {
        let l = vllm_like();
        assert!(l.block(2047).is_ok());
        assert_eq!(l.block(2048), Err(LayoutError::BlockOutOfRange { id: 2048, num_blocks: 2048 }));
    }

    #[test]
    fn chunk_blocks_need_exactly_blocks_per_chunk_ids_per_chunk() {
        let l = vllm_like();
        assert!(matches!(l.chunk_blocks(256, 2, &[0; 31]), Err(LayoutError::BlockCount { .. })));
        let ok = l.chunk_blocks(256, 2, &(0..32).collect::<Vec<_>>()).unwrap();
        assert_eq!(ok.chunk_count(), 2);
        assert_eq!(ok.chunk(1)[0].get(), 16);
    }

    #[test]
    fn zero_and_overflowing_layouts_are_invalid() {
        assert_eq!(KvLayout::mha(0, 1, 1, 1, 1, Dtype::F16).validate(), Err(LayoutError::Zero("num_layers")));
        assert_eq!(KvLayout::mla(1, 1, 1, 0, Dtype::F16).validate(), Err(LayoutError::Zero("hidden")));
        let huge = KvLayout::mha(u32::MAX, u32::MAX, u32::MAX, u32::MAX, u32::MAX, Dtype::F32);
        assert!(matches!(huge.validate(), Err(LayoutError::Overflow(_))));
    }

    #[test]
    fn chunk_must_be_whole_blocks() {
        assert!(vllm_like().blocks_per_chunk(250).is_err());
        assert!(vllm_like().blocks_per_chunk(0).is_err());
    }

    #[test]
    fn mla_has_one_plane() {
        let l = KvLayout::mla(2, 10, 16, 512, Dtype::Bf16);
        assert_eq!(l.planes(), 1);
        assert_eq!(l.total_bytes(), 2 * 10 * 16 * 512 * 2);
    }
}

//! KV-cache layouts: the shape of one TP worker's paged KV cache, and the
//! arithmetic that turns (layer, plane, block) into a byte offset.
//!
//! This module owns every size and offset computation of the data path, and
//! the only way to make a [`BlockId`] or [`ChunkBlocks`]: by validating raw
//! ids against a layout. It must never touch memory.

use serde::{Deserialize, Serialize};

/// Element type of the KV cache.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
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

/// What one token of one layer holds (the layout's meaning; the placement
/// says where those bytes are).
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum BlockShape {
    /// Multi-head attention: a K and a V vector of `head_dim` per KV head.
    Mha { kv_heads: u32, head_dim: u32 },
    /// Multi-head latent attention: one latent vector per token (stored once,
    /// not per rank).
    Mla { latent: u32 },
}

/// vLLM's KV-cache layouts (`vllm/v1/kv_cache_layout.py`): the physical order
/// of the logical dimensions L (layer), B (block), H (KV head), N (token of
/// the block) and C (K then V of one head and token, `2 * head_dim`). Each
/// layer's view is `[num_blocks, kv_heads, block_tokens, 2 * head_dim]`.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum VllmLayout {
    Lbhnc,
    /// vLLM's default: layer-major, then block, a block `[tokens, heads, K|V]`.
    Lbnhc,
    /// One block is one run per head.
    Lhbnc,
    Blhnc,
    /// All layers of one block contiguous.
    Blnhc,
    /// One block is one run per head.
    Bhlnc,
}

impl VllmLayout {
    pub const ALL: [VllmLayout; 6] = [
        VllmLayout::Lbhnc,
        VllmLayout::Lbnhc,
        VllmLayout::Lhbnc,
        VllmLayout::Blhnc,
        VllmLayout::Blnhc,
        VllmLayout::Bhlnc,
    ];
}

/// Where a layout's bytes are in the registered memory. A block of a layer
/// is `runs_per_block` runs of `run_bytes` contiguous bytes; run `r` of block
/// `b` of layer `l` starts at
///
/// `layer_offset + l * layer_stride + r * run_stride + b * block_stride`.
///
/// On host memory (one memfd) that is an offset into the memfd. On CUDA IPC
/// memory every layer has its own handle and offset
/// ([`crate::CudaIpcLayer`]), which is the layer's base: there
/// `layer_offset` and `layer_stride` are not used (they must still validate).
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Placement {
    /// Offset of layer 0 in the memory.
    pub layer_offset: u64,
    pub layer_stride: u64,
    pub block_stride: u64,
    /// Bytes of one contiguous run.
    pub run_bytes: u64,
    /// Runs per block of one layer.
    pub runs_per_block: u32,
    /// Distance between the runs of one block.
    pub run_stride: u64,
}

/// The layout of one TP worker's paged KV cache: what it holds (layers,
/// blocks, tokens per block, what a token holds, dtype) and where
/// ([`Placement`]).
///
/// The chunk object in L1 is, for every layer, every run, every block of the
/// chunk in that order, the run's bytes: `[layer][run][block-in-chunk]`.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KvLayout {
    pub num_layers: u32,
    pub num_blocks: u32,
    pub block_tokens: u32,
    pub shape: BlockShape,
    pub dtype: Dtype,
    pub placement: Placement,
}

/// Why a layout, a block id or a memory region was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    #[error("layout field `{0}` must be non-zero")]
    Zero(&'static str),
    #[error("layout is too large ({0} bytes overflow)")]
    Overflow(&'static str),
    #[error(
        "placement holds {runs} runs of {run_bytes} bytes per block, but a block of {block_tokens} tokens of this \
         shape is {block_bytes} bytes"
    )]
    RunsDoNotHoldBlock { runs: u32, run_bytes: u64, block_tokens: u32, block_bytes: u64 },
    #[error("placement overlaps itself: {0}")]
    Overlap(String),
    #[error("chunk of {chunk_tokens} tokens is not a whole number of {block_tokens}-token blocks")]
    ChunkNotBlockAligned { chunk_tokens: u32, block_tokens: u32 },
    #[error("block id {id} out of range (layout has {num_blocks} blocks)")]
    BlockOutOfRange { id: u32, num_blocks: u32 },
    #[error("layer {layer}, run {run} is not in the layout")]
    RunOutOfRange { layer: u32, run: u32 },
    #[error("{got} block ids for {chunks} chunks; expected {expected} ({per_chunk} per chunk)")]
    BlockCount { got: usize, chunks: usize, expected: usize, per_chunk: u32 },
    #[error("memory of {got} bytes is too small: the layout's placement ends at byte {need}")]
    MemorySize { got: u64, need: u64 },
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

/// Saturating product: constructors cannot fail, and a saturated value never
/// validates (see [`KvLayout::validate`]).
fn mul(factors: &[u64]) -> u64 {
    factors.iter().fold(1u64, |a, &f| a.saturating_mul(f))
}

fn checked(factors: &[u64], what: &'static str) -> Result<u64, LayoutError> {
    factors.iter().try_fold(1u64, |a, &f| a.checked_mul(f)).ok_or(LayoutError::Overflow(what))
}

impl KvLayout {
    /// Today's MHA layout: per layer `[2 (K, V), num_blocks, block_tokens,
    /// kv_heads, head_dim]`, the layers one after another: 2 runs (the K and
    /// the V plane) per block.
    pub fn mha(
        num_layers: u32,
        num_blocks: u32,
        block_tokens: u32,
        kv_heads: u32,
        head_dim: u32,
        dtype: Dtype,
    ) -> Self {
        let (b, n, h, d, e) = (num_blocks as u64, block_tokens as u64, kv_heads as u64, head_dim as u64, dtype.size());
        let plane_block = mul(&[n, h, d, e]);
        KvLayout {
            num_layers,
            num_blocks,
            block_tokens,
            shape: BlockShape::Mha { kv_heads, head_dim },
            dtype,
            placement: Placement {
                layer_offset: 0,
                layer_stride: mul(&[2, b, plane_block]),
                block_stride: plane_block,
                run_bytes: plane_block,
                runs_per_block: 2,
                run_stride: mul(&[b, plane_block]),
            },
        }
    }

    /// A vLLM MHA KV cache in one buffer in one of vLLM's physical orders
    /// (see [`VllmLayout`]), layer 0 at offset 0.
    pub fn vllm(
        layout: VllmLayout,
        num_layers: u32,
        num_blocks: u32,
        block_tokens: u32,
        kv_heads: u32,
        head_dim: u32,
        dtype: Dtype,
    ) -> Self {
        let (l, b, h) = (num_layers as u64, num_blocks as u64, kv_heads as u64);
        // One head's tokens (N*C) and one whole block (H*N*C), in bytes.
        let head_run = mul(&[block_tokens as u64, 2, head_dim as u64, dtype.size()]);
        let block = mul(&[h, head_run]);
        let one_run = |layer_stride, block_stride| Placement {
            layer_offset: 0,
            layer_stride,
            block_stride,
            run_bytes: block,
            runs_per_block: 1,
            run_stride: block,
        };
        let per_head = |layer_stride, block_stride, run_stride| Placement {
            layer_offset: 0,
            layer_stride,
            block_stride,
            run_bytes: head_run,
            runs_per_block: kv_heads,
            run_stride,
        };
        let placement = match layout {
            VllmLayout::Lbhnc | VllmLayout::Lbnhc => one_run(mul(&[b, block]), block),
            VllmLayout::Blhnc | VllmLayout::Blnhc => one_run(block, mul(&[l, block])),
            VllmLayout::Lhbnc => per_head(mul(&[h, b, head_run]), head_run, mul(&[b, head_run])),
            VllmLayout::Bhlnc => per_head(head_run, mul(&[h, l, head_run]), mul(&[l, head_run])),
        };
        KvLayout {
            num_layers,
            num_blocks,
            block_tokens,
            shape: BlockShape::Mha { kv_heads, head_dim },
            dtype,
            placement,
        }
    }

    /// An MLA layout: per layer `[num_blocks, block_tokens, latent]`, the
    /// layers one after another (one run per block).
    pub fn mla(num_layers: u32, num_blocks: u32, block_tokens: u32, latent: u32, dtype: Dtype) -> Self {
        let block = mul(&[block_tokens as u64, latent as u64, dtype.size()]);
        KvLayout {
            num_layers,
            num_blocks,
            block_tokens,
            shape: BlockShape::Mla { latent },
            dtype,
            placement: Placement {
                layer_offset: 0,
                layer_stride: mul(&[num_blocks as u64, block]),
                block_stride: block,
                run_bytes: block,
                runs_per_block: 1,
                run_stride: block,
            },
        }
    }

    /// The same layout with layer 0 at `offset` of the memory.
    pub fn at_offset(mut self, offset: u64) -> Self {
        self.placement.layer_offset = offset;
        self
    }

    /// The same placement with the fewest runs: runs of a block that follow
    /// each other in memory (`run_stride == run_bytes`) become one run, so
    /// a block-compact placement is one run (one copy, one CUDA segment) per
    /// block however it was described, and equal placements make equal
    /// chunk objects. Invalid layouts are returned as they are.
    pub fn normalized(&self) -> Self {
        let p = &self.placement;
        if p.runs_per_block < 2 || p.run_stride != p.run_bytes || self.validate().is_err() {
            return *self;
        }
        let run_bytes = p.run_bytes * p.runs_per_block as u64; // validated: no overflow
        KvLayout { placement: Placement { run_bytes, runs_per_block: 1, run_stride: run_bytes, ..*p }, ..*self }
    }

    /// Bytes of one token of one layer (checked).
    fn token_bytes(&self) -> Result<u64, LayoutError> {
        let e = self.dtype.size();
        match self.shape {
            BlockShape::Mha { kv_heads, head_dim } => checked(&[2, kv_heads as u64, head_dim as u64, e], "token"),
            BlockShape::Mla { latent } => checked(&[latent as u64, e], "token"),
        }
    }

    /// Checks every dimension is non-zero, the runs hold exactly a block's
    /// bytes, no run overlaps another (of its block, of another block or
    /// layer), and every offset fits memory arithmetic (`u64`, and `usize`
    /// on this machine), all with checked arithmetic.
    ///
    /// Non-overlap is proved by nesting: the dimensions with more than one
    /// entry (runs, blocks, layers), taken by increasing stride, must each
    /// step over the whole extent of the ones before. Every layout the
    /// constructors make nests; a placement that interleaves dimensions
    /// another way is refused even where it would not overlap.
    pub fn validate(&self) -> Result<(), LayoutError> {
        let p = &self.placement;
        let nonzero = [
            ("num_layers", self.num_layers),
            ("num_blocks", self.num_blocks),
            ("block_tokens", self.block_tokens),
            ("runs_per_block", p.runs_per_block),
        ];
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
            BlockShape::Mla { latent } => {
                if latent == 0 {
                    return Err(LayoutError::Zero("latent"));
                }
            }
        }
        if p.run_bytes == 0 {
            return Err(LayoutError::Zero("run_bytes"));
        }
        let block_bytes = checked(&[self.token_bytes()?, self.block_tokens as u64], "block")?;
        let runs_bytes = checked(&[p.runs_per_block as u64, p.run_bytes], "block")?;
        if runs_bytes != block_bytes {
            return Err(LayoutError::RunsDoNotHoldBlock {
                runs: p.runs_per_block,
                run_bytes: p.run_bytes,
                block_tokens: self.block_tokens,
                block_bytes,
            });
        }
        checked(&[block_bytes, self.num_blocks as u64, self.num_layers as u64], "total")?;
        let mut dims = [
            ("run", p.runs_per_block as u64, p.run_stride),
            ("block", self.num_blocks as u64, p.block_stride),
            ("layer", self.num_layers as u64, p.layer_stride),
        ];
        dims.sort_by_key(|&(_, _, stride)| stride);
        let mut extent = p.run_bytes;
        let mut inner = "run bytes";
        for (name, count, stride) in dims {
            if count < 2 {
                continue;
            }
            if stride < extent {
                return Err(LayoutError::Overlap(format!(
                    "{name} stride {stride} is smaller than the {extent} bytes spanned by the {inner} inside it"
                )));
            }
            extent = (count - 1)
                .checked_mul(stride)
                .and_then(|s| s.checked_add(extent))
                .ok_or(LayoutError::Overflow("placement"))?;
            inner = name;
        }
        let end = p.layer_offset.checked_add(extent).ok_or(LayoutError::Overflow("placement"))?;
        usize::try_from(end).map_err(|_| LayoutError::Overflow("placement"))?;
        Ok(())
    }

    /// Runs per block of one layer.
    pub fn runs(&self) -> u32 {
        self.placement.runs_per_block
    }

    /// Bytes of one run (of one block of one layer).
    pub fn run_bytes(&self) -> u64 {
        self.placement.run_bytes
    }

    /// Bytes of KV data in one block of one layer (all its runs).
    pub fn block_bytes(&self) -> u64 {
        self.runs() as u64 * self.run_bytes()
    }

    /// Bytes from a layer's base to the end of its last run: what one
    /// layer's memory must hold (a CUDA IPC layer, for one).
    pub fn layer_extent(&self) -> u64 {
        let p = &self.placement;
        (p.runs_per_block as u64 - 1) * p.run_stride + (self.num_blocks as u64 - 1) * p.block_stride + p.run_bytes
    }

    /// Where the placement ends: the size the registered memory must at
    /// least have (for [`KvLayout::mha`], exactly the KV cache's size).
    /// Valid layouts only.
    pub fn total_bytes(&self) -> u64 {
        let p = &self.placement;
        p.layer_offset + (self.num_layers as u64 - 1) * p.layer_stride + self.layer_extent()
    }

    /// Bytes of KV data (every run of every block of every layer).
    pub fn kv_bytes(&self) -> u64 {
        self.num_layers as u64 * self.num_blocks as u64 * self.block_bytes()
    }

    /// Offset of run `run` of `block` from its layer's base.
    pub fn offset_in_layer(&self, run: u32, block: BlockId) -> u64 {
        let p = &self.placement;
        run as u64 * p.run_stride + block.0 as u64 * p.block_stride
    }

    /// Offset in the memory of layer `layer`'s base (host memory).
    pub fn layer_base(&self, layer: u32) -> u64 {
        self.placement.layer_offset + layer as u64 * self.placement.layer_stride
    }

    /// Offset in the memory of run `run` of `block` of `layer` (host memory).
    pub fn offset(&self, layer: u32, run: u32, block: BlockId) -> u64 {
        self.layer_base(layer) + self.offset_in_layer(run, block)
    }

    /// Blocks in one chunk of `chunk_tokens` tokens.
    pub fn blocks_per_chunk(&self, chunk_tokens: u32) -> Result<u32, LayoutError> {
        if chunk_tokens == 0 || !chunk_tokens.is_multiple_of(self.block_tokens) {
            return Err(LayoutError::ChunkNotBlockAligned { chunk_tokens, block_tokens: self.block_tokens });
        }
        Ok(chunk_tokens / self.block_tokens)
    }

    /// Bytes of one chunk object in L1: every layer, every run, every block
    /// of the chunk, in that order (see [`KvLayout::object_offset`]).
    /// Saturates at `u64::MAX` (no object is that large).
    pub fn chunk_object_bytes(&self, blocks_per_chunk: u32) -> u64 {
        mul(&[self.num_layers as u64, self.runs() as u64, blocks_per_chunk as u64, self.run_bytes()])
    }

    /// Offset inside a chunk object of the `i`-th block of (`layer`, `run`).
    pub fn object_offset(&self, blocks_per_chunk: u32, layer: u32, run: u32, i: u32) -> u64 {
        ((layer as u64 * self.runs() as u64 + run as u64) * blocks_per_chunk as u64 + i as u64) * self.run_bytes()
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
        let expected = chunks.checked_mul(per_chunk as usize);
        if expected != Some(raw.len()) {
            let expected = expected.unwrap_or(usize::MAX);
            return Err(LayoutError::BlockCount { got: raw.len(), chunks, expected, per_chunk });
        }
        let ids = raw.iter().map(|&r| self.block(r)).collect::<Result<Vec<_>, _>>()?;
        Ok(ChunkBlocks { ids, blocks_per_chunk: per_chunk })
    }

    /// Checks that the layout is valid and its placement lies inside memory
    /// of `len` bytes.
    pub fn fits_in(&self, len: u64) -> Result<(), LayoutError> {
        self.validate()?;
        let need = self.total_bytes();
        if need > len {
            return Err(LayoutError::MemorySize { got: len, need });
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
        l.validate().unwrap();
        assert_eq!((l.runs(), l.run_bytes()), (2, 32 * 1024));
        assert_eq!(l.total_bytes(), 32 * 2 * 2048 * 32 * 1024);
        assert_eq!(l.kv_bytes(), l.total_bytes());
        assert_eq!(l.chunk_object_bytes(16), 32 * 2 * 16 * 32 * 1024);
    }

    #[test]
    fn mha_keeps_todays_byte_placement() {
        // Per layer [2, blocks, tokens, heads, dim]: K plane, V plane.
        let l = KvLayout::mha(3, 10, 4, 2, 8, Dtype::F16);
        let bb = 4 * 2 * 8 * 2;
        let b = |r| l.block(r).unwrap();
        assert_eq!(l.offset(0, 0, b(0)), 0);
        assert_eq!(l.offset(0, 1, b(0)), 10 * bb, "V plane after the K plane");
        assert_eq!(l.offset(1, 0, b(3)), 2 * 10 * bb + 3 * bb);
        assert_eq!(l.offset(2, 1, b(9)), 2 * 2 * 10 * bb + 10 * bb + 9 * bb);
        assert_eq!(l.total_bytes(), 3 * 2 * 10 * bb);
        assert_eq!(l.layer_extent(), 2 * 10 * bb);
        assert_eq!(l.object_offset(4, 1, 1, 2), ((2 + 1) * 4 + 2) * bb);
    }

    /// Byte offset of element (l, b, h, n, c) of a row-major array whose
    /// dimensions are in `order` (a permutation of "LBHNC").
    fn physical(order: &str, dims: [u64; 5], at: [u64; 5], elem: u64) -> u64 {
        let mut off = 0;
        for ch in order.chars() {
            let k = "LBHNC".find(ch).unwrap();
            off = off * dims[k] + at[k];
        }
        off * elem
    }

    #[test]
    fn every_vllm_order_matches_its_physical_array() {
        let (nl, nb, h, n, d) = (3u32, 5u32, 2u32, 4u32, 8u32);
        let dims = [nl as u64, nb as u64, h as u64, n as u64, 2 * d as u64];
        for (order, name, runs) in [
            (VllmLayout::Lbhnc, "LBHNC", 1),
            (VllmLayout::Lbnhc, "LBNHC", 1),
            (VllmLayout::Lhbnc, "LHBNC", h),
            (VllmLayout::Blhnc, "BLHNC", 1),
            (VllmLayout::Blnhc, "BLNHC", 1),
            (VllmLayout::Bhlnc, "BHLNC", h),
        ] {
            let l = KvLayout::vllm(order, nl, nb, n, h, d, Dtype::Bf16);
            l.validate().unwrap();
            assert_eq!(l.runs(), runs, "{name}");
            assert_eq!(l.total_bytes(), 3 * 5 * 2 * 4 * 16 * 2, "{name}: one buffer, no gaps");
            assert_eq!(l.block_bytes(), 2 * 4 * 16 * 2, "{name}");
            for layer in 0..nl {
                for block in 0..nb {
                    for run in 0..runs {
                        let head = if runs == 1 { 0 } else { run };
                        let want = physical(name, dims, [layer as u64, block as u64, head as u64, 0, 0], 2);
                        assert_eq!(
                            l.offset(layer, run, l.block(block).unwrap()),
                            want,
                            "{name} ({layer},{run},{block})"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn vllm_orders_have_the_expected_strides() {
        // 3 layers, 5 blocks, 2 heads, 4 tokens, C = 16 bf16: a head's run
        // 128 bytes, a block 256.
        let v = |o| KvLayout::vllm(o, 3, 5, 4, 2, 8, Dtype::Bf16).placement;
        let p = |layer_stride, block_stride, run_bytes, runs_per_block, run_stride| Placement {
            layer_offset: 0,
            layer_stride,
            block_stride,
            run_bytes,
            runs_per_block,
            run_stride,
        };
        assert_eq!(v(VllmLayout::Lbnhc), p(1280, 256, 256, 1, 256));
        assert_eq!(v(VllmLayout::Lbhnc), p(1280, 256, 256, 1, 256));
        assert_eq!(v(VllmLayout::Blnhc), p(256, 768, 256, 1, 256));
        assert_eq!(v(VllmLayout::Blhnc), p(256, 768, 256, 1, 256));
        assert_eq!(v(VllmLayout::Lhbnc), p(1280, 128, 128, 2, 640));
        assert_eq!(v(VllmLayout::Bhlnc), p(128, 768, 128, 2, 384));
        // A few triples by hand.
        let at = |o, layer, run, block| {
            let l = KvLayout::vllm(o, 3, 5, 4, 2, 8, Dtype::Bf16);
            l.offset(layer, run, l.block(block).unwrap())
        };
        assert_eq!(at(VllmLayout::Lbnhc, 2, 0, 3), 2 * 1280 + 3 * 256);
        assert_eq!(at(VllmLayout::Blnhc, 2, 0, 3), 2 * 256 + 3 * 768);
        assert_eq!(at(VllmLayout::Lhbnc, 2, 1, 3), 2 * 1280 + 640 + 3 * 128);
        assert_eq!(at(VllmLayout::Bhlnc, 2, 1, 3), 2 * 128 + 384 + 3 * 768);
        assert_eq!(at(VllmLayout::Bhlnc, 0, 0, 0), 0);
    }

    #[test]
    fn mla_is_one_run_per_block() {
        let l = KvLayout::mla(2, 10, 16, 512, Dtype::Bf16);
        l.validate().unwrap();
        assert_eq!((l.runs(), l.run_bytes()), (1, 16 * 512 * 2));
        assert_eq!(l.total_bytes(), 2 * 10 * 16 * 512 * 2);
        assert_eq!(l.offset(1, 0, l.block(2).unwrap()), (10 + 2) * 16 * 512 * 2);
    }

    #[test]
    fn a_layer_offset_moves_the_whole_placement() {
        let l = KvLayout::vllm(VllmLayout::Lbnhc, 2, 4, 4, 1, 4, Dtype::F32).at_offset(1000);
        l.validate().unwrap();
        assert_eq!(l.offset(0, 0, l.block(0).unwrap()), 1000);
        assert_eq!(l.total_bytes(), 1000 + l.kv_bytes());
        assert!(l.fits_in(1000 + l.kv_bytes()).is_ok());
        assert_eq!(l.kv_bytes(), 2 * 4 * 128);
        assert_eq!(l.fits_in(999 + 1024), Err(LayoutError::MemorySize { got: 2023, need: 2024 }));
    }

    #[test]
    fn overlapping_placements_are_refused() {
        let base = KvLayout::vllm(VllmLayout::Lhbnc, 2, 4, 4, 2, 4, Dtype::F16);
        base.validate().unwrap();
        type Change = fn(&mut Placement);
        let cases: [(&str, Change); 5] = [
            ("runs on top of each other", |p| p.run_stride = 0),
            ("blocks on top of each other", |p| p.block_stride = 0),
            ("a block stride shorter than a run", |p| p.block_stride = p.run_bytes - 2),
            ("layers overlapping", |p| p.layer_stride /= 2),
            ("runs reaching into the next head", |p| p.run_stride = p.run_bytes * 2),
        ];
        for (what, change) in cases {
            let mut l = base;
            change(&mut l.placement);
            assert!(matches!(l.validate(), Err(LayoutError::Overlap(_))), "{what}: {:?}", l.validate());
        }
        // A dimension of one entry may have any stride.
        let mut one = KvLayout::mla(1, 4, 4, 8, Dtype::F16);
        one.placement.layer_stride = 0;
        one.validate().unwrap();
        // Runs that do not add up to a block.
        let mut short = base;
        short.placement.run_bytes -= 2;
        assert!(matches!(short.validate(), Err(LayoutError::RunsDoNotHoldBlock { .. })));
    }

    #[test]
    fn zero_and_overflowing_layouts_are_invalid_without_panicking() {
        assert_eq!(KvLayout::mha(0, 1, 1, 1, 1, Dtype::F16).validate(), Err(LayoutError::Zero("num_layers")));
        assert_eq!(KvLayout::mla(1, 1, 1, 0, Dtype::F16).validate(), Err(LayoutError::Zero("latent")));
        let huge = KvLayout::mha(u32::MAX, u32::MAX, u32::MAX, u32::MAX, u32::MAX, Dtype::F32);
        assert!(matches!(huge.validate(), Err(LayoutError::Overflow(_))), "{:?}", huge.validate());
        for o in VllmLayout::ALL {
            let l = KvLayout::vllm(o, u32::MAX, u32::MAX, 1 << 20, 1 << 12, 1 << 12, Dtype::F32);
            assert!(l.validate().is_err(), "{o:?}");
        }
        let far = KvLayout::mla(2, 2, 1, 1, Dtype::Fp8).at_offset(u64::MAX - 1);
        assert_eq!(far.validate(), Err(LayoutError::Overflow("placement")));
        let mut strides = KvLayout::mla(3, 3, 1, 1, Dtype::Fp8);
        strides.placement.layer_stride = u64::MAX / 2 + 1;
        assert_eq!(strides.validate(), Err(LayoutError::Overflow("placement")));
        assert!(matches!(
            KvLayout::mla(1, 1, 1, 1, Dtype::Fp8).fits_in(0),
            Err(LayoutError::MemorySize { got: 0, need: 1 })
        ));
        let wide = KvLayout::mha(u32::MAX, 1, u32::MAX, u32::MAX, 1, Dtype::F32);
        assert_eq!(wide.chunk_object_bytes(u32::MAX), u64::MAX, "saturates");
        let huge_chunks = vllm_like().chunk_blocks(16, usize::MAX, &[0]);
        assert!(matches!(huge_chunks, Err(LayoutError::BlockCount { .. })));
    }

    #[test]
    fn adjacent_runs_normalize_to_one_run_per_block() {
        // LBHNC described as one run per head (its heads are adjacent).
        let one = KvLayout::vllm(VllmLayout::Lbhnc, 2, 4, 4, 2, 4, Dtype::F16);
        let mut split = one;
        split.placement.runs_per_block = 2;
        split.placement.run_bytes /= 2;
        split.placement.run_stride = split.placement.run_bytes;
        split.validate().unwrap();
        assert_eq!(split.normalized(), one);
        assert_eq!(one.normalized(), one);
        let per_head = KvLayout::vllm(VllmLayout::Lhbnc, 2, 4, 4, 2, 4, Dtype::F16);
        assert_eq!(per_head.normalized(), per_head, "runs apart stay apart");
        assert_eq!(KvLayout::mha(2, 4, 4, 2, 4, Dtype::F16).normalized().runs(), 2);
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
    fn chunk_must_be_whole_blocks() {
        assert!(vllm_like().blocks_per_chunk(250).is_err());
        assert!(vllm_like().blocks_per_chunk(0).is_err());
    }
}

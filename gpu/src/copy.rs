//! Host copy engine: gather the paged blocks of one chunk (every layer, every
//! run) into one contiguous L1 object, and scatter an object back; and the
//! one walk over a chunk's runs that both backends copy along.
//!
//! This module owns the only raw-pointer copies of the host data path. It
//! must never validate ids (a [`BlockId`] is already valid for its layout) nor
//! decide which object to copy.

use crate::arena::ObjectBytes;
use crate::host::KvMemory;
use crate::layout::{BlockId, KvLayout, LayoutError};

/// Why a copy was refused before touching memory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CopyError {
    #[error("layout: {0}")]
    Layout(#[from] LayoutError),
    #[error("object of {got} bytes does not match the chunk's {need} bytes")]
    ObjectSize { got: usize, need: u64 },
}

fn check(layout: &KvLayout, mem: &dyn KvMemory, blocks: &[BlockId], obj: &dyn ObjectBytes) -> Result<(), CopyError> {
    layout.fits_in(mem.len() as u64)?;
    let need = layout.chunk_object_bytes(blocks.len() as u32);
    if obj.len() as u64 != need {
        return Err(CopyError::ObjectSize { got: obj.len(), need });
    }
    Ok(())
}

/// One run of one block of one layer and its place in the chunk object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RunCopy {
    pub layer: u32,
    /// Offset of the run from its layer's base.
    pub in_layer: u64,
    /// Offset in the chunk object.
    pub object: u64,
    pub len: u64,
}

/// Every run of the chunk's blocks, in object order (`[layer][run][block]`,
/// so each item's object offset is the previous one's end). Both backends
/// copy along this walk, so an object has the same bytes whichever backend
/// stored it.
pub(crate) fn chunk_runs<'a>(layout: &'a KvLayout, blocks: &'a [BlockId]) -> impl Iterator<Item = RunCopy> + 'a {
    let bpc = blocks.len() as u32;
    let len = layout.run_bytes();
    (0..layout.num_layers).flat_map(move |layer| {
        (0..layout.runs()).flat_map(move |run| {
            blocks.iter().enumerate().map(move |(i, &b)| RunCopy {
                layer,
                in_layer: layout.offset_in_layer(run, b),
                object: layout.object_offset(bpc, layer, run, i as u32),
                len,
            })
        })
    })
}

/// Calls `f(kv_offset, object_offset, len)` for the chunk's runs in one
/// region holding every layer (host memory), merging runs that are
/// contiguous both in memory and in the object into one copy.
fn for_each_copy(layout: &KvLayout, blocks: &[BlockId], mut f: impl FnMut(usize, usize, usize)) {
    let mut pending: Option<(u64, u64, u64)> = None;
    for r in chunk_runs(layout, blocks) {
        let kv = layout.layer_base(r.layer) + r.in_layer;
        match &mut pending {
            Some((k, o, len)) if *k + *len == kv && *o + *len == r.object => *len += r.len,
            _ => {
                if let Some((k, o, len)) = pending.replace((kv, r.object, r.len)) {
                    f(k as usize, o as usize, len as usize);
                }
            }
        }
    }
    if let Some((k, o, len)) = pending {
        f(k as usize, o as usize, len as usize);
    }
}

/// Copies the chunk's blocks out of `mem` into `obj`.
pub fn gather(
    layout: &KvLayout,
    mem: &dyn KvMemory,
    blocks: &[BlockId],
    obj: &dyn ObjectBytes,
) -> Result<(), CopyError> {
    check(layout, mem, blocks, obj)?;
    let (kv, dst) = (mem.base(), obj.as_ptr());
    for_each_copy(layout, blocks, |k, o, len| {
        // SAFETY: `check` proved the layout valid (no overflow) and its whole
        // placement inside mem, and obj the whole chunk; every BlockId is
        // < num_blocks, so k + len <= total_bytes <= mem.len() and o + len
        // <= object size. The two regions never overlap (client memory
        // versus arena memory). The L1 store gives this copy exclusive write
        // access to `obj` until it commits.
        unsafe { std::ptr::copy_nonoverlapping(kv.add(k), dst.add(o), len) }
    });
    Ok(())
}

/// Copies `obj` into the chunk's blocks of `mem`.
pub fn scatter(
    layout: &KvLayout,
    obj: &dyn ObjectBytes,
    mem: &dyn KvMemory,
    blocks: &[BlockId],
) -> Result<(), CopyError> {
    check(layout, mem, blocks, obj)?;
    let (kv, src) = (mem.base(), obj.as_ptr());
    for_each_copy(layout, blocks, |k, o, len| {
        // SAFETY: same bounds as in `gather`. `obj` is a committed object,
        // which nobody writes any more; the client's blocks are the target the
        // client asked us to fill.
        unsafe { std::ptr::copy_nonoverlapping(src.add(o), kv.add(k), len) }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arena::Arena;
    use crate::host::{HostKvCache, HostMapping};
    use crate::layout::{Dtype, VllmLayout};
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn gather_then_scatter_into_other_blocks_is_bit_exact() {
        let layout = KvLayout::mha(3, 16, 4, 2, 8, Dtype::Bf16);
        let mut cache = HostKvCache::create("c", layout).unwrap();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        rng.fill(cache.bytes_mut());
        let server = HostMapping::open(cache.fd().try_clone_to_owned().unwrap(), &layout).unwrap();
        let src: Vec<_> = [3, 9, 1].iter().map(|&b| layout.block(b).unwrap()).collect();
        let dst: Vec<_> = [12, 0, 7].iter().map(|&b| layout.block(b).unwrap()).collect();
        let arena = Arena::host(1 << 20);
        let obj = arena.allocate(layout.chunk_object_bytes(3)).unwrap().unwrap();
        gather(&layout, &server, &src, &obj).unwrap();
        scatter(&layout, &obj, &server, &dst).unwrap();
        for layer in 0..3 {
            for plane in 0..2 {
                for (s, d) in [(3, 12), (9, 0), (1, 7)] {
                    let a = cache.block_mut(layer, plane, s).unwrap().to_vec();
                    let b = cache.block_mut(layer, plane, d).unwrap().to_vec();
                    assert_eq!(a, b, "layer {layer} plane {plane} block {s}->{d}");
                }
            }
        }
    }

    #[test]
    fn wrong_object_size_is_refused_before_copying() {
        let layout = KvLayout::mla(1, 4, 4, 8, Dtype::F32);
        let cache = HostKvCache::create("c", layout).unwrap();
        let arena = Arena::host(1 << 20);
        let obj = arena.allocate(8).unwrap().unwrap();
        let b = [layout.block(0).unwrap()];
        assert!(matches!(gather(&layout, &cache, &b, &obj), Err(CopyError::ObjectSize { .. })));
    }

    #[test]
    fn memory_smaller_than_the_placement_is_refused_before_copying() {
        let small = KvLayout::mla(1, 4, 4, 8, Dtype::F32);
        let cache = HostKvCache::create("c", small).unwrap();
        let big = small.at_offset(4);
        let arena = Arena::host(1 << 20);
        let obj = arena.allocate(big.chunk_object_bytes(1)).unwrap().unwrap();
        let b = [big.block(0).unwrap()];
        let e = gather(&big, &cache, &b, &obj).unwrap_err();
        assert!(matches!(e, CopyError::Layout(LayoutError::MemorySize { .. })), "{e}");
    }

    #[test]
    fn host_copies_merge_runs_contiguous_in_memory_and_object() {
        let layout = KvLayout::vllm(VllmLayout::Lbnhc, 2, 8, 4, 1, 4, Dtype::F16); // 64-byte blocks
        let blocks: Vec<_> = [2, 3, 4, 7].iter().map(|&b| layout.block(b).unwrap()).collect();
        let mut copies = Vec::new();
        for_each_copy(&layout, &blocks, |k, o, len| copies.push((k, o, len)));
        assert_eq!(copies, [(128, 0, 192), (448, 192, 64), (512 + 128, 256, 192), (512 + 448, 448, 64)]);
        // Every block of a one-layer-per-block layout: one copy.
        let all: Vec<_> = (0..8).map(|b| layout.block(b).unwrap()).collect();
        let mut n = 0;
        for_each_copy(&layout, &all, |_, _, len| {
            n += 1;
            assert_eq!(len, 1024);
        });
        assert_eq!(n, 1);
    }

    /// A valid layout of any kind: today's MHA, each vLLM order, MLA, at an
    /// offset.
    fn any_layout() -> impl Strategy<Value = KvLayout> {
        let dtype = prop_oneof![Just(Dtype::F16), Just(Dtype::Bf16), Just(Dtype::F32), Just(Dtype::Fp8)];
        let kind = 0..8usize;
        (kind, 1..4u32, 6..12u32, 1..4u32, 1..3u32, 1..5u32, dtype, 0..100u64).prop_map(
            |(kind, layers, blocks, tokens, heads, dim, dtype, offset)| {
                let l = match kind {
                    0 => KvLayout::mha(layers, blocks, tokens, heads, dim, dtype),
                    1 => KvLayout::mla(layers, blocks, tokens, heads * dim, dtype),
                    k => KvLayout::vllm(VllmLayout::ALL[k - 2], layers, blocks, tokens, heads, dim, dtype),
                };
                l.at_offset(offset)
            },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn gather_then_scatter_into_other_blocks_is_bit_exact_for_every_kind(
            layout in any_layout(),
            seed in any::<u64>(),
            per_chunk in 1..4usize,
        ) {
            layout.validate().unwrap();
            let mut cache = HostKvCache::create("p", layout).unwrap();
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            rng.fill(cache.bytes_mut());
            let before = cache.bytes_mut().to_vec();
            let mut ids: Vec<u32> = (0..layout.num_blocks).collect();
            for i in (1..ids.len()).rev() {
                ids.swap(i, rng.random_range(0..=i));
            }
            let src: Vec<_> = ids[..per_chunk].iter().map(|&b| layout.block(b).unwrap()).collect();
            let dst: Vec<_> = ids[per_chunk..2 * per_chunk].iter().map(|&b| layout.block(b).unwrap()).collect();
            let server = HostMapping::open(cache.fd().try_clone_to_owned().unwrap(), &layout).unwrap();
            let arena = Arena::host(1 << 20);
            let obj = arena.allocate(layout.chunk_object_bytes(per_chunk as u32)).unwrap().unwrap();
            gather(&layout, &server, &src, &obj).unwrap();
            scatter(&layout, &obj, &server, &dst).unwrap();
            // Expected: the old bytes with every run of each dst block
            // replaced by the same run of its src block.
            let mut want = before.clone();
            for layer in 0..layout.num_layers {
                for run in 0..layout.runs() {
                    for (s, d) in src.iter().zip(&dst) {
                        let (s, d) = (layout.offset(layer, run, *s) as usize, layout.offset(layer, run, *d) as usize);
                        let len = layout.run_bytes() as usize;
                        want[d..d + len].copy_from_slice(&before[s..s + len]);
                    }
                }
            }
            prop_assert!(cache.bytes_mut() == &want[..], "layout {:?}", layout);
        }
    }
}

//! Host copy engine: gather the paged blocks of one chunk (every layer, every
//! plane) into one contiguous L1 object, and scatter an object back.
//!
//! This module owns the only raw-pointer copies of the host data path. It
//! must never validate ids (a [`BlockId`] is already valid for its layout) nor
//! decide which object to copy.

use crate::arena::ObjectBytes;
use crate::host::KvMemory;
use crate::layout::{BlockId, KvLayout};

/// Why a copy was refused before touching memory.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CopyError {
    #[error("memory of {got} bytes is smaller than the layout's {need} bytes")]
    MemoryTooSmall { got: usize, need: u64 },
    #[error("object of {got} bytes does not match the chunk's {need} bytes")]
    ObjectSize { got: usize, need: u64 },
}

fn check(layout: &KvLayout, mem: &dyn KvMemory, blocks: &[BlockId], obj: &dyn ObjectBytes) -> Result<(), CopyError> {
    if (mem.len() as u64) < layout.total_bytes() {
        return Err(CopyError::MemoryTooSmall { got: mem.len(), need: layout.total_bytes() });
    }
    let need = layout.chunk_object_bytes(blocks.len() as u32);
    if obj.len() as u64 != need {
        return Err(CopyError::ObjectSize { got: obj.len(), need });
    }
    Ok(())
}

/// Calls `f(layer, offset_in_layer, object_offset, len)` for every block
/// plane of the chunk, in object order. Both backends copy along this walk,
/// so an object has the same bytes whichever backend stored it.
pub(crate) fn for_each_block_plane(layout: &KvLayout, blocks: &[BlockId], mut f: impl FnMut(u32, u64, u64, u64)) {
    let bpc = blocks.len() as u32;
    let len = layout.block_bytes();
    for layer in 0..layout.num_layers {
        for plane in 0..layout.planes() {
            for (i, &b) in blocks.iter().enumerate() {
                f(layer, layout.offset_in_layer(plane, b), layout.object_offset(bpc, layer, plane, i as u32), len);
            }
        }
    }
}

/// Calls `f(kv_offset, object_offset, len)` for every block plane of the
/// chunk in one contiguous region holding every layer.
fn for_each_block(layout: &KvLayout, blocks: &[BlockId], mut f: impl FnMut(usize, usize, usize)) {
    for_each_block_plane(layout, blocks, |layer, in_layer, obj, len| {
        let kv = layer as u64 * layout.layer_bytes() + in_layer;
        f(kv as usize, obj as usize, len as usize)
    });
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
    for_each_block(layout, blocks, |k, o, len| {
        // SAFETY: `check` proved mem holds the whole layout and obj the whole
        // chunk; every BlockId is < num_blocks, so k + len <= total_bytes and
        // o + len <= object size. The two regions never overlap (client memory
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
    for_each_block(layout, blocks, |k, o, len| {
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
    use crate::layout::Dtype;
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
}

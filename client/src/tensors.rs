//! A KV cache handed over as per-layer tensors (what an engine such as vLLM
//! holds), checked and turned into a [`KvLayout`] plus the memory behind it.
//! Language bindings read each tensor's facts (device, dtype, shape, strides,
//! address) and call these functions; every rule lives here.
//!
//! Each layer's view is one of
//! - today's `[2 (K, V), num_blocks, block_tokens, kv_heads, head_dim]`,
//! - vLLM's `[num_blocks, kv_heads, block_tokens, 2 * head_size]` (K and V
//!   concatenated on the last dimension), in any physical order
//!   (`kvcoord_memory::VllmLayout`), which its strides reveal,
//! - MLA's `[num_blocks, block_tokens, latent]`,
//!
//! the layers at one stride from each other, all inside one shared host
//! region (`kvcoord_memory::shared`), anywhere in it, or all in device
//! memory (CUDA tensors, e.g. from PyTorch's caching allocator). The
//! placement is read from each view's address, shape, strides and element
//! size, the same way for both: [`host_kv_cache`] checks all of it for CPU
//! tensors, [`kv_cache`] for either (CUDA memory is exported per layer by
//! `kvcoord_memory::cuda::export_layers`). This module must never touch the
//! memory.

use std::sync::Arc;

use kvcoord_memory::cuda::{self, CudaError};
use kvcoord_memory::{BlockShape, Dtype, KvLayout, MemoryHandle, Placement, RegionError, RegionRegistry, SharedRegion};
use kvcoord_transport::{ErrorKind, WireError};

/// What a binding knows about one per-layer tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TensorDesc {
    /// `cpu`, `cuda`, ... (torch's `device.type`).
    pub device: String,
    /// torch's name, e.g. `torch.bfloat16`.
    pub dtype: String,
    pub shape: Vec<i64>,
    /// In elements.
    pub strides: Vec<i64>,
    /// Address of the first element.
    pub data_ptr: u64,
}

/// The layout of checked KV tensors (layer 0 at offset 0: where it is in
/// the memory is [`shared_region_for`]'s business) and where layer 0 starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KvTensors {
    pub layout: KvLayout,
    /// Address of layer 0.
    pub start: u64,
}

/// The layout dtype of a torch dtype name: 16-bit floats keep their kind,
/// 1-byte types (int8, uint8, float8) are all copied as `Fp8` bytes.
pub fn dtype_from_torch(name: &str) -> Option<Dtype> {
    Some(match name.strip_prefix("torch.").unwrap_or(name) {
        "bfloat16" => Dtype::Bf16,
        "float16" | "half" => Dtype::F16,
        "float32" | "float" => Dtype::F32,
        "int8" | "uint8" | "float8_e4m3fn" | "float8_e5m2" => Dtype::Fp8,
        _ => return None,
    })
}

fn invalid(message: String) -> WireError {
    WireError::new(ErrorKind::InvalidArgument, message)
}

fn mismatch(message: String) -> WireError {
    WireError::new(ErrorKind::LayoutMismatch, message)
}

const SHAPES: &str = "[2, num_blocks, block_tokens, kv_heads, head_dim] (K and V planes), \
                      [num_blocks, kv_heads, block_tokens, 2 * head_size] (vLLM) or \
                      [num_blocks, block_tokens, latent] (MLA)";

fn too_large(what: &str) -> WireError {
    invalid(format!("kv_caches: {what} does not fit 64-bit byte arithmetic"))
}

/// `a * b` in bytes, or `InvalidArgument`.
fn bytes(a: u64, b: u64, what: &str) -> Result<u64, WireError> {
    a.checked_mul(b).ok_or_else(|| too_large(what))
}

/// The product of dimensions (each already < 2^32), or `InvalidArgument`.
fn prod(dims: &[u64]) -> Result<u64, WireError> {
    dims.iter().try_fold(1u64, |a, &d| a.checked_mul(d)).ok_or_else(|| too_large("a block"))
}

/// The semantic shape and the placement of one layer (layer offset and
/// stride still 0), from one view's shape and strides (in elements).
fn layer_placement(
    shape: &[u64],
    strides: &[u64],
    e: u64,
    block_tokens: u32,
) -> Result<(u32, BlockShape, Placement), WireError> {
    let not_contiguous = |inner: &str| {
        mismatch(format!(
            "kv_caches[0] is not contiguous within a block (shape {shape:?}, strides {strides:?}): {inner} must be \
             contiguous"
        ))
    };
    let dim =
        |k: usize| u32::try_from(shape[k]).map_err(|_| invalid(format!("dimension {k} of {shape:?} is too large")));
    // Do `n` cells of `cell` elements at stride `s` follow each other?
    let packed = |n: u64, s: u64, cell: u64| n == 1 || s == cell;
    for k in 0..shape.len() {
        dim(k)?;
    }
    let placement = |run_elems: u64, runs: u32, run_stride: u64, block_stride: u64| -> Result<Placement, WireError> {
        Ok(Placement {
            layer_offset: 0,
            layer_stride: 0,
            block_stride: bytes(block_stride, e, "the block stride")?,
            run_bytes: bytes(run_elems, e, "a run")?,
            runs_per_block: runs,
            run_stride: bytes(run_stride, e, "the run stride")?,
        })
    };
    let (tokens, shape_of, place) = match shape.len() {
        5 if shape[0] == 2 => {
            // [2, B, N, H, D]: a block of one plane [N, H, D] is one run.
            let (n, h, d) = (shape[2], shape[3], shape[4]);
            let run = prod(&[n, h, d])?;
            if strides[4] != 1 || !packed(h, strides[3], d) || !packed(n, strides[2], h * d) {
                return Err(not_contiguous("[block_tokens, kv_heads, head_dim] of a block"));
            }
            let shape_of = BlockShape::Mha { kv_heads: dim(3)?, head_dim: dim(4)? };
            (dim(2)?, shape_of, placement(run, 2, strides[0], strides[1])?)
        }
        4 => {
            // vLLM [B, H, N, C].
            let (h, n, c) = (shape[1], shape[2], shape[3]);
            let (sh, sn) = (strides[1], strides[2]);
            if c % 2 != 0 {
                return Err(mismatch(format!(
                    "kv_caches[0] has shape {shape:?}: the last dimension holds K and V (2 * head_size), so it must be even"
                )));
            }
            if strides[3] != 1 {
                return Err(not_contiguous("the last dimension (K|V)"));
            }
            let shape_of = BlockShape::Mha { kv_heads: dim(1)?, head_dim: dim(3)? / 2 };
            let block = prod(&[h, n, c])?;
            let place = if (packed(n, sn, c) && packed(h, sh, n * c)) || (packed(h, sh, c) && packed(n, sn, h * c)) {
                // [H, N, C] or [N, H, C]: the block is one run.
                placement(block, 1, block, strides[0])?
            } else if packed(n, sn, c) {
                // One run of [N, C] per head.
                placement(n * c, dim(1)?, sh, strides[0])?
            } else if packed(h, sh, c) {
                // One run of [H, C] per token.
                placement(h * c, dim(2)?, sn, strides[0])?
            } else {
                return Err(not_contiguous("either a head's tokens or a token's heads"));
            };
            (dim(2)?, shape_of, place)
        }
        3 => {
            // MLA [B, N, latent].
            let (n, latent) = (shape[1], shape[2]);
            if strides[2] != 1 || !packed(n, strides[1], latent) {
                return Err(not_contiguous("[block_tokens, latent] of a block"));
            }
            (dim(1)?, BlockShape::Mla { latent: dim(2)? }, placement(n * latent, 1, n * latent, strides[0])?)
        }
        _ => return Err(mismatch(format!("kv_caches[0] has shape {shape:?}; each layer must be {SHAPES}"))),
    };
    if tokens != block_tokens {
        return Err(mismatch(format!(
            "block_tokens={block_tokens} but the tensors hold {tokens} tokens per block (shape {shape:?}; each \
             layer is {SHAPES})"
        )));
    }
    Ok((tokens, shape_of, place))
}

/// Where the tensors are: all in host memory, or all on CUDA devices.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Residence {
    Cpu,
    Cuda,
}

/// The tensors' layout dtype and residence, if there are any, all on the
/// CPU or all on CUDA, all of one supported dtype.
fn devices_and_dtype(tensors: &[TensorDesc]) -> Result<(Dtype, Residence), WireError> {
    let first = tensors.first().ok_or_else(|| invalid("kv_caches is empty: pass one tensor per layer".into()))?;
    let mut dtype = None;
    let mut residence = None;
    for (i, t) in tensors.iter().enumerate() {
        let here = match t.device.as_str() {
            "cpu" => Residence::Cpu,
            "cuda" => Residence::Cuda,
            other => {
                return Err(invalid(format!(
                    "kv_caches[{i}] is on device `{other}`; only CPU and CUDA tensors are supported"
                )))
            }
        };
        if residence.is_some_and(|r| r != here) {
            return Err(invalid(format!(
                "kv_caches[{i}] is on {} but kv_caches[0] on {}: every layer must be on the same device",
                t.device, first.device
            )));
        }
        residence = Some(here);
        let d = dtype_from_torch(&t.dtype).ok_or_else(|| {
            invalid(format!(
                "kv_caches[{i}] has dtype {}; supported: bfloat16, float16, float32, int8, uint8, float8",
                t.dtype
            ))
        })?;
        if t.dtype != first.dtype {
            return Err(mismatch(format!("kv_caches[{i}] has dtype {} but kv_caches[0] has {}", t.dtype, first.dtype)));
        }
        dtype = Some(d);
    }
    Ok((dtype.expect("at least one tensor"), residence.expect("at least one tensor")))
}

fn not_shared(i: usize) -> WireError {
    invalid(format!(
        "kv_caches[{i}] is not in a kvcoord.shared_tensor: the coordinator can only map memory it is given; \
         allocate the KV cache with kvcoord.shared_tensor(shape, dtype)"
    ))
}

/// Checks per-layer KV tensors (in layer order) and `block_tokens` and reads
/// their layout; `InvalidArgument` for what the coordinator cannot take at
/// all, `LayoutMismatch` for tensors that do not form one layout.
pub fn layout_from_tensors(tensors: &[TensorDesc], block_tokens: u32) -> Result<KvTensors, WireError> {
    let (dtype, _) = devices_and_dtype(tensors)?;
    let first = &tensors[0];
    if block_tokens == 0 {
        return Err(invalid("block_tokens must be positive".into()));
    }
    for (i, t) in tensors.iter().enumerate() {
        if t.shape.iter().any(|&d| d <= 0) || t.strides.len() != t.shape.len() || t.strides.iter().any(|&s| s < 0) {
            return Err(mismatch(format!(
                "kv_caches[{i}] has shape {:?} and strides {:?}; each layer must be {SHAPES}, with positive sizes \
                 and no negative strides",
                t.shape, t.strides
            )));
        }
        if t.shape != first.shape {
            return Err(mismatch(format!(
                "kv_caches[{i}] has shape {:?} but kv_caches[0] has {:?}; every layer must have the same shape",
                t.shape, first.shape
            )));
        }
        if t.strides != first.strides {
            return Err(mismatch(format!(
                "kv_caches[{i}] has strides {:?} but kv_caches[0] has {:?}; every layer must be laid out alike",
                t.strides, first.strides
            )));
        }
    }
    let shape: Vec<u64> = first.shape.iter().map(|&d| d as u64).collect();
    let strides: Vec<u64> = first.strides.iter().map(|&s| s as u64).collect();
    let (_, shape_of, mut placement) = layer_placement(&shape, &strides, dtype.size(), block_tokens)?;
    let num_layers = u32::try_from(tensors.len()).map_err(|_| invalid("too many layers".into()))?;
    let blocks_dim = if shape.len() == 5 { 1 } else { 0 };
    let num_blocks =
        u32::try_from(shape[blocks_dim]).map_err(|_| invalid(format!("{} blocks are too many", first.shape[0])))?;
    let mut layout = KvLayout { num_layers, num_blocks, block_tokens, shape: shape_of, dtype, placement };
    // One layer alone: check it, and let its stride be its extent.
    let one = KvLayout { num_layers: 1, ..layout };
    one.validate().map_err(|e| invalid(format!("KV cache layout: {e}")))?;
    placement.layer_stride = one.layer_extent();
    if tensors.len() > 1 {
        let stride = tensors[1].data_ptr.saturating_sub(first.data_ptr);
        let at = |i: usize| (i as u64).checked_mul(stride).and_then(|o| o.checked_add(first.data_ptr));
        let bad = if stride == 0 { Some(1) } else { (2..tensors.len()).find(|&i| at(i) != Some(tensors[i].data_ptr)) };
        if let Some(i) = bad {
            return Err(mismatch(format!(
                "kv_caches[{i}] starts {} bytes from kv_caches[0], expected {}: the layers must lie one after \
                 another, in layer order and at one stride, in one kvcoord.shared_tensor (e.g. vLLM's per-layer \
                 views of its KV buffer, or the views buf[i] of a [layers, 2, num_blocks, block_tokens, kv_heads, \
                 head_dim] tensor)",
                tensors[i].data_ptr as i128 - first.data_ptr as i128,
                i as u128 * stride as u128
            )));
        }
        placement.layer_stride = stride;
    }
    layout.placement = placement;
    layout.validate().map_err(|e| invalid(format!("KV cache layout: {e}")))?;
    Ok(KvTensors { layout, start: first.data_ptr })
}

/// The shared region behind checked tensors and the layout placed in it:
/// each layer must be in a shared region (`InvalidArgument` naming
/// `kvcoord.shared_tensor` otherwise), all in the same one, and the whole
/// placement inside it (`InvalidArgument` otherwise). The layers may start
/// anywhere in the region: layer 0's offset becomes the layout's.
pub fn shared_region_for(
    tensors: &[TensorDesc],
    kv: &KvTensors,
    registry: &RegionRegistry,
) -> Result<(KvLayout, Arc<SharedRegion>), WireError> {
    let extent = kv.layout.layer_extent();
    let mut regions = Vec::with_capacity(tensors.len());
    for (i, t) in tensors.iter().enumerate() {
        match registry.resolve(t.data_ptr, extent) {
            Ok(r) => regions.push(r),
            Err(RegionError::NotShared { .. }) => return Err(not_shared(i)),
            Err(e) => {
                return Err(invalid(format!(
                    "kv_caches[{i}]: its {extent} bytes do not fit its kvcoord.shared_tensor: {e}"
                )))
            }
        }
    }
    let (region, offset) = regions[0].clone();
    if let Some(i) = regions.iter().position(|(r, _)| !Arc::ptr_eq(r, &region)) {
        return Err(mismatch(format!(
            "kv_caches[{i}] is in another kvcoord.shared_tensor than kv_caches[0]: every layer must be in the same one"
        )));
    }
    let layout = kv.layout.at_offset(offset);
    layout.fits_in(region.len()).map_err(|e| {
        invalid(format!(
            "kv_caches: the KV cache layout does not fit its kvcoord.shared_tensor of {} bytes: {e}",
            region.len()
        ))
    })?;
    Ok((layout, region))
}

/// Both steps: the layout of per-layer CPU tensors, placed in the shared
/// region they are in, and that region (CUDA tensors: [`kv_cache`]).
pub fn host_kv_cache(
    tensors: &[TensorDesc],
    block_tokens: u32,
    registry: &RegionRegistry,
) -> Result<(KvLayout, Arc<SharedRegion>), WireError> {
    // Memory the coordinator cannot map at all is named before its geometry.
    if devices_and_dtype(tensors)?.1 == Residence::Cuda {
        return Err(invalid("kv_caches are CUDA tensors: register them with kv_cache, not host_kv_cache".into()));
    }
    for (i, t) in tensors.iter().enumerate() {
        if let Err(RegionError::NotShared { .. }) = registry.resolve(t.data_ptr, 1) {
            return Err(not_shared(i));
        }
    }
    let kv = layout_from_tensors(tensors, block_tokens)?;
    shared_region_for(tensors, &kv, registry)
}

/// The memory behind a checked KV cache: what a register request carries.
#[derive(Clone, Debug)]
pub enum KvCacheMemory {
    /// CPU tensors: the shared region (its memfd goes with the request).
    Host(Arc<SharedRegion>),
    /// CUDA tensors: each layer's allocation exported by IPC.
    Cuda(MemoryHandle),
}

impl KvCacheMemory {
    /// The register request's memory handle.
    pub fn handle(&self) -> MemoryHandle {
        match self {
            KvCacheMemory::Host(r) => MemoryHandle::HostFd { size: r.len() },
            KvCacheMemory::Cuda(h) => h.clone(),
        }
    }
}

/// Why CUDA tensors were refused by the driver side, as a wire error.
fn cuda_refused(e: CudaError) -> WireError {
    match e {
        CudaError::NoDriver => invalid(
            "kv_caches are CUDA tensors but no CUDA driver (libcuda) can be loaded in this process: \
             CUDA tensors need the NVIDIA driver"
                .into(),
        ),
        e => invalid(format!("kv_caches: CUDA tensors cannot be registered: {e}")),
    }
}

/// The layout of per-layer tensors and the memory behind them: CPU tensors
/// as [`host_kv_cache`]; CUDA tensors with the same shapes and placement
/// rules (layer 0's layout offset stays 0: on CUDA each layer's base is its
/// own IPC handle + offset), exported per layer with
/// `kvcoord_memory::cuda::export_layers`. Without a CUDA driver, CUDA
/// tensors are `InvalidArgument` (checked before any other CUDA call), and
/// so is memory legacy IPC cannot export (expandable segments, cumem).
pub fn kv_cache(
    tensors: &[TensorDesc],
    block_tokens: u32,
    registry: &RegionRegistry,
) -> Result<(KvLayout, KvCacheMemory), WireError> {
    if devices_and_dtype(tensors)?.1 == Residence::Cpu {
        let (layout, region) = host_kv_cache(tensors, block_tokens, registry)?;
        return Ok((layout, KvCacheMemory::Host(region)));
    }
    if !cuda::driver_present() {
        return Err(cuda_refused(CudaError::NoDriver));
    }
    let kv = layout_from_tensors(tensors, block_tokens)?;
    let ptrs: Vec<u64> = tensors.iter().map(|t| t.data_ptr).collect();
    let handle = cuda::export_layers(&ptrs, kv.layout.layer_extent()).map_err(cuda_refused)?;
    Ok((kv.layout, KvCacheMemory::Cuda(handle)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvcoord_memory::VllmLayout;

    const SHAPE: [i64; 5] = [2, 8, 16, 2, 4];
    const LAYER: u64 = 2 * 8 * 16 * 2 * 4 * 2; // bf16

    fn contiguous_strides(shape: &[i64]) -> Vec<i64> {
        let mut strides = vec![1i64; shape.len()];
        for k in (0..shape.len().saturating_sub(1)).rev() {
            strides[k] = strides[k + 1] * shape[k + 1];
        }
        strides
    }

    fn layers(n: usize, base: u64) -> Vec<TensorDesc> {
        (0..n)
            .map(|i| TensorDesc {
                device: "cpu".into(),
                dtype: "torch.bfloat16".into(),
                shape: SHAPE.to_vec(),
                strides: contiguous_strides(&SHAPE),
                data_ptr: base + i as u64 * LAYER,
            })
            .collect()
    }

    /// vLLM's per-layer views `[B, H, N, C]` of one buffer whose physical
    /// order is `order` (a permutation of "LBHNC"), as torch reports them.
    fn vllm_views(order: &str, dims: [i64; 5], base: u64, dtype: &str, elem: u64) -> Vec<TensorDesc> {
        let phys: Vec<i64> = order.chars().map(|ch| dims["LBHNC".find(ch).unwrap()]).collect();
        let phys_strides = contiguous_strides(&phys);
        let stride_of = |ch| phys_strides[order.find(ch).unwrap()];
        (0..dims[0])
            .map(|l| TensorDesc {
                device: "cpu".into(),
                dtype: dtype.into(),
                shape: vec![dims[1], dims[2], dims[3], dims[4]],
                strides: vec![stride_of('B'), stride_of('H'), stride_of('N'), stride_of('C')],
                data_ptr: base + (l * stride_of('L')) as u64 * elem,
            })
            .collect()
    }

    fn kind(r: Result<KvTensors, WireError>) -> (ErrorKind, String) {
        let e = r.unwrap_err();
        (e.kind, e.message)
    }

    #[test]
    fn consecutive_layers_make_an_mha_layout() {
        let kv = layout_from_tensors(&layers(3, 0x10000), 16).unwrap();
        assert_eq!(kv.layout, KvLayout::mha(3, 8, 16, 2, 4, Dtype::Bf16));
        assert_eq!(kv.start, 0x10000);
        assert_eq!(kv.layout.total_bytes(), 3 * LAYER);
        let one = layout_from_tensors(&layers(1, 0x10000), 16).unwrap();
        assert_eq!(one.layout, KvLayout::mha(1, 8, 16, 2, 4, Dtype::Bf16));
    }

    #[test]
    fn vllm_views_in_every_order_make_that_orders_layout() {
        // 3 layers, 6 blocks, 2 heads, 16 tokens, head size 4 (C = 8).
        let dims = [3, 6, 2, 16, 8];
        for (order, name) in [
            (VllmLayout::Lbhnc, "LBHNC"),
            (VllmLayout::Lbnhc, "LBNHC"),
            (VllmLayout::Lhbnc, "LHBNC"),
            (VllmLayout::Blhnc, "BLHNC"),
            (VllmLayout::Blnhc, "BLNHC"),
            (VllmLayout::Bhlnc, "BHLNC"),
        ] {
            for (dtype, d, e) in [("torch.bfloat16", Dtype::Bf16, 2), ("torch.int8", Dtype::Fp8, 1)] {
                let kv = layout_from_tensors(&vllm_views(name, dims, 0x4000, dtype, e), 16).unwrap();
                assert_eq!(kv.layout, KvLayout::vllm(order, 3, 6, 16, 2, 4, d), "{name} {dtype}");
                assert_eq!(kv.start, 0x4000);
            }
        }
    }

    #[test]
    fn mla_views_make_an_mla_layout() {
        let shape = [8i64, 16, 576];
        let t: Vec<_> = (0..2)
            .map(|l| TensorDesc {
                device: "cpu".into(),
                dtype: "torch.bfloat16".into(),
                shape: shape.to_vec(),
                strides: contiguous_strides(&shape),
                data_ptr: 0x1000 + l * 8 * 16 * 576 * 2,
            })
            .collect();
        assert_eq!(layout_from_tensors(&t, 16).unwrap().layout, KvLayout::mla(2, 8, 16, 576, Dtype::Bf16));
    }

    #[test]
    fn dtypes_map_to_the_layout_dtype() {
        assert_eq!(dtype_from_torch("torch.float16"), Some(Dtype::F16));
        assert_eq!(dtype_from_torch("torch.float32"), Some(Dtype::F32));
        assert_eq!(dtype_from_torch("torch.uint8"), Some(Dtype::Fp8));
        assert_eq!(dtype_from_torch("torch.int8"), Some(Dtype::Fp8));
        assert_eq!(dtype_from_torch("torch.float64"), None);
        let mut t = layers(2, 0);
        t.iter_mut().for_each(|t| t.dtype = "torch.float64".into());
        let (k, m) = kind(layout_from_tensors(&t, 16));
        assert_eq!(k, ErrorKind::InvalidArgument);
        assert!(m.contains("float64"), "{m}");
    }

    #[test]
    fn each_bad_input_is_named() {
        type Break = Box<dyn Fn(&mut Vec<TensorDesc>)>;
        let cases: Vec<(Break, ErrorKind, &str)> = vec![
            (Box::new(|t| t.clear()), ErrorKind::InvalidArgument, "empty"),
            (Box::new(|t| t[1].device = "cuda".into()), ErrorKind::InvalidArgument, "same device"),
            (Box::new(|t| t[1].device = "mps".into()), ErrorKind::InvalidArgument, "only CPU and CUDA"),
            (Box::new(|t| t[1].dtype = "torch.float16".into()), ErrorKind::LayoutMismatch, "dtype"),
            (
                Box::new(|t| t.iter_mut().for_each(|t| (t.shape, t.strides) = (vec![8, 256], vec![256, 1]))),
                ErrorKind::LayoutMismatch,
                "each layer must be [2, num_blocks",
            ),
            (Box::new(|t| t[1].shape[3] = 1), ErrorKind::LayoutMismatch, "same shape"),
            (Box::new(|t| t[1].strides[1] += 1), ErrorKind::LayoutMismatch, "laid out alike"),
            (
                Box::new(|t| t.iter_mut().for_each(|t| t.strides.swap(3, 4))),
                ErrorKind::LayoutMismatch,
                "not contiguous",
            ),
            (Box::new(|t| t[1].strides[0] = -1), ErrorKind::LayoutMismatch, "negative"),
            (Box::new(|t| t[1].data_ptr = t[0].data_ptr), ErrorKind::LayoutMismatch, "one after"),
            (Box::new(|t| t[1].data_ptr = t[0].data_ptr - 1), ErrorKind::LayoutMismatch, "one after"),
            (Box::new(|t| t[2].data_ptr += 2), ErrorKind::LayoutMismatch, "one after"),
            // Layers closer than a layer's bytes: the placement overlaps itself.
            (
                Box::new(|t| t.iter_mut().enumerate().for_each(|(i, t)| t.data_ptr = 0x1000 + i as u64 * 64)),
                ErrorKind::InvalidArgument,
                "overlaps",
            ),
        ];
        for (break_it, want, text) in cases {
            let mut t = layers(3, 0x1000);
            break_it(&mut t);
            let (k, m) = kind(layout_from_tensors(&t, 16));
            assert_eq!(k, want, "{m}");
            assert!(m.contains(text), "{m:?} lacks {text:?}");
        }
        let (k, m) = kind(layout_from_tensors(&layers(2, 0), 32));
        assert_eq!(k, ErrorKind::LayoutMismatch);
        assert!(m.contains("block_tokens=32"), "{m}");
        // Odd K|V width, and a huge dimension: refused, no overflow.
        let mut odd = vllm_views("LBNHC", [2, 4, 2, 16, 8], 0x1000, "torch.int8", 1);
        odd.iter_mut().for_each(|t| t.shape[3] = 7);
        assert_eq!(kind(layout_from_tensors(&odd, 16)).0, ErrorKind::LayoutMismatch);
        let mut huge = layers(2, 0x1000);
        huge.iter_mut().for_each(|t| t.strides[0] = i64::MAX);
        assert_eq!(kind(layout_from_tensors(&huge, 16)).0, ErrorKind::InvalidArgument);
    }

    #[test]
    fn the_layers_must_lie_in_one_shared_region_which_must_hold_the_whole_placement() {
        let registry = RegionRegistry::new();
        let check = |t: &[TensorDesc]| host_kv_cache(t, 16, &registry).map(|(l, r)| (l, r.len()));
        let e = check(&layers(2, 0x10000)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert!(e.message.contains("kv_caches[0] is not in a kvcoord.shared_tensor"), "{}", e.message);

        let (id, _) = registry.insert(SharedRegion::create("t", 3 * LAYER).unwrap());
        registry.bind(id, 0x10000).unwrap();
        let (l, len) = check(&layers(3, 0x10000)).unwrap();
        assert_eq!((l, len), (KvLayout::mha(3, 8, 16, 2, 4, Dtype::Bf16), 3 * LAYER));
        // A part of the region, starting inside it: the offset is the layout's.
        let (l, _) = check(&layers(2, 0x10000 + LAYER)).unwrap();
        assert_eq!(l, KvLayout::mha(2, 8, 16, 2, 4, Dtype::Bf16).at_offset(LAYER));
        // Every other layer.
        let mut gap = layers(2, 0x10000);
        gap[1].data_ptr += LAYER;
        assert_eq!(check(&gap).unwrap().0.placement.layer_stride, 2 * LAYER);
        let mut private = layers(3, 0x10000);
        private[2].data_ptr = 0x90000;
        let e = check(&private).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert!(e.message.contains("kv_caches[2] is not in a kvcoord.shared_tensor"), "{}", e.message);
        let e = check(&layers(4, 0x10000)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument, "a layer past the end: {}", e.message);
        assert!(e.message.contains("kv_caches[3] is not in"), "{}", e.message);
        let e = check(&layers(3, 0x10000 + 2)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument, "runs past the end: {}", e.message);
        assert!(e.message.contains("kv_caches[2]"), "{}", e.message);
        // A view whose blocks stride past the region.
        let mut wide = layers(1, 0x10000);
        wide[0].strides[1] *= 3;
        let e = check(&wide).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument, "{}", e.message);
        // Layers in two regions.
        let (other, _) = registry.insert(SharedRegion::create("u", LAYER).unwrap());
        registry.bind(other, 0x10000 + 3 * LAYER).unwrap();
        let e = check(&layers(4, 0x10000)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::LayoutMismatch, "{}", e.message);
        assert!(e.message.contains("same one"), "{}", e.message);
        // vLLM views of one int8 buffer starting inside a region.
        let (id, _) = registry.insert(SharedRegion::create("v", 4096 + 3 * 6 * 2 * 16 * 8).unwrap());
        registry.bind(id, 0x100000).unwrap();
        let (l, _) = check(&vllm_views("BLNHC", [3, 6, 2, 16, 8], 0x100000 + 4096, "torch.int8", 1)).unwrap();
        assert_eq!(l, KvLayout::vllm(VllmLayout::Blnhc, 3, 6, 16, 2, 4, Dtype::Fp8).at_offset(4096));
    }

    #[test]
    fn cuda_tensors_without_a_driver_are_refused_by_name() {
        let e = cuda_refused(CudaError::NoDriver);
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert!(e.message.contains("no CUDA driver (libcuda)"), "{}", e.message);
        let vmm = cuda_refused(CudaError::Invalid(format!("layer 0: {}", cuda::VMM_NOT_EXPORTABLE)));
        assert_eq!(vmm.kind, ErrorKind::InvalidArgument);
        assert!(vmm.message.contains("expandable_segments:True"), "{}", vmm.message);
        let registry = RegionRegistry::new();
        let mut t = vllm_views("LBNHC", [2, 6, 2, 16, 8], 0x7000_0000, "torch.bfloat16", 2);
        t.iter_mut().for_each(|t| t.device = "cuda".into());
        // host_kv_cache never takes CUDA tensors.
        let e = host_kv_cache(&t, 16, &registry).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert!(e.message.contains("CUDA tensors"), "{}", e.message);
        let e = kv_cache(&t, 16, &registry).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument, "{}", e.message);
        if !cuda::driver_present() {
            // CI: the path a CUDA tensor takes on a machine without libcuda.
            assert!(e.message.contains("no CUDA driver (libcuda)"), "{}", e.message);
        } else {
            // With a driver (with or without a GPU), these host addresses
            // are not exportable device memory.
            assert!(e.message.contains("CUDA tensors cannot be registered"), "{}", e.message);
        }
    }
}

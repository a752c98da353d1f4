//! A KV cache handed over as per-layer tensors (what an engine such as vLLM
//! holds), checked and turned into a [`KvLayout`] plus the memory behind it.
//! Language bindings read each tensor's facts (device, dtype, shape, strides,
//! address) and call these functions; every rule lives here.
//!
//! Today's layout only: per layer `[2 (K, V), num_blocks, block_tokens,
//! kv_heads, head_dim]`, contiguous, the layers one after another in one
//! shared host region (`kvcoord_memory::shared`) that they cover whole:
//! [`host_kv_cache`] checks all of it. This module must never touch the memory.

use std::sync::Arc;

use kvcoord_memory::{Dtype, KvLayout, RegionError, RegionRegistry, SharedRegion};
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

/// The layout of a checked KV cache and where its bytes are.
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

const SHAPE: &str = "[2, num_blocks, block_tokens, kv_heads, head_dim]";

/// Checks per-layer KV tensors (in layer order) against today's layout and
/// `block_tokens`; `InvalidArgument` for what the coordinator cannot take at
/// all, `LayoutMismatch` for tensors that do not form one layout.
pub fn mha_layout_from_tensors(tensors: &[TensorDesc], block_tokens: u32) -> Result<KvTensors, WireError> {
    let first = tensors.first().ok_or_else(|| invalid("kv_caches is empty: pass one tensor per layer".into()))?;
    if block_tokens == 0 {
        return Err(invalid("block_tokens must be positive".into()));
    }
    let mut dtype = None;
    for (i, t) in tensors.iter().enumerate() {
        match t.device.as_str() {
            "cpu" => {}
            "cuda" => {
                return Err(invalid(format!(
                    "kv_caches[{i}] is on CUDA: CUDA tensors: not in this release (use CPU tensors from kvcoord.shared_tensor)"
                )))
            }
            other => return Err(invalid(format!("kv_caches[{i}] is on device `{other}`; only CPU tensors are supported"))),
        }
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
        if t.shape.len() != 5 || t.shape[0] != 2 || t.shape.iter().any(|&d| d <= 0) {
            return Err(mismatch(format!("kv_caches[{i}] has shape {:?}; each layer must be {SHAPE}", t.shape)));
        }
        if t.shape != first.shape {
            return Err(mismatch(format!(
                "kv_caches[{i}] has shape {:?} but kv_caches[0] has {:?}; every layer must have the same shape",
                t.shape, first.shape
            )));
        }
        if t.strides != contiguous_strides(&t.shape) {
            return Err(mismatch(format!(
                "kv_caches[{i}] is not contiguous (strides {:?}, expected {:?})",
                t.strides,
                contiguous_strides(&t.shape)
            )));
        }
    }
    let dim = |k: usize| {
        u32::try_from(first.shape[k]).map_err(|_| invalid(format!("dimension {k} of {:?} is too large", first.shape)))
    };
    let (num_blocks, tokens, heads, head_dim) = (dim(1)?, dim(2)?, dim(3)?, dim(4)?);
    if tokens != block_tokens {
        return Err(mismatch(format!(
            "block_tokens={block_tokens} but the tensors hold {tokens} tokens per block (dimension 2 of {SHAPE})"
        )));
    }
    let num_layers = u32::try_from(tensors.len()).map_err(|_| invalid("too many layers".into()))?;
    let dtype = dtype.expect("at least one tensor");
    let layout = KvLayout::mha(num_layers, num_blocks, block_tokens, heads, head_dim, dtype);
    layout.validate().map_err(|e| invalid(format!("KV cache layout: {e}")))?;
    Ok(KvTensors { layout, start: first.data_ptr })
}

fn contiguous_strides(shape: &[i64]) -> Vec<i64> {
    let mut strides = vec![1i64; shape.len()];
    for k in (0..shape.len().saturating_sub(1)).rev() {
        strides[k] = strides[k + 1].saturating_mul(shape[k + 1]);
    }
    strides
}

/// The shared region behind checked tensors: each layer must be in a shared
/// region (`InvalidArgument` naming `kvcoord.shared_tensor` otherwise), the
/// layers one after another, covering the region whole (a registration
/// sends a whole memfd).
pub fn shared_region_for(
    tensors: &[TensorDesc],
    kv: &KvTensors,
    registry: &RegionRegistry,
) -> Result<Arc<SharedRegion>, WireError> {
    let layer_bytes = kv.layout.layer_bytes();
    for (i, t) in tensors.iter().enumerate() {
        if let Err(RegionError::NotShared { .. }) = registry.resolve(t.data_ptr, layer_bytes) {
            return Err(invalid(format!(
                "kv_caches[{i}] is not in a kvcoord.shared_tensor: the coordinator can only map memory it is \
                 given; allocate the KV cache with kvcoord.shared_tensor(shape, dtype)"
            )));
        }
    }
    let first = &tensors[0];
    for (i, t) in tensors.iter().enumerate() {
        let expected = first.data_ptr + i as u64 * layer_bytes;
        if t.data_ptr != expected {
            return Err(mismatch(format!(
                "kv_caches[{i}] starts {} bytes from kv_caches[0], expected {}: the layers must lie one after \
                 another in one kvcoord.shared_tensor (e.g. the views buf[i] of a \
                 [layers, 2, num_blocks, block_tokens, kv_heads, head_dim] tensor)",
                t.data_ptr as i128 - first.data_ptr as i128,
                i as u64 * layer_bytes
            )));
        }
    }
    let bytes = kv.layout.total_bytes();
    let (region, offset) =
        registry.resolve(kv.start, bytes).map_err(|e| mismatch(format!("kv_caches: {e} (a kvcoord.shared_tensor)")))?;
    if offset != 0 || bytes != region.len() {
        return Err(mismatch(format!(
            "kv_caches cover {bytes} bytes at offset {offset} of a kvcoord.shared_tensor of {} bytes; \
             they must cover the whole shared tensor",
            region.len()
        )));
    }
    Ok(region)
}

/// Both steps: the layout of per-layer tensors and the shared region they fill.
pub fn host_kv_cache(
    tensors: &[TensorDesc],
    block_tokens: u32,
    registry: &RegionRegistry,
) -> Result<(KvLayout, Arc<SharedRegion>), WireError> {
    let kv = mha_layout_from_tensors(tensors, block_tokens)?;
    Ok((kv.layout, shared_region_for(tensors, &kv, registry)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHAPE: [i64; 5] = [2, 8, 16, 2, 4];
    const LAYER: u64 = 2 * 8 * 16 * 2 * 4 * 2; // bf16

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

    fn kind(r: Result<KvTensors, WireError>) -> (ErrorKind, String) {
        let e = r.unwrap_err();
        (e.kind, e.message)
    }

    #[test]
    fn consecutive_layers_make_an_mha_layout() {
        let kv = mha_layout_from_tensors(&layers(3, 0x10000), 16).unwrap();
        assert_eq!(kv.layout, KvLayout::mha(3, 8, 16, 2, 4, Dtype::Bf16));
        assert_eq!(kv.start, 0x10000);
        assert_eq!(kv.layout.layer_bytes(), LAYER);
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
        let (k, m) = kind(mha_layout_from_tensors(&t, 16));
        assert_eq!(k, ErrorKind::InvalidArgument);
        assert!(m.contains("float64"), "{m}");
    }

    #[test]
    fn each_bad_input_is_named() {
        type Break = Box<dyn Fn(&mut Vec<TensorDesc>)>;
        let cases: Vec<(Break, ErrorKind, &str)> = vec![
            (Box::new(|t| t.clear()), ErrorKind::InvalidArgument, "empty"),
            (
                Box::new(|t| t[1].device = "cuda".into()),
                ErrorKind::InvalidArgument,
                "CUDA tensors: not in this release",
            ),
            (Box::new(|t| t[1].dtype = "torch.float16".into()), ErrorKind::LayoutMismatch, "dtype"),
            (Box::new(|t| t[0].shape = vec![8, 16, 2, 4]), ErrorKind::LayoutMismatch, "each layer must be"),
            (Box::new(|t| t[1].shape[3] = 1), ErrorKind::LayoutMismatch, "same shape"),
            (Box::new(|t| t[1].strides.swap(3, 4)), ErrorKind::LayoutMismatch, "not contiguous"),
        ];
        for (break_it, want, text) in cases {
            let mut t = layers(2, 0x1000);
            break_it(&mut t);
            let (k, m) = kind(mha_layout_from_tensors(&t, 16));
            assert_eq!(k, want, "{m}");
            assert!(m.contains(text), "{m:?} lacks {text:?}");
        }
        let (k, m) = kind(mha_layout_from_tensors(&layers(2, 0), 32));
        assert_eq!(k, ErrorKind::LayoutMismatch);
        assert!(m.contains("block_tokens=32"), "{m}");
    }

    #[test]
    fn the_tensors_must_be_consecutive_layers_covering_one_whole_shared_region() {
        let registry = RegionRegistry::new();
        let check = |t: &[TensorDesc]| host_kv_cache(t, 16, &registry).map(|(l, r)| (l.num_layers, r.len()));
        let e = check(&layers(2, 0x10000)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert!(e.message.contains("kv_caches[0] is not in a kvcoord.shared_tensor"), "{}", e.message);

        let (id, _) = registry.insert(SharedRegion::create("t", 3 * LAYER).unwrap());
        registry.bind(id, 0x10000).unwrap();
        assert_eq!(check(&layers(3, 0x10000)).unwrap(), (3, 3 * LAYER));
        let e = check(&layers(2, 0x10000)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::LayoutMismatch, "a part: {}", e.message);
        assert!(e.message.contains("whole shared tensor"), "{}", e.message);
        let mut gap = layers(2, 0x10000);
        gap[1].data_ptr += LAYER;
        let e = check(&gap).unwrap_err();
        assert_eq!(e.kind, ErrorKind::LayoutMismatch);
        assert!(e.message.contains("one after"), "{}", e.message);
        let mut private = layers(3, 0x10000);
        private[2].data_ptr = 0x90000;
        let e = check(&private).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument);
        assert!(e.message.contains("kv_caches[2] is not in a kvcoord.shared_tensor"), "{}", e.message);
        let e = check(&layers(4, 0x10000)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::InvalidArgument, "a layer past the end: {}", e.message);
        assert!(e.message.contains("kv_caches[3] is not in"), "{}", e.message);
    }
}

//! The keys every tier and actor names a chunk object by: the interned
//! (namespace, model, world size) and the (model, rank, chunk hash) of one
//! object. The tenant's namespace is part of every key through the
//! [`ModelId`]: two tenants with different namespaces never share (or read)
//! an object, even for the same model name and chunk hashes.
//!
//! This module owns only these plain values; it must never hold state or
//! import another server module, so any module may import it.

use std::borrow::Cow;

use kvcoord_transport::ChunkHash;

/// Interned (namespace, model name, world size): chunks are shared by every
/// instance of the same model and TP degree in one namespace. The L1 store
/// hands them out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelId(pub u32);

/// The key of one chunk object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ObjectKey {
    pub model: ModelId,
    pub rank: u32,
    pub hash: ChunkHash,
}

/// What names a chunk object beyond this process: the model's name and
/// world size, and the fingerprint of its chunk objects' byte format. A tier
/// shared by several coordinators (the remote tier) keys objects by it with
/// the rank and chunk hash (`remote_format::object_key`), so different
/// models, TP degrees or layouts never collide.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ObjectNamespace {
    pub model: std::sync::Arc<str>,
    pub world_size: u32,
    pub layout: LayoutFingerprint,
}

/// The fingerprint of a chunk object's byte format: what decides the bytes
/// of `[layer][run][block-in-chunk]` (layers, tokens per block and per
/// chunk, what a token holds, dtype, the normalized runs of a block), never
/// where the memory lies (block count, strides, offsets).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LayoutFingerprint(pub [u8; 16]);

impl LayoutFingerprint {
    pub fn of(layout: &kvcoord_memory::KvLayout, chunk_tokens: u32) -> Self {
        let l = layout.normalized();
        let mut h = blake3::Hasher::new();
        h.update(b"kvcoord chunk object format 1");
        for v in [l.num_layers, l.block_tokens, chunk_tokens, l.placement.runs_per_block] {
            h.update(&v.to_le_bytes());
        }
        h.update(&l.placement.run_bytes.to_le_bytes());
        h.update(format!("{:?}|{:?}", l.shape, l.dtype).as_bytes());
        let mut out = [0u8; 16];
        out.copy_from_slice(&h.finalize().as_bytes()[..16]);
        LayoutFingerprint(out)
    }
}

/// The namespace of the default tenant: its models keep their plain names
/// (so a disk tier written before tenancy is read back as its own).
pub const DEFAULT_NAMESPACE: &str = "default";

/// The name a model is interned (and written to a lower tier) under in
/// `namespace`: the plain name in the default namespace, else
/// `namespace NUL model`. Model names never contain NUL (refused at
/// register and lookup), so no name of one namespace can be another's.
pub fn qualified_model<'a>(namespace: &str, model: &'a str) -> Cow<'a, str> {
    if namespace == DEFAULT_NAMESPACE {
        Cow::Borrowed(model)
    } else {
        Cow::Owned(format!("{namespace}\0{model}"))
    }
}

#[cfg(test)]
mod tests {
    use kvcoord_memory::{Dtype, KvLayout};

    use super::*;

    #[test]
    fn the_layout_fingerprint_follows_the_object_format_not_the_memory_size() {
        let a = KvLayout::mha(4, 256, 16, 4, 64, Dtype::Bf16);
        let bigger = KvLayout::mha(4, 1024, 16, 4, 64, Dtype::Bf16);
        assert_eq!(LayoutFingerprint::of(&a, 256), LayoutFingerprint::of(&bigger, 256));
        assert_ne!(LayoutFingerprint::of(&a, 256), LayoutFingerprint::of(&a, 128), "chunk size");
        let fp16 = KvLayout::mha(4, 256, 16, 4, 64, Dtype::F16);
        assert_ne!(LayoutFingerprint::of(&a, 256), LayoutFingerprint::of(&fp16, 256), "dtype");
        let heads = KvLayout::mha(4, 256, 16, 8, 32, Dtype::Bf16);
        assert_ne!(LayoutFingerprint::of(&a, 256), LayoutFingerprint::of(&heads, 256), "shape");
    }

    #[test]
    fn namespaces_never_collide_with_plain_names() {
        assert_eq!(qualified_model("default", "llama"), "llama");
        assert_eq!(qualified_model("a", "llama"), "a\0llama");
        assert_ne!(qualified_model("a", "llama"), qualified_model("b", "llama"));
    }
}

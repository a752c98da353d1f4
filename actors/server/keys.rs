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
    use super::*;

    #[test]
    fn namespaces_never_collide_with_plain_names() {
        assert_eq!(qualified_model("default", "llama"), "llama");
        assert_eq!(qualified_model("a", "llama"), "a\0llama");
        assert_ne!(qualified_model("a", "llama"), qualified_model("b", "llama"));
    }
}

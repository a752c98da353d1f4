//! The keys every tier and actor names a chunk object by: the interned
//! (model, world size) and the (model, rank, chunk hash) of one object.
//!
//! This module owns only these plain values; it must never hold state or
//! import another server module, so any module may import it.

use kvcoord_transport::ChunkHash;

/// Interned (model name, world size): chunks are shared by every instance of
/// the same model and TP degree. The L1 store hands them out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelId(pub u32);

/// The key of one chunk object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ObjectKey {
    pub model: ModelId,
    pub rank: u32,
    pub hash: ChunkHash,
}

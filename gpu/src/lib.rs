//! kvcoord-memory (directory `gpu/`): every kind of KV-cache memory the
//! coordinator touches. Layouts, memory handles, the host (memfd) backend, the
//! CUDA backend, the L1 arena and the copy engines.
//!
//! Nothing here knows about the wire, actors or clients: these are the typed
//! building blocks that the coordinator's copy-lane and instance actors use.

pub mod arena;
pub mod copy;
pub mod cuda;
pub mod host;
pub mod layout;
pub mod memory;
pub mod shared;

pub use arena::{Allocation, Arena, ArenaUsage, Extent, ObjectBytes};
pub use copy::CopyError;
pub use host::{sealed_memfd, HostKvCache, HostMapping, KvMemory};
pub use layout::{BlockId, BlockShape, ChunkBlocks, Dtype, KvLayout, LayoutError, Placement, VllmLayout};
pub use memory::{CudaIpcLayer, MemoryHandle};
pub use shared::{RegionError, RegionRegistry, SharedRegion};

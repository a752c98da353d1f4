//! Memory handles: how a worker describes its KV-cache memory to the
//! coordinator at registration. They travel on the wire; the memory itself
//! never does (a memfd goes beside the frame as SCM_RIGHTS, CUDA memory as an
//! IPC handle). This module must never open or map anything.

use serde::{Deserialize, Serialize};

/// One layer's device memory, exported by `cuIpcGetMemHandle`.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct CudaIpcLayer {
    /// The 64-byte `CUipcMemHandle` of the allocation holding the layer.
    pub handle: Vec<u8>,
    /// Offset of the layer inside that allocation.
    pub offset: u64,
    /// Bytes of the allocation from `offset` on that the layer may use.
    pub size: u64,
}

/// Where a registered KV cache lives.
#[cfg_attr(feature = "arbitrary", derive(arbitrary::Arbitrary))]
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub enum MemoryHandle {
    /// Host backend: a sealed memfd of `size` bytes, sent with the register
    /// frame as the frame's only file descriptor.
    HostFd { size: u64 },
    /// CUDA backend: one IPC region per layer on the GPU with this UUID.
    CudaIpc { device_uuid: [u8; 16], layers: Vec<CudaIpcLayer> },
}

impl MemoryHandle {
    /// True for device memory (copied by a GPU worker).
    pub fn is_cuda(&self) -> bool {
        matches!(self, MemoryHandle::CudaIpc { .. })
    }
}

//! The CUDA backend, on the driver API through `cudarc::driver::{result, sys}`.
//!
//! - [`driver`]: whether the driver is there, `cuInit`, and [`CudaError`].
//! - [`device`]: the devices of this machine, matched by UUID, and their
//!   retained primary contexts.
//! - [`pinned`]: page-locked L1 slabs (`cuMemHostAlloc`, portable, mapped).
//! - [`ipc`]: the server side of registration: KV memory opened by IPC, and
//!   the engines' "KV ready" events.
//! - [`export`]: the client side: a TP worker's KV cache in device memory,
//!   exported by IPC, and its ready event.
//! - [`engine`]: a device's copy engine: the store and retrieve streams, the
//!   copy kernel, and the completion threads.
//!
//! cudarc panics when libcuda is missing, so every CUDA path starts at
//! [`driver_present`], which calls nothing else. Nothing here knows about the
//! wire or the actors. This file only declares and re-exports: its modules
//! import each other, never it.

pub mod device;
pub mod driver;
pub mod engine;
pub mod export;
pub mod ipc;
pub mod pinned;

pub use device::CudaDevice;
pub use driver::{driver_present, init, CudaError};
pub use engine::{CopyDirection, CopyEngine, CopyMethod, Segment};
pub use export::{export_layers, DeviceKvCache, ReadyEvent, VMM_NOT_EXPORTABLE};
pub use ipc::IpcKvMemory;
pub use pinned::PinnedSlabs;

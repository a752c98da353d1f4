//! The CUDA backend, on the driver API through `cudarc::driver::{result, sys}`.
//!
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
//! wire or the actors.

pub mod device;
pub mod engine;
pub mod export;
pub mod ipc;
pub mod pinned;

pub use device::CudaDevice;
pub use engine::{CopyDirection, CopyEngine, CopyMethod, Segment};
pub use export::{DeviceKvCache, ReadyEvent};
pub use ipc::IpcKvMemory;
pub use pinned::PinnedSlabs;

use cudarc::driver::DriverError;

/// True when the CUDA driver library can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: `is_culib_present` only tries `dlopen` on the driver's library
    // names and drops the handle; it runs no library initialiser of ours and
    // touches no cudarc state. Loading libcuda runs the driver's own
    // constructors, which are safe to run in any process.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

/// A failed CUDA operation: what was attempted, and the driver's answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CudaError {
    #[error("no CUDA driver on this machine")]
    NoDriver,
    #[error("{op}: {source}")]
    Driver { op: &'static str, source: DriverError },
    #[error("{0}")]
    Invalid(String),
}

/// Attaches the operation's name to a driver error.
pub(crate) fn op(op: &'static str) -> impl FnOnce(DriverError) -> CudaError {
    move |source| CudaError::Driver { op, source }
}

/// `cuInit`, once per process, after checking that the driver exists.
pub fn init() -> Result<(), CudaError> {
    static INIT: std::sync::OnceLock<Result<(), CudaError>> = std::sync::OnceLock::new();
    INIT.get_or_init(|| {
        if !driver_present() {
            return Err(CudaError::NoDriver);
        }
        cudarc::driver::result::init().map_err(op("cuInit"))
    })
    .clone()
}

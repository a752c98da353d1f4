//! The CUDA driver itself: whether its library is there, `cuInit` once per
//! process, and the error every CUDA operation of this crate returns.
//!
//! Every CUDA path starts at [`driver_present`], which calls nothing else:
//! cudarc panics on any other call when libcuda is missing. This module must
//! never touch a device, a context or memory.

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

//! CUDA driver presence. cudarc panics when libcuda is missing, so every CUDA
//! path asks here first. This module must never call any other driver API.

/// True when the CUDA driver library can be loaded on this machine.
pub fn driver_present() -> bool {
    // SAFETY: `is_culib_present` only tries `dlopen` on the driver's library
    // names and drops the handle; it runs no library initialiser of ours and
    // touches no cudarc state. Loading libcuda runs the driver's own
    // constructors, which are safe to run in any process.
    unsafe { cudarc::driver::sys::is_culib_present() }
}

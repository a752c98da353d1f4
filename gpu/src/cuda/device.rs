//! The CUDA devices of this machine, named by UUID (ordinals differ between
//! processes with different `CUDA_VISIBLE_DEVICES`; UUIDs do not), and the
//! retained primary context of each.
//!
//! This module owns context lifetime: a [`CudaDevice`] holds one reference on
//! its device's primary context and releases it on drop. It must never
//! create streams or allocate memory.

use std::sync::Arc;

use cudarc::driver::{result, sys};

use super::driver::{init, op, CudaError};

/// One device with its primary context retained.
pub struct CudaDevice {
    ordinal: i32,
    device: sys::CUdevice,
    ctx: sys::CUcontext,
    uuid: [u8; 16],
    name: String,
}

// SAFETY: a CUcontext handle may be used from any thread (the driver API is
// thread-safe; a thread binds it with `cuCtxSetCurrent`). `CudaDevice` holds
// no thread-local state.
unsafe impl Send for CudaDevice {}
// SAFETY: as for `Send`: every method only reads the immutable handles.
unsafe impl Sync for CudaDevice {}

impl CudaDevice {
    /// Every device the driver shows this process, in ordinal order.
    pub fn all() -> Result<Vec<Arc<CudaDevice>>, CudaError> {
        init()?;
        let n = result::device::get_count().map_err(op("cuDeviceGetCount"))?;
        (0..n).map(CudaDevice::open).collect()
    }

    /// Retains device `ordinal`'s primary context.
    pub fn open(ordinal: i32) -> Result<Arc<CudaDevice>, CudaError> {
        init()?;
        let device = result::device::get(ordinal).map_err(op("cuDeviceGet"))?;
        let uuid = result::device::get_uuid(device).map_err(op("cuDeviceGetUuid"))?;
        let name = result::device::get_name(device).map_err(op("cuDeviceGetName"))?;
        // SAFETY: `device` was just returned by `cuDeviceGet`.
        let ctx = unsafe { result::primary_ctx::retain(device) }.map_err(op("cuDevicePrimaryCtxRetain"))?;
        let uuid = uuid.bytes.map(|b| b as u8);
        Ok(Arc::new(CudaDevice { ordinal, device, ctx, uuid, name }))
    }

    /// The device with this UUID, if this process can see it.
    pub fn by_uuid(uuid: &[u8; 16]) -> Result<Option<Arc<CudaDevice>>, CudaError> {
        Ok(CudaDevice::all()?.into_iter().find(|d| &d.uuid == uuid))
    }

    pub fn ordinal(&self) -> i32 {
        self.ordinal
    }

    pub fn uuid(&self) -> [u8; 16] {
        self.uuid
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The UUID as `nvidia-smi -L` prints it (`GPU-xxxxxxxx-...`).
    pub fn uuid_string(&self) -> String {
        format_uuid(&self.uuid)
    }

    /// Makes this device's primary context current on the calling thread.
    /// Every driver call that needs a context is preceded by this.
    pub fn bind(&self) -> Result<(), CudaError> {
        // SAFETY: `ctx` is a primary context retained by `self`, so it is
        // alive for as long as `self` is.
        unsafe { result::ctx::set_current(self.ctx) }.map_err(op("cuCtxSetCurrent"))
    }
}

impl Drop for CudaDevice {
    fn drop(&mut self) {
        // SAFETY: `device` came from `cuDeviceGet` and we hold exactly one
        // retain on its primary context, taken in `open`.
        if let Err(e) = unsafe { result::primary_ctx::release(self.device) } {
            tracing::warn!(device = self.ordinal, error = %e, "releasing the primary context failed");
        }
    }
}

/// Formats a device UUID the way `nvidia-smi -L` does.
pub fn format_uuid(u: &[u8; 16]) -> String {
    let h: Vec<String> = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "GPU-{}-{}-{}-{}-{}",
        h[0..4].concat(),
        h[4..6].concat(),
        h[6..8].concat(),
        h[8..10].concat(),
        h[10..].concat()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_prints_like_nvidia_smi() {
        let u = [0xa1, 0x19, 0x57, 0xb4, 0x84, 0x4b, 0xc6, 0xde, 0x98, 0x50, 0x4d, 0x42, 0xb8, 0x06, 0x16, 0x39];
        assert_eq!(format_uuid(&u), "GPU-a11957b4-844b-c6de-9850-4d42b8061639");
    }
}

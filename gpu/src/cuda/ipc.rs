//! The server side of CUDA registration: a TP worker's KV-cache layers opened
//! by IPC in the coordinator's context, checked against the layout, and
//! closed with `cuIpcCloseMemHandle` when the last holder lets go — the
//! instance and every in-flight copy hold it, so memory is never closed under
//! a running kernel. Also the worker's "KV ready" events, opened once per
//! handle and kept until the memory closes.
//!
//! This module must never free memory it opened (IPC memory is closed, not
//! freed) nor copy bytes.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::sys;
use parking_lot::Mutex;

use super::device::CudaDevice;
use super::driver::{op, CudaError};
use crate::layout::KvLayout;
use crate::memory::CudaIpcLayer;

/// Bytes of a `CUipcMemHandle` / `CUipcEventHandle`.
pub const IPC_HANDLE_BYTES: usize = 64;

/// Ready events kept per instance at most; beyond, the oldest is destroyed.
const MAX_READY_EVENTS: usize = 64;

/// Why registered CUDA memory was refused.
#[derive(Debug, thiserror::Error)]
pub enum IpcOpenError {
    /// The memory does not fit the layout (wrong layer count, too small).
    #[error("{0}")]
    LayoutMismatch(String),
    /// The handles are malformed or the driver would not open them.
    #[error("{0}")]
    InvalidArgument(String),
    #[error(transparent)]
    Cuda(#[from] CudaError),
}

/// One instance's KV-cache layers, opened by IPC on one device.
pub struct IpcKvMemory {
    device: Arc<CudaDevice>,
    /// Base address of every distinct allocation opened (closed on drop).
    opened: Vec<sys::CUdeviceptr>,
    /// Device address of each layer.
    layers: Vec<u64>,
    events: Mutex<Vec<([u8; IPC_HANDLE_BYTES], usize)>>,
}

// SAFETY: the struct holds device addresses and event handles, which are
// plain values valid in any thread once the context is bound; mutation of the
// event cache goes through a mutex.
unsafe impl Send for IpcKvMemory {}
// SAFETY: see `Send`; shared access only reads addresses or locks the cache.
unsafe impl Sync for IpcKvMemory {}

fn ipc_handle(bytes: &[u8]) -> Result<sys::CUipcMemHandle, IpcOpenError> {
    let arr: [u8; IPC_HANDLE_BYTES] = bytes.try_into().map_err(|_| {
        IpcOpenError::InvalidArgument(format!("IPC handle of {} bytes (expected {IPC_HANDLE_BYTES})", bytes.len()))
    })?;
    Ok(sys::CUipcMemHandle { reserved: arr.map(|b| b as _) })
}

impl IpcKvMemory {
    /// Opens every layer's allocation (each distinct handle once) and checks
    /// that each layer's region ([`KvLayout::layer_extent`] bytes from the
    /// layer's handle and offset, its base) lies inside its allocation. The
    /// layout's layer offset and stride are not used: each layer's base is
    /// its own.
    pub fn open(device: Arc<CudaDevice>, layout: &KvLayout, layers: &[CudaIpcLayer]) -> Result<Self, IpcOpenError> {
        if layers.len() != layout.num_layers as usize {
            return Err(IpcOpenError::LayoutMismatch(format!(
                "{} IPC layers for a layout of {} layers",
                layers.len(),
                layout.num_layers
            )));
        }
        device.bind()?;
        let mut mem = IpcKvMemory { device, opened: Vec::new(), layers: Vec::new(), events: Mutex::new(Vec::new()) };
        let mut by_handle: HashMap<&[u8], (sys::CUdeviceptr, usize)> = HashMap::new();
        layout.validate().map_err(|e| IpcOpenError::InvalidArgument(format!("layout: {e}")))?;
        let need = layout.layer_extent();
        for (i, layer) in layers.iter().enumerate() {
            let (base, size) = match by_handle.get(layer.handle.as_slice()) {
                Some(&v) => v,
                None => {
                    let handle = ipc_handle(&layer.handle)?;
                    let mut ptr: sys::CUdeviceptr = 0;
                    let flags = sys::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32;
                    // SAFETY: `ptr` is a valid out-pointer; the context is
                    // bound on this thread; a malformed handle makes the
                    // driver return an error, not touch memory.
                    unsafe { sys::cuIpcOpenMemHandle_v2(&mut ptr, handle, flags) }.result().map_err(|e| {
                        IpcOpenError::InvalidArgument(format!("layer {i}: cuIpcOpenMemHandle failed: {e}"))
                    })?;
                    mem.opened.push(ptr);
                    let (mut base, mut size) = (0, 0usize);
                    // SAFETY: `ptr` is a device address just opened in the
                    // bound context; the out-pointers are valid.
                    unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, ptr) }
                        .result()
                        .map_err(op("cuMemGetAddressRange"))?;
                    // Bytes from the opened address to the allocation's end.
                    let usable = (base + size as u64).saturating_sub(ptr) as usize;
                    by_handle.insert(&layer.handle, (ptr, usable));
                    (ptr, usable)
                }
            };
            let end = layer.offset.checked_add(need);
            if end.is_none_or(|end| end > size as u64 || layer.size < need) {
                return Err(IpcOpenError::LayoutMismatch(format!(
                    "layer {i}: {need} bytes at offset {} do not fit its allocation of {size} bytes (declared {})",
                    layer.offset, layer.size
                )));
            }
            mem.layers.push(base + layer.offset);
        }
        Ok(mem)
    }

    /// Device address of each layer, in layer order.
    pub fn layer_addrs(&self) -> &[u64] {
        &self.layers
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.device
    }

    /// The engine's event for this IPC event handle (a "KV ready" event a
    /// store waits for, or a "copy done" event a retrieve records), opened on
    /// first use and kept (at most [`MAX_READY_EVENTS`]) until the memory closes.
    pub fn ipc_event(&self, handle: &[u8]) -> Result<sys::CUevent, IpcOpenError> {
        let arr: [u8; IPC_HANDLE_BYTES] = handle.try_into().map_err(|_| {
            IpcOpenError::InvalidArgument(format!(
                "event handle of {} bytes (expected {IPC_HANDLE_BYTES})",
                handle.len()
            ))
        })?;
        let mut events = self.events.lock();
        if let Some((_, ev)) = events.iter().find(|(h, _)| *h == arr) {
            return Ok(*ev as sys::CUevent);
        }
        self.device.bind()?;
        let mut ev: sys::CUevent = std::ptr::null_mut();
        let h = sys::CUipcEventHandle { reserved: arr.map(|b| b as _) };
        // SAFETY: `ev` is a valid out-pointer; the context is bound; a bad
        // handle is reported as an error by the driver.
        unsafe { sys::cuIpcOpenEventHandle(&mut ev, h) }
            .result()
            .map_err(|e| IpcOpenError::InvalidArgument(format!("cuIpcOpenEventHandle failed: {e}")))?;
        if events.len() >= MAX_READY_EVENTS {
            let (_, old) = events.remove(0);
            // SAFETY: `old` was opened by `cuIpcOpenEventHandle` and is
            // destroyed once; a wait already enqueued on it is unaffected.
            let _ = unsafe { sys::cuEventDestroy_v2(old as sys::CUevent) };
        }
        events.push((arr, ev as usize));
        Ok(ev)
    }
}

impl Drop for IpcKvMemory {
    fn drop(&mut self) {
        if self.device.bind().is_err() {
            tracing::error!("could not bind the context to close IPC memory");
            return;
        }
        for (_, ev) in self.events.lock().drain(..) {
            // SAFETY: opened by `cuIpcOpenEventHandle`, destroyed once.
            let _ = unsafe { sys::cuEventDestroy_v2(ev as sys::CUevent) };
        }
        for &ptr in &self.opened {
            // SAFETY: `ptr` came from `cuIpcOpenMemHandle` and is closed once.
            // Every copy that used it held this value, so none is running.
            if let Err(e) = unsafe { sys::cuIpcCloseMemHandle(ptr) }.result() {
                tracing::warn!(error = %e, "cuIpcCloseMemHandle failed");
            }
        }
        tracing::debug!(allocations = self.opened.len(), "IPC memory closed");
    }
}

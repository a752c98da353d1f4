//! The client side of CUDA registration: a TP worker's paged KV cache in
//! device memory (one allocation per layer, as vLLM allocates it), exported
//! by `cuIpcGetMemHandle`, and the interprocess "KV ready" event the worker
//! records after writing blocks and hands to the coordinator with a store.
//!
//! It also offers the few copies a worker needs around that (write or read a
//! block), and [`export_layers`]: memory another allocator owns (PyTorch's
//! caching allocator sub-allocates), exported per layer as allocation base
//! handle + offset. The coordinator never uses this module. It must never
//! open another process's handles, nor free memory it did not allocate.

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{result, sys};

use super::device::CudaDevice;
use super::driver::{op, CudaError};
use crate::layout::{BlockId, KvLayout};
use crate::memory::{CudaIpcLayer, MemoryHandle};

/// A KV cache in device memory, exportable by IPC.
pub struct DeviceKvCache {
    device: Arc<CudaDevice>,
    layout: KvLayout,
    layers: Vec<sys::CUdeviceptr>,
    handles: Vec<Vec<u8>>,
    stream: sys::CUstream,
}

// SAFETY: device addresses and the stream handle are plain values usable
// from any thread with the context bound (every method binds it first).
unsafe impl Send for DeviceKvCache {}

impl DeviceKvCache {
    /// Allocates `layout` on `device` (one allocation per layer) and exports
    /// each layer's IPC handle.
    pub fn allocate(device: Arc<CudaDevice>, layout: KvLayout) -> Result<Self, CudaError> {
        layout.validate().map_err(|e| CudaError::Invalid(e.to_string()))?;
        device.bind()?;
        let stream = result::stream::create(result::stream::StreamKind::NonBlocking).map_err(op("cuStreamCreate"))?;
        let mut cache = DeviceKvCache { device, layout, layers: Vec::new(), handles: Vec::new(), stream };
        for _ in 0..layout.num_layers {
            // SAFETY: context bound; the allocation is owned by `cache`,
            // which frees it on drop.
            let ptr = unsafe { result::malloc_sync(layout.layer_extent() as usize) }.map_err(op("cuMemAlloc"))?;
            cache.layers.push(ptr);
            let mut h = std::mem::MaybeUninit::<sys::CUipcMemHandle>::uninit();
            // SAFETY: `ptr` is a live allocation of this context; `h` is a
            // valid out-pointer, initialised by the driver on success.
            let h = unsafe {
                sys::cuIpcGetMemHandle(h.as_mut_ptr(), ptr).result().map_err(op("cuIpcGetMemHandle"))?;
                h.assume_init()
            };
            cache.handles.push(h.reserved.iter().map(|&b| b as u8).collect());
        }
        Ok(cache)
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.device
    }

    /// What a register request carries for this cache.
    pub fn memory_handle(&self) -> MemoryHandle {
        let size = self.layout.layer_extent();
        let layers = self.handles.iter().map(|h| CudaIpcLayer { handle: h.clone(), offset: 0, size }).collect();
        MemoryHandle::CudaIpc { device_uuid: self.device.uuid(), layers }
    }

    fn block_addr(&self, layer: u32, run: u32, block: BlockId) -> sys::CUdeviceptr {
        self.layers[layer as usize] + self.layout.offset_in_layer(run, block)
    }

    fn check(&self, layer: u32, plane: u32, len: usize) -> Result<(), CudaError> {
        if layer >= self.layout.num_layers || plane >= self.layout.runs() || len as u64 != self.layout.run_bytes() {
            return Err(CudaError::Invalid(format!("block ({layer}, {plane}) of {len} bytes is not in the layout")));
        }
        Ok(())
    }

    /// Queues a copy of `bytes` into one block plane on the cache's stream.
    /// `bytes` must stay untouched until the stream has passed this copy
    /// (record a [`ReadyEvent`] and wait, or [`Self::synchronize`]); from
    /// pinned memory the copy is asynchronous, from pageable memory the
    /// driver stages it first.
    pub fn write_block_async(&self, layer: u32, plane: u32, block: BlockId, bytes: &[u8]) -> Result<(), CudaError> {
        self.check(layer, plane, bytes.len())?;
        self.device.bind()?;
        // SAFETY: the destination is inside this cache's allocation (checked
        // layer and plane; `BlockId` is valid for the layout; the length is
        // one block plane); the caller keeps `bytes` alive until the copy ran.
        unsafe { result::memcpy_htod_async(self.block_addr(layer, plane, block), bytes, self.stream) }
            .map_err(op("cuMemcpyHtoDAsync"))
    }

    /// Copies one block plane out, synchronously.
    pub fn read_block(&self, layer: u32, plane: u32, block: BlockId, out: &mut [u8]) -> Result<(), CudaError> {
        self.check(layer, plane, out.len())?;
        self.device.bind()?;
        // SAFETY: as in `write_block_async`; the sync copy returns when done.
        unsafe { result::memcpy_dtoh_sync(out, self.block_addr(layer, plane, block)) }.map_err(op("cuMemcpyDtoH"))
    }

    /// Waits for every copy queued on the cache's stream.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        self.device.bind()?;
        // SAFETY: the stream belongs to this cache and is alive.
        unsafe { result::stream::synchronize(self.stream) }.map_err(op("cuStreamSynchronize"))
    }

    /// Records `event` on the cache's stream: it fires when every write
    /// queued so far has landed.
    pub fn record(&self, event: &ReadyEvent) -> Result<(), CudaError> {
        self.device.bind()?;
        // SAFETY: both the event and the stream are alive and belong to this
        // process's context.
        unsafe { result::event::record(event.event, self.stream) }.map_err(op("cuEventRecord"))
    }
}

impl Drop for DeviceKvCache {
    fn drop(&mut self) {
        if self.device.bind().is_err() {
            return;
        }
        // SAFETY: the stream and allocations were created by `allocate` and
        // are released once, after the stream has drained.
        unsafe {
            let _ = result::stream::synchronize(self.stream);
            let _ = result::stream::destroy(self.stream);
            for &p in &self.layers {
                let _ = result::free_sync(p);
            }
        }
    }
}

/// Why legacy IPC refuses memory from PyTorch's expandable segments or
/// vLLM's cumem allocator (both map memory with `cuMemCreate`/`cuMemMap`).
pub const VMM_NOT_EXPORTABLE: &str = "it cannot be exported with CUDA IPC (cuIpcGetMemHandle): memory from \
     PyTorch's expandable segments (PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True) or vLLM's cumem allocator \
     (sleep mode) is mapped with cuMemCreate, which legacy IPC cannot share; allocate the KV cache without them";

/// Exports device memory that this process allocated by any means (e.g.
/// the per-layer views of a PyTorch tensor): for each layer address, the
/// IPC handle of the allocation holding it (found with
/// `cuMemGetAddressRange`; one `cuIpcGetMemHandle` per distinct allocation)
/// and the layer's offset in it, with `extent` bytes declared per layer.
/// Every layer must be on one device, and its `extent` bytes inside its
/// allocation. `NoDriver` without libcuda (checked before any other call);
/// `Invalid` (with the reason) for memory that is not device memory or
/// cannot be exported.
pub fn export_layers(layer_ptrs: &[u64], extent: u64) -> Result<MemoryHandle, CudaError> {
    if !super::driver::driver_present() {
        return Err(CudaError::NoDriver);
    }
    super::driver::init()?;
    let mut ordinal = None;
    for (i, &ptr) in layer_ptrs.iter().enumerate() {
        let mut o: i32 = -1;
        // SAFETY: `o` is a valid out-pointer for this attribute (an int);
        // an address the driver does not know is reported as an error.
        unsafe {
            sys::cuPointerGetAttribute(
                (&mut o as *mut i32).cast(),
                sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL,
                ptr,
            )
        }
        .result()
        .map_err(|e| CudaError::Invalid(format!("layer {i} at {ptr:#x} is not CUDA device memory: {e}")))?;
        match ordinal {
            None => ordinal = Some(o),
            Some(first) if first != o => {
                return Err(CudaError::Invalid(format!("layer {i} is on device {o} but layer 0 on device {first}")))
            }
            Some(_) => {}
        }
    }
    let ordinal = ordinal.ok_or_else(|| CudaError::Invalid("no layers".into()))?;
    let device = CudaDevice::open(ordinal)?;
    let previous = result::ctx::get_current().map_err(op("cuCtxGetCurrent"))?;
    device.bind()?;
    let exported = export_bound(layer_ptrs, extent);
    if let Some(ctx) = previous {
        // SAFETY: `ctx` was current on this thread a moment ago and its
        // owner (the caller's runtime) still holds it.
        let _ = unsafe { result::ctx::set_current(ctx) };
    }
    Ok(MemoryHandle::CudaIpc { device_uuid: device.uuid(), layers: exported? })
}

/// [`export_layers`] with the device's context bound.
fn export_bound(layer_ptrs: &[u64], extent: u64) -> Result<Vec<CudaIpcLayer>, CudaError> {
    let mut handles: HashMap<sys::CUdeviceptr, Vec<u8>> = HashMap::new();
    let mut layers = Vec::with_capacity(layer_ptrs.len());
    for (i, &ptr) in layer_ptrs.iter().enumerate() {
        let (mut base, mut size) = (0, 0usize);
        // SAFETY: the out-pointers are valid; the context is bound; an
        // unknown address is reported as an error.
        unsafe { sys::cuMemGetAddressRange_v2(&mut base, &mut size, ptr) }
            .result()
            .map_err(|e| CudaError::Invalid(format!("layer {i}: cuMemGetAddressRange({ptr:#x}) failed: {e}")))?;
        let offset = ptr - base;
        if offset.checked_add(extent).is_none_or(|end| end > size as u64) {
            return Err(CudaError::Invalid(format!(
                "layer {i}: its {extent} bytes at offset {offset} run past the end of its allocation of {size} bytes"
            )));
        }
        let handle = match handles.get(&base) {
            Some(h) => h.clone(),
            None => {
                let mut h = std::mem::MaybeUninit::<sys::CUipcMemHandle>::uninit();
                // SAFETY: `base` is the base of a live allocation of the
                // bound context; `h` is initialised by the driver on success.
                let h = unsafe {
                    sys::cuIpcGetMemHandle(h.as_mut_ptr(), base)
                        .result()
                        .map_err(|e| CudaError::Invalid(format!("layer {i}: {VMM_NOT_EXPORTABLE} ({e})")))?;
                    h.assume_init()
                };
                let bytes: Vec<u8> = h.reserved.iter().map(|&b| b as u8).collect();
                handles.insert(base, bytes.clone());
                bytes
            }
        };
        layers.push(CudaIpcLayer { handle, offset, size: extent });
    }
    Ok(layers)
}

/// An interprocess event: the worker records it after writing a store's
/// blocks, and the coordinator's store stream waits on it before reading.
pub struct ReadyEvent {
    device: Arc<CudaDevice>,
    event: sys::CUevent,
    handle: Vec<u8>,
}

// SAFETY: the event handle is a plain value usable from any thread with the
// context bound.
unsafe impl Send for ReadyEvent {}

impl ReadyEvent {
    pub fn new(device: Arc<CudaDevice>) -> Result<Self, CudaError> {
        device.bind()?;
        let flags =
            sys::CUevent_flags::CU_EVENT_INTERPROCESS as u32 | sys::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32;
        let mut event: sys::CUevent = std::ptr::null_mut();
        // SAFETY: context bound; `event` is a valid out-pointer.
        unsafe { sys::cuEventCreate(&mut event, flags) }.result().map_err(op("cuEventCreate"))?;
        let mut h = std::mem::MaybeUninit::<sys::CUipcEventHandle>::uninit();
        // SAFETY: `event` is an interprocess event of this context.
        let h = unsafe {
            sys::cuIpcGetEventHandle(h.as_mut_ptr(), event).result().map_err(op("cuIpcGetEventHandle"))?;
            h.assume_init()
        };
        Ok(ReadyEvent { device, event, handle: h.reserved.iter().map(|&b| b as u8).collect() })
    }

    /// The 64-byte IPC handle a store request carries.
    pub fn handle(&self) -> Vec<u8> {
        self.handle.clone()
    }
}

impl Drop for ReadyEvent {
    fn drop(&mut self) {
        if self.device.bind().is_ok() {
            // SAFETY: created in `new`, destroyed once.
            let _ = unsafe { result::event::destroy(self.event) };
        }
    }
}

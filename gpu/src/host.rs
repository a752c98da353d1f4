//! The host backend's KV-cache memory: a TP worker's paged KV cache in a
//! sealed memfd, created by the client and mapped by the server.
//!
//! This module owns the memfd life cycle (create, size, seal, map, unmap). It
//! must never interpret the bytes: layout arithmetic lives in `layout.rs`,
//! copies in `copy.rs`.
//!
//! Robustness: a client that shrank its memfd after the server mapped it would
//! make the server's next read raise SIGBUS. The server therefore accepts only
//! memfds sealed against shrinking (`F_SEAL_SHRINK`), which the kernel then
//! guarantees for the mapping's whole life.

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use memmap2::{MmapOptions, MmapRaw};
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};

use crate::layout::{KvLayout, LayoutError};

/// Why host KV memory could not be created or mapped.
#[derive(Debug, thiserror::Error)]
pub enum HostMemoryError {
    #[error("layout: {0}")]
    Layout(#[from] LayoutError),
    #[error("memfd is not sealed against shrinking (F_SEAL_SHRINK); refusing to map it")]
    NotSealed,
    #[error("{op}: {source}")]
    Io { op: &'static str, source: std::io::Error },
}

fn io(op: &'static str) -> impl FnOnce(std::io::Error) -> HostMemoryError {
    move |source| HostMemoryError::Io { op, source }
}

/// A mapped, shared, fixed-size region of KV-cache memory that copies read and
/// write through raw pointers. Implemented by both ends of the host backend.
pub trait KvMemory: Send + Sync {
    /// Start of the region.
    fn base(&self) -> *mut u8;
    /// Length of the region in bytes.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A new memfd of `len` zeroed bytes, sealed against shrinking, growing and
/// further sealing: the only kind of memfd the server maps.
pub fn sealed_memfd(name: &str, len: u64) -> Result<OwnedFd, HostMemoryError> {
    let fd: OwnedFd = memfd_create(name, MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)
        .map_err(|e| HostMemoryError::Io { op: "memfd_create", source: e.into() })?;
    let file = File::from(fd);
    file.set_len(len).map_err(io("ftruncate"))?;
    fcntl(file.as_fd(), FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL))
        .map_err(|e| HostMemoryError::Io { op: "F_ADD_SEALS", source: e.into() })?;
    Ok(OwnedFd::from(file))
}

/// Client side: a TP worker's KV cache allocated in a sealed memfd. Its file
/// descriptor is what travels to the server (SCM_RIGHTS) at registration.
pub struct HostKvCache {
    file: File,
    map: MmapRaw,
    layout: KvLayout,
}

impl HostKvCache {
    /// Allocates zeroed memory for `layout` (up to the end of its placement)
    /// in a new memfd and seals its size.
    pub fn create(name: &str, layout: KvLayout) -> Result<Self, HostMemoryError> {
        layout.validate()?;
        let file = File::from(sealed_memfd(name, layout.total_bytes())?);
        let map = MmapOptions::new().map_raw(&file).map_err(io("mmap"))?;
        Ok(HostKvCache { file, map, layout })
    }

    pub fn layout(&self) -> &KvLayout {
        &self.layout
    }

    /// The descriptor to send to the server.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// The whole cache as bytes, for the engine (or a test) to fill and read.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: `map` is a live MAP_SHARED mapping of `map.len()` bytes that
        // this value owns; `&mut self` makes this the only slice of it in this
        // process. The server may read it concurrently from another process,
        // which can at worst observe bytes mid-update (the engine orders that
        // with its own events), never memory outside the mapping.
        unsafe { std::slice::from_raw_parts_mut(self.map.as_mut_ptr(), self.map.len()) }
    }

    /// Bytes of run `run` of block `block` of `layer` (for today's MHA
    /// layout, run 0 is the K plane and run 1 the V plane).
    pub fn block_mut(&mut self, layer: u32, run: u32, block: u32) -> Result<&mut [u8], LayoutError> {
        let id = self.layout.block(block)?;
        if layer >= self.layout.num_layers || run >= self.layout.runs() {
            return Err(LayoutError::RunOutOfRange { layer, run });
        }
        let start = self.layout.offset(layer, run, id) as usize;
        let len = self.layout.run_bytes() as usize;
        Ok(&mut self.bytes_mut()[start..start + len])
    }
}

impl KvMemory for HostKvCache {
    fn base(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }
    fn len(&self) -> usize {
        self.map.len()
    }
}

/// Server side: a client's memfd mapped shared, its size checked against the
/// layout it was registered with. Unmapped on drop, which happens only when
/// the last in-flight copy holding it (through an `Arc`) has finished.
pub struct HostMapping {
    map: MmapRaw,
    _file: File,
}

impl HostMapping {
    /// Maps `fd`, refusing it unless it is sealed against shrinking and the
    /// layout's whole placement lies inside it.
    pub fn open(fd: OwnedFd, layout: &KvLayout) -> Result<Self, HostMemoryError> {
        layout.validate()?;
        let file = File::from(fd);
        let seals = fcntl(file.as_fd(), FcntlArg::F_GET_SEALS).map_err(|_| HostMemoryError::NotSealed)?;
        if SealFlag::from_bits_truncate(seals) & SealFlag::F_SEAL_SHRINK != SealFlag::F_SEAL_SHRINK {
            return Err(HostMemoryError::NotSealed);
        }
        let size = file.metadata().map_err(io("fstat"))?.len();
        layout.fits_in(size)?;
        // Populate the page tables now (registration may take a moment) so
        // copies never take first-touch faults on the client's memory.
        let map = MmapOptions::new().populate().map_raw(&file).map_err(io("mmap"))?;
        Ok(HostMapping { map, _file: file })
    }
}

impl KvMemory for HostMapping {
    fn base(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }
    fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Dtype;

    #[test]
    fn server_maps_what_client_wrote() {
        let layout = KvLayout::mha(2, 4, 16, 2, 8, Dtype::F16);
        let mut cache = HostKvCache::create("t", layout).unwrap();
        cache.bytes_mut()[7] = 42;
        let fd = cache.fd().try_clone_to_owned().unwrap();
        let map = HostMapping::open(fd, &layout).unwrap();
        // SAFETY: the mapping is layout.total_bytes() long, so byte 7 is inside it.
        assert_eq!(unsafe { *map.base().add(7) }, 42);
    }

    #[test]
    fn memory_smaller_than_layout_is_refused() {
        let small = KvLayout::mha(1, 4, 16, 2, 8, Dtype::F16);
        let big = KvLayout::mha(2, 4, 16, 2, 8, Dtype::F16);
        let cache = HostKvCache::create("t", small).unwrap();
        let err = HostMapping::open(cache.fd().try_clone_to_owned().unwrap(), &big).err().unwrap();
        assert!(matches!(err, HostMemoryError::Layout(LayoutError::MemorySize { .. })), "{err}");
    }

    #[test]
    fn unsealed_memfd_is_refused() {
        let fd = memfd_create("u", MFdFlags::MFD_CLOEXEC).unwrap();
        let file = File::from(fd);
        file.set_len(64).unwrap();
        let layout = KvLayout::mla(1, 1, 1, 16, Dtype::F32);
        let err = HostMapping::open(OwnedFd::from(file), &layout).err().unwrap();
        assert!(matches!(err, HostMemoryError::NotSealed));
    }
}

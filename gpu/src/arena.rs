//! The L1 arena: page-aligned memory for cached chunk objects, taken from the
//! backing source in large slabs and handed out by a first-fit allocator.
//!
//! This module owns capacity accounting and the free lists. It must never
//! decide *what* to evict (that is the L1 store's job): when an allocation
//! does not fit it says so and the caller evicts and retries.
//!
//! Two ways to hold arena bytes: an [`Extent`] (12 bytes, freed explicitly by
//! its owner: the L1 index keeps millions of them) and an [`Allocation`]
//! (an extent that frees itself on drop, for everyone else).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

/// Objects start on 256-byte boundaries: enough for 16-byte vector copies
/// and cache lines, and small enough that millions of tiny objects (short
/// chunks, MLA) do not waste most of their memory.
pub const ARENA_ALIGN: u64 = 256;
/// Slabs are whole pages.
pub const PAGE: u64 = 4096;
/// Offsets and lengths are `u32`: no slab or object reaches 4 GiB.
pub const MAX_SLAB_BYTES: u64 = (u32::MAX as u64 + 1) - PAGE;
/// Most slabs one arena takes (4096 x 256 MiB = 1 TiB).
pub const MAX_SLABS: usize = 4096;

/// The first slab an arena takes on demand; each next one is twice the size,
/// up to the arena's slab size.
pub const FIRST_SLAB_BYTES: u64 = 2 << 20;

/// Bytes the caller copies into or out of: an arena allocation, or an L1
/// object's write ticket or read guard.
pub trait ObjectBytes {
    fn as_ptr(&self) -> *mut u8;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A run of arena bytes, 12 bytes to remember. Whoever holds it must give it
/// back with [`Arena::free_extent`] exactly once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    slab: u32,
    offset: u32,
    len: u32,
}

impl Extent {
    /// An extent of nothing (a placeholder, never freed).
    pub const EMPTY: Extent = Extent { slab: 0, offset: 0, len: 0 };

    pub fn len(&self) -> usize {
        self.len as usize
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// Bytes it holds in the arena (aligned).
    pub fn reserved(&self) -> u64 {
        round_up(self.len as u64)
    }
}

/// One slab of backing memory. Implemented by anonymous host memory here and
/// by pinned CUDA host memory in the CUDA backend.
pub trait Slab: Send + Sync {
    fn ptr(&self) -> *mut u8;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Where slabs come from.
pub trait SlabSource: Send + Sync {
    /// Allocates `bytes` (a multiple of [`PAGE`]) of page-aligned memory.
    fn allocate(&self, bytes: usize) -> std::io::Result<Box<dyn Slab>>;
    /// A short name for logs and stats ("host", "cuda-pinned").
    fn name(&self) -> &'static str;
}

/// Anonymous, private host memory (`mmap`), the host backend's slab source.
pub struct HostSlabs;

struct HostSlab(memmap2::MmapMut);

impl Slab for HostSlab {
    fn ptr(&self) -> *mut u8 {
        self.0.as_ptr() as *mut u8
    }
    fn len(&self) -> usize {
        self.0.len()
    }
}

impl SlabSource for HostSlabs {
    /// Anonymous memory, backed by huge pages where the kernel allows, and
    /// faulted in now, so that no store pays for first-touch page faults.
    fn allocate(&self, bytes: usize) -> std::io::Result<Box<dyn Slab>> {
        let mut map = memmap2::MmapMut::map_anon(bytes)?;
        let _ = map.advise(memmap2::Advice::HugePage);
        for page in map.chunks_mut(PAGE as usize) {
            page[0] = 0;
        }
        Ok(Box::new(HostSlab(map)))
    }
    fn name(&self) -> &'static str {
        "host"
    }
}

struct SlabState {
    mem: Box<dyn Slab>,
    /// Free ranges: offset -> length, never adjacent (coalesced on free).
    free: BTreeMap<u64, u64>,
}

struct ArenaState {
    slabs: Vec<SlabState>,
    slab_bytes: u64,
    used: u64,
}

struct ArenaInner {
    capacity: u64,
    source: Box<dyn SlabSource>,
    state: Mutex<ArenaState>,
    /// Each slab's start address, written once when the slab is taken, so
    /// turning an extent into a pointer takes no lock.
    bases: Box<[AtomicUsize]>,
}

/// Usage figures for stats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ArenaUsage {
    pub capacity: u64,
    pub used: u64,
    pub slab_bytes: u64,
}

/// The L1 arena. Cheap to clone (shared).
#[derive(Clone)]
pub struct Arena {
    inner: Arc<ArenaInner>,
}

/// An extent that returns itself to the arena when dropped.
pub struct Allocation {
    arena: Arena,
    extent: Extent,
    ptr: *mut u8,
}

// SAFETY: an Allocation is a unique claim on `reserved` bytes of a slab that
// lives as long as the arena (kept alive by the Arc). The raw pointer is only
// dereferenced by the copy code, which the L1 store orders (one writer before
// commit, readers only after), so moving or sharing the handle across threads
// is sound.
unsafe impl Send for Allocation {}
// SAFETY: see `Send`; `&Allocation` only exposes the pointer and sizes.
unsafe impl Sync for Allocation {}

fn round_up(n: u64) -> u64 {
    n.div_ceil(ARENA_ALIGN) * ARENA_ALIGN
}

fn round_to_pages(n: u64) -> u64 {
    n.div_ceil(PAGE) * PAGE
}

impl Arena {
    /// An arena of at most `capacity` bytes, taken from `source` in slabs of
    /// `slab_bytes` (rounded to pages) as they are needed.
    pub fn new(capacity: u64, slab_bytes: u64, source: Box<dyn SlabSource>) -> Self {
        let slab_bytes = round_to_pages(slab_bytes.clamp(PAGE, capacity.max(PAGE))).min(MAX_SLAB_BYTES);
        Arena {
            inner: Arc::new(ArenaInner {
                capacity,
                source,
                state: Mutex::new(ArenaState { slabs: Vec::new(), slab_bytes, used: 0 }),
                bases: (0..MAX_SLABS).map(|_| AtomicUsize::new(0)).collect(),
            }),
        }
    }

    /// Takes every slab up to the capacity now (slab sources fault in or pin
    /// what they hand out), so later allocations never wait for the system.
    /// Returns the bytes taken.
    pub fn take_all(&self) -> std::io::Result<u64> {
        let mut st = self.inner.state.lock();
        let mut have: u64 = st.slabs.iter().map(|s| s.mem.len() as u64).sum();
        loop {
            let room = self.inner.capacity.saturating_sub(have) / PAGE * PAGE;
            let size = st.slab_bytes.min(room);
            if size == 0 || st.slabs.len() == MAX_SLABS {
                return Ok(have);
            }
            self.inner.take_slab(&mut st, size)?;
            have += size;
        }
    }

    /// A host-memory arena.
    pub fn host(capacity: u64) -> Self {
        Self::new(capacity, 256 << 20, Box::new(HostSlabs))
    }

    pub fn source_name(&self) -> &'static str {
        self.inner.source.name()
    }

    pub fn usage(&self) -> ArenaUsage {
        let st = self.inner.state.lock();
        ArenaUsage {
            capacity: self.inner.capacity,
            used: st.used,
            slab_bytes: st.slabs.iter().map(|s| s.mem.len() as u64).sum(),
        }
    }

    /// Allocates `len` bytes that free themselves on drop; `None` when they
    /// do not fit. Errors only if the slab source fails.
    pub fn allocate(&self, len: u64) -> std::io::Result<Option<Allocation>> {
        Ok(self.allocate_extent(len)?.map(|extent| Allocation { arena: self.clone(), extent, ptr: self.ptr(&extent) }))
    }

    /// Where an extent's bytes are.
    pub fn ptr(&self, e: &Extent) -> *mut u8 {
        let base = self.inner.bases[e.slab as usize].load(Ordering::Acquire) as *mut u8;
        // SAFETY: the extent came from this arena, so its slab exists (its
        // base was published before the extent was handed out) and
        // offset + len lies inside the slab.
        unsafe { base.add(e.offset as usize) }
    }

    /// Gives an extent back. Each extent must be freed exactly once.
    pub fn free_extent(&self, e: Extent) {
        self.inner.free(e.slab as usize, e.offset as u64, e.reserved());
    }

    /// Allocates `len` bytes to be freed with [`Arena::free_extent`], or
    /// `None` when they do not fit (the caller may evict and try again).
    /// Errors if the slab source fails or `len` is 4 GiB or more.
    pub fn allocate_extent(&self, len: u64) -> std::io::Result<Option<Extent>> {
        if len == 0 {
            return Ok(None);
        }
        if len > MAX_SLAB_BYTES {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "objects must be smaller than 4 GiB"));
        }
        let need = round_up(len);
        let mut st = self.inner.state.lock();
        if st.used + need > self.inner.capacity {
            return Ok(None);
        }
        let found = st
            .slabs
            .iter()
            .enumerate()
            .find_map(|(i, s)| s.free.iter().find(|(_, &flen)| flen >= need).map(|(&off, &flen)| (i, off, flen)));
        let (slab, offset, flen) = match found {
            Some(f) => f,
            None => {
                let have: u64 = st.slabs.iter().map(|s| s.mem.len() as u64).sum();
                let room = self.inner.capacity.saturating_sub(have) / PAGE * PAGE;
                // Slabs grow from 2 MiB, doubling up to `slab_bytes`: the
                // first store on a fresh coordinator waits for what it needs
                // faulted or pinned, not for a whole 256 MiB slab.
                let growth = FIRST_SLAB_BYTES << st.slabs.len().min(24);
                let size = growth.min(st.slab_bytes).max(round_to_pages(need)).min(room);
                if size < need || st.slabs.len() == MAX_SLABS {
                    return Ok(None);
                }
                (self.inner.take_slab(&mut st, size)?, 0, size)
            }
        };
        let s = &mut st.slabs[slab];
        s.free.remove(&offset);
        if flen > need {
            s.free.insert(offset + need, flen - need);
        }
        st.used += need;
        Ok(Some(Extent { slab: slab as u32, offset: offset as u32, len: len as u32 }))
    }
}

impl ArenaInner {
    /// Takes one slab of `size` bytes from the source, all free; returns its index.
    fn take_slab(&self, st: &mut ArenaState, size: u64) -> std::io::Result<usize> {
        let mem = self.source.allocate(size as usize)?;
        self.bases[st.slabs.len()].store(mem.ptr() as usize, Ordering::Release);
        let mut free = BTreeMap::new();
        free.insert(0, size);
        st.slabs.push(SlabState { mem, free });
        Ok(st.slabs.len() - 1)
    }

    fn free(&self, slab: usize, offset: u64, len: u64) {
        let mut st = self.state.lock();
        st.used -= len;
        let free = &mut st.slabs[slab].free;
        let (mut start, mut size) = (offset, len);
        if let Some((&poff, &plen)) = free.range(..offset).next_back() {
            if poff + plen == offset {
                free.remove(&poff);
                start = poff;
                size += plen;
            }
        }
        if let Some(&nlen) = free.get(&(offset + len)) {
            free.remove(&(offset + len));
            size += nlen;
        }
        free.insert(start, size);
    }
}

impl Allocation {
    /// Bytes this allocation holds in the arena (aligned).
    pub fn reserved(&self) -> u64 {
        self.extent.reserved()
    }
}

impl ObjectBytes for Allocation {
    fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.extent.len()
    }
}

impl Drop for Allocation {
    fn drop(&mut self) {
        self.arena.free_extent(self.extent);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocations_are_aligned_and_counted() {
        let a = Arena::new(1 << 20, 1 << 20, Box::new(HostSlabs));
        let x = a.allocate(100).unwrap().unwrap();
        assert_eq!(x.as_ptr() as usize % ARENA_ALIGN as usize, 0);
        assert_eq!(a.usage().used, ARENA_ALIGN);
        drop(x);
        assert_eq!(a.usage().used, 0);
    }

    #[test]
    fn capacity_is_never_exceeded() {
        let a = Arena::new(64 * 1024, 16 * 1024, Box::new(HostSlabs));
        let held: Vec<_> = (0..16).map_while(|_| a.allocate(4096).unwrap()).collect();
        assert_eq!(held.len(), 16);
        assert!(a.allocate(1).unwrap().is_none());
        assert!(a.usage().slab_bytes <= 64 * 1024);
    }

    #[test]
    fn freed_neighbours_coalesce_into_one_run() {
        let a = Arena::new(1 << 20, 1 << 20, Box::new(HostSlabs));
        let parts: Vec<_> = (0..4).map(|_| a.allocate(256 * 1024).unwrap().unwrap()).collect();
        assert!(a.allocate(4096).unwrap().is_none());
        drop(parts);
        let whole = a.allocate(1 << 20).unwrap();
        assert!(whole.is_some(), "four freed quarters must coalesce");
    }

    #[test]
    fn objects_do_not_overlap() {
        let a = Arena::new(1 << 20, 256 * 1024, Box::new(HostSlabs));
        let xs: Vec<_> = (0..8).map(|i| a.allocate(5000 + i * 3000).unwrap().unwrap()).collect();
        let mut spans: Vec<(usize, usize)> = xs.iter().map(|x| (x.as_ptr() as usize, x.reserved() as usize)).collect();
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0);
        }
    }

    #[test]
    fn slabs_grow_from_2_mib_doubling_to_the_slab_size_and_fit_big_objects() {
        let a = Arena::new(1 << 30, 16 << 20, Box::new(HostSlabs));
        // A small first object takes a 2 MiB slab, not the 16 MiB slab size.
        let first = a.allocate(4096).unwrap().unwrap();
        assert_eq!(a.usage().slab_bytes, 2 << 20);
        // Filling it takes the next slabs at 4, 8, then 16 MiB (the cap).
        let mut held = vec![first];
        let mut sizes = vec![a.usage().slab_bytes];
        while a.usage().slab_bytes < (2 + 4 + 8 + 16 + 16) << 20 {
            held.push(a.allocate(1 << 20).unwrap().unwrap());
            if a.usage().slab_bytes != *sizes.last().unwrap() {
                sizes.push(a.usage().slab_bytes);
            }
        }
        let steps: Vec<u64> = sizes.windows(2).map(|w| (w[1] - w[0]) >> 20).collect();
        assert_eq!(steps, [4, 8, 16, 16]);
        // An object larger than the next step gets a slab of its own size.
        let fresh = Arena::new(1 << 30, 256 << 20, Box::new(HostSlabs));
        let _big = fresh.allocate(32 << 20).unwrap().unwrap();
        assert_eq!(fresh.usage().slab_bytes, 32 << 20);
    }
}

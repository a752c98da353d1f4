//! Shared host regions: sealed memfds that a client process maps itself
//! (the Python package's `kvcoord.shared_tensor` maps one with Python's
//! `mmap` and wraps it in a tensor), and the registry that finds the memfd
//! and offset behind an address inside one (a tensor's `data_ptr()`), so a
//! registration can send that memfd.
//!
//! This module owns the address-range bookkeeping only. It must never map
//! memory nor read it: the process that maps a region tells the registry
//! where ([`RegionRegistry::bind`]) and when it is gone
//! ([`RegionRegistry::release`]).

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::host::{sealed_memfd, HostMemoryError};

/// One sealed memfd of a fixed size.
#[derive(Debug)]
pub struct SharedRegion {
    fd: OwnedFd,
    len: u64,
}

impl SharedRegion {
    /// A new sealed memfd of `len` zeroed bytes (`len` > 0).
    pub fn create(name: &str, len: u64) -> Result<Self, HostMemoryError> {
        if len == 0 {
            return Err(HostMemoryError::Io {
                op: "shared region",
                source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "a shared region needs at least 1 byte"),
            });
        }
        Ok(SharedRegion { fd: sealed_memfd(name, len)?, len })
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Why an address could not be tied to a region.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegionError {
    #[error("address {addr:#x} is in no shared region")]
    NotShared { addr: u64 },
    #[error("{len} bytes at {addr:#x} run past the end of the shared region of {region_len} bytes at {base:#x}")]
    PastEnd { addr: u64, len: u64, base: u64, region_len: u64 },
    #[error("no shared region with id {0}")]
    UnknownId(u64),
    #[error("shared region {id} is already mapped at {base:#x}")]
    AlreadyBound { id: u64, base: u64 },
    #[error("{len} bytes at {base:#x} overlap another shared region")]
    Overlap { base: u64, len: u64 },
}

struct Entry {
    region: Arc<SharedRegion>,
    base: Option<u64>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    regions: BTreeMap<u64, Entry>,
    /// Base address -> id, for the regions that are mapped.
    by_base: BTreeMap<u64, u64>,
}

/// Regions of this process by id and by mapped address range.
pub struct RegionRegistry {
    inner: Mutex<Inner>,
}

impl Default for RegionRegistry {
    fn default() -> Self {
        Self::new()
    }
}

impl RegionRegistry {
    pub const fn new() -> Self {
        RegionRegistry { inner: Mutex::new(Inner { next_id: 1, regions: BTreeMap::new(), by_base: BTreeMap::new() }) }
    }

    /// Keeps `region` (not yet mapped); its id.
    pub fn insert(&self, region: SharedRegion) -> (u64, Arc<SharedRegion>) {
        let mut ix = self.inner.lock();
        let id = ix.next_id;
        ix.next_id += 1;
        let region = Arc::new(region);
        ix.regions.insert(id, Entry { region: region.clone(), base: None });
        (id, region)
    }

    /// Records that region `id` is mapped at `base`.
    pub fn bind(&self, id: u64, base: u64) -> Result<(), RegionError> {
        let mut ix = self.inner.lock();
        let len = match ix.regions.get(&id) {
            None => return Err(RegionError::UnknownId(id)),
            Some(Entry { base: Some(b), .. }) => return Err(RegionError::AlreadyBound { id, base: *b }),
            Some(e) => e.region.len,
        };
        let end = base.checked_add(len).ok_or(RegionError::Overlap { base, len })?;
        let before = ix.by_base.range(..end).next_back().map(|(&b, &other)| (b, other));
        if let Some((b, other)) = before {
            if b + ix.regions[&other].region.len > base {
                return Err(RegionError::Overlap { base, len });
            }
        }
        ix.by_base.insert(base, id);
        if let Some(e) = ix.regions.get_mut(&id) {
            e.base = Some(base);
        }
        Ok(())
    }

    /// Forgets region `id` (its mapping is gone); its memfd closes when the
    /// last holder (e.g. a registration) drops it. False if unknown.
    pub fn release(&self, id: u64) -> bool {
        let mut ix = self.inner.lock();
        let Some(e) = ix.regions.remove(&id) else { return false };
        if let Some(b) = e.base {
            ix.by_base.remove(&b);
        }
        true
    }

    /// The region holding all of `[addr, addr + len)`, and `addr`'s offset in it.
    pub fn resolve(&self, addr: u64, len: u64) -> Result<(Arc<SharedRegion>, u64), RegionError> {
        let ix = self.inner.lock();
        let (&base, id) = ix.by_base.range(..=addr).next_back().ok_or(RegionError::NotShared { addr })?;
        let region = &ix.regions[id].region;
        let offset = addr - base;
        if offset >= region.len {
            return Err(RegionError::NotShared { addr });
        }
        if len > region.len - offset {
            return Err(RegionError::PastEnd { addr, len, base, region_len: region.len });
        }
        Ok((region.clone(), offset))
    }

    /// Regions kept (mapped or not).
    pub fn len(&self) -> usize {
        self.inner.lock().regions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::fcntl::{fcntl, FcntlArg, SealFlag};

    fn registry_with(regions: &[(u64, u64)]) -> (RegionRegistry, Vec<u64>) {
        let r = RegionRegistry::new();
        let ids = regions
            .iter()
            .map(|&(base, len)| {
                let (id, _) = r.insert(SharedRegion::create("t", len).unwrap());
                r.bind(id, base).unwrap();
                id
            })
            .collect();
        (r, ids)
    }

    #[test]
    fn regions_are_sealed_memfds_of_their_size() {
        let region = SharedRegion::create("t", 12345).unwrap();
        let seals = SealFlag::from_bits_truncate(fcntl(region.fd(), FcntlArg::F_GET_SEALS).unwrap());
        assert!(seals.contains(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW));
        assert_eq!(std::fs::File::from(region.fd().try_clone_to_owned().unwrap()).metadata().unwrap().len(), 12345);
        assert!(SharedRegion::create("t", 0).is_err());
    }

    #[test]
    fn resolve_finds_region_and_offset_of_an_inner_range() {
        let (r, ids) = registry_with(&[(0x1000, 0x1000), (0x4000, 0x100)]);
        let (region, off) = r.resolve(0x1000, 0x1000).unwrap();
        assert_eq!((region.len(), off), (0x1000, 0));
        assert_eq!(r.resolve(0x1800, 0x10).unwrap().1, 0x800);
        assert_eq!(r.resolve(0x40ff, 1).unwrap().1, 0xff);
        assert_eq!(r.resolve(0xfff, 1).err(), Some(RegionError::NotShared { addr: 0xfff }));
        assert_eq!(r.resolve(0x2000, 1).err(), Some(RegionError::NotShared { addr: 0x2000 }), "one past the end");
        assert!(matches!(r.resolve(0x1800, 0x801), Err(RegionError::PastEnd { .. })));
        assert!(r.release(ids[0]));
        assert!(!r.release(ids[0]));
        assert_eq!(r.resolve(0x1000, 1).err(), Some(RegionError::NotShared { addr: 0x1000 }), "released");
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn overlapping_or_double_binds_are_refused() {
        let (r, ids) = registry_with(&[(0x1000, 0x1000)]);
        assert!(matches!(r.bind(ids[0], 0x9000), Err(RegionError::AlreadyBound { .. })));
        let (id, _) = r.insert(SharedRegion::create("t", 0x100).unwrap());
        assert!(matches!(r.bind(id, 0x1f00), Err(RegionError::Overlap { .. })));
        assert!(matches!(r.bind(id, 0xf80), Err(RegionError::Overlap { .. })));
        r.bind(id, 0x2000).unwrap();
        assert_eq!(r.bind(999, 0), Err(RegionError::UnknownId(999)));
    }

    #[test]
    fn a_region_outlives_its_registry_entry_while_held() {
        let (r, ids) = registry_with(&[(0x1000, 64)]);
        let (held, _) = r.resolve(0x1000, 64).unwrap();
        r.release(ids[0]);
        assert!(fcntl(held.fd(), FcntlArg::F_GET_SEALS).is_ok(), "the memfd is still open");
    }
}

//! The L1 store: which chunk objects the coordinator holds, in what state,
//! and which of them may be evicted.
//!
//! It owns the index (by model, rank and chunk hash), LRU order, eviction,
//! write tickets and leases. It is shared state behind one short lock, not an
//! actor, so lookups never queue behind copies: no copy ever runs under the
//! lock. It must never copy bytes itself.
//!
//! Object life cycle: `reserve` gives a [`WriteTicket`] (the object is
//! invisible to lookups and retrieves); `commit` makes it ready; dropping an
//! uncommitted ticket discards it. A ready object is evictable unless a lease
//! pins it. Readers hold the allocation through an `Arc`, so an evicted or
//! cleared object's memory is reused only after the last copy reading it ends.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvcoord_gpu::{Allocation, Arena};
use kvcoord_transport::{ChunkHash, LeaseId};
use lru::LruCache;
use parking_lot::Mutex;

/// Interned (model name, world size): chunks are shared by every instance of
/// the same model and TP degree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ModelId(pub u32);

/// The key of one chunk object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ObjectKey {
    pub model: ModelId,
    pub rank: u32,
    pub hash: ChunkHash,
}

struct Entry {
    object: Arc<Allocation>,
    pins: u32,
}

struct Lease {
    model: ModelId,
    hashes: Vec<ChunkHash>,
    /// Ranks whose share is still pinned.
    ranks: HashSet<u32>,
    expires: Instant,
    session: u64,
}

#[derive(Default)]
struct Counters {
    evictions: u64,
}

/// Keys are client-chosen hashes: a seeded hasher (foldhash, fast on 40-byte
/// keys, unlike SipHash) keeps crafted collisions from degrading the table.
type KeyHasher = foldhash::fast::RandomState;

struct Index {
    ready: LruCache<ObjectKey, Entry, KeyHasher>,
    writing: HashSet<ObjectKey, KeyHasher>,
    leases: HashMap<u64, Lease>,
    next_lease: u64,
    models: HashMap<(String, u32), ModelId>,
    counters: Counters,
}

/// Result of asking to store one chunk.
pub enum Reservation {
    /// Write the object into the ticket's allocation, then commit it.
    Write(WriteTicket),
    /// The chunk is already held (or being written by someone else).
    AlreadyPresent,
    /// No room, even after evicting every evictable object.
    NoSpace,
}

/// The right to write one new object. Commit makes it visible; dropping it
/// uncommitted discards it (nothing half-written is ever served).
pub struct WriteTicket {
    store: Arc<L1Store>,
    key: ObjectKey,
    object: Option<Allocation>,
}

/// Figures for stats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct L1Usage {
    pub capacity: u64,
    pub used: u64,
    pub slab_bytes: u64,
    pub objects: u64,
    pub writing: u64,
    pub evictions: u64,
    pub leases: u64,
    pub pinned: u64,
}

/// The L1 store. Share it as `Arc<L1Store>`.
pub struct L1Store {
    arena: Arena,
    index: Mutex<Index>,
    lease_ttl: Duration,
}

impl L1Store {
    pub fn new(arena: Arena, lease_ttl: Duration) -> Arc<Self> {
        Arc::new(L1Store {
            arena,
            index: Mutex::new(Index {
                ready: LruCache::unbounded_with_hasher(KeyHasher::default()),
                writing: HashSet::with_hasher(KeyHasher::default()),
                leases: HashMap::new(),
                next_lease: 1,
                models: HashMap::new(),
                counters: Counters::default(),
            }),
            lease_ttl,
        })
    }

    pub fn arena_source(&self) -> &'static str {
        self.arena.source_name()
    }

    /// The id of (model, world size), made on first use.
    pub fn model_id(&self, model: &str, world_size: u32) -> ModelId {
        let mut ix = self.index.lock();
        let next = ModelId(ix.models.len() as u32);
        *ix.models.entry((model.to_string(), world_size)).or_insert(next)
    }

    /// Reserves room for a new object of `bytes`, evicting least recently
    /// used unpinned objects as needed.
    pub fn reserve(self: &Arc<Self>, key: ObjectKey, bytes: u64) -> std::io::Result<Reservation> {
        let mut ix = self.index.lock();
        if ix.ready.get(&key).is_some() || ix.writing.contains(&key) {
            return Ok(Reservation::AlreadyPresent);
        }
        loop {
            if let Some(object) = self.arena.allocate(bytes)? {
                ix.writing.insert(key);
                return Ok(Reservation::Write(WriteTicket { store: self.clone(), key, object: Some(object) }));
            }
            let victim = ix.ready.iter().rev().find(|(_, e)| e.pins == 0).map(|(k, _)| *k);
            match victim {
                Some(k) => {
                    ix.ready.pop(&k);
                    ix.counters.evictions += 1;
                }
                None => return Ok(Reservation::NoSpace),
            }
        }
    }

    fn finish_write(&self, key: ObjectKey, object: Option<Allocation>) {
        let mut ix = self.index.lock();
        ix.writing.remove(&key);
        if let Some(object) = object {
            ix.ready.put(key, Entry { object: Arc::new(object), pins: 0 });
        }
    }

    /// The object's bytes for reading, if it is ready.
    pub fn read(&self, key: &ObjectKey) -> Option<Arc<Allocation>> {
        self.index.lock().ready.get(key).map(|e| e.object.clone())
    }

    /// How many leading chunks of `hashes` are ready for every rank of
    /// `world_size`; with `lease`, pins them until released or expired.
    pub fn lookup(
        &self,
        model: ModelId,
        world_size: u32,
        hashes: &[ChunkHash],
        lease: bool,
        session: u64,
    ) -> (u32, Option<LeaseId>) {
        let mut ix = self.index.lock();
        let mut found = 0usize;
        'chunks: for &hash in hashes {
            for rank in 0..world_size {
                if ix.ready.get(&ObjectKey { model, rank, hash }).is_none() {
                    break 'chunks;
                }
            }
            found += 1;
        }
        if !lease || found == 0 {
            return (found as u32, None);
        }
        for &hash in &hashes[..found] {
            for rank in 0..world_size {
                if let Some(e) = ix.ready.peek_mut(&ObjectKey { model, rank, hash }) {
                    e.pins += 1;
                }
            }
        }
        let id = ix.next_lease;
        ix.next_lease += 1;
        let l = Lease {
            model,
            hashes: hashes[..found].to_vec(),
            ranks: (0..world_size).collect(),
            expires: Instant::now() + self.lease_ttl,
            session,
        };
        ix.leases.insert(id, l);
        (found as u32, Some(LeaseId(id)))
    }

    fn unpin(ix: &mut Index, model: ModelId, rank: u32, hashes: &[ChunkHash]) {
        for &hash in hashes {
            if let Some(e) = ix.ready.peek_mut(&ObjectKey { model, rank, hash }) {
                e.pins = e.pins.saturating_sub(1);
            }
        }
    }

    /// Releases `rank`'s share of a lease (after that rank's retrieve).
    pub fn release_rank(&self, lease: LeaseId, rank: u32) {
        let mut ix = self.index.lock();
        let Some(l) = ix.leases.get_mut(&lease.0) else { return };
        if !l.ranks.remove(&rank) {
            return;
        }
        let (model, hashes, empty) = (l.model, l.hashes.clone(), l.ranks.is_empty());
        if empty {
            ix.leases.remove(&lease.0);
        }
        Self::unpin(&mut ix, model, rank, &hashes);
    }

    /// Releases a whole lease. Returns whether it existed.
    pub fn release(&self, lease: LeaseId) -> bool {
        let mut ix = self.index.lock();
        let Some(l) = ix.leases.remove(&lease.0) else { return false };
        for &rank in &l.ranks {
            Self::unpin(&mut ix, l.model, rank, &l.hashes);
        }
        true
    }

    /// Releases leases past their time to live. Returns how many.
    pub fn expire_leases(&self, now: Instant) -> usize {
        let expired: Vec<u64> = {
            let ix = self.index.lock();
            ix.leases.iter().filter(|(_, l)| l.expires <= now).map(|(id, _)| *id).collect()
        };
        expired.iter().filter(|&&id| self.release(LeaseId(id))).count()
    }

    /// Releases every lease a session took (the session's client is gone).
    pub fn release_session(&self, session: u64) -> usize {
        let ids: Vec<u64> = {
            let ix = self.index.lock();
            ix.leases.iter().filter(|(_, l)| l.session == session).map(|(id, _)| *id).collect()
        };
        ids.iter().filter(|&&id| self.release(LeaseId(id))).count()
    }

    /// Drops every ready object and lease. Objects being written finish
    /// normally. Returns how many objects were dropped.
    pub fn clear(&self) -> u64 {
        let mut ix = self.index.lock();
        let n = ix.ready.len() as u64;
        ix.ready.clear();
        ix.leases.clear();
        n
    }

    pub fn usage(&self) -> L1Usage {
        let ix = self.index.lock();
        let arena = self.arena.usage();
        L1Usage {
            capacity: arena.capacity,
            used: arena.used,
            slab_bytes: arena.slab_bytes,
            objects: ix.ready.len() as u64,
            writing: ix.writing.len() as u64,
            evictions: ix.counters.evictions,
            leases: ix.leases.len() as u64,
            pinned: ix.ready.iter().filter(|(_, e)| e.pins > 0).count() as u64,
        }
    }
}

impl WriteTicket {
    /// Where to write the object.
    pub fn object(&self) -> &Allocation {
        self.object.as_ref().expect("a ticket holds its allocation until commit or drop")
    }

    /// Makes the fully written object visible to lookups and retrieves.
    pub fn commit(mut self) {
        let object = self.object.take();
        self.store.finish_write(self.key, object);
    }
}

impl Drop for WriteTicket {
    fn drop(&mut self) {
        if self.object.is_some() {
            // Not committed: discard, so nothing half-written is ever served.
            self.object = None;
            self.store.finish_write(self.key, None);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(model: &L1Store, rank: u32, n: u8) -> ObjectKey {
        ObjectKey { model: model.model_id("m", 2), rank, hash: ChunkHash([n; 32]) }
    }

    fn store(l1: &Arc<L1Store>, k: ObjectKey) {
        match l1.reserve(k, 4096).unwrap() {
            Reservation::Write(t) => t.commit(),
            _ => panic!("expected room"),
        }
    }

    #[test]
    fn uncommitted_objects_are_invisible_and_dropping_discards_them() {
        let l1 = L1Store::new(Arena::host(1 << 20), Duration::from_secs(10));
        let k = key(&l1, 0, 1);
        let Reservation::Write(t) = l1.reserve(k, 4096).unwrap() else { panic!() };
        assert!(l1.read(&k).is_none());
        assert!(matches!(l1.reserve(k, 4096).unwrap(), Reservation::AlreadyPresent));
        drop(t);
        assert_eq!(l1.usage().used, 0);
        assert!(matches!(l1.reserve(k, 4096).unwrap(), Reservation::Write(_)));
    }

    #[test]
    fn lookup_counts_leading_chunks_held_by_every_rank() {
        let l1 = L1Store::new(Arena::host(1 << 20), Duration::from_secs(10));
        let m = l1.model_id("m", 2);
        for n in [1, 2, 3] {
            store(&l1, key(&l1, 0, n));
        }
        store(&l1, key(&l1, 1, 1));
        store(&l1, key(&l1, 1, 3));
        let hashes: Vec<_> = [1, 2, 3].map(|n| ChunkHash([n; 32])).to_vec();
        assert_eq!(l1.lookup(m, 2, &hashes, false, 0).0, 1, "chunk 2 lacks rank 1, so chunk 3 does not count");
    }

    #[test]
    fn eviction_takes_the_least_recent_and_never_a_leased_object() {
        let l1 =
            L1Store::new(Arena::new(3 * 4096, 4096, Box::new(kvcoord_gpu::arena::HostSlabs)), Duration::from_secs(10));
        let m = l1.model_id("m", 1);
        let k = |n| ObjectKey { model: m, rank: 0, hash: ChunkHash([n; 32]) };
        for n in 1..=3 {
            store(&l1, k(n));
        }
        let (found, lease) = l1.lookup(m, 1, &[ChunkHash([1; 32])], true, 0);
        assert_eq!(found, 1);
        store(&l1, k(4));
        assert!(l1.read(&k(1)).is_some(), "leased object survives");
        assert!(l1.read(&k(2)).is_none(), "least recent unleased object is evicted");
        l1.release(lease.unwrap());
        assert_eq!(l1.usage().pinned, 0);
    }

    #[test]
    fn everything_pinned_means_no_space() {
        let l1 = L1Store::new(Arena::new(4096, 4096, Box::new(kvcoord_gpu::arena::HostSlabs)), Duration::from_secs(10));
        let m = l1.model_id("m", 1);
        let k = |n| ObjectKey { model: m, rank: 0, hash: ChunkHash([n; 32]) };
        store(&l1, k(1));
        let _lease = l1.lookup(m, 1, &[ChunkHash([1; 32])], true, 0);
        assert!(matches!(l1.reserve(k(2), 4096).unwrap(), Reservation::NoSpace));
    }

    #[test]
    fn leases_expire_and_release_per_rank() {
        let l1 = L1Store::new(Arena::host(1 << 20), Duration::from_millis(0));
        let m = l1.model_id("m", 2);
        store(&l1, key(&l1, 0, 1));
        store(&l1, key(&l1, 1, 1));
        let (_, lease) = l1.lookup(m, 2, &[ChunkHash([1; 32])], true, 9);
        l1.release_rank(lease.unwrap(), 0);
        assert_eq!(l1.usage().leases, 1);
        assert_eq!(l1.usage().pinned, 1);
        assert_eq!(l1.expire_leases(Instant::now()), 1);
        assert_eq!(l1.usage().pinned, 0);
        let _ = l1.lookup(m, 2, &[ChunkHash([1; 32])], true, 9);
        assert_eq!(l1.release_session(9), 1);
        assert_eq!(l1.usage().leases, 0);
    }
}

//! The L1 store: which chunk objects the coordinator holds, in what state,
//! and which of them may be evicted.
//!
//! It owns the index (by model, rank and chunk hash), eviction, write tickets,
//! read guards and leases. It is shared state behind one short lock, not an
//! actor, so lookups never queue behind copies: no copy ever runs under the
//! lock. It must never copy bytes itself, and knows the tier below it (the
//! disk) only as a [`Tier`].
//!
//! Object life cycle: `reserve` gives a [`WriteTicket`] (the object is
//! invisible to lookups and retrieves); `commit` makes it ready; dropping an
//! uncommitted ticket discards it. A ready object is evictable unless a lease
//! pins it or a copy is reading it. Readers hold a [`ReadGuard`]; an object
//! evicted or cleared while read is "doomed": gone from the index at once,
//! its memory reused only when the last reader lets go.
//!
//! Tenants: every object is charged to the tenant that stored it. A tenant
//! with an L1 quota that would go over it evicts its own least recently used
//! objects first (and gets no space if none of its own is evictable); a full
//! L1 evicts anyone's. Leases carry the tenant that took them.
//!
//! Layout, for millions of entries: each object is one 64-byte [`Slot`] in a
//! paged array (key, 12-byte arena extent, last-used tick, pins, readers,
//! state), found through a `hashbrown::HashTable` of `u32` slot numbers.
//! Recency is a tick written on use, not a linked list: eviction samples
//! random slots and takes the least recently used evictable one (Redis-style
//! approximate LRU), falling back to a full scan before it says "no space".

use std::collections::HashMap;
use std::collections::HashSet;
use std::hash::BuildHasher;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hashbrown::HashTable;
use kvcoord_memory::{Arena, Extent, ObjectBytes};
use kvcoord_transport::{ChunkHash, LeaseId};
use parking_lot::Mutex;

use super::access::TenantId;
use super::keys::{ModelId, ObjectKey};
use super::tier::{Exclusive, Tier};

/// Keys are client-chosen hashes: a seeded hasher keeps crafted collisions
/// from degrading the table.
type KeyHasher = foldhash::fast::RandomState;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SlotState {
    Free,
    Writing,
    Ready,
    /// Removed from the index while a reader still holds it.
    Doomed,
}

#[derive(Clone, Copy)]
struct Slot {
    key: ObjectKey,
    extent: Extent,
    last_used: u32,
    pins: u16,
    readers: u16,
    /// The tenant charged for it.
    tenant: u16,
    state: SlotState,
}

const EMPTY: Slot = Slot {
    key: ObjectKey { model: ModelId(0), rank: 0, hash: ChunkHash([0; 32]) },
    extent: Extent::EMPTY,
    last_used: 0,
    pins: 0,
    readers: 0,
    tenant: 0,
    state: SlotState::Free,
};

/// Slots in pages of 64Ki, so growth never copies (or doubles) the array.
const PAGE_SLOTS: usize = 1 << 16;

#[derive(Default)]
struct Slots {
    pages: Vec<Box<[Slot]>>,
    used: usize,
    free: Vec<u32>,
}

impl Slots {
    fn get(&self, i: u32) -> &Slot {
        &self.pages[i as usize / PAGE_SLOTS][i as usize % PAGE_SLOTS]
    }
    fn get_mut(&mut self, i: u32) -> &mut Slot {
        &mut self.pages[i as usize / PAGE_SLOTS][i as usize % PAGE_SLOTS]
    }
    fn take(&mut self, slot: Slot) -> u32 {
        let i = match self.free.pop() {
            Some(i) => i,
            None => {
                if self.used == self.pages.len() * PAGE_SLOTS {
                    self.pages.push(vec![EMPTY; PAGE_SLOTS].into_boxed_slice());
                }
                self.used += 1;
                (self.used - 1) as u32
            }
        };
        *self.get_mut(i) = slot;
        i
    }
    fn give_back(&mut self, i: u32) {
        *self.get_mut(i) = EMPTY;
        self.free.push(i);
    }
}

struct Lease {
    model: ModelId,
    hashes: Vec<ChunkHash>,
    /// Ranks whose share is still pinned.
    ranks: HashSet<u32>,
    expires: Instant,
    session: u64,
    tenant: TenantId,
}

/// One tenant's share of L1.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TenantUsage {
    /// Bytes of its objects in the index (being written or ready).
    pub used: u64,
    pub quota: Option<u64>,
    /// Its objects evicted (for its quota or for room).
    pub evictions: u64,
}

struct Index {
    table: HashTable<u32>,
    slots: Slots,
    hasher: KeyHasher,
    tick: u32,
    rng: u64,
    ready: u64,
    writing: u64,
    pinned: u64,
    evictions: u64,
    leases: HashMap<u128, Lease>,
    models: HashMap<(String, u32), ModelId>,
    tenants: Vec<TenantUsage>,
}

/// What a remote tier holds of a lookup's chunks from `from` on: `held[(c -
/// from) * world_size + rank]` for chunk `c`, as a probe answered it.
pub struct RemoteHeld {
    pub from: usize,
    pub held: Vec<bool>,
}

impl RemoteHeld {
    fn holds(&self, chunk: usize, rank: u32, world_size: u32) -> bool {
        chunk
            .checked_sub(self.from)
            .and_then(|c| self.held.get(c * world_size as usize + rank as usize))
            .copied()
            .unwrap_or(false)
    }
}

/// Result of asking to store one chunk.
pub enum Reservation {
    /// Write the object through the ticket, then commit it.
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
    slot: u32,
    ptr: *mut u8,
    len: usize,
    committed: bool,
}

/// A ready object being read by a copy; its memory stays until dropped.
pub struct ReadGuard {
    store: Arc<L1Store>,
    slot: u32,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a ticket is the only writer of its object's bytes (the slot is in
// the Writing state, invisible to readers, until commit), and its pointer
// stays valid until the ticket is committed or dropped (the extent is freed
// only then, under the index lock). Moving it to the copy thread is sound.
unsafe impl Send for WriteTicket {}
// SAFETY: `&WriteTicket` only exposes the pointer and length.
unsafe impl Sync for WriteTicket {}
// SAFETY: a ticket's object is in the Writing state, invisible to lookups and
// readers, until the ticket commits or drops; the ticket is its only writer.
unsafe impl Exclusive for WriteTicket {}
// SAFETY: a guard's object is Ready (no writer) or Doomed (no writer, and its
// extent is freed only after the last guard drops), so reading its bytes
// from any thread while the guard lives is sound.
unsafe impl Send for ReadGuard {}
// SAFETY: see `Send`; `&ReadGuard` only exposes the pointer and length.
unsafe impl Sync for ReadGuard {}

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
    /// The local tier below (the disk): lookups count chunks held there too.
    lower: std::sync::OnceLock<Arc<dyn Tier>>,
}

/// Random slots examined per eviction round, and rounds before a full scan.
const SAMPLES: usize = 16;
const ROUNDS: usize = 4;

impl Index {
    fn find(&self, key: &ObjectKey) -> Option<u32> {
        let h = self.hasher.hash_one(key);
        self.table.find(h, |&i| self.slots.get(i).key == *key).copied()
    }

    fn touch(&mut self, i: u32) {
        self.tick = self.tick.wrapping_add(1);
        let t = self.tick;
        self.slots.get_mut(i).last_used = t;
    }

    /// Takes a ready object out of the index; frees it now if nobody reads
    /// it, else dooms it (freed by its last reader).
    fn remove_ready(&mut self, i: u32, arena: &Arena) {
        let slot = *self.slots.get(i);
        debug_assert_eq!(slot.state, SlotState::Ready);
        let h = self.hasher.hash_one(slot.key);
        if let Ok(entry) = self.table.find_entry(h, |&j| j == i) {
            entry.remove();
        }
        self.ready -= 1;
        if slot.pins > 0 {
            self.pinned -= 1;
        }
        self.charge(slot.tenant, -(slot.extent.len() as i64));
        if slot.readers == 0 {
            arena.free_extent(slot.extent);
            self.slots.give_back(i);
        } else {
            let s = self.slots.get_mut(i);
            s.state = SlotState::Doomed;
            s.pins = 0;
        }
    }

    fn usage_of(&mut self, tenant: u16) -> &mut TenantUsage {
        let t = tenant as usize;
        if t >= self.tenants.len() {
            self.tenants.resize(t + 1, TenantUsage::default());
        }
        &mut self.tenants[t]
    }

    /// Adds `bytes` (negative: takes them back) to `tenant`'s use.
    fn charge(&mut self, tenant: u16, bytes: i64) {
        let u = self.usage_of(tenant);
        u.used = u.used.saturating_add_signed(bytes);
    }

    /// Evicts ready object `i`, counting it against its tenant.
    fn evict(&mut self, i: u32, arena: &Arena) {
        let tenant = self.slots.get(i).tenant;
        self.remove_ready(i, arena);
        self.evictions += 1;
        self.usage_of(tenant).evictions += 1;
    }

    fn evictable(s: &Slot) -> bool {
        s.state == SlotState::Ready && s.pins == 0 && s.readers == 0
    }

    /// The least recently used of a few random evictable objects (of
    /// `tenant` only, if given), or any such object at all (full scan) when
    /// sampling finds none.
    fn victim(&mut self, tenant: Option<u16>) -> Option<u32> {
        let n = self.slots.used as u64;
        if n == 0 || self.ready == 0 {
            return None;
        }
        let fits = |s: &Slot| Self::evictable(s) && tenant.is_none_or(|t| s.tenant == t);
        // A tenant's objects may be few among many: sample longer for them.
        let rounds = if tenant.is_some() { 4 * ROUNDS } else { ROUNDS };
        for _ in 0..rounds {
            let mut best: Option<(u32, u32)> = None;
            for _ in 0..SAMPLES {
                // xorshift64: cheap, and good enough to pick slots.
                self.rng ^= self.rng << 13;
                self.rng ^= self.rng >> 7;
                self.rng ^= self.rng << 17;
                let i = (self.rng % n) as u32;
                let s = self.slots.get(i);
                if fits(s) {
                    let age = self.tick.wrapping_sub(s.last_used);
                    if best.is_none_or(|(_, a)| age > a) {
                        best = Some((i, age));
                    }
                }
            }
            if let Some((i, _)) = best {
                return Some(i);
            }
        }
        (0..n as u32).find(|&i| fits(self.slots.get(i)))
    }

    fn unpin(&mut self, model: ModelId, rank: u32, hashes: &[ChunkHash]) {
        for &hash in hashes {
            if let Some(i) = self.find(&ObjectKey { model, rank, hash }) {
                let s = self.slots.get_mut(i);
                if s.state == SlotState::Ready && s.pins > 0 {
                    s.pins -= 1;
                    if s.pins == 0 {
                        self.pinned -= 1;
                    }
                }
            }
        }
    }
}

impl L1Store {
    pub fn new(arena: Arena, lease_ttl: Duration) -> Arc<Self> {
        Arc::new(L1Store {
            arena,
            index: Mutex::new(Index {
                table: HashTable::new(),
                slots: Slots::default(),
                hasher: KeyHasher::default(),
                tick: 0,
                rng: rand::random::<u64>() | 1,
                ready: 0,
                writing: 0,
                pinned: 0,
                evictions: 0,
                leases: HashMap::new(),
                models: HashMap::new(),
                tenants: vec![TenantUsage::default()],
            }),
            lease_ttl,
            lower: std::sync::OnceLock::new(),
        })
    }

    /// Makes lookups see the local tier below L1 too (a remote tier is
    /// probed by the caller and passed to [`L1Store::lookup_with`]).
    pub fn attach_lower_tier(&self, tier: Arc<dyn Tier>) {
        let _ = self.lower.set(tier);
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

    /// The id of (model, world size) if anything ever made it; never makes
    /// one, so a lookup for a model nobody registered leaves no trace.
    pub fn find_model(&self, model: &str, world_size: u32) -> Option<ModelId> {
        self.index.lock().models.get(&(model.to_string(), world_size)).copied()
    }

    /// Sets every tenant's L1 quota (index: tenant id); at start.
    pub fn set_quotas(&self, quotas: &[Option<u64>]) {
        let mut ix = self.index.lock();
        for (t, q) in quotas.iter().enumerate() {
            ix.usage_of(t as u16).quota = *q;
        }
    }

    /// Every tenant's share of L1 (index: tenant id).
    pub fn tenant_usage(&self) -> Vec<TenantUsage> {
        self.index.lock().tenants.clone()
    }

    /// Reserves room for a new object of `bytes` for the default tenant.
    pub fn reserve(self: &Arc<Self>, key: ObjectKey, bytes: u64) -> std::io::Result<Reservation> {
        self.reserve_for(key, bytes, TenantId::DEFAULT)
    }

    /// Reserves room for a new object of `bytes` charged to `tenant`: over
    /// its quota, its own least recently used objects are evicted first;
    /// then, while L1 is full, anyone's.
    pub fn reserve_for(self: &Arc<Self>, key: ObjectKey, bytes: u64, tenant: TenantId) -> std::io::Result<Reservation> {
        let mut ix = self.index.lock();
        if let Some(i) = ix.find(&key) {
            if ix.slots.get(i).state == SlotState::Ready {
                ix.touch(i);
            }
            return Ok(Reservation::AlreadyPresent);
        }
        let t = tenant.0;
        if let Some(quota) = ix.usage_of(t).quota {
            if bytes > quota {
                return Ok(Reservation::NoSpace);
            }
            while ix.usage_of(t).used + bytes > quota {
                match ix.victim(Some(t)) {
                    Some(i) => ix.evict(i, &self.arena),
                    None => return Ok(Reservation::NoSpace),
                }
            }
        }
        let extent = loop {
            if let Some(e) = self.arena.allocate_extent(bytes)? {
                break e;
            }
            match ix.victim(None) {
                Some(i) => ix.evict(i, &self.arena),
                None => return Ok(Reservation::NoSpace),
            }
        };
        ix.charge(t, extent.len() as i64);
        ix.tick = ix.tick.wrapping_add(1);
        let slot = Slot { key, extent, last_used: ix.tick, pins: 0, readers: 0, tenant: t, state: SlotState::Writing };
        let i = ix.slots.take(slot);
        let h = ix.hasher.hash_one(key);
        let Index { table, slots, hasher, .. } = &mut *ix;
        table.insert_unique(h, i, |&j| hasher.hash_one(slots.get(j).key));
        ix.writing += 1;
        let (ptr, len) = (self.arena.ptr(&extent), extent.len());
        Ok(Reservation::Write(WriteTicket { store: self.clone(), slot: i, ptr, len, committed: false }))
    }

    fn finish_write(&self, i: u32, commit: bool) {
        let mut ix = self.index.lock();
        ix.writing -= 1;
        if commit {
            ix.tick = ix.tick.wrapping_add(1);
            let t = ix.tick;
            let s = ix.slots.get_mut(i);
            s.state = SlotState::Ready;
            s.last_used = t;
            ix.ready += 1;
            return;
        }
        let slot = *ix.slots.get(i);
        let h = ix.hasher.hash_one(slot.key);
        if let Ok(entry) = ix.table.find_entry(h, |&j| j == i) {
            entry.remove();
        }
        ix.charge(slot.tenant, -(slot.extent.len() as i64));
        self.arena.free_extent(slot.extent);
        ix.slots.give_back(i);
    }

    /// The object's bytes for reading, if it is ready.
    pub fn read(self: &Arc<Self>, key: &ObjectKey) -> Option<ReadGuard> {
        let mut ix = self.index.lock();
        let i = ix.find(key)?;
        let s = ix.slots.get(i);
        if s.state != SlotState::Ready || s.readers == u16::MAX {
            return None;
        }
        let extent = s.extent;
        ix.slots.get_mut(i).readers += 1;
        ix.touch(i);
        Some(ReadGuard { store: self.clone(), slot: i, ptr: self.arena.ptr(&extent), len: extent.len() })
    }

    fn finish_read(&self, i: u32) {
        let mut ix = self.index.lock();
        let s = ix.slots.get_mut(i);
        s.readers -= 1;
        if s.state == SlotState::Doomed && s.readers == 0 {
            let extent = s.extent;
            self.arena.free_extent(extent);
            ix.slots.give_back(i);
        }
    }

    /// How many leading chunks of `hashes` are ready for every rank of
    /// `world_size`; with `lease`, pins them until released or expired, in a
    /// lease of `session` for `tenant`'s sessions.
    pub fn lookup(
        &self,
        model: ModelId,
        world_size: u32,
        hashes: &[ChunkHash],
        lease: bool,
        who: (u64, TenantId),
    ) -> (u32, Option<LeaseId>) {
        self.lookup_with(model, world_size, hashes, lease, who, None)
    }

    /// [`L1Store::lookup`], also counting objects a remote tier was found to
    /// hold (`remote`, probed before the lock was taken). Leases pin only
    /// what is in L1: remote objects are read when retrieved.
    pub fn lookup_with(
        &self,
        model: ModelId,
        world_size: u32,
        hashes: &[ChunkHash],
        lease: bool,
        (session, tenant): (u64, TenantId),
        remote: Option<&RemoteHeld>,
    ) -> (u32, Option<LeaseId>) {
        let mut ix = self.index.lock();
        let mut found = 0usize;
        let lower = self.lower.get();
        'chunks: for (c, &hash) in hashes.iter().enumerate() {
            for rank in 0..world_size {
                let key = ObjectKey { model, rank, hash };
                match ix.find(&key) {
                    Some(i) if ix.slots.get(i).state == SlotState::Ready => ix.touch(i),
                    _ if lower.is_some_and(|t| t.contains(&key)) => {}
                    _ if remote.is_some_and(|r| r.holds(c, rank, world_size)) => {}
                    _ => break 'chunks,
                }
            }
            found += 1;
        }
        if !lease || found == 0 {
            return (found as u32, None);
        }
        for &hash in &hashes[..found] {
            for rank in 0..world_size {
                if let Some(i) = ix.find(&ObjectKey { model, rank, hash }) {
                    let s = ix.slots.get_mut(i);
                    s.pins = s.pins.saturating_add(1);
                    if s.pins == 1 {
                        ix.pinned += 1;
                    }
                }
            }
        }
        // Random, so a lease id cannot be guessed from another's.
        let id = loop {
            let id = rand::random::<u128>();
            if !ix.leases.contains_key(&id) {
                break id;
            }
        };
        let l = Lease {
            model,
            hashes: hashes[..found].to_vec(),
            ranks: (0..world_size).collect(),
            expires: Instant::now() + self.lease_ttl,
            session,
            tenant,
        };
        ix.leases.insert(id, l);
        (found as u32, Some(LeaseId(id)))
    }

    /// The tenant whose sessions may use `lease`, while it exists.
    pub fn lease_tenant(&self, lease: LeaseId) -> Option<TenantId> {
        self.index.lock().leases.get(&lease.0).map(|l| l.tenant)
    }

    /// Releases `rank`'s share of a lease (after that rank's retrieve).
    pub fn release_rank(&self, lease: LeaseId, rank: u32) {
        let mut ix = self.index.lock();
        let Some(l) = ix.leases.get_mut(&lease.0) else { return };
        if !l.ranks.remove(&rank) {
            return;
        }
        let (model, empty) = (l.model, l.ranks.is_empty());
        let hashes = if empty {
            ix.leases.remove(&lease.0).map(|l| l.hashes)
        } else {
            ix.leases.get(&lease.0).map(|l| l.hashes.clone())
        };
        ix.unpin(model, rank, &hashes.unwrap_or_default());
    }

    /// Releases a whole lease. Returns whether it existed.
    pub fn release(&self, lease: LeaseId) -> bool {
        let mut ix = self.index.lock();
        let Some(l) = ix.leases.remove(&lease.0) else { return false };
        for &rank in &l.ranks {
            ix.unpin(l.model, rank, &l.hashes);
        }
        true
    }

    /// Releases leases past their time to live. Returns how many.
    pub fn expire_leases(&self, now: Instant) -> usize {
        let expired: Vec<u128> = {
            let ix = self.index.lock();
            ix.leases.iter().filter(|(_, l)| l.expires <= now).map(|(id, _)| *id).collect()
        };
        let n = expired.iter().filter(|&&id| self.release(LeaseId(id))).count();
        if n > 0 {
            // A burst of leases must not keep its table once they are gone.
            let mut ix = self.index.lock();
            if ix.leases.capacity() > 64 && ix.leases.len() * 4 < ix.leases.capacity() {
                ix.leases.shrink_to_fit();
            }
        }
        n
    }

    /// Releases every lease a session took (the session's client is gone).
    pub fn release_session(&self, session: u64) -> usize {
        let ids: Vec<u128> = {
            let ix = self.index.lock();
            ix.leases.iter().filter(|(_, l)| l.session == session).map(|(id, _)| *id).collect()
        };
        ids.iter().filter(|&&id| self.release(LeaseId(id))).count()
    }

    /// Drops every ready object and lease. Objects being written finish
    /// normally; objects being read go when their readers finish. Returns
    /// how many objects were dropped.
    pub fn clear(&self) -> u64 {
        let mut ix = self.index.lock();
        let dropped = ix.ready;
        ix.leases.clear();
        for i in 0..ix.slots.used as u32 {
            if ix.slots.get(i).state == SlotState::Ready {
                ix.remove_ready(i, &self.arena);
            }
        }
        dropped
    }

    pub fn usage(&self) -> L1Usage {
        let ix = self.index.lock();
        let arena = self.arena.usage();
        L1Usage {
            capacity: arena.capacity,
            used: arena.used,
            slab_bytes: arena.slab_bytes,
            objects: ix.ready,
            writing: ix.writing,
            evictions: ix.evictions,
            leases: ix.leases.len() as u64,
            pinned: ix.pinned,
        }
    }
}

impl WriteTicket {
    /// Makes the fully written object visible to lookups and retrieves.
    pub fn commit(mut self) {
        self.committed = true;
        self.store.finish_write(self.slot, true);
    }
}

impl ObjectBytes for WriteTicket {
    fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
}

impl Drop for WriteTicket {
    fn drop(&mut self) {
        if !self.committed {
            // Not committed: discard, so nothing half-written is ever served.
            self.store.finish_write(self.slot, false);
        }
    }
}

impl ObjectBytes for ReadGuard {
    fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
}

impl Drop for ReadGuard {
    fn drop(&mut self) {
        self.store.finish_read(self.slot);
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
    fn find_model_never_interns() {
        let l1 = L1Store::new(Arena::host(1 << 20), Duration::from_secs(10));
        assert_eq!(l1.find_model("m", 2), None);
        assert_eq!(l1.find_model("m", 2), None, "asking did not make it");
        let m = l1.model_id("m", 2);
        assert_eq!(l1.find_model("m", 2), Some(m));
        assert_eq!(l1.find_model("m", 4), None, "world size is part of the key");
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
        let who = (0, TenantId::DEFAULT);
        assert_eq!(l1.lookup(m, 2, &hashes, false, who).0, 1, "chunk 2 lacks rank 1, so chunk 3 does not count");
        let remote = RemoteHeld { from: 1, held: vec![false, true, false, false] };
        assert_eq!(l1.lookup_with(m, 2, &hashes, false, who, Some(&remote)).0, 3, "the remote holds chunk 2's rank 1");
        let remote = RemoteHeld { from: 1, held: vec![true, false, true, true] };
        assert_eq!(l1.lookup_with(m, 2, &hashes, false, who, Some(&remote)).0, 1, "nobody holds chunk 2's rank 1");
    }

    #[test]
    fn eviction_takes_the_least_recent_and_never_a_leased_object() {
        let l1 = L1Store::new(
            Arena::new(3 * 4096, 4096, Box::new(kvcoord_memory::arena::HostSlabs)),
            Duration::from_secs(10),
        );
        let m = l1.model_id("m", 1);
        let k = |n| ObjectKey { model: m, rank: 0, hash: ChunkHash([n; 32]) };
        for n in 1..=3 {
            store(&l1, k(n));
        }
        let (found, lease) = l1.lookup(m, 1, &[ChunkHash([1; 32])], true, (0, TenantId::DEFAULT));
        assert_eq!(found, 1);
        store(&l1, k(4));
        assert!(l1.read(&k(1)).is_some(), "leased object survives");
        assert!(l1.read(&k(2)).is_none(), "least recent unleased object is evicted");
        l1.release(lease.unwrap());
        assert_eq!(l1.usage().pinned, 0);
    }

    #[test]
    fn everything_pinned_means_no_space() {
        let l1 =
            L1Store::new(Arena::new(4096, 4096, Box::new(kvcoord_memory::arena::HostSlabs)), Duration::from_secs(10));
        let m = l1.model_id("m", 1);
        let k = |n| ObjectKey { model: m, rank: 0, hash: ChunkHash([n; 32]) };
        store(&l1, k(1));
        let _lease = l1.lookup(m, 1, &[ChunkHash([1; 32])], true, (0, TenantId::DEFAULT));
        assert!(matches!(l1.reserve(k(2), 4096).unwrap(), Reservation::NoSpace));
    }

    #[test]
    fn an_object_evicted_while_read_keeps_its_bytes_until_the_reader_finishes() {
        let l1 =
            L1Store::new(Arena::new(4096, 4096, Box::new(kvcoord_memory::arena::HostSlabs)), Duration::from_secs(10));
        let m = l1.model_id("m", 1);
        let k = |n| ObjectKey { model: m, rank: 0, hash: ChunkHash([n; 32]) };
        store(&l1, k(1));
        let reading = l1.read(&k(1)).unwrap();
        assert!(matches!(l1.reserve(k(2), 4096).unwrap(), Reservation::NoSpace), "a read object is not evicted");
        assert_eq!(l1.clear(), 1);
        assert!(l1.read(&k(1)).is_none(), "cleared objects are gone from the index at once");
        assert_eq!(l1.usage().used, 4096, "but their memory stays while read");
        drop(reading);
        assert_eq!(l1.usage().used, 0);
        store(&l1, k(2));
    }

    #[test]
    fn eviction_prefers_the_least_recently_used_among_many() {
        let l1 = L1Store::new(
            Arena::new(64 * 4096, 64 * 4096, Box::new(kvcoord_memory::arena::HostSlabs)),
            Duration::from_secs(10),
        );
        let m = l1.model_id("m", 1);
        let k = |n: u8| ObjectKey { model: m, rank: 0, hash: ChunkHash([n; 32]) };
        for n in 0..64 {
            store(&l1, k(n));
        }
        // Touch the second half: the first half is older.
        for n in 32..64 {
            assert!(l1.read(&k(n)).is_some());
        }
        for n in 100..116 {
            store(&l1, k(n));
        }
        let recent_kept = (32..64).filter(|&n| l1.read(&k(n)).is_some()).count();
        assert!(recent_kept >= 28, "sampled LRU evicts mostly old objects; kept {recent_kept} of 32 recent");
        assert_eq!(l1.usage().evictions, 16);
    }

    #[test]
    fn leases_expire_and_release_per_rank() {
        let l1 = L1Store::new(Arena::host(1 << 20), Duration::from_millis(0));
        let m = l1.model_id("m", 2);
        store(&l1, key(&l1, 0, 1));
        store(&l1, key(&l1, 1, 1));
        let (_, lease) = l1.lookup(m, 2, &[ChunkHash([1; 32])], true, (9, TenantId::DEFAULT));
        l1.release_rank(lease.unwrap(), 0);
        assert_eq!(l1.usage().leases, 1);
        assert_eq!(l1.usage().pinned, 1);
        assert_eq!(l1.expire_leases(Instant::now()), 1);
        assert_eq!(l1.usage().pinned, 0);
        let _ = l1.lookup(m, 2, &[ChunkHash([1; 32])], true, (9, TenantId::DEFAULT));
        assert_eq!(l1.release_session(9), 1);
        assert_eq!(l1.usage().leases, 0);
    }

    #[test]
    fn a_tenant_over_its_quota_evicts_its_own_objects_first_and_never_anothers() {
        let l1 = L1Store::new(
            Arena::new(16 * 4096, 16 * 4096, Box::new(kvcoord_memory::arena::HostSlabs)),
            Duration::from_secs(10),
        );
        let (a, b) = (TenantId(1), TenantId(2));
        l1.set_quotas(&[None, Some(3 * 4096), None]);
        let m = l1.model_id("m", 1);
        let k = |n: u8| ObjectKey { model: m, rank: 0, hash: ChunkHash([n; 32]) };
        let put = |n: u8, t: TenantId| match l1.reserve_for(k(n), 4096, t).unwrap() {
            Reservation::Write(w) => w.commit(),
            _ => panic!("expected room for {n}"),
        };
        // b's objects are the oldest in L1; a fills its quota after them.
        for n in 1..=4 {
            put(n, b);
        }
        for n in 10..=12 {
            put(n, a);
        }
        put(13, a);
        // Eviction samples for the least recent (approximate LRU): one of a's
        // older objects went, never the one just written, never b's.
        let gone: Vec<u8> = (10..=12).filter(|&n| l1.read(&k(n)).is_none()).collect();
        assert_eq!(gone.len(), 1, "exactly one of a's own objects went: {gone:?}");
        assert!(l1.read(&k(13)).is_some(), "a's newest object stayed");
        assert!((1..=4).all(|n| l1.read(&k(n)).is_some()), "b's older objects stayed");
        let usage = l1.tenant_usage();
        assert_eq!((usage[1].used, usage[1].evictions), (3 * 4096, 1));
        assert_eq!((usage[2].used, usage[2].evictions), (4 * 4096, 0));
        // Nothing of a's evictable (all leased): no space, still nobody else's.
        let hashes: Vec<_> = (10..=13).filter(|n| !gone.contains(n)).map(|n| ChunkHash([n; 32])).collect();
        let (found, _lease) = l1.lookup(m, 1, &hashes, true, (7, a));
        assert_eq!(found, 3);
        assert!(matches!(l1.reserve_for(k(14), 4096, a).unwrap(), Reservation::NoSpace));
        assert!(matches!(l1.reserve_for(k(15), 8 * 4096, a).unwrap(), Reservation::NoSpace), "larger than the quota");
        assert_eq!(l1.usage().objects, 7);
    }

    #[test]
    fn leases_are_random_and_carry_their_tenant() {
        let l1 = L1Store::new(Arena::host(1 << 20), Duration::from_secs(10));
        let m = l1.model_id("m", 1);
        store(&l1, ObjectKey { model: m, rank: 0, hash: ChunkHash([1; 32]) });
        let (_, x) = l1.lookup(m, 1, &[ChunkHash([1; 32])], true, (1, TenantId(3)));
        let (_, y) = l1.lookup(m, 1, &[ChunkHash([1; 32])], true, (1, TenantId(3)));
        let (x, y) = (x.unwrap(), y.unwrap());
        assert_ne!(x, y);
        assert!(x.0 > u64::MAX as u128 || y.0 > u64::MAX as u128, "128 random bits (both below 2^64: p = 2^-128)");
        assert_eq!(l1.lease_tenant(x), Some(TenantId(3)));
        assert!(l1.release(x));
        assert_eq!(l1.lease_tenant(x), None);
    }
}

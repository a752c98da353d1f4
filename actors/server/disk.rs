//! Tier 2: chunk objects on local disk, so a restarted coordinator comes back
//! warm. One file per object:
//!
//! ```text
//! "KVC1" | header length: u32 LE | header (bincode: model, world size, rank,
//! chunk hash, payload length) | payload | blake3(header || payload): 32 bytes
//! ```
//!
//! Crash safety: a file is written under a temporary name and renamed into
//! place only when complete, so a name ending in `.kvc` is never a partial
//! write by this process. What a crash or a bad disk can still do (lose the
//! tail of a renamed file's data, flip bits) is caught by the length check at
//! start and the checksum at every read: such an object is dropped and
//! counted, never served. Leftover temporary files are deleted at start.
//!
//! Writes are behind the store path: a committed L1 object is queued (its
//! memory held by a read guard) for one writer thread; the queue is bounded
//! in bytes and a store never waits for it. Capacity is kept by evicting the
//! least recently used files. A failed write (disk full, I/O error) is
//! counted and logged; the object simply stays L1-only.
//!
//! Reads run on [`READER_THREADS`] reader threads of their own, never on the
//! caller's thread nor a copy lane: a retrieve asks for a read, and the
//! bytes come back through the read's one-shot channel.
//!
//! It implements [`Tier`]; nothing above it names `DiskTier` except the
//! coordinator's start. This module must never hold the L1 lock while doing
//! I/O, and never import L1 or an actor.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use kvcoord_memory::ObjectBytes;
use kvcoord_transport::ChunkHash;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::keys::{ModelId, ObjectKey};
use super::tier::{Tier, TierRead, TierReadError, TierStats, WriteBehind};

const MAGIC: &[u8; 4] = b"KVC1";
/// Threads reading objects back for retrieves (each read is one file's
/// open, read and checksum; a few in parallel keep a retrieve of many chunks
/// from queueing behind one slow read).
pub const READER_THREADS: usize = 4;
const MAX_HEADER: u32 = 4096;

#[derive(Serialize, Deserialize)]
struct Header {
    model: String,
    world_size: u32,
    rank: u32,
    hash: ChunkHash,
    payload: u64,
}

struct Entry {
    file: String,
    bytes: u64,
    last_used: u64,
}

/// Counters for stats.
#[derive(Default)]
struct DiskCounters {
    hits: AtomicU64,
    writes: AtomicU64,
    write_errors: AtomicU64,
    corrupt: AtomicU64,
    recovered: AtomicU64,
    skipped: AtomicU64,
    evictions: AtomicU64,
}

/// The disk tier. Share it as `Arc<dyn Tier>`.
pub struct DiskTier {
    dir: PathBuf,
    capacity: u64,
    index: Mutex<DiskIndex>,
    queue: std::sync::mpsc::SyncSender<WriteBehind>,
    reads: std::sync::mpsc::Sender<TierRead>,
    backlog: AtomicU64,
    max_backlog: u64,
    counters: DiskCounters,
}

struct DiskIndex {
    entries: HashMap<ObjectKey, Entry, foldhash::fast::RandomState>,
    used: u64,
    tick: u64,
}

fn file_name(model: &str, world_size: u32, rank: u32, hash: &ChunkHash) -> String {
    let mut h = blake3::Hasher::new();
    h.update(model.as_bytes());
    h.update(&world_size.to_le_bytes());
    h.update(&rank.to_le_bytes());
    h.update(&hash.0);
    let hex: String = h.finalize().as_bytes()[..16].iter().map(|b| format!("{b:02x}")).collect();
    format!("{hex}.kvc")
}

fn bincode_config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<{ MAX_HEADER as usize }>()
}

/// Reads and checks a file's header; returns it, its bytes, and whether the
/// file's length matches.
fn read_header(file: &mut File) -> std::io::Result<Option<(Header, Vec<u8>)>> {
    let mut prefix = [0u8; 8];
    if file.read_exact(&mut prefix).is_err() || &prefix[..4] != MAGIC {
        return Ok(None);
    }
    let len = u32::from_le_bytes(prefix[4..].try_into().expect("4 bytes"));
    if len > MAX_HEADER {
        return Ok(None);
    }
    let mut bytes = vec![0u8; len as usize];
    if file.read_exact(&mut bytes).is_err() {
        return Ok(None);
    }
    match bincode::serde::decode_from_slice::<Header, _>(&bytes, bincode_config()) {
        Ok((h, used)) if used == bytes.len() => Ok(Some((h, bytes))),
        _ => Ok(None),
    }
}

impl DiskTier {
    /// Opens (creating) `dir`, rebuilds the index from the files there, and
    /// starts the writer and reader threads. Files that cannot be valid are
    /// deleted.
    /// `l1_capacity` bounds the write-behind backlog (queued objects hold L1
    /// memory); `model_id` interns a file's (model, world size).
    pub fn open(
        dir: &Path,
        capacity: u64,
        l1_capacity: u64,
        model_id: &dyn Fn(&str, u32) -> ModelId,
    ) -> std::io::Result<Arc<DiskTier>> {
        std::fs::create_dir_all(dir)?;
        let started = Instant::now();
        let (tx, rx) = std::sync::mpsc::sync_channel::<WriteBehind>(4096);
        let (read_tx, read_rx) = std::sync::mpsc::channel::<TierRead>();
        let tier = Arc::new(DiskTier {
            dir: dir.to_path_buf(),
            capacity,
            index: Mutex::new(DiskIndex { entries: HashMap::default(), used: 0, tick: 0 }),
            queue: tx,
            reads: read_tx,
            backlog: AtomicU64::new(0),
            // Queued objects hold L1 memory (a read guard each): a quarter of
            // L1 at most, so the backlog can never starve stores.
            max_backlog: (capacity / 4).min(l1_capacity / 4).clamp(32 << 20, 1 << 30),
            counters: DiskCounters::default(),
        });
        let (mut recovered, mut dropped, mut scanned) = (0u64, 0u64, 0u64);
        let mut found: Vec<(ObjectKey, Entry)> = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            scanned += 1;
            if scanned % 10_000 == 0 {
                tracing::info!(scanned, recovered, dropped, "scanning the disk tier");
            }
            if name.ends_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
                dropped += 1;
                continue;
            }
            if !name.ends_with(".kvc") {
                continue;
            }
            let valid = (|| {
                let mut f = File::open(entry.path()).ok()?;
                let size = f.metadata().ok()?.len();
                let (h, bytes) = read_header(&mut f).ok()??;
                let expect = 8 + bytes.len() as u64 + h.payload + 32;
                (size == expect && name == file_name(&h.model, h.world_size, h.rank, &h.hash)).then_some((h, size))
            })();
            match valid {
                Some((h, size)) => {
                    let mtime = entry.metadata().and_then(|m| m.modified()).ok();
                    let age = mtime
                        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                        .map_or(0, |d| d.as_micros() as u64);
                    let key = ObjectKey { model: model_id(&h.model, h.world_size), rank: h.rank, hash: h.hash };
                    found.push((key, Entry { file: name, bytes: size, last_used: age }));
                    recovered += 1;
                }
                None => {
                    let _ = std::fs::remove_file(entry.path());
                    dropped += 1;
                }
            }
        }
        // Oldest first, so ticks keep the files' recency order.
        found.sort_by_key(|(_, e)| e.last_used);
        {
            let mut ix = tier.index.lock();
            for (key, mut e) in found {
                ix.tick += 1;
                e.last_used = ix.tick;
                ix.used += e.bytes;
                ix.entries.insert(key, e);
            }
        }
        tier.counters.recovered.store(recovered, Ordering::Relaxed);
        tier.counters.corrupt.store(dropped, Ordering::Relaxed);
        tracing::info!(
            dir = %dir.display(), recovered, dropped_corrupt = dropped,
            ms = started.elapsed().as_millis() as u64, "disk tier recovered"
        );
        tier.evict_to_capacity();
        let writer = tier.clone();
        std::thread::Builder::new().name("kvcoord-disk".into()).spawn(move || {
            while let Ok(job) = rx.recv() {
                writer.write(job);
            }
        })?;
        // Readers hold the tier weakly: they end when it goes (its sender
        // drops) and answer any read still queued then as failed.
        let read_rx = Arc::new(Mutex::new(read_rx));
        for i in 0..READER_THREADS {
            let (reads, tier) = (read_rx.clone(), Arc::downgrade(&tier));
            std::thread::Builder::new().name(format!("kvcoord-disk-read-{i}")).spawn(move || loop {
                let Ok(read) = reads.lock().recv() else { return };
                match tier.upgrade() {
                    Some(t) => {
                        let result = t.read_file(read.key(), read.target());
                        read.finish(result);
                    }
                    None => read.finish(Err(TierReadError::Missing)),
                }
            })?;
        }
        Ok(tier)
    }

    /// Queues a committed object for writing; never blocks. Returns whether
    /// it was queued.
    fn enqueue(&self, job: WriteBehind) -> bool {
        if self.holds(&job.key) {
            return false;
        }
        let bytes = job.object.len() as u64;
        if self.backlog.fetch_add(bytes, Ordering::AcqRel) + bytes > self.max_backlog {
            self.backlog.fetch_sub(bytes, Ordering::AcqRel);
            self.counters.skipped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        if self.queue.try_send(job).is_err() {
            self.backlog.fetch_sub(bytes, Ordering::AcqRel);
            self.counters.skipped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        true
    }

    fn holds(&self, key: &ObjectKey) -> bool {
        self.index.lock().entries.contains_key(key)
    }

    fn write(&self, job: WriteBehind) {
        let bytes = job.object.len() as u64;
        let name = file_name(&job.namespace.model, job.namespace.world_size, job.key.rank, &job.key.hash);
        let result = self.write_file(&name, &job);
        drop(job.object);
        self.backlog.fetch_sub(bytes, Ordering::AcqRel);
        match result {
            Ok(size) => {
                self.counters.writes.fetch_add(1, Ordering::Relaxed);
                let mut ix = self.index.lock();
                ix.tick += 1;
                let tick = ix.tick;
                if let Some(old) = ix.entries.insert(job.key, Entry { file: name, bytes: size, last_used: tick }) {
                    ix.used -= old.bytes;
                }
                ix.used += size;
                drop(ix);
                self.evict_to_capacity();
            }
            Err(e) => {
                let n = self.counters.write_errors.fetch_add(1, Ordering::Relaxed);
                if n.is_power_of_two() {
                    tracing::warn!(error = %e, failures = n + 1, "disk tier write failed; the object stays in L1 only");
                }
            }
        }
    }

    fn write_file(&self, name: &str, job: &WriteBehind) -> std::io::Result<u64> {
        let header = Header {
            model: job.namespace.model.to_string(),
            world_size: job.namespace.world_size,
            rank: job.key.rank,
            hash: job.key.hash,
            payload: job.object.len() as u64,
        };
        let hbytes = bincode::serde::encode_to_vec(&header, bincode_config()).map_err(std::io::Error::other)?;
        // SAFETY: the read guard keeps the object's bytes alive and unwritten
        // (Ready or Doomed) for as long as `job` lives.
        let payload = unsafe { std::slice::from_raw_parts(job.object.as_ptr(), job.object.len()) };
        let mut sum = blake3::Hasher::new();
        sum.update(&hbytes);
        sum.update(payload);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let result = (|| {
            let mut f = std::io::BufWriter::with_capacity(1 << 20, File::create(&tmp)?);
            f.write_all(MAGIC)?;
            f.write_all(&(hbytes.len() as u32).to_le_bytes())?;
            f.write_all(&hbytes)?;
            f.write_all(payload)?;
            f.write_all(sum.finalize().as_bytes())?;
            f.into_inner().map_err(|e| e.into_error())?.sync_data()?;
            std::fs::rename(&tmp, self.dir.join(name))
        })();
        if let Err(e) = result {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        Ok(8 + hbytes.len() as u64 + payload.len() as u64 + 32)
    }

    fn evict_to_capacity(&self) {
        loop {
            let victim = {
                let mut ix = self.index.lock();
                if ix.used <= self.capacity {
                    return;
                }
                let Some(key) = ix.entries.iter().min_by_key(|(_, e)| e.last_used).map(|(k, _)| *k) else { return };
                let e = ix.entries.remove(&key).expect("just found");
                ix.used -= e.bytes;
                e.file
            };
            self.counters.evictions.fetch_add(1, Ordering::Relaxed);
            let _ = std::fs::remove_file(self.dir.join(victim));
        }
    }

    fn drop_corrupt(&self, key: &ObjectKey, file: &str) {
        let mut ix = self.index.lock();
        if let Some(e) = ix.entries.remove(key) {
            ix.used -= e.bytes;
        }
        drop(ix);
        let _ = std::fs::remove_file(self.dir.join(file));
        self.counters.corrupt.fetch_add(1, Ordering::Relaxed);
        tracing::warn!(file, "corrupt object on disk dropped");
    }

    /// Reads an object into `dst` (exactly its length), verifying the
    /// checksum. A corrupt object is deleted and never returned.
    fn read_file(&self, key: &ObjectKey, dst: &dyn ObjectBytes) -> Result<(), TierReadError> {
        let file = {
            let mut ix = self.index.lock();
            ix.tick += 1;
            let tick = ix.tick;
            let e = ix.entries.get_mut(key).ok_or(TierReadError::Missing)?;
            e.last_used = tick;
            e.file.clone()
        };
        let ok = (|| {
            let mut f = File::open(self.dir.join(&file)).ok()?;
            let (h, hbytes) = read_header(&mut f).ok()??;
            if h.payload != dst.len() as u64 || h.rank != key.rank || h.hash != key.hash {
                return None;
            }
            // SAFETY: `dst` is a read's target, `Exclusive` bytes (a write
            // ticket, or a buffer) that nothing else touches until the read
            // finishes, of exactly `dst.len()` bytes.
            let out = unsafe { std::slice::from_raw_parts_mut(dst.as_ptr(), dst.len()) };
            f.read_exact(out).ok()?;
            let mut stored = [0u8; 32];
            f.read_exact(&mut stored).ok()?;
            let mut sum = blake3::Hasher::new();
            sum.update(&hbytes);
            sum.update(out);
            (sum.finalize().as_bytes() == &stored).then_some(())
        })();
        match ok {
            Some(()) => {
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            None => {
                self.drop_corrupt(key, &file);
                Err(TierReadError::Corrupt(file))
            }
        }
    }
}

impl Tier for DiskTier {
    fn name(&self) -> &'static str {
        "disk"
    }

    fn contains(&self, key: &ObjectKey) -> bool {
        self.holds(key)
    }

    fn read(&self, read: TierRead) {
        if let Err(std::sync::mpsc::SendError(read)) = self.reads.send(read) {
            read.finish(Err(TierReadError::Missing));
        }
    }

    fn write_behind(&self, job: WriteBehind) -> bool {
        self.enqueue(job)
    }

    fn stats(&self) -> TierStats {
        let (used, objects) = {
            let ix = self.index.lock();
            (ix.used, ix.entries.len() as u64)
        };
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        TierStats {
            capacity: self.capacity,
            used,
            objects,
            backlog: get(&self.backlog),
            hits: get(&c.hits),
            writes: get(&c.writes),
            write_errors: get(&c.write_errors),
            corrupt: get(&c.corrupt),
            recovered: get(&c.recovered),
            skipped: get(&c.skipped),
            evictions: get(&c.evictions),
            up: true,
            ..TierStats::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::server::keys::{LayoutFingerprint, ObjectNamespace};
    use crate::server::tier::Buffer;

    fn filled(len: usize, byte: u8) -> Buffer {
        let b = Buffer::zeroed(len);
        // SAFETY: the buffer was just made and is ours alone.
        unsafe { std::ptr::write_bytes(b.as_ptr(), byte, len) };
        b
    }

    #[test]
    fn written_behind_objects_read_back_through_the_reader_threads() {
        let dir = tempfile::tempdir().unwrap();
        let tier = DiskTier::open(dir.path(), 1 << 30, 1 << 30, &|_, _| ModelId(0)).unwrap();
        let key = ObjectKey { model: ModelId(0), rank: 0, hash: ChunkHash([7; 32]) };
        let namespace =
            Arc::new(ObjectNamespace { model: "m".into(), world_size: 1, layout: LayoutFingerprint([0; 16]) });
        let job = WriteBehind { key, namespace: namespace.clone(), object: Box::new(filled(4096, 0xAB)) };
        assert!(tier.write_behind(job));
        let t = Instant::now();
        while !tier.contains(&key) {
            assert!(t.elapsed() < Duration::from_secs(10), "the write-behind never landed");
            std::thread::sleep(Duration::from_millis(1));
        }
        let (read, done) = TierRead::new(key, namespace.clone(), Buffer::zeroed(4096));
        tier.read(read);
        let (buf, result) = done.blocking_recv().expect("every read is answered");
        result.unwrap();
        // SAFETY: the read finished and handed the buffer back.
        let bytes = unsafe { std::slice::from_raw_parts(buf.as_ptr(), buf.len()) };
        assert!(bytes.iter().all(|&b| b == 0xAB));
        assert_eq!(tier.stats().hits, 1);

        let other = ObjectKey { hash: ChunkHash([8; 32]), ..key };
        let (read, done) = TierRead::new(other, namespace, Buffer::zeroed(4096));
        tier.read(read);
        assert!(matches!(done.blocking_recv().unwrap().1, Err(TierReadError::Missing)));
    }
}

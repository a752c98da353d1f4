//! The interface of a tier below L1 (the local disk, `disk.rs`; the shared
//! remote tier on Redis/Valkey, `remote.rs`): what L1, the instance actors
//! and the supervisor may ask of it, and the values that cross it.
//!
//! Everything above L1 knows a tier only as `Arc<dyn Tier>`; only the
//! coordinator's start (`mod.rs`) names a concrete tier. This module owns the
//! trait, its request and result types, and [`Buffer`] (owned bytes to read
//! into when L1 has no room). It must never import L1, an actor, or a
//! concrete tier.
//!
//! Reads are asynchronous: [`TierRead::new`] pairs the bytes to fill with a
//! one-shot receiver, [`Tier::read`] hands the read to the tier's own threads
//! (never the caller's, never a copy lane), and the receiver gets the bytes
//! back with the outcome. A read the tier drops unanswered reads as failed.
//!
//! Two kinds of tier, told apart by [`Tiers`]: a *local* tier keeps an index
//! in this process, so [`Tier::contains`] answers at once under the L1 lock;
//! a *remote* tier is shared with other processes, so only an asynchronous,
//! batched [`Tier::probe`] (one round trip for a whole lookup) knows what it
//! holds. Lookups fall through L1, then the local tier, then the remote one.

use std::sync::Arc;
use std::time::Instant;

use futures::future::BoxFuture;
use kvcoord_memory::ObjectBytes;
use tokio::sync::oneshot;

use super::keys::{ObjectKey, ObjectNamespace};

/// Bytes that stay alive and unwritten until dropped: a committed L1
/// object's read guard, as the write-behind path hands it to a tier.
pub type HeldObject = Box<dyn ObjectBytes + Send + Sync>;

/// One committed object to copy into the tier behind the store path.
pub struct WriteBehind {
    pub key: ObjectKey,
    /// The model's name, world size and layout (the key's `ModelId` is only
    /// meaningful inside this process).
    pub namespace: Arc<ObjectNamespace>,
    pub object: HeldObject,
}

/// Why an object could not be read back from a tier.
#[derive(Debug, thiserror::Error)]
pub enum TierReadError {
    #[error("not in the tier")]
    Missing,
    #[error("corrupt object {0} dropped")]
    Corrupt(String),
    /// The tier could not answer in time (remote down, slow, partitioned).
    #[error("tier unavailable: {0}")]
    Unavailable(String),
}

/// A tier's figures, for stats and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierStats {
    pub capacity: u64,
    pub used: u64,
    pub objects: u64,
    /// Bytes queued for write-behind.
    pub backlog: u64,
    /// Objects read back.
    pub hits: u64,
    pub writes: u64,
    pub write_errors: u64,
    /// Objects found torn or corrupt and dropped.
    pub corrupt: u64,
    /// Objects found at start.
    pub recovered: u64,
    /// Objects not written because the write-behind queue was full.
    pub skipped: u64,
    pub evictions: u64,
    /// Objects asked for (probed or read) and not found (remote tier).
    pub misses: u64,
    /// Bytes read from and written to the tier (remote tier).
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Calls that failed (timeouts, connection errors, error replies).
    pub errors: u64,
    /// Objects waiting to be written behind.
    pub queued: u64,
    /// Whether the tier answers now (a local tier always does).
    pub up: bool,
}

/// How a remote tier is doing, for `/status` and `kvcoord status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TierHealth {
    /// Where it is, with any password redacted.
    pub endpoint: String,
    pub up: bool,
    /// When it last went up or down.
    pub since: Instant,
    /// The last error seen, if any.
    pub last_error: Option<String>,
}

/// Bytes a tier may write into: `len()` bytes at `as_ptr()` that nothing
/// else reads or writes while the value lives (an uncommitted L1 write
/// ticket, or a [`Buffer`]), and that may move to another thread.
///
/// # Safety
///
/// Implementors guarantee that exclusivity: a tier writes these bytes from
/// its own thread with no other synchronisation.
pub unsafe trait Exclusive: ObjectBytes + Send + 'static {}

/// What a read in flight owns, with its type erased for the trait.
trait PendingRead: Send {
    fn bytes(&self) -> &dyn ObjectBytes;
    fn finish(self: Box<Self>, result: Result<(), TierReadError>);
}

struct Pending<D> {
    into: D,
    done: oneshot::Sender<(D, Result<(), TierReadError>)>,
}

impl<D: Exclusive> PendingRead for Pending<D> {
    fn bytes(&self) -> &dyn ObjectBytes {
        &self.into
    }
    fn finish(self: Box<Self>, result: Result<(), TierReadError>) {
        // The requester may be gone (its actor stopped): the bytes then drop
        // here, an uncommitted ticket discarding itself.
        let _ = self.done.send((self.into, result));
    }
}

/// One object to read from a tier into bytes nothing else touches.
pub struct TierRead {
    key: ObjectKey,
    namespace: Arc<ObjectNamespace>,
    pending: Box<dyn PendingRead>,
}

/// Where a [`TierRead`]'s bytes come back, with its outcome.
pub type ReadDone<D> = oneshot::Receiver<(D, Result<(), TierReadError>)>;

impl TierRead {
    /// A read of `key` into `into` (exactly the object's length).
    pub fn new<D: Exclusive>(key: ObjectKey, namespace: Arc<ObjectNamespace>, into: D) -> (TierRead, ReadDone<D>) {
        let (done, rx) = oneshot::channel();
        (TierRead { key, namespace, pending: Box::new(Pending { into, done }) }, rx)
    }

    pub fn key(&self) -> &ObjectKey {
        &self.key
    }

    pub fn namespace(&self) -> &Arc<ObjectNamespace> {
        &self.namespace
    }

    /// The bytes to fill: exclusive to this read until [`TierRead::finish`].
    pub fn target(&self) -> &dyn ObjectBytes {
        self.pending.bytes()
    }

    /// Hands the bytes back to the requester with the outcome.
    pub fn finish(self, result: Result<(), TierReadError>) {
        self.pending.finish(result);
    }
}

/// A tier below L1. Lookups that miss L1 count the chunks a tier holds;
/// retrieves read them back (and promote them into L1); stores are written
/// behind to it. Implementations must never block the caller on I/O, and
/// never call back into L1.
pub trait Tier: Send + Sync {
    /// A short name for logs ("disk").
    fn name(&self) -> &'static str;

    /// Whether the tier holds `key`. Called under the L1 lock by lookups:
    /// must be a quick in-memory check. A remote tier answers `false`: only
    /// [`Tier::probe`] can know.
    fn contains(&self, key: &ObjectKey) -> bool;

    /// Which of `keys` (all of `namespace`) the tier holds, in order, asked
    /// in one batch (one round trip for a remote tier). Resolves by
    /// `deadline` at the latest: what is not known by then counts as not
    /// held. Never blocks the caller.
    fn probe(
        &self,
        namespace: &Arc<ObjectNamespace>,
        keys: &[ObjectKey],
        deadline: Instant,
    ) -> BoxFuture<'static, Vec<bool>> {
        let _ = (namespace, deadline);
        let held = keys.iter().map(|k| self.contains(k)).collect();
        Box::pin(futures::future::ready(held))
    }

    /// Reads an object on the tier's own threads, verifying it (a corrupt
    /// object is dropped and never returned), and finishes `read` there.
    /// Never blocks the caller.
    fn read(&self, read: TierRead);

    /// Reads several objects as one batch (one round trip for a remote
    /// tier), each finished as by [`Tier::read`]; a read not done by
    /// `deadline` finishes as [`TierReadError::Unavailable`].
    fn read_many(&self, reads: Vec<TierRead>, deadline: Instant) {
        let _ = deadline;
        for read in reads {
            self.read(read);
        }
    }

    /// Queues a committed object to be written behind; never blocks. Returns
    /// whether it was queued.
    fn write_behind(&self, job: WriteBehind) -> bool;

    fn stats(&self) -> TierStats;

    /// Reachability, for a tier that can be unreachable (remote).
    fn health(&self) -> Option<TierHealth> {
        None
    }
}

/// The tiers below L1, in fall-through order: a local one (the disk), then
/// a remote one shared with other coordinators.
#[derive(Clone, Default)]
pub struct Tiers {
    /// Answers [`Tier::contains`] from an index in this process.
    pub local: Option<Arc<dyn Tier>>,
    /// Answers only [`Tier::probe`]; may be down.
    pub remote: Option<Arc<dyn Tier>>,
}

impl Tiers {
    /// Every tier a stored object is written behind to.
    pub fn all(&self) -> impl Iterator<Item = &Arc<dyn Tier>> {
        self.local.iter().chain(self.remote.iter())
    }
}

/// Owned bytes to read a tier object into when L1 has no room for it.
pub struct Buffer {
    ptr: *mut u8,
    len: usize,
}

impl Buffer {
    pub fn zeroed(len: usize) -> Self {
        let ptr = Box::into_raw(vec![0u8; len].into_boxed_slice()) as *mut u8;
        Buffer { ptr, len }
    }
}

// SAFETY: a Buffer uniquely owns its heap bytes (like a Box<[u8]>).
unsafe impl Send for Buffer {}
// SAFETY: `&Buffer` only exposes the pointer and length.
unsafe impl Sync for Buffer {}
// SAFETY: a Buffer's bytes are its own; nothing else holds its pointer.
unsafe impl Exclusive for Buffer {}

impl ObjectBytes for Buffer {
    fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }
    fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Buffer {
    fn drop(&mut self) {
        // SAFETY: `ptr` and `len` came from `Box::into_raw` of a boxed slice
        // of exactly `len` bytes in `zeroed`, and are freed only here.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.ptr, self.len)) });
    }
}

//! A prefix lookup through every tier: L1 and the local tier (the disk) under
//! the L1 lock, then, for the chunks they miss, the remote tier in one
//! batched probe awaited within the request's deadline.
//!
//! It owns only that order; it must never hold the L1 lock across the probe
//! (the probe runs on the remote tier's own runtime), and never answer later
//! than the deadline it is given: a slow or down remote is a miss.

use std::sync::Arc;
use std::time::Instant;

use kvcoord_transport::{ChunkHash, LeaseId};

use super::access::TenantId;
use super::keys::{ModelId, ObjectKey, ObjectNamespace};
use super::l1::{L1Store, RemoteHeld};
use super::tier::Tier;

/// The part of a request's remaining time a remote probe may use; the rest
/// is for answering.
const PROBE_SHARE: (u32, u32) = (3, 4);

/// One lookup: what it asks and of whom.
pub struct Lookup<'a> {
    pub l1: &'a L1Store,
    /// The remote tier and the namespace its keys are in, when both exist.
    pub remote: Option<(&'a Arc<dyn Tier>, Arc<ObjectNamespace>)>,
    pub model: ModelId,
    pub world_size: u32,
    pub hashes: &'a [ChunkHash],
    pub lease: bool,
    /// The asking session and its tenant (a lease is theirs).
    pub who: (u64, TenantId),
    pub deadline: Instant,
}

impl Lookup<'_> {
    /// How many leading chunks are held for every rank, in any tier; with
    /// `lease`, pins what of them is in L1.
    pub async fn run(self) -> (u32, Option<LeaseId>) {
        let Lookup { l1, remote, model, world_size, hashes, lease, who, deadline } = self;
        let Some((tier, namespace)) = remote else {
            return l1.lookup(model, world_size, hashes, lease, who);
        };
        let (local, _) = l1.lookup(model, world_size, hashes, false, who);
        let from = local as usize;
        if from == hashes.len() {
            return if lease { l1.lookup(model, world_size, hashes, true, who) } else { (local, None) };
        }
        let keys: Vec<ObjectKey> = hashes[from..]
            .iter()
            .flat_map(|&hash| (0..world_size).map(move |rank| ObjectKey { model, rank, hash }))
            .collect();
        let now = Instant::now();
        let probe_by = now + deadline.saturating_duration_since(now) * PROBE_SHARE.0 / PROBE_SHARE.1;
        // The tier bounds its calls by `probe_by` itself; this bounds the
        // wait even if its runtime were stuck.
        let probe = tier.probe(&namespace, &keys, probe_by);
        let held = tokio::time::timeout_at(tokio::time::Instant::from_std(probe_by), probe).await.unwrap_or_default();
        l1.lookup_with(model, world_size, hashes, lease, who, Some(&RemoteHeld { from, held }))
    }
}

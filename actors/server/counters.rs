//! The server's monotonic counters (requests, bytes, registrations,
//! connections, restarts), exported in stats and mirrored by the metrics.
//!
//! This module owns only the atomics; it must never decide when to count
//! and never import another server module, so any actor can be given them.

use std::sync::atomic::{AtomicU64, Ordering};

/// Monotonic counters (exported in stats).
#[derive(Default)]
pub struct Counters {
    pub stores: AtomicU64,
    pub retrieves: AtomicU64,
    pub lookups: AtomicU64,
    pub lookup_asked_chunks: AtomicU64,
    pub lookup_hit_chunks: AtomicU64,
    pub bytes_stored: AtomicU64,
    pub bytes_retrieved: AtomicU64,
    pub registrations: AtomicU64,
    pub reregistrations: AtomicU64,
    pub connections: AtomicU64,
    pub actor_restarts: AtomicU64,
    pub reclaimed_instances: AtomicU64,
}

impl Counters {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// One tenant's monotonic counters (exported per tenant in the metrics).
#[derive(Default)]
pub struct TenantCounters {
    pub lookup_asked_chunks: AtomicU64,
    pub lookup_hit_chunks: AtomicU64,
    pub bytes_stored: AtomicU64,
    pub bytes_retrieved: AtomicU64,
}

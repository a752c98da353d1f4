//! Prometheus metrics (OpenMetrics text, served at the admin `/metrics`).
//!
//! Request counts by operation and outcome, and latency histograms, are
//! recorded as requests finish. Everything else mirrors the server's own
//! counters and gauges at scrape time, so there is one source of truth (the
//! [`ServerStats`] the supervisor assembles). This module must never be on a
//! request's critical path beyond one counter and one histogram update.

use std::time::Duration;

use kvcoord_transport::{ServerEpoch, ServerStats, WireError};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    op: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

/// What the remote tier records itself as it works: the time of each call to
/// the remote by operation (probe, read, write), and errors by kind
/// (timeout, connection, server, corrupt, truncated, foreign). Cheap to
/// clone; every clone records into the same registry.
#[derive(Clone)]
pub struct RemoteInstruments {
    latency: Family<OpLabels, Histogram, fn() -> Histogram>,
    errors: Family<KindLabels, Counter>,
}

impl RemoteInstruments {
    pub fn observe(&self, op: &'static str, took: Duration) {
        self.latency.get_or_create(&OpLabels { op }).observe(took.as_secs_f64());
    }

    pub fn error(&self, kind: &'static str) {
        self.errors.get_or_create(&KindLabels { kind }).inc();
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantLabels {
    tenant: String,
}

/// One tenant's figures at scrape time (its counters and its share of L1).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TenantFigures {
    pub name: String,
    pub lookup_asked_chunks: u64,
    pub lookup_hit_chunks: u64,
    pub bytes_stored: u64,
    pub bytes_retrieved: u64,
    pub evictions: u64,
    pub l1_used: u64,
    /// 0: no quota.
    pub l1_quota: u64,
}

type TenantRead = fn(&TenantFigures) -> u64;
type TenantDef = (&'static str, &'static str, TenantRead);

/// Reads one figure out of the stats.
type Read = fn(&ServerStats) -> u64;
/// A metric's name, help text and where its value comes from.
type Def = (&'static str, &'static str, Read);
type Mirror = (Counter, Read);
type Level = (Gauge, Read);

/// The coordinator's metrics registry.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    latency: Family<OpLabels, Histogram, fn() -> Histogram>,
    mirrors: Vec<Mirror>,
    levels: Vec<Level>,
    remote: RemoteInstruments,
    tenant_mirrors: Vec<(Family<TenantLabels, Counter>, TenantRead)>,
    tenant_levels: Vec<(Family<TenantLabels, Gauge>, TenantRead)>,
}

fn latency_histogram() -> Histogram {
    // 10 us .. ~21 s.
    Histogram::new(exponential_buckets(1e-5, 2.0, 22))
}

impl Metrics {
    pub fn new(epoch: ServerEpoch, backend: &'static str) -> Self {
        let mut registry = Registry::with_prefix("kvcoord");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register("requests", "Requests served, by operation and outcome", requests.clone());
        let latency = Family::<OpLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        registry.register("request_duration_seconds", "Time from a request's arrival to its reply", latency.clone());
        registry.register(
            "server",
            "This server: version, boot epoch and backend",
            Info::new(vec![
                ("version", env!("CARGO_PKG_VERSION").to_string()),
                ("epoch", format!("{:016x}", epoch.0)),
                ("backend", backend.to_string()),
            ]),
        );
        let remote =
            RemoteInstruments { latency: Family::new_with_constructor(latency_histogram), errors: Family::default() };
        registry.register(
            "remote_call_duration_seconds",
            "Time of each call to the remote tier, by operation (probe, read, write)",
            remote.latency.clone(),
        );
        registry.register(
            "remote_errors",
            "Remote tier errors by kind (timeout, connection, server; corrupt, truncated, foreign values)",
            remote.errors.clone(),
        );
        let mirror_defs: [Def; 23] = [
            ("bytes_stored", "Bytes copied into L1 by stores", |s| s.bytes_stored),
            ("bytes_retrieved", "Bytes copied out of L1 by retrieves", |s| s.bytes_retrieved),
            ("evictions", "L1 objects evicted to make room", |s| s.evictions),
            ("lookup_asked_chunks", "Chunks asked for by lookups", |s| s.lookup_asked_chunks),
            ("lookup_hit_chunks", "Leading chunks lookups found for every rank", |s| s.lookup_hit_chunks),
            ("registrations", "Instances registered (new registrations)", |s| s.registrations),
            ("reregistrations", "Registers of an instance already registered (clients reconnecting)", |s| {
                s.reregistrations
            }),
            ("connections", "Client connections accepted (first connections and reconnections)", |s| s.connections),
            ("actor_restarts", "Child actors that died and were replaced", |s| s.actor_restarts),
            ("reclaimed_instances", "Instances of dead clients dropped after the grace period", |s| {
                s.reclaimed_instances
            }),
            ("disk_hits", "Objects read back from the disk tier", |s| s.disk_hits),
            ("disk_writes", "Objects written to the disk tier", |s| s.disk_writes),
            ("disk_write_errors", "Disk tier writes that failed (disk full, I/O error)", |s| s.disk_write_errors),
            ("disk_corrupt", "Disk objects found torn or corrupt and dropped", |s| s.disk_corrupt),
            ("disk_skipped", "Objects not written because the write-behind queue was full", |s| s.disk_skipped),
            ("remote_hits", "Remote tier keys asked for (probed or read) and found", |s| s.remote_hits),
            ("remote_misses", "Remote tier keys asked for and not found, refused, or not answered", |s| {
                s.remote_misses
            }),
            ("remote_bytes_in", "Bytes read from the remote tier", |s| s.remote_bytes_in),
            ("remote_bytes_out", "Bytes written to the remote tier", |s| s.remote_bytes_out),
            ("remote_writes", "Objects written to the remote tier", |s| s.remote_writes),
            ("remote_dropped_writes", "Pending remote writes dropped (oldest first) because the queue was full", |s| {
                s.remote_dropped_writes
            }),
            ("remote_rejected", "Remote values refused (corrupt, truncated, foreign) and treated as misses", |s| {
                s.remote_rejected
            }),
            ("remote_failed_calls", "Calls to the remote tier that failed (all kinds)", |s| s.remote_failed_calls),
        ];
        let mirrors = mirror_defs
            .into_iter()
            .map(|(name, help, get)| {
                let c = Counter::default();
                registry.register(name, help, c.clone());
                (c, get)
            })
            .collect();
        let level_defs: [Def; 17] = [
            ("l1_used_bytes", "L1 bytes held by objects", |s| s.l1_used),
            ("l1_capacity_bytes", "L1 capacity", |s| s.l1_capacity),
            ("l1_slab_bytes", "L1 memory taken from the system", |s| s.l1_slab_bytes),
            ("l1_objects", "Chunk objects held", |s| s.objects),
            ("leases", "Lookup leases held", |s| s.leases),
            ("pinned_objects", "Objects pinned by leases", |s| s.pinned_objects),
            ("instances", "Registered instances", |s| s.instances),
            ("sessions", "Open client connections", |s| s.sessions),
            ("mapped_bytes", "Registered KV-cache memory mapped", |s| s.mapped_bytes),
            ("uptime_seconds", "Seconds since start", |s| s.uptime_ms / 1000),
            ("disk_capacity_bytes", "Disk tier capacity", |s| s.disk_capacity),
            ("disk_used_bytes", "Disk tier bytes used", |s| s.disk_used),
            ("disk_objects", "Objects on the disk tier", |s| s.disk_objects),
            ("disk_backlog_bytes", "Bytes waiting to be written behind", |s| s.disk_backlog),
            ("remote_up", "1 when the remote tier answers, 0 when it is down (or not configured)", |s| s.remote_up),
            ("remote_queue_depth", "Objects waiting to be written to the remote tier", |s| s.remote_queue_depth),
            ("remote_queue_bytes", "Bytes waiting to be written to the remote tier", |s| s.remote_queue_bytes),
        ];
        let levels = level_defs
            .into_iter()
            .map(|(name, help, get)| {
                let g = Gauge::default();
                registry.register(name, help, g.clone());
                (g, get)
            })
            .collect();
        let tenant_counter_defs: [TenantDef; 5] = [
            ("tenant_lookup_asked_chunks", "Chunks asked for by a tenant's lookups", |t| t.lookup_asked_chunks),
            ("tenant_lookup_hit_chunks", "Leading chunks a tenant's lookups found", |t| t.lookup_hit_chunks),
            ("tenant_bytes_stored", "Bytes a tenant's stores copied into L1", |t| t.bytes_stored),
            ("tenant_bytes_retrieved", "Bytes a tenant's retrieves copied out of L1", |t| t.bytes_retrieved),
            ("tenant_evictions", "A tenant's L1 objects evicted (for its quota or for room)", |t| t.evictions),
        ];
        let tenant_mirrors = tenant_counter_defs
            .into_iter()
            .map(|(name, help, get)| {
                let f = Family::<TenantLabels, Counter>::default();
                registry.register(name, help, f.clone());
                (f, get)
            })
            .collect();
        let tenant_level_defs: [TenantDef; 2] = [
            ("tenant_l1_used_bytes", "L1 bytes held by a tenant's objects", |t| t.l1_used),
            ("tenant_l1_quota_bytes", "A tenant's L1 quota (0: none)", |t| t.l1_quota),
        ];
        let tenant_levels = tenant_level_defs
            .into_iter()
            .map(|(name, help, get)| {
                let f = Family::<TenantLabels, Gauge>::default();
                registry.register(name, help, f.clone());
                (f, get)
            })
            .collect();
        Metrics { registry, requests, latency, mirrors, levels, remote, tenant_mirrors, tenant_levels }
    }

    /// Brings the per-tenant metrics up to `tenants` (before a render).
    pub fn update_tenants(&self, tenants: &[TenantFigures]) {
        for t in tenants {
            let labels = TenantLabels { tenant: t.name.clone() };
            for (family, get) in &self.tenant_mirrors {
                let c = family.get_or_create(&labels);
                c.inc_by(get(t).saturating_sub(c.get()));
            }
            for (family, get) in &self.tenant_levels {
                family.get_or_create(&labels).set(get(t).min(i64::MAX as u64) as i64);
            }
        }
    }

    /// What the remote tier records into this registry.
    pub fn remote_instruments(&self) -> RemoteInstruments {
        self.remote.clone()
    }

    /// Counts one finished request.
    pub fn record(&self, op: &'static str, result: Result<(), &WireError>, took: Duration) {
        let outcome = match result {
            Ok(()) => "ok",
            Err(e) => e.kind.name(),
        };
        self.requests.get_or_create(&RequestLabels { op, outcome }).inc();
        self.latency.get_or_create(&OpLabels { op }).observe(took.as_secs_f64());
    }

    /// The text exposition, with mirrored values brought up to `stats`.
    pub fn render(&self, stats: &ServerStats) -> String {
        for (counter, get) in &self.mirrors {
            let now = get(stats);
            counter.inc_by(now.saturating_sub(counter.get()));
        }
        for (gauge, get) in &self.levels {
            gauge.set(get(stats).min(i64::MAX as u64) as i64);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

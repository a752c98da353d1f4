//! The coordinator: starting the actor system's server side inside an actix
//! `System` (the standalone binary and embedding applications use the same
//! entry point), accepting connections, and shutting down gracefully. This
//! file is the only one that names the concrete tiers (the disk, the remote
//! tier); it must never serve a request itself.
//!
//! ```text
//!   clients ──frames──> Session (one per connection) ──┬─> L1Store (lookups, leases: shared state)
//!                                                      ├─> InstanceActor (one per TP rank) ──> CopyLane (own thread)
//!                                                      │        └─> Tiers (disk, remote: reads on their own threads)
//!                                                      └─> Supervisor (registry, epoch, child lifetimes)
//! ```
//!
//! Where things are (a request's path, top to bottom):
//!
//! - `session.rs`: one actor per connection; frames in, one reply out per request.
//! - `requests.rs`: each operation's validation, routing and deadline.
//! - `supervisor.rs`: registrations, the epoch, starting and restarting children;
//!   `supervision.rs`: how it learns a child died; `routing.rs`: which lane
//!   a registration's copies go to.
//! - `instance.rs`: one actor per registered TP rank; prepares copies.
//! - `copy_lane.rs`: the actor that copies (a host lane, or a device's GPU worker).
//! - `l1.rs`: the L1 index, eviction, leases; `keys.rs`: object keys.
//! - `tier.rs`: the interface of a tier below L1; `disk.rs`: the disk tier;
//!   `remote.rs`: the shared remote tier on Redis/Valkey (`remote_format.rs`:
//!   its keys and values; `write_queue.rs`: its drop-oldest write queue);
//!   `lookup.rs`: a lookup falling through L1, disk and remote.
//! - `state.rs`: what every actor reads (config, L1, routes); `counters.rs`,
//!   `metrics.rs`: counts and Prometheus; `admin.rs`: the admin HTTP API.
//! - `logsafe.rs`: client text escaped for logs, rate-limited warnings.
//! - `access.rs`: who a connection is (peer uid, token -> tenant, admin role).
//!
//! Bounded resources at the door (this file): at most `max_connections`
//! connections open (the next gets `Refused(Unavailable)`), accept failures
//! back off with a rate-limited warning, and a connection has 5 s and one
//! small frame to say hello (`handshake.rs`). A TLS handshake, if any, runs
//! in the connection's own task, never in the accept loop. The hello's
//! credentials are checked (`access.rs`) before the welcome: a refused peer
//! gets `Refused(Unauthorized)` and is closed.

pub mod access;
pub mod admin;
pub mod copy_lane;
pub mod counters;
pub mod disk;
pub mod instance;
pub mod keys;
pub mod l1;
pub mod logsafe;
pub mod lookup;
pub mod metrics;
pub mod remote;
pub mod remote_format;
pub mod requests;
pub mod routing;
pub mod session;
pub mod state;
pub mod supervision;
pub mod supervisor;
pub mod tier;
pub mod write_queue;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use dashmap::DashMap;
use kvcoord_memory::cuda::{CopyEngine, CopyMethod, CudaDevice, PinnedSlabs};
use kvcoord_memory::Arena;
use kvcoord_transport::endpoint::UnixSocketOptions;
use kvcoord_transport::stream::write_loop;
use kvcoord_transport::{
    handshake, Endpoint, ErrorKind, Incoming, Limits, Listener, ServerEpoch, ServerFrame, ServerStats, Welcome,
    WireError, PROTOCOL_VERSION,
};
use tokio::sync::watch;

use crate::config::{BackendChoice, ConfigError, ServerConfig};
use access::{AccessTable, Principal, Transport};
use counters::Counters;
use l1::L1Store;
use logsafe::{RateLimit, Sanitized};
use session::Session;
use state::{ConnectionSlot, ServerShared};
use supervisor::{GetStats, Supervisor};
use tier::{Tier, Tiers};

/// Why a coordinator could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("cannot listen on {endpoint}: {source}")]
    Bind { endpoint: String, source: std::io::Error },
    #[error("backend: {0}")]
    Backend(String),
}

/// A running coordinator. Must be used inside the actix `System` it was
/// started in.
pub struct Coordinator {
    shared: Arc<ServerShared>,
    supervisor: Addr<Supervisor>,
    endpoints: Vec<Endpoint>,
    stop_accepting: watch::Sender<bool>,
}

/// The backend a coordinator runs, and the devices it serves.
struct Backend {
    name: &'static str,
    devices: Vec<Arc<CudaDevice>>,
}

/// Opens every visible device and checks that the copy kernel loads on each,
/// so a broken CUDA setup fails at start, not at the first copy.
fn open_devices(streams: usize, method: CopyMethod) -> Result<Vec<Arc<CudaDevice>>, String> {
    let devices = CudaDevice::all().map_err(|e| e.to_string())?;
    if devices.is_empty() {
        return Err("the CUDA driver shows no device".into());
    }
    for d in &devices {
        CopyEngine::new(d.clone(), streams, method).map_err(|e| format!("device {}: {e}", d.uuid_string()))?;
    }
    Ok(devices)
}

fn pick_backend(choice: BackendChoice, streams: usize, method: CopyMethod) -> Result<Backend, StartError> {
    let host = || Backend { name: "host", devices: Vec::new() };
    // `driver_present` is the only CUDA call made before we know libcuda
    // exists: cudarc panics on any other call without it.
    let driver = kvcoord_memory::cuda::driver_present();
    let backend = match choice {
        BackendChoice::Host => host(),
        BackendChoice::Auto if !driver => {
            tracing::info!("no CUDA driver found; falling back to the host backend");
            host()
        }
        BackendChoice::Auto => match open_devices(streams, method) {
            Ok(devices) => Backend { name: "cuda", devices },
            Err(e) => {
                tracing::warn!(error = %e, "a CUDA driver is present but unusable; falling back to the host backend");
                host()
            }
        },
        BackendChoice::Cuda if !driver => {
            return Err(StartError::Backend("--backend cuda: no CUDA driver on this machine".into()))
        }
        BackendChoice::Cuda => {
            let devices =
                open_devices(streams, method).map_err(|e| StartError::Backend(format!("--backend cuda: {e}")))?;
            Backend { name: "cuda", devices }
        }
    };
    for d in &backend.devices {
        tracing::info!(ordinal = d.ordinal(), uuid = %d.uuid_string(), name = d.name(), "CUDA device served");
    }
    Ok(backend)
}

/// Pinned L1 is taken in slabs of this size as it fills.
const L1_SLAB_BYTES: u64 = 256 << 20;

static NEXT_SESSION: AtomicU64 = AtomicU64::new(1);

impl Coordinator {
    /// Starts a coordinator: supervisor, copy lanes, listeners. Call inside
    /// an actix `System` (e.g. from `actix_rt::System::new().block_on`).
    pub async fn start(config: ServerConfig) -> Result<Coordinator, StartError> {
        config.validate()?;
        let access = AccessTable::load(&config)?;
        let Backend { name: backend, devices } =
            pick_backend(config.backend, config.gpu_streams as usize, config.gpu_copy.method())?;
        let epoch = ServerEpoch::random();
        // On CUDA, L1 is pinned (portable) so every device's kernel reaches it.
        let arena = match devices.first() {
            Some(d) => Arena::new(config.l1_size.as_u64(), L1_SLAB_BYTES, Box::new(PinnedSlabs::new(d.clone()))),
            None => Arena::host(config.l1_size.as_u64()),
        };
        if config.l1_prealloc {
            let t = Instant::now();
            let bytes = arena.take_all().map_err(|e| StartError::Backend(format!("taking L1 memory: {e}")))?;
            tracing::info!(
                bytes,
                source = arena.source_name(),
                ms = t.elapsed().as_millis() as u64,
                "L1 taken at start"
            );
        }
        let l1 = L1Store::new(arena, Duration::from_millis(config.lease_ttl_ms));
        l1.set_quotas(&access.tenants().iter().map(|t| t.l1_quota).collect::<Vec<_>>());
        // The disk index is rebuilt before anything is served. This is the
        // only place that names the concrete tier: the rest knows a `Tier`.
        let local: Option<Arc<dyn Tier>> = match &config.disk_dir {
            Some(dir) => {
                let model_id = |model: &str, world_size| l1.model_id(model, world_size);
                let tier = disk::DiskTier::open(dir, config.disk_size.as_u64(), l1.usage().capacity, &model_id)
                    .map_err(|e| StartError::Backend(format!("disk tier at {}: {e}", dir.display())))?;
                l1.attach_lower_tier(tier.clone());
                Some(tier)
            }
            None => None,
        };
        let metrics = metrics::Metrics::new(epoch, backend);
        // The remote tier starts whether or not the remote answers yet: it
        // is down until it does, and the coordinator serves from L1 and disk.
        let remote: Option<Arc<dyn Tier>> = match remote_settings(&config, l1.usage().capacity) {
            Some(settings) => Some(
                remote::RemoteTier::open(settings, metrics.remote_instruments())
                    .map_err(|e| StartError::Backend(e.to_string()))?,
            ),
            None => None,
        };
        let unix = Endpoint::Unix(config.socket.clone());
        let socket_opts = UnixSocketOptions {
            mode: crate::config::parse_mode(&config.socket_mode).expect("validated"),
            group: match &config.socket_group {
                Some(g) => {
                    Some(resolve_group(g).map_err(|why| crate::config::ConfigError { key: "socket_group", why })?)
                }
                None => None,
            },
            private_dir: config.socket.parent() == Some(crate::config::default_socket_dir().as_path()),
        };
        let mut listeners = vec![Self::bind(&unix, &socket_opts).await?];
        if let Some(tcp) = &config.tcp {
            let listener = match (&config.tls_cert, &config.tls_key) {
                (Some(cert), Some(key)) => {
                    let acceptor = kvcoord_transport::tls::acceptor(cert, key)
                        .map_err(|e| ConfigError { key: "tls_cert", why: e.to_string() })?;
                    Listener::bind_tls(tcp, acceptor)
                        .await
                        .map_err(|source| StartError::Bind { endpoint: format!("tcp://{tcp} (tls)"), source })?
                }
                _ => Self::bind(&Endpoint::Tcp(tcp.clone()), &socket_opts).await?,
            };
            listeners.push(listener);
        }
        let endpoints: Vec<Endpoint> = listeners.iter().map(Listener::local_endpoint).collect();
        let shared = Arc::new(ServerShared {
            metrics,
            endpoints: endpoints.iter().map(|e| e.to_string()).collect(),
            admin: std::sync::OnceLock::new(),
            tiers: Tiers { local, remote },
            tenant_counters: access.tenants().iter().map(|_| Arc::default()).collect(),
            access,
            epoch,
            config,
            backend,
            devices,
            l1,
            routes: DashMap::new(),
            counters: Arc::new(Counters::default()),
            started: Instant::now(),
            shutting_down: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            sessions: AtomicU64::new(0),
            open_connections: AtomicUsize::new(0),
            mapped_bytes: AtomicU64::new(0),
        });
        let supervisor = Supervisor::new(shared.clone()).start();
        if let Some(addr) = shared.config.admin_addr() {
            let bound = admin::start(addr, shared.clone(), supervisor.clone())
                .map_err(|source| StartError::Bind { endpoint: format!("admin http://{addr}"), source })?;
            tracing::info!(admin = %bound, "admin HTTP API listening");
            let _ = shared.admin.set(bound);
        }
        let (stop_accepting, stop_rx) = watch::channel(false);
        for listener in listeners {
            actix_rt::spawn(accept_loop(listener, shared.clone(), supervisor.clone(), stop_rx.clone()));
        }
        tracing::info!(
            epoch = epoch.0, backend, endpoints = ?endpoints.iter().map(|e| e.to_string()).collect::<Vec<_>>(),
            l1_bytes = shared.config.l1_size.as_u64(), chunk_tokens = shared.config.chunk_tokens,
            "kvcoord listening"
        );
        Ok(Coordinator { shared, supervisor, endpoints, stop_accepting })
    }

    async fn bind(endpoint: &Endpoint, opts: &UnixSocketOptions) -> Result<Listener, StartError> {
        Listener::bind_with(endpoint, opts)
            .await
            .map_err(|source| StartError::Bind { endpoint: endpoint.to_string(), source })
    }

    pub fn epoch(&self) -> ServerEpoch {
        self.shared.epoch
    }

    /// Where the admin HTTP API listens, if it is on.
    pub fn admin_addr(&self) -> Option<&str> {
        self.shared.admin.get().map(String::as_str)
    }

    /// The endpoints actually listened on (Unix socket first).
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    pub async fn stats(&self) -> Option<ServerStats> {
        self.supervisor.send(GetStats).await.ok()
    }

    /// Graceful shutdown: stop accepting, answer new requests with
    /// `ShuttingDown`, and wait (at most the configured time) for in-flight
    /// requests to finish. Returns how many were still running at the end.
    pub async fn shutdown(&self) -> usize {
        tracing::info!("shutting down");
        self.shared.shutting_down.store(true, Ordering::Release);
        let _ = self.stop_accepting.send(true);
        let limit = Instant::now() + Duration::from_millis(self.shared.config.shutdown_timeout_ms);
        while self.shared.in_flight.load(Ordering::Acquire) > 0 && Instant::now() < limit {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let left = self.shared.in_flight.load(Ordering::Acquire);
        tracing::info!(unfinished = left, "shutdown complete");
        left
    }
}

/// The remote tier's settings, when one is configured. Its write queue holds
/// L1 memory (a read guard per object): a quarter of L1 at most.
fn remote_settings(config: &ServerConfig, l1_capacity: u64) -> Option<remote::RemoteSettings> {
    let (target, shown_as) = match (&config.remote, config.remote_cluster.as_slice()) {
        (Some(url), _) => (remote::RemoteTarget::Standalone(url.clone()), crate::config::redact_url(url)),
        (None, []) => return None,
        (None, nodes) => (
            remote::RemoteTarget::Cluster(nodes.to_vec()),
            nodes.iter().map(|u| crate::config::redact_url(u)).collect::<Vec<_>>().join(","),
        ),
    };
    Some(remote::RemoteSettings {
        target,
        timeout: Duration::from_millis(config.remote_timeout_ms),
        key_prefix: config.remote_key_prefix.clone(),
        queue_items: 16_384,
        queue_bytes: config.remote_queue_size.as_u64().min(l1_capacity / 4).max(1 << 20),
        writers: config.remote_writers as usize,
        shown_as,
    })
}

/// A group name (from `/etc/group`) or numeric id.
fn resolve_group(group: &str) -> Result<u32, String> {
    if let Ok(gid) = group.parse::<u32>() {
        return Ok(gid);
    }
    let groups = std::fs::read_to_string("/etc/group").map_err(|e| format!("reading /etc/group: {e}"))?;
    groups
        .lines()
        .filter_map(|l| {
            let mut f = l.split(':');
            let name = f.next()?;
            let gid = f.nth(1)?.parse::<u32>().ok()?;
            (name == group).then_some(gid)
        })
        .next()
        .ok_or_else(|| format!("no group named {group:?}"))
}

/// First and longest pause after a failed accept (typically EMFILE: the
/// pending connection stays queued, so retrying at once would spin).
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

async fn accept_loop(
    listener: Listener,
    shared: Arc<ServerShared>,
    supervisor: Addr<Supervisor>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = ACCEPT_BACKOFF.0;
    let mut accept_warnings = RateLimit::new(1);
    let mut refusal_warnings = RateLimit::new(1);
    loop {
        let accepted = tokio::select! {
            r = listener.accept_incoming() => r,
            _ = stop.wait_for(|s| *s) => return,
        };
        match accepted {
            Ok(incoming) => {
                backoff = ACCEPT_BACKOFF.0;
                match ConnectionSlot::try_take(&shared) {
                    Some(slot) => {
                        actix_rt::spawn(open_session(incoming, slot, shared.clone(), supervisor.clone()));
                    }
                    None => {
                        let limit = shared.config.max_connections;
                        if let Some(suppressed) = refusal_warnings.allow() {
                            let peer = incoming.label();
                            tracing::warn!(peer, limit, suppressed, "connection refused: max_connections reached");
                        }
                        actix_rt::spawn(refuse(incoming, shared.config.max_frame_bytes, limit));
                    }
                }
            }
            Err(e) => {
                if let Some(suppressed) = accept_warnings.allow() {
                    tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64, suppressed, "accept failed");
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
            }
        }
    }
}

/// Tells a connection over the cap why it is closed, then closes it (after
/// reading its hello, if it comes at once, so the refusal is not lost to a
/// reset).
async fn refuse(incoming: Incoming, max_frame: u32, limit: u32) {
    let Ok((mut reader, mut writer)) = incoming.into_frames(max_frame, Duration::from_millis(200)).await else {
        return;
    };
    let e = WireError::new(
        ErrorKind::Unavailable,
        format!("the coordinator has {limit} connections open, its limit (max_connections); try again later"),
    );
    let t = Duration::from_millis(200);
    if tokio::time::timeout(t, writer.send(&ServerFrame::Refused(e))).await.is_ok() {
        reader.set_max_frame(handshake::HANDSHAKE_MAX_FRAME_BYTES);
        let _ = tokio::time::timeout(t, reader.read::<kvcoord_transport::ClientFrame>()).await;
    }
}

/// Handshake failures and bad first frames: at most this many logged a second.
static HANDSHAKE_WARNINGS: parking_lot::Mutex<Option<RateLimit>> = parking_lot::Mutex::new(None);

/// Logs a failed handshake, rate-limited.
fn handshake_failed(peer: &str, error: &dyn std::fmt::Display) {
    let allowed = HANDSHAKE_WARNINGS.lock().get_or_insert_with(|| RateLimit::new(10)).allow();
    if let Some(suppressed) = allowed {
        tracing::info!(peer, error = %error, suppressed, "handshake failed");
    }
}

async fn open_session(
    incoming: Incoming,
    slot: ConnectionSlot,
    shared: Arc<ServerShared>,
    supervisor: Addr<Supervisor>,
) {
    let peer = incoming.label();
    let transport = match incoming.credentials() {
        Some(c) => Transport::Unix(c),
        None => Transport::Tcp,
    };
    let handshake_limit = Duration::from_secs(5);
    let (mut reader, mut writer) = match incoming.into_frames(shared.config.max_frame_bytes, handshake_limit).await {
        Ok(frames) => frames,
        Err(e) => {
            handshake_failed(&peer, &e);
            return;
        }
    };
    let welcome = Welcome {
        protocol: PROTOCOL_VERSION,
        epoch: shared.epoch,
        chunk_tokens: shared.config.chunk_tokens,
        limits: Limits {
            max_frame_bytes: shared.config.max_frame_bytes,
            max_chunks_per_request: shared.config.max_chunks_per_request,
        },
        server: format!("kvcoord/{}", env!("CARGO_PKG_VERSION")),
        tenant: String::new(),
        admin: false,
    };
    if shared.is_shutting_down() {
        let e = WireError::new(ErrorKind::ShuttingDown, "the coordinator is shutting down");
        let _ = writer.send(&ServerFrame::Refused(e)).await;
        return;
    }
    let admit = |hello: &kvcoord_transport::Hello| -> Result<(Welcome, Principal), WireError> {
        let who = shared.access.admit(hello, transport)?;
        let tenant = shared.access.tenant(who.tenant).name.clone();
        Ok((Welcome { tenant, admin: who.admin, ..welcome }, who))
    };
    let (hello, principal) =
        match handshake::welcome_with(&mut reader, &mut writer, PROTOCOL_VERSION, admit, handshake_limit).await {
            Ok(admitted) => admitted,
            Err(e) => {
                handshake_failed(&peer, &e);
                return;
            }
        };
    let id = NEXT_SESSION.fetch_add(1, Ordering::Relaxed);
    Counters::add(&shared.counters.connections, 1);
    let tenant = &shared.access.tenant(principal.tenant).name;
    tracing::info!(
        session = id, peer, client = %Sanitized(&hello.client), tenant, admin = principal.admin, "client connected"
    );
    let (tx, rx) = tokio::sync::mpsc::channel(shared.config.max_in_flight_per_session as usize);
    actix_rt::spawn(write_loop(writer, rx));
    Session::start(id, principal, peer, reader, tx, slot, shared, supervisor);
}

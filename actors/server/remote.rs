//! The shared remote tier: chunk objects in Redis or Valkey (one server, or a
//! Redis Cluster), so a prefix one coordinator computed is a hit on every
//! other coordinator of the fleet. Capacity and eviction are the server's
//! (`maxmemory` and its policy); this tier never deletes.
//!
//! - **Writes** are behind the store path: a committed L1 object (held by
//!   its read guard) goes into a bounded [`DropOldestQueue`]; when it is full
//!   the oldest pending write is dropped and counted. A few writer tasks
//!   frame each object ([`remote_format`]: versioned, checksummed, tied to
//!   its key), release the guard, and `SET` it. A store never waits for them.
//! - **Probes** (lookups) and **reads** (retrieves) are batched: one
//!   pipeline of `EXISTS` or `GET` for the whole request on one server; on a
//!   cluster, one pipeline per hash slot, all sent at once (one round trip of
//!   latency), so a node that is down fails only its own slots' keys.
//! - **Failure**: every call has a timeout (`remote_timeout_ms`, and never
//!   past the request's deadline). A timeout or connection error marks the
//!   tier down: until a ping succeeds again, probes and reads answer "miss"
//!   at once and writers wait (their queue keeps dropping its oldest). A
//!   value that does not verify is a miss, counted, never served. The
//!   connection reconnects by itself (the `redis` crate's connection manager
//!   or cluster connection); a pinger checks health every [`PING_EVERY`].
//!
//! Everything runs on the tier's own small tokio runtime, never on an actix
//! arbiter or a copy lane; callers get futures or one-shot answers. This
//! module must never touch L1's lock or import L1 or an actor.

use std::collections::HashMap;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use kvcoord_memory::ObjectBytes;
use parking_lot::Mutex;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClientBuilder;
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::Slot;
use redis::{RedisWrite, ToRedisArgs, Value};

use super::keys::{ObjectKey, ObjectNamespace};
use super::metrics::RemoteInstruments;
use super::remote_format::{self, KeyPrefix, Rejected, HEADER_BYTES};
use super::tier::{Tier, TierHealth, TierRead, TierReadError, TierStats, WriteBehind};
use super::write_queue::DropOldestQueue;

/// How often the pinger checks that the remote answers.
pub const PING_EVERY: Duration = Duration::from_millis(500);

/// Where the remote tier is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RemoteTarget {
    /// One server: `redis://[user:pass@]host:port[/db]` or `rediss://`.
    Standalone(String),
    /// Seed nodes of a Redis Cluster.
    Cluster(Vec<String>),
}

/// How the remote tier runs.
#[derive(Clone, Debug)]
pub struct RemoteSettings {
    pub target: RemoteTarget,
    /// The limit of every call to the remote.
    pub timeout: Duration,
    /// Every key starts with it (fleets sharing one server keep apart).
    pub key_prefix: String,
    /// Write-behind queue bounds.
    pub queue_items: usize,
    pub queue_bytes: u64,
    /// Writes in flight at once.
    pub writers: usize,
    /// The target as logs and status may show it (no password).
    pub shown_as: String,
}

#[derive(Clone)]
enum Connection {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Connection {
    async fn pipeline(&self, pipe: &redis::Pipeline) -> redis::RedisResult<Vec<redis::RedisResult<Value>>> {
        match self.clone() {
            Connection::Standalone(mut c) => pipe.query_async(&mut c).await,
            Connection::Cluster(mut c) => pipe.query_async(&mut c).await,
        }
    }

    async fn command(&self, cmd: &redis::Cmd) -> redis::RedisResult<Value> {
        match self.clone() {
            Connection::Standalone(mut c) => cmd.query_async(&mut c).await,
            Connection::Cluster(mut c) => cmd.query_async(&mut c).await,
        }
    }
}

/// Why a call to the remote failed, as metrics label it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// No answer within the call's time.
    Timeout,
    /// Refused, reset, or not connected.
    Connection,
    /// An error reply (out of memory, cluster down, ...).
    Server,
}

impl Failure {
    fn of(e: &redis::RedisError) -> Failure {
        if e.is_timeout() {
            Failure::Timeout
        } else if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
            Failure::Connection
        } else {
            Failure::Server
        }
    }

    fn name(self) -> &'static str {
        match self {
            Failure::Timeout => "timeout",
            Failure::Connection => "connection",
            Failure::Server => "server",
        }
    }

    /// Whether it says the remote cannot be reached (rather than refusing
    /// one command).
    fn unreachable(self) -> bool {
        self != Failure::Server
    }
}

#[derive(Default)]
struct RemoteCounters {
    hits: AtomicU64,
    misses: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    writes: AtomicU64,
    write_errors: AtomicU64,
    rejected: AtomicU64,
    errors: AtomicU64,
}

fn add(a: &AtomicU64, n: u64) {
    a.fetch_add(n, Ordering::Relaxed);
}

struct Health {
    up: AtomicBool,
    state: Mutex<(Instant, Option<String>)>,
}

/// A write waiting in the queue.
struct WriteJob {
    key: Vec<u8>,
    object: super::tier::HeldObject,
}

struct Inner {
    connection: Connection,
    cluster: bool,
    settings: RemoteSettings,
    queue: DropOldestQueue<WriteJob>,
    health: Health,
    counters: RemoteCounters,
    instruments: RemoteInstruments,
    /// Wakes writers waiting for the remote to come back.
    back_up: tokio::sync::Notify,
}

/// The remote tier. Share it as `Arc<dyn Tier>`.
pub struct RemoteTier {
    inner: Arc<Inner>,
    runtime: Option<tokio::runtime::Runtime>,
}

/// Why the remote tier could not be set up (a bad URL; an unreachable
/// server is not an error: the tier starts down and reconnects).
#[derive(Debug, thiserror::Error)]
#[error("remote tier {target}: {why}")]
pub struct RemoteError {
    target: String,
    why: String,
}

/// The object's value as one `SET` argument, written straight into the
/// command buffer (no intermediate copy of the payload).
struct Framed<'a> {
    header: &'a [u8],
    payload: &'a [u8],
}

impl ToRedisArgs for Framed<'_> {
    fn write_redis_args<W>(&self, out: &mut W)
    where
        W: ?Sized + RedisWrite,
    {
        let mut w = out.writer_for_next_arg();
        // Writing into the command's Vec cannot fail.
        w.write_all(self.header).expect("writing to memory");
        w.write_all(self.payload).expect("writing to memory");
    }
}

impl RemoteTier {
    /// Starts the tier's runtime, connection, writers and pinger. Does not
    /// wait for the remote: it starts down and comes up at the first ping
    /// that succeeds.
    pub fn open(settings: RemoteSettings, instruments: RemoteInstruments) -> Result<Arc<RemoteTier>, RemoteError> {
        let fail = |why: String| RemoteError { target: settings.shown_as.clone(), why };
        let uses_tls = match &settings.target {
            RemoteTarget::Standalone(u) => u.starts_with("rediss://") || u.starts_with("valkeys://"),
            RemoteTarget::Cluster(nodes) => {
                nodes.iter().any(|u| u.starts_with("rediss://") || u.starts_with("valkeys://"))
            }
        };
        if uses_tls {
            // rustls needs a process-wide crypto provider; another part of
            // the process may have installed one already, which is fine.
            let _ = rustls::crypto::ring::default_provider().install_default();
        }
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("kvcoord-remote")
            .enable_all()
            .build()
            .map_err(|e| fail(format!("starting its runtime: {e}")))?;
        let timeout = settings.timeout;
        let connection = {
            let _entered = runtime.enter();
            match &settings.target {
                RemoteTarget::Standalone(url) => {
                    let client = redis::Client::open(url.as_str()).map_err(|e| fail(e.to_string()))?;
                    let config = ConnectionManagerConfig::new()
                        .set_connection_timeout(Some(timeout))
                        .set_response_timeout(Some(timeout))
                        .set_number_of_retries(1)
                        .set_max_delay(Duration::from_millis(500));
                    let manager =
                        ConnectionManager::new_lazy_with_config(client, config).map_err(|e| fail(e.to_string()))?;
                    Connection::Standalone(manager)
                }
                RemoteTarget::Cluster(nodes) => {
                    let client = ClusterClientBuilder::new(nodes.iter().map(String::as_str))
                        .connection_timeout(timeout)
                        .response_timeout(timeout)
                        .retries(1)
                        .build()
                        .map_err(|e| fail(e.to_string()))?;
                    let config = redis::cluster::ClusterConfig::new()
                        .set_connection_timeout(timeout)
                        .set_response_timeout(timeout);
                    Connection::Cluster(client.get_pending_async_connection_with_config(config))
                }
            }
        };
        let queue = DropOldestQueue::new(settings.queue_items, settings.queue_bytes);
        let inner = Arc::new(Inner {
            cluster: matches!(settings.target, RemoteTarget::Cluster(_)),
            connection,
            queue,
            health: Health {
                up: AtomicBool::new(false),
                state: Mutex::new((Instant::now(), Some("connecting".into()))),
            },
            counters: RemoteCounters::default(),
            instruments,
            back_up: tokio::sync::Notify::new(),
            settings,
        });
        for _ in 0..inner.settings.writers.max(1) {
            runtime.spawn(write_loop(Arc::downgrade(&inner)));
        }
        runtime.spawn(ping_loop(Arc::downgrade(&inner)));
        tracing::info!(remote = %inner.settings.shown_as, cluster = inner.cluster, "remote tier configured");
        Ok(Arc::new(RemoteTier { inner, runtime: Some(runtime) }))
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.runtime.as_ref().expect("the runtime lives as long as the tier").handle()
    }
}

impl Drop for RemoteTier {
    fn drop(&mut self) {
        self.inner.queue.close();
        if let Some(rt) = self.runtime.take() {
            // Dropping a runtime may not block inside another runtime (the
            // actix system this is dropped from).
            rt.shutdown_background();
        }
    }
}

impl Inner {
    fn is_up(&self) -> bool {
        self.health.up.load(Ordering::Acquire)
    }

    fn mark_up(&self) {
        if !self.health.up.swap(true, Ordering::AcqRel) {
            *self.health.state.lock() = (Instant::now(), None);
            tracing::info!(remote = %self.settings.shown_as, "remote tier up");
            self.back_up.notify_waiters();
        }
    }

    fn mark_down(&self, why: String) {
        let was_up = self.health.up.swap(false, Ordering::AcqRel);
        let mut s = self.health.state.lock();
        if was_up {
            *s = (Instant::now(), Some(why.clone()));
            tracing::warn!(remote = %self.settings.shown_as, error = %why, "remote tier down; serving from L1 and disk");
        } else {
            s.1 = Some(why);
        }
    }

    /// Counts a failed call. On one server, a timeout or connection error
    /// marks the tier down; on a cluster, one node failing is not the tier
    /// failing (its other nodes serve their slots), so the caller decides.
    fn failed(&self, failure: Failure, why: String) {
        add(&self.counters.errors, 1);
        self.instruments.error(failure.name());
        if failure.unreachable() && !self.cluster {
            self.mark_down(why);
        } else {
            self.health.state.lock().1 = Some(why);
        }
    }

    fn object_key(&self, namespace: &ObjectNamespace, key: &ObjectKey) -> Vec<u8> {
        remote_format::object_key(&self.settings.key_prefix, namespace, key.rank, &key.hash)
    }

    /// The call's limit: the tier's timeout, never past `deadline`.
    fn limit(&self, deadline: Instant) -> tokio::time::Instant {
        let own = Instant::now() + self.settings.timeout;
        tokio::time::Instant::from_std(own.min(deadline))
    }

    /// Runs `command` once per key (`EXISTS`, `GET`) as batches: one
    /// pipeline on a single server, one per hash slot on a cluster (all at
    /// once). Returns each key's reply, `None` where its batch failed.
    async fn batched(
        &self,
        command: &str,
        keys: &[Vec<u8>],
        deadline: Instant,
        op: &'static str,
    ) -> Vec<Option<Value>> {
        let mut groups: Vec<Vec<usize>> = Vec::new();
        if self.cluster {
            let mut by_slot: HashMap<Slot, usize> = HashMap::new();
            for (i, k) in keys.iter().enumerate() {
                let g = *by_slot.entry(Slot::for_key(k)).or_insert_with(|| {
                    groups.push(Vec::new());
                    groups.len() - 1
                });
                groups[g].push(i);
            }
        } else {
            groups.push((0..keys.len()).collect());
        }
        let limit = self.limit(deadline);
        let started = Instant::now();
        let calls = groups.iter().map(|members| {
            let mut pipe = redis::pipe();
            pipe.ignore_errors();
            for &i in members {
                pipe.cmd(command).arg(&keys[i]);
            }
            async move {
                let result = tokio::time::timeout_at(limit, self.connection.pipeline(&pipe)).await;
                (members, result)
            }
        });
        let results = futures::future::join_all(calls).await;
        self.instruments.observe(op, started.elapsed());
        let mut out: Vec<Option<Value>> = vec![None; keys.len()];
        let mut answered = false;
        for (members, result) in results {
            match result {
                Ok(Ok(replies)) if replies.len() == members.len() => {
                    answered = true;
                    for (&i, reply) in members.iter().zip(replies) {
                        match reply {
                            Ok(v) => out[i] = Some(v),
                            Err(e) => self.failed(Failure::of(&e), e.to_string()),
                        }
                    }
                }
                Ok(Ok(replies)) => self
                    .failed(Failure::Server, format!("{} replies to a pipeline of {}", replies.len(), members.len())),
                Ok(Err(e)) => self.failed(Failure::of(&e), e.to_string()),
                Err(_) => self.failed(Failure::Timeout, format!("{op} took longer than its limit")),
            }
        }
        // On a cluster, batches that failed were their nodes' (the pinger
        // says when the whole cluster is down).
        if answered {
            self.mark_up();
        }
        out
    }

    async fn probe(&self, keys: Vec<Vec<u8>>, deadline: Instant) -> Vec<bool> {
        if !self.is_up() || keys.is_empty() {
            add(&self.counters.misses, keys.len() as u64);
            return vec![false; keys.len()];
        }
        let replies = self.batched("EXISTS", &keys, deadline, "probe").await;
        let held: Vec<bool> = replies.iter().map(|r| matches!(r, Some(Value::Int(n)) if *n > 0)).collect();
        let found = held.iter().filter(|&&h| h).count() as u64;
        add(&self.counters.hits, found);
        add(&self.counters.misses, keys.len() as u64 - found);
        held
    }

    async fn read(&self, reads: Vec<TierRead>, deadline: Instant) {
        if !self.is_up() {
            add(&self.counters.misses, reads.len() as u64);
            for r in reads {
                r.finish(Err(TierReadError::Unavailable("the remote tier is down".into())));
            }
            return;
        }
        let mut prefixes: Vec<(Arc<ObjectNamespace>, KeyPrefix)> = Vec::new();
        let keys: Vec<Vec<u8>> = reads
            .iter()
            .map(|r| {
                let i = match prefixes.iter().position(|(ns, _)| ns == r.namespace()) {
                    Some(i) => i,
                    None => {
                        prefixes
                            .push((r.namespace().clone(), KeyPrefix::new(&self.settings.key_prefix, r.namespace())));
                        prefixes.len() - 1
                    }
                };
                prefixes[i].1.key(r.key().rank, &r.key().hash)
            })
            .collect();
        let replies = self.batched("GET", &keys, deadline, "read").await;
        for ((read, key), reply) in reads.into_iter().zip(&keys).zip(replies) {
            let result = match reply {
                Some(Value::BulkString(bytes)) => {
                    add(&self.counters.bytes_in, bytes.len() as u64);
                    self.fill(key, &bytes, read.target())
                }
                Some(Value::Nil) => Err(TierReadError::Missing),
                Some(other) => Err(self.rejected(key, Rejected::Foreign, &format!("{other:?}"))),
                None => Err(TierReadError::Unavailable("no answer from the remote tier".into())),
            };
            add(if result.is_ok() { &self.counters.hits } else { &self.counters.misses }, 1);
            read.finish(result);
        }
    }

    /// Verifies `value` and copies its payload into `target`.
    fn fill(&self, key: &[u8], value: &[u8], target: &dyn ObjectBytes) -> Result<(), TierReadError> {
        let payload = remote_format::verify(key, value, target.len())
            .map_err(|why| self.rejected(key, why, "value failed verification"))?;
        // SAFETY: `target` is a read's target, `Exclusive` bytes (an L1
        // write ticket or a buffer) that nothing else touches until the read
        // finishes, of exactly `target.len()` bytes, which `verify` checked
        // is the payload's length.
        let out = unsafe { std::slice::from_raw_parts_mut(target.as_ptr(), target.len()) };
        out.copy_from_slice(payload);
        Ok(())
    }

    fn rejected(&self, key: &[u8], why: Rejected, detail: &str) -> TierReadError {
        add(&self.counters.rejected, 1);
        self.instruments.error(why.name());
        let key = String::from_utf8_lossy(key).into_owned();
        tracing::warn!(key, reason = why.name(), detail, "remote value refused; treated as a miss");
        TierReadError::Corrupt(key)
    }

    /// Frames and `SET`s one object. A write that failed because the remote
    /// is down goes back to the queue (first in line) to be tried when it is
    /// back; any other failed write is counted and dropped.
    async fn write(&self, job: WriteJob) {
        let cmd = {
            // SAFETY: the read guard in `job.object` keeps the object's bytes
            // alive and unwritten (Ready or Doomed) until it drops, below.
            let payload = unsafe { std::slice::from_raw_parts(job.object.as_ptr(), job.object.len()) };
            let header = remote_format::header(&job.key, payload);
            // Room for every argument at once: the payload is copied once.
            let mut cmd = redis::Cmd::with_capacity(3, 3 + job.key.len() + HEADER_BYTES + payload.len());
            cmd.arg("SET").arg(&job.key).arg(Framed { header: &header, payload });
            cmd
        };
        let bytes = (HEADER_BYTES + job.object.len()) as u64;
        let started = Instant::now();
        let limit = self.limit(started + self.settings.timeout);
        let result = tokio::time::timeout_at(limit, self.connection.command(&cmd)).await;
        self.instruments.observe("write", started.elapsed());
        match result {
            Ok(Ok(_)) => {
                add(&self.counters.writes, 1);
                add(&self.counters.bytes_out, bytes);
                self.mark_up();
            }
            Ok(Err(e)) => {
                add(&self.counters.write_errors, 1);
                let f = Failure::of(&e);
                self.failed(f, e.to_string());
                self.retry_later(job);
            }
            // On a cluster, one node timing out is that node's: the pinger
            // says whether the cluster is down.
            Err(_) => {
                add(&self.counters.write_errors, 1);
                self.failed(Failure::Timeout, "write took longer than its limit".into());
                self.retry_later(job);
            }
        }
    }

    /// Puts a failed write back while the whole tier is down (it goes out
    /// when the remote is back); drops it otherwise (a refusal, or one
    /// cluster node down: retrying would hold up every other write).
    fn retry_later(&self, job: WriteJob) {
        if !self.is_up() {
            let bytes = job.object.len() as u64;
            self.queue.put_back(job, bytes);
        }
    }
}

/// One writer: takes queued objects and writes them while the remote is up;
/// waits (the queue dropping its oldest) while it is down.
async fn write_loop(inner: std::sync::Weak<Inner>) {
    loop {
        let Some(tier) = inner.upgrade() else { return };
        if !tier.is_up() {
            let back = tier.back_up.notified();
            tokio::pin!(back);
            back.as_mut().enable();
            if !tier.is_up() {
                // The pinger wakes us when it comes back; look again now and
                // then all the same.
                let _ = tokio::time::timeout(PING_EVERY, back).await;
                continue;
            }
        }
        let Some(job) = tier.queue.pop().await else { return };
        tier.write(job).await;
    }
}

/// Checks the remote every [`PING_EVERY`]: marks it up when it answers,
/// down when it does not.
async fn ping_loop(inner: std::sync::Weak<Inner>) {
    loop {
        let Some(tier) = inner.upgrade() else { return };
        let started = Instant::now();
        let limit = tier.limit(started + tier.settings.timeout);
        let ping = async {
            match &tier.connection {
                // A cluster is up while any primary answers (the others'
                // slots miss until they come back).
                Connection::Cluster(c) => {
                    let routing = redis::cluster_routing::RoutingInfo::MultiNode((
                        redis::cluster_routing::MultipleNodeRoutingInfo::AllMasters,
                        Some(redis::cluster_routing::ResponsePolicy::OneSucceeded),
                    ));
                    c.clone().route_command(redis::cmd("PING"), routing).await.map(|_| ())
                }
                Connection::Standalone(_) => tier.connection.command(&redis::cmd("PING")).await.map(|_| ()),
            }
        };
        match tokio::time::timeout_at(limit, ping).await {
            Ok(Ok(())) => tier.mark_up(),
            Ok(Err(e)) => {
                tier.failed(Failure::of(&e), e.to_string());
                tier.mark_down(e.to_string());
            }
            Err(_) => {
                tier.failed(Failure::Timeout, "ping took longer than its limit".into());
                tier.mark_down("ping took longer than its limit".into());
            }
        }
        drop(tier);
        tokio::time::sleep(PING_EVERY.saturating_sub(started.elapsed())).await;
    }
}

impl Tier for RemoteTier {
    fn name(&self) -> &'static str {
        "remote"
    }

    fn contains(&self, _: &ObjectKey) -> bool {
        false
    }

    fn probe(
        &self,
        namespace: &Arc<ObjectNamespace>,
        keys: &[ObjectKey],
        deadline: Instant,
    ) -> BoxFuture<'static, Vec<bool>> {
        let inner = self.inner.clone();
        let prefix = KeyPrefix::new(&inner.settings.key_prefix, namespace);
        let keys: Vec<Vec<u8>> = keys.iter().map(|k| prefix.key(k.rank, &k.hash)).collect();
        // Runs on the caller's runtime (no hop to the tier's): the requests
        // go to the connection's driver task on the tier's runtime, the
        // replies come straight back.
        Box::pin(async move { inner.probe(keys, deadline).await })
    }

    fn read(&self, read: TierRead) {
        self.read_many(vec![read], Instant::now() + self.inner.settings.timeout);
    }

    fn read_many(&self, reads: Vec<TierRead>, deadline: Instant) {
        let inner = self.inner.clone();
        // A read dropped unanswered (the runtime shutting down) reads as failed.
        self.handle().spawn(async move { inner.read(reads, deadline).await });
    }

    fn write_behind(&self, job: WriteBehind) -> bool {
        let key = self.inner.object_key(&job.namespace, &job.key);
        let bytes = job.object.len() as u64;
        self.inner.queue.push(WriteJob { key, object: job.object }, bytes)
    }

    fn stats(&self) -> TierStats {
        let c = &self.inner.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let (queued, backlog) = self.inner.queue.depth();
        TierStats {
            backlog,
            queued,
            hits: get(&c.hits),
            misses: get(&c.misses),
            writes: get(&c.writes),
            write_errors: get(&c.write_errors),
            corrupt: get(&c.rejected),
            skipped: self.inner.queue.dropped(),
            bytes_in: get(&c.bytes_in),
            bytes_out: get(&c.bytes_out),
            errors: get(&c.errors),
            up: self.inner.is_up(),
            ..TierStats::default()
        }
    }

    fn health(&self) -> Option<TierHealth> {
        let (since, last_error) = self.inner.health.state.lock().clone();
        Some(TierHealth { endpoint: self.inner.settings.shown_as.clone(), up: self.inner.is_up(), since, last_error })
    }
}

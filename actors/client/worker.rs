//! The worker-client actor: one per TP worker. It owns a reconnecting
//! connection and the worker's registrations, watches the link, and on every
//! new connection (a new server epoch after a restart) registers everything
//! again before anything else is sent. Requests go through it as messages;
//! [`WorkerHandle`] wraps them in a typed API.
//!
//! Failure policy (so the engine never waits on the cache): while the
//! coordinator is unreachable, stores fail fast with `Unavailable`, and
//! lookups and retrieves report misses (with the error beside them), so the
//! engine recomputes. It must never retry a request except once after
//! `NotRegistered`.

use std::os::fd::BorrowedFd;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use kvcoord_transport::{
    ChunkHash, Endpoint, ErrorKind, FaultTarget, InstanceKey, LeaseId, LinkState, LookupPrefix, ReconnectOptions,
    ReconnectingClient, RegisterKvCache, ReplyBody, RequestBody, RequestError, RetrieveChunks, RetrieveOutcome,
    ServerEpoch, ServerStats, StoreChunks, StoreOutcome,
};
use tokio::time::Instant;

use super::registrations::{Registration, Registrations};

/// Worker client settings.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub endpoint: Endpoint,
    pub reconnect: ReconnectOptions,
    /// Deadline of store, lookup and retrieve requests.
    pub request_timeout: Duration,
    /// Deadline of a register request (the server may take seconds per worker
    /// to open CUDA memory and create streams).
    pub register_timeout: Duration,
    /// How long a request waits for a connection before failing fast.
    pub disconnected_wait: Duration,
}

impl WorkerConfig {
    pub fn new(endpoint: Endpoint) -> Self {
        WorkerConfig {
            endpoint,
            reconnect: ReconnectOptions::default(),
            request_timeout: Duration::from_secs(10),
            register_timeout: Duration::from_secs(30),
            disconnected_wait: Duration::from_millis(20),
        }
    }
}

struct Core {
    cfg: WorkerConfig,
    link: ReconnectingClient,
    registrations: Registrations,
}

impl Core {
    /// Sends `body` on a fully registered connection; after `NotRegistered`,
    /// registers again (once, shared with concurrent requests) and resends.
    async fn call(&self, body: RequestBody, timeout: Duration) -> Result<ReplyBody, RequestError> {
        let deadline = Instant::now() + timeout;
        let conn = self.link.connection(self.cfg.disconnected_wait).await?;
        let mut generation = tokio::time::timeout_at(deadline, self.registrations.ensure(&conn))
            .await
            .map_err(|_| RequestError::Timeout)??;
        let mut registered_again = false;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RequestError::Timeout);
            }
            match conn.request(body.clone(), left, Vec::new()).await {
                Err(RequestError::Server(e)) if e.kind == ErrorKind::NotRegistered && !registered_again => {
                    registered_again = true;
                    generation =
                        tokio::time::timeout_at(deadline, self.registrations.after_not_registered(&conn, generation))
                            .await
                            .map_err(|_| RequestError::Timeout)??;
                }
                other => return other,
            }
        }
    }
}

/// The worker-client actor.
pub struct WorkerClient {
    core: Arc<Core>,
}

impl WorkerClient {
    /// Starts a worker client (inside an actix `System`) and returns its API.
    pub fn start(cfg: WorkerConfig) -> WorkerHandle {
        let link = ReconnectingClient::start(cfg.endpoint.clone(), cfg.reconnect.clone());
        let registrations = Registrations::new(cfg.register_timeout);
        let core = Arc::new(Core { cfg, link, registrations });
        let addr = WorkerClient { core: core.clone() }.start();
        WorkerHandle { addr, core }
    }
}

impl Actor for WorkerClient {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        let link = self.core.link.subscribe();
        let states = futures::stream::unfold(link, |mut rx| async move {
            rx.changed().await.ok()?;
            let s = rx.borrow_and_update().clone();
            Some((s, rx))
        });
        ctx.add_stream(states);
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.core.link.close();
    }
}

impl StreamHandler<LinkState> for WorkerClient {
    /// A new connection (a new epoch after a restart): register everything
    /// again right away, so recovery does not wait for the next request.
    fn handle(&mut self, state: LinkState, ctx: &mut Self::Context) {
        let Some(conn) = state.connection else { return };
        if self.core.registrations.len() == 0 {
            return;
        }
        let core = self.core.clone();
        ctx.spawn(
            async move {
                if let Err(e) = core.registrations.ensure(&conn).await {
                    tracing::warn!(error = %e, "registering again after reconnect failed; the next request retries");
                }
            }
            .into_actor(self),
        );
    }

    fn finished(&mut self, _: &mut Self::Context) {}
}

/// A request through the actor.
#[derive(Message)]
#[rtype(result = "Result<ReplyBody, RequestError>")]
struct Call {
    body: RequestBody,
    timeout: Duration,
}

impl Handler<Call> for WorkerClient {
    type Result = ResponseFuture<Result<ReplyBody, RequestError>>;
    fn handle(&mut self, msg: Call, _: &mut Self::Context) -> Self::Result {
        let core = self.core.clone();
        Box::pin(async move { core.call(msg.body, msg.timeout).await })
    }
}

#[derive(Message)]
#[rtype(result = "Result<bool, RequestError>")]
struct Register(Registration);

impl Handler<Register> for WorkerClient {
    type Result = ResponseFuture<Result<bool, RequestError>>;
    fn handle(&mut self, msg: Register, _: &mut Self::Context) -> Self::Result {
        let core = self.core.clone();
        Box::pin(async move {
            let conn = core.link.connection(core.cfg.register_timeout).await?;
            core.registrations.add(&conn, msg.0).await
        })
    }
}

/// What a lookup found. On failure `chunks` is 0 and `error` says why, so
/// the engine can simply recompute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LookupResult {
    pub chunks: u32,
    pub lease: Option<LeaseId>,
    pub error: Option<RequestError>,
}

/// What a retrieve did. On failure every chunk is `Missing` and `error` says why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetrieveResult {
    pub outcomes: Vec<RetrieveOutcome>,
    pub error: Option<RequestError>,
}

impl RetrieveResult {
    /// Leading chunks retrieved.
    pub fn prefix_retrieved(&self) -> usize {
        self.outcomes.iter().take_while(|o| **o == RetrieveOutcome::Retrieved).count()
    }
}

/// The typed async API of a worker client. Cheap to clone.
#[derive(Clone)]
pub struct WorkerHandle {
    addr: Addr<WorkerClient>,
    core: Arc<Core>,
}

fn mailbox(_: MailboxError) -> RequestError {
    RequestError::Closed
}

fn unexpected(body: ReplyBody) -> RequestError {
    RequestError::Server(kvcoord_transport::WireError::new(ErrorKind::Internal, format!("unexpected reply {body:?}")))
}

impl WorkerHandle {
    async fn call(&self, body: RequestBody, timeout: Duration) -> Result<ReplyBody, RequestError> {
        self.addr.send(Call { body, timeout }).await.map_err(mailbox)?
    }

    /// Registers a KV cache (the host backend passes its memfd). Kept and
    /// registered again on every new server epoch. Returns `already`.
    pub async fn register(&self, request: RegisterKvCache, fd: Option<BorrowedFd<'_>>) -> Result<bool, RequestError> {
        let fd = fd.map(|f| f.try_clone_to_owned()).transpose().map_err(|e| RequestError::Encode(e.to_string()))?;
        self.addr.send(Register(Registration { request, fd })).await.map_err(mailbox)?
    }

    /// Unregisters and forgets a registration.
    pub async fn unregister(&self, instance: InstanceKey) -> Result<(), RequestError> {
        self.core.registrations.remove(&instance);
        self.call(RequestBody::Unregister { instance }, self.core.cfg.request_timeout).await.map(|_| ())
    }

    /// Stores chunks; per-chunk outcomes. Fails fast while disconnected.
    pub async fn store(
        &self,
        instance: InstanceKey,
        chunks: Vec<ChunkHash>,
        block_ids: Vec<u32>,
    ) -> Result<Vec<StoreOutcome>, RequestError> {
        self.store_after(instance, chunks, block_ids, None).await
    }

    /// Stores chunks once `ready_event` (the IPC handle of an event the
    /// engine recorded after writing the blocks; CUDA memory only) fires:
    /// the coordinator's store stream waits for it, this call does not.
    pub async fn store_after(
        &self,
        instance: InstanceKey,
        chunks: Vec<ChunkHash>,
        block_ids: Vec<u32>,
        ready_event: Option<Vec<u8>>,
    ) -> Result<Vec<StoreOutcome>, RequestError> {
        let body = RequestBody::Store(StoreChunks { instance, chunks, block_ids, ready_event });
        match self.call(body, self.core.cfg.request_timeout).await? {
            ReplyBody::Stored(o) => Ok(o),
            other => Err(unexpected(other)),
        }
    }

    /// Leading chunks held for every rank; a miss (0) on any failure.
    pub async fn lookup(&self, instance: InstanceKey, chunks: Vec<ChunkHash>, lease: bool) -> LookupResult {
        let body = RequestBody::Lookup(LookupPrefix { instance, chunks, lease });
        match self.call(body, self.core.cfg.request_timeout).await {
            Ok(ReplyBody::Found { chunks, lease }) => LookupResult { chunks, lease, error: None },
            Ok(other) => LookupResult { chunks: 0, lease: None, error: Some(unexpected(other)) },
            Err(e) => LookupResult { chunks: 0, lease: None, error: Some(e) },
        }
    }

    /// Retrieves chunks into blocks; all `Missing` on any failure.
    pub async fn retrieve(
        &self,
        instance: InstanceKey,
        chunks: Vec<ChunkHash>,
        block_ids: Vec<u32>,
        lease: Option<LeaseId>,
    ) -> RetrieveResult {
        let n = chunks.len();
        let body = RequestBody::Retrieve(RetrieveChunks { instance, chunks, block_ids, lease });
        let missing = |error| RetrieveResult { outcomes: vec![RetrieveOutcome::Missing; n], error: Some(error) };
        match self.call(body, self.core.cfg.request_timeout).await {
            Ok(ReplyBody::Retrieved(outcomes)) => RetrieveResult { outcomes, error: None },
            Ok(other) => missing(unexpected(other)),
            Err(e) => missing(e),
        }
    }

    pub async fn release_lease(&self, lease: LeaseId) -> Result<(), RequestError> {
        self.call(RequestBody::ReleaseLease { lease }, self.core.cfg.request_timeout).await.map(|_| ())
    }

    pub async fn ping(&self) -> Result<ServerEpoch, RequestError> {
        match self.call(RequestBody::Ping, self.core.cfg.request_timeout).await? {
            ReplyBody::Pong { epoch } => Ok(epoch),
            other => Err(unexpected(other)),
        }
    }

    pub async fn stats(&self) -> Result<ServerStats, RequestError> {
        match self.call(RequestBody::Stats, self.core.cfg.request_timeout).await? {
            ReplyBody::Stats(s) => Ok(*s),
            other => Err(unexpected(other)),
        }
    }

    pub async fn clear(&self) -> Result<u64, RequestError> {
        match self.call(RequestBody::Clear, self.core.cfg.request_timeout).await? {
            ReplyBody::Cleared { objects } => Ok(objects),
            other => Err(unexpected(other)),
        }
    }

    /// Fault injection (the server must allow it).
    pub async fn inject_fault(&self, target: FaultTarget) -> Result<(), RequestError> {
        self.call(RequestBody::InjectFault(target), self.core.cfg.request_timeout).await.map(|_| ())
    }

    /// Rounds of registering again so far (new epochs and `NotRegistered`).
    pub fn reregistrations(&self) -> u64 {
        self.core.registrations.reregistrations()
    }

    /// The link: connections so far and the current server epoch.
    pub fn link(&self) -> tokio::sync::watch::Receiver<LinkState> {
        self.core.link.subscribe()
    }

    /// Closes the connection and stops the actor.
    pub fn close(&self) {
        self.core.link.close();
    }
}

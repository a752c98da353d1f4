//! The async client core: one per TP worker (or per scheduler process that
//! only looks up). It owns a reconnecting connection and the worker's
//! registrations, and a background task that registers everything again on
//! every new connection (a new server epoch after a restart) before anything
//! else is sent.
//!
//! Failure policy (so the engine never waits on the cache): while the
//! coordinator is unreachable, stores fail fast with `Unavailable`, and
//! lookups and retrieves report misses (with the error beside them), so the
//! engine recomputes. It must never retry a request except once after
//! `NotRegistered`, and never register again for any other error.

use std::os::fd::BorrowedFd;
use std::sync::{Arc, Weak};
use std::time::Duration;

use kvcoord_transport::{
    ChunkHash, ErrorKind, FaultTarget, InstanceKey, LeaseId, LinkState, LookupByModel, LookupPrefix,
    ReconnectingClient, RegisterKvCache, ReplyBody, RequestBody, RequestError, RetrieveChunks, RetrieveOutcome,
    ServerEpoch, ServerStats, StatusReport, StoreChunks, StoreOutcome, WireError,
};
use tokio::time::Instant;

use crate::config::ClientConfig;
use crate::registrations::{Registration, Registrations};

struct Core {
    cfg: ClientConfig,
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

/// On every new connection, registers everything again right away, so
/// recovery does not wait for the next request. Ends when the client goes.
async fn reregister_on_new_connection(core: Weak<Core>, mut link: tokio::sync::watch::Receiver<LinkState>) {
    while link.changed().await.is_ok() {
        let state = link.borrow_and_update().clone();
        if state.closed {
            return;
        }
        let Some(conn) = state.connection else { continue };
        let Some(core) = core.upgrade() else { return };
        if core.registrations.len() == 0 {
            continue;
        }
        if let Err(e) = core.registrations.ensure(&conn).await {
            tracing::warn!(error = %e, "registering again after reconnect failed; the next request retries");
        }
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

fn unexpected(body: ReplyBody) -> RequestError {
    RequestError::Server(WireError::new(ErrorKind::Internal, format!("unexpected reply {body:?}")))
}

/// The client. Cheap to clone; the connection closes with [`Client::close`]
/// or when the last clone drops.
#[derive(Clone)]
pub struct Client {
    core: Arc<Core>,
}

impl Client {
    /// Starts connecting in the background and returns at once. Must be
    /// called inside a tokio runtime (an actix `System` is one).
    pub fn start(cfg: ClientConfig) -> Client {
        let link = ReconnectingClient::start(cfg.endpoint.clone(), cfg.reconnect_options());
        let registrations = Registrations::new(cfg.register_timeout);
        let core = Arc::new(Core { cfg, link, registrations });
        tokio::spawn(reregister_on_new_connection(Arc::downgrade(&core), core.link.subscribe()));
        Client { core }
    }

    pub fn config(&self) -> &ClientConfig {
        &self.core.cfg
    }

    /// One request, with this client's registration rule and `timeout`.
    pub async fn call(&self, body: RequestBody, timeout: Duration) -> Result<ReplyBody, RequestError> {
        self.core.call(body, timeout).await
    }

    async fn request(&self, body: RequestBody) -> Result<ReplyBody, RequestError> {
        self.core.call(body, self.core.cfg.request_timeout).await
    }

    /// Registers a KV cache (the host backend passes its memfd). Kept and
    /// registered again on every new server epoch. Returns `already`.
    pub async fn register(&self, request: RegisterKvCache, fd: Option<BorrowedFd<'_>>) -> Result<bool, RequestError> {
        let fd = fd.map(|f| f.try_clone_to_owned()).transpose().map_err(|e| RequestError::Encode(e.to_string()))?;
        let conn = self.core.link.connection(self.core.cfg.register_timeout).await?;
        self.core.registrations.add(&conn, Registration::new(request, fd)).await
    }

    /// Unregisters and forgets a registration.
    pub async fn unregister(&self, instance: InstanceKey) -> Result<(), RequestError> {
        self.core.registrations.remove(&instance);
        self.request(RequestBody::Unregister { instance }).await.map(|_| ())
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
        match self.request(body).await? {
            ReplyBody::Stored(o) => Ok(o),
            other => Err(unexpected(other)),
        }
    }

    /// Leading chunks held for every rank; a miss (0) on any failure.
    pub async fn lookup(&self, instance: InstanceKey, chunks: Vec<ChunkHash>, lease: bool) -> LookupResult {
        let body = RequestBody::Lookup(LookupPrefix { instance, chunks, lease });
        match self.request(body).await {
            Ok(ReplyBody::Found { chunks, lease }) => LookupResult { chunks, lease, error: None },
            Ok(other) => LookupResult { chunks: 0, lease: None, error: Some(unexpected(other)) },
            Err(e) => LookupResult { chunks: 0, lease: None, error: Some(e) },
        }
    }

    /// Leading chunks held for every rank of `world_size` ranks of `model`,
    /// asked without a registration (an engine's scheduler is another
    /// process than its workers). The lease belongs to this client's
    /// connection, and any rank's retrieve may use it. A miss (0) on any failure.
    pub async fn lookup_model(
        &self,
        model: &str,
        world_size: u32,
        chunks: Vec<ChunkHash>,
        lease: bool,
    ) -> LookupResult {
        let body = RequestBody::LookupModel(LookupByModel { model: model.to_string(), world_size, chunks, lease });
        match self.request(body).await {
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
        self.retrieve_with_done_event(instance, chunks, block_ids, lease, None).await
    }

    /// Retrieves chunks; with `done_event` (the IPC handle of an
    /// interprocess CUDA event of the engine; CUDA memory only) the server
    /// replies once the copy is queued and records the event after it: the
    /// blocks are written when the event completes, so the engine's stream
    /// waits on the event before reading them.
    pub async fn retrieve_with_done_event(
        &self,
        instance: InstanceKey,
        chunks: Vec<ChunkHash>,
        block_ids: Vec<u32>,
        lease: Option<LeaseId>,
        done_event: Option<Vec<u8>>,
    ) -> RetrieveResult {
        let n = chunks.len();
        let body = RequestBody::Retrieve(RetrieveChunks { instance, chunks, block_ids, lease, done_event });
        let missing = |error| RetrieveResult { outcomes: vec![RetrieveOutcome::Missing; n], error: Some(error) };
        match self.request(body).await {
            Ok(ReplyBody::Retrieved(outcomes)) => RetrieveResult { outcomes, error: None },
            Ok(other) => missing(unexpected(other)),
            Err(e) => missing(e),
        }
    }

    pub async fn release_lease(&self, lease: LeaseId) -> Result<(), RequestError> {
        self.request(RequestBody::ReleaseLease { lease }).await.map(|_| ())
    }

    pub async fn ping(&self) -> Result<ServerEpoch, RequestError> {
        match self.request(RequestBody::Ping).await? {
            ReplyBody::Pong { epoch } => Ok(epoch),
            other => Err(unexpected(other)),
        }
    }

    pub async fn stats(&self) -> Result<ServerStats, RequestError> {
        match self.request(RequestBody::Stats).await? {
            ReplyBody::Stats(s) => Ok(*s),
            other => Err(unexpected(other)),
        }
    }

    pub async fn status(&self) -> Result<StatusReport, RequestError> {
        match self.request(RequestBody::Status).await? {
            ReplyBody::Status(s) => Ok(*s),
            other => Err(unexpected(other)),
        }
    }

    pub async fn clear(&self) -> Result<u64, RequestError> {
        match self.request(RequestBody::Clear).await? {
            ReplyBody::Cleared { objects } => Ok(objects),
            other => Err(unexpected(other)),
        }
    }

    /// Fault injection (the server must allow it).
    pub async fn inject_fault(&self, target: FaultTarget) -> Result<(), RequestError> {
        self.request(RequestBody::InjectFault(target)).await.map(|_| ())
    }

    /// Rounds of registering again so far (new epochs and `NotRegistered`).
    pub fn reregistrations(&self) -> u64 {
        self.core.registrations.reregistrations()
    }

    /// The link: connections so far and the current server epoch.
    pub fn link(&self) -> tokio::sync::watch::Receiver<LinkState> {
        self.core.link.subscribe()
    }

    /// Closes the connection; every later request fails with `Closed`.
    pub fn close(&self) {
        self.core.link.close();
    }
}

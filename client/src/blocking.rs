//! The blocking facade: [`Client`]'s calls for code that is not async
//! (Python and other language bindings). It owns a small tokio runtime; each
//! call blocks the calling thread until its reply, or returns a [`Pending`]
//! reply that can be polled, waited for with a timeout, or dropped.
//!
//! It adds no behaviour of its own: reconnect, epoch and the re-registration
//! rule are the core's. It must never be called from inside an async task
//! (blocking a runtime thread); use [`Client`] there.

use std::future::Future;
use std::os::fd::BorrowedFd;
use std::sync::mpsc;
use std::time::Duration;

use kvcoord_transport::{
    ChunkHash, InstanceKey, LeaseId, RegisterKvCache, RequestError, ServerEpoch, ServerStats, StatusReport,
    StoreOutcome,
};
use parking_lot::Mutex;

use crate::client::{Client, LookupResult, RetrieveResult};
use crate::config::ClientConfig;

/// How long [`Pending::wait`] looks for the reply before it sleeps.
const SPIN_BEFORE_SLEEP: Duration = Duration::from_micros(100);

/// A reply that has not necessarily come yet. Its value arrives whole, once:
/// there is no "done" flag apart from the value itself.
pub struct Pending<T> {
    rx: Mutex<Slot<T>>,
}

enum Slot<T> {
    Waiting(mpsc::Receiver<T>),
    Ready(T),
    Taken,
}

/// Why [`Pending::wait`] returned no value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PendingError {
    #[error("the reply has not come yet")]
    NotYet,
    #[error("the reply was already taken")]
    Taken,
    #[error("the client's runtime dropped the request")]
    Abandoned,
}

impl<T> Pending<T> {
    /// True once the value is here (then [`Pending::wait`] returns at once).
    pub fn is_ready(&self) -> bool {
        let mut slot = self.rx.lock();
        if let Slot::Waiting(rx) = &*slot {
            match rx.try_recv() {
                Ok(v) => *slot = Slot::Ready(v),
                Err(mpsc::TryRecvError::Empty) => return false,
                Err(mpsc::TryRecvError::Disconnected) => return true,
            }
        }
        true
    }

    /// Takes the value, waiting at most `timeout` (forever with `None`).
    pub fn wait(&self, timeout: Option<Duration>) -> Result<T, PendingError> {
        let mut slot = self.rx.lock();
        match std::mem::replace(&mut *slot, Slot::Taken) {
            Slot::Ready(v) => Ok(v),
            Slot::Taken => Err(PendingError::Taken),
            Slot::Waiting(rx) => {
                // Most replies of small requests come within tens of
                // microseconds: look for a short while before sleeping, so
                // the caller's CPU is awake when the reply lands instead of
                // being woken for it (a wake-up costs about as much as the
                // request on a VM).
                let spin_until = std::time::Instant::now() + SPIN_BEFORE_SLEEP.min(timeout.unwrap_or(Duration::MAX));
                loop {
                    match rx.try_recv() {
                        Ok(v) => return Ok(v),
                        Err(mpsc::TryRecvError::Disconnected) => return Err(PendingError::Abandoned),
                        Err(mpsc::TryRecvError::Empty) if std::time::Instant::now() < spin_until => {
                            std::hint::spin_loop()
                        }
                        Err(mpsc::TryRecvError::Empty) => break,
                    }
                }
                let timeout = timeout.map(|t| t.saturating_sub(SPIN_BEFORE_SLEEP));
                let got = match timeout {
                    Some(t) => rx.recv_timeout(t).map_err(|e| match e {
                        mpsc::RecvTimeoutError::Timeout => PendingError::NotYet,
                        mpsc::RecvTimeoutError::Disconnected => PendingError::Abandoned,
                    }),
                    None => rx.recv().map_err(|_| PendingError::Abandoned),
                };
                if matches!(got, Err(PendingError::NotYet)) {
                    *slot = Slot::Waiting(rx);
                }
                got
            }
        }
    }
}

/// [`Client`] for callers that are not async. Cheap to share by reference
/// across threads (every method takes `&self`).
pub struct BlockingClient {
    runtime: tokio::runtime::Runtime,
    client: Client,
}

impl BlockingClient {
    /// Starts a runtime of `threads` worker threads (1 is plenty for one TP
    /// worker) and the client on it; returns before the first connection.
    pub fn start(cfg: ClientConfig, threads: usize) -> std::io::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads.max(1))
            .thread_name("kvcoord-client")
            .enable_all()
            .build()?;
        let client = {
            let _entered = runtime.enter();
            Client::start(cfg)
        };
        Ok(BlockingClient { runtime, client })
    }

    /// The async client underneath.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Runs `f` on the runtime and hands back its reply to poll.
    pub fn spawn<T, F>(&self, f: impl FnOnce(Client) -> F) -> Pending<T>
    where
        T: Send + 'static,
        F: Future<Output = T> + Send + 'static,
    {
        let (tx, rx) = mpsc::sync_channel(1);
        let fut = f(self.client.clone());
        self.runtime.spawn(async move {
            let _ = tx.send(fut.await);
        });
        Pending { rx: Mutex::new(Slot::Waiting(rx)) }
    }

    /// Blocks on `fut` (on the calling thread, driving the runtime's timers
    /// and sockets through its worker threads).
    pub fn block_on<T>(&self, fut: impl Future<Output = T>) -> T {
        self.runtime.block_on(fut)
    }

    /// Waits up to `wait` for the first connection; the server epoch.
    pub fn wait_connected(&self, wait: Duration) -> Result<ServerEpoch, RequestError> {
        let mut link = self.client.link();
        self.block_on(async move {
            let settled = |s: &kvcoord_transport::LinkState| s.closed || s.connection.is_some() || s.refused.is_some();
            match tokio::time::timeout(wait, link.wait_for(settled)).await {
                Ok(Ok(s)) if s.closed => Err(RequestError::Closed),
                // Refused for good (a wrong token): say so, do not wait on.
                Ok(Ok(s)) if s.connection.is_none() && s.refused.is_some() => {
                    Err(RequestError::Server(s.refused.clone().expect("checked")))
                }
                Ok(Ok(s)) => s.epoch.ok_or(RequestError::Disconnected),
                Ok(Err(_)) => Err(RequestError::Closed),
                Err(_) => Err(RequestError::Disconnected),
            }
        })
    }

    pub fn register(&self, request: RegisterKvCache, fd: Option<BorrowedFd<'_>>) -> Result<bool, RequestError> {
        self.block_on(self.client.register(request, fd))
    }

    pub fn unregister(&self, instance: InstanceKey) -> Result<(), RequestError> {
        self.block_on(self.client.unregister(instance))
    }

    pub fn store(
        &self,
        instance: InstanceKey,
        chunks: Vec<ChunkHash>,
        block_ids: Vec<u32>,
        ready_event: Option<Vec<u8>>,
    ) -> Result<Vec<StoreOutcome>, RequestError> {
        self.block_on(self.client.store_after(instance, chunks, block_ids, ready_event))
    }

    pub fn lookup(&self, instance: InstanceKey, chunks: Vec<ChunkHash>, lease: bool) -> LookupResult {
        self.block_on(self.client.lookup(instance, chunks, lease))
    }

    pub fn lookup_model(&self, model: &str, world_size: u32, chunks: Vec<ChunkHash>, lease: bool) -> LookupResult {
        self.block_on(self.client.lookup_model(model, world_size, chunks, lease))
    }

    pub fn retrieve(
        &self,
        instance: InstanceKey,
        chunks: Vec<ChunkHash>,
        block_ids: Vec<u32>,
        lease: Option<LeaseId>,
    ) -> RetrieveResult {
        self.block_on(self.client.retrieve(instance, chunks, block_ids, lease))
    }

    pub fn release_lease(&self, lease: LeaseId) -> Result<(), RequestError> {
        self.block_on(self.client.release_lease(lease))
    }

    pub fn ping(&self) -> Result<ServerEpoch, RequestError> {
        self.block_on(self.client.ping())
    }

    pub fn stats(&self) -> Result<ServerStats, RequestError> {
        self.block_on(self.client.stats())
    }

    pub fn status(&self) -> Result<StatusReport, RequestError> {
        self.block_on(self.client.status())
    }

    pub fn reregistrations(&self) -> u64 {
        self.client.reregistrations()
    }

    pub fn close(&self) {
        self.client.close();
    }
}

impl Drop for BlockingClient {
    fn drop(&mut self) {
        self.client.close();
    }
}

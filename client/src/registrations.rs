//! The worker client's registrations and the rule for registering them again.
//!
//! The rule: requests are only ever sent on a connection where every
//! registration has been registered. A connection is one server epoch, so a
//! restarted server (new epoch, new connection) gets all registrations again
//! before any other request of this client reaches it. After a
//! `NotRegistered` reply (an actor of the server was restarted), the
//! registrations are sent again once: concurrent requests that all saw
//! `NotRegistered` compare the registration generation they were sent under,
//! and only the first one re-registers. Nothing else (a miss, out of memory,
//! a bad argument, a timeout) ever triggers registration.
//!
//! Each register's reply carries the instance's secret; it is kept and
//! presented by the next register of the instance, so a new connection to
//! the same server (same epoch) takes the instance over from the old one.
//! After a restart the server knows no secret and registers afresh.
//!
//! This module must never send anything but register requests.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use kvcoord_transport::{
    Connection, InstanceKey, InstanceSecret, RegisterKvCache, ReplyBody, RequestBody, RequestError,
};

/// One registration, kept so it can be sent again.
pub struct Registration {
    pub request: RegisterKvCache,
    /// The host backend's memfd (duplicated for every send).
    pub fd: Option<OwnedFd>,
    /// The secret the last register's reply gave.
    secret: parking_lot::Mutex<Option<InstanceSecret>>,
}

impl Registration {
    pub fn new(request: RegisterKvCache, fd: Option<OwnedFd>) -> Self {
        let secret = parking_lot::Mutex::new(request.secret);
        Registration { request, fd, secret }
    }
}

struct Registered {
    /// The connection every registration was last sent on.
    on: Weak<Connection>,
    /// Bumped at each full registration round.
    generation: u64,
}

pub struct Registrations {
    all: parking_lot::Mutex<BTreeMap<InstanceKey, Arc<Registration>>>,
    state: parking_lot::Mutex<Registered>,
    /// Serialises registration rounds.
    round: tokio::sync::Mutex<()>,
    timeout: Duration,
    rounds_again: AtomicU64,
}

impl Registrations {
    pub fn new(timeout: Duration) -> Self {
        Registrations {
            all: parking_lot::Mutex::new(BTreeMap::new()),
            state: parking_lot::Mutex::new(Registered { on: Weak::new(), generation: 0 }),
            round: tokio::sync::Mutex::new(()),
            timeout,
            rounds_again: AtomicU64::new(0),
        }
    }

    /// Rounds of registering everything again (after a new epoch or a
    /// `NotRegistered`), for tests and stats.
    pub fn reregistrations(&self) -> u64 {
        self.rounds_again.load(Ordering::Relaxed)
    }

    pub fn len(&self) -> usize {
        self.all.lock().len()
    }

    /// The generation if everything is registered on `conn`.
    fn registered_on(&self, conn: &Arc<Connection>) -> Option<u64> {
        let st = self.state.lock();
        std::ptr::eq(st.on.as_ptr(), Arc::as_ptr(conn)).then_some(st.generation)
    }

    async fn send(&self, conn: &Connection, reg: &Registration) -> Result<bool, RequestError> {
        let fds = match &reg.fd {
            Some(fd) => vec![fd.try_clone().map_err(|e| RequestError::Encode(format!("dup memfd: {e}")))?],
            None => Vec::new(),
        };
        let mut request = reg.request.clone();
        request.secret = *reg.secret.lock();
        match conn.request(RequestBody::Register(request), self.timeout, fds).await? {
            ReplyBody::Registered { already, secret } => {
                *reg.secret.lock() = Some(secret);
                Ok(already)
            }
            other => Err(RequestError::Encode(format!("unexpected reply to register: {other:?}"))),
        }
    }

    /// Sends every registration on `conn` and marks it registered. Called
    /// with the round lock held.
    async fn round(&self, conn: &Arc<Connection>, again: bool) -> Result<u64, RequestError> {
        let regs: Vec<Arc<Registration>> = self.all.lock().values().cloned().collect();
        for reg in &regs {
            self.send(conn, reg).await?;
        }
        if again && !regs.is_empty() {
            self.rounds_again.fetch_add(1, Ordering::Relaxed);
            tracing::info!(instances = regs.len(), epoch = conn.epoch().0, "registered again");
        }
        let mut st = self.state.lock();
        st.on = Arc::downgrade(conn);
        st.generation += 1;
        Ok(st.generation)
    }

    /// Makes sure every registration is registered on `conn`; returns the
    /// generation to quote if a request on it later gets `NotRegistered`.
    pub async fn ensure(&self, conn: &Arc<Connection>) -> Result<u64, RequestError> {
        if let Some(g) = self.registered_on(conn) {
            return Ok(g);
        }
        let _round = self.round.lock().await;
        if let Some(g) = self.registered_on(conn) {
            return Ok(g);
        }
        let had_connection = self.state.lock().generation > 0;
        self.round(conn, had_connection).await
    }

    /// A request sent under `generation` got `NotRegistered`: register
    /// everything again, unless another request already did since.
    pub async fn after_not_registered(&self, conn: &Arc<Connection>, generation: u64) -> Result<u64, RequestError> {
        let _round = self.round.lock().await;
        let current = self.state.lock().generation;
        if current != generation && self.registered_on(conn).is_some() {
            return Ok(current);
        }
        self.round(conn, true).await
    }

    /// Adds (or replaces) a registration and registers it on `conn`.
    pub async fn add(&self, conn: &Arc<Connection>, reg: Registration) -> Result<bool, RequestError> {
        let key = reg.request.instance;
        let reg = Arc::new(reg);
        let _round = self.round.lock().await;
        self.all.lock().insert(key, reg.clone());
        if self.registered_on(conn).is_none() {
            // Bring the others along too, so the connection is fully registered.
            let had_connection = self.state.lock().generation > 0;
            return match self.round(conn, had_connection).await {
                Ok(_) => Ok(false),
                Err(e) => {
                    self.forget_if_refused(key, &e);
                    Err(e)
                }
            };
        }
        let r = self.send(conn, &reg).await;
        if let Err(e) = &r {
            self.forget_if_refused(key, e);
        }
        r
    }

    fn forget_if_refused(&self, key: InstanceKey, e: &RequestError) {
        if !e.is_retriable() {
            self.all.lock().remove(&key);
        }
    }

    pub fn remove(&self, key: &InstanceKey) -> bool {
        self.all.lock().remove(key).is_some()
    }
}

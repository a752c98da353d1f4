//! `kvcoord._kvcoord`: the Python binding. Thin by rule: it converts Python
//! values to Rust ones and back, releases the GIL around every call that
//! waits, and maps errors to exceptions. Every rule (endpoint syntax, the
//! tensor layout checks, shared regions, reconnect and re-registration)
//! lives in the Rust crates it calls: `kvcoord-client` (`BlockingClient`,
//! `Pending`, `tensors`), `kvcoord-memory` (`shared`) and `kvcoord::cli`.

use std::sync::Arc;
use std::time::Duration;

use kvcoord_client::tensors::{kv_cache, KvCacheMemory, TensorDesc};
use kvcoord_client::{parse_endpoint, BlockingClient, ClientConfig, Pending, PendingError};
use kvcoord_memory::{KvLayout, RegionRegistry, SharedRegion};
use kvcoord_transport::{
    chunk_hashes as rust_chunk_hashes, ChunkHash, ErrorKind, InstanceKey, LeaseId, RegisterKvCache, RequestError,
    RetrieveOutcome, StoreOutcome, WireError,
};
use parking_lot::Mutex;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyTuple};

pyo3::create_exception!(
    kvcoord,
    Error,
    PyException,
    "Base of every kvcoord error; `.retriable` says whether trying again later can succeed."
);
pyo3::create_exception!(kvcoord, NotRegistered, Error, "The instance is not registered with the coordinator.");
pyo3::create_exception!(
    kvcoord,
    LayoutMismatch,
    Error,
    "The KV cache does not match its layout (or an earlier registration)."
);
pyo3::create_exception!(kvcoord, InvalidArgument, Error, "A malformed call: bad endpoint, tensor, block id, ...");
pyo3::create_exception!(kvcoord, OutOfMemory, Error, "The coordinator's memory is full.");
pyo3::create_exception!(kvcoord, Unavailable, Error, "The coordinator cannot be reached right now.");
pyo3::create_exception!(kvcoord, Timeout, Error, "The request's deadline passed.");
pyo3::create_exception!(
    kvcoord,
    PermissionDenied,
    Error,
    "The coordinator refused the connection or request: a missing or wrong token, a uid it does not \
     allow (the wire's Unauthorized), or an instance, lease or privileged operation that is not this \
     client's (PermissionDenied); also a coordinator whose uid this client does not trust with its memory."
);
pyo3::create_exception!(kvcoord, ProtocolMismatch, Error, "Client and coordinator speak different protocol versions.");
pyo3::create_exception!(kvcoord, ShuttingDown, Error, "The coordinator (or this client) is shutting down or closed.");
pyo3::create_exception!(kvcoord, Internal, Error, "A bug or internal failure in the coordinator.");

/// The shared regions (`kvcoord.shared_tensor`) of this process.
static REGIONS: RegionRegistry = RegionRegistry::new();

/// How long one GIL-free wait lasts before signals (Ctrl-C) are checked.
const WAIT_SLICE: Duration = Duration::from_millis(50);

fn wire_err(e: &WireError) -> PyErr {
    let msg = e.message.clone();
    let err = match e.kind {
        ErrorKind::NotRegistered => NotRegistered::new_err(msg),
        ErrorKind::LayoutMismatch => LayoutMismatch::new_err(msg),
        ErrorKind::InvalidArgument => InvalidArgument::new_err(msg),
        ErrorKind::OutOfMemory => OutOfMemory::new_err(msg),
        ErrorKind::Unavailable => Unavailable::new_err(msg),
        ErrorKind::Timeout => Timeout::new_err(msg),
        ErrorKind::Unauthorized => PermissionDenied::new_err(msg),
        ErrorKind::ProtocolMismatch => ProtocolMismatch::new_err(msg),
        ErrorKind::ShuttingDown => ShuttingDown::new_err(msg),
        ErrorKind::Internal => Internal::new_err(msg),
        ErrorKind::PermissionDenied => PermissionDenied::new_err(msg),
    };
    Python::attach(|py| {
        let v = err.value(py);
        let _ = v.setattr("retriable", e.kind.is_retriable());
        let _ = v.setattr("kind", e.kind.name());
    });
    err
}

fn request_err(e: &RequestError) -> PyErr {
    match e {
        RequestError::Server(w) => wire_err(w),
        other => wire_err(&WireError::new(other.kind(), other.to_string())),
    }
}

fn invalid(msg: impl Into<String>) -> PyErr {
    wire_err(&WireError::new(ErrorKind::InvalidArgument, msg))
}

fn seconds(what: &str, s: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(s)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| invalid(format!("{what} must be a positive number of seconds, got {s}")))
}

fn hashes_from(hashes: Vec<Vec<u8>>) -> PyResult<Vec<ChunkHash>> {
    hashes
        .into_iter()
        .enumerate()
        .map(|(i, h)| {
            <[u8; 32]>::try_from(h.as_slice())
                .map(ChunkHash)
                .map_err(|_| invalid(format!("hashes[{i}] has {} bytes; a chunk hash has 32", h.len())))
        })
        .collect()
}

/// A reply to poll: `Pending` plus the value once taken, so `wait` can be
/// called before `result`.
struct Reply<T> {
    pending: Pending<T>,
    got: Mutex<Option<T>>,
}

impl<T: Clone + Send> Reply<T> {
    fn new(pending: Pending<T>) -> Self {
        Reply { pending, got: Mutex::new(None) }
    }

    fn done(&self) -> bool {
        self.got.lock().is_some() || self.pending.is_ready()
    }

    /// Waits (GIL released, Ctrl-C checked between slices) at most `timeout`
    /// (forever with `None`: every request has a deadline, so it ends).
    fn wait(&self, py: Python<'_>, timeout: Option<Duration>) -> PyResult<Option<T>> {
        let start = std::time::Instant::now();
        loop {
            if let Some(v) = self.got.lock().clone() {
                return Ok(Some(v));
            }
            let slice = match timeout {
                Some(t) => match t.checked_sub(start.elapsed()) {
                    Some(left) => left.min(WAIT_SLICE),
                    None => return Ok(None),
                },
                None => WAIT_SLICE,
            };
            match py.detach(|| self.pending.wait(Some(slice))) {
                Ok(v) => *self.got.lock() = Some(v),
                Err(PendingError::NotYet) => py.check_signals()?,
                Err(PendingError::Taken) => {}
                Err(PendingError::Abandoned) => {
                    return Err(wire_err(&WireError::new(
                        ErrorKind::ShuttingDown,
                        "the client closed before the reply came",
                    )))
                }
            }
        }
    }

    fn result(&self, py: Python<'_>) -> PyResult<T> {
        Ok(self.wait(py, None)?.expect("waiting without a timeout ends with a value"))
    }
}

fn opt_seconds(timeout: Option<f64>) -> PyResult<Option<Duration>> {
    timeout
        .map(|s| Duration::try_from_secs_f64(s.max(0.0)).map_err(|_| invalid(format!("bad timeout {s}"))))
        .transpose()
}

type Outcomes = Result<Vec<&'static str>, RequestError>;

/// A store or retrieve in flight: `done()`, `wait(timeout=None)`, `result()`.
#[pyclass(module = "kvcoord", frozen)]
struct Transfer {
    reply: Reply<Outcomes>,
}

#[pymethods]
impl Transfer {
    /// True once the reply is here (never blocks).
    fn done(&self) -> bool {
        self.reply.done()
    }

    /// Waits at most `timeout` seconds (forever with None); True if done.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        Ok(self.reply.wait(py, opt_seconds(timeout)?)?.is_some())
    }

    /// Per-chunk outcomes ("stored", "already_present", "skipped_no_memory";
    /// "retrieved", "missing"), waiting if needed; raises the typed error.
    fn result(&self, py: Python<'_>) -> PyResult<Vec<&'static str>> {
        self.reply.result(py)?.map_err(|e| request_err(&e))
    }

    fn __repr__(&self) -> String {
        format!("<kvcoord.Transfer done={}>", self.reply.done())
    }
}

type LookupOut = Result<(u32, Option<u128>), RequestError>;

/// A lookup in flight (`Client.lookup_async`): `done()`, `wait()`, `result()`.
#[pyclass(module = "kvcoord", frozen)]
struct Lookup {
    reply: Reply<LookupOut>,
}

#[pymethods]
impl Lookup {
    fn done(&self) -> bool {
        self.reply.done()
    }

    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        Ok(self.reply.wait(py, opt_seconds(timeout)?)?.is_some())
    }

    /// `(hit_chunks, lease)`, waiting if needed; raises the typed error.
    fn result(&self, py: Python<'_>) -> PyResult<(u32, Option<u128>)> {
        self.reply.result(py)?.map_err(|e| request_err(&e))
    }

    fn __repr__(&self) -> String {
        format!("<kvcoord.Lookup done={}>", self.reply.done())
    }
}

fn store_name(o: &StoreOutcome) -> &'static str {
    match o {
        StoreOutcome::Stored => "stored",
        StoreOutcome::AlreadyPresent => "already_present",
        StoreOutcome::SkippedNoMemory => "skipped_no_memory",
    }
}

fn retrieve_name(o: &RetrieveOutcome) -> &'static str {
    match o {
        RetrieveOutcome::Retrieved => "retrieved",
        RetrieveOutcome::Missing => "missing",
    }
}

/// The client: one per process (a TP worker, or a scheduler that only looks up).
#[pyclass(module = "kvcoord", frozen)]
struct Client {
    inner: Arc<BlockingClient>,
    endpoint: String,
}

fn describe<'py>(i: usize, t: &Bound<'py, PyAny>) -> PyResult<TensorDesc> {
    let fact = |what: &str, r: PyResult<Bound<'py, PyAny>>| {
        r.map_err(|e| invalid(format!("kv_caches[{i}] is not a torch tensor ({what}: {e})")))
    };
    let device: String = fact("device", t.getattr("device").and_then(|d| d.getattr("type")))?.extract()?;
    let dtype = fact("dtype", t.getattr("dtype"))?.str()?.to_string();
    let shape: Vec<i64> = fact("shape", t.getattr("shape"))?.extract()?;
    let strides: Vec<i64> = fact("stride", t.call_method0("stride"))?.extract()?;
    let data_ptr: u64 = fact("data_ptr", t.call_method0("data_ptr"))?.extract()?;
    Ok(TensorDesc { device, dtype, shape, strides, data_ptr })
}

/// The IPC handle bytes of a ready event: bytes as they are, or an object
/// with `ipc_handle()` (`torch.cuda.Event(interprocess=True)`).
fn event_handle(e: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    if let Ok(b) = e.cast::<PyBytes>() {
        return Ok(b.as_bytes().to_vec());
    }
    let handle = e.call_method0("ipc_handle").map_err(|err| {
        invalid(format!("an event must be a torch.cuda.Event(interprocess=True) or its ipc_handle() bytes ({err})"))
    })?;
    handle.extract::<Vec<u8>>().or_else(|_| Ok(handle.cast::<PyBytes>()?.as_bytes().to_vec()))
}

#[pymethods]
impl Client {
    /// Connects to the coordinator at `endpoint` (`unix:///path` or
    /// `tcp://host:port`), presenting `token` (a tenant's or the admin's;
    /// required over TCP), over TLS trusting the CA certificates of the PEM
    /// file `tls_ca` (TCP only), waiting at most `timeout` seconds, which is
    /// also every request's deadline. Raises `PermissionDenied` if the
    /// coordinator refuses the credentials, `Unavailable` if it cannot connect.
    #[new]
    #[pyo3(signature = (endpoint, *, token=None, timeout=10.0, tls_ca=None))]
    fn new(
        py: Python<'_>,
        endpoint: &str,
        token: Option<String>,
        timeout: f64,
        tls_ca: Option<std::path::PathBuf>,
    ) -> PyResult<Self> {
        let timeout = seconds("timeout", timeout)?;
        let mut cfg = ClientConfig::new(parse_endpoint(endpoint).map_err(|e| wire_err(&e))?);
        cfg.request_timeout = timeout;
        cfg.register_timeout = timeout;
        cfg.token = token;
        if let Some(ca) = tls_ca {
            cfg = cfg.with_tls_ca(&ca).map_err(|e| wire_err(&e))?;
        }
        let inner = BlockingClient::start(cfg, 1).map_err(|e| invalid(format!("cannot start the client: {e}")))?;
        if let Err(e) = py.detach(|| inner.wait_connected(timeout)) {
            if let RequestError::Server(refusal) = &e {
                inner.close();
                return Err(wire_err(refusal));
            }
            let why = inner.client().link().borrow().last_error.clone().unwrap_or_else(|| e.to_string());
            inner.close();
            return Err(wire_err(&WireError::new(
                ErrorKind::Unavailable,
                format!("cannot reach the coordinator at {endpoint} within {timeout:?}: {why}"),
            )));
        }
        Ok(Client { inner: Arc::new(inner), endpoint: endpoint.to_string() })
    }

    /// Registers one TP rank's KV cache: `kv_caches` is a dict name -> tensor
    /// (in layer order) or a list of per-layer tensors, each a view of one
    /// `kvcoord.shared_tensor` (anywhere in it) or, on a coordinator running
    /// the CUDA backend, of one CUDA tensor (from PyTorch's caching
    /// allocator; exported by CUDA IPC, so not from expandable segments or
    /// vLLM's cumem allocator: `InvalidArgument`), the layers at one stride:
    /// vLLM's `[num_blocks, kv_heads, block_tokens, 2 * head_size]` views in
    /// any of its KV-cache layouts (the strides tell which), MLA's
    /// `[num_blocks, block_tokens, latent]`, or `[2, num_blocks,
    /// block_tokens, kv_heads, head_dim]`. A layout the shared tensor cannot
    /// hold, or one that overlaps itself, raises `InvalidArgument`.
    #[pyo3(signature = (*, engine, rank, world_size, model, kv_caches, block_tokens))]
    #[allow(clippy::too_many_arguments)]
    fn register(
        &self,
        py: Python<'_>,
        engine: u64,
        rank: u32,
        world_size: u32,
        model: String,
        kv_caches: &Bound<'_, PyAny>,
        block_tokens: u32,
    ) -> PyResult<Instance> {
        let tensors: Vec<Bound<'_, PyAny>> = match kv_caches.cast::<PyDict>() {
            Ok(d) => d.values().iter().collect(),
            Err(_) => kv_caches
                .try_iter()
                .map_err(|_| invalid("kv_caches must be a dict of tensors or a list of tensors"))?
                .collect::<PyResult<_>>()?,
        };
        let descs = tensors.iter().enumerate().map(|(i, t)| describe(i, t)).collect::<PyResult<Vec<_>>>()?;
        let (layout, memory) = kv_cache(&descs, block_tokens, &REGIONS).map_err(|e| wire_err(&e))?;
        let key = InstanceKey { engine, rank };
        let request = RegisterKvCache {
            instance: key,
            model: model.clone(),
            world_size,
            layout,
            memory: memory.handle(),
            secret: None,
        };
        let inner = self.inner.clone();
        let region = match &memory {
            KvCacheMemory::Host(r) => Some(r.clone()),
            KvCacheMemory::Cuda(_) => None,
        };
        let fd_region = region.clone();
        py.detach(move || inner.register(request, fd_region.as_ref().map(|r| r.fd()))).map_err(|e| request_err(&e))?;
        Ok(Instance { client: self.inner.clone(), key, model, world_size, layout, _region: region })
    }

    /// `(hit_chunks, lease)`: leading chunks of `hashes` held for every rank
    /// of `world_size` ranks of `model`; needs no registration. With `lease`,
    /// they stay until each rank's retrieve (given the lease) or its expiry.
    #[pyo3(signature = (model, world_size, hashes, lease=true))]
    fn lookup(
        &self,
        py: Python<'_>,
        model: String,
        world_size: u32,
        hashes: Vec<Vec<u8>>,
        lease: bool,
    ) -> PyResult<(u32, Option<u128>)> {
        let pending = self.lookup_async(model, world_size, hashes, lease)?;
        pending.result(py)
    }

    /// `lookup` without waiting: a `Lookup` to poll with `done()` / `result()`.
    #[pyo3(signature = (model, world_size, hashes, lease=true))]
    fn lookup_async(&self, model: String, world_size: u32, hashes: Vec<Vec<u8>>, lease: bool) -> PyResult<Lookup> {
        let chunks = hashes_from(hashes)?;
        let pending = self.inner.spawn(move |c| async move {
            let r = c.lookup_model(&model, world_size, chunks, lease).await;
            match r.error {
                Some(e) => Err(e),
                None => Ok((r.chunks, r.lease.map(|l| l.0))),
            }
        });
        Ok(Lookup { reply: Reply::new(pending) })
    }

    /// Releases a lease that will not be retrieved with.
    fn release_lease(&self, py: Python<'_>, lease: u128) -> PyResult<()> {
        py.detach(|| self.inner.release_lease(LeaseId(lease))).map_err(|e| request_err(&e))
    }

    /// Pings the coordinator; its epoch.
    fn ping(&self, py: Python<'_>) -> PyResult<u64> {
        py.detach(|| self.inner.ping()).map(|e| e.0).map_err(|e| request_err(&e))
    }

    /// The current server epoch (changes when the coordinator restarts), or None.
    #[getter]
    fn epoch(&self) -> Option<u64> {
        self.inner.client().link().borrow().epoch.map(|e| e.0)
    }

    /// Rounds of registering everything again (after a coordinator restart).
    #[getter]
    fn reregistrations(&self) -> u64 {
        self.inner.reregistrations()
    }

    /// Tokens per chunk of the connected coordinator (for `chunk_hashes`), or None.
    #[getter]
    fn chunk_tokens(&self) -> Option<u32> {
        self.inner.client().link().borrow().connection.as_ref().map(|c| c.welcome().chunk_tokens)
    }

    #[getter]
    fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// Closes the connection; later calls raise `ShuttingDown`.
    fn close(&self) {
        self.inner.close();
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, _args: &Bound<'_, PyTuple>) -> bool {
        self.inner.close();
        false
    }

    fn __repr__(&self) -> String {
        format!("<kvcoord.Client {} epoch={:?}>", self.endpoint, self.epoch().map(|e| format!("{e:016x}")))
    }
}

/// One registered TP rank: store and retrieve its blocks.
#[pyclass(module = "kvcoord", frozen)]
struct Instance {
    client: Arc<BlockingClient>,
    key: InstanceKey,
    model: String,
    world_size: u32,
    layout: KvLayout,
    /// Keeps the memfd open for registering again after a restart (CPU
    /// tensors; CUDA memory stays the engine's, exported by IPC).
    _region: Option<Arc<SharedRegion>>,
}

#[pymethods]
impl Instance {
    /// Stores the chunks `hashes` from `block_ids` (blocks_per_chunk ids per
    /// chunk, in order). Returns a `Transfer` at once. For a CUDA KV cache,
    /// `ready_event` is a `torch.cuda.Event(interprocess=True)` the engine
    /// recorded after writing the blocks (or its `ipc_handle()` bytes): the
    /// coordinator's copy waits for it. Without one, the blocks must already
    /// be written (e.g. `torch.cuda.synchronize()`).
    #[pyo3(signature = (hashes, block_ids, ready_event=None))]
    fn store(
        &self,
        hashes: Vec<Vec<u8>>,
        block_ids: Vec<u32>,
        ready_event: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Transfer> {
        let ready_event = ready_event.map(event_handle).transpose()?;
        let (key, chunks) = (self.key, hashes_from(hashes)?);
        let pending = self.client.spawn(move |c| async move {
            let r = c.store_after(key, chunks, block_ids, ready_event).await;
            r.map(|o| o.iter().map(store_name).collect())
        });
        Ok(Transfer { reply: Reply::new(pending) })
    }

    /// Retrieves the chunks `hashes` into `block_ids` (with a lookup's
    /// `lease`). Returns a `Transfer` at once. For a CUDA KV cache,
    /// `done_event` (a `torch.cuda.Event(interprocess=True)`, or its
    /// `ipc_handle()` bytes) makes the transfer end once the copy is queued,
    /// with the event recorded after the copy: make the engine's stream wait
    /// on it (`torch.cuda.current_stream().wait_event(ev)`) before reading
    /// the blocks, instead of the CPU waiting for the copy.
    #[pyo3(signature = (hashes, block_ids, lease=None, done_event=None))]
    fn retrieve(
        &self,
        hashes: Vec<Vec<u8>>,
        block_ids: Vec<u32>,
        lease: Option<u128>,
        done_event: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Transfer> {
        let done_event = done_event.map(event_handle).transpose()?;
        let (key, chunks) = (self.key, hashes_from(hashes)?);
        let pending = self.client.spawn(move |c| async move {
            let r = c.retrieve_with_done_event(key, chunks, block_ids, lease.map(LeaseId), done_event).await;
            match r.error {
                Some(e) => Err(e),
                None => Ok(r.outcomes.iter().map(retrieve_name).collect()),
            }
        });
        Ok(Transfer { reply: Reply::new(pending) })
    }

    /// Unregisters; later calls raise `NotRegistered`.
    fn unregister(&self, py: Python<'_>) -> PyResult<()> {
        py.detach(|| self.client.unregister(self.key)).map_err(|e| request_err(&e))
    }

    #[getter]
    fn engine(&self) -> u64 {
        self.key.engine
    }
    #[getter]
    fn rank(&self) -> u32 {
        self.key.rank
    }
    #[getter]
    fn world_size(&self) -> u32 {
        self.world_size
    }
    #[getter]
    fn model(&self) -> &str {
        &self.model
    }
    #[getter]
    fn num_layers(&self) -> u32 {
        self.layout.num_layers
    }
    #[getter]
    fn num_blocks(&self) -> u32 {
        self.layout.num_blocks
    }
    #[getter]
    fn block_tokens(&self) -> u32 {
        self.layout.block_tokens
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    /// Leaving a `with` block unregisters (errors are not raised there).
    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, PyTuple>) -> bool {
        let _ = py.detach(|| self.client.unregister(self.key));
        false
    }

    fn __repr__(&self) -> String {
        format!(
            "<kvcoord.Instance engine={} rank={}/{} model={:?} layers={} blocks={}>",
            self.key.engine, self.key.rank, self.world_size, self.model, self.layout.num_layers, self.layout.num_blocks
        )
    }
}

/// The 32-byte keys of the whole chunks of `token_ids`, `chunk_tokens`
/// tokens each (the same chain hash as the Rust `chunk_hashes`).
#[pyfunction]
#[pyo3(signature = (token_ids, chunk_tokens, salt=b"".to_vec()))]
fn chunk_hashes(
    py: Python<'_>,
    token_ids: Vec<i64>,
    chunk_tokens: usize,
    salt: Vec<u8>,
) -> PyResult<Vec<Bound<'_, PyBytes>>> {
    if chunk_tokens == 0 {
        return Err(invalid("chunk_tokens must be positive"));
    }
    let tokens = token_ids
        .iter()
        .enumerate()
        .map(|(i, &t)| u32::try_from(t).map_err(|_| invalid(format!("token_ids[{i}] = {t} is not a u32 token id"))))
        .collect::<PyResult<Vec<u32>>>()?;
    let hashes = py.detach(|| rust_chunk_hashes(&tokens, chunk_tokens, &salt));
    Ok(hashes.iter().map(|h| PyBytes::new(py, &h.0)).collect())
}

/// Creates a sealed memfd of `nbytes`: `(region_id, fd)`. The fd stays owned
/// here (map it, e.g. with `mmap`, which duplicates it; never close it).
#[pyfunction]
fn _create_shared_region(nbytes: u64) -> PyResult<(u64, i32)> {
    use std::os::fd::AsRawFd;
    let region = SharedRegion::create("kvcoord-shared-tensor", nbytes).map_err(|e| invalid(e.to_string()))?;
    let (id, region) = REGIONS.insert(region);
    Ok((id, region.fd().as_raw_fd()))
}

/// Records where region `region_id` is mapped in this process.
#[pyfunction]
fn _bind_shared_region(region_id: u64, base: u64) -> PyResult<()> {
    REGIONS.bind(region_id, base).map_err(|e| invalid(e.to_string()))
}

/// Forgets region `region_id` (its mapping is gone). False if unknown.
#[pyfunction]
fn _release_shared_region(region_id: u64) -> bool {
    REGIONS.release(region_id)
}

/// Shared regions alive in this process (for tests).
#[pyfunction]
fn _shared_region_count() -> usize {
    REGIONS.len()
}

/// The endpoint `kvcoord serve` listens on without `--socket`:
/// `unix://$XDG_RUNTIME_DIR/kvcoord/kvcoord.sock`, else
/// `unix:///run/kvcoord/kvcoord.sock` (read from this process's environment).
#[pyfunction]
fn default_endpoint() -> String {
    format!("unix://{}", kvcoord::config::default_socket_path().display())
}

/// Runs the `kvcoord` command line (`argv[0]` is the program name); its exit code.
#[pyfunction]
fn _cli_main(py: Python<'_>, argv: Vec<String>) -> i32 {
    py.detach(|| kvcoord::cli::run(argv))
}

#[pymodule]
fn _kvcoord(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    m.add("Error", py.get_type::<Error>())?;
    let kinds: [(Bound<'_, pyo3::types::PyType>, ErrorKind); 10] = [
        (py.get_type::<NotRegistered>(), ErrorKind::NotRegistered),
        (py.get_type::<LayoutMismatch>(), ErrorKind::LayoutMismatch),
        (py.get_type::<InvalidArgument>(), ErrorKind::InvalidArgument),
        (py.get_type::<OutOfMemory>(), ErrorKind::OutOfMemory),
        (py.get_type::<Unavailable>(), ErrorKind::Unavailable),
        (py.get_type::<Timeout>(), ErrorKind::Timeout),
        (py.get_type::<PermissionDenied>(), ErrorKind::Unauthorized),
        (py.get_type::<ProtocolMismatch>(), ErrorKind::ProtocolMismatch),
        (py.get_type::<ShuttingDown>(), ErrorKind::ShuttingDown),
        (py.get_type::<Internal>(), ErrorKind::Internal),
    ];
    for (ty, kind) in kinds {
        ty.setattr("retriable", kind.is_retriable())?;
        ty.setattr("kind", kind.name())?;
        m.add(ty.name()?, ty)?;
    }
    m.add_class::<Client>()?;
    m.add_class::<Instance>()?;
    m.add_class::<Transfer>()?;
    m.add_class::<Lookup>()?;
    m.add_function(wrap_pyfunction!(chunk_hashes, m)?)?;
    m.add_function(wrap_pyfunction!(_create_shared_region, m)?)?;
    m.add_function(wrap_pyfunction!(_bind_shared_region, m)?)?;
    m.add_function(wrap_pyfunction!(_release_shared_region, m)?)?;
    m.add_function(wrap_pyfunction!(_shared_region_count, m)?)?;
    m.add_function(wrap_pyfunction!(default_endpoint, m)?)?;
    m.add_function(wrap_pyfunction!(_cli_main, m)?)?;
    Ok(())
}

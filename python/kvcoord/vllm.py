"""vLLM connector: vLLM 0.33 engines reuse prefixes held by a kvcoord coordinator.

Load it with::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KvcoordConnector",
        "kv_connector_module_path": "kvcoord.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"endpoint": "unix:///run/kvcoord/kvcoord.sock"}}'

or by name only (``"kv_connector": "KvcoordConnector"``): installing kvcoord
registers it through the ``vllm.general_plugins`` entry point, which is also
how MultiConnector finds it.

What it does, per role (vLLM builds one connector per process):

- **Scheduler** (one process, no KV memory): looks up the prompt's whole
  chunks (``chunk_hashes`` of the prompt, salted with ``request.cache_salt``)
  without blocking: ``get_num_new_matched_tokens`` returns ``None`` while the
  answer is on its way and the scheduler asks again next step. A hit is
  chunk-aligned; on a hit of the whole prompt one token is left to compute.
  It plans each request's loads (hit chunks not already computed locally)
  and stores (prompt chunks the coordinator lacks, once computed) into the
  step's metadata, holds a request's blocks after it finishes until every
  worker has reported its stores done, and releases lookup leases when a
  request finishes or is preempted.
- **Worker** (one per TP rank): registers the rank's KV tensors, retrieves a
  step's loads in ``start_load_kv`` and waits for them there (bounded by
  ``timeout_s``; on CUDA only until each copy is queued: the forward's
  stream waits on a "copy done" event the coordinator records), starts a step's stores in ``wait_for_save`` without
  waiting, and reports finished stores in ``get_finished``. The coordinator
  stores whole chunks across all layers, so ``wait_for_layer_load`` and
  ``save_kv_layer`` do nothing. A load that fails, misses or runs late is
  reported by ``get_block_ids_with_load_errors`` so vLLM recomputes those
  blocks (set ``kv_load_failure_policy: recompute``; vLLM's default "fail"
  fails the request instead).

When the coordinator restarts: stores in flight fail at once and are
dropped (counted in the stats); loads come back as load errors; no step
waits longer than its deadline; the client core re-registers each worker
exactly once when it sees the new epoch, and serving goes on. While the
coordinator is unreachable lookups are misses, and the connector reconnects
by itself.

Only the logic of vLLM's interface lives here; every rule about tensors,
hashing, deadlines and re-registration is the Rust client's.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    SupportsHMA,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
from vllm.logger import init_logger

import kvcoord

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.attention.backend import AttentionMetadata
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.outputs import KVConnectorOutput
    from vllm.v1.request import Request

logger = init_logger(__name__)

CONNECTOR_NAME = "KvcoordConnector"

# Every key kv_connector_extra_config may hold, with its default.
EXTRA_CONFIG_DEFAULTS: dict[str, Any] = {
    "endpoint": None,  # kvcoord.default_endpoint() when unset
    "token": None,
    "timeout_s": 5.0,  # every request's deadline: bounds each step's wait for its loads
    "model": None,  # the cache's namespace; derived from the vLLM config when unset
    "chunk_tokens": 256,  # used until the coordinator says its own (kvcoord serve --chunk-tokens)
    "lookup_wait_ms": 1.0,  # how long a lookup may wait before returning None
    "reconnect_s": 2.0,  # how often an unreachable coordinator is tried again
    "load": True,
    "store": True,
}


def register() -> None:
    """The ``vllm.general_plugins`` entry point: registers the connector under
    the name ``KvcoordConnector`` in vLLM's connector factory."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR_NAME not in KVConnectorFactory._registry:
        KVConnectorFactory.register_connector(CONNECTOR_NAME, __name__, KvcoordConnector.__name__)


@dataclass(frozen=True)
class ConnectorSettings:
    """``kv_connector_extra_config`` checked once, plus what every process of
    one engine derives the same way from the vLLM config."""

    endpoint: str
    token: str | None
    timeout_s: float
    model: str
    chunk_tokens: int
    lookup_wait_s: float
    reconnect_s: float
    load: bool
    store: bool
    block_size: int
    world_size: int

    @classmethod
    def from_vllm_config(cls, vllm_config: "VllmConfig") -> "ConnectorSettings":
        extra = dict(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
        unknown = sorted(set(extra) - set(EXTRA_CONFIG_DEFAULTS))
        if unknown:
            raise ValueError(
                f"kvcoord: unknown kv_connector_extra_config keys {unknown}; "
                f"known: {sorted(EXTRA_CONFIG_DEFAULTS)}"
            )
        cfg = {**EXTRA_CONFIG_DEFAULTS, **extra}
        timeout_s = float(cfg["timeout_s"])
        if not 0 < timeout_s <= 3600:
            raise ValueError(f"kvcoord: timeout_s must be in (0, 3600], not {timeout_s}")
        cache = vllm_config.cache_config
        parallel = vllm_config.parallel_config
        if int(cfg["chunk_tokens"]) <= 0 or int(cfg["chunk_tokens"]) % cache.block_size:
            raise ValueError(
                f"kvcoord: chunk_tokens {cfg['chunk_tokens']} must be a positive multiple of "
                f"vLLM's block size {cache.block_size}"
            )
        return cls(
            endpoint=str(cfg["endpoint"] or kvcoord.default_endpoint()),
            token=cfg["token"],
            timeout_s=timeout_s,
            model=str(cfg["model"] or cache_namespace(vllm_config)),
            chunk_tokens=int(cfg["chunk_tokens"]),
            lookup_wait_s=max(0.0, float(cfg["lookup_wait_ms"])) / 1000.0,
            reconnect_s=max(0.05, float(cfg["reconnect_s"])),
            load=bool(cfg["load"]),
            store=bool(cfg["store"]),
            block_size=int(cache.block_size),
            world_size=int(parallel.tensor_parallel_size) * int(parallel.pipeline_parallel_size),
        )


def cache_namespace(vllm_config: "VllmConfig") -> str:
    """The coordinator's model name for this engine: the model, the KV cache
    dtype, the KV-cache layout and the block size, so that engines whose
    blocks hold different bytes never share chunks."""
    model = vllm_config.model_config
    cache = vllm_config.cache_config
    dtype = cache.cache_dtype if cache.cache_dtype != "auto" else str(model.dtype).removeprefix("torch.")
    layout = getattr(cache, "kv_cache_layout", None) or "default"
    return f"{model.model}|kv={dtype}|layout={layout}|block={cache.block_size}"


def engine_number(vllm_config: "VllmConfig") -> int:
    """A 64-bit engine id from vLLM's engine id string (random per engine)."""
    engine_id = str(vllm_config.kv_transfer_config.engine_id or id(vllm_config))
    return int.from_bytes(hashlib.blake2b(engine_id.encode(), digest_size=8).digest(), "little")


def worker_rank(vllm_config: "VllmConfig") -> int:
    """This worker's rank among the engine's TP x PP workers."""
    try:
        from vllm.distributed.parallel_state import get_pp_group, get_tp_group

        tp = get_tp_group()
        return get_pp_group().rank_in_group * tp.world_size + tp.rank_in_group
    except (AssertionError, AttributeError, RuntimeError):
        # Model parallelism not initialised (a single-process engine).
        return int(vllm_config.parallel_config.rank)


class CoordinatorLink:
    """A `kvcoord.Client` that may not exist yet: created on first use and
    tried again at most every `reconnect_s` while the coordinator is
    unreachable, so an engine starts (and serves, without the cache) when the
    coordinator is down. Once created, the client reconnects by itself."""

    def __init__(self, settings: ConnectorSettings) -> None:
        self._settings = settings
        self._client: kvcoord.Client | None = None
        self._next_try = 0.0

    def get(self) -> kvcoord.Client | None:
        if self._client is not None:
            return self._client
        now = time.monotonic()
        if now < self._next_try:
            return None
        self._next_try = now + self._settings.reconnect_s
        try:
            self._client = kvcoord.Client(
                self._settings.endpoint, token=self._settings.token, timeout=self._settings.timeout_s
            )
            logger.info("kvcoord: connected to %s", self._settings.endpoint)
        except kvcoord.Error as e:
            logger.warning("kvcoord: coordinator unreachable (%s); serving without it", e)
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


# ---------------------------------------------------------------- metadata


@dataclass
class ChunkLoad:
    """Retrieve `hashes` into `block_ids` (blocks_per_chunk per chunk).
    `new_block_ids` are the blocks vLLM has not computed itself: the ones
    reported as load errors if this load fails."""

    req_id: str
    hashes: list[bytes]
    block_ids: list[int]
    new_block_ids: list[int]
    lease: int | None


@dataclass
class ChunkStore:
    """Store `hashes` from `block_ids`, which this step's forward wrote."""

    req_id: str
    hashes: list[bytes]
    block_ids: list[int]


@dataclass
class KvcoordMetadata(KVConnectorMetadata):
    """What the scheduler tells every worker for one step (pickled)."""

    loads: list[ChunkLoad] = field(default_factory=list)
    stores: list[ChunkStore] = field(default_factory=list)
    preempted: set[str] = field(default_factory=set)


# ------------------------------------------------------------------ stats


STAT_KEYS = (
    "lookup_hit_tokens",
    "loaded_tokens",
    "loaded_bytes",
    "stored_chunks",
    "stored_bytes",
    "load_errors",
    "store_errors",
    "stores_dropped",
    "registrations",
)


@dataclass
class KvcoordStats(KVConnectorStats):
    """Counters since the last report, summed over workers and intervals:
    tokens and bytes loaded, chunks and bytes stored, failed loads (reported
    to vLLM for recompute), failed stores and stores dropped because the
    coordinator was unreachable."""

    def __post_init__(self) -> None:
        for k in STAT_KEYS:
            self.data.setdefault(k, 0)

    def reset(self) -> None:
        self.data = {k: 0 for k in STAT_KEYS}

    def aggregate(self, other: KVConnectorStats) -> "KvcoordStats":
        for k, v in other.data.items():
            self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())


# -------------------------------------------------------- scheduler side


@dataclass
class RequestPlan:
    """The scheduler's view of one request."""

    hashes: list[bytes]
    prompt_tokens: int
    chunk: int  # tokens per chunk the hashes were cut at
    lookup: Any = None  # kvcoord.Lookup in flight
    hit_chunks: int | None = None  # known once the lookup answered
    local_tokens: int = 0  # what vLLM's own prefix cache held at the lookup
    lease: int | None = None
    block_ids: list[int] = field(default_factory=list)
    load: ChunkLoad | None = None  # planned by update_state_after_alloc
    next_store_chunk: int = 0
    has_stores: bool = False


class SchedulerSide:
    """The scheduler role: lookups, load and store plans, leases."""

    def __init__(self, settings: ConnectorSettings) -> None:
        self.s = settings
        self.link = CoordinatorLink(settings)
        self.plans: dict[str, RequestPlan] = {}
        self.pending_loads: list[ChunkLoad] = []
        self.known_chunk = settings.chunk_tokens

    def chunk_tokens(self) -> int | None:
        """The coordinator's chunk size once it said it (remembered across
        restarts), else `chunk_tokens` from the config; None when the
        coordinator's is no multiple of vLLM's block size (no caching)."""
        client = self.link.get()
        said = client.chunk_tokens if client is not None else None
        if said is not None and said != self.known_chunk:
            self.known_chunk = int(said)
            if self.known_chunk % self.s.block_size:
                logger.error(
                    "kvcoord: the coordinator's chunk of %d tokens is no multiple of vLLM's block size %d; "
                    "caching is off until it runs with --chunk-tokens a multiple of it",
                    self.known_chunk,
                    self.s.block_size,
                )
        return None if self.known_chunk % self.s.block_size else self.known_chunk

    def matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        if request.prompt_embeds is not None or request.mm_features:
            return 0, False  # token ids do not name this prompt's KV
        chunk = self.chunk_tokens()
        if chunk is None:
            return 0, False
        plan = self.plans.get(request.request_id)
        if plan is None:
            salt = (request.cache_salt or "").encode()
            hashes = kvcoord.chunk_hashes(request.prompt_token_ids, chunk, salt)
            plan = RequestPlan(hashes=hashes, prompt_tokens=len(request.prompt_token_ids), chunk=chunk)
            self.plans[request.request_id] = plan
            if not hashes or not self.s.load:
                plan.hit_chunks = 0  # nothing to look up: store only
        if plan.hit_chunks is None:
            client = self.link.get()
            if client is None:
                plan.hit_chunks = 0
            else:
                if plan.lookup is None:
                    plan.lookup = client.lookup_async(self.s.model, self.s.world_size, plan.hashes, lease=True)
                if not plan.lookup.wait(self.s.lookup_wait_s):
                    return None, False
                try:
                    plan.hit_chunks, plan.lease = plan.lookup.result()
                except kvcoord.Error as e:
                    logger.warning("kvcoord: lookup of %s failed: %s", request.request_id, e)
                    plan.hit_chunks = 0
                plan.lookup = None
            plan.next_store_chunk = plan.hit_chunks
        plan.local_tokens = num_computed_tokens
        hit_tokens = plan.hit_chunks * plan.chunk
        if hit_tokens >= plan.prompt_tokens:
            hit_tokens = plan.prompt_tokens - 1  # vLLM must compute one token
        new = max(0, hit_tokens - num_computed_tokens)
        if new == 0:
            self.release_lease(plan)
        return new, False

    def after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        plan = self.plans.get(request.request_id)
        if plan is None:
            return
        plan.block_ids = list(blocks.get_block_ids()[0])
        if num_external_tokens <= 0 or not plan.hit_chunks:
            return
        chunk = plan.chunk
        per_chunk = chunk // self.s.block_size
        local = plan.local_tokens  # block-aligned: vLLM's prefix cache holds whole blocks
        first = local // chunk
        ids = plan.block_ids[first * per_chunk : plan.hit_chunks * per_chunk]
        first_new = local // self.s.block_size - first * per_chunk
        plan.load = ChunkLoad(
            req_id=request.request_id,
            hashes=plan.hashes[first : plan.hit_chunks],
            block_ids=ids,
            new_block_ids=ids[first_new:],
            lease=plan.lease,
        )
        self.pending_loads.append(plan.load)

    def build_meta(self, out: "SchedulerOutput") -> KvcoordMetadata:
        meta = KvcoordMetadata(loads=self.pending_loads)
        self.pending_loads = []
        for new in out.scheduled_new_reqs:
            plan = self.plans.get(new.req_id)
            if plan is not None:
                plan.block_ids = list(new.block_ids[0])
                self._plan_stores(meta, new.req_id, plan, new.num_computed_tokens, out)
        cached = out.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            plan = self.plans.get(req_id)
            if plan is None:
                continue
            new_ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                plan.block_ids = list(new_ids[0]) if new_ids else []
            elif new_ids:
                plan.block_ids.extend(new_ids[0])
            self._plan_stores(meta, req_id, plan, cached.num_computed_tokens[i], out)
        for req_id in out.preempted_req_ids or ():
            meta.preempted.add(req_id)
            plan = self.plans.get(req_id)
            if plan is not None:
                # It comes back through get_num_new_matched_tokens: look up again.
                self.release_lease(plan)
                plan.hit_chunks, plan.load, plan.block_ids = None, None, []
        return meta

    def _plan_stores(
        self,
        meta: KvcoordMetadata,
        req_id: str,
        plan: RequestPlan,
        computed_before: int,
        out: "SchedulerOutput",
    ) -> None:
        if not self.s.store or plan.hit_chunks is None:
            return
        chunk = plan.chunk
        computed = min(computed_before + out.num_scheduled_tokens.get(req_id, 0), plan.prompt_tokens)
        upto = min(computed // chunk, len(plan.hashes))
        if upto <= plan.next_store_chunk:
            return
        per_chunk = chunk // self.s.block_size
        if len(plan.block_ids) < upto * per_chunk:
            return  # not every block known yet (cannot happen with vLLM's allocation)
        first = plan.next_store_chunk
        meta.stores.append(
            ChunkStore(
                req_id=req_id,
                hashes=plan.hashes[first:upto],
                block_ids=plan.block_ids[first * per_chunk : upto * per_chunk],
            )
        )
        plan.next_store_chunk = upto
        plan.has_stores = True

    def finished(self, request: "Request") -> tuple[bool, dict[str, Any] | None]:
        plan = self.plans.pop(request.request_id, None)
        if plan is None:
            return False, None
        self.release_lease(plan)
        self.pending_loads = [l for l in self.pending_loads if l.req_id != request.request_id]
        # Blocks stay until every worker reported this request's stores done.
        return plan.has_stores, None

    def release_lease(self, plan: RequestPlan) -> None:
        lease, plan.lease = plan.lease, None
        client = self.link.get()
        if lease is None or client is None:
            return
        try:
            client.release_lease(lease)
        except kvcoord.Error as e:  # it expires by itself
            logger.debug("kvcoord: releasing lease %d: %s", lease, e)

    def close(self) -> None:
        for plan in self.plans.values():
            self.release_lease(plan)
        self.plans.clear()
        self.link.close()


# ----------------------------------------------------------- worker side


class WorkerSide:
    """The worker role: registration, loads, stores, finished reports."""

    def __init__(self, settings: ConnectorSettings, vllm_config: "VllmConfig") -> None:
        self.s = settings
        self.link = CoordinatorLink(settings)
        self.engine = engine_number(vllm_config)
        self.rank = worker_rank(vllm_config)
        self.kv_caches: dict[str, torch.Tensor] | None = None
        self.instance: kvcoord.Instance | None = None
        self.on_cuda = False
        self.block_bytes = 0
        self.stores: dict[str, list[tuple[Any, int, int]]] = {}  # req_id -> [(Transfer, chunks, blocks per chunk)]
        self.reqs_with_stores: set[str] = set()
        self.finishing: set[str] = set()
        self.load_errors: set[int] = set()
        self.done_events: list[torch.cuda.Event] = []
        self.stats = KvcoordStats()

    # registration

    def register(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self.kv_caches = kv_caches
        first = next(iter(kv_caches.values()))
        self.on_cuda = first.is_cuda
        self.block_bytes = sum(t[0].numel() * t.element_size() for t in kv_caches.values())
        self._instance()

    def _instance(self) -> kvcoord.Instance | None:
        """The registered instance, registering (again) if needed."""
        if self.instance is not None or self.kv_caches is None:
            return self.instance
        client = self.link.get()
        if client is None:
            return None
        try:
            self.instance = client.register(
                engine=self.engine,
                rank=self.rank,
                world_size=self.s.world_size,
                model=self.s.model,
                kv_caches=self.kv_caches,
                block_tokens=self.s.block_size,
            )
            self.stats.data["registrations"] += 1
            logger.info("kvcoord: registered rank %d of %d as %r", self.rank, self.s.world_size, self.s.model)
        except (kvcoord.Unavailable, kvcoord.Timeout, kvcoord.ShuttingDown) as e:
            logger.warning("kvcoord: cannot register yet (%s); serving without the cache", e)
        return self.instance

    # loads

    def start_load(self, meta: KvcoordMetadata) -> None:
        if not meta.loads:
            return
        inst = self._instance()
        if inst is None:
            for load in meta.loads:
                self._load_failed(load, "coordinator unreachable")
            return
        if self.on_cuda:
            # vLLM zeroes new blocks on its stream before the forward; the
            # coordinator writes on its own streams, so that must be done.
            torch.cuda.current_stream().synchronize()
        inflight = []
        for i, load in enumerate(meta.loads):
            done = self._done_event(i) if self.on_cuda else None
            try:
                inflight.append((load, inst.retrieve(load.hashes, load.block_ids, load.lease, done), done))
            except kvcoord.Error as e:
                self._load_failed(load, str(e))
        for load, transfer, done in inflight:
            try:
                # Ends by the request's deadline (timeout_s) with the outcomes
                # or a typed error; the coordinator never writes a block after
                # that deadline, so nothing lands in blocks vLLM recomputes.
                # With a done event (CUDA) it ends once the copy is queued.
                outcomes = transfer.result()
            except kvcoord.Error as e:
                self._load_failed(load, str(e))
                continue
            if done is not None:
                torch.cuda.current_stream().wait_event(done)  # the forward reads after the copy
            per_chunk = len(load.block_ids) // max(1, len(load.hashes))
            missing = [i for i, o in enumerate(outcomes) if o != "retrieved"]
            loaded = len(outcomes) - len(missing)
            self.stats.data["loaded_tokens"] += loaded * per_chunk * self.s.block_size
            self.stats.data["loaded_bytes"] += loaded * per_chunk * self.block_bytes
            if missing:
                # Everything from the first missing chunk on is recomputed.
                bad = set(load.block_ids[missing[0] * per_chunk :]) & set(load.new_block_ids)
                self.load_errors |= bad
                self.stats.data["load_errors"] += 1
                logger.warning("kvcoord: load of %s missed %d chunk(s)", load.req_id, len(missing))

    def _done_event(self, i: int) -> "torch.cuda.Event":
        """The i-th of this worker's "copy done" events: one per load of a
        step (each load's wait is queued before the next step re-records it)."""
        while len(self.done_events) <= i:
            self.done_events.append(torch.cuda.Event(interprocess=True))
        return self.done_events[i]

    def _load_failed(self, load: ChunkLoad, why: str) -> None:
        self.load_errors |= set(load.new_block_ids)
        self.stats.data["load_errors"] += 1
        logger.warning("kvcoord: load of %s failed (%s); vLLM recomputes it", load.req_id, why)

    def take_load_errors(self) -> set[int]:
        errors, self.load_errors = self.load_errors, set()
        return errors

    # stores

    def start_stores(self, meta: KvcoordMetadata) -> None:
        if not meta.stores:
            return
        for st in meta.stores:
            self.reqs_with_stores.add(st.req_id)
        inst = self._instance()
        if inst is None:
            self.stats.data["stores_dropped"] += sum(len(st.hashes) for st in meta.stores)
            return
        ready = None
        if self.on_cuda:
            ready = torch.cuda.Event(interprocess=True)
            ready.record()
        for st in meta.stores:
            try:
                transfer = inst.store(st.hashes, st.block_ids, ready)
            except kvcoord.Error as e:
                self.stats.data["stores_dropped"] += len(st.hashes)
                logger.warning("kvcoord: store of %s dropped: %s", st.req_id, e)
                continue
            per_chunk = len(st.block_ids) // max(1, len(st.hashes))
            self.stores.setdefault(st.req_id, []).append((transfer, len(st.hashes), per_chunk))

    def _reap(self, req_id: str, block: float | None = None) -> None:
        """Collects the finished stores of `req_id` (waiting at most `block`)."""
        left = []
        for transfer, chunks, per_chunk in self.stores.get(req_id, []):
            if block is not None:
                transfer.wait(block)
            if not transfer.done():
                left.append((transfer, chunks, per_chunk))
                continue
            try:
                stored = sum(1 for o in transfer.result() if o == "stored")
                self.stats.data["stored_chunks"] += stored
                self.stats.data["stored_bytes"] += stored * per_chunk * self.block_bytes
            except (kvcoord.Unavailable, kvcoord.ShuttingDown, kvcoord.NotRegistered) as e:
                self.stats.data["stores_dropped"] += chunks
                logger.info("kvcoord: store of %s dropped (coordinator restarting?): %s", req_id, e)
            except kvcoord.Error as e:
                self.stats.data["store_errors"] += chunks
                logger.warning("kvcoord: store of %s failed: %s", req_id, e)
        if left:
            self.stores[req_id] = left
        else:
            self.stores.pop(req_id, None)

    def preempted(self, meta: KvcoordMetadata) -> None:
        """Stores reading a preempted request's blocks end before vLLM hands
        the blocks to another request."""
        for req_id in meta.preempted:
            self._reap(req_id, block=self.s.timeout_s + 1.0)

    def finished(self, finished_req_ids: set[str]) -> set[str]:
        self.finishing |= finished_req_ids & self.reqs_with_stores
        for req_id in list(self.stores):
            self._reap(req_id)
        done = {r for r in self.finishing if r not in self.stores}
        self.finishing -= done
        self.reqs_with_stores -= done
        return done

    def take_stats(self) -> KvcoordStats | None:
        if self.stats.is_empty():
            return None
        stats, self.stats = self.stats, KvcoordStats()
        return stats

    def close(self) -> None:
        deadline = time.monotonic() + self.s.timeout_s
        for req_id in list(self.stores):
            self._reap(req_id, block=max(0.0, deadline - time.monotonic()))
        if self.instance is not None:
            try:
                self.instance.unregister()
            except kvcoord.Error:
                pass
            self.instance = None
        self.link.close()


# -------------------------------------------------------------- connector


class KvcoordConnector(KVConnectorBase_V1, SupportsHMA):
    """vLLM's KV connector for kvcoord (see this module's documentation)."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole, kv_cache_config: "KVCacheConfig") -> None:
        super().__init__(vllm_config, role, kv_cache_config)
        groups = kv_cache_config.kv_cache_groups if kv_cache_config is not None else []
        if len(groups) > 1:
            raise ValueError(
                f"kvcoord: this model has {len(groups)} KV cache groups (hybrid attention); "
                "the kvcoord connector supports models with one"
            )
        self.settings = ConnectorSettings.from_vllm_config(vllm_config)
        self.scheduler: SchedulerSide | None = None
        self.worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.scheduler = SchedulerSide(self.settings)
        else:
            self.worker = WorkerSide(self.settings, vllm_config)

    @property
    def requires_kv_delivery(self) -> bool:
        """A cache: a dropped store is a later miss, never a lost hand-off."""
        return False

    # scheduler side

    def get_num_new_matched_tokens(self, request: "Request", num_computed_tokens: int) -> tuple[int | None, bool]:
        assert self.scheduler is not None
        return self.scheduler.matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks", num_external_tokens: int) -> None:
        assert self.scheduler is not None
        self.scheduler.after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        assert self.scheduler is not None
        return self.scheduler.build_meta(scheduler_output)

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        assert self.scheduler is not None
        return self.scheduler.finished(request)

    def request_finished_all_groups(
        self, request: "Request", block_ids: tuple[list[int], ...]
    ) -> tuple[bool, dict[str, Any] | None]:
        assert self.scheduler is not None
        return self.scheduler.finished(request)

    def update_connector_output(self, connector_output: "KVConnectorOutput") -> None:
        return

    # worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        assert self.worker is not None
        self.worker.register(kv_caches)

    def handle_preemptions(self, kv_connector_metadata: KVConnectorMetadata) -> None:
        assert self.worker is not None
        if isinstance(kv_connector_metadata, KvcoordMetadata):
            self.worker.preempted(kv_connector_metadata)

    def start_load_kv(self, forward_context: "ForwardContext", **kwargs: Any) -> None:
        assert self.worker is not None
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvcoordMetadata)
        self.worker.start_load(meta)

    def wait_for_layer_load(self, layer_name: str) -> None:
        """Loads are whole chunks across all layers, done in start_load_kv."""
        return

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: "AttentionMetadata", **kwargs: Any
    ) -> None:
        """Stores are whole chunks across all layers, started in wait_for_save."""
        return

    def wait_for_save(self) -> None:
        assert self.worker is not None
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        assert isinstance(meta, KvcoordMetadata)
        self.worker.start_stores(meta)

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        assert self.worker is not None
        return self.worker.finished(finished_req_ids) or None, None

    def get_block_ids_with_load_errors(self) -> set[int]:
        assert self.worker is not None
        return self.worker.take_load_errors()

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        return self.worker.take_stats() if self.worker is not None else None

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return KvcoordStats(data=dict(data)) if data is not None else KvcoordStats()

    def shutdown(self) -> None:
        if self.worker is not None:
            self.worker.close()
        if self.scheduler is not None:
            self.scheduler.close()

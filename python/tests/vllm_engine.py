"""A vLLM engine without a model, for the connector's tests.

vLLM's real ``Scheduler`` (building the ``KvcoordConnector``'s scheduler role
itself, from a real ``VllmConfig``) runs in the test process; the connector's
worker role runs in a child process, as in vLLM, with shared-memory CPU KV
caches in vLLM's layout (per-layer views ``[num_blocks, kv_heads,
block_size, 2 * head_size]`` of one int8 buffer in the physical order
LBNHC). Each step the scheduler's ``SchedulerOutput`` (with the connector's
metadata) is pickled to the child, which runs the worker-side calls in
vLLM's order (handle_preemptions, bind, start_load_kv, forward,
wait_for_save, get_finished, load errors, stats) and answers with a
``KVConnectorOutput`` that goes into ``Scheduler.update_from_output``.

The child's "forward" writes each computed token's KV as a function of
(token id, position, layer) only, so the bytes any block must hold are known
anywhere: after ``start_load_kv`` the child checks every loaded block byte
for byte before the forward could touch it.

On a CPU-only machine ``VllmConfig`` cannot infer a device; pointing
``vllm.platforms._current_platform`` at ``CpuPlatform()`` fixes that (the
connector needs no kernels).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LAYERS, KV_HEADS, HEAD_SIZE, BLOCK_SIZE = 2, 2, 16, 16
LAYER_NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]
EOS = 31_999  # never sampled (sampled ids are < 30000)


def use_cpu_platform() -> None:
    import vllm.platforms
    from vllm.platforms.cpu import CpuPlatform

    vllm.platforms._current_platform = CpuPlatform()


def model_dir(root: Path) -> Path:
    """A local Hugging Face config of a tiny Qwen2 (no download, no weights)."""
    d = root / "tiny-qwen2"
    d.mkdir(exist_ok=True)
    cfg = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": KV_HEADS * 2 * HEAD_SIZE,
        "intermediate_size": 128,
        "num_attention_heads": KV_HEADS * 2,
        "num_key_value_heads": KV_HEADS,
        "num_hidden_layers": LAYERS,
        "vocab_size": 32000,
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "torch_dtype": "bfloat16",
        "eos_token_id": EOS,
        "tie_word_embeddings": True,
    }
    (d / "config.json").write_text(json.dumps(cfg))
    return d


@dataclass
class EngineSpec:
    """Everything both processes of one engine build their config from."""

    model: str
    endpoint: str
    engine_id: str
    num_blocks: int = 256
    max_batched_tokens: int = 512
    extra: dict[str, Any] = field(default_factory=dict)

    def vllm_config(self):
        use_cpu_platform()
        from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig, SchedulerConfig, VllmConfig

        model = ModelConfig(model=self.model, skip_tokenizer_init=True, dtype="bfloat16", seed=0, max_model_len=8192)
        sched = SchedulerConfig(
            max_num_seqs=16,
            max_num_batched_tokens=self.max_batched_tokens,
            max_model_len=8192,
            enable_chunked_prefill=True,
            is_encoder_decoder=False,
        )
        cache = CacheConfig(block_size=BLOCK_SIZE, enable_prefix_caching=True)
        cache.kv_cache_layout = "LBNHC"
        kv = KVTransferConfig(
            kv_connector="KvcoordConnector",
            kv_connector_module_path="kvcoord.vllm",
            kv_role="kv_both",
            engine_id=self.engine_id,
            kv_load_failure_policy="recompute",
            kv_connector_extra_config={"endpoint": self.endpoint, "timeout_s": 2.0, **self.extra},
        )
        return VllmConfig(
            model_config=model,
            scheduler_config=sched,
            cache_config=cache,
            kv_transfer_config=kv,
            device_config=DeviceConfig("cpu"),
        )

    def kv_cache_config(self):
        import torch
        from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec

        spec = FullAttentionSpec(block_size=BLOCK_SIZE, num_kv_heads=KV_HEADS, head_size=HEAD_SIZE, dtype=torch.bfloat16)
        return KVCacheConfig(
            num_blocks=self.num_blocks, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(LAYER_NAMES, spec)]
        )


# ------------------------------------------------------------ worker child


def kv_values(tokens, positions, layer: int):
    """The bytes token `tokens[i]` at `positions[i]` has in `layer`:
    `[n, kv_heads, 2 * head_size * 2]` int8 (bf16 K|V as bytes)."""
    import torch

    t = torch.as_tensor(tokens, dtype=torch.int64)
    p = torch.as_tensor(positions, dtype=torch.int64)
    base = t * 1_000_003 + p * 7_919 + layer * 104_729
    lanes = torch.arange(KV_HEADS * 4 * HEAD_SIZE, dtype=torch.int64)
    v = (base[:, None] * 31 + lanes[None, :] * 17) % 251 - 125
    return v.to(torch.int8).view(len(t), KV_HEADS, 4 * HEAD_SIZE)


class WorkerState:
    """The model runner's part the connector sees: requests, block tables,
    the KV cache, and a forward that writes known bytes."""

    def __init__(self, spec: EngineSpec) -> None:
        import torch

        import kvcoord
        from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

        from kvcoord.vllm import KvcoordConnector

        self.spec = spec
        self.connector = KvcoordConnector(spec.vllm_config(), KVConnectorRole.WORKER, spec.kv_cache_config())
        # One int8 buffer, physical order LBNHC, viewed per layer as vLLM's
        # logical [B, H, N, C] (bf16) the way FlashAttention's backend does.
        n = spec.num_blocks
        self.raw = kvcoord.shared_tensor((LAYERS, n, BLOCK_SIZE, KV_HEADS, 2 * HEAD_SIZE * 2), torch.int8)
        physical = self.raw.view(torch.bfloat16)  # [L, B, N, H, 2*head]
        self.layers = {name: physical[i].permute(0, 2, 1, 3) for i, name in enumerate(LAYER_NAMES)}
        self.bytes = [self.raw[i] for i in range(LAYERS)]  # [B, N, H, C bytes]
        self.connector.register_kv_caches(self.layers)
        self.tokens: dict[str, list[int]] = {}
        self.blocks: dict[str, list[int]] = {}

    def write(self, req_id: str, start: int, end: int) -> None:
        toks = self.tokens[req_id][start:end]
        pos = list(range(start, end))
        blocks = self.blocks[req_id]
        b = [blocks[p // BLOCK_SIZE] for p in pos]
        s = [p % BLOCK_SIZE for p in pos]
        for layer in range(LAYERS):
            self.bytes[layer][b, s] = kv_values(toks, pos, layer)

    def check(self, req_id: str, block_ids: list[int], first_block: int) -> tuple[int, int]:
        """(bytes checked, bytes wrong) of `block_ids`, which hold the
        request's blocks `first_block`, `first_block + 1`, ..."""
        toks = self.tokens[req_id]
        checked = wrong = 0
        for i, blk in enumerate(block_ids):
            start = (first_block + i) * BLOCK_SIZE
            pos = list(range(start, min(start + BLOCK_SIZE, len(toks))))
            for layer in range(LAYERS):
                want = kv_values([toks[p] for p in pos], pos, layer)
                got = self.bytes[layer][blk, : len(pos)]
                checked += want.numel()
                wrong += int((got != want).sum())
        return checked, wrong

    def step(self, out, token_ids: dict[str, list[int]]) -> dict[str, Any]:
        from vllm.v1.outputs import KVConnectorOutput

        t0 = time.monotonic()
        c = self.connector
        meta = out.kv_connector_metadata
        for req_id in out.finished_req_ids:
            self.tokens.pop(req_id, None)
            self.blocks.pop(req_id, None)
        for new in out.scheduled_new_reqs:
            self.blocks[new.req_id] = list(new.block_ids[0])
        cached = out.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):
            ids = cached.new_block_ids[i]
            if req_id in cached.resumed_req_ids:
                self.blocks[req_id] = list(ids[0]) if ids else []
            elif ids:
                self.blocks[req_id].extend(ids[0])
        # The tokens each request has, as the scheduler knows them (a real
        # runner keeps them itself; this one is told, so a sample vLLM
        # discarded, e.g. after a failed load, is forgotten here too).
        self.tokens.update(token_ids)
        for blk in out.new_block_ids_to_zero or ():
            for layer in range(LAYERS):
                self.bytes[layer][blk].zero_()
        c.handle_preemptions(meta)
        c.bind_connector_metadata(meta)
        c.start_load_kv(None)
        load_errors = c.get_block_ids_with_load_errors()
        checked = wrong = 0
        for load in meta.loads:
            good = [b for b in load.new_block_ids if b not in load_errors]
            if good:
                first = self.blocks[load.req_id].index(good[0])
                ok = [b for b in good if b in self.blocks[load.req_id]]
                k, w = self.check(load.req_id, ok, first)
                checked, wrong = checked + k, wrong + w
        computed = {new.req_id: new.num_computed_tokens for new in out.scheduled_new_reqs}
        computed.update(zip(cached.req_ids, cached.num_computed_tokens))
        sampled: dict[str, int] = {}
        for req_id, n in out.num_scheduled_tokens.items():
            start = computed[req_id]
            self.write(req_id, start, start + n)
            if start + n >= len(self.tokens[req_id]):
                toks = self.tokens[req_id]
                sampled[req_id] = (sum(toks[-8:]) * 31 + len(toks)) % 30000
        c.wait_for_save()
        sending, recving = c.get_finished(out.finished_req_ids)
        stats = c.get_kv_connector_stats()
        c.clear_connector_metadata()
        output = KVConnectorOutput(
            finished_sending=sending,
            finished_recving=recving,
            invalid_block_ids=load_errors,
            kv_connector_stats=stats,
        )
        return {
            "sampled": sampled,
            "kv": output,
            "load_errors": load_errors,
            "checked": checked,
            "wrong": wrong,
            "seconds": time.monotonic() - t0,
            "registrations": c.worker.stats.data["registrations"] + (stats.data["registrations"] if stats else 0),
            "reregistrations": c.worker.link.get().reregistrations if c.worker.link.get() else None,
            "pending_stores": {r: len(t) for r, t in c.worker.stores.items()},
            "finishing": set(c.worker.finishing),
        }


def worker_main(conn, spec: EngineSpec) -> None:
    state = WorkerState(spec)
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg is None:
            state.connector.shutdown()
            conn.send("bye")
            return
        try:
            conn.send(state.step(*msg))
        except Exception as e:  # surfaced in the test process
            import traceback

            conn.send(RuntimeError(f"worker step failed: {e}\n{traceback.format_exc()}"))


# --------------------------------------------------------------- the engine


class Engine:
    """One engine: vLLM's Scheduler here, the connector's worker role in a child."""

    def __init__(self, spec: EngineSpec) -> None:
        use_cpu_platform()
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_utils import init_none_hash
        from vllm.v1.core.sched.scheduler import Scheduler
        from vllm.v1.structured_output import StructuredOutputManager

        self.spec = spec
        init_none_hash(sha256)
        self.vllm_config = spec.vllm_config()
        self.vllm_config.cache_config.num_gpu_blocks = spec.num_blocks
        self.scheduler = Scheduler(
            vllm_config=self.vllm_config,
            kv_cache_config=spec.kv_cache_config(),
            structured_output_manager=StructuredOutputManager(self.vllm_config),
            block_size=BLOCK_SIZE,
            log_stats=True,
        )
        self.connector = self.scheduler.connector
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main, args=(child, spec), daemon=True)
        self.proc.start()
        if not self.conn.poll(120):
            raise RuntimeError("the worker process did not start")
        assert self.conn.recv() == "ready"
        self.finished: dict[str, list[int]] = {}  # request -> every token it generated
        self.generated: dict[str, list[int]] = {}
        self.steps: list[dict[str, Any]] = []
        # Called with each SchedulerOutput between schedule() and the
        # worker's step (tests stop or kill the coordinator there).
        self.before_execute = None

    def add(self, req_id: str, prompt: list[int], max_tokens: int = 2, cache_salt: str | None = None):
        from vllm import SamplingParams
        from vllm.utils.hashing import sha256
        from vllm.v1.core.kv_cache_utils import get_request_block_hasher
        from vllm.v1.request import Request

        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        req = Request(
            request_id=req_id,
            prompt_token_ids=list(prompt),
            sampling_params=params,
            pooling_params=None,
            cache_salt=cache_salt,
            block_hasher=get_request_block_hasher(BLOCK_SIZE, sha256),
        )
        self.scheduler.add_request(req)
        return req

    def step(self) -> dict[str, Any]:
        from vllm.v1.outputs import ModelRunnerOutput

        out = self.scheduler.schedule()
        out.kv_connector_block_state = None  # scheduler-local (holds a closure)
        if self.before_execute is not None:
            self.before_execute(out)
        scheduled = out.num_scheduled_tokens
        self.conn.send((out, {r: list(self.scheduler.requests[r].all_token_ids) for r in scheduled}))
        if not self.conn.poll(60):
            raise RuntimeError("the worker step hung")
        res = self.conn.recv()
        if isinstance(res, Exception):
            raise res
        req_ids = list(out.num_scheduled_tokens)
        mro = ModelRunnerOutput(
            req_ids=req_ids,
            req_id_to_index={r: i for i, r in enumerate(req_ids)},
            sampled_token_ids=[[res["sampled"][r]] if r in res["sampled"] else [] for r in req_ids],
            logprobs=None,
            prompt_logprobs_dict={},
            pooler_output=None,
            kv_connector_output=res["kv"],
        )
        outputs = self.scheduler.update_from_output(out, mro)
        for eco in outputs.values():
            for o in eco.outputs:
                self.generated.setdefault(o.request_id, []).extend(o.new_token_ids)
                if o.finish_reason is not None:
                    self.finished[o.request_id] = self.generated.pop(o.request_id)
        res["scheduled"] = dict(out.num_scheduled_tokens)
        self.steps.append(res)
        return res

    def run(self, until: set[str], max_seconds: float = 60.0) -> list[dict[str, Any]]:
        """Steps until every request in `until` finished and the scheduler
        holds no request (blocks kept for stores are given back too, which
        may wait for a store's deadline)."""
        taken = []
        deadline = time.monotonic() + max_seconds
        while time.monotonic() < deadline:
            taken.append(self.step())
            if until <= set(self.finished) and not self.scheduler.has_requests():
                return taken
            if not taken[-1]["scheduled"]:
                time.sleep(0.005)  # only stores in flight: let them end
        last = self.steps[-1]
        raise AssertionError(
            f"not done after {max_seconds} s: finished {sorted(self.finished)}, scheduler holds "
            f"{sorted(self.scheduler.requests)}, worker: stores pending {last['pending_stores']}, "
            f"finishing {last['finishing']}"
        )

    def close(self) -> None:
        try:
            self.scheduler.shutdown()
        except Exception:
            pass
        if self.proc.is_alive():
            self.conn.send(None)
            if self.conn.poll(30):
                self.conn.recv()
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()


def tokens(seed: int, n: int) -> list[int]:
    """A deterministic prompt of `n` token ids."""
    return [(seed * 7_919 + i * 104_729) % 30_000 + 1 for i in range(n)]


def scheduler_os_env() -> None:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")

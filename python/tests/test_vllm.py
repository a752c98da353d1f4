"""The vLLM connector against the real vllm package (0.33, from PyPI, on CPU)
and a real coordinator: vLLM's own Scheduler drives the connector's
scheduler role here, its worker role runs in a child process on
shared-memory KV caches in vLLM's layout (see vllm_engine.py)."""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path

import pytest

import vllm_engine as ve
from conftest import Server

import vllm  # noqa: E402,F401  (never skipped: scripts/test-python.sh installs it)

from vllm.distributed.kv_transfer.kv_connector.v1.base import (  # noqa: E402
    KVConnectorBase_V1,
    KVConnectorRole,
    SupportsHMA,
)

import kvcoord  # noqa: E402
from kvcoord.vllm import ConnectorSettings, KvcoordConnector  # noqa: E402

CHUNK = 256
PER_CHUNK = CHUNK // ve.BLOCK_SIZE
# Bytes of one chunk over all layers: 16 blocks x 16 tokens x heads x K|V bytes.
CHUNK_BYTES = ve.LAYERS * CHUNK * ve.KV_HEADS * 4 * ve.HEAD_SIZE


@pytest.fixture
def spec_for(server: Server, tmp_path: Path):
    model = str(ve.model_dir(tmp_path))

    def make(**kw) -> ve.EngineSpec:
        return ve.EngineSpec(model=model, endpoint=server.endpoint, engine_id=uuid.uuid4().hex, **kw)

    return make


@pytest.fixture
def engines():
    made: list[ve.Engine] = []

    def make(spec: ve.EngineSpec) -> ve.Engine:
        e = ve.Engine(spec)
        made.append(e)
        return e

    yield make
    for e in made:
        e.close()


def first_step_of(engine: ve.Engine, req_id: str) -> dict:
    return next(s for s in engine.steps if req_id in s["scheduled"])


def stat(engine: ve.Engine, key: str) -> int:
    return sum(s["kv"].kv_connector_stats.data[key] for s in engine.steps if s["kv"].kv_connector_stats)


def test_the_connector_is_a_vllm_kv_connector_found_by_name_through_the_plugin_entry_point() -> None:
    from importlib.metadata import entry_points

    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.plugins import load_general_plugins

    assert issubclass(KvcoordConnector, KVConnectorBase_V1)
    assert issubclass(KvcoordConnector, SupportsHMA)
    assert "kvcoord.vllm:register" in {e.value for e in entry_points(group="vllm.general_plugins")}
    load_general_plugins()
    assert KVConnectorFactory.get_connector_class_by_name("KvcoordConnector") is KvcoordConnector


def test_unknown_or_bad_extra_config_is_refused_by_name(spec_for) -> None:
    with pytest.raises(ValueError, match="unknown kv_connector_extra_config keys \\['endpont'\\]"):
        ConnectorSettings.from_vllm_config(spec_for(extra={"endpont": "x"}).vllm_config())
    with pytest.raises(ValueError, match="timeout_s"):
        ConnectorSettings.from_vllm_config(spec_for(extra={"timeout_s": 0}).vllm_config())
    s = ConnectorSettings.from_vllm_config(spec_for().vllm_config())
    assert s.model.endswith("|kv=bfloat16|layout=LBNHC|block=16") and s.world_size == 1


def test_a_prompt_stored_by_one_engine_is_loaded_bit_exact_by_another(spec_for, engines) -> None:
    prompt = ve.tokens(1, 3 * CHUNK + 100)
    a = engines(spec_for())
    a.add("a", prompt)
    a.run({"a"})
    assert stat(a, "stored_chunks") == 3 and stat(a, "stored_bytes") == 3 * CHUNK_BYTES
    assert any("a" in (s["kv"].finished_sending or ()) for s in a.steps), "blocks were kept until the store ended"
    free = a.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
    assert free == a.spec.num_blocks - 1, "every block is given back after the stores"

    b = engines(spec_for())
    b.add("b", prompt)
    b.run({"b"})
    first = first_step_of(b, "b")
    assert first["scheduled"]["b"] == 100, "B computes only what the coordinator did not hold"
    assert first["load_errors"] == set()
    assert first["checked"] == 3 * CHUNK_BYTES and first["wrong"] == 0
    assert stat(b, "loaded_tokens") == 3 * CHUNK and stat(b, "loaded_bytes") == 3 * CHUNK_BYTES
    assert stat(b, "stored_chunks") == 0, "chunks the coordinator holds are not stored again"
    assert b.finished["b"] == a.finished["a"], "the same tokens come out"


def test_a_whole_prompt_hit_leaves_one_token_to_compute(spec_for, engines) -> None:
    prompt = ve.tokens(2, 2 * CHUNK)
    a = engines(spec_for())
    a.add("a", prompt, max_tokens=1)
    a.run({"a"})
    b = engines(spec_for())
    b.add("b", prompt, max_tokens=1)
    b.run({"b"})
    first = first_step_of(b, "b")
    assert first["scheduled"]["b"] == 1
    assert first["wrong"] == 0 and first["checked"] == 2 * CHUNK_BYTES


def test_cache_salt_keeps_tenants_apart(spec_for, engines) -> None:
    prompt = ve.tokens(3, CHUNK + 10)
    a = engines(spec_for())
    a.add("a", prompt, cache_salt="tenant-1")
    a.run({"a"})
    b = engines(spec_for())
    b.add("other", prompt, cache_salt="tenant-2")
    b.run({"other"})
    assert first_step_of(b, "other")["scheduled"]["other"] == CHUNK + 10
    b.add("same", prompt, cache_salt="tenant-1")
    b.run({"same"})
    first = first_step_of(b, "same")
    assert first["scheduled"]["same"] == 10 and first["wrong"] == 0 and first["checked"] == CHUNK_BYTES


def test_lookups_never_block_the_scheduler(server: Server, spec_for, engines) -> None:
    prompt = ve.tokens(4, 2 * CHUNK + 5)
    a = engines(spec_for())
    a.add("a", prompt)
    a.run({"a"})
    from vllm import SamplingParams
    from vllm.v1.request import Request

    conn = a.connector
    req = Request("probe", prompt, SamplingParams(max_tokens=1), None)
    server.signal(signal.SIGSTOP)
    try:
        for _ in range(5):
            t0 = time.monotonic()
            assert conn.get_num_new_matched_tokens(req, 0) == (None, False)
            assert time.monotonic() - t0 < 0.1
    finally:
        server.signal(signal.SIGCONT)
    deadline = time.monotonic() + 5
    while (got := conn.get_num_new_matched_tokens(req, 0))[0] is None:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert got == (2 * CHUNK, False)
    conn.request_finished(req, [])


def test_the_coordinator_restarting_while_serving_costs_misses_never_a_hang_or_a_wrong_byte(
    server: Server, spec_for, engines
) -> None:
    deadline_s = 2.0  # the engines' timeout_s
    p, p2 = ve.tokens(5, 3 * CHUNK), ve.tokens(55, 3 * CHUNK)
    a = engines(spec_for())
    b = engines(spec_for())
    a.add("p", p, max_tokens=1)
    a.add("p2", p2, max_tokens=1)
    a.run({"p", "p2"})

    def on_first(kind: str, act):
        """A hook that acts once, on the first step with `kind` ("loads" or "stores")."""

        def hook(out) -> None:
            if getattr(out.kv_connector_metadata, kind) and not fired:
                fired.append(True)
                act()

        fired: list[bool] = []
        return hook

    def step_until_a_load_fails(engine: ve.Engine) -> dict:
        for _ in range(20):
            step = engine.step()
            if step["load_errors"]:
                engine.before_execute = None
                return step
        raise AssertionError("no load failed")

    # A load that runs late: the coordinator stops while B's worker loads.
    b.add("late", p, max_tokens=2)
    b.before_execute = on_first("loads", lambda: server.signal(signal.SIGSTOP))
    step = step_until_a_load_fails(b)
    server.signal(signal.SIGCONT)
    assert step["seconds"] < deadline_s + 1.0
    b.run({"late"})

    # One restart, while A has stores in flight and B is about to load:
    # A's stores fail fast and are dropped; B's load fails and is recomputed.
    a.add("q", ve.tokens(6, 4 * CHUNK), max_tokens=2)
    b.add("lost", p2, max_tokens=2)

    def stores_in_flight_then_kill() -> None:
        a.before_execute = on_first("stores", lambda: server.signal(signal.SIGSTOP))
        for _ in range(20):  # until q's first 512 tokens ran: their stores wait on the stopped server
            if "q" in a.step()["scheduled"]:
                break
        a.before_execute = None
        server.kill()

    b.before_execute = on_first("loads", stores_in_flight_then_kill)
    step = step_until_a_load_fails(b)
    assert step["seconds"] < deadline_s + 1.0
    server.start()
    done = a.run({"p", "p2", "q"}) + b.run({"late", "lost"})
    assert max(s["seconds"] for s in a.steps + b.steps) < deadline_s + 1.0, "no step waits past its deadline"
    dropped = stat(a, "stores_dropped") + stat(a, "store_errors")
    # q's first two chunks were in flight when the coordinator died; its last
    # two are stored, or dropped too if the client had not reconnected yet.
    assert dropped >= 2, "q's first two chunks were in flight when the coordinator died"
    assert dropped + stat(a, "stored_chunks") == 3 + 3 + 4, "every chunk of p, p2 and q is stored or dropped"
    assert set(b.finished) == {"late", "lost"} and set(a.finished) == {"p", "p2", "q"} and done
    assert b.finished["late"][0] == a.finished["p"][0], "the recomputed request came out the same"

    # Each worker registered again exactly once for the one new epoch it saw.
    a.add("ping-a", ve.tokens(7, 10), max_tokens=1)
    b.add("ping-b", ve.tokens(8, 10), max_tokens=1)
    a.run({"ping-a"})
    b.run({"ping-b"})
    assert a.steps[-1]["reregistrations"] == 1
    assert b.steps[-1]["reregistrations"] == 1

    # Serving goes on: a new prompt stored by A is loaded bit-exact by B.
    r = ve.tokens(9, 2 * CHUNK + 3)
    a.add("r", r, max_tokens=1)
    a.run({"r"})
    b.add("r", r, max_tokens=1)
    b.run({"r"})
    first = first_step_of(b, "r")
    assert first["scheduled"]["r"] == 3 and first["checked"] == 2 * CHUNK_BYTES and first["wrong"] == 0


def test_an_engine_starts_and_serves_without_a_coordinator_then_uses_it_once_it_is_up(
    server: Server, spec_for, engines
) -> None:
    server.kill()
    a = engines(spec_for(extra={"reconnect_s": 0.1}))
    a.add("x", ve.tokens(10, CHUNK + 1), max_tokens=1)
    a.run({"x"})
    assert stat(a, "stores_dropped") >= 1 and stat(a, "registrations") == 0
    server.start()
    time.sleep(0.2)
    a.add("y", ve.tokens(11, CHUNK + 1), max_tokens=1)
    a.run({"y"})
    assert stat(a, "registrations") == 1 and stat(a, "stored_chunks") == 1
    b = engines(spec_for())
    b.add("y", ve.tokens(11, CHUNK + 1), max_tokens=1)
    b.run({"y"})
    assert first_step_of(b, "y")["wrong"] == 0 and first_step_of(b, "y")["checked"] == CHUNK_BYTES


def test_the_worker_role_refuses_hybrid_models(spec_for) -> None:
    import torch
    from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec, SlidingWindowSpec

    spec = spec_for()
    full = FullAttentionSpec(block_size=16, num_kv_heads=2, head_size=16, dtype=torch.bfloat16)
    swa = SlidingWindowSpec(block_size=16, num_kv_heads=2, head_size=16, dtype=torch.bfloat16, sliding_window=64)
    cfg = KVCacheConfig(
        num_blocks=8, kv_cache_tensors=[], kv_cache_groups=[KVCacheGroupSpec(["a"], full), KVCacheGroupSpec(["b"], swa)]
    )
    with pytest.raises(ValueError, match="2 KV cache groups"):
        KvcoordConnector(spec.vllm_config(), KVConnectorRole.WORKER, cfg)
    assert kvcoord.default_endpoint().startswith("unix://")

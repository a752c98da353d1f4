"""CUDA tensors registered with a coordinator running the CUDA backend:
vLLM-shaped per-layer views of a buffer sub-allocated by PyTorch's caching
allocator (so each view's data_ptr is inside an allocation, not its base),
exported by CUDA IPC; stores with and without a ready event, a lookup from a
second client, retrieves into other blocks (awaited on the CPU, or on the
GPU through a done event), compared bit-exact. Memory from
expandable segments cannot be exported and is refused.

Where torch sees no GPU every test here is skipped with the reason
"skipped: no CUDA driver" (the only skip of the suite)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import kvcoord
from conftest import BLOCK_TOKENS, BLOCKS, DIM, HEADS, LAYERS, NO_CUDA, PER_CHUNK, Server, prompt, same_bytes

pytestmark = pytest.mark.skipif(NO_CUDA is not None, reason=NO_CUDA or "")

PAD = 4096  # bytes of the same allocation before the KV cache


def allocation_of(ptr: int) -> tuple[int, int]:
    """(base, size) of the caching-allocator segment holding `ptr`."""
    for seg in torch.cuda.memory_snapshot():
        if seg["address"] <= ptr < seg["address"] + seg["total_size"]:
            return seg["address"], seg["total_size"]
    raise AssertionError(f"{ptr:#x} is in no segment of the caching allocator")


def cuda_kv_caches(order: str, dtype: torch.dtype = torch.bfloat16):
    """vLLM's per-layer views [B, H, N, 2 * head] of one CUDA buffer in the
    physical `order` (a permutation of "LBHNC"), PAD bytes into a tensor of
    the caching allocator (after another small tensor), and the raw bytes."""
    dims = {"L": LAYERS, "B": BLOCKS, "H": HEADS, "N": BLOCK_TOKENS, "C": 2 * DIM}
    elem = torch.empty((), dtype=dtype).element_size()
    nbytes = LAYERS * BLOCKS * HEADS * BLOCK_TOKENS * 2 * DIM * elem
    keep = torch.empty(1000, dtype=torch.uint8, device="cuda")
    whole = torch.empty(PAD + nbytes, dtype=torch.int8, device="cuda")
    raw = whole[PAD:]
    physical = raw.view(dtype).view([dims[d] for d in order])
    logical = physical.permute([order.index(d) for d in "LBHNC"])
    caches = {f"model.layers.{i}.self_attn.attn": logical[i] for i in range(LAYERS)}
    base, size = allocation_of(raw.data_ptr())
    assert raw.data_ptr() != base and raw.data_ptr() + nbytes <= base + size
    return (keep, whole), raw, caches


def fill(raw: torch.Tensor, seed: int) -> None:
    g = torch.Generator(device="cuda").manual_seed(seed)
    raw.copy_(torch.randint(-128, 128, raw.shape, dtype=torch.int8, device="cuda", generator=g))


def check_copied(caches: dict, src: list[int], dst: list[int]) -> None:
    s, d = torch.tensor(src, device="cuda"), torch.tensor(dst, device="cuda")
    for name, v in caches.items():
        assert same_bytes(v.index_select(0, s), v.index_select(0, d)), name


@pytest.mark.parametrize("order", ["LBNHC", "BLNHC"])
def test_cuda_views_store_lookup_retrieve_bit_exact(server: Server, order: str) -> None:
    with kvcoord.Client(server.endpoint) as worker, kvcoord.Client(server.endpoint) as scheduler:
        _keep, raw, caches = cuda_kv_caches(order)
        model = f"cuda-{order}"
        inst = worker.register(
            engine=21, rank=0, world_size=1, model=model, kv_caches=caches, block_tokens=BLOCK_TOKENS
        )
        assert (inst.num_layers, inst.num_blocks, inst.block_tokens) == (LAYERS, BLOCKS, BLOCK_TOKENS)

        # 1. No ready event: the blocks are written before the store.
        fill(raw, 1)
        torch.cuda.synchronize()
        before = raw.clone()
        hashes = prompt(21, 2)
        src = list(range(3, 3 + 2 * PER_CHUNK))
        dst = list(range(BLOCKS - 2 * PER_CHUNK, BLOCKS))
        assert inst.store(hashes, src).result() == ["stored"] * 2
        hit, lease = scheduler.lookup(model, 1, hashes)
        assert hit == 2 and lease is not None
        for v in caches.values():
            v.index_fill_(0, torch.tensor(dst, device="cuda"), 0)
        torch.cuda.synchronize()
        assert inst.retrieve(hashes, dst, lease=lease).result() == ["retrieved"] * 2
        torch.cuda.synchronize()
        check_copied(caches, src, dst)
        stored = [v.index_select(0, torch.tensor(src, device="cuda")) for v in caches.values()]
        # Every byte outside the target blocks is what it was.
        after = raw.clone()
        raw.zero_()
        for v in caches.values():
            v.index_fill_(0, torch.tensor(dst, device="cuda"), 1)
        touched = raw != 0
        raw.copy_(after)
        assert touched.any() and not touched.all()
        assert torch.equal(after[~touched], before[~touched])

        # 2. A ready event recorded after writing on a side stream; the
        # store is issued without synchronizing. Then the raw handle bytes.
        for seed, as_bytes in [(2, False), (3, True)]:
            side = torch.cuda.Stream()
            with torch.cuda.stream(side):
                torch.cuda._sleep(100_000_000)  # the store is queued long before the blocks land
                fill(raw, seed)
                ready = torch.cuda.Event(interprocess=True)
                ready.record(side)
            h = prompt(21 + seed * 100, 1)
            s = list(range(40, 40 + PER_CHUNK))
            d = list(range(70, 70 + PER_CHUNK))
            event = ready.ipc_handle() if as_bytes else ready
            assert inst.store(h, s, ready_event=event).result() == ["stored"]
            side.synchronize()
            assert scheduler.lookup(model, 1, h, lease=False)[0] == 1
            assert inst.retrieve(h, d).result() == ["retrieved"]
            torch.cuda.synchronize()
            check_copied(caches, s, d)

        # 3. A retrieve awaited on the GPU: it ends once the copy is queued,
        # and a stream that waits on the done event reads the blocks.
        for as_bytes in (False, True):
            d = list(range(90, 90 + 2 * PER_CHUNK))
            for v in caches.values():
                v.index_fill_(0, torch.tensor(d, device="cuda"), 0)
            torch.cuda.synchronize()
            done = torch.cuda.Event(interprocess=True)
            event = done.ipc_handle() if as_bytes else done
            assert inst.retrieve(hashes, d, done_event=event).result() == ["retrieved"] * 2
            reader = torch.cuda.Stream()
            reader.wait_event(done)
            with torch.cuda.stream(reader):
                got = [v.index_select(0, torch.tensor(d, device="cuda")) for v in caches.values()]
            reader.synchronize()
            assert all(same_bytes(a, b) for a, b in zip(got, stored))
        inst.unregister()


def test_cuda_mla_views_round_trip(server: Server) -> None:
    with kvcoord.Client(server.endpoint) as c:
        whole = torch.empty(PAD + LAYERS * BLOCKS * BLOCK_TOKENS * 72 * 2, dtype=torch.int8, device="cuda")
        buf = whole[PAD:].view(torch.bfloat16).view(LAYERS, BLOCKS, BLOCK_TOKENS, 72)
        inst = c.register(
            engine=22, rank=0, world_size=1, model="mla", kv_caches=[buf[i] for i in range(LAYERS)], block_tokens=16
        )
        fill(whole, 4)
        torch.cuda.synchronize()
        h = prompt(22, 1)
        src, dst = list(range(PER_CHUNK)), list(range(BLOCKS - PER_CHUNK, BLOCKS))
        assert inst.store(h, src).result() == ["stored"]
        assert inst.retrieve(h, dst).result() == ["retrieved"]
        torch.cuda.synchronize()
        check_copied({f"l{i}": buf[i] for i in range(LAYERS)}, src, dst)
        inst.unregister()


EXPANDABLE = textwrap.dedent(
    """
    import sys, torch, kvcoord
    buf = torch.zeros((2, 2, 1024, 16, 2, 8), dtype=torch.bfloat16, device="cuda")  # 4 MiB
    try:
        kvcoord.Client(sys.argv[1]).register(
            engine=23, rank=0, world_size=1, model="m", kv_caches=[buf[0], buf[1]], block_tokens=16
        )
    except kvcoord.InvalidArgument as e:
        print("REFUSED", e)
    else:
        print("REGISTERED")
    """
)


def test_expandable_segments_memory_is_refused_by_name(server: Server) -> None:
    env = dict(os.environ, PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True")
    out = subprocess.run(
        [sys.executable, "-c", EXPANDABLE, server.endpoint], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("REFUSED"), out.stdout + out.stderr
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in out.stdout, out.stdout
    assert "cumem" in out.stdout, out.stdout
    # The coordinator keeps serving.
    with kvcoord.Client(server.endpoint) as c:
        c.ping()

"""KV caches as vLLM hands them to ``register_kv_caches``: per-layer views
``[num_blocks, num_kv_heads, block_size, 2 * head_size]`` into one shared
buffer, in each of vLLM's physical orders (the strides reveal it), and MLA's
``[num_blocks, block_tokens, latent]``: bit-exact round trips through a real
coordinator, and placements the memory cannot hold refused."""

from __future__ import annotations

import types

import pytest
import torch

import kvcoord
from conftest import BLOCK_TOKENS, BLOCKS, DIM, HEADS, LAYERS, PER_CHUNK, Server, prompt, same_bytes


def vllm_kv_caches(order: str, dtype: torch.dtype = torch.bfloat16, offset: int = 0):
    """One int8 shared buffer viewed the way vLLM does: as `dtype`, shaped in
    the physical `order` (a permutation of "LBHNC"), permuted back to the
    logical [L, B, H, N, C] and split per layer. `offset` bytes precede the
    KV cache in the buffer."""
    dims = {"L": LAYERS, "B": BLOCKS, "H": HEADS, "N": BLOCK_TOKENS, "C": 2 * DIM}
    elem = torch.empty((), dtype=dtype).element_size()
    nbytes = LAYERS * BLOCKS * HEADS * BLOCK_TOKENS * 2 * DIM * elem
    raw = kvcoord.shared_tensor((offset + nbytes,), torch.int8)
    physical = raw[offset:].view(dtype).view([dims[d] for d in order])
    logical = physical.permute([order.index(d) for d in "LBHNC"])
    caches = {f"model.layers.{i}.self_attn.attn": logical[i] for i in range(LAYERS)}
    return raw, caches


def round_trip(c: kvcoord.Client, engine: int, raw: torch.Tensor, caches: dict, blocks_dim: int = 0) -> None:
    inst = c.register(
        engine=engine, rank=0, world_size=1, model=f"m{engine}", kv_caches=caches, block_tokens=BLOCK_TOKENS
    )
    assert (inst.num_layers, inst.num_blocks, inst.block_tokens) == (LAYERS, BLOCKS, BLOCK_TOKENS)
    torch.manual_seed(engine)
    raw.copy_(torch.randint(-128, 128, raw.shape, dtype=torch.int8))
    before = raw.clone()
    hashes = prompt(engine, 2)
    src = list(range(3, 3 + 2 * PER_CHUNK))
    dst = list(range(BLOCKS - 2 * PER_CHUNK, BLOCKS))
    assert inst.store(hashes, src).result() == ["stored"] * 2
    for v in caches.values():
        v.index_fill_(blocks_dim, torch.tensor(dst), 0)
    assert inst.retrieve(hashes, dst).result() == ["retrieved"] * 2
    for name, v in caches.items():
        a, b = v.index_select(blocks_dim, torch.tensor(src)), v.index_select(blocks_dim, torch.tensor(dst))
        assert same_bytes(a, b), name
    # Every byte outside the target blocks is what it was.
    after = raw.clone()
    raw.zero_()
    for v in caches.values():
        v.index_fill_(blocks_dim, torch.tensor(dst), 1)
    touched = raw != 0
    raw.copy_(after)
    assert touched.any() and not touched.all()
    assert torch.equal(after[~touched], before[~touched])
    inst.unregister()


@pytest.mark.parametrize("order", ["LBNHC", "BLNHC", "LHBNC", "LBHNC", "BLHNC", "BHLNC"])
def test_vllm_views_round_trip_bit_exact(server: Server, order: str) -> None:
    with kvcoord.Client(server.endpoint) as c:
        raw, caches = vllm_kv_caches(order)
        v = next(iter(caches.values()))
        assert v.shape == (BLOCKS, HEADS, BLOCK_TOKENS, 2 * DIM)
        round_trip(c, 11, raw, caches)
        # Starting inside the shared tensor, and int8 views.
        raw, caches = vllm_kv_caches(order, offset=4096)
        round_trip(c, 12, raw, caches)
        raw, caches = vllm_kv_caches(order, dtype=torch.int8, offset=64)
        round_trip(c, 13, raw, caches)


def test_mla_views_round_trip_bit_exact(server: Server) -> None:
    with kvcoord.Client(server.endpoint) as c:
        buf = kvcoord.shared_tensor((LAYERS, BLOCKS, BLOCK_TOKENS, 72), torch.bfloat16)
        caches = {f"layer{i}": buf[i] for i in range(LAYERS)}
        round_trip(c, 14, buf.view(-1).view(torch.int8), caches)


def fake_view(v: torch.Tensor, shift: int = 0, shape=None, stride=None) -> types.SimpleNamespace:
    """What `register` reads of a tensor, with an address or geometry torch
    would not allow (its storage checks refuse views past their storage)."""
    return types.SimpleNamespace(
        device=v.device,
        dtype=v.dtype,
        shape=shape if shape is not None else v.shape,
        stride=(lambda: stride) if stride is not None else v.stride,
        data_ptr=lambda: v.data_ptr() + shift,
    )


def test_a_placement_the_memory_cannot_hold_is_invalid_argument(server: Server) -> None:
    with kvcoord.Client(server.endpoint) as c:
        reg = lambda caches: c.register(  # noqa: E731
            engine=20, rank=0, world_size=1, model="m", kv_caches=caches, block_tokens=BLOCK_TOKENS
        )
        raw, caches = vllm_kv_caches("LBNHC")
        views = list(caches.values())
        last = views[-1]
        with pytest.raises(kvcoord.InvalidArgument, match="do not fit"):
            reg([fake_view(last, shift=2 * DIM * 2)])
        # Blocks strided past the end of the buffer.
        s = list(last.stride())
        with pytest.raises(kvcoord.InvalidArgument):
            reg([fake_view(last, stride=(s[0] * 2, *s[1:]))])
        # Blocks overlapping each other.
        with pytest.raises(kvcoord.InvalidArgument, match="overlaps"):
            reg([fake_view(v, stride=(s[0] // 2, *s[1:])) for v in views])
        # The real views still register.
        assert reg(caches).num_layers == LAYERS

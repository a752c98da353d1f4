"""The Python client against a real coordinator: bit-exact round trip,
restart, typed errors, no hang."""

from __future__ import annotations

import gc
import signal
import subprocess
import time
import types

import pytest
import torch

import kvcoord
from conftest import (
    BLOCK_TOKENS,
    BLOCKS,
    CHUNK_TOKENS,
    DIM,
    HEADS,
    LAYERS,
    PER_CHUNK,
    Server,
    kv_cache,
    kvcoord_command,
    prompt,
    register,
    same_bytes,
)


def test_store_lookup_from_another_client_retrieve_into_other_blocks_is_bit_exact(server: Server) -> None:
    with kvcoord.Client(server.endpoint) as worker, kvcoord.Client(server.endpoint) as scheduler:
        assert worker.chunk_tokens == CHUNK_TOKENS and worker.epoch == scheduler.epoch
        inst, buf = register(worker, engine=7, model="llama")
        per = PER_CHUNK
        torch.manual_seed(1)
        buf.copy_(torch.randn(buf.shape).to(torch.bfloat16))
        hashes = prompt(1, 3)
        src = list(range(0, 3 * per))
        assert inst.store(hashes, src).result() == ["stored"] * 3
        assert inst.store(hashes, src).result() == ["already_present"] * 3

        # The scheduler registered nothing; it looks up by model.
        assert scheduler.lookup("llama", 2, hashes, lease=False) == (0, None), "another TP degree"
        assert scheduler.lookup("no-such-model", 1, hashes) == (0, None)
        pending = scheduler.lookup_async("llama", 1, hashes + prompt(2, 1))
        deadline = time.monotonic() + 5
        while not pending.done():
            assert time.monotonic() < deadline
            time.sleep(0.001)
        hit, lease = pending.result()
        assert hit == 3 and isinstance(lease, int)

        dst = list(range(BLOCKS - 3 * per, BLOCKS))
        assert not set(src) & set(dst)
        buf[:, :, dst] = 0
        t = inst.retrieve(hashes, dst, lease=lease)
        assert t.wait(timeout=5.0) and t.done()
        assert t.result() == ["retrieved"] * 3
        for layer in range(LAYERS):
            for plane in range(2):
                assert torch.equal(buf[layer, plane, src], buf[layer, plane, dst])
                assert same_bytes(buf[layer, plane, src], buf[layer, plane, dst])
        assert buf[:, :, dst].abs().sum() > 0
        assert inst.retrieve(prompt(3, 1), dst[:per]).result() == ["missing"]


def test_dict_kv_caches_in_order_and_other_dtypes(server: Server) -> None:
    with kvcoord.Client(server.endpoint) as c:
        for dtype in (torch.float16, torch.float32, torch.uint8, torch.int8):
            buf, layers = kv_cache(dtype=dtype)
            caches = {f"model.layers.{i}.self_attn": t for i, t in enumerate(layers)}
            inst = c.register(
                engine=hash(str(dtype)) & 0xFFFF, rank=0, world_size=1, model=str(dtype), kv_caches=caches,
                block_tokens=BLOCK_TOKENS,
            )
            assert (inst.num_layers, inst.num_blocks, inst.block_tokens) == (LAYERS, BLOCKS, BLOCK_TOKENS)
            buf.view(torch.uint8).copy_(torch.randint(0, 256, buf.view(torch.uint8).shape, dtype=torch.uint8))
            per = PER_CHUNK
            h = prompt(9, 1)
            assert inst.store(h, list(range(per))).result() == ["stored"]
            assert inst.retrieve(h, list(range(per, 2 * per))).result() == ["retrieved"]
            assert same_bytes(buf[:, :, :per], buf[:, :, per : 2 * per])
            inst.unregister()


def test_sigkill_and_restart_registers_again_exactly_once(server: Server) -> None:
    c = kvcoord.Client(server.endpoint, timeout=5.0)
    inst, buf = register(c)
    per = PER_CHUNK
    assert inst.store(prompt(1, 2), list(range(2 * per))).result() == ["stored"] * 2
    first_epoch = c.epoch
    assert c.reregistrations == 0

    server.kill()
    with pytest.raises((kvcoord.Unavailable, kvcoord.Timeout)) as e:
        inst.store(prompt(2, 1), list(range(per))).result()
    assert e.value.retriable
    server.start()

    deadline = time.monotonic() + 15
    while True:
        try:
            outcome = inst.store(prompt(3, 2), list(range(2 * per))).result()
            break
        except (kvcoord.Unavailable, kvcoord.Timeout):
            assert time.monotonic() < deadline, "the client never got back"
            time.sleep(0.05)
    assert outcome == ["stored"] * 2
    assert c.epoch != first_epoch
    assert c.reregistrations == 1
    assert inst.retrieve(prompt(3, 2), list(range(2 * per, 4 * per))).result() == ["retrieved"] * 2
    assert same_bytes(buf[:, :, : 2 * per], buf[:, :, 2 * per : 4 * per])
    assert c.reregistrations == 1, "exactly once"
    c.close()


def expect(exc: type[kvcoord.Error], fn, *, says: str = "") -> kvcoord.Error:
    with pytest.raises(exc) as info:
        fn()
    assert says in str(info.value), f"{info.value!s} lacks {says!r}"
    assert isinstance(info.value, kvcoord.Error)
    return info.value


def test_bad_inputs_raise_typed_errors_and_the_server_keeps_serving(server: Server) -> None:
    c = kvcoord.Client(server.endpoint)
    reg = lambda caches, bt=BLOCK_TOKENS: c.register(  # noqa: E731
        engine=3, rank=0, world_size=1, model="m", kv_caches=caches, block_tokens=bt
    )
    _, f64 = kv_cache(dtype=torch.float64)
    e = expect(kvcoord.InvalidArgument, lambda: reg(f64), says="float64")
    assert not e.retriable and e.kind == "invalid_argument"

    _, a = kv_cache()
    _, b = kv_cache(blocks=BLOCKS // 2)
    expect(kvcoord.LayoutMismatch, lambda: reg([a[0], b[1]]), says="same shape")
    flat = kvcoord.shared_tensor((LAYERS, BLOCKS, BLOCK_TOKENS * HEADS * DIM * 2), torch.bfloat16)
    expect(kvcoord.LayoutMismatch, lambda: reg([flat[i] for i in range(LAYERS)]), says="[2, num_blocks")
    expect(kvcoord.LayoutMismatch, lambda: reg(a, bt=BLOCK_TOKENS * 2), says="block_tokens=32")
    buf4, four = kv_cache(layers=4)
    expect(kvcoord.LayoutMismatch, lambda: reg([four[0], four[1], four[3]]), says="one after")
    expect(kvcoord.LayoutMismatch, lambda: reg([four[1], four[0]]), says="one after")
    expect(kvcoord.LayoutMismatch, lambda: reg([buf4[i].transpose(1, 2) for i in range(3)]), says="contiguous")
    private = [torch.zeros((2, BLOCKS, BLOCK_TOKENS, HEADS, DIM), dtype=torch.bfloat16) for _ in range(LAYERS)]
    expect(kvcoord.InvalidArgument, lambda: reg(private), says="kvcoord.shared_tensor")
    fake_cuda = types.SimpleNamespace(
        device=types.SimpleNamespace(type="cuda"), dtype=torch.bfloat16, shape=a[0].shape,
        stride=a[0].stride, data_ptr=a[0].data_ptr,
    )
    # Host memory claiming to be CUDA: no driver (CI), or not device memory.
    expect(kvcoord.InvalidArgument, lambda: reg([fake_cuda]), says="CUDA")
    expect(kvcoord.InvalidArgument, lambda: reg([a[0], fake_cuda]), says="same device")
    expect(kvcoord.InvalidArgument, lambda: reg([]), says="empty")
    expect(kvcoord.InvalidArgument, lambda: reg(42), says="dict of tensors or a list")

    inst, _ = register(c, engine=4)
    per = PER_CHUNK
    h = prompt(5, 1)
    expect(kvcoord.InvalidArgument, lambda: inst.store(h, [BLOCKS] + list(range(per - 1))).result(), says="out of range")
    expect(kvcoord.InvalidArgument, lambda: inst.store(h, list(range(per - 1))).result())
    expect(kvcoord.InvalidArgument, lambda: inst.store([b"short"], list(range(per))), says="32")
    expect(kvcoord.InvalidArgument, lambda: c.release_lease(123456), says="no such lease")
    h2 = prompt(6, 1)
    assert inst.store(h2, list(range(per))).result() == ["stored"]
    done = bytes(64)  # a done event is for CUDA memory only
    expect(kvcoord.InvalidArgument, lambda: inst.retrieve(h2, list(range(per)), done_event=done).result(), says="CUDA")
    expect(kvcoord.InvalidArgument, lambda: inst.retrieve(h2, list(range(per)), done_event=42), says="interprocess")
    inst.unregister()
    e = expect(kvcoord.NotRegistered, lambda: inst.store(h, list(range(per))).result())
    assert e.retriable and e.kind == "not_registered"
    expect(kvcoord.NotRegistered, lambda: inst.retrieve(h, list(range(per))).result())

    expect(kvcoord.InvalidArgument, lambda: kvcoord.Client("/no/scheme.sock"), says="expected unix:///")
    expect(kvcoord.InvalidArgument, lambda: kvcoord.Client("tcp://localhost"), says="expected unix:///")
    e = expect(kvcoord.PermissionDenied, lambda: kvcoord.Client(server.endpoint, token="secret"), says="wrong token")
    assert not e.retriable and e.kind == "unauthorized"
    expect(kvcoord.InvalidArgument, lambda: kvcoord.Client(server.endpoint, timeout=0))

    # The same server still serves another client, and this one.
    with kvcoord.Client(server.endpoint) as other:
        ok, buf = register(other, engine=5)
        assert ok.store(h, list(range(per))).result() == ["stored"]
        assert other.lookup("m", 1, h) [0] == 1
    inst2, _ = register(c, engine=6)
    assert inst2.store(h, list(range(per))).result() == ["already_present"]
    c.close()
    e = expect(kvcoord.ShuttingDown, lambda: inst2.store(h, list(range(per))).result())


def test_unreachable_endpoint_is_unavailable_within_the_timeout(tmp_path) -> None:
    start = time.monotonic()
    e = expect(kvcoord.Unavailable, lambda: kvcoord.Client(f"unix://{tmp_path}/none.sock", timeout=0.5))
    assert time.monotonic() - start < 3.0
    assert e.retriable and "cannot reach" in str(e)
    start = time.monotonic()
    expect(kvcoord.Unavailable, lambda: kvcoord.Client("tcp://127.0.0.1:9", timeout=0.5))
    assert time.monotonic() - start < 3.0


@pytest.mark.timeout(60)
def test_server_killed_or_stuck_mid_call_fails_never_hangs(server: Server) -> None:
    c = kvcoord.Client(server.endpoint, timeout=2.0)
    inst, _ = register(c)
    per = PER_CHUNK

    # A stuck server: the request ends at its deadline.
    server.signal(signal.SIGSTOP)
    t = inst.store(prompt(1, 1), list(range(per)))
    assert not t.wait(timeout=0.3), "a stopped server cannot answer"
    start = time.monotonic()
    expect(kvcoord.Timeout, t.result)
    assert time.monotonic() - start < 5.0

    # Killed while a call is in flight: the call fails at once.
    t = inst.store(prompt(2, 1), list(range(per)))
    lookup = c.lookup_async("m", 1, prompt(2, 1))
    assert not t.done()
    start = time.monotonic()
    server.kill()
    for call in (t.result, lookup.result):
        with pytest.raises((kvcoord.Unavailable, kvcoord.Timeout)):
            call()
    assert time.monotonic() - start < 5.0


def test_chunk_hashes_test_vectors() -> None:
    hexes = lambda *a, **k: [h.hex() for h in kvcoord.chunk_hashes(*a, **k)]  # noqa: E731
    assert hexes(range(8), 4) == [
        "636ee17d45747f90f6b08ecf0f47f008615bdd62c85f312c96f52b8ec6cbc2fc",
        "539b88cb0c75ee5f52c243cbb968e7d513296360b222ae800079981dfb83fa8e",
    ]
    assert hexes([1, 2, 3], 2, salt=b"s") == ["f25957086639e372633acc36f25efe6f1bd3ecbe22f1a80f6d3da0059f03960c"]
    assert hexes(range(8), 4, b"model-a") == [
        "96668a8edc97304b72479d326f0998f47eeab607c9a710f56b7d86fc0c1413ba",
        "0be9dc71cd91a1ca12262dd1588a24d8397cabaf2b6625ab666f351d5ac3c6ea",
    ]
    assert kvcoord.chunk_hashes([5, 6, 7], 4) == []
    expect(kvcoord.InvalidArgument, lambda: kvcoord.chunk_hashes([1], 0), says="positive")
    expect(kvcoord.InvalidArgument, lambda: kvcoord.chunk_hashes([-1], 1), says="u32")


def test_chunk_hashes_docstring_examples() -> None:
    import doctest

    assert doctest.run_docstring_examples is not None
    finder = doctest.DocTestFinder()
    runner = doctest.DocTestRunner()
    for test in finder.find(kvcoord.chunk_hashes, "chunk_hashes", globs={"chunk_hashes": kvcoord.chunk_hashes}):
        runner.run(test)
    assert runner.summarize(verbose=False) == doctest.TestResults(failed=0, attempted=3)


def test_shared_tensor_is_zeroed_and_released_with_its_last_view() -> None:
    gc.collect()
    before = kvcoord._kvcoord._shared_region_count()
    buf = kvcoord.shared_tensor((3, 5), torch.float32)
    assert buf.shape == (3, 5) and buf.dtype == torch.float32 and buf.is_contiguous()
    assert torch.equal(buf, torch.zeros(3, 5))
    view = buf[1]
    assert kvcoord._kvcoord._shared_region_count() == before + 1
    del buf
    gc.collect()
    assert kvcoord._kvcoord._shared_region_count() == before + 1, "a view keeps it"
    del view
    gc.collect()
    assert kvcoord._kvcoord._shared_region_count() == before
    expect(kvcoord.InvalidArgument, lambda: kvcoord.shared_tensor((0, 4), torch.float32))


def test_the_kvcoord_command_serves_and_shows_status(tmp_path) -> None:
    token = tmp_path / "admin.token"
    token.write_text("python-admin-token-0123456789\n")
    server = Server(tmp_path, "--admin-token-file", str(token))
    status = [kvcoord_command(), "status", "--socket", str(server.socket)]
    try:
        with kvcoord.Client(server.endpoint) as c:
            register(c, engine=0xABC)
            out = subprocess.run(status, capture_output=True, text=True, timeout=30)
            assert out.returncode == 0, out.stderr
            assert f"{c.epoch:016x}" in out.stdout
            assert "hidden" in out.stdout and "0000000000000abc" not in out.stdout, "instances need the admin token"
            out = subprocess.run(
                status + ["--admin-token-file", str(token)], capture_output=True, text=True, timeout=30
            )
            assert out.returncode == 0, out.stderr
            assert "0000000000000abc" in out.stdout
    finally:
        server.kill()
    version = subprocess.run([kvcoord_command(), "--version"], capture_output=True, text=True, timeout=30)
    assert version.returncode == 0 and kvcoord.__version__ in version.stdout
    bad = subprocess.run([kvcoord_command(), "serve", "--l1-size", "lots"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "l1" in bad.stderr.lower()

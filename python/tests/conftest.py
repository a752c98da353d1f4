"""Fixtures: a real coordinator started with the pip-installed ``kvcoord``
command (private socket in tmp_path, admin API off). Its backend is
``$KVCOORD_TEST_BACKEND``: ``host``, ``cuda``, or ``auto`` (the default: cuda
where torch sees a GPU, else host); memfd tests pass on either, the CUDA
tensor tests (test_cuda.py) need cuda."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import kvcoord


def kvcoord_command() -> str:
    """The console script pip installed beside this interpreter, else the
    `kvcoord` on PATH (a package installed with `pip install --target`)."""
    path = Path(sys.executable).parent / "kvcoord"
    if path.exists():
        return str(path)
    found = shutil.which("kvcoord")
    assert found, f"{path} is missing: install the package with `pip install ./python`"
    return found


def backend_choice() -> str:
    """The coordinator backend the tests run: $KVCOORD_TEST_BACKEND, where
    `auto` (the default) is cuda when torch sees a GPU."""
    choice = os.environ.get("KVCOORD_TEST_BACKEND", "auto")
    assert choice in ("auto", "host", "cuda"), f"KVCOORD_TEST_BACKEND={choice!r}: use auto, host or cuda"
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "host"
    return choice


# Why the CUDA tensor tests do not run here, or None when they do.
NO_CUDA = (
    "skipped: no CUDA driver"
    if not torch.cuda.is_available()
    else None
    if backend_choice() == "cuda"
    else "skipped: KVCOORD_TEST_BACKEND=host"
)


class Server:
    def __init__(self, tmp_path: Path, *extra: str) -> None:
        self.socket = tmp_path / "kv.sock"
        self.log = tmp_path / "server.log"
        self.extra = list(extra)
        self.backend = backend_choice()
        self.proc: subprocess.Popen | None = None
        self.start()

    @property
    def endpoint(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> None:
        assert self.proc is None
        args = [kvcoord_command(), "serve", "--socket", str(self.socket), "--admin", "off", "--backend", self.backend]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(args + self.extra, stdout=log, stderr=log)
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(self.socket))
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"kvcoord serve did not start: {self.log.read_text()}")
                time.sleep(0.01)

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        if self.proc is not None:
            # SIGKILL ends a stopped (SIGSTOP) process too. No SIGCONT first:
            # it let a stopped server answer queued requests before dying.
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def server(tmp_path: Path):
    s = Server(tmp_path)
    yield s
    s.kill()


# A small layout: 2 layers x 128 blocks of 16 tokens x 2 heads x 8 (bf16):
# 512-byte block planes, 16 blocks (32 KiB) per 256-token chunk (the
# coordinator's default chunk).
LAYERS, BLOCKS, BLOCK_TOKENS, HEADS, DIM = 2, 128, 16, 2, 8
CHUNK_TOKENS = 256
PER_CHUNK = CHUNK_TOKENS // BLOCK_TOKENS


def prompt(seed: int, chunks: int) -> list[bytes]:
    """The chunk keys of a deterministic prompt of `chunks` whole chunks."""
    tokens = [(seed * 7919 + i) % 50000 for i in range(chunks * CHUNK_TOKENS)]
    return kvcoord.chunk_hashes(tokens, CHUNK_TOKENS)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact comparison (torch.equal on the bytes, so NaN patterns count)."""
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def kv_cache(layers: int = LAYERS, blocks: int = BLOCKS, dtype: torch.dtype = torch.bfloat16):
    """A shared KV cache and its per-layer views (as vLLM passes them)."""
    buf = kvcoord.shared_tensor((layers, 2, blocks, BLOCK_TOKENS, HEADS, DIM), dtype)
    return buf, [buf[i] for i in range(layers)]


def register(client: kvcoord.Client, engine: int = 1, rank: int = 0, world_size: int = 1, model: str = "m", **kw):
    buf, layers = kv_cache(**kw)
    inst = client.register(
        engine=engine, rank=rank, world_size=world_size, model=model, kv_caches=layers, block_tokens=BLOCK_TOKENS
    )
    return inst, buf

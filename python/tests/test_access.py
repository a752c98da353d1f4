"""Credentials from Python: `kvcoord.Client(endpoint, token=...)` against a
coordinator with tokens, on the Unix socket and over TCP."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

import kvcoord
from conftest import PER_CHUNK, Server, prompt, register


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def guarded(tmp_path: Path):
    """A coordinator with a default-tenant token file, an admin token and TCP on loopback."""
    token = tmp_path / "tenant.token"
    token.write_text("python-tenant-token-0123456789\n")
    token.chmod(0o600)
    port = free_port()
    s = Server(
        tmp_path,
        "--token-file",
        str(token),
        "--admin-token",
        "python-admin-token-0123456789",
        "--tcp",
        f"127.0.0.1:{port}",
    )
    s.tcp = f"tcp://127.0.0.1:{port}"
    yield s
    s.kill()


def test_a_wrong_token_raises_permission_denied_and_the_right_one_works(guarded: Server) -> None:
    for endpoint in (guarded.endpoint, guarded.tcp):
        with pytest.raises(kvcoord.PermissionDenied, match="wrong token") as e:
            kvcoord.Client(endpoint, token="not-the-token-0123456789", timeout=5.0)
        assert not e.value.retriable
    with pytest.raises(kvcoord.PermissionDenied, match="must present a token"):
        kvcoord.Client(guarded.tcp, timeout=5.0)

    # The socket without a token (the server's own user) registers and stores.
    with kvcoord.Client(guarded.endpoint) as worker:
        inst, _ = register(worker, engine=7)
        h = prompt(11, 2)
        assert inst.store(h, list(range(2 * PER_CHUNK))).result() == ["stored", "stored"]
        # The right token over TCP: the scheduler's lookup finds them, with a
        # lease the worker (same tenant) retrieves with.
        with kvcoord.Client(guarded.tcp, token="python-tenant-token-0123456789", timeout=5.0) as scheduler:
            hit, lease = scheduler.lookup("m", 1, h)
            assert hit == 2 and lease is not None
        other = list(range(64, 64 + 2 * PER_CHUNK))
        assert inst.retrieve(h, other, lease=lease).result() == ["retrieved", "retrieved"]

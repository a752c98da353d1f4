"""kvcoord: a KV-cache coordinator for LLM inference, and its Python client.

One ``pip install`` gives both: the ``kvcoord`` command (``kvcoord serve``,
``kvcoord status``) and this module, a thin binding over the Rust client.

    import kvcoord, torch

    with kvcoord.Client("unix:///tmp/kvcoord.sock") as client:
        buf = kvcoord.shared_tensor((layers, 2, num_blocks, block_tokens, kv_heads, head_dim), torch.bfloat16)
        inst = client.register(engine=1, rank=0, world_size=1, model="m",
                               kv_caches=[buf[i] for i in range(layers)], block_tokens=block_tokens)
        hashes = kvcoord.chunk_hashes(token_ids, client.chunk_tokens)
        inst.store(hashes, block_ids).result()

Every failure raises a subclass of :class:`kvcoord.Error` carrying the
coordinator's message and ``.retriable``.
"""

from __future__ import annotations

import math
import mmap
import weakref
from typing import TYPE_CHECKING, Sequence

from . import _kvcoord
from ._kvcoord import (
    Client,
    Error,
    Instance,
    Internal,
    InvalidArgument,
    LayoutMismatch,
    Lookup,
    NotRegistered,
    OutOfMemory,
    PermissionDenied,
    ProtocolMismatch,
    ShuttingDown,
    Timeout,
    Transfer,
    Unavailable,
    __version__,
    default_endpoint,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "Client",
    "Instance",
    "Transfer",
    "Lookup",
    "chunk_hashes",
    "default_endpoint",
    "shared_tensor",
    "Error",
    "NotRegistered",
    "LayoutMismatch",
    "InvalidArgument",
    "OutOfMemory",
    "Unavailable",
    "Timeout",
    "PermissionDenied",
    "ProtocolMismatch",
    "ShuttingDown",
    "Internal",
    "__version__",
]


def chunk_hashes(token_ids: Sequence[int], chunk_tokens: int, salt: bytes = b"") -> list[bytes]:
    """The 32-byte keys of the whole chunks of ``token_ids``, ``chunk_tokens``
    tokens each; a trailing partial chunk gets no key.

    ``h[i] = blake3(h[i-1] || tokens of chunk i as little-endian u32)``, with
    ``h[-1] = blake3(b"kvcoord-chunk-v1" || salt)``: each key commits to every
    token before it. The same function as the Rust ``chunk_hashes``.

    Test vectors (checked by the Rust and the Python tests)::

        >>> [h.hex() for h in chunk_hashes(range(8), 4)]
        ['636ee17d45747f90f6b08ecf0f47f008615bdd62c85f312c96f52b8ec6cbc2fc', '539b88cb0c75ee5f52c243cbb968e7d513296360b222ae800079981dfb83fa8e']
        >>> [h.hex() for h in chunk_hashes([1, 2, 3], 2, salt=b"s")]
        ['f25957086639e372633acc36f25efe6f1bd3ecbe22f1a80f6d3da0059f03960c']
        >>> [h.hex() for h in chunk_hashes(range(8), 4, salt=b"model-a")]
        ['96668a8edc97304b72479d326f0998f47eeab607c9a710f56b7d86fc0c1413ba', '0be9dc71cd91a1ca12262dd1588a24d8397cabaf2b6625ab666f351d5ac3c6ea']
    """
    return _kvcoord.chunk_hashes(list(token_ids), chunk_tokens, bytes(salt))


def shared_tensor(shape: Sequence[int], dtype: "torch.dtype") -> "torch.Tensor":
    """A zeroed CPU tensor whose memory the coordinator can map: a sealed
    memfd (created and sealed in Rust), mapped here with :mod:`mmap`.

    Allocate the KV cache with it and register its per-layer views, e.g.
    ``buf = shared_tensor((layers, 2, blocks, block_tokens, heads, dim), torch.bfloat16)``
    and ``kv_caches=[buf[i] for i in range(layers)]``. The memory lives as
    long as any tensor viewing it.
    """
    import torch

    shape = tuple(int(d) for d in shape)
    if any(d <= 0 for d in shape):
        raise InvalidArgument(f"shared_tensor shape {shape} has a dimension < 1")
    itemsize = torch.empty((), dtype=dtype).element_size()
    nbytes = math.prod(shape) * itemsize
    region, fd = _kvcoord._create_shared_region(nbytes)
    try:
        mm = mmap.mmap(fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        flat = torch.frombuffer(mm, dtype=dtype, count=math.prod(shape))
        _kvcoord._bind_shared_region(region, flat.data_ptr())
    except BaseException:
        _kvcoord._release_shared_region(region)
        raise
    # The tensor's storage holds the mmap; when the last view goes, so does
    # the mapping, and the registry forgets the region.
    weakref.finalize(mm, _kvcoord._release_shared_region, region)
    return flat.view(shape)

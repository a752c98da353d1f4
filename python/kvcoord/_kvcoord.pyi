"""Type stubs of the compiled module kvcoord._kvcoord (see kvcoord/__init__.py)."""

from types import TracebackType
from typing import Any, Mapping, Protocol, Sequence

class _IpcEvent(Protocol):
    """What `Instance.store` takes as `ready_event` and `Instance.retrieve` as
    `done_event`: e.g. `torch.cuda.Event(interprocess=True)`."""

    def ipc_handle(self) -> bytes: ...

__version__: str

class Error(Exception):
    """Base of every kvcoord error."""

    retriable: bool
    kind: str

class NotRegistered(Error): ...
class LayoutMismatch(Error): ...
class InvalidArgument(Error): ...
class OutOfMemory(Error): ...
class Unavailable(Error): ...
class Timeout(Error): ...
class PermissionDenied(Error): ...
class ProtocolMismatch(Error): ...
class ShuttingDown(Error): ...
class Internal(Error): ...

class Transfer:
    """A store or retrieve in flight."""

    def done(self) -> bool: ...
    def wait(self, timeout: float | None = None) -> bool: ...
    def result(self) -> list[str]: ...

class Lookup:
    """A lookup in flight (Client.lookup_async)."""

    def done(self) -> bool: ...
    def wait(self, timeout: float | None = None) -> bool: ...
    def result(self) -> tuple[int, int | None]: ...

class Instance:
    """One registered TP rank."""

    engine: int
    rank: int
    world_size: int
    model: str
    num_layers: int
    num_blocks: int
    block_tokens: int
    def store(
        self, hashes: Sequence[bytes], block_ids: Sequence[int], ready_event: _IpcEvent | bytes | None = None
    ) -> Transfer:
        """Stores the chunks `hashes` from `block_ids`. For a CUDA KV cache,
        `ready_event` is a `torch.cuda.Event(interprocess=True)` recorded
        after writing the blocks (or its `ipc_handle()` bytes); the
        coordinator's copy waits for it. Without one the blocks must already
        be written (e.g. after `torch.cuda.synchronize()`)."""
    def retrieve(
        self,
        hashes: Sequence[bytes],
        block_ids: Sequence[int],
        lease: int | None = None,
        done_event: _IpcEvent | bytes | None = None,
    ) -> Transfer:
        """Retrieves the chunks `hashes` into `block_ids` (with a lookup's
        `lease`). For a CUDA KV cache, `done_event` (a
        `torch.cuda.Event(interprocess=True)` or its `ipc_handle()` bytes)
        makes the transfer end once the copy is queued, the event recorded
        after it: wait on it on the GPU
        (`torch.cuda.current_stream().wait_event(ev)`) before reading the blocks."""
    def unregister(self) -> None: ...
    def __enter__(self) -> Instance: ...
    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool: ...

class Client:
    """A connection to a coordinator."""

    def __init__(
        self, endpoint: str, *, token: str | None = None, timeout: float = 10.0, tls_ca: str | None = None
    ) -> None: ...
    def register(
        self,
        *,
        engine: int,
        rank: int,
        world_size: int,
        model: str,
        kv_caches: Mapping[str, Any] | Sequence[Any],
        block_tokens: int,
    ) -> Instance:
        """Registers one TP rank's per-layer KV tensors (in layer order): views
        of one `kvcoord.shared_tensor`, or CUDA tensors (PyTorch's caching
        allocator; exported by CUDA IPC, so the coordinator must run
        `--backend cuda`/auto on a GPU). Memory from expandable segments
        (`PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True`) or vLLM's cumem
        allocator cannot be exported: `InvalidArgument`."""
    def lookup(
        self, model: str, world_size: int, hashes: Sequence[bytes], lease: bool = True
    ) -> tuple[int, int | None]: ...
    def lookup_async(self, model: str, world_size: int, hashes: Sequence[bytes], lease: bool = True) -> Lookup: ...
    def release_lease(self, lease: int) -> None: ...
    def ping(self) -> int: ...
    @property
    def epoch(self) -> int | None: ...
    @property
    def reregistrations(self) -> int: ...
    @property
    def chunk_tokens(self) -> int | None: ...
    @property
    def endpoint(self) -> str: ...
    def close(self) -> None: ...
    def __enter__(self) -> Client: ...
    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> bool: ...

def chunk_hashes(token_ids: Sequence[int], chunk_tokens: int, salt: bytes = b"") -> list[bytes]: ...
def default_endpoint() -> str:
    """The endpoint `kvcoord serve` listens on without `--socket`."""

def _create_shared_region(nbytes: int) -> tuple[int, int]: ...
def _bind_shared_region(region_id: int, base: int) -> None: ...
def _release_shared_region(region_id: int) -> bool: ...
def _shared_region_count() -> int: ...
def _cli_main(argv: list[str]) -> int: ...

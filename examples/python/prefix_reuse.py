"""Prefix reuse through kvcoord with a real transformer, end to end.

A Hugging Face causal LM with a public model's shapes and random weights
(seeded, so every process builds the same model; nothing is downloaded)
keeps its KV cache in a paged buffer in vLLM's layout (per layer
``[num_blocks, kv_heads, block_tokens, 2 * head_dim]`` views of one buffer),
registered with a kvcoord coordinator.

- Process A prefills the prompt's whole 256-token chunks, copies the KV
  into its paged blocks and stores the chunks. Then, as the reference, it
  continues from its own in-memory KV over the rest of the prompt (at least
  the last token, as vLLM does on a whole-prompt hit) and saves the logits.
- Process B, a fresh process, looks the prompt up, retrieves the chunks into
  *other* blocks of its own buffer, builds the model's cache from them and
  computes only the rest of the prompt. It compares its logits with A's bit
  for bit, and times the first token with and without the reuse.

    python examples/python/prefix_reuse.py                       # CPU, Qwen2.5-0.5B shapes
    python examples/python/prefix_reuse.py --device cuda --shape llama3-8b --tokens 16384

It starts its own ``kvcoord serve`` (host backend on CPU, cuda backend on a
GPU) unless ``--endpoint`` names a running one. Prints tokens reused, TTFT
without and with reuse, and ``identical: yes`` only when B's logits are
bit-identical to A's; exits non-zero otherwise.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {
    # name: (config class, keyword arguments) -- public models' shapes.
    "qwen2.5-0.5b": (
        "Qwen2Config",
        dict(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            vocab_size=151936,
            max_position_embeddings=32768,
            rope_theta=1000000.0,
            rms_norm_eps=1e-6,
            tie_word_embeddings=True,
        ),
    ),
    "llama3-8b": (
        "LlamaConfig",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            max_position_embeddings=131072,
            rope_theta=500000.0,
            rms_norm_eps=1e-5,
        ),
    ),
}
BLOCK_TOKENS = 16


def build_model(shape: str, device: str, dtype):
    import torch
    import transformers

    cls_name, kw = SHAPES[shape]
    config = getattr(transformers, cls_name)(**kw, torch_dtype=dtype)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    return model.eval(), config


def prompt_tokens(n: int, vocab: int) -> list[int]:
    return [(i * 7_919 + 13) % (vocab - 1) + 1 for i in range(n)]


class PagedKv:
    """The KV cache in vLLM's layout: one buffer, physical order LBNHC, per
    layer a `[num_blocks, kv_heads, block_tokens, 2 * head_dim]` view."""

    def __init__(self, layers: int, blocks: int, kv_heads: int, head_dim: int, dtype, device: str) -> None:
        import torch

        import kvcoord

        shape = (layers, blocks, BLOCK_TOKENS, kv_heads, 2 * head_dim)
        if device == "cpu":
            self.buf = kvcoord.shared_tensor(shape, dtype)
        else:
            self.buf = torch.zeros(shape, dtype=dtype, device=device)
        self.layers = [self.buf[i].permute(0, 2, 1, 3) for i in range(layers)]
        self.head_dim = head_dim

    def write(self, layer: int, k, v, block_ids: list[int]) -> None:
        """Copies `k`, `v` (`[kv_heads, n, head_dim]`, n = len(block_ids) * 16) into `block_ids`."""
        import torch

        ids = torch.tensor(block_ids, device=k.device)
        kv = torch.cat([k, v], dim=-1)  # [H, n, 2D]
        h, n, c = kv.shape
        self.layers[layer].index_copy_(0, ids, kv.view(h, len(block_ids), BLOCK_TOKENS, c).transpose(0, 1))

    def read(self, layer: int, block_ids: list[int]):
        """(k, v) `[1, kv_heads, n, head_dim]` of `block_ids`."""
        import torch

        ids = torch.tensor(block_ids, device=self.buf.device)
        kv = self.layers[layer].index_select(0, ids)  # [b, H, N, 2D]
        b, h, n, c = kv.shape
        kv = kv.transpose(0, 1).reshape(1, h, b * n, c)
        return kv[..., : self.head_dim].contiguous(), kv[..., self.head_dim :].contiguous()


def kv_cache_from(paged: PagedKv, block_ids: list[int], tokens: int, layers: int):
    """A transformers DynamicCache holding the first `tokens` positions of `block_ids`."""
    from transformers import DynamicCache

    cache = DynamicCache()
    for layer in range(layers):
        k, v = paged.read(layer, block_ids[: -(-tokens // BLOCK_TOKENS)])
        cache.update(k[:, :, :tokens], v[:, :, :tokens], layer)
    return cache


def cache_layers(cache):
    """(keys, values) per layer of a transformers DynamicCache (4.5x and 5.x)."""
    if hasattr(cache, "layers"):
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))


def sync(device: str) -> None:
    if device != "cpu":
        import torch

        torch.cuda.synchronize()


def run_a(args) -> dict:
    import torch
    from transformers import DynamicCache

    import kvcoord

    dtype = getattr(torch, args.dtype)
    model, cfg = build_model(args.shape, args.device, dtype)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    tokens = prompt_tokens(args.tokens, cfg.vocab_size)
    with kvcoord.Client(args.endpoint, timeout=60) as client:
        chunk = client.chunk_tokens
        cached = len(tokens) // chunk * chunk  # whole chunks: what A prefills and stores
        prefix = min(cached, len(tokens) - 1)  # what a hit spares: all but at least one token
        if cached == 0:
            raise SystemExit(f"--tokens {args.tokens}: not one whole {chunk}-token chunk")
        blocks = args.tokens // BLOCK_TOKENS + 2 * (chunk // BLOCK_TOKENS)
        paged = PagedKv(cfg.num_hidden_layers, blocks, cfg.num_key_value_heads, head_dim, dtype, args.device)
        inst = client.register(
            engine=1, rank=0, world_size=1, model=args.model_key, kv_caches=paged.layers, block_tokens=BLOCK_TOKENS
        )
        ids = torch.tensor([tokens], device=args.device)
        with torch.inference_mode():
            cache = DynamicCache()
            model(ids[:, :cached], past_key_values=cache, use_cache=True)
            block_ids = list(range(cached // BLOCK_TOKENS))  # A's blocks: the first ones
            for layer, (k, v) in enumerate(cache_layers(cache)):
                paged.write(layer, k[0], v[0], block_ids)
            sync(args.device)
            hashes = kvcoord.chunk_hashes(tokens, chunk)[: cached // chunk]
            outcomes = inst.store(hashes, block_ids).result()
            assert all(o in ("stored", "already_present") for o in outcomes), outcomes
            # The reference: continue from A's own in-memory KV.
            if cached > prefix:
                cache.crop(prefix - cached)  # negative: drop that many positions (any transformers)
            logits = model(ids[:, prefix:], past_key_values=cache, use_cache=True).logits
            sync(args.device)
        torch.save(logits.cpu(), args.out / "a_logits.pt")
        inst.unregister()
    return {"prefix": prefix, "stored_chunks": len(hashes)}


def run_b(args) -> dict:
    import torch

    import kvcoord

    dtype = getattr(torch, args.dtype)
    model, cfg = build_model(args.shape, args.device, dtype)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    tokens = prompt_tokens(args.tokens, cfg.vocab_size)
    ids = torch.tensor([tokens], device=args.device)
    with torch.inference_mode():  # warm up kernels and allocator (both paths profit alike)
        model(ids[:, :32], use_cache=True)
        sync(args.device)
    with kvcoord.Client(args.endpoint, timeout=60) as client:
        chunk = client.chunk_tokens
        per_chunk = chunk // BLOCK_TOKENS
        blocks = args.tokens // BLOCK_TOKENS + 2 * per_chunk
        paged = PagedKv(cfg.num_hidden_layers, blocks, cfg.num_key_value_heads, head_dim, dtype, args.device)
        inst = client.register(
            engine=2, rank=0, world_size=1, model=args.model_key, kv_caches=paged.layers, block_tokens=BLOCK_TOKENS
        )
        hashes = kvcoord.chunk_hashes(tokens, chunk)
        with torch.inference_mode():
            reuse_ms, full_ms, load_ms = [], [], []
            for _ in range(args.repeat):
                # With reuse: look up, retrieve into B's own (other) blocks, compute the rest.
                t_start = time.perf_counter()
                hit, lease = client.lookup(args.model_key, 1, hashes)
                reused = min(hit * chunk, len(tokens) - 1)  # a whole-prompt hit leaves one token
                block_ids = list(range(blocks - hit * per_chunk, blocks))  # the last blocks: not A's
                # In `--parts` retrieves at once: the coordinator runs them on
                # parallel copy streams. With --gpu-wait each is awaited by the
                # model's stream through a "copy done" event, not by the CPU.
                cuts = [hit * i // args.parts for i in range(args.parts + 1)]
                parts = [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]
                done = [torch.cuda.Event(interprocess=True) if args.gpu_wait else None for _ in parts]
                transfers = [
                    inst.retrieve(hashes[a:b], block_ids[a * per_chunk : b * per_chunk], lease, ev)
                    for (a, b), ev in zip(parts, done)
                ]
                outcomes = [o for t in transfers for o in t.result()]
                for ev in done:
                    if ev is not None:
                        torch.cuda.current_stream().wait_event(ev)
                t_loaded = time.perf_counter()
                cache = kv_cache_from(paged, block_ids, reused, cfg.num_hidden_layers)
                out = model(ids[:, reused:], past_key_values=cache, use_cache=True, logits_to_keep=1)
                first = int(out.logits[0, -1].argmax())
                sync(args.device)
                reuse_ms.append((time.perf_counter() - t_start) * 1e3)
                load_ms.append((t_loaded - t_start) * 1e3)
                # Without reuse: the whole prompt.
                t0 = time.perf_counter()
                full = model(ids, use_cache=True, logits_to_keep=1).logits
                first_full = int(full[0, -1].argmax())
                sync(args.device)
                full_ms.append((time.perf_counter() - t0) * 1e3)
                del full, out, cache
            # Like with like: every position's logits over the rest of the
            # prompt, from a cache built from the retrieved blocks, as A did
            # from its own.
            cache = kv_cache_from(paged, block_ids, reused, cfg.num_hidden_layers)
            logits = model(ids[:, reused:], past_key_values=cache, use_cache=True).logits
        inst.unregister()
    a = torch.load(args.out / "a_logits.pt")
    mine = logits.cpu()
    identical = (
        reused == args.prefix
        and all(o == "retrieved" for o in outcomes)
        and a.shape == mine.shape
        and a.dtype == mine.dtype
        and torch.equal(a.contiguous().view(torch.uint8), mine.contiguous().view(torch.uint8))
    )
    return {
        "reused_tokens": reused,
        "prompt_tokens": len(tokens),
        "ttft_full_ms": statistics.median(full_ms),
        "ttft_reuse_ms": statistics.median(reuse_ms),
        "lookup_and_retrieve_ms": statistics.median(load_ms),
        "rounds": args.repeat,
        "first_token_same": first == first_full,
        "identical": bool(identical),
    }


def start_server(tmp: Path, device: str, kv_bytes: int) -> tuple[subprocess.Popen, str]:
    exe = shutil.which("kvcoord") or str(Path(sys.executable).parent / "kvcoord")
    sock = tmp / "kvcoord.sock"
    l1 = max(256 << 20, 2 * kv_bytes + (64 << 20))
    backend = "host" if device == "cpu" else "cuda"
    log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen(
        [exe, "serve", "--socket", str(sock), "--admin", "off", "--backend", backend, "--l1-size", f"{l1 >> 20}MiB"],
        stdout=log,
        stderr=log,
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(sock))
            return proc, f"unix://{sock}"
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"kvcoord serve did not start:\n{(tmp / 'server.log').read_text()}")
            time.sleep(0.02)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-0.5b")
    p.add_argument("--tokens", type=int, default=1100, help="prompt length")
    p.add_argument("--dtype", default=None, help="float32 on CPU, bfloat16 on a GPU by default")
    p.add_argument("--endpoint", default=None, help="a running coordinator (default: start one)")
    p.add_argument("--parts", type=int, default=None, help="retrieves in flight at once (1 on CPU, 4 on a GPU)")
    p.add_argument("--gpu-wait", action="store_true", help="await retrieves on the GPU (done events), not the CPU")
    p.add_argument("--repeat", type=int, default=None, help="timed rounds, median shown (1 on CPU, 5 on a GPU)")
    p.add_argument("--role", choices=["A", "B"], help=argparse.SUPPRESS)
    p.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--prefix", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
    args.repeat = args.repeat or (1 if args.device == "cpu" else 5)
    args.parts = max(1, args.parts or (1 if args.device == "cpu" else 4))
    if args.gpu_wait and args.device == "cpu":
        raise SystemExit("--gpu-wait needs --device cuda")
    args.model_key = f"prefix-reuse/{args.shape}/{args.dtype}/seed0"

    if args.role == "A":
        print(json.dumps(run_a(args)))
        return 0
    if args.role == "B":
        print(json.dumps(run_b(args)))
        return 0

    tmp = Path(tempfile.mkdtemp(prefix="prefix-reuse-"))
    server = None
    try:
        if args.endpoint is None:
            _, kw = SHAPES[args.shape]
            head_dim = kw["hidden_size"] // kw["num_attention_heads"]
            elem = 4 if args.dtype == "float32" else 2
            kv = kw["num_hidden_layers"] * args.tokens * kw["num_key_value_heads"] * 2 * head_dim * elem
            server, args.endpoint = start_server(tmp, args.device, kv)
        base = [sys.executable, __file__, "--device", args.device, "--shape", args.shape, "--tokens", str(args.tokens)]
        base += ["--dtype", args.dtype, "--endpoint", args.endpoint, "--out", str(tmp), "--repeat", str(args.repeat)]
        base += ["--parts", str(args.parts)] + (["--gpu-wait"] if args.gpu_wait else [])

        def child(role: str, *extra: str) -> dict:
            r = subprocess.run(base + ["--role", role, *extra], capture_output=True, text=True)
            if r.returncode != 0:
                sys.stderr.write(r.stderr)
                raise SystemExit(f"process {role} failed with exit code {r.returncode}")
            return json.loads(r.stdout.strip().splitlines()[-1])

        a = child("A")
        b = child("B", "--prefix", str(a["prefix"]))
    finally:
        if server is not None:
            server.kill()
            server.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"shape: {args.shape} ({args.dtype}) on {args.device}, prompt {b['prompt_tokens']} tokens")
    print(f"tokens reused: {b['reused_tokens']} of {b['prompt_tokens']} (A stored {a['stored_chunks']} chunks)")
    rounds = f" (median of {b['rounds']})" if b["rounds"] > 1 else ""
    print(f"TTFT without reuse: {b['ttft_full_ms']:.1f} ms{rounds}")
    print(
        f"TTFT with reuse:    {b['ttft_reuse_ms']:.1f} ms ({b['ttft_full_ms'] / b['ttft_reuse_ms']:.2f}x; "
        f"lookup + retrieve {b['lookup_and_retrieve_ms']:.1f} ms)"
    )
    print(f"first token equal with and without reuse: {'yes' if b['first_token_same'] else 'no'}")
    print(f"identical: {'yes' if b['identical'] else 'no'}")
    return 0 if b["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())

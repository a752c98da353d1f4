"""The Python client beside the Rust client, in the same run, against the
same coordinator (4 GiB of L1 taken at start, so no run pays for first
fills): store and retrieve GB/s of 256-token chunks of a
``[layers, 2, blocks, 16, 8, 128]`` bf16 host KV cache (8 chunks of 32 MiB
per request), and the p50 of a 64-chunk lookup by model, one at a time.

    python python/benches/client_vs_rust.py --harness target/release/kvcoord-harness

Needs the package installed (``pip install ./python``: the ``kvcoord``
command serves) and the harness binary (``cargo build --release -p
kvcoord-harness``) for the Rust side. Prints one table; exits non-zero if
any retrieved byte was wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

import torch

import kvcoord

LAYERS, BLOCKS, BLOCK_TOKENS, HEADS, HEAD_DIM = 32, 512, 16, 8, 128


def start_server(sock: str, log) -> subprocess.Popen:
    exe = shutil.which("kvcoord") or sys.exit("the kvcoord command is not installed (pip install ./python)")
    proc = subprocess.Popen(
        [exe, "serve", "--socket", sock, "--admin", "off", "--l1-size", "4GiB", "--l1-prealloc"], stdout=log, stderr=log
    )
    deadline = time.monotonic() + 120  # --l1-prealloc faults in all of L1 first
    while time.monotonic() < deadline:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(sock)
            return proc
        except OSError:
            time.sleep(0.01)
    proc.kill()
    sys.exit("kvcoord serve did not start listening")


def python_side(endpoint: str, engine: int, chunks: int, rounds: int, lookups: int) -> dict:
    model = "client-bench-py"
    per_chunk = 256 // BLOCK_TOKENS
    rng = random.Random(engine)
    with kvcoord.Client(endpoint, timeout=30.0) as client:
        kv = kvcoord.shared_tensor((LAYERS, 2, BLOCKS, BLOCK_TOKENS, HEADS, HEAD_DIM), torch.bfloat16)
        inst = client.register(
            engine=engine, rank=0, world_size=1, model=model,
            kv_caches=[kv[i] for i in range(LAYERS)], block_tokens=BLOCK_TOKENS,
        )
        raw = kv.view(torch.uint8)
        store_s = retrieve_s = 0.0
        corrupt = 0
        for r in range(rounds + 1):
            tokens = [rng.randrange(128_000) for _ in range(chunks * 256)]
            hashes = kvcoord.chunk_hashes(tokens, 256, salt=model.encode())
            picked = rng.sample(range(BLOCKS), 2 * chunks * per_chunk)
            src, dst = picked[: chunks * per_chunk], picked[chunks * per_chunk :]
            # Index assignment writes through to the shared memory (reading
            # raw[:, :, list] would make a copy).
            raw[:, :, src] = torch.randint(0, 256, (LAYERS, 2, len(src), BLOCK_TOKENS * HEADS * HEAD_DIM * 2),
                                           dtype=torch.uint8).view(LAYERS, 2, len(src), BLOCK_TOKENS, HEADS, HEAD_DIM * 2)
            raw[:, :, dst] = 0xA5
            t = time.perf_counter()
            out = inst.store(hashes, src).result()
            took = time.perf_counter() - t
            assert out == ["stored"] * chunks, out
            t = time.perf_counter()
            out = inst.retrieve(hashes, dst).result()
            rtook = time.perf_counter() - t
            assert out == ["retrieved"] * chunks, out
            corrupt += int(not torch.equal(raw[:, :, src], raw[:, :, dst]))
            if r > 0:
                store_s += took
                retrieve_s += rtook
        probe = kvcoord.chunk_hashes(list(range(64 * 256)), 256, salt=b"probe")
        lat = []
        for _ in range(lookups):
            t = time.perf_counter()
            client.lookup(model, 1, probe, lease=False)
            lat.append(time.perf_counter() - t)
        lat.sort()
        inst.unregister()
    total = rounds * chunks * LAYERS * 2 * per_chunk * BLOCK_TOKENS * HEADS * HEAD_DIM * 2
    return {
        "client": "python",
        "store_gbs": total / store_s / 1e9,
        "retrieve_gbs": total / retrieve_s / 1e9,
        "lookup64_p50_us": lat[len(lat) // 2] * 1e6,
        "corrupt_chunks": corrupt,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--harness", default="target/release/kvcoord-harness")
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--lookups", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=2, help="alternate Rust and Python this many times; best of each")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="kvcoord-clientbench-")
    sock = os.path.join(tmp, "kv.sock")
    with open(os.path.join(tmp, "server.log"), "wb") as log:
        server = start_server(sock, log)
        try:
            rust, py = [], []
            for i in range(args.repeat):
                out = subprocess.run(
                    [args.harness, "client-bench", "--socket", sock, "--engine", str(7100 + i), "--chunks", str(args.chunks),
                     "--rounds", str(args.rounds), "--lookups", str(args.lookups)],
                    capture_output=True, text=True,
                )
                if out.returncode != 0:
                    sys.exit(f"kvcoord-harness client-bench failed: {out.stderr.strip()}")
                rust.append(json.loads(out.stdout.strip().splitlines()[-1]))
                py.append(python_side(f"unix://{sock}", 7200 + i, args.chunks, args.rounds, args.lookups))
        finally:
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=10)
    best = lambda runs, k, f: f(r[k] for r in runs)  # noqa: E731
    print(f"client benchmark: {args.chunks} chunks of 32 MiB per request, {args.rounds} rounds, "
          f"best of {args.repeat} alternating runs, one coordinator")
    print(f"{'metric':<28}{'python':>12}{'rust':>12}{'python/rust':>14}")
    for k, name, f in [("store_gbs", "store GB/s", max), ("retrieve_gbs", "retrieve GB/s", max),
                       ("lookup64_p50_us", "lookup 64 chunks p50 (us)", min)]:
        p, r = best(py, k, f), best(rust, k, f)
        print(f"{name:<28}{p:>12.2f}{r:>12.2f}{p / r:>14.2f}")
    corrupt = sum(r["corrupt_chunks"] for r in rust + py)
    print(f"corrupt chunks: {corrupt}")
    return 1 if corrupt else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env bash
# The CUDA backend's check on a GPU machine, with the release binary already
# built (`cargo build --release`; copy target/release/kvcoord-harness over if the GPU
# machine has no Rust toolchain). Each run prints its own table: contiguous
# pinned DMA measured in the same run beside kvcoord's end-to-end store and
# retrieve, with byte-for-byte verification and a SIGKILL + restart of the
# coordinator. Exits non-zero if any correctness step fails.
#
#   scripts/gpu-check.sh [path/to/kvcoord-harness]
set -euo pipefail
BIN=${1:-target/release/kvcoord-harness}
if ! "$BIN" gpu-check --help >/dev/null; then
  echo "gpu-check: $BIN is not a kvcoord-harness binary" >&2
  exit 2
fi
GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
if [ "${GPUS:-0}" -eq 0 ]; then
  echo "skipped: no CUDA driver"
  exit 0
fi
echo "== one GPU, 2 TP worker processes (128 chunks of 32 MiB each: 8 GiB moved each way)"
"$BIN" gpu-check --procs 2 --chunks 128
echo "== one GPU, 4 TP worker processes (64 chunks each: 8 GiB moved each way)"
"$BIN" gpu-check --procs 4 --chunks 64
if [ "$GPUS" -ge 2 ]; then
  for n in 2 4 8; do
    [ "$n" -le "$GPUS" ] || break
    echo "== $n GPUs, one TP worker process per GPU"
    "$BIN" gpu-check --procs "$n" --chunks 64 --spread
  done
fi

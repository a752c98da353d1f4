#!/usr/bin/env bash
# The tests (the README's second command): every Rust test of the workspace,
# then the Python package's tests (scripts/test-python.sh) against a real
# coordinator started by the pip-installed `kvcoord` command.
set -euo pipefail
cd "$(dirname "$0")/.."
echo "== cargo test --workspace --release"
cargo test --workspace --release
echo "== Python package tests"
scripts/test-python.sh

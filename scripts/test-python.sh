#!/usr/bin/env bash
# The Python package's tests. Makes a venv ($VENV, default .venv; python3-venv
# is installed with apt-get where it is missing and we are root), installs
# maturin, pytest, pytest-timeout and vllm 0.33 (with its torch) from PyPI, then the package the
# way a user does (`pip install ./python`: builds the extension and the
# `kvcoord` command with maturin), and runs pytest. Fails on any failure, and
# when pytest collects no test. The coordinator's backend is
# $KVCOORD_TEST_BACKEND (auto: cuda where torch sees a GPU, else host); the
# CUDA tensor tests (python/tests/test_cuda.py) run only on cuda and are
# otherwise skipped with "skipped: no CUDA driver".
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c 'import venv, ensurepip' 2>/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "== apt-get install python3-venv"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
    else
        echo "python3 cannot make a venv: install python3-venv" >&2
        exit 1
    fi
fi
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"

t0=$(date +%s)
# vLLM 0.33 from PyPI for the connector's tests (python/tests/test_vllm.py),
# with the torch it pins: the CUDA build (~9 GB with its nvidia-* wheels, about
# 3 minutes); the tests only use its CPU side. numpy only quiets torch.
"$PY" -m pip install -q --disable-pip-version-check maturin pytest pytest-timeout numpy "vllm==0.33.0"
t1=$(date +%s)
"$PY" -m pip install -q --disable-pip-version-check --force-reinstall --no-deps ./python
t2=$(date +%s)
echo "== Python setup: test dependencies $((t1 - t0))s, pip install ./python $((t2 - t1))s"

set +e
"$PY" -m pytest -p no:cacheprovider -ra python/tests
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    echo "pytest collected no test" >&2
    exit 1
fi
[ "$rc" -eq 0 ] || exit "$rc"

# The end-to-end example on CPU: a real transformer's KV stored by one
# process, reused bit-exact by another. It exits non-zero unless identical.
echo "== examples/python/prefix_reuse.py"
"$PY" examples/python/prefix_reuse.py

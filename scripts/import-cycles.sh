#!/usr/bin/env bash
# Fails if any two files of a crate in this workspace import each other
# (directly or around a longer cycle). `--edges` also lists every edge.
# The work is done by import-cycles.py (python3, standard library only).
set -euo pipefail
exec python3 "$(dirname "$0")/import-cycles.py" "$@"

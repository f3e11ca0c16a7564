#!/usr/bin/env bash
# Runs the benchmark suite (bench/run.py) in the test environment; arguments go to it.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
exec "$VENV/bin/python" bench/run.py "$@"

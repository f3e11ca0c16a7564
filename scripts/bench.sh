#!/usr/bin/env bash
# Runs the benchmark suite (bench/run.py) in the test environment; arguments go to it.
set -euo pipefail
cd "$(dirname "$0")/.."
COMFYUI_PATH="$(scripts/setup.sh | tail -n 1)" exec .venv/bin/python bench/run.py "$@"

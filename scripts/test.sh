#!/usr/bin/env bash
# Runs the whole test suite against a real ComfyUI (see scripts/comfyui_host.py).
set -euo pipefail
cd "$(dirname "$0")/.."
COMFYUI_PATH="$(scripts/setup.sh | tail -n 1)" exec .venv/bin/python -m pytest tests "$@"

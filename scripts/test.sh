#!/usr/bin/env bash
# Runs the whole test suite against a real ComfyUI (see scripts/comfyui_host.py: COMFYUI_PATH
# selects one, else the pinned 0.3.75).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
exec "$VENV/bin/python" -m pytest tests "$@"

#!/usr/bin/env bash
# Starts ComfyUI with this pack loaded on 127.0.0.1:8188 (CPU when there is no GPU).
# Extra arguments go to ComfyUI's main.py.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
PYTHON_BIN="$VENV/bin/python"
CONFIG="$("$PYTHON_BIN" scripts/comfyui_host.py link)"
ARGS=(--listen 127.0.0.1 --port "${PORT:-8188}")
[ -n "$CONFIG" ] && ARGS+=(--extra-model-paths-config "$CONFIG")
"$PYTHON_BIN" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || ARGS+=(--cpu)
cd "$COMFYUI_PATH"
exec "$PYTHON_BIN" main.py "${ARGS[@]}" "$@"

#!/usr/bin/env bash
# Starts ComfyUI with this pack loaded on 127.0.0.1:8188 (CPU when there is no GPU).
# Extra arguments go to ComfyUI's main.py.
set -euo pipefail
cd "$(dirname "$0")/.."
COMFY="$(scripts/setup.sh --server | tail -n 1)"
CONFIG="$(.venv/bin/python scripts/comfyui_host.py link)"
ARGS=(--listen 127.0.0.1 --port "${PORT:-8188}")
[ -n "$CONFIG" ] && ARGS+=(--extra-model-paths-config "$CONFIG")
.venv/bin/python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || ARGS+=(--cpu)
cd "$COMFY"
exec "$OLDPWD/.venv/bin/python" main.py "${ARGS[@]}" "$@"

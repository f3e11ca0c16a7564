#!/usr/bin/env bash
# Sets up the virtual environment of the ComfyUI in use (see scripts/comfyui_host.py: .venv for
# the pinned one, .venv-comfyui-<version> for another) with torch, entmax, the test tools and
# what ComfyUI needs to run, its server and web UI packages included (the test suite starts the
# real server: tests/test_server.py), and lays down the pinned ComfyUI when no other is found.
# Idempotent: pip runs only when the requirement list changed since the last install.
# Usage: scripts/setup.sh   (prints the ComfyUI folder last; --server, which older callers
# pass, changes nothing: every set-up is the server's)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
COMFY="$("$PYTHON" scripts/comfyui_host.py path)"
export COMFYUI_PATH="$COMFY"
VENV="$("$PYTHON" scripts/comfyui_host.py venv)"
# ComfyUI imports torchvision (and newer ComfyUI torchaudio), so they come as a matching set;
# set PLADIS_TORCH to choose another (space-separated requirement specifiers).
TORCH="${PLADIS_TORCH:-$("$PYTHON" scripts/comfyui_host.py torch)}"

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
{
    printf "%s\n" $TORCH
    cat requirements.txt scripts/requirements-test.txt
    "$PYTHON" scripts/comfyui_host.py requirements --server
} > "$VENV/pladis-requirements.txt"
if ! cmp -s "$VENV/pladis-requirements.txt" "$VENV/pladis-installed.txt"; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$VENV/pladis-requirements.txt"
    cp "$VENV/pladis-requirements.txt" "$VENV/pladis-installed.txt"
fi
echo "$COMFY"

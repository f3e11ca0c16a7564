#!/usr/bin/env bash
# Sets up .venv with torch, entmax, the test tools and what ComfyUI needs to run, its server
# and web UI packages included (the test suite starts the real server: tests/test_server.py),
# and the pinned ComfyUI when no other is found (see scripts/comfyui_host.py). Idempotent: pip
# runs only when the requirement list changed since the last install.
# Usage: scripts/setup.sh   (prints the ComfyUI folder last; --server, which older callers
# pass, changes nothing: every set-up is the server's)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
# ComfyUI imports torchvision, so torch and torchvision come as a matching pair; set
# PLADIS_TORCH to choose another pair (space-separated requirement specifiers).
TORCH="${PLADIS_TORCH:-torch==2.14.1 torchvision==0.29.1}"

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
COMFY="$(.venv/bin/python scripts/comfyui_host.py path)"
{
    printf "%s\n" $TORCH
    cat requirements.txt scripts/requirements-test.txt
    .venv/bin/python scripts/comfyui_host.py requirements --server
} > .venv/pladis-requirements.txt
if ! cmp -s .venv/pladis-requirements.txt .venv/pladis-installed.txt; then
    .venv/bin/python -m pip install -q --disable-pip-version-check -r .venv/pladis-requirements.txt
    cp .venv/pladis-requirements.txt .venv/pladis-installed.txt
fi
echo "$COMFY"

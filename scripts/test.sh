#!/usr/bin/env bash
# Runs the whole test suite against a real ComfyUI (see scripts/comfyui_host.py: COMFYUI_PATH
# selects one, else the pinned 0.3.75). The web UI tests drive the system's Chromium (CHROMIUM,
# default /usr/bin/chromium): installed with apt-get when missing and this runs as root.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/env.sh
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
if [ ! -x "$CHROMIUM" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
    else
        echo "No Chromium at $CHROMIUM: install Debian's chromium package (or set CHROMIUM) for the web UI tests" >&2
        exit 1
    fi
fi
exec "$VENV/bin/python" -m pytest tests "$@"

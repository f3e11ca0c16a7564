"""Test setup: the pack's core on the path, and the real ComfyUI host for host tests.

The host is found as scripts/comfyui_host.py says (COMFYUI_PATH, the ComfyUI this pack
sits in, or the pinned 0.3.75 tree). No host is a failure, never a skip.
"""
import sys
from pathlib import Path

import pytest

PACK = Path(__file__).resolve().parent.parent
# Appended, not prepended: ComfyUI's own top-level 'nodes' module must win over our nodes/ folder.
sys.path.append(str(PACK))

from host import loaded  # noqa: E402


@pytest.fixture(scope="session")
def host():
    try:
        return loaded()
    except RuntimeError as missing:
        pytest.fail(str(missing))


@pytest.fixture(scope="session")
def dit_models(host):
    """get(kind): the small model of a kind (tests/host_dits.py), built once per session."""
    from host_dits import build_dit

    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = build_dit(kind, seed=3)
        return cache[kind]

    return get

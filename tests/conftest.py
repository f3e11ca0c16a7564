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

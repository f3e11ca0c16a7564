"""The PLADIS attention weights of float32 logits, on the fastest path this machine has.

    W = softmax(z) + scale * (entmax_alpha(z) - softmax(z))     (residual: without softmax(z))

The fused function of fused.py is compiled with torch.compile (C++ on the CPU, Triton on
CUDA) the first time a device type needs it. If compiling or running it fails, or
PLADIS_COMPILE=0, the exact eager functions below serve instead.
"""
import inspect
import logging
import os

import torch

from .entmax import entmax, softmax
from .fused import family_of, fused_pladis_weights, newton_steps

_compiled = {}  # device type -> compiled fused function, or None where it failed
# One graph per (family, steps, residual) and shape kind: more than dynamo's default of 8,
# after which it would run the fused code uncompiled. Older torch has no per-call limit.
_RECOMPILE_LIMIT = {"recompile_limit": 48} if "recompile_limit" in inspect.signature(torch.compile).parameters else {}


def eager_pladis_weights(z, scale, alpha, residual=False):
    """The weights by the exact loop of entmax.py, op by op."""
    if scale == 0 or alpha == 1.0:
        return torch.zeros_like(z) if residual else softmax(z)
    dense = softmax(z)
    return scale * (entmax(z, alpha) - dense) if residual else torch.lerp(dense, entmax(z, alpha), scale)


def pladis_weights(z, scale, alpha, residual=False):
    """The weights of float32 logits z over the last dimension (no entmax work at scale 0)."""
    if scale == 0 or alpha == 1.0:
        return eager_pladis_weights(z, scale, alpha, residual)
    fused = _fused_for(z.device)
    if fused is not None:
        try:
            as_tensor = lambda value: torch.tensor(value, dtype=z.dtype, device=z.device)  # noqa: E731
            weights, unsettled = fused(z, as_tensor(scale), as_tensor(alpha), family_of(alpha), newton_steps(alpha), residual)
        except Exception as error:  # a compiler missing or failing on this machine
            _disable(z.device, error)
        else:
            if bool(unsettled.any()):  # rare rows that need more Newton steps
                weights[unsettled] = eager_pladis_weights(z[unsettled], scale, alpha, residual)
            return weights
    return eager_pladis_weights(z, scale, alpha, residual)


def acceleration_enabled():
    return os.environ.get("PLADIS_COMPILE", "1") != "0"


def _fused_for(device):
    if not acceleration_enabled():
        return None
    if device.type not in _compiled:
        logging.info(f"PLADIS: compiling the fused entmax kernel for {device.type} (the first use takes a while)")
        _compiled[device.type] = torch.compile(fused_pladis_weights, dynamic=True, **_RECOMPILE_LIMIT)
    return _compiled[device.type]


def _disable(device, error):
    logging.warning(f"PLADIS: the compiled kernel failed on {device.type}, using plain torch instead: {error}")
    _compiled[device.type] = None

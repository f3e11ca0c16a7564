"""The PLADIS weights of float32 logits, on the fastest path this machine has.

    W = softmax(z) + scale * (entmax_alpha(z) - softmax(z))     (residual: without softmax(z))

On the CPU they run in the row kernel of cpu_rows.cpp. Elsewhere (CUDA, or a CPU where that
kernel could not be built), the fused function of fused.py is compiled with torch.compile
(Triton on CUDA, C++ on the CPU) the first time a device type needs it. With PLADIS_COMPILE=0, or where compiling failed (no compiler on this machine), the
same function runs op by op in plain torch. A one-off error while the compiled code runs
costs only that call its speed, and an out-of-memory error goes to the host as it is.

No path asks the host about the data. The rows that the fixed Newton steps of fused.py
leave unsettled (the row kernel leaves none) are redone exactly by the loop of entmax.py at
once outside a model evaluation; inside one (settled_after), they are only counted on the
device, and read once when the evaluation ends, so that a GPU never waits for Python within it.
"""
import contextlib
import contextvars
import functools
import inspect
import logging
import os
import time

import torch

from .cpu_rows import cpu_kernel_built, cpu_pladis_weights
from .entmax import entmax, softmax
from .fused import family_of, fused_pladis_weights, newton_steps
from .logs import warn_once

_compiled = {}  # device type -> compiled fused function, or None where compiling failed
# One graph per (family, steps, residual) and shape kind: more than dynamo's default of 8,
# after which it would run the fused code uncompiled, slower and with more memory.
_RECOMPILE_LIMIT = 48


def eager_pladis_weights(z, scale, alpha, residual=False):
    """The weights by the exact loop of entmax.py, op by op."""
    if scale == 0 or alpha == 1.0:
        return torch.zeros_like(z) if residual else softmax(z)
    dense = softmax(z)
    return scale * (entmax(z, alpha) - dense) if residual else torch.lerp(dense, entmax(z, alpha), scale)


def pladis_weights(z, scale, alpha, residual=False, row_lse=None):
    """The weights of float32 logits z over the last dimension (no entmax work at scale 0).

    row_lse: for joint attention, where z holds a row's text keys alone, the row's log-sum-exp
    over every key (float32, (..., 1)); each row is then scaled by its dense mass on z's keys.
    """
    if scale == 0 or alpha == 1.0:
        weights = eager_pladis_weights(z, scale, alpha, residual)
    else:
        weights, unsettled = _fused_weights(z, scale, alpha, residual, row_lse)
        if unsettled is None:
            return weights
        left_over = _LEFT_OVER.get(None)
        if left_over is not None:
            left_over.add(unsettled)
        elif bool(unsettled.any()):  # outside a model evaluation: exact at once
            weights[unsettled] = eager_pladis_weights(z[unsettled], scale, alpha, residual)
    return weights if row_lse is None else weights.mul_(dense_mass(z, row_lse))  # a new tensor: in place saves a copy


def dense_mass(z, row_lse):
    """exp(logsumexp(z) - row_lse) per row; 0 for a row that sees none of z's keys (-inf - -inf would be nan)."""
    log_mass = torch.logsumexp(z, -1, keepdim=True) - row_lse
    return torch.where(torch.isfinite(log_mass), log_mass.exp(), 0.0)


def _fused_weights(z, scale, alpha, residual, row_lse):
    """(weights, unsettled rows) from fused_pladis_weights, compiled where that works; or from the
    CPU's row kernel (weights scaled by the mass of row_lse already, None: it settles every row)."""
    family = family_of(alpha)
    if acceleration_enabled():
        found = cpu_pladis_weights(z, scale, alpha, family, residual, row_lse)  # None off the CPU
        if found is not None:
            return found, None
    fused = _fused_for(z.device)
    if fused is not None:
        try:
            graphs, started = _graphs_compiled(), time.perf_counter()
            found = fused(z, _scalar(scale, z.dtype, z.device), _scalar(alpha, z.dtype, z.device), family, newton_steps(alpha), residual)
            if _graphs_compiled() != graphs:  # this call compiled (or loaded from torch's cache) a graph
                logging.info(f"PLADIS: compiled the fused entmax kernel for {z.device.type} (alpha {alpha}"
                             f"{', joint attention' if residual else ''}) in {time.perf_counter() - started:.1f} s")
            return found
        except torch.OutOfMemoryError:
            raise  # plain torch would need more memory still; the host reports it
        except Exception as error:
            if _is_compile_failure(error):
                _disable(z.device, error)
            else:
                warn_once(f"PLADIS: the compiled kernel failed once on {z.device.type}; that call used plain torch, "
                           f"later ones use the compiled kernel again: {error}")
    # Op by op with Python numbers: as 0-d tensors, each scalar expression would be an op more.
    return fused_pladis_weights(z, scale, alpha, family, newton_steps(alpha), residual)


@functools.lru_cache(maxsize=64)
def _scalar(value, dtype, device):
    """A 0-d tensor of value on device, made once: copying a new one from the host every call would wait for the GPU."""
    return torch.tensor(value, dtype=dtype, device=device)


class LeftOver:
    """The rows left unsettled in one model evaluation, counted on each device."""

    def __init__(self):
        self.counts = {}

    def add(self, unsettled):
        count = unsettled.sum()
        self.counts[count.device] = self.counts[count.device] + count if count.device in self.counts else count

    def total(self):
        return sum(map(int, self.counts.values()))


_LEFT_OVER = contextvars.ContextVar("pladis_left_over")


@contextlib.contextmanager
def settled_after():
    """Within: the kernel's unsettled rows are counted, not redone (no host sync per call);
    at the end, the count is read once, and a warning (once per process) says if any were."""
    left_over = LeftOver()
    token = _LEFT_OVER.set(left_over)
    try:
        yield
    finally:
        _LEFT_OVER.reset(token)
    rows = left_over.total()
    if rows:
        warn_once(f"PLADIS: {rows} rows of attention weights in a model evaluation needed more Newton steps than the fused "
                  f"kernel runs, so their entmax maps are approximate (rows of very many, nearly equal logits); "
                  f"please report the model and settings")


def row_kernel_serves():
    """Whether the CPU's weights come from the row kernel (built here on first use), not from fused.py."""
    return acceleration_enabled() and cpu_kernel_built()


def acceleration_enabled():
    return os.environ.get("PLADIS_COMPILE", "1") != "0"


def _fused_for(device):
    if not acceleration_enabled():
        return None
    if device.type not in _compiled:
        logging.info(f"PLADIS: compiling the fused entmax kernel for {device.type} (the first use takes a while)")
        _compiled[device.type] = _compile(fused_pladis_weights)
    return _compiled[device.type]


def _graphs_compiled():
    """How many graphs dynamo has compiled in this process (a cache hit counts too)."""
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _compile(function):
    if "recompile_limit" in inspect.signature(torch.compile).parameters:
        return torch.compile(function, dynamic=True, recompile_limit=_RECOMPILE_LIMIT)
    # Older torch (2.9) has only the global limit: raise it while our function runs.
    return torch._dynamo.config.patch(recompile_limit=_RECOMPILE_LIMIT)(torch.compile(function, dynamic=True))


def _is_compile_failure(error):
    """Errors of torch.compile itself (tracing, lowering, a missing C++ compiler or Triton),
    as opposed to errors of the compiled code while it runs."""
    return isinstance(error, (torch._dynamo.exc.TorchDynamoException, torch._inductor.exc.CppCompileError, ImportError))


def _disable(device, error):
    logging.warning(f"PLADIS: compiling the fused entmax kernel failed on {device.type}; plain torch serves "
                    f"for the rest of this process (same results, slower): {error}")
    _compiled[device.type] = None


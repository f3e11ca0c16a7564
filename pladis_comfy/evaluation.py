"""What the PLADIS patches of one model evaluation share, decided once for the evaluation.

Whatever needs a device tensor's value on the host (which samples are in the step range,
how many rows the kernel left unsettled) is read here once per evaluation, never once per
attention call: a GPU then runs the evaluation's attention calls without waiting for Python.
The evaluation wrappers (UnetEvaluation, DitEvaluation) open one with `evaluating`.
"""
import contextlib
import contextvars

import torch

from ..pladis_core.weights import settled_after
from .summary import evaluated

_CURRENT = contextvars.ContextVar("pladis_model_evaluation")


class StepRange:
    """The samples of each batch in a PLADIS node's step range, at one evaluation's sigmas."""

    def __init__(self, sigmas):
        self.sigmas = sigmas
        self.acted = False  # PLADIS changed an attention call (for the run's summary)
        self._found = {}
        self._sigma = None

    def samples(self, settings, batch, device):
        """None for every sample; else the indices of the samples in range, a long tensor on device (maybe empty)."""
        key = (settings, batch, device)
        if key not in self._found:
            inside = settings.samples_in_range(self.sigmas, batch)
            self._found[key] = None if inside is None else torch.tensor(inside, dtype=torch.long, device=device)
        return self._found[key]

    def sigma(self):
        """The first sample's sigma, as a float."""
        if self._sigma is None:
            self._sigma = float(self.sigmas.flatten()[0])
        return self._sigma


@contextlib.contextmanager
def evaluating(sigmas):
    """One model evaluation at sigmas: step ranges decided once, the kernel's unsettled rows
    counted and read at the end, and the run's summary told whether PLADIS acted."""
    step_range = StepRange(sigmas)
    token = _CURRENT.set(step_range)
    try:
        with settled_after():
            yield step_range
    finally:
        _CURRENT.reset(token)
        evaluated(sigmas, step_range.acted)


def samples_in_range(settings, sigmas, batch, device):
    """StepRange.samples at sigmas (see _step_range)."""
    return _step_range(sigmas).samples(settings, batch, device)


def current_sigma(sigmas):
    """StepRange.sigma at sigmas (see _step_range)."""
    return _step_range(sigmas).sigma()


def _step_range(sigmas):
    """The evaluation in progress where sigmas are its own; else a StepRange for this call alone
    (a model called outside a sampling run, or inside another model's evaluation)."""
    step_range = _CURRENT.get(None)
    return step_range if step_range is not None and step_range.sigmas is sigmas else StepRange(sigmas)


def acted():
    """Tell the evaluation in progress that PLADIS changed an attention call."""
    step_range = _CURRENT.get(None)
    if step_range is not None:
        step_range.acted = True

"""No host synchronisation per attention call: on a GPU, each read of a device tensor's value on
the host (bool(), .item(), .tolist(), nonzero(), boolean indexing) and each tensor copied from
host data waits for every queued kernel. The pack reads what it needs once per model evaluation.

Counted on the CPU, where these calls cost nothing, by a torch function mode that records such
calls made from the pack's own code, so that a regression fails without a GPU. Plain torch
(PLADIS_COMPILE=0): the compiled kernel is the same function, called from the same code.
"""
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from host import loaded
from host_dits import build_dit, sample_dit
from host_models import build_unet, sample

PACK = Path(__file__).resolve().parent.parent
PACK_CODE = tuple(str(PACK / folder) for folder in ("pladis_core", "pladis_comfy", "nodes"))
# What reads a device tensor on the host, or copies host data to the device.
READS = {
    torch.Tensor.__bool__, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__float__, torch.Tensor.__int__,
    torch.Tensor.__index__, torch.Tensor.nonzero, torch.nonzero, torch.Tensor.masked_select, torch.masked_select,
    torch.tensor, torch.as_tensor, torch.Tensor.cpu, torch.Tensor.numpy,
}
# The reads each model evaluation makes once: the samples in the step range, the first sample's
# sigma (the IPAdapter protocol's ranges), the kernel's unsettled rows, and the run summary's
# sigma; the summary's steps once per run; a kernel argument once per value (cached).
PER_EVALUATION = {"samples_in_range", "samples", "sigma", "total", "evaluated", "step_of", "_scalar"}


class HostReads(TorchFunctionMode):
    """Records (function, line) of the pack's code for each host read made from it."""

    def __init__(self):
        super().__init__()
        self.seen = Counter()
        self._files = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in READS or (func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and _boolean_index(args[1])):
            place = self._pack_frame()
            if place is not None:
                self.seen[place] += 1
        return func(*args, **(kwargs or {}))

    def _pack_frame(self):
        """The pack's frame that made this call, or None when the first caller outside torch is not the pack's."""
        frame = sys._getframe(2)
        while frame is not None:
            name = frame.f_code.co_filename
            if name not in self._files:
                self._files[name] = str(Path(name).resolve())
            path = self._files[name]
            if "/torch/" not in path:
                return (frame.f_code.co_name, Path(path).name, frame.f_lineno) if path.startswith(PACK_CODE) else None
            frame = frame.f_back
        return None


def _boolean_index(index):
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(part, torch.Tensor) and part.dtype in (torch.bool, torch.uint8) for part in parts)


@pytest.fixture
def plain_torch(monkeypatch):
    monkeypatch.setenv("PLADIS_COMPILE", "0")


def evaluations(monkeypatch):
    """A list that gets one entry per model evaluation that PLADIS's wrappers open."""
    evaluation = loaded().pack_module("pladis_comfy.evaluation")
    opened, step_range = [], evaluation.StepRange

    class Counted(step_range):
        def __init__(self, sigmas):
            super().__init__(sigmas)
            opened.append(self)

    monkeypatch.setattr(evaluation, "StepRange", Counted)
    return opened


def run(sampling):
    reads = HostReads()
    with reads:
        sampling()
    return reads.seen


CASES = {
    # UNet cross-attention (attn2 patches), with an IPAdapter-style callback on one layer.
    "sd15": ("ApplyPLADIS", lambda m: sample(m, "sd15", steps=3, size=64)),
    # Joint attention (the attention override), and cross-attention through a forward patch.
    "flux": ("PladisFluxPatch", lambda m: sample_dit(m, "flux", steps=3)),
    "pixart": ("ApplyPLADIS", lambda m: sample_dit(m, "pixart", steps=3)),
}


@pytest.mark.parametrize("kind", CASES)
@pytest.mark.parametrize("step_range", [(0.0, 1.0), (0.2, 0.8)])
def test_reads_on_the_host_are_once_per_model_evaluation_not_per_attention_call(host, plain_torch, monkeypatch, kind, step_range):
    node, sampling = CASES[kind]
    model = build_unet(kind) if kind == "sd15" else build_dit(kind)
    patched = host.node(node).execute(model, start_percent=step_range[0], end_percent=step_range[1]).result[0]
    if kind == "sd15":  # the IPAdapter protocol: a callback added to the patch on a layer
        patch = next(iter(patched.model_options["transformer_options"]["patches_replace"]["attn2"].values()))
        patch.add(lambda out, q, k, v, extra_options, **kwargs: torch.zeros_like(out), sigma_start=999.0, sigma_end=0.0)
    opened = evaluations(monkeypatch)
    seen = run(lambda: sampling(patched))
    assert opened  # the wrappers opened evaluations, and PLADIS acted in them
    assert any(step_range.acted for step_range in opened)
    per_call = {place: count for place, count in seen.items() if place[0] not in PER_EVALUATION}
    assert not per_call, f"host reads in the attention path: {per_call}"
    # Each at most once per evaluation, however many attention calls the evaluation makes.
    assert max(seen.values()) <= len(opened), seen


def test_the_counter_sees_a_host_read_from_the_pack(plain_torch, monkeypatch):
    """The control: outside a model evaluation the kernel's unsettled rows are checked at once
    (bool(unsettled.any())), which the mode must see."""
    weights = loaded().pack_module("pladis_core.weights")
    z = torch.randn(4, 40, 77) * 3
    seen = run(lambda: weights.pladis_weights(z, 2.0, 1.5))
    assert [place[0] for place in seen] == ["pladis_weights"]
    evaluation = loaded().pack_module("pladis_comfy.evaluation")
    with evaluation.evaluating(None):  # inside an evaluation: counted on the device instead
        assert not run(lambda: weights.pladis_weights(z, 2.0, 1.5))

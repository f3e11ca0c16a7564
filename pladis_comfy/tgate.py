"""TGATE in ComfyUI: the caches of a sampling run, the patched attention modules, the hooks.

The node stores only what it was asked for (TgateSettings, never written). The OUTER_SAMPLE
wrapper makes one TgateRun per sampling run, which holds the step and the caches, in its own
copy of the options; the patched attention modules find it through the evaluation in
progress (apply_model_wrapper). A model evaluation outside a sampling run finds no run and
is computed plainly. The schedule itself is pladis_core/tgate.py. Nothing here imports ComfyUI.
"""
import contextvars
import logging
import statistics
import time
from dataclasses import dataclass, field

import torch

from ..pladis_core.steps import step_of
from ..pladis_core.tgate import TgateSchedule
from .patching import ForwardPatch, running

SETTINGS_KEY = "pladis_tgate"  # transformer_options: the node's TgateSettings
RUN_KEY = "pladis_tgate_run"  # transformer_options inside a sampling run: its TgateRun
COND, UNCOND = 0, 1
# The model evaluation in progress on this thread.
_EVALUATION = contextvars.ContextVar("pladis_tgate_evaluation")


@dataclass(frozen=True)
class Evaluation:
    run: "TgateRun"
    branches: list  # cond_or_uncond of the batch
    index: int  # the evaluation's place within its step
    calls: dict = field(default_factory=dict)  # module path -> its calls so far in this evaluation

    def occurrence(self, path):
        """How many times the module at path ran before in this evaluation (VACE runs its
        blocks once per reference: each run keeps a cache of its own)."""
        seen = self.calls.get(path, 0)
        self.calls[path] = seen + 1
        return seen


@dataclass(frozen=True)
class TgateSettings:
    """What Apply TGATE asked for: the schedule, and the CFG branch that runs alone after the gate."""

    schedule: TgateSchedule
    after_gate: str = "uncond"


class TgateRun:
    """The state of one sampling run: the step reached, and the attention caches."""

    def __init__(self, settings):
        self.schedule = settings.schedule
        self.after_gate = settings.after_gate
        self.branch = UNCOND if settings.after_gate == "uncond" else COND
        self.reset()

    def reset(self):
        self.step = 0
        self.cross = {}  # ((layer, call index), branch) -> per-sample output after to_out
        self.self_attention = {}  # ((layer, call index), branch) -> per-sample output
        self.tuples = set()  # layers whose module returns its output in a 1-tuple (HunyuanDiT)
        self.started = {}  # step -> when its first evaluation began (time.perf_counter)
        self._calls = (None, 0)  # (step, model evaluations seen in it)

    def next_call(self):
        """The index of this model evaluation within its step. Tiled or windowed sampling
        (several calls per step on different parts of the latent) keeps one cache per call."""
        step, seen = self._calls
        index = seen if step == self.step else 0
        self._calls = (self.step, index + 1)
        return index

    def cross_attention_frozen(self):
        return self.schedule.after_gate(self.step) and bool(self.cross)

    def store(self, cache, layer, out, cond_or_uncond):
        if isinstance(out, tuple):
            self.tuples.add(layer)
            (out,) = out
        for branch, chunk in zip(cond_or_uncond, out.chunk(len(cond_or_uncond))):
            cache[(layer, branch)] = chunk.detach()

    def cached(self, cache, layer, x, cond_or_uncond, combine):
        """The cached output for this call's batch (as the module returns it), or None where it does not fit."""
        if combine:  # the cross-attention cache: the mean of the branches that ran
            parts = [cache[(layer, b)] for b in (COND, UNCOND) if (layer, b) in cache]
            per_branch = [sum(parts) / len(parts)] * len(cond_or_uncond) if parts else []
        else:
            per_branch = [cache.get((layer, b)) for b in cond_or_uncond]
        if not per_branch or any(p is None for p in per_branch):
            return None
        out = torch.cat(per_branch)
        if out.shape[0] != x.shape[0] or out.shape[1] != x.shape[1]:
            return None  # not this run's batch or resolution: compute instead
        out = out.to(device=x.device, dtype=x.dtype)
        return (out,) if layer in self.tuples else out


def layer_of(transformer_options):
    """The layer a UNet attention call belongs to: (block, number, index in the block)."""
    block = transformer_options.get("block")
    return (block[0], block[1], transformer_options.get("block_index", 0)) if block else None


class CrossAttentionCapture:
    """attn2_output_patch: at the gate step, keep each layer's output after to_out.

    It runs after the attention module and after any attn2 replacement (PLADIS), so the
    cache holds exactly what the layer produced.
    """

    def __call__(self, out, extra_options):
        call = _EVALUATION.get(None)
        if call is not None and call.run.schedule.caches_cross_attention(call.run.step):
            call.run.store(call.run.cross, (layer_of(extra_options), call.index), out, call.branches)
        return out


class CachedForward(ForwardPatch):
    """An attention module's forward, object-patched: after the gate (cross-attention) or on
    reuse steps (self-attention) it returns the cache without computing anything.

    It finds the run through the model evaluation in progress (apply_model_wrapper), since
    some DiTs (PixArt) call their attention modules without transformer_options. The module's
    path is also the cache key where the call does not name its block.
    """

    def __init__(self, forward, path, module, kind):
        super().__init__(forward, path, module)
        self.kind = kind  # "cross" or "self"

    def __call__(self, x, *args, **kwargs):
        call = _EVALUATION.get(None)
        if call is None:
            return self.inner(x, *args, **kwargs)
        run, branches = call.run, call.branches
        named = layer_of(kwargs.get("transformer_options") or {})
        layer = (named, call.index) if named else (self.path, call.index, call.occurrence(self.path))
        if self.kind == "cross":
            if run.cross_attention_frozen():
                out = run.cached(run.cross, layer, x, branches, combine=True)
                if out is not None:
                    return out
            out = self.inner(x, *args, **kwargs)
            # DiT modules are captured here; UNet layers also by CrossAttentionCapture, which
            # sees the attn2 replace path too (same key, same tensor).
            if run.schedule.caches_cross_attention(run.step):
                run.store(run.cross, layer, out, branches)
            return out
        action = run.schedule.self_attention(run.step)
        if action == "reuse":
            out = run.cached(run.self_attention, layer, x, branches, combine=False)
            if out is not None:
                return out
        out = self.inner(x, *args, **kwargs)
        if action != "compute":
            run.store(run.self_attention, layer, out, branches)
        return out


def attention_modules(diffusion_model, pairs, lists=()):
    """(path, module, "cross" | "self") of the attention modules of every block that has one of
    the (cross attribute, self attribute) pairs, e.g. UNet's ("attn2", "attn1"), within the
    diffusion model's block `lists` (all of it where none are named)."""
    roots = [(f"{name}.", getattr(diffusion_model, name)) for name in lists if getattr(diffusion_model, name, None) is not None]
    blocks = [(prefix + name, block) for prefix, root in roots for name, block in root.named_modules()] if lists else diffusion_model.named_modules()
    found = []
    for name, block in blocks:
        for cross, self_attention in pairs:
            if getattr(block, cross, None) is not None and getattr(block, self_attention, None) is not None:
                found += [(f"{name}.{cross}", getattr(block, cross), "cross"), (f"{name}.{self_attention}", getattr(block, self_attention), "self")]
                break
    return found


# Host hooks (WrappersMP). Each finds the sampling run in the model options it is given.


def summary(run, steps, ended):
    """The run's log line: the steps gated, and how much faster the run was for the gate,
    measured from its own step times (a gated step's time against an ungated one's)."""
    gated = sum(map(run.schedule.after_gate, run.started))  # the steps this run evaluated (denoise, partial ranges)
    line = f"TGATE: {gated} of {steps} steps gated (cross-attention from its cache, the {run.after_gate} branch alone)"
    times = sorted(run.started.items())
    seconds = {step: end - start for (step, start), end in zip(times, [t for _, t in times[1:]] + [ended])}
    before = [t for step, t in seconds.items() if not run.schedule.after_gate(step) and step > 0]  # step 0 loads and compiles
    after = [t for step, t in seconds.items() if run.schedule.after_gate(step)]
    if not before or not after:
        return line
    ungated, gated_time = statistics.median(before), statistics.median(after)
    without = ungated * steps  # the run with every step as long as an ungated one
    with_tgate = ungated * (steps - gated) + gated_time * gated
    # The run's other savings (self-attention reused before the gate) are in the ungated steps too.
    return (f"{line}; a gated step took {gated_time / ungated:.2f}x an ungated one, so the gate made this run "
            f"{without / with_tgate:.2f}x faster")


def outer_sample_wrapper(executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
    """A fresh run for every sampling run, in the run's own copy of the options, emptied at
    its end, even on interruption; its summary logged when it completes."""
    guider = executor.class_obj
    options = dict(guider.model_options)
    options["transformer_options"] = dict(options["transformer_options"])
    run = options["transformer_options"][RUN_KEY] = TgateRun(options["transformer_options"][SETTINGS_KEY])
    steps = len(sigmas) - 1
    if run.schedule.gate_step >= steps:
        logging.info(f"TGATE: gate_step {run.schedule.gate_step} is not below the {steps} steps of this run: "
                     "cross-attention is never frozen and CFG never dropped")
    original, guider.model_options = guider.model_options, options
    try:
        out = executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        logging.info(summary(run, steps, time.perf_counter()))
        return out
    finally:
        run.reset()
        guider.model_options = original


def calc_cond_batch_wrapper(executor, model, conds, x_in, timestep, model_options):
    """Sets the step of this evaluation; after the gate only one branch runs, and its
    prediction stands for both, so CFG returns it unchanged and post-CFG functions still
    see a full pair."""
    run = model_options["transformer_options"].get(RUN_KEY)
    if run is None:  # an evaluation outside a sampling run
        return executor(model, conds, x_in, timestep, model_options)
    run.step = step_of(float(timestep.max()), model_options["transformer_options"].get("sample_sigmas"))
    run.started.setdefault(run.step, time.perf_counter())
    if not run.schedule.after_gate(run.step) or len(conds) != 2 or None in conds:
        return executor(model, conds, x_in, timestep, model_options)
    (out,) = executor(model, [conds[run.branch]], x_in, timestep, model_options)
    return [out, out]


def apply_model_wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
    """Makes the running model, the run and this evaluation's branches visible to the patched
    attention modules, and after the gate drops attn2 replacements (PLADIS, IPAdapter...) from
    the call so that the host reaches the cross-attention modules, which return their cache."""
    run = transformer_options.get(RUN_KEY)
    with running(executor.class_obj.diffusion_model):
        if run is None:  # an evaluation outside a sampling run: nothing cached, nothing stored
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        if run.cross_attention_frozen() and "attn2" in transformer_options.get("patches_replace", {}):
            replace = {k: v for k, v in transformer_options["patches_replace"].items() if k != "attn2"}
            transformer_options = dict(transformer_options, patches_replace=replace)
        token = _EVALUATION.set(Evaluation(run, transformer_options.get("cond_or_uncond", [COND]), run.next_call()))
        try:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            _EVALUATION.reset(token)

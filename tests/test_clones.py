"""Patched models as the host clones them, in the real ComfyUI.

- ComfyUI 0.28's clone() shares the objects inside model_options: an IPAdapter-family node after
  Apply PLADIS adds its callback to the patch it finds, which must never reach the model
  upstream, however often the downstream node runs again (re-queues).
- Newer ComfyUI can rebuild the diffusion model inside a clone (dynamic VRAM's non-dynamic
  delegate, multi-GPU deep clones, model_override): the patches must run the rebuilt model.
"""
import inspect

import pytest
import torch

from host_dits import build_dit, sample_dit
from host_models import build_unet, sample
from test_apply_pladis import attn2_patches
from test_coexistence import IPADAPTER_KEYS, ipadapter_style_patch

SIZE = 64


@pytest.fixture(scope="module")
def nodes(host):
    run = lambda name: lambda model, **kwargs: host.node(name).execute(model, **kwargs).result[0]  # noqa: E731
    return {"pladis": run("ApplyPLADIS"), "flux": run("PladisFluxPatch"), "tgate": run("ApplyTGATE")}


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_a_downstream_ipadapter_node_never_changes_the_model_upstream(nodes, kind):
    upstream = nodes["pladis"](build_unet(kind, seed=3))
    sampling = upstream.get_model_object("model_sampling")
    gate = {"weight": 0.7, "sigma_start": float(sampling.percent_to_sigma(0.5)), "sigma_end": 0.0}
    before = sample(upstream, kind, steps=3, size=SIZE)
    for _ in range(3):  # ComfyUI keeps the upstream output and runs the downstream node again
        downstream = ipadapter_style_patch(upstream, IPADAPTER_KEYS[kind], **gate)
        assert all(len(patch.callbacks) == 1 for patch in attn2_patches(downstream).values())
    assert all(patch.callbacks == [] for patch in attn2_patches(upstream).values())
    assert torch.equal(sample(upstream, kind, steps=3, size=SIZE), before)
    assert not torch.equal(sample(downstream, kind, steps=3, size=SIZE), before)


def rebuilt(patcher, other):
    """A clone of patcher whose diffusion model is another instance (other, a ModelPatcher's
    model), as newer ComfyUI's clone(model_override=...) makes it; by hand on 0.3.75, which
    lacks the parameter."""
    if "model_override" in inspect.signature(patcher.clone).parameters:
        return patcher.clone(model_override=(other, ({}, {}, {}, set())))
    clone = patcher.clone()
    clone.model, clone.backup, clone.object_patches_backup = other, {}, {}
    return clone


# kind: (builder, sampler, the nodes applied, in order)
CASES = {
    "sd15, PLADIS and TGATE": (build_unet, lambda m, k: sample(m, k, steps=4, size=SIZE), "sd15", [("pladis", {}), ("tgate", {"gate_step": 2, "sp_interval": 2, "warm_up": 0})]),
    "flux, PLADIS Flux Patch": (build_dit, lambda m, k: sample_dit(m, k, steps=2), "flux", [("flux", {})]),
    "pixart, PLADIS and TGATE": (build_dit, lambda m, k: sample_dit(m, k, steps=3), "pixart", [("pladis", {}), ("tgate", {"gate_step": 2, "sp_interval": 1})]),
    "wan, TGATE and PLADIS": (build_dit, lambda m, k: sample_dit(m, k, steps=3), "wan", [("tgate", {"gate_step": 2, "sp_interval": 1}), ("pladis", {})]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_patches_run_the_model_of_the_clone_they_are_in(nodes, case):
    build, run, kind, applied = CASES[case]

    def patched(model):
        for node, settings in applied:
            model = nodes[node](model, **settings)
        return model

    first, second = build(kind, seed=3), build(kind, seed=4)
    old_calls = []
    hooks = [m.register_forward_hook(lambda *args: old_calls.append(1)) for m in first.model.diffusion_model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        result = run(rebuilt(patched(first), second.model), kind)
    finally:
        for hook in hooks:
            hook.remove()
    assert old_calls == []  # nothing of the instance the patches were made on ran
    assert torch.equal(result, run(patched(second), kind))
    assert not torch.equal(result, run(second, kind))  # and the patches did act

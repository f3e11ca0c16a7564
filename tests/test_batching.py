"""Apply PLADIS gives each sample what evaluating it alone, on its own context, gives, however
the host batches the conds (real ComfyUI, small SD1.5 / SDXL UNets sampled with comfy.sample).

ComfyUI batches conds whose contexts differ in length by repeating the shorter ones to a common
length (a prompt over 75 tokens beside a short negative). Softmax ignores such a repeat; entmax
does not. The host may also evaluate cond and uncond in separate calls (low memory).
"""
import pytest
import torch

from host_dits import build_dit, dit_conditioning, on_this_host, sample_dit
from host_models import build_unet, conditioning, sample
from reference import pladis_ref_projected
from test_apply_pladis import recorded

SIZE = 64


@pytest.fixture(scope="module")
def apply(host):
    return lambda model, **kwargs: host.node("ApplyPLADIS").execute(model, **kwargs).result[0]


@pytest.fixture(scope="module")
def unets(host):
    return {kind: build_unet(kind, seed=11) for kind in ("sd15", "sdxl")}


def prompt(kind, seed, tokens, batch=1, **extras):
    (context, options), = conditioning(kind, seed, tokens=tokens, batch=batch)
    return [[context, {**options, **extras}]]


@pytest.fixture
def one_at_a_time(monkeypatch):
    """Makes the host evaluate the given model one cond per call, as when memory is short."""
    return lambda model: monkeypatch.setattr(model.model, "memory_required", lambda *args, **kwargs: float("inf"))


def own_length(keys, lengths):
    """The length of the context a row of keys repeats: the shortest of the prompts' lengths it
    is periodic in (random prompts have no period of their own)."""
    return min(n for n in lengths if keys.shape[0] % n == 0 and torch.equal(keys, keys[:n].repeat(keys.shape[0] // n, 1)))


# Prompts of every kind the host batches: (positive, negative) builders by name, and the lengths of their contexts.
LENGTHS = (77, 154, 231)
CASES = {
    "long prompt, short negative": lambda kind, batch: (prompt(kind, 1, 154, batch), prompt(kind, 2, 77, batch)),
    "short prompt, long negative": lambda kind, batch: (prompt(kind, 1, 77, batch), prompt(kind, 2, 231, batch)),
    "several conds combined": lambda kind, batch: (prompt(kind, 1, 77, batch) + prompt(kind, 3, 231, batch), prompt(kind, 2, 154, batch)),
    "area and mask conds": lambda kind, batch: (
        prompt(kind, 1, 77, batch, area=(SIZE // 16, SIZE // 8, 0, 0), strength=1.0)
        + prompt(kind, 3, 154, batch, mask=torch.ones(1, SIZE // 8, SIZE // 8) * torch.linspace(0, 1, SIZE // 8), mask_strength=1.0, set_area_to_bounds=False),
        prompt(kind, 2, 231, batch),
    ),
}


def run(model, kind, case, batch=1, steps=2):
    positive, negative = CASES[case](kind, batch)
    return sample(model, kind, steps=steps, size=SIZE, batch=batch, positive=positive, negative=negative)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("kind, batch", [("sd15", 1), ("sd15", 2), ("sdxl", 1)])
def test_every_call_is_pladis_on_each_samples_own_context(unets, apply, kind, batch, case):
    patched, calls = recorded(apply(unets[kind]))
    run(patched, kind, case, batch)
    repeated = 0
    for call in calls:
        for row in range(call["q"].shape[0]):
            own = own_length(call["k"][row], LENGTHS)
            repeated += own < call["k"].shape[1]
            rows = slice(row, row + 1)
            ref = pladis_ref_projected(call["q"][rows], call["k"][rows, :own], call["v"][rows, :own], call["heads"], 2.0, 1.5)
            assert ((call["out"][rows].double() - ref).abs().max() / ref.abs().max()) < 1e-5
    assert repeated > 0  # the host did batch contexts of different lengths: the case at hand


@pytest.mark.parametrize("case", list(CASES))
def test_batched_and_one_at_a_time_give_the_same_image(unets, apply, one_at_a_time, case):
    patched = apply(unets["sd15"])
    batched = run(patched, "sd15", case, steps=3)
    one_at_a_time(patched)
    alone = run(patched, "sd15", case, steps=3)
    # float32 rounding of differently shaped batches, amplified by a deep random network over the steps
    assert (batched - alone).norm() < 1e-4 * batched.norm()


def test_without_the_lengths_the_repeat_would_change_the_image(unets, apply, monkeypatch, host):
    """What the tests above guard against is visible at their tolerance."""
    unet = host.pack_module("pladis_comfy.unet")
    patched = apply(unets["sd15"])
    batched = run(patched, "sd15", "long prompt, short negative", steps=3)
    monkeypatch.setattr(unet, "own_text", lambda *args: None)
    unaware = run(patched, "sd15", "long prompt, short negative", steps=3)
    assert (batched - unaware).norm() > 1e-3 * batched.norm()


@pytest.mark.parametrize("kind", ["flux", "wan"])
def test_transformers_are_never_batched_across_context_lengths(host, one_at_a_time, kind):
    """DiT conds are not repeated by the host (their contexts do not concatenate across lengths):
    batched or one at a time, the same image."""
    node = host.node("PladisFluxPatch" if kind == "flux" else "ApplyPLADIS")
    patched = node.execute(build_dit(kind, seed=4)).result[0]
    (long_context, extras), = dit_conditioning(kind, 1)
    positive = [[torch.cat([long_context, long_context.flip(1)], 1), extras]]
    negative = dit_conditioning(kind, 2)
    batched = sample_dit(patched, kind, steps=2, positive=positive, negative=negative)
    one_at_a_time(patched)
    alone = sample_dit(patched, kind, steps=2, positive=positive, negative=negative)
    assert (batched - alone).norm() < 1e-5 * batched.norm()


@pytest.mark.parametrize("kind", ["cogvideox", "cascade_c"])
def test_joint_attention_counts_a_repeated_text_once(host, one_at_a_time, kind):
    """CogVideoX's and Stable Cascade's text is repeated by the host to batch prompts of different
    lengths, and in joint attention the repeats would also take attention from the image keys."""
    if not on_this_host(kind):
        return  # CogVideoX: newer ComfyUI only
    patched = host.node("PladisFluxPatch").execute(build_dit(kind, seed=4)).result[0]
    (context, extras), = dit_conditioning(kind, 1)
    (other, other_extras), = dit_conditioning(kind, 2)
    half = context.shape[1] // 2 if kind == "cogvideox" else context.shape[1]  # CogVideoX's text table ends at its 24 tokens
    positive, negative = [[context, extras]], [[torch.cat([other, other], 1)[:, : 2 * half] if kind == "cascade_c" else other[:, :half], other_extras]]
    batched = sample_dit(patched, kind, steps=2, positive=positive, negative=negative)
    one_at_a_time(patched)
    alone = sample_dit(patched, kind, steps=2, positive=positive, negative=negative)
    assert (batched - alone).norm() < 1e-4 * batched.norm()

"""The attn2 patch object on its own: per-sample step ranges, chaining, the add() protocol, copies."""
import copy

import torch

from host import loaded
from reference import pladis_ref_projected

unet = loaded().pack_module("pladis_comfy.unet")
PladisAttn2, PladisSettings = unet.PladisAttn2, unet.PladisSettings
CONTEXT_LENGTHS_KEY = loaded().pack_module("pladis_comfy.conds").LENGTHS_KEY
UnetEvaluation, copy_on_clone = unet.UnetEvaluation, unet.copy_on_clone

HEADS = 4


def dense(q, k, v, heads, attn_precision=None, transformer_options=None):
    return pladis_ref_projected(q, k, v, heads, 0.0, 1.0).to(q.dtype)


def inputs(batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 24, 32, generator=g) * 2, torch.randn(batch, 77, 32, generator=g) * 2, torch.randn(batch, 77, 32, generator=g)


def test_only_samples_whose_sigma_is_in_range_get_pladis():
    q, k, v = inputs()
    patch = PladisAttn2(PladisSettings(2.0, 1.5, sigma_start=5.0, sigma_end=1.0), dense)
    sigmas = torch.tensor([6.0, 5.0, 1.0, 0.5])
    out = patch(q, k, v, {"n_heads": HEADS, "sigmas": sigmas})
    pladis, plain = pladis_ref_projected(q, k, v, HEADS, 2.0, 1.5), pladis_ref_projected(q, k, v, HEADS, 0.0, 1.5)
    expected = torch.stack([plain[0], pladis[1], pladis[2], plain[3]])
    assert (out.double() - expected).abs().max() < 1e-5


def test_outside_the_range_the_host_dense_attention_runs():
    calls = []

    def counting_dense(*args, **kwargs):
        calls.append(kwargs["transformer_options"])
        return dense(*args, **kwargs)

    q, k, v = inputs()
    extra = {"n_heads": HEADS, "sigmas": torch.full((4,), 9.0)}
    out = PladisAttn2(PladisSettings(2.0, 1.5, sigma_start=5.0), counting_dense)(q, k, v, extra)
    assert calls == [extra] and torch.equal(out, dense(q, k, v, HEADS))


def test_chained_patch_gets_the_residual_added():
    q, k, v = inputs()
    inner = lambda q, k, v, extra: torch.ones_like(q)  # noqa: E731
    out = PladisAttn2(PladisSettings(2.0, 1.5), dense, inner=inner)(q, k, v, {"n_heads": HEADS})
    residual = pladis_ref_projected(q, k, v, HEADS, 2.0, 1.5) - pladis_ref_projected(q, k, v, HEADS, 0.0, 1.5)
    assert (out.double() - (1 + residual)).abs().max() < 1e-5


def test_added_callbacks_follow_their_sigma_gate():
    q, k, v = inputs()
    patch = PladisAttn2(PladisSettings(1.0, 2.0), dense)
    patch.add(lambda out, q, k, v, extra, weight, **kw: weight * q, weight=0.5, sigma_start=3.0, sigma_end=1.0)
    base = pladis_ref_projected(q, k, v, HEADS, 1.0, 2.0)
    for sigma, gated in ((2.0, True), (4.0, False)):
        out = patch(q, k, v, {"n_heads": HEADS, "sigmas": torch.full((4,), sigma)})
        assert (out.double() - (base + 0.5 * q.double() * gated)).abs().max() < 1e-5


def test_deepcopy_keeps_settings_and_separates_callbacks():
    inner = object()
    patch = PladisAttn2(PladisSettings(2.0, 1.5), dense, inner=inner)
    patch.add(print, weight=1.0)
    copied = copy.deepcopy(patch)
    copied.add(print, weight=2.0)
    assert copied.settings == patch.settings and copied.inner is inner and copied.dense_attention is dense
    assert len(patch.callbacks) == 1 and len(copied.callbacks) == 2


def test_to_moves_a_chained_patch_into_a_copy_and_never_changes_the_shared_one():
    class Movable:
        def __init__(self, where=None):
            self.where = where

        def to(self, where):
            return Movable(where)

        def models(self):
            return ["a model"]

    inner = Movable()
    patch = PladisAttn2(PladisSettings(2.0, 1.5), dense, inner=inner)
    patch.add(print, weight=1.0)
    moved = patch.to(torch.float16)
    assert moved is not patch and moved.inner.where == torch.float16 and moved.callbacks == patch.callbacks
    assert patch.inner is inner and inner.where is None  # what another clone shares is left alone
    assert moved.models() == ["a model"]
    plain = PladisAttn2(PladisSettings(2.0, 1.5), dense)
    assert plain.to(torch.float16) is plain and plain.models() == []


def test_a_repeated_context_counts_once_for_each_sample():
    """The host batches a 77-token cond with a 154-token one by repeating the first twice; each
    sample must get what its own context gives alone."""
    q, k, v = inputs(batch=2)
    k_long, v_long = torch.cat([k[1:], k[1:].flip(1)], 1), torch.cat([v[1:], v[1:].flip(1)], 1)
    batched_k, batched_v = torch.cat([k[:1].repeat(1, 2, 1), k_long]), torch.cat([v[:1].repeat(1, 2, 1), v_long])
    # The host's opposite of an area cond keeps the cond's uuid: the conds list tells them apart.
    extra = {"n_heads": HEADS, "uuids": ["same", "same"], "cond_or_uncond": [0, 1], CONTEXT_LENGTHS_KEY: {(0, "same"): 77, (1, "same"): 154}}
    for patch in (PladisAttn2(PladisSettings(2.0, 1.5), dense), PladisAttn2(PladisSettings(2.0, 1.5), dense, inner=lambda q, k, v, e: dense(q, k, v, HEADS))):
        out = patch(q, batched_k, batched_v, extra).double()
        assert (out[:1] - pladis_ref_projected(q[:1], k[:1], v[:1], HEADS, 2.0, 1.5)).abs().max() < 1e-5
        assert (out[1:] - pladis_ref_projected(q[1:], k_long, v_long, HEADS, 2.0, 1.5)).abs().max() < 1e-5
    # Without the lengths the repeat is counted twice by entmax (what the test above guards against).
    unaware = PladisAttn2(PladisSettings(2.0, 1.5), dense)(q, batched_k, batched_v, {"n_heads": HEADS}).double()
    assert (unaware[:1] - pladis_ref_projected(q[:1], k[:1], v[:1], HEADS, 2.0, 1.5)).abs().max() > 1e-3


def test_pladis_acts_once_when_a_later_patch_chains_it():
    """A later node's patch that calls PLADIS's inside it: the evaluation's PladisAttn2 over it adds nothing more."""
    q, k, v = inputs()
    registered = PladisAttn2(PladisSettings(2.0, 1.5), dense)
    later = lambda q, k, v, extra: registered(q, k, v, extra) * 2  # noqa: E731
    out = PladisAttn2(PladisSettings(2.0, 1.5), dense, inner=later)(q, k, v, {"n_heads": HEADS})
    assert (out.double() - 2 * pladis_ref_projected(q, k, v, HEADS, 2.0, 1.5)).abs().max() < 1e-5


def test_the_evaluation_serves_other_patches_under_pladis():
    ours, theirs, block_wide = PladisAttn2(PladisSettings(2.0, 1.5), dense), object(), object()
    settings = PladisSettings(1.0, 2.0)
    evaluation = UnetEvaluation([("input", 4, 0), ("input", 4, 1), ("output", 3, 0)], settings, dense)
    assert evaluation.served({("input", 4, 0): ours, ("input", 4, 1): ours.copy(), ("output", 3): ours}) is None
    served = evaluation.served({("input", 4, 0): theirs, ("input", 4, 1): ours, ("input", 4): block_wide, ("output", 3): theirs})
    replaced, hidden, block = served[("input", 4, 0)], served[("input", 4, 1)], served[("output", 3, 0)]
    assert isinstance(replaced, PladisAttn2) and replaced.inner is theirs and replaced.settings == settings
    assert isinstance(hidden, PladisAttn2) and hidden.inner is block_wide and hidden.settings == ours.settings
    assert isinstance(block, PladisAttn2) and block.inner is theirs
    assert served[("input", 4, 1)] is not ours and ours.inner is None  # built for the evaluation, nothing changed
    assert evaluation.served({}) is None  # taken off on purpose (TGATE after its gate, the preview)


def test_a_clone_gets_its_own_copies_of_the_patches_it_shares():
    class Patcher:
        def __init__(self, attn2):
            self.model_options = {"transformer_options": {"patches_replace": {"attn2": attn2}}}

    shared, own = PladisAttn2(PladisSettings(2.0, 1.5), dense), PladisAttn2(PladisSettings(2.0, 1.5), dense)
    original = Patcher({("input", 1): shared, ("input", 2): own})
    clone = Patcher({("input", 1): shared, ("input", 2): own.copy(), ("input", 4): "theirs"})
    copy_on_clone(original, clone)
    copied = clone.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert copied[("input", 1)] is not shared and copied[("input", 1)].settings == shared.settings
    copied[("input", 1)].add(print, weight=1.0)
    assert shared.callbacks == [] and copied[("input", 4)] == "theirs"

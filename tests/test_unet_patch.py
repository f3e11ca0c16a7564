"""The attn2 patch object on its own: per-sample step ranges, chaining, the add() protocol, copies."""
import copy

import torch

from pladis_core.unet import PladisAttn2, PladisSettings
from reference import pladis_ref_projected

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


def test_to_moves_a_chained_patch_and_returns_itself():
    class Movable:
        def __init__(self):
            self.moves = []

        def to(self, where):
            self.moves.append(where)
            return self

        def models(self):
            return ["a model"]

    inner = Movable()
    patch = PladisAttn2(PladisSettings(2.0, 1.5), dense, inner=inner)
    assert patch.to(torch.device("cpu")) is patch and patch.to(torch.float16) is patch
    assert inner.moves == [torch.device("cpu"), torch.float16] and patch.models() == ["a model"]
    assert PladisAttn2(PladisSettings(2.0, 1.5), dense).to(torch.float16).models() == []

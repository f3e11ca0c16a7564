"""Apply PLADIS next to other packs' attention patches, in the real ComfyUI."""
import pytest
import torch

from host_models import build_unet, sample
from reference import pladis_ref_projected
from test_apply_pladis import SIZE, attn2_patches, recorded

# The keys the IPAdapter family (IPAdapter_plus, InstantID, PuLID) patches: (stage, id) on
# SD1.5, (stage, id, index) on SDXL.
IPADAPTER_KEYS = {
    "sd15": [("input", i) for i in (1, 2, 4, 5, 7, 8)] + [("output", i) for i in range(3, 12)],
    "sdxl": [("input", i, j) for i in (4, 5) for j in range(2)]
    + [("input", i, j) for i in (7, 8) for j in range(10)]
    + [("output", i, j) for i in range(3) for j in range(10)]
    + [("output", i, j) for i in (3, 4, 5) for j in range(2)],
}


class Attn2ReplaceDouble:
    """Test double of the IPAdapter family's Attn2Replace: dense attention plus callbacks,
    each gated by its kwargs' sigma range; more callbacks join through add()."""

    def __init__(self, callback=None, **kwargs):
        self.callback, self.kwargs = [callback], [kwargs]

    def add(self, callback, **kwargs):
        self.callback.append(callback)
        self.kwargs.append(kwargs)

    def __call__(self, q, k, v, extra_options):
        from comfy.ldm.modules.attention import optimized_attention

        out = optimized_attention(q, k, v, extra_options["n_heads"])
        sigma = extra_options["sigmas"].detach().cpu()[0].item() if "sigmas" in extra_options else 999999999.9
        for callback, kwargs in zip(self.callback, self.kwargs):
            if kwargs["sigma_end"] <= sigma <= kwargs["sigma_start"]:
                out = out + callback(out, q, k, v, extra_options, **kwargs)
        return out.to(q.dtype)


def ipadapter_style_patch(model, keys, **kwargs):
    """What those packs do: copy the dicts, then add() to a patch already on the key, else put theirs."""
    model = model.clone()
    for key in keys:
        to = model.model_options["transformer_options"].copy()
        to["patches_replace"] = dict(to.get("patches_replace", {}))
        to["patches_replace"]["attn2"] = dict(to["patches_replace"].get("attn2", {}))
        if key not in to["patches_replace"]["attn2"]:
            to["patches_replace"]["attn2"][key] = Attn2ReplaceDouble(image_prompt, **kwargs)
            model.model_options["transformer_options"] = to
        else:
            to["patches_replace"]["attn2"][key].add(image_prompt, **kwargs)
    return model


def image_prompt(out, q, k, v, extra_options, weight=1.0, **kwargs):
    return weight * torch.tanh(q)


@pytest.fixture(scope="module")
def apply(host):
    return lambda model, **kwargs: host.node("ApplyPLADIS").execute(model, **kwargs).result[0]


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_ipadapter_protocol_in_both_orders(host, apply, kind):
    unet = host.pack_module("pladis_comfy.unet")
    model = build_unet(kind, seed=3)
    sampling = model.get_model_object("model_sampling")
    # The image prompt acts on the second half of the schedule only.
    gate = {"weight": 0.7, "sigma_start": float(sampling.percent_to_sigma(0.5)), "sigma_end": 0.0}

    ip_first = apply(ipadapter_style_patch(model, IPADAPTER_KEYS[kind], **gate))
    pladis_first = ipadapter_style_patch(apply(model), IPADAPTER_KEYS[kind], **gate)

    for patch in attn2_patches(ip_first).values():
        assert isinstance(patch, unet.PladisAttn2) and isinstance(patch.inner, Attn2ReplaceDouble)
    assert set(attn2_patches(pladis_first)) == set(IPADAPTER_KEYS[kind])  # found ours: no keys of its own
    for patch in attn2_patches(pladis_first).values():
        assert isinstance(patch, unet.PladisAttn2) and len(patch.callbacks) == 1

    results = []
    for m in (ip_first, pladis_first):
        rec, calls = recorded(m)
        results.append(sample(rec, kind, steps=4, size=SIZE))
        gated = 0
        for c in calls:
            ref = pladis_ref_projected(c["q"], c["k"], c["v"], c["heads"], 2.0, 1.5)
            if c["sigma"] <= gate["sigma_start"]:
                ref = ref + gate["weight"] * torch.tanh(c["q"].double())
                gated += 1
            assert ((c["out"].double() - ref).abs().max() / ref.abs().max()) < 1e-5
        assert 0 < gated < len(calls)
    # The same layers up to float32 rounding, which a deep random network amplifies over the steps.
    assert (results[0] - results[1]).norm() < 1e-2 * results[0].norm()


def doubled_values(q, k, v, extra_options):
    """Another pack's attn2 replacement without the IPAdapter protocol (no add())."""
    from comfy.ldm.modules.attention import optimized_attention

    return optimized_attention(q, k, 2 * v, extra_options["n_heads"])


def served_under_pladis(c):
    """The float64 output of a layer whose replacement is doubled_values, with PLADIS over it."""
    q, k, v, heads = c["q"], c["k"], c["v"], c["heads"]
    residual = pladis_ref_projected(q, k, v, heads, 2.0, 1.5) - pladis_ref_projected(q, k, v, heads, 0.0, 1.5)
    return pladis_ref_projected(q, k, 2 * v, heads, 0.0, 1.5) + residual


def check_layers(calls, replaced):
    """Every recorded call: doubled_values under PLADIS on the replaced (block, index) layers, PLADIS elsewhere."""
    served = 0
    for c in calls:
        layer = (c["block"], c["index"])
        ref = served_under_pladis(c) if layer in replaced else pladis_ref_projected(c["q"], c["k"], c["v"], c["heads"], 2.0, 1.5)
        served += layer in replaced
        assert ((c["out"].double() - ref).abs().max() / ref.abs().max()) < 1e-5
    assert served == len(replaced)  # one step, cond and uncond in one call


def test_an_earlier_block_wide_replacement_is_chained(host, apply):
    """A pack that patched ("output", 0) for all ten SDXL transformers keeps working under PLADIS."""
    model = build_unet("sdxl", seed=4).clone()
    model.set_model_attn2_replace(doubled_values, "output", 0)
    patched = apply(model)
    assert ("output", 0) not in attn2_patches(patched) or attn2_patches(patched)[("output", 0)] is doubled_values
    rec, calls = recorded(patched)
    sample(rec, "sdxl", steps=1, size=SIZE)
    check_layers(calls, {(("output", 0), i) for i in range(10)})


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_a_later_replacement_on_a_patched_layer_is_served_under_pladis(host, apply, kind):
    """A node after Apply PLADIS puts its own replacement where PLADIS's was (SD1.5's (block, id),
    SDXL's (block, id, index)), or block-wide on SDXL, where PLADIS's per-layer keys would hide it:
    PLADIS neither vanishes nor hides it."""
    later = apply(build_unet(kind, seed=6)).clone()
    if kind == "sd15":
        later.set_model_attn2_replace(doubled_values, "input", 4)
        replaced = {(("input", 4), 0)}
    else:
        later.set_model_attn2_replace(doubled_values, "input", 7, 3)
        later.set_model_attn2_replace(doubled_values, "output", 0)
        replaced = {(("input", 7), 3)} | {(("output", 0), i) for i in range(10)}
    rec, calls = recorded(later)
    sample(rec, kind, steps=1, size=SIZE)
    check_layers(calls, replaced)


def test_an_attention_override_still_serves_the_plain_attention(host, apply):
    """Outside PLADIS's step range the dense attention goes through another node's override."""
    model = build_unet("sd15", seed=5)
    seen = []

    def override(func, *args, **kwargs):
        seen.append(args[0].shape[-1])
        return func(*args, **kwargs)

    with_override = model.clone()
    with_override.model_options["transformer_options"]["optimized_attention_override"] = override
    sample(with_override, "sd15", steps=2, size=SIZE)
    plain_calls = len(seen)
    seen.clear()
    sample(apply(with_override, scale=0.0), "sd15", steps=2, size=SIZE)
    assert plain_calls > 0 and len(seen) == plain_calls

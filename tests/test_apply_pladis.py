"""Apply PLADIS in the real ComfyUI: small SD1.5/SDXL-architecture UNets sampled with comfy.sample."""
import copy
import logging

import pytest

from host import host_patch_category
import torch

from host_dits import build_dit
from host_models import build_unet, sample
from reference import pladis_ref_projected

SIZE = 64  # 8x8 latent: 64, 16 and 4 image tokens in the UNet's three attention resolutions
# Cross-attention layers: found in the model / patched by default (middle block left dense).
LAYERS = {"sd15": (16, 15), "sdxl": (70, 60)}


@pytest.fixture(scope="module")
def apply(host):
    def run(model, **kwargs):
        return host.node("ApplyPLADIS").execute(model, **kwargs).result[0]

    return run


@pytest.fixture(scope="module")
def unet_module(host):
    return host.pack_module("pladis_comfy.unet")


@pytest.fixture(scope="module", params=["sd15", "sdxl"])
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def models(host):
    return {kind: build_unet(kind) for kind in LAYERS}


def attn2_patches(model):
    return model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})


class Recorder:
    """Wraps an attn2 replace patch and keeps every call's inputs and output."""

    def __init__(self, patch, calls):
        self.patch, self.calls = patch, calls

    def __call__(self, q, k, v, extra_options):
        out = self.patch(q, k, v, extra_options)
        self.calls.append(
            {
                "block": extra_options["block"], "index": extra_options["block_index"], "heads": extra_options["n_heads"],
                "sigma": float(extra_options["sigmas"][0]), "cond_or_uncond": list(extra_options["cond_or_uncond"]),
                "q": q.clone(), "k": k.clone(), "v": v.clone(), "out": out.clone(),
            }
        )
        return out


def recorded(model):
    """A clone whose cross-attention layers record each call, and the list they record into.

    The recorders wrap, in every evaluation, the attn2 replacements as the host then finds
    them: from an APPLY_MODEL wrapper added after the nodes' (it runs inside theirs).
    """
    import comfy.patcher_extension

    calls = []

    def wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        replaces = transformer_options.get("patches_replace", {})
        attn2 = {key: Recorder(patch, calls) for key, patch in replaces.get("attn2", {}).items()}
        options = {**transformer_options, "patches_replace": {**replaces, "attn2": attn2}}
        return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)

    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_recorder", wrapper)
    return m, calls


def max_error(call, scale, alpha, extra=None):
    ref = pladis_ref_projected(call["q"], call["k"], call["v"], call["heads"], scale, alpha)
    if extra is not None:
        ref = ref + extra(call).double()
    return ((call["out"].double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("scale, alpha", [(2.0, 1.5), (1.0, 2.0), (3.0, 1.25)])
def test_every_cross_attention_layer_matches_the_float64_reference(models, apply, unet_module, kind, scale, alpha):
    model = models[kind]
    found, default = LAYERS[kind]
    assert sum(unet_module.cross_attention_blocks(model.get_model_object("diffusion_model")).values()) == found
    patched, calls = recorded(apply(model, scale=scale, alpha=alpha))
    sample(patched, kind, steps=2, size=SIZE)
    layers = {(c["block"], c["index"]) for c in calls}
    assert len(layers) == default and not any(block[0] == "middle" for block, _ in layers)
    assert len(calls) == 2 * default  # two steps, cond and uncond in one batch
    assert all(sorted(c["cond_or_uncond"]) == [0, 1] for c in calls)
    assert max(max_error(c, scale, alpha) for c in calls) < 1e-5


def test_pladis_changes_the_sample(models, apply, kind):
    plain = sample(models[kind], kind, size=SIZE)
    assert not torch.allclose(sample(apply(models[kind]), kind, size=SIZE), plain, rtol=1e-3)


@pytest.mark.parametrize("settings", [{"scale": 0.0}, {"alpha": 1.0}, {"scale": 0.0, "include_middle": True}])
def test_identity_settings_give_the_unpatched_result(models, apply, kind, settings):
    plain = sample(models[kind], kind, size=SIZE)
    assert torch.equal(sample(apply(models[kind], **settings), kind, size=SIZE), plain)


def test_include_middle_patches_every_layer(models, apply, kind):
    patched, calls = recorded(apply(models[kind], include_middle=True))
    sample(patched, kind, steps=1, size=SIZE)
    assert len({(c["block"], c["index"]) for c in calls}) == LAYERS[kind][0]
    assert max(max_error(c, 2.0, 1.5) for c in calls) < 1e-5


def test_step_range_is_honoured(models, apply):
    model = models["sd15"]
    sampling = model.get_model_object("model_sampling")
    start, end = float(sampling.percent_to_sigma(0.3)), float(sampling.percent_to_sigma(0.7))
    patched, calls = recorded(apply(model, start_percent=0.3, end_percent=0.7))
    sample(patched, "sd15", steps=6, size=SIZE)
    inside = [c for c in calls if end <= c["sigma"] <= start]
    outside = [c for c in calls if not end <= c["sigma"] <= start]
    assert inside and outside
    assert max(max_error(c, 2.0, 1.5) for c in inside) < 1e-5
    assert max(max_error(c, 0.0, 1.5) for c in outside) < 1e-5  # plain attention outside the range
    assert min(max_error(c, 0.0, 1.5) for c in inside) > 1e-3


@pytest.mark.parametrize(
    "kind, blocks, expected",
    [
        ("sdxl", "input:4,5 output:3-5", {("input", 4): 2, ("input", 5): 2, ("output", 3): 2, ("output", 4): 2, ("output", 5): 2}),
        ("sdxl", "middle:0 output:0", {("middle", 0): 10, ("output", 0): 10}),
        ("sd15", "input:1;output:11  middle:0", {("input", 1): 1, ("output", 11): 1, ("middle", 0): 1}),
    ],
)
def test_block_list_selects_exactly_those_blocks(models, apply, kind, blocks, expected):
    patched, calls = recorded(apply(models[kind], blocks=blocks, include_middle=False))
    sample(patched, kind, steps=1, size=SIZE)
    seen = {}
    for c in calls:
        seen.setdefault(c["block"], set()).add(c["index"])
    assert {block: len(indexes) for block, indexes in seen.items()} == expected
    assert max(max_error(c, 2.0, 1.5) for c in calls) < 1e-5


def test_incoming_model_is_untouched(models, apply, kind):
    model = models[kind]
    before_options = copy.deepcopy(model.model_options)
    before = sample(model, kind, size=SIZE)
    patched = apply(model)
    assert patched is not model and attn2_patches(patched)
    assert model.model_options == before_options and not attn2_patches(model)
    assert torch.equal(sample(model, kind, size=SIZE), before)


def test_applying_twice_the_later_settings_win(models, apply, unet_module):
    model = models["sdxl"]
    twice = apply(apply(model, scale=1.0, alpha=2.0), scale=3.0)
    patches = attn2_patches(twice)
    assert len(patches) == 60
    assert all(isinstance(p, unet_module.PladisAttn2) and p.inner is None and p.settings.scale == 3.0 for p in patches.values())
    assert torch.equal(sample(twice, "sdxl", size=SIZE), sample(apply(model, scale=3.0), "sdxl", size=SIZE))


def test_a_later_node_with_fewer_blocks_leaves_the_others_plain(models, apply, caplog):
    model = models["sdxl"]
    with caplog.at_level(logging.INFO):
        narrowed = apply(apply(model, scale=1.0), blocks="input:4")
    assert "58 layers an earlier Apply PLADIS patched are plain again" in caplog.text
    assert torch.equal(sample(narrowed, "sdxl", size=SIZE), sample(apply(model, blocks="input:4"), "sdxl", size=SIZE))


def test_a_later_identity_node_removes_the_effect(models, apply):
    model = models["sd15"]
    assert torch.equal(sample(apply(apply(model), scale=0.0), "sd15", size=SIZE), sample(model, "sd15", size=SIZE))


def test_logs_how_many_layers_were_patched(models, apply, kind, caplog):
    with caplog.at_level(logging.INFO):
        apply(models[kind])
    assert f"patched {LAYERS[kind][1]} cross-attention layers" in caplog.text


def test_extra_guidance_branch_goes_through_pladis(models, apply):
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance

    model = models["sd15"]
    patched, calls = recorded(apply(model))
    with_pag = PerturbedAttentionGuidance.execute(patched, scale=3.0).result[0]
    sample(with_pag, "sd15", steps=1, size=SIZE)
    # cond+uncond batch, then PAG's own cond-only evaluation: both through PLADIS.
    assert sorted(len(c["cond_or_uncond"]) for c in calls[: len(calls) // 2]) == [2] * 15
    assert [c["cond_or_uncond"] for c in calls[len(calls) // 2 :]] == [[0]] * 15
    assert max(max_error(c, 2.0, 1.5) for c in calls) < 1e-5


def test_patch_objects_survive_deepcopy_and_device_moves(models, apply, unet_module):
    patched = apply(models["sd15"])
    expected = sample(patched, "sd15", size=SIZE)
    copied = patched.clone()
    copied.model_options = copy.deepcopy(patched.model_options)
    for key, patch in attn2_patches(copied).items():
        assert isinstance(patch, unet_module.PladisAttn2) and patch is not attn2_patches(patched)[key]
    copied.model_patches_to(torch.device("cpu"))
    copied.model_patches_to(torch.float32)
    assert all(isinstance(p, unet_module.PladisAttn2) for p in attn2_patches(copied).values())
    assert torch.equal(sample(copied, "sd15", size=SIZE), expected)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"scale": 10.5}, r"scale must lie between -5.0 and 10.0"),
        ({"scale": -6.0}, r"scale must lie between -5.0 and 10.0"),
        ({"alpha": 0.9}, r"alpha must lie between 1.0 and 2.0"),
        ({"alpha": 2.05}, r"alpha must lie between 1.0 and 2.0"),
        ({"start_percent": -0.1}, r"start_percent must lie between 0.0 and 1.0"),
        ({"end_percent": 1.5}, r"end_percent must lie between 0.0 and 1.0"),
        ({"start_percent": 0.8, "end_percent": 0.2}, r"start_percent \(0.8\) is after end_percent \(0.2\)"),
        ({"blocks": "input:99"}, r"input 99, which this model lacks; it has input 1,2,4,5,7,8; middle 0; output 3,4,5,6,7,8,9,10,11"),
        # Refused before anything is expanded: a range this size would take the server's memory.
        ({"blocks": "input:1-100000000000 output:3"}, r"blocks names input 9-100000000000, which this model lacks; it has input 1,2"),
        ({"blocks": "input:3"}, r"input 3, which have no cross-attention"),
        ({"blocks": "output:0-2"}, r"output 0,1,2, which have no cross-attention"),
        ({"blocks": "up:4"}, r"'up:4' should look like input:4,5"),
        ({"blocks": "input:4,x"}, r"'x' is not an index or a range"),
        ({"blocks": "input:5-3"}, r"range '5-3' runs backwards"),
        ({"blocks": "input"}, r"'input' should look like"),
    ],
)
def test_bad_inputs_are_refused_with_what_to_change(models, apply, settings, message):
    with pytest.raises(ValueError, match=message):
        apply(models["sd15"], **settings)


def test_a_model_without_unet_cross_attention_is_refused(apply):
    with pytest.raises(ValueError, match=r"this model is Flux.*'PLADIS Flux Patch'"):
        apply(build_dit("flux"))


def test_schema_matches_the_documented_inputs(host):
    schema = host.node("ApplyPLADIS").define_schema()
    assert (schema.display_name, schema.category) == ("Apply PLADIS", host_patch_category())
    inputs = {i.id: i for i in schema.inputs}
    assert list(inputs) == ["model", "scale", "alpha", "start_percent", "end_percent", "include_middle", "blocks"]
    assert all(i.tooltip for i in schema.inputs)
    assert (inputs["scale"].default, inputs["scale"].min, inputs["scale"].max, inputs["scale"].step) == (2.0, -5.0, 10.0, 0.05)
    assert (inputs["alpha"].default, inputs["alpha"].min, inputs["alpha"].max, inputs["alpha"].step) == (1.5, 1.0, 2.0, 0.05)
    assert (inputs["start_percent"].default, inputs["end_percent"].default) == (0.0, 1.0)
    assert inputs["include_middle"].default is False
    assert inputs["blocks"].optional and inputs["blocks"].default == ""
    assert host.nodes.NODE_DISPLAY_NAME_MAPPINGS["ApplyPLADIS"] == "Apply PLADIS"

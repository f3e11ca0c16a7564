"""PLADIS on DiTs in the real ComfyUI: "PLADIS Flux Patch" on joint attention and "Apply PLADIS"
on cross-attention DiTs, each a small model from ComfyUI's classes sampled with comfy.sample.

Masks, reference tokens, block selection, the step range, other nodes' overrides and bad
inputs on the first supported models; every architecture's calls against the float64
reference are in test_architectures.py.
"""
import pytest

from host import host_patch_category
import torch

from host_dits import sample_dit
from host_models import build_unet
from recording import ALPHA, OVERRIDE, SCALE, Recorder, max_error, recording, reference_of, with_override

JOINT_KINDS = ["flux", "chroma", "sd3", "sd35", "qwen_image", "lumina2", "z_image"]


@pytest.fixture(scope="module")
def flux_patch(host):
    return lambda model, **kwargs: host.node("PladisFluxPatch").execute(model, **kwargs).result[0]


@pytest.fixture(scope="module")
def apply(host):
    return lambda model, **kwargs: host.node("ApplyPLADIS").execute(model, **kwargs).result[0]


@pytest.fixture(scope="module")
def models(dit_models):
    return dit_models


# --- PLADIS Flux Patch on joint attention ---


def test_flux_text_mask_and_kontext_reference_tokens(models, flux_patch):
    """A padded text key gets zero weight in both maps; Kontext reference tokens (after the image) count as image."""
    model, recorder = recording(flux_patch(models("flux"), scale=SCALE, alpha=ALPHA))
    sample_dit(model, "flux", steps=2, attention_mask=20)
    for call in recorder.calls:
        assert call[4] is not None and torch.isinf(call[4][..., 20:32]).all()  # the host passed the mask on
        assert max_error(call, reference_of(call, 32)) < 2e-5
    model, recorder = recording(flux_patch(models("flux"), scale=SCALE, alpha=ALPHA))
    sample_dit(model, "flux", steps=2, reference=True)
    assert {call[0].shape[-2] for call in recorder.calls} == {32 + 64 + 64}
    for call in recorder.calls:
        assert max_error(call, reference_of(call, 32)) < 2e-5


@pytest.mark.parametrize("kind", JOINT_KINDS)
def test_scale_zero_gives_the_unpatched_result_bit_for_bit(models, flux_patch, kind):
    plain = sample_dit(models(kind), kind, steps=2)
    assert torch.equal(sample_dit(flux_patch(models(kind), scale=0.0), kind, steps=2), plain)
    assert torch.equal(sample_dit(flux_patch(models(kind), alpha=1.0), kind, steps=2), plain)
    assert not torch.allclose(sample_dit(flux_patch(models(kind)), kind, steps=2), plain)


@pytest.mark.parametrize(
    "double, single, patched",
    [("0", "none", {("double", 0)}), ("none", "all", {("single", 0)}), ("none", "none", set()), ("all", "0", {("double", 0), ("single", 0)})],
)
def test_block_selection_is_honoured(models, flux_patch, double, single, patched):
    model, recorder = recording(flux_patch(models("flux"), double_blocks=double, single_blocks=single))
    sample_dit(model, "flux", steps=2)
    assert {call[7] for call in recorder.calls} == {("double", 0), ("single", 0)}  # the host names Flux's blocks
    for call in recorder.calls:
        assert max_error(call, reference_of(call, 32 if call[7] in patched else None)) < 2e-5


def test_step_range_is_honoured(models, flux_patch):
    model = models("flux")
    sampling = model.get_model_object("model_sampling")
    start, end = 0.3, 0.7
    patched, recorder = recording(flux_patch(model, start_percent=start, end_percent=end))
    sample_dit(patched, "flux", steps=6)
    high, low = float(sampling.percent_to_sigma(start)), float(sampling.percent_to_sigma(end))
    in_range = [low <= float(call[8][0]) <= high for call in recorder.calls]
    assert any(in_range) and not all(in_range)
    for call, active in zip(recorder.calls, in_range):
        assert max_error(call, reference_of(call, 32 if active else None)) < 2e-5


def test_the_incoming_model_is_untouched(models, flux_patch):
    model = models("flux")
    options, objects = repr(model.model_options), dict(model.object_patches)
    before = sample_dit(model, "flux", steps=2)
    flux_patch(model)
    assert repr(model.model_options) == options and model.object_patches == objects
    assert torch.equal(sample_dit(model, "flux", steps=2), before)


def same_but_rounding(result, expected):
    """Equal up to float32 rounding: without another node's override, PLADIS runs the dense part
    of joint calls with torch's attention kernel rather than the host's function (for the
    text mass from the same pass), which rounds differently."""
    return (result - expected).abs().max() <= 1e-6 * expected.abs().max()


# kind: (the node's fixture, the attention calls of a 2-step run, the reference text of a call)
OVERRIDE_CASES = {
    "flux": ("flux_patch", 2 * 2, lambda call: 32),  # both blocks joint
    "wan": ("apply", 2 * 2 * 2, lambda call: "all" if call[1].shape[1] == 77 else None),  # self- and text cross-attention
}


@pytest.mark.parametrize("order", ["before", "after"])
@pytest.mark.parametrize("kind", list(OVERRIDE_CASES))
def test_another_nodes_override_serves_every_call_in_either_order(request, models, kind, order):
    """A SageAttention-style override, set before the node or after it (replacing what it finds),
    computes the dense part of every call; PLADIS still acts, exactly as without it."""
    fixture, calls, text = OVERRIDE_CASES[kind]
    node = request.getfixturevalue(fixture)
    model = models(kind)
    sage = Recorder()
    if order == "before":
        patched = node(with_override(model, sage), scale=SCALE, alpha=ALPHA)
    else:
        patched = with_override(node(model, scale=SCALE, alpha=ALPHA), sage)
    recorded_model, after = recording(patched)
    result = sample_dit(recorded_model, kind, steps=2)
    assert len(sage.calls) == len(after.calls) == calls
    for call in after.calls:
        assert max_error(call, reference_of(call, text(call))) < 2e-5
    assert same_but_rounding(result, sample_dit(node(model, scale=SCALE, alpha=ALPHA), kind, steps=2))


def test_an_override_installed_anew_in_every_evaluation_keeps_pladis(models, flux_patch):
    """Newer ComfyUI's sparse-attention node installs its override before each evaluation (from
    ON_PREPARE_STATE); a CALC_COND_BATCH wrapper does the same on both hosts."""
    import comfy.patcher_extension

    sparse = Recorder()

    def install(executor, model, conds, x_in, timestep, model_options):
        model_options = {**model_options, "transformer_options": {**model_options["transformer_options"], OVERRIDE: sparse}}
        return executor(model, conds, x_in, timestep, model_options)

    patched = flux_patch(models("flux"), scale=SCALE, alpha=ALPHA)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, "test_sparse", install)
    result = sample_dit(patched, "flux", steps=2)
    assert len(sparse.calls) == 2 * 2
    assert same_but_rounding(result, sample_dit(flux_patch(models("flux"), scale=SCALE, alpha=ALPHA), "flux", steps=2))
    assert not torch.equal(result, sample_dit(models("flux"), "flux", steps=2))


def test_a_later_node_replaces_an_earlier_one(models, flux_patch):
    once = flux_patch(models("flux"), scale=1.0)
    twice = flux_patch(once, scale=SCALE, alpha=ALPHA, single_blocks="none")
    assert torch.equal(sample_dit(twice, "flux", steps=2), sample_dit(flux_patch(models("flux"), scale=SCALE, alpha=ALPHA, single_blocks="none"), "flux", steps=2))
    assert torch.equal(sample_dit(flux_patch(once, scale=0.0), "flux", steps=2), sample_dit(models("flux"), "flux", steps=2))


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"double_blocks": "0-3"}, r"double_blocks names 1-3, which this model lacks; it has 0-0"),
        # Refused before anything is expanded: a range this size would take the server's memory.
        ({"double_blocks": "0,5,1-100000000000"}, r"double_blocks names 5, 1-100000000000, which this model lacks; it has 0-0"),
        ({"single_blocks": "2,x"}, r"single_blocks '2,x': 'x' is not an index"),
        ({"double_blocks": "5-1"}, r"runs backwards"),
        ({"scale": 11.0}, r"scale must lie between -5.0 and 10.0"),
        ({"start_percent": 0.8, "end_percent": 0.2}, r"start_percent \(0.8\) is after end_percent"),
    ],
)
def test_bad_inputs_are_refused_with_what_to_change(models, flux_patch, settings, message):
    with pytest.raises(ValueError, match=message):
        flux_patch(models("flux"), **settings)


def test_sd3_has_no_single_blocks_to_select(models, flux_patch):
    with pytest.raises(ValueError, match=r"single_blocks names 0, which this model lacks; it has none"):
        flux_patch(models("sd3"), single_blocks="0")


def test_models_without_joint_attention_are_refused(host, models, flux_patch, apply):
    with pytest.raises(ValueError, match=r"PLADIS Flux Patch works on Flux .*Stable Cascade \(stage C\); this model is SDXL\. .*use the 'Apply PLADIS' node"):
        flux_patch(build_unet("sdxl"))
    with pytest.raises(ValueError, match=r"this model is WAN21\. .*use the 'Apply PLADIS' node"):
        flux_patch(models("wan"))
    with pytest.raises(ValueError, match=r"Apply PLADIS works on SD1\.x.*Kandinsky 5.*; this model is SD3\. .*use the 'PLADIS Flux Patch' node"):
        apply(models("sd3"))


def test_flux_patch_schema(host):
    schema = host.node("PladisFluxPatch").define_schema()
    assert (schema.display_name, schema.category) == ("PLADIS Flux Patch", host_patch_category())
    inputs = {i.id: i for i in schema.inputs}
    assert list(inputs) == ["model", "scale", "alpha", "start_percent", "end_percent", "double_blocks", "single_blocks"]
    assert [inputs[k].default for k in list(inputs)[1:]] == [2.0, 1.5, 0.0, 1.0, "all", "all"]
    assert (inputs["scale"].min, inputs["scale"].max, inputs["alpha"].min, inputs["alpha"].max) == (-5.0, 10.0, 1.0, 2.0)
    assert all(i.tooltip for i in schema.inputs)


# --- Apply PLADIS on cross-attention DiTs ---


@pytest.mark.parametrize("kind", ["wan", "wan_i2v"])
def test_wan_text_cross_attention_matches_the_reference_and_the_clip_image_call_stays_dense(models, apply, kind):
    model, recorder = recording(apply(models(kind), scale=SCALE, alpha=ALPHA))
    sample_dit(model, kind, steps=2)
    text_calls = [call for call in recorder.calls if call[1].shape[1] == 77]
    assert len(text_calls) == 2 * 2  # 2 steps x 2 blocks
    image_calls = [call for call in recorder.calls if call[1].shape[1] == 257]
    assert len(image_calls) == (4 if kind == "wan_i2v" else 0)
    for call in recorder.calls:
        assert max_error(call, reference_of(call, "all" if any(call is c for c in text_calls) else None)) < 2e-5


@pytest.mark.parametrize("kind", ["wan", "wan_i2v", "pixart", "hunyuan_dit"])
def test_cross_attention_dits_scale_zero_is_unpatched_and_blocks_select_indexes(models, apply, kind):
    plain = sample_dit(models(kind), kind, steps=2)
    assert torch.equal(sample_dit(apply(models(kind), scale=0.0), kind, steps=2), plain)
    full = sample_dit(apply(models(kind)), kind, steps=2)
    assert not torch.allclose(full, plain)
    first = sample_dit(apply(models(kind), blocks="0"), kind, steps=2)
    assert not torch.allclose(first, plain) and not torch.allclose(first, full)
    with pytest.raises(ValueError, match=r"blocks names 9, which this model lacks"):
        apply(models(kind), blocks="1,9")


@pytest.mark.parametrize("kind", ["pixart", "wan"])
def test_pladis_and_tgate_combine_in_either_order(host, models, apply, kind):
    tgate = lambda model: host.node("ApplyTGATE").execute(model, gate_step=2, sp_interval=1).result[0]  # noqa: E731
    model = models(kind)
    pladis_first = sample_dit(tgate(apply(model)), kind, steps=4)
    assert torch.equal(sample_dit(apply(tgate(model)), kind, steps=4), pladis_first)
    assert not torch.allclose(pladis_first, sample_dit(tgate(model), kind, steps=4))  # PLADIS acts before the gate
    assert not torch.allclose(pladis_first, sample_dit(apply(model), kind, steps=4))  # and TGATE freezes after it

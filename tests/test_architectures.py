"""Every architecture of the pack's table in the real ComfyUI: the small model of each kind in
tests/host_dits.py that the running host has, patched by its node and sampled with comfy.sample.

Which attention calls PLADIS should change, and where their text is, come from the test model's
own description (host_dits: "joint" or "text_keys"), and each call is held to a float64
reference of the method (tests/reference.py), never to the code under test.
"""
import importlib
import math

import pytest
import torch

from host import comfyui_host, loaded
from host_dits import DITS, build_dit, dit_conditioning, latent_shape, on_this_host, sample_dit
from recording import ALPHA, SCALE, max_error, recording, reference_of
from reference import joint_pladis_ref, pladis_ref

loaded()  # the host decides which kinds exist
KINDS = [kind for kind in DITS if on_this_host(kind) and kind != "cascade_b"]
# Attention called without transformer_options: PLADIS replaces the modules' forward (tested below).
ADAPTED = {"pixart": ("cross_attn", "comfy.ldm.pixart.blocks"), "hunyuan_dit": ("attn2", "comfy.ldm.hydit.attn_layers"),
           "hunyuan_dit1": ("attn2", "comfy.ldm.hydit.attn_layers"), "ernie": ("self_attention", "comfy.ldm.ernie.model")}
# ComfyUI 0.3.75 runs Wan S2V's blocks without transformer_options: PLADIS passes the evaluation's
# own to its text cross-attention, where a recorder added after PLADIS cannot see the calls.
HIDDEN = {"wan_s2v"} if comfyui_host.version(loaded().root) == "0.3.75" else set()
OVERRIDDEN = [kind for kind in KINDS if kind not in ADAPTED]
# One model of each layout for the block selection and the step range: the first block of one kind, and no block.
SELECTIONS = {
    "auraflow": ({"double_blocks": "0", "single_blocks": "none"}, {"double_blocks": "none", "single_blocks": "none"}),
    "hidream": ({"double_blocks": "none", "single_blocks": "0"}, {"double_blocks": "none", "single_blocks": "none"}),
    "cascade_c": ({"double_blocks": "none", "single_blocks": "0"}, {"double_blocks": "none", "single_blocks": "none"}),
    "cogvideox": ({"double_blocks": "none", "single_blocks": "0"}, {"double_blocks": "none", "single_blocks": "none"}),
    "ltxv": ({"blocks": "0"}, {"blocks": "none"}),
    "kandinsky5": ({"blocks": "0"}, {"blocks": "none"}),
}
LAYOUTS = [kind for kind in SELECTIONS if kind in KINDS]
# Z-Image Omni (several captions) exists in newer ComfyUI only.
OMNI = "siglip_feat_dim" in __import__("inspect").signature(importlib.import_module("comfy.ldm.lumina.model").NextDiT.__init__).parameters


@pytest.fixture(scope="module")
def node(host):
    def patch(model, kind, **settings):
        name = "PladisFluxPatch" if "joint" in DITS[kind] else "ApplyPLADIS"
        return host.node(name).execute(model, **settings).result[0]

    return patch


@pytest.fixture(scope="module")
def models(dit_models):
    return dit_models


def text_of(kind, model, queries, keys):
    """The text keys of an attention call PLADIS should change, or None for one it leaves dense."""
    spec = DITS[kind]
    if "text_keys" in spec:  # the text's own self-attention (Kandinsky 5's text blocks) is no cross-attention
        image = spec.get("image_queries", queries)  # LTX-2: the audio queries' text attention is not image
        return "all" if keys == spec["text_keys"] != queries == image else None
    joint = spec["joint"]
    position, text = joint["position"], joint["text"]
    if position == "hunyuan":  # ComfyUI 0.3.75's HunyuanVideo flips its double blocks: text after the video
        position = "last" if getattr(model.model.diffusion_model.double_blocks[0], "flipped_img_txt", False) else "first"
    if position == "after":
        return slice(queries, queries + text) if keys - queries == text + joint["beyond"] else None
    if not queries == keys == joint["tokens"]:
        return None
    return slice(0, text) if position == "first" else slice(keys - text, keys)


def lengths(call):
    q, k, skip_reshape = call[0], call[1], call[5]
    return (q.shape[-2], k.shape[-2]) if skip_reshape else (q.shape[1], k.shape[1])


def check_calls(kind, model, recorder, patched_in=lambda call: True):
    """Every recorded call against its reference; returns how many PLADIS changed."""
    changed = 0
    for call in recorder.calls:
        text = text_of(kind, model, *lengths(call)) if patched_in(call) else None
        assert max_error(call, reference_of(call, text)) < 2e-5, (kind, lengths(call), text)
        if text is not None:
            dense = reference_of(call)
            changed += ((call[6].double() - dense).abs().max() / dense.abs().max()).item() > 1e-3
    return changed


@pytest.mark.parametrize("kind", [kind for kind in OVERRIDDEN if kind not in HIDDEN])
def test_every_attention_call_matches_the_float64_reference(host, models, node, kind):
    model = models(kind)
    recorded, recorder = recording(node(model, kind, scale=SCALE, alpha=ALPHA))
    sample_dit(recorded, kind, steps=2)
    assert check_calls(kind, model, recorder) > 0  # and PLADIS did change the text attention
    # The preview's grid of image tokens is as large as the image queries of the finest patched call
    # (HuMo and S2V add reference tokens after the video).
    architectures = host.pack_module("pladis_comfy.architectures")
    dm = model.model.diffusion_model
    grid = architectures.token_grid(dm, latent_shape(kind), architectures.find_architecture(dm))
    image_rows = []
    for call in recorder.calls:
        queries, keys = lengths(call)
        text = text_of(kind, model, queries, keys)
        if text is not None:
            image_rows.append(queries - (text.stop - text.start if isinstance(text, slice) and text.stop <= queries else 0))
    assert math.prod(grid) == max(image_rows) - DITS[kind].get("reference_tokens", 0)


@pytest.mark.parametrize("kind", KINDS)
def test_scale_zero_and_alpha_one_are_the_unpatched_model_bit_for_bit(models, node, kind):
    model = models(kind)
    plain = sample_dit(model, kind, steps=2)
    assert torch.equal(sample_dit(node(model, kind, scale=0.0), kind, steps=2), plain)
    assert torch.equal(sample_dit(node(model, kind, alpha=1.0), kind, steps=2), plain)
    assert not torch.allclose(sample_dit(node(model, kind), kind, steps=2), plain)


def evaluations(model):
    """A clone that counts its model evaluations, and the count."""
    import comfy.patcher_extension

    count = [0]

    def counting(executor, *args, **kwargs):
        count[0] += 1
        return executor(*args, **kwargs)

    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_count", counting)
    return m, count


@pytest.mark.parametrize("kind", LAYOUTS)
def test_only_the_chosen_blocks_are_changed(models, node, kind):
    """The first block of one kind: exactly one call per model evaluation changes; no block: nothing does."""
    model = models(kind)
    one, none = SELECTIONS[kind]
    counted, count = evaluations(node(model, kind, **one))
    recorded, recorder = recording(counted)
    sample_dit(recorded, kind, steps=2)
    changed = sum(
        text_of(kind, model, *lengths(call)) is not None
        and max_error(call, reference_of(call, text_of(kind, model, *lengths(call)))) < 2e-5
        and max_error(call, reference_of(call)) > 1e-3
        for call in recorder.calls
    )
    assert changed == count[0] > 0
    assert torch.equal(sample_dit(node(model, kind, **none), kind, steps=2), sample_dit(model, kind, steps=2))


@pytest.mark.parametrize("kind", LAYOUTS)
def test_the_step_range_is_honoured(models, node, kind):
    model = models(kind)
    sampling = model.get_model_object("model_sampling")
    start, end = 0.3, 0.7
    recorded, recorder = recording(node(model, kind, start_percent=start, end_percent=end))
    sample_dit(recorded, kind, steps=6)
    high, low = float(sampling.percent_to_sigma(start)), float(sampling.percent_to_sigma(end))
    in_range = lambda call: low <= float(call[8].flatten()[0]) <= high  # noqa: E731
    assert any(map(in_range, recorder.calls)) and not all(map(in_range, recorder.calls))
    assert check_calls(kind, model, recorder, patched_in=in_range) > 0


@pytest.mark.parametrize("kind", [kind for kind in ADAPTED if kind in KINDS])
def test_modules_without_the_hosts_options_match_the_reference(models, node, monkeypatch, kind):
    """Their modules call attention without transformer_options: each call's output is checked against
    the module's own forward run with the host's attention function replaced by the float64 reference."""
    module_name, attention_module = ADAPTED[kind]
    model = node(models(kind), kind, scale=SCALE, alpha=ALPHA)
    calls = []
    for path, forward in list(model.object_patches.items()):
        if path.endswith(f".{module_name}.forward"):
            module = model.get_model_object(path.rsplit(".", 1)[0])
            model.add_object_patch(path, lambda *a, f=forward, m=module, **kw: calls.append((m, a, kw, f(*a, **kw))) or calls[-1][3])
    sample_dit(model, kind, steps=2)
    assert len(calls) == 2 * len(getattr(models(kind).model.diffusion_model, "layers" if kind == "ernie" else "blocks"))

    def reference_attention(q, k, v, heads, mask=None, skip_reshape=False, **kwargs):
        qh, kh, vh = (t if skip_reshape else t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        text = text_of(kind, models(kind), qh.shape[-2], kh.shape[-2])
        ref = pladis_ref(qh, kh, vh, SCALE, ALPHA) if text == "all" else joint_pladis_ref(qh, kh, vh, text, SCALE, ALPHA)
        return ref.float().transpose(1, 2).flatten(-2)

    monkeypatch.setattr(importlib.import_module(attention_module), "optimized_attention", reference_attention)
    with torch.inference_mode():
        for module, args, kwargs, out in calls:
            ref = type(module).forward(module, *args, **kwargs)
            out, ref = (t[0] if isinstance(t, tuple) else t for t in (out, ref))
            # After the output projection, of large random logits (PixArt has no q/k norm).
            assert ((out - ref).abs().max() / ref.abs().max()).item() < 1e-4


def z_image_omni_captions_are_all_text(models, node):
    """Z-Image Omni: a caption per reference image, the main caption and a caption left over, each
    padded to 32, lead the sequence; the length of that text block is what its caption refiner sees."""
    model = models("z_image")
    gen = torch.Generator().manual_seed(9)
    omni = {"reference_latents": [torch.randn(1, 16, 12, 8, generator=gen), torch.randn(1, 16, 8, 8, generator=gen)],
            "reference_latents_text_embeds": [torch.randn(1, n, 32, generator=gen) for n in (5, 7, 3)]}
    (context, extras), = dit_conditioning("z_image", 1)
    (negative, negative_extras), = dit_conditioning("z_image", 2)
    text_blocks = []
    hook = model.model.diffusion_model.context_refiner[0].register_forward_pre_hook(lambda m, args: text_blocks.append(args[0].shape[1]))
    try:
        recorded, recorder = recording(node(model, "z_image", scale=SCALE, alpha=ALPHA))
        # A 9-token negative: the host cannot batch it with the Omni prompt (0.28 fails on such a batch).
        sample_dit(recorded, "z_image", steps=1, positive=[[context[:, :20], {**extras, **omni}]], negative=[[negative[:, :9], negative_extras]])
    finally:
        hook.remove()
    omni_text = max(text_blocks)
    assert omni_text == 4 * 32  # four captions, each padded to 32
    joint = {omni_text + 32 + 32 + 64: omni_text, 32 + 64: 32}  # the joint length: text, the two references and the image
    changed = 0
    for call in recorder.calls:
        queries, keys = lengths(call)
        text = slice(0, joint[keys]) if queries == keys and keys in joint else None
        assert max_error(call, reference_of(call, text)) < 2e-5
        changed += text is not None and keys > 96
    assert changed > 0


if OMNI:
    test_z_image_omni_captions_are_all_text = z_image_omni_captions_are_all_text


def test_stable_cascade_stage_b_is_refused_with_the_reason(host):
    model = build_dit("cascade_b")
    for name in ("PladisFluxPatch", "ApplyPLADIS", "ApplyTGATE"):
        with pytest.raises(ValueError, match=r"this model is StableCascade_B\. Stable Cascade stage B sees the prompt only as the pooled CLIP vector"):
            host.node(name).execute(model)


def test_the_readme_and_the_nodes_name_every_model_of_the_table(host):
    """The README's model table, the nodes' tooltips and their errors come from the one table."""
    from pathlib import Path

    architectures = host.pack_module("pladis_comfy.architectures")
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    start, end = "<!-- model table: made by scripts/model_table.py -->\n", "\n<!-- end of the model table -->"
    assert readme.split(start)[1].split(end)[0] == architectures.model_table(), "run scripts/model_table.py --write"
    assert readme.index(start) < readme.index("\n| ")  # the README's first table
    for node_id, node in (("ApplyPLADIS", "Apply PLADIS"), ("PladisFluxPatch", "PLADIS Flux Patch"), ("ApplyTGATE", "Apply TGATE")):
        tooltip = next(i.tooltip for i in host.node(node_id).define_schema().inputs if i.id == "model")
        served = [a.models for a in architectures.ARCHITECTURES.values()
                  if (a.node == node if node != "Apply TGATE" else not isinstance(a.tgate, str))]
        assert served and all(models in tooltip for models in served)

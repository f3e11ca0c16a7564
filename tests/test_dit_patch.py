"""The DiT patch objects of pladis_core.dit on their own, called as the host calls them."""
import copy

import torch

from pladis_core.dit import CROSS, JOINT, BlockTag, PladisForward, PladisOverride, evaluation_wrapper
from pladis_core.settings import PladisSettings
from reference import joint_pladis_ref, pladis_ref

HEADS, TEXT, IMAGE, DIM = 2, 6, 10, 8


def qkv(batch=2, keys=TEXT + IMAGE, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, HEADS, n, DIM, generator=g) * 2 for n in (TEXT + IMAGE, keys, keys))


def dense(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False, **kwargs):
    """A host backend on (batch, heads, tokens, dim) inputs, additive or bool masks."""
    if mask is not None and mask.dim() == 3:
        mask = mask[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out if skip_output_reshape else out.transpose(1, 2).flatten(-2)


class Executor:
    """What ComfyUI's WrapperExecutor hands an APPLY_MODEL wrapper: callable, with class_obj."""

    def __init__(self, fn):
        self.fn = fn
        self.class_obj = type("Model", (), {"diffusion_model": None})()

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def run_in_block(override, call, tag_call=0, text=TEXT, sigmas=None, layout=JOINT, calls=1):
    """Runs `calls` attention calls through the override inside a tagged block of one evaluation."""
    results = []

    def block():
        for _ in range(calls):
            results.append(call())

    tagged = BlockTag(block, ("double", 0), layout, tag_call)
    wrapper = evaluation_wrapper(lambda dm, context, conds: text)
    context = torch.zeros(1, text, 4)
    wrapper(Executor(lambda *a, **kw: tagged()), None, None, None, context, None, {"sigmas": sigmas})
    return results


def test_joint_call_gets_the_correction_with_a_positional_three_dimensional_mask():
    q, k, v = qkv()
    keep = torch.ones(2, 1, TEXT + IMAGE, dtype=torch.bool)
    keep[0, :, 3:TEXT] = False  # newer Qwen-Image: padded text keys, mask (batch, 1, tokens) given by position
    mask = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    override = PladisOverride(PladisSettings(2.0, 1.5), {("double", 0)})
    (out,) = run_in_block(override, lambda: override(dense, q, k, v, HEADS, mask, skip_reshape=True, skip_output_reshape=True, transformer_options={}))
    ref = joint_pladis_ref(q, k, v, slice(0, TEXT), 2.0, 1.5, mask=keep[:, None])
    assert (out.double() - ref).abs().max() < 1e-5


def test_unknown_keywords_reach_the_backend_and_the_earlier_override():
    seen = []

    def earlier(func, q, k, v, heads, **kwargs):
        seen.append(sorted(kwargs))
        return func(q, k, v, heads, **kwargs)

    q, k, v = qkv()
    override = PladisOverride(PladisSettings(2.0, 1.5), {("double", 0)}, earlier)
    assert not hasattr(override, "container_function")  # newer ComfyUI then hands over plain tensors
    run_in_block(override, lambda: override(dense, q, k, v, HEADS, skip_reshape=True, skip_output_reshape=True, scale=None, enable_gqa=False, low_precision_attention=False))
    assert seen == [["attn_precision", "enable_gqa", "low_precision_attention", "mask", "scale", "skip_output_reshape", "skip_reshape"]]


def test_calls_outside_tagged_blocks_and_later_calls_in_a_block_stay_dense():
    q, k, v = qkv()
    override = PladisOverride(PladisSettings(2.0, 1.5), {("double", 0)})
    plain = dense(q, k, v, HEADS, skip_output_reshape=True)
    assert torch.equal(override(dense, q, k, v, HEADS, skip_reshape=True, skip_output_reshape=True), plain)  # no block: a refiner, say
    first, second = run_in_block(override, lambda: override(dense, q, k, v, HEADS, skip_reshape=True, skip_output_reshape=True), calls=2)
    assert not torch.allclose(first, plain) and torch.equal(second, plain)  # SD3.5's image-only attention


def test_unchosen_blocks_and_identity_settings_return_the_dense_output_itself():
    q, k, v = qkv()
    for override in (PladisOverride(PladisSettings(2.0, 1.5), {("single", 0)}), PladisOverride(PladisSettings(0.0, 1.5), {("double", 0)})):
        (out,) = run_in_block(override, lambda: override(dense, q, k, v, HEADS, skip_reshape=True, skip_output_reshape=True))
        assert torch.equal(out, dense(q, k, v, HEADS, skip_output_reshape=True))


def test_only_samples_in_the_step_range_are_corrected():
    q, k, v = qkv()
    override = PladisOverride(PladisSettings(2.0, 1.5, sigma_start=5.0, sigma_end=1.0), {("double", 0)})
    sigmas = torch.tensor([3.0, 8.0])
    (out,) = run_in_block(override, lambda: override(dense, q, k, v, HEADS, skip_reshape=True, skip_output_reshape=True, transformer_options={"sigmas": sigmas}))
    ref = joint_pladis_ref(q, k, v, slice(0, TEXT), 2.0, 1.5)
    assert (out[0].double() - ref[0]).abs().max() < 1e-5
    assert torch.allclose(out[1], dense(q, k, v, HEADS, skip_output_reshape=True)[1])


def test_cross_layout_sharpens_every_key_on_merged_heads():
    q, k, v = qkv(keys=5)
    q = q[:, :, :7]
    merged = [t.transpose(1, 2).flatten(-2) for t in (q, k, v)]

    def merged_dense(q, k, v, heads, **kwargs):
        split = [t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v)]
        return dense(*split, heads)

    override = PladisOverride(PladisSettings(2.0, 1.5), {("double", 0)})
    (out,) = run_in_block(override, lambda: override(merged_dense, *merged, HEADS), layout=CROSS)
    ref = pladis_ref(q, k, v, 2.0, 1.5).transpose(1, 2).flatten(-2)
    assert (out.double() - ref).abs().max() < 1e-5
    assert copy.deepcopy(override) is override


def test_forward_replacement_falls_back_outside_a_run_and_out_of_range():
    q, k, v = qkv(keys=5)

    def adapter(module, x):
        return q, k, v, lambda out: out * 1.0

    original = lambda x: "original"  # noqa: E731
    patch = PladisForward(original, None, adapter, PladisSettings(2.0, 1.5, sigma_start=5.0))
    assert patch(None) == "original"  # no evaluation: not in a sampling run
    results = []
    wrapper = evaluation_wrapper(None)
    for sigma in (3.0, 8.0):
        wrapper(Executor(lambda *a, **kw: results.append(patch(None))), None, None, None, None, None, {"sigmas": torch.tensor([sigma])})
    assert (results[0].double() - pladis_ref(q, k, v, 2.0, 1.5)).abs().max() < 1e-5
    assert results[1] == "original"


def test_an_unknown_text_layout_leaves_the_evaluation_dense_with_one_warning(caplog):
    def unknown(dm, context, conds):
        raise NotImplementedError("a layout nobody knows")

    q, k, v = qkv()
    override = PladisOverride(PladisSettings(2.0, 1.5), {("double", 0)})
    tagged = BlockTag(lambda: override(dense, q, k, v, HEADS, skip_reshape=True, skip_output_reshape=True), ("double", 0), JOINT)
    outs = [evaluation_wrapper(unknown)(Executor(lambda *a, **kw: tagged()), None, None, None, torch.zeros(1, TEXT, 4), None, {}) for _ in range(2)]
    assert all(torch.equal(out, dense(q, k, v, HEADS, skip_output_reshape=True)) for out in outs)
    assert caplog.text.count("a layout nobody knows") == 1

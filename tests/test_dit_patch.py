"""The DiT patch objects of pladis_comfy/dit.py on their own, called as the host calls them."""
import pytest
import torch

from host import loaded
from reference import joint_pladis_ref, pladis_ref

dit, logs = loaded().pack_module("pladis_comfy.dit"), loaded().pack_module("pladis_core.logs")
CROSS, JOINT, OVERRIDE_KEY = dit.CROSS, dit.TEXT_FIRST, dit.OVERRIDE_KEY
BlockTag, DitEvaluation, PladisForward, PladisOverride = dit.BlockTag, dit.DitEvaluation, dit.PladisForward, dit.PladisOverride
PladisSettings = loaded().pack_module("pladis_core.settings").PladisSettings

HEADS, TEXT, IMAGE, DIM = 2, 6, 10, 8
KEY = ("double", 0)


def qkv(batch=2, keys=TEXT + IMAGE, seed=0, kv_heads=HEADS):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, HEADS, TEXT + IMAGE, DIM, generator=g) * 2
    return (q,) + tuple(torch.randn(batch, kv_heads, keys, DIM, generator=g) * 2 for _ in range(2))


def dense(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False, scale=None, enable_gqa=False, **kwargs):
    """A host backend: (batch, heads, tokens, dim) or merged-heads inputs, additive or bool masks."""
    if not skip_reshape:
        dim = q.shape[-1] // heads
        q, k, v = (t.unflatten(-1, (-1, dim)).transpose(1, 2) for t in (q, k, v))
    if mask is not None and mask.dim() == 3:
        mask = mask[:, None]
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=enable_gqa)
    return out if skip_output_reshape else out.transpose(1, 2).flatten(-2)


class Block(torch.nn.Module):
    """A module whose forward makes attention calls through the options' override."""

    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def forward(self, options):
        return [call(options) for call in self.calls]


class Executor:
    """What ComfyUI's WrapperExecutor hands an APPLY_MODEL wrapper: callable, with class_obj."""

    def __init__(self, fn, diffusion_model=None):
        self.fn = fn
        self.class_obj = type("Model", (), {"diffusion_model": diffusion_model})()

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def run_in_block(settings, calls, blocks=(KEY,), tag_call=0, text=TEXT, sigmas=None, layout=JOINT, earlier=None, exact=()):
    """Each of calls(options) inside a tagged block of one evaluation, the override installed by
    the evaluation wrapper over `earlier` (exact: the host functions it may replace); their results."""
    model = torch.nn.Module()
    model.block = Block(calls)
    tagged = BlockTag(model.block.forward, "block", model.block, KEY, layout, tag_call)
    wrapper = DitEvaluation(layout, blocks, lambda dm, context, conds: text, lambda inner: PladisOverride(settings, blocks, inner, exact))
    options = {"sigmas": sigmas} if earlier is None else {"sigmas": sigmas, OVERRIDE_KEY: earlier}
    return wrapper(Executor(lambda *a, **kw: tagged(a[5]), model), None, None, None, torch.zeros(1, text, 4), None, options)


def attend(q, k, v, heads=HEADS, **kwargs):
    """An attention call as a model makes it: through the override the options hold."""
    return lambda options: options[OVERRIDE_KEY](dense, q, k, v, heads, transformer_options=options, **kwargs)


def test_joint_call_gets_the_correction_with_a_positional_three_dimensional_mask():
    q, k, v = qkv()
    keep = torch.ones(2, 1, TEXT + IMAGE, dtype=torch.bool)
    keep[0, :, 3:TEXT] = False  # newer Qwen-Image: padded text keys, mask (batch, 1, tokens) given by position
    mask = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    (out,) = run_in_block(PladisSettings(2.0, 1.5), [lambda o: o[OVERRIDE_KEY](dense, q, k, v, HEADS, mask, skip_reshape=True, skip_output_reshape=True, transformer_options=o)])
    ref = joint_pladis_ref(q, k, v, slice(0, TEXT), 2.0, 1.5, mask=keep[:, None])
    assert (out.double() - ref).abs().max() < 1e-5


def test_where_the_host_attention_is_exact_its_kernel_gives_the_text_mass(monkeypatch):
    """A joint call whose dense attention is one of the host's exact functions: the pack runs
    torch's kernel instead, and the row log-sum-exp it returns gives each row's text mass (no
    second pass over every key). Masked, in a step range, merged heads: the method's result."""
    attention = loaded().pack_module("pladis_core.attention")
    monkeypatch.setattr(attention, "row_logsumexp", lambda *args: pytest.fail("a second pass over the keys"))
    host_calls = []

    def exact(*args, **kwargs):
        host_calls.append(args)
        return dense(*args, **kwargs)

    q, k, v = qkv()
    keep = torch.ones(2, 1, 1, TEXT + IMAGE, dtype=torch.bool)
    keep[0, ..., 3:TEXT] = False
    mask = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    merged = [t.transpose(1, 2).flatten(-2) for t in (q, k, v)]
    settings = PladisSettings(2.0, 1.5, sigma_start=5.0, sigma_end=1.0)
    call = lambda o: o[OVERRIDE_KEY](exact, q, k, v, HEADS, mask, skip_reshape=True, skip_output_reshape=True, transformer_options=o)  # noqa: E731
    (masked,) = run_in_block(settings, [call], sigmas=torch.tensor([3.0, 2.0]), exact=(exact,))
    (in_range,) = run_in_block(settings, [lambda o: o[OVERRIDE_KEY](exact, *merged, HEADS, transformer_options=o)], sigmas=torch.tensor([3.0, 8.0]), exact=(exact,))
    assert not host_calls
    assert (masked.double() - joint_pladis_ref(q, k, v, slice(0, TEXT), 2.0, 1.5, mask=keep)).abs().max() < 1e-5
    ref = joint_pladis_ref(q, k, v, slice(0, TEXT), 2.0, 1.5).transpose(1, 2).flatten(-2)
    assert (in_range[0].double() - ref[0]).abs().max() < 1e-5
    assert (in_range[1] - dense(*merged, HEADS)[1]).abs().max() < 1e-5  # out of range: dense
    assert (in_range[0] - dense(*merged, HEADS)[0]).abs().max() > 1e-2


def test_an_explicit_softmax_scale_is_the_scale_of_the_correction():
    q, k, v = qkv()
    scale = 0.5  # not 1 / sqrt(8)
    (out,) = run_in_block(PladisSettings(2.0, 1.5), [attend(q, k, v, skip_reshape=True, skip_output_reshape=True, scale=scale)])
    factor = scale * DIM**0.5  # the reference divides by sqrt(dim): scale q instead
    ref = joint_pladis_ref(q * factor, k, v, slice(0, TEXT), 2.0, 1.5)
    assert (out.double() - ref).abs().max() < 1e-5
    assert (out.double() - joint_pladis_ref(q, k, v, slice(0, TEXT), 2.0, 1.5)).abs().max() > 1e-2


def test_grouped_query_calls_with_heads_split_or_merged():
    """Keys and values with one head serving both query heads (`enable_gqa`), as the host passes
    them: (batch, heads, tokens, dim), or merged (batch, tokens, heads * dim) with fewer key heads."""
    q, k, v = qkv(kv_heads=1)
    ref = joint_pladis_ref(q, k.expand_as(q), v.expand_as(q), slice(0, TEXT), 2.0, 1.5)
    (split_out,) = run_in_block(PladisSettings(2.0, 1.5), [attend(q, k, v, skip_reshape=True, skip_output_reshape=True, enable_gqa=True)])
    (merged_out,) = run_in_block(PladisSettings(2.0, 1.5), [attend(*(t.transpose(1, 2).flatten(-2) for t in (q, k, v)), enable_gqa=True)])
    assert (split_out.double() - ref).abs().max() < 1e-5
    assert (merged_out.double() - ref.transpose(1, 2).flatten(-2)).abs().max() < 1e-5


def test_unknown_keywords_reach_the_backend_and_the_other_override():
    seen = []

    def earlier(func, q, k, v, heads, **kwargs):
        seen.append(sorted(kwargs))
        return func(q, k, v, heads, **kwargs)

    q, k, v = qkv()
    run_in_block(PladisSettings(2.0, 1.5), [attend(q, k, v, skip_reshape=True, skip_output_reshape=True, enable_gqa=False, low_precision_attention=False)], earlier=earlier)
    assert not hasattr(PladisOverride(PladisSettings(2.0, 1.5), ()), "container_function")  # newer ComfyUI hands over plain tensors
    assert seen == [["attn_precision", "enable_gqa", "low_precision_attention", "mask", "skip_output_reshape", "skip_reshape", "transformer_options"]]


def test_the_override_the_options_hold_at_the_evaluation_serves_the_dense_attention():
    """Whatever override another node set, before or after PLADIS, computes the dense part."""
    q, k, v = qkv()
    doubled = lambda func, q, k, v, heads, **kwargs: func(q, k, 2 * v, heads, **kwargs)  # noqa: E731
    (out,) = run_in_block(PladisSettings(2.0, 1.5), [attend(q, k, v, skip_reshape=True, skip_output_reshape=True)], earlier=doubled)
    correction = joint_pladis_ref(q, k, v, slice(0, TEXT), 2.0, 1.5) - joint_pladis_ref(q, k, v, slice(0, TEXT), 0.0, 1.5)
    ref = joint_pladis_ref(q, k, 2 * v, slice(0, TEXT), 0.0, 1.5) + correction
    assert (out.double() - ref).abs().max() < 1e-5


def test_an_override_replaced_inside_the_model_call_is_reported_once(monkeypatch, caplog):
    monkeypatch.setattr(logs, "_said", set())
    q, k, v = qkv()
    sneaky = lambda options: attend(q, k, v, skip_reshape=True, skip_output_reshape=True)({**options, OVERRIDE_KEY: lambda func, *a, **kw: func(*a, **kw)})  # noqa: E731
    for _ in range(2):
        (out,) = run_in_block(PladisSettings(2.0, 1.5), [sneaky])
        assert torch.equal(out, dense(q, k, v, HEADS, skip_reshape=True, skip_output_reshape=True))
    assert caplog.text.count("did not reach PLADIS") == 1


def test_block_forwards_replaced_by_a_later_node_are_reported_once(monkeypatch, caplog):
    """A node after PLADIS that puts its own forward on the blocks without calling the one it found:
    the attention still reaches the override, but no block is named; the log says why PLADIS did nothing."""
    monkeypatch.setattr(logs, "_said", set())
    q, k, v = qkv()
    model = torch.nn.Module()
    model.block = Block([attend(q, k, v, skip_reshape=True, skip_output_reshape=True)])
    wrapper = DitEvaluation(JOINT, {KEY}, lambda dm, context, conds: TEXT, lambda inner: PladisOverride(PladisSettings(2.0, 1.5), {KEY}, inner))
    for _ in range(2):
        (out,) = wrapper(Executor(lambda *a, **kw: model.block(a[5]), model), None, None, None, torch.zeros(1, TEXT, 4), None, {})
        assert torch.equal(out, dense(q, k, v, HEADS, skip_reshape=True, skip_output_reshape=True))
    assert caplog.text.count("no patched block ran its own forward") == 1


def test_calls_outside_tagged_blocks_and_later_calls_in_a_block_stay_dense():
    q, k, v = qkv()
    override = PladisOverride(PladisSettings(2.0, 1.5), {KEY})
    plain = dense(q, k, v, HEADS, skip_reshape=True, skip_output_reshape=True)
    assert torch.equal(override(dense, q, k, v, HEADS, skip_reshape=True, skip_output_reshape=True), plain)  # no block: a refiner, say
    first, second = run_in_block(PladisSettings(2.0, 1.5), [attend(q, k, v, skip_reshape=True, skip_output_reshape=True)] * 2)
    assert not torch.allclose(first, plain) and torch.equal(second, plain)  # SD3.5's image-only attention


def test_unchosen_blocks_and_identity_settings_return_the_dense_output_itself():
    q, k, v = qkv()
    plain = dense(q, k, v, HEADS, skip_reshape=True, skip_output_reshape=True)
    for settings, blocks in ((PladisSettings(2.0, 1.5), {("single", 0)}), (PladisSettings(0.0, 1.5), {KEY})):
        (out,) = run_in_block(settings, [attend(q, k, v, skip_reshape=True, skip_output_reshape=True)], blocks=blocks)
        assert torch.equal(out, plain)


def test_only_samples_in_the_step_range_are_corrected():
    q, k, v = qkv()
    settings = PladisSettings(2.0, 1.5, sigma_start=5.0, sigma_end=1.0)
    (out,) = run_in_block(settings, [attend(q, k, v, skip_reshape=True, skip_output_reshape=True)], sigmas=torch.tensor([3.0, 8.0]))
    ref = joint_pladis_ref(q, k, v, slice(0, TEXT), 2.0, 1.5)
    assert (out[0].double() - ref[0]).abs().max() < 1e-5
    assert torch.allclose(out[1], dense(q, k, v, HEADS, skip_reshape=True, skip_output_reshape=True)[1])


def test_a_call_at_other_sigmas_than_its_evaluation_takes_the_step_range_at_its_own():
    """A model called inside another's evaluation (its own sigmas in its options): the step
    range follows the call's sigmas, not those of the evaluation around it."""
    q, k, v = qkv()
    settings = PladisSettings(2.0, 1.5, sigma_start=5.0, sigma_end=1.0)
    at = lambda sigma: lambda o: o[OVERRIDE_KEY](dense, q, k, v, HEADS, skip_reshape=True, skip_output_reshape=True,  # noqa: E731
                                                 transformer_options=dict(o, sigmas=torch.tensor([sigma, sigma])))
    (outside,) = run_in_block(settings, [at(8.0)], sigmas=torch.tensor([3.0, 3.0]))
    (inside,) = run_in_block(settings, [at(3.0)], sigmas=torch.tensor([8.0, 8.0]))
    assert (outside - dense(q, k, v, HEADS, skip_reshape=True, skip_output_reshape=True)).abs().max() < 1e-6
    assert (inside.double() - joint_pladis_ref(q, k, v, slice(0, TEXT), 2.0, 1.5)).abs().max() < 1e-5


def test_cross_layout_sharpens_every_key_on_merged_heads():
    q, k, v = qkv(keys=5)
    q = q[:, :, :7]
    merged = [t.transpose(1, 2).flatten(-2) for t in (q, k, v)]
    (out,) = run_in_block(PladisSettings(2.0, 1.5), [attend(*merged)], layout=CROSS)
    ref = pladis_ref(q, k, v, 2.0, 1.5).transpose(1, 2).flatten(-2)
    assert (out.double() - ref).abs().max() < 1e-5


def test_forward_patches_call_the_module_of_the_running_model():
    """A clone whose diffusion model was rebuilt runs the new instance's module, never the one
    the patch was made for."""
    made_for, rebuilt = torch.nn.Module(), torch.nn.Module()
    made_for.block, rebuilt.block = Block([lambda o: "made for"]), Block([lambda o: "rebuilt"])
    tagged = BlockTag(made_for.block.forward, "block", made_for.block, KEY, JOINT)
    assert tagged.forward is None  # the module's own forward is not kept
    wrapper = DitEvaluation(JOINT, {KEY}, lambda dm, context, conds: TEXT, lambda inner: PladisOverride(PladisSettings(2.0, 1.5), {KEY}, inner))
    assert wrapper(Executor(lambda *a, **kw: tagged(a[5]), rebuilt), None, None, None, torch.zeros(1, TEXT, 4), None, {}) == ["rebuilt"]
    assert tagged({}) == ["made for"]  # outside any evaluation: the module it was made for


def test_forward_replacement_falls_back_outside_a_run_and_out_of_range():
    q, k, v = qkv(keys=5)
    model = torch.nn.Module()
    model.attn = torch.nn.Module()
    model.attn.forward = lambda x: "original"  # another pack's patch: kept and called

    def adapter(module, x):
        assert module is model.attn
        return q, k, v, lambda out: out * 1.0

    patch = PladisForward(model.attn.forward, "attn", model.attn, adapter, CROSS, PladisSettings(2.0, 1.5, sigma_start=5.0), dense)
    assert patch(None) == "original"  # no evaluation: not in a sampling run
    results = []
    wrapper = DitEvaluation(CROSS, {KEY})
    for sigma in (3.0, 8.0):
        wrapper(Executor(lambda *a, **kw: results.append(patch(None)), model), None, None, None, None, None, {"sigmas": torch.tensor([sigma])})
    assert (results[0].double() - pladis_ref(q, k, v, 2.0, 1.5)).abs().max() < 1e-5
    assert results[1] == "original"


def test_forward_patches_of_joint_attention_take_the_text_mass_from_the_kernel_where_the_host_is_exact(monkeypatch):
    """Ernie Image's layout: the forward patch, like the override, runs torch's kernel in place
    of an exact host function and takes each row's text mass from its log-sum-exp; behind any
    other function, that function serves the dense part and the mass takes a second pass."""
    attention = loaded().pack_module("pladis_core.attention")
    second_passes, host_calls = [], []
    row_logsumexp = attention.row_logsumexp
    monkeypatch.setattr(attention, "row_logsumexp", lambda *args, **kwargs: second_passes.append(1) or row_logsumexp(*args, **kwargs))

    def exact(*args, **kwargs):
        host_calls.append(args)
        return dense(*args, **kwargs)

    q, k, v = qkv()
    model = torch.nn.Module()
    model.attn = torch.nn.Module()
    model.attn.forward = lambda x: pytest.fail("the wrapped forward ran")
    settings = PladisSettings(2.0, 1.5, sigma_start=5.0, sigma_end=1.0)
    wrapper = DitEvaluation(JOINT, {KEY}, lambda dm, context, conds: TEXT)
    results = {}
    for name, known in (("exact", (exact,)), ("other", ())):
        patch = PladisForward(model.attn.forward, "attn", model.attn, lambda module, x: (q, k, v, lambda out: out), JOINT, settings, exact, known)
        run = lambda *a, **kw: results.__setitem__(name, patch(None))  # noqa: E731
        wrapper(Executor(run, model), None, None, None, torch.zeros(1, TEXT, 4), None, {"sigmas": torch.tensor([3.0, 8.0])})
        if name == "exact":
            assert not host_calls and not second_passes
    assert len(host_calls) == 1 and len(second_passes) == 1
    ref = joint_pladis_ref(q, k, v, slice(0, TEXT), 2.0, 1.5)
    for out in results.values():
        assert (out[0].double() - ref[0]).abs().max() < 1e-5
        assert (out[1] - dense(q, k, v, HEADS, skip_reshape=True, skip_output_reshape=True)[1]).abs().max() < 1e-5  # out of range
    assert (results["exact"][0] - dense(q, k, v, HEADS, skip_reshape=True, skip_output_reshape=True)[0]).abs().max() > 1e-2


def test_an_unknown_text_layout_leaves_the_evaluation_dense_with_one_warning(caplog):
    def unknown(dm, context, conds):
        raise NotImplementedError("a layout nobody knows")

    q, k, v = qkv()
    model = torch.nn.Module()
    model.block = Block([attend(q, k, v, skip_reshape=True, skip_output_reshape=True)])
    tagged = BlockTag(model.block.forward, "block", model.block, KEY, JOINT)
    wrapper = DitEvaluation(JOINT, {KEY}, unknown, lambda inner: PladisOverride(PladisSettings(2.0, 1.5), {KEY}, inner))
    outs = [wrapper(Executor(lambda *a, **kw: tagged(a[5]), model), None, None, None, torch.zeros(1, TEXT, 4), None, {}) for _ in range(2)]
    assert all(torch.equal(out[0], dense(q, k, v, HEADS, skip_reshape=True, skip_output_reshape=True)) for out in outs)
    assert caplog.text.count("a layout nobody knows") == 1

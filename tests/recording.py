"""Recording the attention calls of a sampling run, and their float64 references."""
from reference import joint_pladis_ref, pladis_ref

OVERRIDE = "optimized_attention_override"
SCALE, ALPHA = 2.0, 1.5


class Recorder:
    """An attention override that records each call and the output it got from the one it chains."""

    def __init__(self, inner=None):
        self.inner = inner
        self.calls = []

    def __call__(self, func, q, k, v, heads, mask=None, **kwargs):
        out = self.inner(func, q, k, v, heads, mask=mask, **kwargs) if self.inner else func(q, k, v, heads, mask=mask, **kwargs)
        options = kwargs.get("transformer_options") or {}
        block = (options.get("block_type"), options.get("block_index"))
        self.calls.append((q, k, v, heads, mask, kwargs.get("skip_reshape", False), out.clone(), block, options.get("sigmas")))
        return out

    def __deepcopy__(self, memo):
        return self


def recording(model):
    """A clone whose attention calls are recorded with the outputs they end with, and the recorder.

    The recorder chains, in every evaluation, the override the host then holds: from an
    APPLY_MODEL wrapper added after the nodes' (it runs inside theirs), as a later pack would.
    """
    import comfy.patcher_extension

    recorder = Recorder()

    def wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        recorder.inner = transformer_options.get(OVERRIDE)
        return executor(x, t, c_concat, c_crossattn, control, {**transformer_options, OVERRIDE: recorder}, **kwargs)

    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_recorder", wrapper)
    return m, recorder


def with_override(model, override):
    """A clone with `override` set in its options, as SageAttention-style nodes do (replacing any)."""
    m = model.clone()
    m.model_options["transformer_options"] = {**m.model_options["transformer_options"], OVERRIDE: override}
    return m


def heads_first(t, heads, skip_reshape):
    return t if skip_reshape else t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def four_dimensional(mask):
    if mask is None or mask.dim() == 4:
        return mask
    return mask[None, None] if mask.dim() == 2 else mask[:, None]


def reference_of(call, text=None):
    """The float64 output a call should have: joint PLADIS with `text` leading tokens (or the
    text keys `text`, a slice), PLADIS on all keys (text="all"), or dense attention (None)."""
    q, k, v, heads, mask, skip_reshape, out, _, _ = call
    q, k, v = (heads_first(t, heads, skip_reshape) for t in (q, k, v))
    if k.shape[1] != q.shape[1]:
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in (k, v))
    mask = four_dimensional(mask)
    if text is None:
        ref = pladis_ref(q, k, v, 0.0, ALPHA, mask)
    elif text == "all":
        ref = pladis_ref(q, k, v, SCALE, ALPHA, mask)
    else:
        ref = joint_pladis_ref(q, k, v, text if isinstance(text, slice) else slice(0, text), SCALE, ALPHA, mask)
    return ref if out.dim() == 4 else ref.transpose(1, 2).flatten(-2)


def max_error(call, ref):
    out = call[6].double()
    return ((out - ref).abs().max() / ref.abs().max()).item()

"""PLADIS on UNet cross-attention (SD1.x, SD2.x, SDXL): the attn2 replace patch.

The host's BasicTransformerBlock calls an attn2 replace patch with the projected
q, k, v of shape (batch, tokens, heads * dim_head) and applies to_out afterwards.
Nothing here imports ComfyUI: the host's dense attention is passed in.
"""
from .attention import merge_heads, pladis_attention, pladis_residual, split_heads
from .settings import PladisSettings

UNET_STAGES = ("input", "middle", "output")
# The sigma that ComfyUI's Attn2Replace assumes when called outside a sampler.
_NO_SIGMA = 999999999.9


class PladisAttn2:
    """attn2 replace patch: PLADIS attention, chained over an earlier replacement.

    inner: the replacement that was on this block before (another pack's), or None.
    When there is one, PLADIS adds scale * (sparse - dense) v to its output.
    callbacks: the IPAdapter protocol. Packs that find a patch on their block call
    add(callback, **kwargs); each callback's result is added to the output while the
    current sigma lies in [kwargs["sigma_end"], kwargs["sigma_start"]].
    """

    def __init__(self, settings, dense_attention, inner=None, callbacks=()):
        self.settings = settings
        self.dense_attention = dense_attention
        self.inner = inner
        self.callbacks = [(callback, dict(kwargs)) for callback, kwargs in callbacks]

    def add(self, callback, **kwargs):
        self.callbacks.append((callback, kwargs))

    def __call__(self, q, k, v, extra_options):
        if self.settings.is_identity:
            return self._run_callbacks(self._base(q, k, v, extra_options), q, k, v, extra_options).to(q.dtype)
        heads = extra_options["n_heads"]
        active = self.settings.active_rows(extra_options.get("sigmas"), q.shape[0])
        if self.inner is None and active is None:
            out = merge_heads(pladis_attention(*split_heads(heads, q, k, v), **self.settings.method()))
        else:
            out = self._base(q, k, v, extra_options)
            if active is None:
                out = out + merge_heads(pladis_residual(*split_heads(heads, q, k, v), **self.settings.method()))
            elif bool(active.any()):
                rows = active.nonzero().flatten()
                residual = pladis_residual(*split_heads(heads, q[rows], k[rows], v[rows]), **self.settings.method())
                out = out.index_add(0, rows, merge_heads(residual).to(out.dtype))
        return self._run_callbacks(out, q, k, v, extra_options).to(q.dtype)

    def _base(self, q, k, v, extra_options):
        if self.inner is not None:
            return self.inner(q, k, v, extra_options)
        # Passing transformer_options lets an attention override (Sage, ...) serve the dense part.
        return self.dense_attention(
            q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"), transformer_options=extra_options
        )

    def _run_callbacks(self, out, q, k, v, extra_options):
        if not self.callbacks:
            return out
        sigmas = extra_options.get("sigmas")
        sigma = float(sigmas.flatten()[0]) if sigmas is not None else _NO_SIGMA
        for callback, kwargs in self.callbacks:
            if kwargs.get("sigma_end", 0.0) <= sigma <= kwargs.get("sigma_start", _NO_SIGMA):
                out = out + callback(out, q, k, v, extra_options, **kwargs)
        return out

    def to(self, device_or_dtype):
        """The host moves patches with the model (device, then dtype); only a chained patch holds tensors."""
        if hasattr(self.inner, "to"):
            self.inner = self.inner.to(device_or_dtype)
        return self

    def models(self):
        return self.inner.models() if hasattr(self.inner, "models") else []

    def __deepcopy__(self, memo):
        # ComfyUI 0.3.75 deep-copies model_options on clone: keep that cheap. Settings are
        # immutable and the chained patch is never mutated by us; the callback list is
        # per clone because add() appends to it.
        return PladisAttn2(self.settings, self.dense_attention, self.inner, self.callbacks)


def is_unet(diffusion_model):
    return all(hasattr(diffusion_model, f"{stage}_blocks") for stage in ("input", "output")) and hasattr(
        diffusion_model, "middle_block"
    )


def cross_attention_blocks(diffusion_model):
    """{(stage, number): transformer depth} for every UNet block with cross-attention.

    number is the index the host puts into transformer_options["block"]: the position in
    input_blocks / output_blocks, and 0 for the middle block.
    """
    stages = {
        "input": enumerate(diffusion_model.input_blocks),
        "middle": [(0, diffusion_model.middle_block)],
        "output": enumerate(diffusion_model.output_blocks),
    }
    found = {}
    for stage in UNET_STAGES:
        for number, block in stages[stage]:
            depth = sum(
                getattr(tb, "attn2", None) is not None
                for layer in block
                for tb in getattr(layer, "transformer_blocks", ())
            )
            if depth:
                found[(stage, number)] = depth
    return found


def register_attn2_patches(model, blocks, settings, dense_attention):
    """Put a PladisAttn2 on every cross-attention layer of the given blocks of a cloned ModelPatcher.

    The key follows the convention of the IPAdapter family so that their add() finds us:
    (stage, number) where the block holds one transformer, (stage, number, index) otherwise,
    and always the key the host would look up first if another pack already used it.
    Layers an earlier Apply PLADIS patched outside these blocks go back to plain attention,
    keeping what it had chained, so that the later node's settings are the whole truth.
    Returns (layers patched, layers returned to plain attention).
    """
    replaced = model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
    written = set()
    for (stage, number), depth in blocks.items():
        for index in range(depth):
            long_key, short_key = (stage, number, index), (stage, number)
            key = long_key if depth > 1 or long_key in replaced else short_key
            _replace(model, key, replaced.get(long_key, replaced.get(short_key)), settings, dense_attention)
            written.add(key)
    stale = [key for key, patch in replaced.items() if isinstance(patch, PladisAttn2) and key not in written]
    for key in stale:
        _replace(model, key, replaced[key], PladisSettings(0.0, settings.alpha), dense_attention)
    return len(written), len(stale)


def _replace(model, key, previous, settings, dense_attention):
    if isinstance(previous, PladisAttn2):  # applied again: the new settings win
        inner, callbacks = previous.inner, previous.callbacks
    else:
        inner, callbacks = previous, ()
    patch = PladisAttn2(settings, dense_attention, inner, callbacks)
    model.set_model_attn2_replace(patch, key[0], key[1], key[2] if len(key) == 3 else None)

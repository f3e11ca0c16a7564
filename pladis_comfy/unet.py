"""PLADIS on UNet cross-attention (SD1.x, SD2.x, SDXL): the attn2 replace patch.

The host's BasicTransformerBlock calls an attn2 replace patch with the projected
q, k, v of shape (batch, tokens, heads * dim_head) and applies to_out afterwards.
Around the patches, three host hooks keep PLADIS correct whatever else runs:

- copy_on_clone (ON_CLONE): newer ComfyUI shares the objects in model_options between
  clones; each clone gets its own patch objects, so that another node's add() on a model
  downstream never reaches the model it came from.
- UnetEvaluation (APPLY_MODEL): a later node that put its own replacement on a patched
  layer (or on its whole block) is served under PLADIS for that evaluation, not dropped.
- conds.ContextLengths (CALC_COND_BATCH): when the host batches conds whose contexts
  differ in length, it repeats the shorter ones to a common length. Softmax cannot tell;
  entmax can. The patch then keeps each sample's own context once (conds.own_text).

Nothing here imports ComfyUI: the host's dense attention is passed in.
"""
import contextvars


from ..pladis_core.attention import merge_heads, pladis_attention, pladis_residual, split_heads
from ..pladis_core.settings import PladisSettings
from .conds import own_text
from .evaluation import acted, current_sigma, evaluating, samples_in_range

UNET_STAGES = ("input", "middle", "output")
# The sigma that ComfyUI's Attn2Replace assumes when called outside a sampler.
_NO_SIGMA = 999999999.9


class _Chain:
    """One call of a chained patch: did a PladisAttn2 run inside it?"""

    pladis_inside = False


_CHAIN = contextvars.ContextVar("pladis_attn2_chain")


class PladisAttn2:
    """attn2 replace patch: PLADIS attention, chained over an earlier replacement.

    inner: the replacement that was on this layer before (another pack's), or None.
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

    def copy(self, inner=None):
        """The same patch with a list of callbacks of its own (and another inner, if given)."""
        return PladisAttn2(self.settings, self.dense_attention, self.inner if inner is None else inner, self.callbacks)

    def __call__(self, q, k, v, extra_options):
        enclosing = _CHAIN.get(None)
        if enclosing is not None:  # a later node's patch that chains this one runs inside a PladisAttn2
            enclosing.pladis_inside = True
        if self.settings.is_identity:
            return self._run_callbacks(self._base(q, k, v, extra_options)[0], q, k, v, extra_options).to(q.dtype)
        heads = extra_options["n_heads"]
        active = samples_in_range(self.settings, extra_options.get("sigmas"), q.shape[0], q.device)
        own = own_text(extra_options, q.shape[0], k.shape[1], q.device)
        mask = None if own is None else own[:, None, None, :]
        if self.inner is None and active is None:
            acted()
            out = merge_heads(pladis_attention(*split_heads(heads, q, k, v), mask=mask, **self.settings.method()))
        else:
            out, pladis_inside = self._base(q, k, v, extra_options)
            if not pladis_inside:  # else PLADIS acted in the chained patch already: once is the method
                out = self._plus_residual(out, q, k, v, heads, active, mask)
        return self._run_callbacks(out, q, k, v, extra_options).to(q.dtype)

    def _plus_residual(self, out, q, k, v, heads, active, mask):
        """out + scale * (sparse - dense) v, for the samples in the step range."""
        if active is None:
            acted()
            return out + merge_heads(pladis_residual(*split_heads(heads, q, k, v), mask=mask, **self.settings.method()))
        if not len(active):
            return out
        acted()
        mask = None if mask is None else mask[active]
        residual = pladis_residual(*split_heads(heads, q[active], k[active], v[active]), mask=mask, **self.settings.method())
        return out.index_add(0, active, merge_heads(residual).to(out.dtype))

    def _base(self, q, k, v, extra_options):
        """(the dense output, whether a PladisAttn2 ran inside the chained patch)."""
        if self.inner is None:
            # Passing transformer_options lets an attention override (Sage, ...) serve the dense part.
            out = self.dense_attention(
                q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"), transformer_options=extra_options
            )
            return out, False
        chain = _Chain()
        token = _CHAIN.set(chain)
        try:
            return self.inner(q, k, v, extra_options), chain.pladis_inside
        finally:
            _CHAIN.reset(token)

    def _run_callbacks(self, out, q, k, v, extra_options):
        if not self.callbacks:
            return out
        sigmas = extra_options.get("sigmas")
        sigma = current_sigma(sigmas) if sigmas is not None else _NO_SIGMA
        for callback, kwargs in self.callbacks:
            if kwargs.get("sigma_end", 0.0) <= sigma <= kwargs.get("sigma_start", _NO_SIGMA):
                out = out + callback(out, q, k, v, extra_options, **kwargs)
        return out

    def to(self, device_or_dtype):
        """The host moves patches with the model and keeps what this returns: a moved copy
        where a chained patch holds tensors, never a change to this shared object."""
        return self.copy(inner=self.inner.to(device_or_dtype)) if hasattr(self.inner, "to") else self

    def models(self):
        return self.inner.models() if hasattr(self.inner, "models") else []

    def __deepcopy__(self, memo):
        return self.copy()  # ComfyUI 0.3.75 deep-copies model_options on clone: keep that cheap


def copy_on_clone(original, clone):
    """ON_CLONE callback: the clone's own copy of every PladisAttn2 it shares with the original."""
    find = lambda patcher: patcher.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})  # noqa: E731
    theirs, ours = find(original), find(clone)
    if ours is theirs:
        return
    for key, patch in ours.items():
        if isinstance(patch, PladisAttn2) and theirs.get(key) is patch:
            ours[key] = patch.copy()


class UnetEvaluation:
    """APPLY_MODEL wrapper: PLADIS on each chosen layer, whatever a later node put there.

    A layer's replacement is the host's lookup: (stage, number, index), else (stage, number).
    Where that is another node's patch (one that replaced PLADIS's, or a block-wide one that
    PLADIS's would hide), this evaluation gets a PladisAttn2 chained over it. Layers without
    any replacement are left so: TGATE (after its gate) and the preview take them off on purpose.
    """

    def __init__(self, layers, settings, dense_attention):
        self.layers = tuple(layers)  # (stage, number, index) of every chosen layer
        self.settings = settings
        self.dense_attention = dense_attention

    def __call__(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        replaces = transformer_options.get("patches_replace", {})
        attn2 = self.served(replaces.get("attn2", {}))
        if attn2 is not None:
            transformer_options = {**transformer_options, "patches_replace": {**replaces, "attn2": attn2}}
        with evaluating(transformer_options.get("sigmas")):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    def served(self, attn2):
        """attn2 with PLADIS chained over the other nodes' patches on chosen layers, or None if none needs it."""
        changed = {}
        for stage, number, index in self.layers:
            long_key = (stage, number, index)
            found, block_wide = attn2.get(long_key), attn2.get((stage, number))
            if isinstance(found, PladisAttn2):
                if found.inner is None and block_wide is not None and not isinstance(block_wide, PladisAttn2):
                    changed[long_key] = found.copy(inner=block_wide)
            elif found is not None or (block_wide is not None and not isinstance(block_wide, PladisAttn2)):
                changed[long_key] = PladisAttn2(self.settings, self.dense_attention, found or block_wide)
        return {**attn2, **changed} if changed else None


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
    and always the key the host would look up first if another pack already used it. A patch
    on that same key is chained; a block-wide one under a per-layer key is chained at each
    evaluation (UnetEvaluation), as the host's lookup would reach it.
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
            _replace(model, key, replaced.get(key), settings, dense_attention)
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

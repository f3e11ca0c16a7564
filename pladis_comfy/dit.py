"""PLADIS inside transformer (DiT) models: joint attention and DiT cross-attention.

Joint-attention models (Flux, Chroma, SD3, Qwen-Image, Lumina2) and Wan call the host's
attention with transformer_options, so an optimized_attention_override reaches them.
Three pieces meet at run time:

- BlockTag, an object patch on a block's forward, names the block for the attention
  calls made inside it (the host does not name blocks in every model and version).
- DitEvaluation, the APPLY_MODEL wrapper, gives each model evaluation its text length and
  sigmas, and installs the override for that evaluation only, outermost over whatever
  override the options hold then. Another node's override, set before or after ours (Sage
  attention, attention backends, sparse attention re-installed every step), thus serves the
  dense attention and can never drop PLADIS.
- PladisOverride, the override itself: the dense attention of every call as the host (or that
  other override) computes it, plus the PLADIS correction in calls of the chosen blocks.

PixArt and HunyuanDiT call attention without transformer_options; PladisForward replaces
their cross-attention modules' forward instead. Nothing here imports ComfyUI.
"""
import contextvars

from ..pladis_core.attention import joint_residual, merge_heads, pladis_attention, pladis_residual
from ..pladis_core.logs import warn_once
from .patching import ForwardPatch, running

JOINT, CROSS = "joint", "cross"
# The host's transformer_options key for an attention override.
OVERRIDE_KEY = "optimized_attention_override"
_BLOCK = contextvars.ContextVar("pladis_block")
_EVALUATION = contextvars.ContextVar("pladis_evaluation")


class Evaluation:
    """One model evaluation: what the patches need, and what they saw (for the log)."""

    def __init__(self, text_tokens, sigmas, blocks):
        self.text_tokens = text_tokens  # text tokens at the front of a joint sequence (0 where unknown)
        self.sigmas = sigmas  # this evaluation's transformer_options["sigmas"]
        self.blocks = blocks  # the blocks that the override acts in
        self.tagged_runs = 0  # runs of tagged block forwards
        self.override_calls = 0  # attention calls that reached the override
        self.unreached = False  # a chosen block ran without any attention call reaching the override


class BlockTag(ForwardPatch):
    """Object patch on `<path>.forward` that names the block to the attention calls inside.

    key: the block as the nodes number them, e.g. ("double", 3).
    layout: JOINT (text tokens first, then image tokens, in one sequence) or CROSS (image
    queries, text keys).
    call: the attention call inside the forward that PLADIS applies to (Wan I2V attends
    to the CLIP image tokens first, then to the text).
    """

    def __init__(self, forward, path, module, key, layout, call=0):
        super().__init__(forward, path, module)
        self.key = key
        self.layout = layout
        self.call = call

    def __call__(self, *args, **kwargs):
        run = _BlockRun(self)
        token = _BLOCK.set(run)
        try:
            return self.inner(*args, **kwargs)
        finally:
            _BLOCK.reset(token)
            evaluation = _EVALUATION.get(None)
            if evaluation is not None:
                evaluation.tagged_runs += 1
                evaluation.unreached |= run.calls == 0 and self.key in evaluation.blocks


class _BlockRun:
    """One run of a tagged forward: counts its attention calls that reach the override."""

    def __init__(self, tag):
        self.tag = tag
        self.calls = 0

    def next_call_is_patched(self):
        self.calls += 1
        return self.calls - 1 == self.tag.call


class DitEvaluation:
    """APPLY_MODEL wrapper: names the running model and the evaluation to the patches, and
    installs this evaluation's attention override.

    text_tokens(diffusion_model, context, conds) counts the text tokens that lead a joint
    sequence (None for cross-attention); it raises NotImplementedError for a layout it does not
    know, and that evaluation stays dense (with a warning, once).
    make_override(earlier) -> the override over `earlier` (the options' override, or None);
    None where attention is reached through forward patches instead (PladisForward).
    """

    def __init__(self, layout, blocks, text_tokens=None, make_override=None):
        self.layout = layout
        self.blocks = frozenset(blocks)
        self.text_tokens = text_tokens
        self.make_override = make_override

    def __call__(self, executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        diffusion_model = executor.class_obj.diffusion_model
        count = 0
        if self.text_tokens is not None and c_crossattn is not None:
            try:
                count = self.text_tokens(diffusion_model, c_crossattn, kwargs)
            except NotImplementedError as unknown:
                warn_once(f"PLADIS: {unknown}; those evaluations keep plain attention")
        evaluation = Evaluation(count, transformer_options.get("sigmas"), self.blocks)
        if self.make_override is not None:
            transformer_options = {**transformer_options, OVERRIDE_KEY: self.make_override(transformer_options.get(OVERRIDE_KEY))}
        token = _EVALUATION.set(evaluation)
        try:
            with running(diffusion_model):
                return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            _EVALUATION.reset(token)
            self._report(evaluation)

    def _report(self, evaluation):
        if self.make_override is None:
            return
        if evaluation.unreached:
            warn_once("PLADIS: attention inside patched blocks did not reach PLADIS, so those blocks kept plain attention: "
                      "a node replaced ComfyUI's attention override inside the model call (a model or diffusion-model wrapper)")
        if self.layout == JOINT and evaluation.override_calls and not evaluation.tagged_runs:
            warn_once("PLADIS: no patched block ran its own forward, so PLADIS did nothing: a node after PLADIS replaced "
                      "the blocks' forward without calling the one it found")


class PladisOverride:
    """optimized_attention_override of one evaluation: dense attention everywhere, plus PLADIS
    in the chosen blocks.

    earlier: the override the options held (another node's); it serves the dense attention
    of every call, so its backend (Sage, sparse attention...) keeps working.
    """

    def __init__(self, settings, blocks, earlier=None):
        self.settings = settings
        self.blocks = frozenset(blocks)
        self.earlier = earlier

    def __call__(self, func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False, **kwargs):
        options = dict(mask=mask, attn_precision=attn_precision, skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape, **kwargs)
        out = _dense(self.earlier, func, q, k, v, heads, options)
        run, evaluation = _patched_call(self.blocks)
        if run is None or self.settings.is_identity:
            return out
        sigmas = (kwargs.get("transformer_options") or {}).get("sigmas", evaluation.sigmas if evaluation else None)
        active = self.settings.active_rows(sigmas, q.shape[0])
        if active is not None and not bool(active.any()):
            return out
        q, k, v = _heads_first(heads, skip_reshape, q, k, v)
        method = dict(self.settings.method(), softmax_scale=kwargs.get("scale"))
        rows, correction = _correction(run.tag.layout, q, k, v, _four_dimensional(mask), active, evaluation, method)
        if correction is None:
            return out
        batch = slice(None) if active is None else active.nonzero().flatten()
        if skip_output_reshape:
            out[batch, :, rows] += correction.to(out.dtype)
        else:
            out[batch, rows] += merge_heads(correction).to(out.dtype)
        return out


def _correction(layout, q, k, v, mask, active, evaluation, method):
    """(query rows, the correction for them) or (None, None) when the call has no text to sharpen."""
    if active is not None:
        q, k, v = q[active], k[active], v[active]
        if mask is not None and mask.shape[0] == active.shape[0]:
            mask = mask[active]
    if layout == CROSS:
        return slice(None), pladis_residual(q, k, v, mask=mask, **method)
    found = _joint_layout(evaluation, q.shape[-2], mask)
    if found is None:
        return None, None
    text, image, mask = found
    return image, joint_residual(q[..., image, :], k, v, text, mask=mask, **method)


def _patched_call(blocks):
    """(the block run, the evaluation) when this attention call is the one to patch in a chosen block, else (None, None)."""
    run, evaluation = _BLOCK.get(None), _EVALUATION.get(None)
    if evaluation is not None:
        evaluation.override_calls += 1
    if run is None or not run.next_call_is_patched() or run.tag.key not in blocks:
        return None, None
    return run, evaluation


def _dense(earlier, func, q, k, v, heads, options):
    """The dense attention: the other node's override, else the host's backend."""
    return earlier(func, q, k, v, heads, **options) if earlier is not None else func(q, k, v, heads, **options)


def _heads_first(heads, skip_reshape, q, k, v):
    """(batch, heads, tokens, dim) tensors; the keys and values of grouped-query attention
    (fewer heads, `enable_gqa`) repeated so that each serves its group of query heads."""
    if not skip_reshape:
        # SD3 hands over v as (batch, tokens, heads, dim) already; keys may have fewer heads.
        dim = q.shape[-1] // heads
        q, k, v = (t.reshape(t.shape[0], t.shape[1], -1, dim).transpose(1, 2) for t in (q, k, v))
    return [q] + [t.repeat_interleave(heads // t.shape[1], dim=1) if t.shape[1] != heads else t for t in (k, v)]


def _joint_layout(evaluation, tokens, mask):
    """(text keys, image query rows, the mask of those rows) of a joint sequence, or None
    where this evaluation has no text to sharpen (text first, then the image tokens)."""
    text = evaluation.text_tokens if evaluation else 0
    if not 0 < text < tokens:
        return None
    image = slice(text, None)
    if mask is not None and mask.shape[-2] == tokens:
        mask = mask[..., image, :]
    return slice(0, text), image, mask


class CaptureOverride:
    """optimized_attention_override for "PLADIS Attention Preview": records the token maps of
    every tagged block's text attention (see preview.MapCollector), and changes nothing."""

    def __init__(self, collector, blocks, earlier=None):
        self.collector = collector
        self.blocks = frozenset(blocks)
        self.earlier = earlier

    def __call__(self, func, q, k, v, heads, mask=None, skip_reshape=False, **kwargs):
        run, evaluation = _patched_call(self.blocks)
        if run is not None:
            qh, kh, _ = _heads_first(heads, skip_reshape, q[:1], k[:1], v[:1])
            first = _four_dimensional(mask)
            first = first[:1] if first is not None and first.shape[0] == q.shape[0] else first
            if run.tag.layout == CROSS:
                self.collector.add(qh, kh, mask=first, softmax_scale=kwargs.get("scale"))
            elif (layout := _joint_layout(evaluation, qh.shape[-2], first)) is not None:
                text, image, image_mask = layout
                self.collector.add(qh[..., image, :], kh, text=text, mask=image_mask, softmax_scale=kwargs.get("scale"))
        return _dense(self.earlier, func, q, k, v, heads, dict(mask=mask, skip_reshape=skip_reshape, **kwargs))


class CaptureForward(ForwardPatch):
    """Object patch on a PixArt / HunyuanDiT cross-attention forward for the preview: records
    the token maps from the module's projections, then runs the forward unchanged."""

    def __init__(self, forward, path, module, adapter, collector):
        super().__init__(forward, path, module)
        self.adapter = adapter
        self.collector = collector

    def __call__(self, *args, **kwargs):
        q, k, _, _ = self.adapter(self.module(), *args, **kwargs)
        self.collector.add(q[:1], k[:1])
        return self.inner(*args, **kwargs)


def _four_dimensional(mask):
    """The host's masks come as (queries, keys), (batch, queries, keys) or four-dimensional."""
    if mask is None or mask.dim() == 4:
        return mask
    if mask.dim() == 2:
        return mask[None, None]
    return mask[:, None]


class PladisForward(ForwardPatch):
    """Object patch on the forward of a cross-attention module that calls the host's
    attention without transformer_options (PixArt, HunyuanDiT).

    adapter(module, *args, **kwargs) -> (q, k, v, finish): the module's projections as
    (batch, heads, tokens, dim), and finish(attention output) -> the forward's result.
    Out of the step range, or outside a sampling run, the wrapped forward runs unchanged.
    """

    def __init__(self, forward, path, module, adapter, settings):
        super().__init__(forward, path, module)
        self.adapter = adapter
        self.settings = settings

    def __call__(self, *args, **kwargs):
        evaluation = _EVALUATION.get(None)
        if evaluation is None or self.settings.is_identity:
            return self.inner(*args, **kwargs)
        q, k, v, finish = self.adapter(self.module(), *args, **kwargs)
        active = self.settings.active_rows(evaluation.sigmas, q.shape[0])
        if active is not None and not bool(active.any()):
            return self.inner(*args, **kwargs)
        out = pladis_attention(q, k, v, **self.settings.method())
        if active is not None:  # samples outside the step range get plain attention
            dense = dict(self.settings.method(), scale=0.0)
            out[~active] = pladis_attention(q[~active], k[~active], v[~active], **dense)
        return finish(out)

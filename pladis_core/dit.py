"""PLADIS inside transformer (DiT) models: joint attention and DiT cross-attention.

Joint-attention models (Flux, Chroma, SD3, Qwen-Image, Lumina2) and Wan call the host's
attention with transformer_options, so one optimized_attention_override reaches them.
Three pieces meet at run time:

- BlockTag, an object patch on a block's forward, names the block for the attention
  calls made inside it (the host does not name blocks in every model and version).
- evaluation_wrapper (APPLY_MODEL) tells each model evaluation how many text tokens lead
  the joint sequence, and its sigmas.
- PladisOverride, the override itself: the host's dense attention (or the override that
  was installed before ours) serves every call; calls in chosen blocks get the PLADIS
  correction added to it.

PixArt and HunyuanDiT call attention without transformer_options; PladisForward replaces
their cross-attention modules' forward instead. Nothing here imports ComfyUI.
"""
import contextvars
import logging
from dataclasses import dataclass

from .attention import joint_residual, merge_heads, pladis_attention, pladis_residual, split_heads

JOINT, CROSS = "joint", "cross"
_BLOCK = contextvars.ContextVar("pladis_block")
_EVALUATION = contextvars.ContextVar("pladis_evaluation")


@dataclass(frozen=True)
class Evaluation:
    text_tokens: int  # text tokens at the front of a joint sequence (0 where unknown)
    sigmas: object  # this evaluation's transformer_options["sigmas"]


class BlockTag:
    """Object patch on `<module>.forward` that names the block to the attention calls inside.

    key: the block as the nodes number them, e.g. ("double", 3).
    layout: JOINT (text tokens first, then image tokens, in one sequence) or CROSS (image
    queries, text keys).
    call: the attention call inside the forward that PLADIS applies to (Wan I2V attends
    to the CLIP image tokens first, then to the text).
    """

    def __init__(self, forward, key, layout, call=0):
        self.forward = forward  # the forward it wraps (the module's own, or another patch)
        self.key = key
        self.layout = layout
        self.call = call

    def __call__(self, *args, **kwargs):
        token = _BLOCK.set(_BlockRun(self))
        try:
            return self.forward(*args, **kwargs)
        finally:
            _BLOCK.reset(token)


class _BlockRun:
    """One run of a tagged forward: counts its attention calls."""

    def __init__(self, tag):
        self.tag = tag
        self.calls = 0

    def next_call_is_patched(self):
        self.calls += 1
        return self.calls - 1 == self.tag.call


def evaluation_wrapper(text_tokens):
    """APPLY_MODEL wrapper: each model evaluation's text length and sigmas, for the patches below.

    text_tokens(diffusion_model, context, conds) counts the text tokens that lead the joint
    sequence; it raises NotImplementedError for a layout it does not know, and that evaluation
    stays dense (with a warning, once).
    """

    def wrapper(executor, x, t, c_concat, c_crossattn, control, transformer_options, **kwargs):
        count = 0
        if text_tokens is not None and c_crossattn is not None:
            try:
                count = text_tokens(executor.class_obj.diffusion_model, c_crossattn, kwargs)
            except NotImplementedError as unknown:
                _warn_once(f"PLADIS: {unknown}; those evaluations keep plain attention")
        token = _EVALUATION.set(Evaluation(count, transformer_options.get("sigmas")))
        try:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            _EVALUATION.reset(token)

    return wrapper


_warned = set()


def _warn_once(message):
    if message not in _warned:
        _warned.add(message)
        logging.warning(message)


class PladisOverride:
    """optimized_attention_override: dense attention everywhere, plus PLADIS in the chosen blocks.

    earlier: the override another node installed before this one; it serves the dense
    attention of every call, so its backend (Sage, sparse attention...) keeps working.
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
        rows, correction = self._correction(run.tag.layout, q, k, v, _four_dimensional(mask), active, evaluation)
        if correction is None:
            return out
        batch = slice(None) if active is None else active.nonzero().flatten()
        if skip_output_reshape:
            out[batch, :, rows] += correction.to(out.dtype)
        else:
            out[batch, rows] += merge_heads(correction).to(out.dtype)
        return out

    def _correction(self, layout, q, k, v, mask, active, evaluation):
        """(query rows, the correction for them) or (None, None) when the call has no text to sharpen."""
        if active is not None:
            q, k, v = q[active], k[active], v[active]
            if mask is not None and mask.shape[0] == active.shape[0]:
                mask = mask[active]
        if layout == CROSS:
            return slice(None), pladis_residual(q, k, v, mask=mask, **self.settings.method())
        layout = _joint_layout(evaluation, q.shape[-2], mask)
        if layout is None:
            return None, None
        text, image, mask = layout
        return image, joint_residual(q[..., image, :], k, v, text, mask=mask, **self.settings.method())

    def __deepcopy__(self, memo):
        return self  # immutable; ComfyUI 0.3.75 deep-copies model options on every clone


def _patched_call(blocks):
    """(the block run, the evaluation) when this attention call is the one to patch in a chosen block, else (None, None)."""
    run = _BLOCK.get(None)
    if run is None or not run.next_call_is_patched() or run.tag.key not in blocks:
        return None, None
    return run, _EVALUATION.get(None)


def _dense(earlier, func, q, k, v, heads, options):
    """The dense attention: the override installed before ours, else the host's backend."""
    return earlier(func, q, k, v, heads, **options) if earlier is not None else func(q, k, v, heads, **options)


def _heads_first(heads, skip_reshape, *tensors):
    """(batch, heads, tokens, dim) tensors, keys and values of grouped-query attention repeated."""
    if not skip_reshape:
        tensors = split_heads(heads, *tensors)
    return [t.repeat_interleave(heads // t.shape[1], dim=1) if t.shape[1] != heads else t for t in tensors]


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
            qh, kh = _heads_first(heads, skip_reshape, q[:1], k[:1])
            first = _four_dimensional(mask)
            first = first[:1] if first is not None and first.shape[0] == q.shape[0] else first
            if run.tag.layout == CROSS:
                self.collector.add(qh, kh, mask=first)
            elif (layout := _joint_layout(evaluation, qh.shape[-2], first)) is not None:
                text, image, image_mask = layout
                self.collector.add(qh[..., image, :], kh, text=text, mask=image_mask)
        return _dense(self.earlier, func, q, k, v, heads, dict(mask=mask, skip_reshape=skip_reshape, **kwargs))

    def __deepcopy__(self, memo):
        return self


class CaptureForward:
    """Object patch on a PixArt / HunyuanDiT cross-attention forward for the preview: records
    the token maps from the module's projections, then runs the forward unchanged."""

    def __init__(self, forward, module, adapter, collector):
        self.forward = forward
        self.module = module
        self.adapter = adapter
        self.collector = collector

    def __call__(self, *args, **kwargs):
        q, k, _, _ = self.adapter(self.module, *args, **kwargs)
        self.collector.add(q[:1], k[:1])
        return self.forward(*args, **kwargs)


def _four_dimensional(mask):
    """The host's masks come as (queries, keys), (batch, queries, keys) or four-dimensional."""
    if mask is None or mask.dim() == 4:
        return mask
    if mask.dim() == 2:
        return mask[None, None]
    return mask[:, None]


class PladisForward:
    """Object patch on the forward of a cross-attention module that calls the host's
    attention without transformer_options (PixArt, HunyuanDiT).

    adapter(module, *args, **kwargs) -> (q, k, v, finish): the module's projections as
    (batch, heads, tokens, dim), and finish(attention output) -> the forward's result.
    Out of the step range, or outside a sampling run, the wrapped forward runs unchanged.
    """

    def __init__(self, forward, module, adapter, settings):
        self.forward = forward
        self.module = module
        self.adapter = adapter
        self.settings = settings

    def __call__(self, *args, **kwargs):
        evaluation = _EVALUATION.get(None)
        if evaluation is None or self.settings.is_identity:
            return self.forward(*args, **kwargs)
        q, k, v, finish = self.adapter(self.module, *args, **kwargs)
        active = self.settings.active_rows(evaluation.sigmas, q.shape[0])
        if active is not None and not bool(active.any()):
            return self.forward(*args, **kwargs)
        out = pladis_attention(q, k, v, **self.settings.method())
        if active is not None:  # samples outside the step range get plain attention
            dense = dict(self.settings.method(), scale=0.0)
            out[~active] = pladis_attention(q[~active], k[~active], v[~active], **dense)
        return finish(out)

"""PLADIS inside transformer (DiT) models: joint attention and DiT cross-attention.

Most transformers call the host's attention with transformer_options, so an
optimized_attention_override reaches them. Three pieces meet at run time:

- BlockTag, an object patch on a block's (or its attention module's) forward, names the
  block for the attention calls made inside it, with the layout of its text.
- DitEvaluation, the APPLY_MODEL wrapper, gives each model evaluation its text length and
  sigmas, and installs the override for that evaluation only, outermost over whatever
  override the options hold then. Another node's override, set before or after ours (Sage
  attention, attention backends, sparse attention re-installed every step), thus serves the
  dense attention and can never drop PLADIS.
- PladisOverride, the override itself: the dense attention of every call as the host (or that
  other override) computes it, plus the PLADIS correction in calls of the chosen blocks.

Modules that call attention without transformer_options (PixArt, HunyuanDiT, Ernie Image)
get PladisForward on their forward instead. Nothing here imports ComfyUI.

Layouts: in CROSS attention every key is text. In joint attention one sequence holds text
and image tokens: TEXT_FIRST, TEXT_LAST, or TEXT_AFTER_QUERIES, where the keys are the
queries' own (image) tokens followed by the text (Stable Cascade).
"""
import contextvars
import inspect

import torch

from ..pladis_core.attention import attention_and_logsumexp, joint_residual, merge_heads, pladis_attention, pladis_residual
from ..pladis_core.logs import warn_once
from .conds import own_text
from .evaluation import acted, evaluating, samples_in_range
from .patching import ForwardPatch, running

CROSS, TEXT_FIRST, TEXT_LAST, TEXT_AFTER_QUERIES = "cross", "text first", "text last", "text after the queries"
# The host's transformer_options key for an attention override.
OVERRIDE_KEY = "optimized_attention_override"
_BLOCK = contextvars.ContextVar("pladis_block")
_EVALUATION = contextvars.ContextVar("pladis_evaluation")


class Evaluation:
    """One model evaluation: what the patches need, and what they saw (for the log)."""

    def __init__(self, text_tokens, sigmas, blocks, options):
        self.text_tokens = text_tokens  # text tokens in a joint sequence (0 where unknown)
        self.sigmas = sigmas  # this evaluation's transformer_options["sigmas"]
        self.blocks = blocks  # the blocks that the override acts in
        self.options = options  # this evaluation's transformer_options, with the override (for calls that get none)
        self.tagged_runs = 0  # runs of tagged block forwards
        self.override_calls = 0  # attention calls that reached the override
        self.unreached = False  # a chosen block ran without any attention call reaching the override


def text_span(layout, text, queries, keys):
    """(the text keys, the image query rows) of an attention call, or None where it has no
    text beside image queries (a text-only or image-only call of a joint model)."""
    if layout == CROSS:
        return slice(None), slice(None)
    if layout == TEXT_AFTER_QUERIES:
        return (slice(queries, queries + text), slice(None)) if 0 < text <= keys - queries else None
    if not 0 < text < queries or keys != queries:
        return None
    return (slice(0, text), slice(text, None)) if layout == TEXT_FIRST else (slice(keys - text, keys), slice(0, queries - text))


class BlockTag(ForwardPatch):
    """Object patch on `<path>.forward` that names the block to the attention calls inside.

    key: the block as the nodes number them, e.g. ("double", 3).
    layout: CROSS or one of the joint layouts (see the module's docstring).
    call: the attention call inside the forward that PLADIS applies to (Wan I2V attends
    to the CLIP image tokens first, then to the text).
    """

    def __init__(self, forward, path, module, key, layout, call=0):
        super().__init__(forward, path, module)
        self.key = key
        self.layout = layout
        self.call = call
        self.takes_options = "transformer_options" in inspect.signature(type(module).forward).parameters

    def __call__(self, *args, **kwargs):
        evaluation = _EVALUATION.get(None)
        if evaluation is not None and self.takes_options and not kwargs.get("transformer_options"):
            # A model that runs this module without its options (ComfyUI 0.3.75's Wan S2V): the
            # attention would not reach the override, so the evaluation's options go in.
            kwargs["transformer_options"] = evaluation.options
        run = _BlockRun(self)
        token = _BLOCK.set(run)
        try:
            return self.inner(*args, **kwargs)
        finally:
            _BLOCK.reset(token)
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

    text_tokens(diffusion_model, context, conds) counts the text tokens of a joint sequence
    (None for cross-attention); it raises NotImplementedError for a layout it does not know,
    and that evaluation stays dense (with a warning, once).
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
        if self.text_tokens is not None:
            try:
                count = self.text_tokens(diffusion_model, c_crossattn, kwargs)
            except NotImplementedError as unknown:
                warn_once(f"PLADIS: {unknown}; those evaluations keep plain attention")
        if self.make_override is not None:
            transformer_options = {**transformer_options, OVERRIDE_KEY: self.make_override(transformer_options.get(OVERRIDE_KEY))}
        evaluation = Evaluation(count, transformer_options.get("sigmas"), self.blocks, transformer_options)
        token = _EVALUATION.set(evaluation)
        try:
            with running(diffusion_model), evaluating(evaluation.sigmas):
                return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            _EVALUATION.reset(token)
            self._report(evaluation)

    def _report(self, evaluation):
        if self.make_override is None:
            return
        if evaluation.unreached:
            warn_once("PLADIS: attention inside patched blocks did not reach PLADIS, so those blocks kept plain attention: "
                      "the model called it without ComfyUI's attention options, or a node replaced ComfyUI's attention "
                      "override inside the model call (a model or diffusion-model wrapper)")
        if self.layout != CROSS and evaluation.override_calls and not evaluation.tagged_runs:
            warn_once("PLADIS: no patched block ran its own forward, so PLADIS did nothing: a node after PLADIS replaced "
                      "the blocks' forward without calling the one it found")


class PladisOverride:
    """optimized_attention_override of one evaluation: dense attention everywhere, plus PLADIS
    in the chosen blocks.

    earlier: the override the options held (another node's); it serves the dense attention
    of every call, so its backend (Sage, sparse attention...) keeps working.
    exact: the host's functions of exact softmax attention. Where one of them would serve a
    joint call, the pack runs torch's attention kernel instead (the one scaled_dot_product_attention
    picks), which also gives each row's log-sum-exp: the text mass then costs no second pass
    over every key.
    """

    def __init__(self, settings, blocks, earlier=None, exact=()):
        self.settings = settings
        self.blocks = frozenset(blocks)
        self.earlier = earlier
        self.exact = tuple(exact)

    def __call__(self, func, q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False, **kwargs):
        options = dict(attn_precision=attn_precision, skip_reshape=skip_reshape, skip_output_reshape=skip_output_reshape, **kwargs)
        run, evaluation = _patched_call(self.blocks)
        call = None if run is None or self.settings.is_identity else _Call(run.tag.layout, heads, skip_reshape, q, k, v, mask, evaluation, kwargs)
        active = None if call is None or call.span is None else samples_in_range(self.settings, call.sigmas, q.shape[0], q.device)
        if call is None or call.span is None or (active is not None and not len(active)):
            return _dense(self.earlier, func, q, k, v, heads, dict(options, mask=mask))
        # A repeated context counts once, in the dense part too (call.mask is the host's where none is).
        dense_mask = call.dense_mask(mask, q.dtype)
        found = None
        if call.layout != CROSS and self.earlier is None:
            found = _kernel_dense(func, self.exact, call.q, call.k, call.v, _four_dimensional(dense_mask), kwargs.get("scale"))
        if found is None:
            out, row_lse = _dense(self.earlier, func, q, k, v, heads, dict(options, mask=dense_mask)), None
        else:
            out, row_lse = found
            out = out if skip_output_reshape else merge_heads(out)
        method = dict(self.settings.method(), softmax_scale=kwargs.get("scale"))
        rows, correction = _correction(call.layout, call.span, call.q, call.k, call.v, call.mask, active, method, row_lse)
        acted()
        batch = slice(None) if active is None else active
        if skip_output_reshape:
            out[batch, :, rows] += correction.to(out.dtype)
        else:
            out[batch, rows] += merge_heads(correction).to(out.dtype)
        return out


class _Call:
    """One patched attention call: q, k, v heads first, where its text is, each sample's own text."""

    def __init__(self, layout, heads, skip_reshape, q, k, v, mask, evaluation, kwargs):
        self.layout = layout
        self.q, self.k, self.v = _heads_first(heads, skip_reshape, q, k, v)
        options = kwargs.get("transformer_options") or (evaluation.options if evaluation else {})
        self.sigmas = options.get("sigmas", evaluation.sigmas if evaluation else None)
        text = evaluation.text_tokens if evaluation else 0
        self.span = text_span(layout, text, self.q.shape[-2], self.k.shape[-2])
        keys = self.k.shape[-2]
        self.keep = None  # (batch, keys) bool where a repeated context must count once
        if self.span is not None:
            text_keys = range(keys)[self.span[0]]
            own = own_text(options, q.shape[0], len(text_keys), q.device)
            if own is not None:
                self.keep = torch.ones(q.shape[0], keys, dtype=torch.bool, device=q.device)
                self.keep[:, self.span[0]] = own
        self.mask = _with_keys(_four_dimensional(mask), self.keep)

    def dense_mask(self, mask, dtype):
        """The mask for the dense call: the host's, with the repeats of a context dropped."""
        if self.keep is None:
            return mask
        return _with_keys(_four_dimensional(mask), self.keep, additive=dtype)


def _kernel_dense(func, exact, q, k, v, mask, scale):
    """(dense output, each row's log-sum-exp) of a joint call with heads first, from torch's
    attention kernel, where func, the host's attention for the call, is one of its exact
    functions: the text mass then needs no second pass over every key. None where func must
    serve it (an approximate backend such as Sage) or the kernel gives no log-sum-exp."""
    if getattr(func, "__wrapped__", func) not in exact:
        return None
    return attention_and_logsumexp(q, k, v, mask, scale)


def _correction(layout, span, q, k, v, mask, active, method, row_lse=None):
    """(query rows, the correction for them) of a call with heads first; active: the indices
    of the samples to correct, None for all; row_lse: each row's log-sum-exp over every key,
    where the dense pass gave it."""
    batch, queries = q.shape[0], q.shape[-2]
    if active is not None:
        q, k, v = q[active], k[active], v[active]
        row_lse = None if row_lse is None else row_lse[active]
        if mask is not None and mask.shape[0] == batch:
            mask = mask[active]
    text, rows = span
    if layout == CROSS:
        return rows, pladis_residual(q, k, v, mask=mask, **method)
    if mask is not None and mask.shape[-2] == queries:
        mask = mask[..., rows, :]
    row_lse = None if row_lse is None else row_lse[..., rows, :]
    return rows, joint_residual(q[..., rows, :], k, v, text, mask=mask, row_lse=row_lse, **method)


def _with_keys(mask, keep, additive=None):
    """mask (None, bool or additive, four-dimensional) with the keys outside keep (batch, keys)
    dropped; additive=dtype gives an additive mask of that dtype."""
    if keep is None:
        return mask
    keys = keep[:, None, None, :]
    if additive is None and (mask is None or mask.dtype == torch.bool):
        return keys if mask is None else mask & keys
    drop = torch.zeros(keys.shape, dtype=additive or mask.dtype, device=keep.device).masked_fill(~keys, torch.finfo(additive or mask.dtype).min)
    if mask is None:
        return drop
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=drop.dtype, device=mask.device).masked_fill(~mask, torch.finfo(drop.dtype).min)
    return mask.to(drop.dtype) + drop


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


def _four_dimensional(mask):
    """The host's masks come as (queries, keys), (batch, queries, keys) or four-dimensional."""
    if mask is None or mask.dim() == 4:
        return mask
    if mask.dim() == 2:
        return mask[None, None]
    return mask[:, None]


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
            span = text_span(run.tag.layout, evaluation.text_tokens if evaluation else 0, qh.shape[-2], kh.shape[-2])
            if span is not None:
                first = _four_dimensional(mask)
                first = first[:1] if first is not None and first.shape[0] == q.shape[0] else first
                text, rows = span
                if first is not None and first.shape[-2] == qh.shape[-2]:
                    first = first[..., rows, :]
                text = None if run.tag.layout == CROSS else text
                self.collector.add(qh[..., rows, :], kh, text=text, mask=first, softmax_scale=kwargs.get("scale"))
        return _dense(self.earlier, func, q, k, v, heads, dict(mask=mask, skip_reshape=skip_reshape, **kwargs))


class CaptureForward(ForwardPatch):
    """Object patch on an adapted attention forward for the preview: records the token maps
    from the module's projections, then runs the forward unchanged."""

    def __init__(self, forward, path, module, adapter, layout, collector):
        super().__init__(forward, path, module)
        self.adapter = adapter
        self.layout = layout
        self.collector = collector

    def __call__(self, *args, **kwargs):
        evaluation = _EVALUATION.get(None)
        q, k, _, _ = self.adapter(self.module(), *args, **kwargs)
        span = text_span(self.layout, evaluation.text_tokens if evaluation else 0, q.shape[-2], k.shape[-2])
        if span is not None:
            text, rows = span
            self.collector.add(q[:1, :, rows], k[:1], text=None if self.layout == CROSS else text)
        return self.inner(*args, **kwargs)


class PladisForward(ForwardPatch):
    """Object patch on the forward of an attention module that calls the host's attention
    without transformer_options (PixArt, HunyuanDiT, Ernie Image).

    adapter(module, *args, **kwargs) -> (q, k, v, finish): the module's projections as
    (batch, heads, tokens, dim), and finish(attention output) -> the forward's result.
    dense_attention: the host's attention on such tensors (joint layouts add the correction to
    it); exact: as for PladisOverride. Out of the step range, or outside a sampling run, the
    wrapped forward runs unchanged.
    """

    def __init__(self, forward, path, module, adapter, layout, settings, dense_attention, exact=()):
        super().__init__(forward, path, module)
        self.adapter = adapter
        self.layout = layout
        self.settings = settings
        self.dense_attention = dense_attention
        self.exact = tuple(exact)

    def __call__(self, *args, **kwargs):
        evaluation = _EVALUATION.get(None)
        if evaluation is None or self.settings.is_identity:
            return self.inner(*args, **kwargs)
        q, k, v, finish = self.adapter(self.module(), *args, **kwargs)
        span = text_span(self.layout, evaluation.text_tokens, q.shape[-2], k.shape[-2])
        active = samples_in_range(self.settings, evaluation.sigmas, q.shape[0], q.device)
        if span is None or (active is not None and not len(active)):
            return self.inner(*args, **kwargs)
        acted()
        if self.layout == CROSS and active is None:
            return finish(pladis_attention(q, k, v, **self.settings.method()))
        # Samples outside the step range keep the host's dense attention.
        found = None if self.layout == CROSS else _kernel_dense(self.dense_attention, self.exact, q, k, v, None, None)
        if found is None:
            out, row_lse = self.dense_attention(q, k, v, q.shape[1], skip_reshape=True, skip_output_reshape=True), None
        else:
            out, row_lse = found
        rows, correction = _correction(self.layout, span, q, k, v, None, active, self.settings.method(), row_lse)
        out[slice(None) if active is None else active, :, rows] += correction.to(out.dtype)
        return finish(out)

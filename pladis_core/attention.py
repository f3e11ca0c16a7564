"""The PLADIS combination of dense and sparse attention, in query chunks.

    W   = softmax(z) + scale * (entmax_alpha(z) - softmax(z)),   z = q k^T / sqrt(d) + mask
    out = W v

Joint attention (text and image keys in one softmax) sharpens only the text keys of a
row, rescaled by the row's dense mass m on them, so that the row still sums to 1:

    out = dense_out + m * scale * (entmax_alpha(z_txt) - softmax(z_txt)) v_txt

Tensors are (batch, heads, tokens, dim_head). Logits and both maps are float32 whatever
the input dtype; the product with v runs in v's dtype and the result comes back in q's.
"""
import math

import torch

from .weights import pladis_weights

DEFAULT_CHUNK_BYTES = 256 * 2**20
# float32 (batch, heads, chunk, keys) buffers alive at once while one chunk is processed:
# logits, dense map, entmax's shifted logits and Newton temporaries, the weights (measured:
# up to 7.05 on the eager path, 2.8 compiled).
_LIVE_LOGIT_BUFFERS = 8
# On the CPU, chunks whose logits fit in the cache run faster (measured best at 2-4 MiB).
CPU_CHUNK_LOGIT_BYTES = 4 * 2**20


def pladis_attention(q, k, v, scale, alpha, mask=None, chunk_bytes=DEFAULT_CHUNK_BYTES):
    """(dense + scale * (sparse - dense)) v in one pass over the logits."""
    return chunked_attention(q, k, v, lambda z: pladis_weights(z, scale, alpha), mask, chunk_bytes)


def pladis_residual(q, k, v, scale, alpha, mask=None, chunk_bytes=DEFAULT_CHUNK_BYTES):
    """scale * (sparse - dense) v: added to another implementation's dense output."""
    return chunked_attention(q, k, v, lambda z: pladis_weights(z, scale, alpha, residual=True), mask, chunk_bytes)


def joint_residual(q, k, v, text, scale, alpha, mask=None, chunk_bytes=DEFAULT_CHUNK_BYTES):
    """m * scale * (sparse - dense) v_txt for query rows that see text and image keys.

    text: the slice of k (and v) that holds the text keys; m is each row's dense mass on
    them, which needs the logits of every key, so each chunk computes them all once.
    """
    return chunked_attention(q, k, v[..., text, :], lambda z: _joint_weights(z, text, scale, alpha), mask, chunk_bytes)


def _joint_weights(z, text, scale, alpha):
    z_text = z[..., text]
    log_mass = torch.logsumexp(z_text, -1, keepdim=True) - torch.logsumexp(z, -1, keepdim=True)
    # A row without a visible text key has no mass there (and -inf - -inf would be nan).
    mass = torch.where(torch.isfinite(log_mass), log_mass.exp(), 0.0)
    return mass * pladis_weights(z_text.contiguous(), scale, alpha, residual=True)


def chunked_attention(q, k, v, weights, mask=None, chunk_bytes=DEFAULT_CHUNK_BYTES):
    """weights(z) v over chunks of queries, so float32 logits never exceed chunk_bytes.

    weights maps logits over all keys to weights over v's keys (the same, or a part).
    mask: additive (-inf drops a key) or boolean (True keeps a key), broadcastable to
    (batch, heads, queries, keys).
    """
    b, h, n, _ = q.shape
    keys = k.shape[-2]
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    row_bytes = 4 * b * h * keys
    rows = chunk_bytes // (_LIVE_LOGIT_BUFFERS * row_bytes)
    if q.device.type == "cpu":
        rows = min(rows, CPU_CHUNK_LOGIT_BYTES // row_bytes)
    rows = max(1, rows)
    kt = k.float().transpose(-1, -2) * (1.0 / math.sqrt(q.shape[-1]))
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        z = q[..., start:stop, :].float() @ kt
        if mask is not None:
            z = _apply_mask(z, _mask_rows(mask, start, stop, n))
        out[..., start:stop, :] = weights(z).to(v.dtype) @ v
    return out


def split_heads(heads, *tensors):
    """(batch, tokens, heads * dim) -> (batch, heads, tokens, dim), for each tensor (SD3 hands
    over v as (batch, tokens, heads, dim) already)."""
    return tuple(t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in tensors)


def merge_heads(x):
    return x.transpose(1, 2).flatten(-2)


def _mask_rows(mask, start, stop, n):
    """The rows of a broadcastable mask that belong to queries start:stop."""
    if mask.dim() >= 2 and mask.shape[-2] == n and n != 1:
        return mask[..., start:stop, :]
    return mask


def _apply_mask(z, mask):
    if mask.dtype == torch.bool:
        return z.masked_fill(~mask, float("-inf"))
    return z + mask.to(z.dtype)

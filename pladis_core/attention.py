"""The PLADIS combination of dense and sparse attention, in query chunks.

    W   = softmax(z) + scale * (entmax_alpha(z) - softmax(z)),   z = q k^T / sqrt(d) + mask
    out = W v

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


def chunked_attention(q, k, v, weights, mask=None, chunk_bytes=DEFAULT_CHUNK_BYTES):
    """weights(z) v over chunks of queries, so float32 logits never exceed chunk_bytes.

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


def _mask_rows(mask, start, stop, n):
    """The rows of a broadcastable mask that belong to queries start:stop."""
    if mask.dim() >= 2 and mask.shape[-2] == n and n != 1:
        return mask[..., start:stop, :]
    return mask


def _apply_mask(z, mask):
    if mask.dtype == torch.bool:
        return z.masked_fill(~mask, float("-inf"))
    return z + mask.to(z.dtype)

"""The PLADIS combination of dense and sparse attention, in query chunks.

    W   = softmax(z) + scale * (entmax_alpha(z) - softmax(z)),   z = q k^T / sqrt(d) + mask
    out = W v

Joint attention (text and image keys in one softmax) sharpens only the text keys of a
row, rescaled by the row's dense mass m on them, so that the row still sums to 1:

    out = dense_out + m * scale * (entmax_alpha(z_txt) - softmax(z_txt)) v_txt

Tensors are (batch, heads, tokens, dim_head). Logits and both maps are float32 whatever
the input dtype; the product with v runs in v's dtype and the result comes back in q's.
"""
import logging
import math

import torch

from .weights import acceleration_enabled, pladis_weights

DEFAULT_CHUNK_BYTES = 256 * 2**20
# float32 (batch, heads, chunk, keys) buffers alive at once while one chunk is processed:
# logits, dense map, entmax's shifted logits and Newton temporaries, the weights (measured:
# up to 7.05 on the eager path, 2.8 compiled).
_LIVE_LOGIT_BUFFERS = 8
# The same for the log-sum-exp over all keys: logits, and exp's temporary.
_LSE_LIVE_BUFFERS = 3
# On the CPU, chunks whose logits fit in the cache run faster (measured best at 2-4 MiB).
CPU_CHUNK_LOGIT_BYTES = 4 * 2**20


def pladis_attention(q, k, v, scale, alpha, mask=None, chunk_bytes=DEFAULT_CHUNK_BYTES):
    """(dense + scale * (sparse - dense)) v in one pass over the logits."""
    return chunked_attention(q, k, v, lambda z, rows: pladis_weights(z, scale, alpha), mask, chunk_bytes)


def pladis_residual(q, k, v, scale, alpha, mask=None, chunk_bytes=DEFAULT_CHUNK_BYTES):
    """scale * (sparse - dense) v: added to another implementation's dense output."""
    return chunked_attention(q, k, v, lambda z, rows: pladis_weights(z, scale, alpha, residual=True), mask, chunk_bytes)


def joint_residual(q, k, v, text, scale, alpha, mask=None, chunk_bytes=DEFAULT_CHUNK_BYTES):
    """m * scale * (sparse - dense) v_txt for query rows that see text and image keys.

    text: the slice of k (and v) that holds the text keys. m, each row's dense mass on
    them, needs the row's log-sum-exp over every key (row_logsumexp); the rest is
    computed on the (queries x text keys) block alone.
    """
    row_lse = row_logsumexp(q, k, mask, chunk_bytes)
    if mask is not None and mask.shape[-1] == k.shape[-2]:
        mask = mask[..., text]
    text_weights = lambda z, rows: _joint_weights(z, row_lse[..., rows, :], scale, alpha)  # noqa: E731
    # Contiguous once, rather than copied by every chunk's matmul.
    k_text, v_text = (t[..., text, :].contiguous() for t in (k, v))
    return chunked_attention(q, k_text, v_text, text_weights, mask, chunk_bytes)


def _joint_weights(z_text, row_lse, scale, alpha):
    log_mass = torch.logsumexp(z_text, -1, keepdim=True) - row_lse
    # A row without a visible text key has no mass there (and -inf - -inf would be nan).
    mass = torch.where(torch.isfinite(log_mass), log_mass.exp(), 0.0)
    return mass * pladis_weights(z_text, scale, alpha, residual=True)


def row_logsumexp(q, k, mask=None, chunk_bytes=DEFAULT_CHUNK_BYTES):
    """log sum_j exp(z_j) over every key, per query row: float32 (batch, heads, queries, 1).

    torch's memory-efficient attention kernels compute it on the way (on the CPU its flash
    kernel; on CUDA its flash or memory-efficient kernel, without masks); where none serves,
    chunks of float32 logits.
    """
    kernel = _LSE_KERNELS.get(q.device.type) if acceleration_enabled() else None
    if kernel is not None:
        try:
            lse = kernel(q, k, None if mask is None else _additive(mask, q.dtype))
        except Exception as error:  # an old torch, or a shape or dtype the kernel refuses
            logging.warning(f"PLADIS: torch's attention kernel gave no log-sum-exp on {q.device.type}, computing it in chunks: {error}")
            _LSE_KERNELS[q.device.type] = None
        else:
            if lse is not None:
                return lse.float().unsqueeze(-1)
    out = torch.empty(*q.shape[:-1], 1, dtype=torch.float32, device=q.device)
    kt, scale = k.float().transpose(-1, -2), 1.0 / math.sqrt(q.shape[-1])
    for rows in _row_chunks(q, k.shape[-2], _LSE_LIVE_BUFFERS, chunk_bytes):
        z = (q[..., rows, :].float() * scale) @ kt  # scaling q, not k: no copy of the keys
        if mask is not None:
            z = _apply_mask(z, _mask_rows(mask, rows, q.shape[-2]))
        out[..., rows, :] = torch.logsumexp(z, -1, keepdim=True)
    return out


def _cuda_logsumexp(q, k, mask):
    if mask is not None:
        return None  # its bias would have to be a full (queries x keys) tensor: chunks instead
    if q.dtype in (torch.float16, torch.bfloat16):
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, k)[1]
    # Its log-sum-exp has the rows padded to a multiple of 32.
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, k, None, True)[1][..., : q.shape[-2]]


# The attention output is a by-product (k stands in for v); the log-sum-exp is what is used.
_LSE_KERNELS = {
    "cpu": lambda q, k, mask: torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, k, attn_mask=mask)[1],
    "cuda": _cuda_logsumexp,
}


def chunked_attention(q, k, v, weights, mask=None, chunk_bytes=DEFAULT_CHUNK_BYTES):
    """weights(z, rows) v over chunks of query rows, so float32 logits never exceed chunk_bytes.

    mask: additive (-inf drops a key) or boolean (True keeps a key), broadcastable to
    (batch, heads, queries, keys).
    """
    out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
    kt, scale = k.float().transpose(-1, -2), 1.0 / math.sqrt(q.shape[-1])
    for rows in _row_chunks(q, k.shape[-2], _LIVE_LOGIT_BUFFERS, chunk_bytes):
        z = (q[..., rows, :].float() * scale) @ kt
        if mask is not None:
            z = _apply_mask(z, _mask_rows(mask, rows, q.shape[-2]))
        out[..., rows, :] = weights(z, rows).to(v.dtype) @ v
    return out


def _row_chunks(q, keys, live_buffers, chunk_bytes):
    """Slices of query rows whose live float32 (batch, heads, rows, keys) buffers fit chunk_bytes."""
    b, h, n, _ = q.shape
    row_bytes = 4 * b * h * keys
    rows = chunk_bytes // (live_buffers * row_bytes)
    if q.device.type == "cpu":
        rows = min(rows, CPU_CHUNK_LOGIT_BYTES // row_bytes)
    rows = max(1, rows)
    return [slice(start, min(n, start + rows)) for start in range(0, n, rows)]


def split_heads(heads, *tensors):
    """(batch, tokens, heads * dim) -> (batch, heads, tokens, dim), for each tensor (SD3 hands
    over v as (batch, tokens, heads, dim) already)."""
    return tuple(t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in tensors)


def merge_heads(x):
    return x.transpose(1, 2).flatten(-2)


def _mask_rows(mask, rows, n):
    """The rows of a broadcastable mask that belong to the queries rows (a slice of n)."""
    if mask.dim() >= 2 and mask.shape[-2] == n and n != 1:
        return mask[..., rows, :]
    return mask


def _additive(mask, dtype):
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def _apply_mask(z, mask):
    if mask.dtype == torch.bool:
        return z.masked_fill(~mask, float("-inf"))
    return z + mask.to(z.dtype)

"""The PLADIS combination of dense and sparse attention, in query chunks.

    W   = softmax(z) + scale * (entmax_alpha(z) - softmax(z)),   z = q k^T / sqrt(d) + mask
    out = W v

Joint attention (text and image keys in one softmax) sharpens only the text keys of a
row, rescaled by the row's dense mass m on them, so that the row still sums to 1:

    out = dense_out + m * scale * (entmax_alpha(z_txt) - softmax(z_txt)) v_txt

Tensors are (batch, heads, tokens, dim_head). Logits and both maps are float32 whatever
the input dtype; the product with v runs in v's dtype and the result comes back in q's.
softmax_scale multiplies q k^T (None: 1 / sqrt(dim_head), as the host's attention does).
"""
import logging

import torch

from .logs import warn_once
from .weights import pladis_weights, row_kernel_serves

DEFAULT_CHUNK_BYTES = 256 * 2**20
# float32 (batch, heads, chunk, keys) buffers alive at once while one chunk is processed:
# logits, the unnormalised softmax, entmax's shifted logits and Newton temporaries, the
# weights (measured on the CPU: up to 6.1 op by op, 2.8 with the row kernel), with room for
# the compiled kernels' own.
_LIVE_LOGIT_BUFFERS = 8
# The same for the log-sum-exp over all keys: logits, and exp's temporary.
_LSE_LIVE_BUFFERS = 3
# On the CPU, chunks whose logits fit in the cache run faster: measured best at 4 MiB with the
# row kernel, and at half that op by op, where every pass writes a chunk-sized buffer.
CPU_CHUNK_LOGIT_BYTES = 4 * 2**20


def pladis_attention(q, k, v, scale, alpha, mask=None, chunk_bytes=DEFAULT_CHUNK_BYTES, softmax_scale=None):
    """(dense + scale * (sparse - dense)) v in one pass over the logits."""
    return chunked_attention(q, k, v, lambda z, rows: pladis_weights(z, scale, alpha), mask, chunk_bytes, softmax_scale)


def pladis_residual(q, k, v, scale, alpha, mask=None, chunk_bytes=DEFAULT_CHUNK_BYTES, softmax_scale=None):
    """scale * (sparse - dense) v: added to another implementation's dense output."""
    weights = lambda z, rows: pladis_weights(z, scale, alpha, residual=True)  # noqa: E731
    return chunked_attention(q, k, v, weights, mask, chunk_bytes, softmax_scale)


def joint_residual(q, k, v, text, scale, alpha, mask=None, chunk_bytes=DEFAULT_CHUNK_BYTES, softmax_scale=None, row_lse=None):
    """m * scale * (sparse - dense) v_txt for query rows that see text and image keys.

    text: the slice of k (and v) that holds the text keys. m, each row's dense mass on
    them, needs the row's log-sum-exp over every key: row_lse (float32, (..., queries, 1))
    where the dense pass gave it (attention_and_logsumexp), else computed (row_logsumexp);
    the rest is computed on the (queries x text keys) block alone.
    """
    if row_lse is None:
        row_lse = row_logsumexp(q, k, mask, chunk_bytes, softmax_scale)
    if mask is not None and mask.shape[-1] == k.shape[-2]:
        mask = mask[..., text]
    text_weights = lambda z, rows: pladis_weights(z, scale, alpha, residual=True, row_lse=row_lse[..., rows, :])  # noqa: E731
    # Contiguous once, rather than copied by every chunk's matmul.
    k_text, v_text = (t[..., text, :].contiguous() for t in (k, v))
    return chunked_attention(q, k_text, v_text, text_weights, mask, chunk_bytes, softmax_scale)


def row_logsumexp(q, k, mask=None, chunk_bytes=DEFAULT_CHUNK_BYTES, softmax_scale=None):
    """log sum_j exp(z_j) over every key, per query row: float32 (batch, heads, queries, 1).

    torch's memory-efficient attention kernels compute it on the way (on the CPU its flash
    kernel; on CUDA its flash or memory-efficient kernel, without masks); where none serves,
    chunks of float32 logits.
    """
    found = _kernel_attention(q, k, k, mask, softmax_scale)
    if found is not None:
        return found[1].float().unsqueeze(-1)
    out = torch.empty(*q.shape[:-1], 1, dtype=torch.float32, device=q.device)
    kt, scale = k.float().transpose(-1, -2), _softmax_scale(q, softmax_scale)  # every key: not copied to be scaled
    for rows in _row_chunks(q, k.shape[-2], _LSE_LIVE_BUFFERS, chunk_bytes):
        z = (q[..., rows, :].float() * scale) @ kt
        if mask is not None:
            z = _apply_mask(z, _mask_rows(mask, rows, q.shape[-2]))
        out[..., rows, :] = torch.logsumexp(z, -1, keepdim=True)
    return out


def attention_and_logsumexp(q, k, v, mask=None, softmax_scale=None):
    """(softmax(z) v in q's dtype, the row log-sum-exp as float32 (..., queries, 1)) from one
    pass of torch's attention kernel for this device (the kernel that torch's
    scaled_dot_product_attention runs), or None where it gives no log-sum-exp."""
    found = _kernel_attention(q, k, v, mask, softmax_scale)
    return None if found is None else (found[0], found[1].float().unsqueeze(-1))


def _kernel_attention(q, k, v, mask, softmax_scale):
    """(output, log-sum-exp) from torch's kernel for this device, or None where it gives none.

    A torch without the kernel loses it for the process; a call it refuses (a shape, a dtype,
    a one-off error) falls back alone; running out of memory goes to the host as it is.
    """
    kernel = _LSE_KERNELS.get(q.device.type)
    if kernel is None:
        return None
    try:
        return kernel(q, k, v, None if mask is None else _additive(mask, q.dtype), softmax_scale)
    except torch.OutOfMemoryError:
        raise
    except AttributeError as missing:  # torch.ops has no such kernel in this torch
        logging.warning(f"PLADIS: this torch has no attention kernel that gives the log-sum-exp on {q.device.type}; "
                        f"it is computed in chunks from now on: {missing}")
        _LSE_KERNELS[q.device.type] = None
    except Exception as error:
        warn_once(f"PLADIS: torch's attention kernel gave no log-sum-exp on {q.device.type} for a call, "
                   f"which computed it in chunks: {error}")
    return None


def _cuda_attention(q, k, v, mask, softmax_scale):
    if mask is not None:
        return None  # its bias would have to be a full (queries x keys) tensor: chunks instead
    if q.dtype in (torch.float16, torch.bfloat16):
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, scale=softmax_scale)[:2]
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, scale=softmax_scale)[:2]
    return out, lse[..., : q.shape[-2]]  # its log-sum-exp has the rows padded to a multiple of 32


def _cpu_attention(q, k, v, mask, softmax_scale):
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask, scale=softmax_scale)[:2]


# Where only the log-sum-exp is wanted (row_logsumexp), k stands in for v.
_LSE_KERNELS = {"cpu": _cpu_attention, "cuda": _cuda_attention}



def chunked_attention(q, k, v, weights, mask=None, chunk_bytes=DEFAULT_CHUNK_BYTES, softmax_scale=None):
    """weights(z, rows) v over chunks of query rows, so float32 logits never exceed chunk_bytes.

    mask: additive (-inf drops a key) or boolean (True keeps a key), broadcastable to
    (batch, heads, queries, keys).
    """
    # Laid out as (batch, tokens, heads, dim), so that merge_heads is a view, not a copy.
    out = torch.empty(*q.shape[:-3], q.shape[-2], q.shape[-3], v.shape[-1], dtype=q.dtype, device=q.device).transpose(-2, -3)
    # These keys (text or cross-attention keys) are few: scaled once rather than each chunk of q,
    # and contiguous, so that no chunk's matmul copies them (split_heads gives strided views).
    kt = (k.float() * _softmax_scale(q, softmax_scale)).contiguous().transpose(-1, -2)
    v = v.contiguous()
    for rows in _row_chunks(q, k.shape[-2], _LIVE_LOGIT_BUFFERS, chunk_bytes):
        z = q[..., rows, :].float() @ kt
        if mask is not None:
            z = _apply_mask(z, _mask_rows(mask, rows, q.shape[-2]))
        out[..., rows, :] = weights(z, rows).to(v.dtype) @ v
    return out


def _softmax_scale(q, softmax_scale):
    return softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5


def _row_chunks(q, keys, live_buffers, chunk_bytes):
    """Slices of query rows whose live float32 (batch, heads, rows, keys) buffers fit chunk_bytes."""
    b, h, n, _ = q.shape
    row_bytes = 4 * b * h * keys
    rows = chunk_bytes // (live_buffers * row_bytes)
    if q.device.type == "cpu":
        rows = min(rows, CPU_CHUNK_LOGIT_BYTES // (row_bytes * (1 if row_kernel_serves() else 2)))
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

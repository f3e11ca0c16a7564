"""Float64 references of the method, built on the entmax package (independent of pladis_core)."""
import torch
from entmax import entmax15, entmax_bisect, sparsemax


def entmax_ref(z, alpha):
    """The entmax package's alpha-entmax in float64; rows of all -inf give zeros."""
    z = z.double()
    masked_row = torch.isinf(z).all(-1, keepdim=True)
    z = torch.where(masked_row, torch.zeros_like(z), z)
    if alpha == 1.0:
        p = torch.softmax(z, -1)
    elif alpha == 1.5:
        p = entmax15(z, dim=-1)
    elif alpha == 2.0:
        p = sparsemax(z, dim=-1)
    else:
        p = entmax_bisect(z, alpha, dim=-1, n_iter=100)
    return torch.where(masked_row, torch.zeros_like(p), p)


def logits_ref(q, k, mask=None):
    z = q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5
    if mask is not None:
        z = z.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else z + mask.double()
    return z


def pladis_ref(q, k, v, scale, alpha, mask=None):
    """(softmax + scale * (entmax - softmax)) v in float64, tensors (batch, heads, tokens, dim)."""
    z = logits_ref(q, k, mask)
    dense = entmax_ref(z, 1.0)
    return (dense + scale * (entmax_ref(z, alpha) - dense)) @ v.double()


def pladis_ref_projected(q, k, v, heads, scale, alpha):
    """The same on the (batch, tokens, heads * dim) tensors an attn2 replace patch receives."""
    split = lambda t: t.unflatten(-1, (heads, -1)).transpose(1, 2)
    return pladis_ref(split(q), split(k), split(v), scale, alpha).transpose(1, 2).flatten(-2)


def joint_pladis_ref(q, k, v, text, scale, alpha, mask=None):
    """Joint attention in float64 from the full weight matrix, as the method defines it:
    for every query row outside `text` (image queries), the text-key columns become
    m * ((1 - scale) softmax(z_txt) + scale * entmax(z_txt)), m the row's dense mass on
    the text keys; image-key columns and text-query rows stay dense."""
    z = logits_ref(q, k, mask)
    w = entmax_ref(z, 1.0)
    image_rows = torch.ones(z.shape[-2], dtype=torch.bool)
    image_rows[text] = False
    z_txt = z[..., image_rows, text]
    mass = w[..., image_rows, text].sum(-1, keepdim=True)
    dense_txt = entmax_ref(z_txt, 1.0)
    w_rows = w[..., image_rows, :]
    w_rows[..., text] = mass * ((1 - scale) * dense_txt + scale * entmax_ref(z_txt, alpha))
    w[..., image_rows, :] = w_rows
    return w @ v.double()

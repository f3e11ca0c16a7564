"""What "PLADIS Attention Preview" shows: one text token's attention over the image.

For the chosen key (text token) and every image query, three weights: the dense softmax
map, the alpha-entmax map and the PLADIS map, averaged over heads, then over the layers
that were seen (each resized to a common grid). In joint attention the sparse and PLADIS
weights follow the joint semantics: scaled by the row's dense mass on the text keys.
"""
import torch
import torch.nn.functional as F

from .attention import split_heads
from .entmax import entmax, softmax

# float32 logits held at once while the maps of one layer are computed.
_PREVIEW_BYTES = 64 * 2**20


def token_maps(q, k, token, scale, alpha, text=None, mask=None, softmax_scale=None):
    """(dense, sparse, pladis), each (batch, queries): the weight on key `token` of every query.

    q, k: (batch, heads, tokens, dim). text: None for cross-attention (every key is text),
    else the slice of the text keys in a joint sequence (token counts within it).
    mask: additive or boolean, broadcastable to (batch, heads, queries, keys).
    softmax_scale: the logits' scale (None: 1 / sqrt(dim)).
    """
    b, h, n, _ = q.shape
    rows = max(1, _PREVIEW_BYTES // (4 * b * h * k.shape[-2]))
    maps = torch.empty(3, b, n)
    for start in range(0, n, rows):
        chunk = slice(start, min(n, start + rows))
        z = (q[..., chunk, :].float() @ k.float().transpose(-1, -2)) * (softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5)
        if mask is not None:
            m = mask[..., chunk, :] if mask.dim() >= 2 and mask.shape[-2] == n else mask
            z = z.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else z + m.to(z.dtype)
        dense_all = softmax(z)
        if text is None:
            dense, sparse = dense_all[..., token], entmax(z, alpha)[..., token]
        else:
            mass = dense_all[..., text].sum(-1)
            dense, sparse = dense_all[..., text][..., token], mass * entmax(z[..., text], alpha)[..., token]
        maps[:, :, chunk] = torch.stack([dense, sparse, dense + scale * (sparse - dense)]).mean(2).cpu()
    return maps


class MapCollector:
    """The maps of every layer of one model evaluation, on their (frames, height, width) token grids."""

    def __init__(self, token, scale, alpha, grid=None):
        self.token = token
        self.scale = scale
        self.alpha = alpha
        self.grid = grid  # the image-token grid of a DiT (a UNet layer names its own)
        self.layers = []

    def add(self, q, k, grid=None, text=None, mask=None, softmax_scale=None):
        """Records one layer: q holds the image queries first (a DiT's reference tokens after them are left out)."""
        frames, height, width = grid or self.grid
        if frames * height * width > q.shape[-2]:  # a coarser level of the image (Stable Cascade's down blocks)
            frames, height, width = coarser_grid(q.shape[-2], frames, height, width)
        maps = token_maps(q[..., : frames * height * width, :], k, self.token, self.scale, self.alpha, text, mask, softmax_scale)
        self.layers.append(maps[:, 0].reshape(3, frames, height, width).mean(1))  # the first sample, frames averaged

    def add_projected(self, q, k, heads, grid):
        """The same for (batch, tokens, heads * dim) projections, as a UNet's attn2 patch gets them."""
        self.add(*split_heads(heads, q, k), grid=grid)

    def average(self, size):
        """(3, height, width): dense, sparse and PLADIS maps averaged over the layers, resized to size."""
        if not self.layers:
            raise RuntimeError("no cross-attention layer ran during the preview's model evaluation")
        resized = [F.interpolate(maps[None], size=size, mode="bilinear", align_corners=False)[0] for maps in self.layers]
        return torch.stack(resized).mean(0)


def coarser_grid(tokens, frames, height, width):
    """The (frames, height, width) grid of `tokens` image tokens with the aspect of a finer grid."""
    per_frame = tokens // frames
    rows = max(1, round(height * (per_frame / (height * width)) ** 0.5))
    while per_frame % rows:
        rows -= 1
    return frames, rows, per_frame // rows

"""alpha-entmax for inference, without sorting.

    entmax_alpha(z)_i = [(alpha - 1) z_i - tau]_+ ^ (1 / (alpha - 1)),   sum_i p_i = 1

tau is the root of a decreasing convex function. We run Newton's method on

    phi(tau) = || [(alpha - 1) z - tau]_+ ||_beta - 1,        beta = 1 / (alpha - 1)

from a lower bound of the root (threshold_lower_bound). phi is convex (a norm of convex functions) and
decreasing, so Newton from the left never overshoots, and it is nearly linear in tau,
so a few steps reach float precision for every alpha; at alpha = 2 (sparsemax) phi is
piecewise linear and Newton lands exactly on tau once the support is found.
"""
import torch

MAX_NEWTON_STEPS = 50


def softmax(z, dim=-1):
    """Softmax that maps a row of all -inf to zeros rather than NaN."""
    m = _finite_max(z, dim)
    e = torch.exp(z - m)
    return e / e.sum(dim, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)


def entmax(z, alpha=1.5, dim=-1):
    """alpha-entmax of z along dim, for 1 <= alpha <= 2 (alpha = 1 is softmax).

    Computed in float32 (or float64 for float64 input) and returned in that dtype.
    Keys at -inf get exactly zero; a row of all -inf gives zeros.
    """
    if not 1.0 <= alpha <= 2.0:
        raise ValueError(f"entmax alpha must lie in [1, 2], got {alpha}")
    z = z.float() if z.dtype != torch.float64 else z
    if alpha == 1.0:
        return softmax(z, dim)
    x = (alpha - 1.0) * (z - _finite_max(z, dim))
    beta = 1.0 / (alpha - 1.0)
    p = _clamped_power((x - entmax_threshold(x, beta, dim)).clamp_min(0), beta)
    return p / p.sum(dim, keepdim=True).clamp_min(torch.finfo(p.dtype).tiny)


def entmax_threshold(x, beta, dim=-1):
    """tau with sum_i [x_i - tau]_+^beta = 1, for x shifted so that max x = 0."""
    tiny = torch.finfo(x.dtype).tiny
    tau = threshold_lower_bound(x, beta, dim)
    for _ in range(MAX_NEWTON_STEPS):
        s = (x - tau).clamp_min(0)
        s_pow = _clamped_power(s, beta - 1.0)  # d/dtau of s^beta, up to the factor beta
        total = (s_pow * s).sum(dim, keepdim=True)
        norm = total ** (1.0 / beta)
        step = (norm - 1.0) * norm ** (beta - 1.0) / s_pow.sum(dim, keepdim=True).clamp_min(tiny)
        # Monotone from the left: once no row moves forward, tau is as exact as float allows.
        moved = tau + step.clamp_min(0)
        if not bool((moved > tau).any()):
            break
        tau = moved
    return tau


def threshold_lower_bound(x, beta, dim=-1):
    """A tau at or below the root, for x shifted so that max x = 0: the larger of two bounds.

    The maximum alone gives -1. And the keys above -1 alone (S, d of them) reach the sum 1 at
    a tau no larger than the root; as [y]_+^beta is convex, sum_S [x_i - tau]_+^beta >=
    d [mean_S(x) - tau]_+^beta, so the root is >= mean_S(x) - d^(-1/beta): close to it on flat
    rows of many keys, where Newton from -1 needs the most steps. Leaving out the keys at or
    below -1 (masked ones too) can only raise it where it is above -1.
    """
    above = (x + 1.0).clamp_min_(0)  # x + 1 on S, 0 elsewhere: four passes over x in all
    total = above.sum(dim, keepdim=True)
    d = above.sign_().sum(dim, keepdim=True).clamp_min(1.0)
    return torch.maximum(total / d - 1.0 - d ** (-1.0 / beta), torch.full_like(d, -1.0))


def _clamped_power(s, exponent):
    """s^exponent for s >= 0, with 0^0 = 0 so that only the support counts."""
    if exponent == 0.0:
        return (s > 0).to(s.dtype)
    if exponent == 1.0:
        return s
    return s ** exponent


def _finite_max(z, dim):
    """Row maximum, with 0 in place of -inf so that fully masked rows stay finite."""
    m = z.amax(dim, keepdim=True)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))

"""PLADIS weights as one fusable function, for torch.compile, and the plain-torch path too.

The same Newton iteration as entmax.py, but a fixed number of steps and no data-dependent
control flow: the compiler fuses the row computation into a few loops (C++/OpenMP on the
CPU, Triton on CUDA), and nothing asks the host a question about the data, so a GPU never
waits for Python. The few rows still moving after the fixed steps (by more than SETTLED)
get EXTRA_STEPS more in a block of a fixed share of the rows; rows left over after that
are flagged for the caller. Newton converges quadratically, so a last step of 1e-6 leaves
an error far below float32's.
"""
import torch

from .entmax import threshold_lower_bound

SETTLED = 1e-6
# More than the most the fixed steps fell short on random logits of spread 0.1 to 30 and up
# to 4096 keys (3, sparsemax on flat rows of 4096 keys with 3 outliers).
EXTRA_STEPS = 6
# The block of rows that get the extra steps: one row in EXTRA_SHARE, and EXTRA_MIN_ROWS more.
EXTRA_SHARE, EXTRA_MIN_ROWS = 64, 16


def newton_steps(alpha):
    """Steps after which the last one moves tau by less than SETTLED on nearly every row.

    Measured from threshold_lower_bound on random logits of spread 0.5 to 8 (the flat end
    needs the most): 3 steps at alpha 1.1, 4 at 1.25, 4-6 at 1.5, 5-7 at 1.75 and 2.
    """
    return 4 if alpha <= 1.3 else 6 if alpha <= 1.6 else 7


def family_of(alpha):
    """Lets alpha 2 ("sparsemax"), 1.5 ("entmax15") and every alpha = 1 + 1/n ("power n": 1.25,
    1.2, ..., where s^(beta - 1) is s^(n - 1)) avoid transcendental functions per logit."""
    if alpha == 2.0:
        return "sparsemax"
    if alpha == 1.5:
        return "entmax15"
    beta = 1.0 / (alpha - 1.0)
    return f"power {round(beta)}" if 3 <= round(beta) <= 10 and abs(beta - round(beta)) < 1e-9 else "general"


def fused_pladis_weights(z, scale, alpha, family: str, steps: int, residual: bool):
    """(weights, unsettled rows) for float32 logits z.

    weights: softmax + scale * (entmax - softmax), or with residual only scale * (entmax - softmax).
    unsettled: bool, z's shape without its last dimension: rows whose tau may still be off.
    scale and alpha are 0-d tensors: with Python floats torch.compile (2.14) reused a graph
    built for one alpha for another and returned wrong maps.
    """
    rows = z.reshape(-1, z.shape[-1])
    m = rows.amax(-1, keepdim=True)
    shifted = rows - torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(shifted)
    dense = e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(z.dtype).tiny)
    x = (alpha - 1.0) * shifted
    del e, shifted  # op by op (plain torch), each buffer freed early keeps the peak within the chunk budget
    beta = 1.0 / (alpha - 1.0)
    tau, moving = _newton(x, threshold_lower_bound(x, beta), beta, family, steps)
    # The rows still moving first, found on the device (top-k of the flags), not counted on the host.
    block = torch.topk(moving.to(x.dtype), torch.sym_min(rows.shape[0], EXTRA_MIN_ROWS + rows.shape[0] // EXTRA_SHARE)).indices
    more, still = _newton(x[block], tau[block], beta, family, EXTRA_STEPS)
    tau = tau.index_put((block,), torch.where(moving[block, None], more, tau[block]))
    unsettled = moving.index_put((block,), moving[block] & still)
    s = (x - tau).clamp_min_(0)
    p = s if family == "sparsemax" else _support_power(s, beta, family) * s
    del s, x
    sparse = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(z.dtype).tiny)
    del p
    weights = (sparse - dense) * scale if residual else torch.lerp(dense, sparse, scale)
    return weights.view(z.shape), unsettled.view(z.shape[:-1])


def _newton(x, tau, beta, family, steps):
    """(tau, whether its last step moved it by more than SETTLED): steps Newton steps on
    || [x - tau]_+ ||_beta = 1 per row of x, from tau (rows, 1), a lower bound of the root."""
    step = torch.zeros_like(tau)
    for _ in range(steps):
        s = (x - tau).clamp_min_(0)  # in place on a new tensor: one allocation fewer op by op
        s_pow = _support_power(s, beta, family)
        norm = _root((s if family == "sparsemax" else s_pow * s).sum(-1, keepdim=True), beta, family)
        slope = s_pow.sum(-1, keepdim=True).clamp_min(torch.finfo(x.dtype).tiny)
        step = ((norm - 1.0) * _support_power(norm, beta, family) / slope).clamp_min(0)
        tau = tau + step
    return tau, (step > SETTLED).squeeze(-1)


def _support_power(s, beta, family):
    """s ** (beta - 1) for s >= 0, with 0^0 = 0 so that only the support counts; no pow() where avoidable."""
    if family == "sparsemax":  # beta = 1; sign() rather than a comparison and a conversion, two passes op by op
        return torch.sign(s)
    if family == "entmax15":  # beta = 2
        return s
    if family.startswith("power"):  # an integer beta: multiplications only
        return s ** (int(family.split()[1]) - 1)
    if not torch.compiler.is_compiling():
        return s ** (beta - 1.0)  # op by op, one pass rather than three
    # exp(log) rather than pow() for the compiler, which vectorises it; log(0) = -inf gives exactly 0.
    return torch.exp((beta - 1.0) * torch.log(s))


def _root(total, beta, family):
    """total ** (1 / beta)."""
    if family == "sparsemax":
        return total
    if family == "entmax15":
        return torch.sqrt(total)
    if not torch.compiler.is_compiling():
        return total ** (1.0 / beta)
    return torch.exp(torch.log(total) / beta)

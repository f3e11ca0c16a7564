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
    1.2, ..., where s^(beta - 1) is s^(n - 1)) avoid transcendental functions per logit, and
    alpha 1.75 ("cube root": s^(1/3)) take a cube root cheaper than pow where there is one: the row
    kernel's, and cube_root() op by op on the CPU; compiled, it is "general"."""
    if alpha == 2.0:
        return "sparsemax"
    if alpha == 1.5:
        return "entmax15"
    if alpha == 1.75:
        return "cube root"
    beta = 1.0 / (alpha - 1.0)
    return f"power {round(beta)}" if 3 <= round(beta) <= 10 and abs(beta - round(beta)) < 1e-9 else "general"


def fused_pladis_weights(z, scale, alpha, family: str, steps: int, residual: bool):
    """(weights, unsettled rows) for float32 logits z.

    weights: softmax + scale * (entmax - softmax), or with residual only scale * (entmax - softmax).
    unsettled: bool, z's shape without its last dimension: rows whose tau may still be off.
    scale and alpha are 0-d tensors for torch.compile (with Python floats, torch.compile 2.14
    reused a graph built for one alpha for another and returned wrong maps), Python numbers op by op.
    Op by op (plain torch) every pass over the chunk counts: few new buffers, freed early (the
    peak stays within the chunk budget), and the softmax normalised only in the final addcmul.
    The shifted logits x stay out of place: mutated, torch.compile's CPU code ran 10% slower.
    """
    tiny = torch.finfo(z.dtype).tiny
    rows = z.reshape(-1, z.shape[-1])
    m = rows.amax(-1, keepdim=True)
    x = rows - torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(x)  # the softmax, unnormalised
    e_sum = e.sum(-1, keepdim=True).clamp_min(tiny)
    x = x * (alpha - 1.0)
    beta = 1.0 / (alpha - 1.0)
    tau, moving = _newton(x, threshold_lower_bound(x, beta), beta, family, steps)
    # The rows still moving first, found on the device (top-k of the flags), not counted on the host.
    block = torch.topk(moving.to(x.dtype), torch.sym_min(rows.shape[0], EXTRA_MIN_ROWS + rows.shape[0] // EXTRA_SHARE)).indices
    more, still = _newton(x[block], tau[block], beta, family, EXTRA_STEPS)
    tau = tau.index_put((block,), torch.where(moving[block, None], more, tau[block]))
    unsettled = moving.index_put((block,), moving[block] & still)
    s = (x - tau).clamp_min_(0)
    p = _beta_power(s, beta, family)
    del s, x
    # dense + scale (sparse - dense) = (1 - scale) dense + scale sparse (residual: without the first
    # dense), from the unnormalised maps.
    keep = (-scale if residual else 1.0 - scale) / e_sum
    weights = e.mul_(keep).addcmul_(p, scale / p.sum(-1, keepdim=True).clamp_min(tiny))
    return weights.view(z.shape), unsettled.view(z.shape[:-1])


def _newton(x, tau, beta, family, steps):
    """(tau, whether its last step moved it by more than SETTLED): steps Newton steps on
    || [x - tau]_+ ||_beta = 1 per row of x, from tau (rows, 1), a lower bound of the root."""
    tiny = torch.finfo(x.dtype).tiny
    step = torch.zeros_like(tau)
    for _ in range(steps):
        mass, slope = _power_sums((x - tau).clamp_min_(0), beta, family)
        norm = _root(mass, beta, family)
        # (norm - 1) norm^(beta - 1) / slope, with norm^(beta - 1) = mass / norm: no power of it.
        step = ((norm - 1.0) * mass / (norm * slope).clamp_min(tiny)).clamp_min_(0)
        tau = tau + step
    return tau, (step > SETTLED).squeeze(-1)


def _power_sums(s, beta, family):
    """(sum s^beta, sum s^(beta - 1)) per row of s >= 0 (0^0 = 0), s overwritten: op by op each
    pass over the chunk counts, so a fused norm or an in-place sign where one serves."""
    if family == "sparsemax":  # beta = 1; sign() rather than a comparison and a conversion
        return s.sum(-1, keepdim=True), s.sign_().sum(-1, keepdim=True)
    if family == "entmax15":  # beta = 2
        return torch.linalg.vector_norm(s, 2, -1, keepdim=True).square(), s.sum(-1, keepdim=True)
    s_pow = _support_power(s, beta, family)
    slope = s_pow.sum(-1, keepdim=True)
    return (s_pow * s).sum(-1, keepdim=True), slope


def _beta_power(s, beta, family):
    """s^beta for s >= 0, s overwritten."""
    if family == "sparsemax":
        return s
    if family == "entmax15":
        return s.mul_(s)
    return _support_power(s, beta, family).mul_(s)


def _support_power(s, beta, family):
    """s ** (beta - 1) for s >= 0, a new tensor, 0 where s is 0 (cube_root: about 1e-13); for
    integer beta (power n) multiplications only."""
    if family.startswith("power"):
        return s ** (int(family.split()[1]) - 1)
    if torch.compiler.is_compiling():
        # exp(log) rather than pow() for the compiler, which vectorises it; log(0) = -inf gives exactly 0.
        return torch.exp((beta - 1.0) * torch.log(s))
    if family == "cube root" and s.device.type == "cpu":
        return cube_root(s)
    return s ** (beta - 1.0)  # op by op, one pass (log(0) is slow op by op)


# float32 bits of about x^(1/3): a third of x's bits plus this, two thirds of 1.0's bits (tuned).
_CUBE_ROOT_BITS = 0x2A51067F


def cube_root(s):
    """s^(1/3) for 0 <= s <= 1, op by op on the CPU, where pow(s, 1/3) cost about 45
    elementwise passes on an AMD EPYC and this 16: a first guess from s's bits (within 3%),
    then three Newton steps (float32's precision). 0 and subnormal s give about 1e-13: below
    float32's resolution in the Newton sums, and times s in the map."""
    y = (s.view(torch.int32) * (1 / 3)).add_(_CUBE_ROOT_BITS).to(torch.int32).view(torch.float32)
    q = torch.empty_like(s)  # one buffer for every step's s / y^2 (a new one each step held two at once)
    for _ in range(3):
        torch.div(s, torch.mul(y, y, out=q), out=q)
        y.add_(q, alpha=0.5).mul_(2 / 3)  # y - (y^3 - s) / (3 y^2)
    return y


def _root(total, beta, family):
    """total ** (1 / beta)."""
    if family == "sparsemax":
        return total
    if family == "entmax15":
        return torch.sqrt(total)
    if not torch.compiler.is_compiling():
        return total ** (1.0 / beta)
    return torch.exp(torch.log(total) / beta)

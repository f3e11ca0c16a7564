"""pladis_core against the entmax package and a float64 reference; no ComfyUI needed."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pladis_core import attention, cpu_rows, logs, weights
from pladis_core.attention import chunked_attention, joint_residual, pladis_attention, pladis_residual, row_logsumexp
from pladis_core.weights import pladis_weights
from pladis_core.entmax import _finite_max, entmax, softmax, threshold_lower_bound
from pladis_core.fused import cube_root, family_of, fused_pladis_weights, newton_steps
from reference import entmax_ref, joint_pladis_ref, logits_ref, pladis_ref

PACK = Path(__file__).resolve().parent.parent
ALPHAS = [1.1, 1.25, 1.5, 1.75, 2.0]
SHAPES = [(7,), (3, 77), (2, 4, 33, 77), (5, 1000), (4, 1)]


def randn(*shape, scale=1.0, seed=0, dtype=torch.float32):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("spread", [0.5, 4.0, 30.0])
def test_entmax_matches_entmax_package(alpha, shape, spread):
    z = randn(*shape, scale=spread, seed=len(shape))
    p = entmax(z, alpha)
    assert p.dtype == torch.float32
    assert (p - entmax_ref(z, alpha)).abs().max() < 1e-5
    assert torch.allclose(p.sum(-1), torch.ones(()), atol=1e-5)


@pytest.mark.parametrize("alpha", [1.5, 2.0])
def test_entmax_is_sparse_where_the_package_is(alpha):
    z = randn(64, 77, scale=5.0)
    assert torch.equal(entmax(z, alpha) > 0, entmax_ref(z, alpha) > 0)


def test_alpha_one_is_softmax():
    z = randn(6, 77, scale=3.0)
    assert torch.allclose(entmax(z, 1.0), torch.softmax(z, -1), atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("alpha", [1.25, 1.5, 2.0])
def test_entmax_of_half_inputs_is_float32(dtype, alpha):
    z = randn(16, 77, scale=8.0, dtype=dtype)
    p = entmax(z, alpha)
    assert p.dtype == torch.float32
    assert (p - entmax_ref(z.float(), alpha)).abs().max() < 1e-5


@pytest.mark.parametrize("alpha", [1.0, 1.25, 1.5, 2.0])
def test_masked_keys_get_zero_and_masked_rows_give_zeros(alpha):
    z = randn(4, 10, scale=3.0)
    z[1] = float("-inf")
    z[2, :7] = float("-inf")
    p = entmax(z, alpha)
    assert not p.isnan().any()
    assert torch.equal(p[1], torch.zeros(10))
    assert torch.equal(p[2, :7], torch.zeros(7))
    assert (p - entmax_ref(z, alpha)).abs().max() < 1e-5


def test_entmax_refuses_alpha_outside_its_range():
    with pytest.raises(ValueError, match=r"\[1, 2\]"):
        entmax(randn(3, 4), 2.5)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_the_lower_bound_is_at_or_below_the_threshold_and_near_it_on_flat_rows(alpha):
    """tau from the entmax package's map: p_max = (0 - tau)^(1 / (alpha - 1)) at the top key."""
    g = torch.Generator().manual_seed(0)
    cases = {(keys, spread): torch.randn(64, keys, generator=g, dtype=torch.float64) * spread
             for keys, spread in ((1, 1.0), (7, 1.0), (77, 0.5), (77, 4.0), (77, 30.0), (1000, 0.1), (4096, 0.3))}
    far = torch.randn(64, 77, generator=g, dtype=torch.float64) * 0.1
    far[:, 10:] -= 60.0  # 67 keys far below: a mean over every key would say no more than -1
    masked = cases[(77, 0.5)].clone()
    masked[:, 5:] = float("-inf")
    masked[0] = float("-inf")
    for name, z in [*cases.items(), ("far", far), ("masked", masked)]:
        lower = threshold_lower_bound((alpha - 1) * (z - _finite_max(z, -1)), 1 / (alpha - 1))
        tau = -entmax_ref(z, alpha).amax(-1, keepdim=True) ** (alpha - 1)
        assert (lower <= tau + 1e-12).all() and (lower >= -1).all(), name
        if name in ("far", (1000, 0.1)):  # within 30% of the gap between -1 and tau
            assert ((tau - lower) / (tau + 1)).max() < 0.3, name


@pytest.mark.parametrize("residual", [False, True])
def test_plain_torch_matches_the_entmax_package_for_every_family(residual):
    """fused_pladis_weights op by op (PLADIS_COMPILE=0, or where nothing compiles), each row
    settled by its fixed steps and extra block."""
    z = torch.cat([logits_ref(*qkv(b=2, h=3, n=50, m=77, scale=spread, seed=i)[:2]).float() for i, spread in enumerate((0.5, 2.0, 8.0))])
    z[0, 0, 3] = float("-inf")  # a fully masked row
    z[1, 2, :, 10:20] = float("-inf")
    for alpha in ALL_ALPHAS:
        dense, sparse = entmax_ref(z, 1.0), entmax_ref(z, alpha)
        for scale in (2.0, -1.0):
            found, unsettled = fused_pladis_weights(z, torch.tensor(scale), torch.tensor(alpha), family_of(alpha), newton_steps(alpha), residual)
            expected = scale * (sparse - dense) + (0 if residual else dense)
            assert (found.double() - expected).abs().max() < 3e-6, (alpha, scale)
            assert not unsettled.any()


def test_plain_torch_cube_root_is_float32_exact_on_the_unit_interval():
    """alpha 1.75 op by op on the CPU: s^(1/3) of the clamped shifted logits, 0 <= s <= 1."""
    s = torch.cat([torch.rand(100_000, generator=torch.Generator().manual_seed(0)),
                   torch.logspace(-37, 0, 1000), torch.tensor([0.0, 1.0])])
    found, exact = cube_root(s).double(), s.double() ** (1 / 3)
    assert ((found - exact).abs() / exact)[s > 0].max() < 3e-7
    assert found[-2] < 1e-12  # 0: about 1e-13, below float32's resolution next to any key in the support


def qkv(b=2, h=3, n=40, m=77, d=16, dtype=torch.float32, scale=1.0, seed=0):
    return tuple(randn(b, h, length, d, scale=scale, seed=seed + i, dtype=dtype) for i, length in enumerate((n, m, m)))


@pytest.mark.parametrize("scale", [0.0, 1.0, 2.0, -1.0, 5.0])
@pytest.mark.parametrize("alpha", [1.25, 1.5, 2.0])
@pytest.mark.parametrize("shape", [(2, 3, 40, 77, 16), (1, 8, 64, 154, 8), (3, 1, 5, 1, 4)])
def test_pladis_attention_matches_float64_reference(scale, alpha, shape):
    b, h, n, m, d = shape
    q, k, v = qkv(b, h, n, m, d, scale=2.0)
    out = pladis_attention(q, k, v, scale, alpha)
    ref = pladis_ref(q, k, v, scale, alpha)
    assert out.dtype == q.dtype and out.shape == (b, h, n, d)
    assert (out.double() - ref).abs().max() < 1e-5 * (1 + abs(scale))


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_pladis_attention_with_masks(kind):
    q, k, v = qkv(n=20, m=30, scale=2.0)
    keep = torch.rand(2, 1, 20, 30, generator=torch.Generator().manual_seed(3)) > 0.4
    keep[0, 0, 5] = False  # a query row with every key masked
    mask = keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    out = pladis_attention(q, k, v, 2.0, 1.5, mask=mask)
    ref = pladis_ref(q, k, v, 2.0, 1.5, mask=keep)
    assert not out.isnan().any()
    assert torch.equal(out[0, :, 5], torch.zeros_like(out[0, :, 5]))
    assert (out.double() - ref).abs().max() < 3e-5


def test_masked_keys_get_exactly_zero_weight_in_both_maps():
    z = logits_ref(*qkv(b=1, h=1, n=8, m=12)[:2]).float()
    z[..., 3] = float("-inf")
    w = pladis_weights(z, 2.0, 1.5)
    assert torch.equal(w[..., 3], torch.zeros_like(w[..., 3]))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_do_not_overflow(dtype):
    # q.k reaches 64 * 300 * 300 = 5.8e6, far beyond float16's 65504.
    q, k, v = qkv(n=16, m=77, d=64, dtype=dtype)
    q, k = q * 0 + 300, k.abs() * 300
    out = pladis_attention(q.to(dtype), k.to(dtype), v, 2.0, 1.5)
    assert out.dtype == dtype and torch.isfinite(out).all()
    ref = pladis_ref(q.float(), k.float(), v.float(), 2.0, 1.5)
    assert (out.double() - ref).abs().max() < 0.05 * ref.abs().max()


def test_half_inputs_match_reference():
    q, k, v = qkv(n=32, m=77, dtype=torch.float16, scale=2.0)
    out = pladis_attention(q, k, v, 2.0, 1.5)
    ref = pladis_ref(q, k, v, 2.0, 1.5)
    assert (out.double() - ref).abs().max() < 1e-2


def test_residual_is_what_pladis_adds_to_dense():
    q, k, v = qkv(scale=2.0)
    dense = pladis_attention(q, k, v, 0.0, 1.5)
    assert torch.allclose(dense + pladis_residual(q, k, v, 2.0, 1.5), pladis_attention(q, k, v, 2.0, 1.5), atol=1e-5)
    assert torch.allclose(dense, torch.softmax(logits_ref(q, k), -1).float() @ v, atol=2e-5)


def test_scale_zero_does_no_entmax_work(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("entmax called")

    monkeypatch.setattr(weights, "entmax", fail)
    monkeypatch.setattr(weights, "cpu_pladis_weights", fail)
    monkeypatch.setattr(weights, "_fused_for", fail)
    q, k, v = qkv()
    assert torch.allclose(pladis_attention(q, k, v, 0.0, 1.5), pladis_ref(q, k, v, 0.0, 1.5).float(), atol=1e-6)
    with pytest.raises(AssertionError, match="entmax called"):
        pladis_attention(q, k, v, 1.0, 1.5)


@pytest.mark.parametrize("chunk_bytes", [1, 50_000, 10**9])
def test_chunks_cap_the_logits_and_do_not_change_the_result(chunk_bytes):
    q, k, v = qkv(b=2, h=4, n=300, m=77, scale=2.0)
    seen = []

    def weights(z, rows):
        seen.append(z.shape)
        return pladis_weights(z, 2.0, 1.5)

    out = chunked_attention(q, k, v, weights, chunk_bytes=chunk_bytes)
    # Against float64, as one chunk is: chunks change only the float32 rounding of the matmuls,
    # which moved outputs of up to 9.7 by 1.4e-5 from one chunk's on an AMD EPYC.
    assert (out.double() - pladis_ref(q, k, v, 2.0, 1.5)).abs().max() < 3e-5
    assert sum(shape[-2] for shape in seen) == 300
    # The float32 buffers alive for one chunk stay within the budget (one query row at least).
    biggest = max(s[0] * s[1] * s[2] * s[3] for s in seen) * 4 * attention._LIVE_LOGIT_BUFFERS
    assert biggest <= max(chunk_bytes, 2 * 4 * 77 * 4 * attention._LIVE_LOGIT_BUFFERS)
    assert (len(seen) == 1) == (chunk_bytes == 10**9)


def test_cpu_chunks_are_half_as_large_op_by_op(monkeypatch):
    """Op by op every pass writes a chunk-sized buffer, which stays in the cache at half the row kernel's chunk."""
    q = qkv(b=2, h=3, n=64)[0]
    monkeypatch.setattr(attention, "CPU_CHUNK_LOGIT_BYTES", 16 * 4 * 2 * 3 * 77)  # 16 rows of logits
    rows = lambda: {chunk.stop - chunk.start for chunk in attention._row_chunks(q, 77, 8, 10**12)}  # noqa: E731
    assert rows() == {16}
    monkeypatch.setenv("PLADIS_COMPILE", "0")
    assert rows() == {8}


def test_softmax_of_fully_masked_row_is_zero():
    z = torch.full((2, 5), float("-inf"))
    assert torch.equal(softmax(z), torch.zeros(2, 5))


def peak_allocated_bytes(fn):
    """Peak of the CPU memory that fn's torch operations hold at once, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    current = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        current += event.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


@pytest.mark.parametrize("alpha", [1.5, 1.75])  # 1.75 op by op: the cube root's buffers
@pytest.mark.parametrize("compiled", [True, False])
def test_peak_memory_stays_within_the_chunk_budget(monkeypatch, compiled, alpha):
    monkeypatch.setenv("PLADIS_COMPILE", "1" if compiled else "0")
    monkeypatch.setattr(attention, "CPU_CHUNK_LOGIT_BYTES", 10**12)  # only the memory budget chunks
    q, k, v = qkv(b=2, h=10, n=2048, m=77, d=64)
    logits = 2 * 10 * 2048 * 77 * 4
    fixed = q.numel() * 4 + k.numel() * 4  # the output, and k in float32 for the logits
    unchunked = peak_allocated_bytes(lambda: pladis_attention(q, k, v, 2.0, alpha, chunk_bytes=10**12)) - fixed
    assert unchunked > 2 * logits  # several logit-sized buffers live at once without chunks
    for budget in (2 * 2**20, 8 * 2**20):
        extra = peak_allocated_bytes(lambda: pladis_attention(q, k, v, 2.0, alpha, chunk_bytes=budget)) - fixed
        assert extra <= budget


# Every family (power 10 and 4, general, entmax15, sparsemax) and Newton step count (4, 6, 7); 1.25
# again: a graph must not be reused for another alpha.
ALL_ALPHAS = [1.1, 1.25, 1.5, 1.55, 1.75, 1.9, 2.0, 1.25]


@pytest.mark.parametrize("residual", [False, True])
def test_compiled_and_plain_paths_agree(monkeypatch, residual):
    """The fused kernel for every family, as CUDA runs it (the CPU's row kernel: test_cpu_rows.py)."""
    from torch._dynamo.utils import counters

    monkeypatch.setitem(cpu_rows._loaded, "kernel", None)
    z = logits_ref(*qkv(b=2, h=3, n=50, m=77, scale=2.0)[:2]).float()
    z[0, 0, 3] = float("-inf")  # a fully masked row
    z[1, 2, :, 10:20] = float("-inf")
    assert weights._fused_for(z.device) is not None
    for alpha in ALL_ALPHAS:
        for scale in (2.0, -1.0):
            fast = pladis_weights(z, scale, alpha, residual)
            plain = weights.eager_pladis_weights(z, scale, alpha, residual)
            assert (fast - plain).abs().max() < 2e-6, (alpha, scale)
    assert weights._compiled["cpu"] is not None  # still compiled: nothing fell back
    # 10 graphs over both tests, more than dynamo's default limit of 8, after which it would run
    # the fused code uncompiled (torch 2.9 has no per-function limit: ours is raised around it).
    assert not [reason for reason in counters["unimplemented"] if "recompile" in reason.lower()]


def test_rows_left_unsettled_by_the_fixed_steps_are_redone_exactly(monkeypatch):
    monkeypatch.setitem(cpu_rows._loaded, "kernel", None)  # the fused kernel (CUDA's) rather than the CPU's row kernel
    monkeypatch.setattr(weights, "newton_steps", lambda alpha: 1)
    z = logits_ref(*qkv(b=1, h=2, n=40, m=77, scale=2.0)[:2]).float()
    for alpha in (1.25, 1.5, 2.0):
        assert (pladis_weights(z, 2.0, alpha) - weights.eager_pladis_weights(z, 2.0, alpha)).abs().max() < 2e-6


def test_a_compiler_that_fails_switches_to_plain_torch_for_good(tmp_path):
    """A real compile failure (the C++ compiler is missing) in a fresh process: plain torch serves,
    with the same results, from then on; the log says that compiling failed."""
    script = tmp_path / "no_compiler.py"
    script.write_text(
        "import logging, sys, torch, torch._inductor.config as config\n"
        f"sys.path.insert(0, {str(PACK)!r}); sys.path.insert(0, {str(PACK / 'tests')!r})\n"
        "from pladis_core import attention, weights\n"
        "from reference import pladis_ref\n"
        "config.cpp.cxx = ('no-such-compiler',)\n"
        "from pladis_core import cpu_rows; cpu_rows._loaded['kernel'] = None  # torch.compile's kernel, not the row kernel\n"
        "logging.basicConfig(level=logging.WARNING)\n"
        "g = torch.Generator().manual_seed(0)\n"
        "q, k, v = (torch.randn(1, 2, n, 8, generator=g) * 2 for n in (9, 7, 7))\n"
        "for _ in range(2):\n"
        "    out = attention.pladis_attention(q, k, v, 2.0, 1.75)\n"
        "    assert (out.double() - pladis_ref(q, k, v, 2.0, 1.75)).abs().max() < 3e-5\n"
        "assert weights._compiled['cpu'] is None\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr.count("compiling the fused entmax kernel failed on cpu") == 1, done.stderr[-3000:]


def test_each_compile_is_logged_once_with_its_duration(tmp_path):
    """In a fresh process: the first call of an alpha kind compiles and says how long it took;
    the same kind again, or another shape, compiles nothing and says nothing."""
    script = tmp_path / "compile_log.py"
    script.write_text(
        "import logging, sys, torch\n"
        f"sys.path.insert(0, {str(PACK)!r})\n"
        "from pladis_core import attention, cpu_rows\n"
        "cpu_rows._loaded['kernel'] = None  # torch.compile's kernel, not the row kernel\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "g = torch.Generator().manual_seed(0)\n"
        "for alpha, n in ((1.5, 7), (1.5, 7), (1.5, 19), (2.0, 7)):\n"
        "    q, k, v = (torch.randn(1, 2, m, 8, generator=g) for m in (n + 2, n, n))\n"
        "    attention.pladis_attention(q, k, v, 2.0, alpha)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = re.findall(r"PLADIS: compiled the fused entmax kernel for cpu \(alpha ([\d.]+)\) in ([\d.]+) s", done.stderr)
    assert [alpha for alpha, _ in lines] == ["1.5", "2.0"], done.stderr[-3000:]
    assert all(float(seconds) > 0 for _, seconds in lines)


def test_a_one_off_error_of_the_compiled_kernel_keeps_it(monkeypatch, caplog):
    monkeypatch.setitem(cpu_rows._loaded, "kernel", None)  # torch.compile's kernel, as CUDA runs it
    calls = []
    compiled = weights._fused_for(torch.device("cpu"))

    def flaky(*args):
        calls.append(args)
        if len(calls) == 1:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return compiled(*args)

    monkeypatch.setitem(weights._compiled, "cpu", flaky)
    monkeypatch.setattr(logs, "_said", set())
    q, k, v = qkv(scale=2.0)
    for _ in range(2):
        assert (pladis_attention(q, k, v, 2.0, 1.75).double() - pladis_ref(q, k, v, 2.0, 1.75)).abs().max() < 3e-5
    assert weights._compiled["cpu"] is flaky and len(calls) == 2
    assert caplog.text.count("the compiled kernel failed once on cpu") == 1


def test_running_out_of_memory_reaches_the_host_and_keeps_the_kernel(monkeypatch):
    monkeypatch.setitem(cpu_rows._loaded, "kernel", None)  # torch.compile's kernel, as CUDA runs it

    def exhausted(*args):
        raise torch.OutOfMemoryError("out of memory")

    monkeypatch.setitem(weights._compiled, "cpu", exhausted)
    q, k, v = qkv(scale=2.0)
    with pytest.raises(torch.OutOfMemoryError):
        pladis_attention(q, k, v, 2.0, 1.75)
    assert weights._compiled["cpu"] is exhausted


def test_pladis_compile_0_selects_plain_torch(monkeypatch):
    monkeypatch.setenv("PLADIS_COMPILE", "0")
    monkeypatch.setattr(weights, "cpu_pladis_weights", None)  # called, it would fail the test
    assert weights._fused_for(torch.device("cpu")) is None
    q, k, v = qkv(scale=2.0)
    assert (pladis_attention(q, k, v, 2.0, 1.25).double() - pladis_ref(q, k, v, 2.0, 1.25)).abs().max() < 3e-5


def joint_qkv(b=2, h=3, text=20, image=36, d=16, scale=2.0, seed=0):
    return qkv(b, h, text + image, text + image, d, scale=scale, seed=seed)


def joint_out(q, k, v, text, scale, alpha, mask=None, **kwargs):
    """Dense attention of every row plus the joint correction of the image rows."""
    out = pladis_attention(q, k, v, 0.0, alpha, mask=mask).double()
    image_mask = mask[..., text:, :] if mask is not None and mask.shape[-2] == q.shape[-2] else mask
    out[..., text:, :] += joint_residual(q[..., text:, :], k, v, slice(0, text), scale, alpha, mask=image_mask, **kwargs).double()
    return out


@pytest.fixture(params=["kernel", "chunks"])
def lse_path(request, monkeypatch):
    """Both ways to the rows' log-sum-exp: torch's attention kernel, and chunks of logits."""
    if request.param == "chunks":
        monkeypatch.setitem(attention._LSE_KERNELS, "cpu", None)
    return request.param


@pytest.fixture(params=["row kernel", "plain torch"])
def weights_path(request, monkeypatch):
    """Both ways to a joint row's text mass: the row kernel's own softmax, and a logsumexp pass."""
    if request.param == "plain torch":
        monkeypatch.setenv("PLADIS_COMPILE", "0")
    else:
        assert weights.row_kernel_serves()
    return request.param


@pytest.mark.parametrize("kind", [None, "bool", "additive"])
def test_row_logsumexp_matches_float64(lse_path, kind):
    q, k, _ = joint_qkv()
    keep = torch.rand(2, 1, 56, 56, generator=torch.Generator().manual_seed(5)) > 0.3
    keep[0, 0, 7] = False  # a row with every key masked (its value does not matter: it has no text mass)
    mask = None if kind is None else keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    lse = row_logsumexp(q, k, mask, chunk_bytes=20_000)
    ref = torch.logsumexp(logits_ref(q, k, None if kind is None else keep), -1, keepdim=True)
    assert lse.shape == (2, 3, 56, 1) and lse.dtype == torch.float32
    finite = torch.isfinite(ref)
    assert (lse[finite] - ref[finite]).abs().max() < 1e-5


def test_a_logsumexp_kernel_that_refuses_a_call_falls_back_for_that_call(monkeypatch, caplog):
    calls = []

    def refusing(*args):
        calls.append(args)
        raise RuntimeError("no kernel for this shape")

    monkeypatch.setitem(attention._LSE_KERNELS, "cpu", refusing)
    monkeypatch.setattr(logs, "_said", set())
    q, k, _ = joint_qkv()
    ref = torch.logsumexp(logits_ref(q, k), -1, keepdim=True)
    for _ in range(2):
        assert (row_logsumexp(q, k) - ref).abs().max() < 1e-5
    assert attention._LSE_KERNELS["cpu"] is refusing and len(calls) == 2
    assert caplog.text.count("no kernel for this shape") == 1
    monkeypatch.setitem(attention._LSE_KERNELS, "cpu", lambda *args: torch.ops.aten.no_such_kernel)
    assert (row_logsumexp(q, k) - ref).abs().max() < 1e-5
    assert attention._LSE_KERNELS["cpu"] is None  # a torch without the kernel: chunks from then on
    monkeypatch.setitem(attention._LSE_KERNELS, "cpu", lambda *args: (_ for _ in ()).throw(torch.OutOfMemoryError("out of memory")))
    with pytest.raises(torch.OutOfMemoryError):
        row_logsumexp(q, k)


@pytest.mark.parametrize("softmax_scale", [None, 0.3])
def test_row_logsumexp_takes_the_softmax_scale(lse_path, softmax_scale):
    q, k, _ = joint_qkv()
    factor = 1.0 if softmax_scale is None else softmax_scale * q.shape[-1] ** 0.5
    ref = torch.logsumexp(logits_ref(q * factor, k), -1, keepdim=True)
    assert (row_logsumexp(q, k, softmax_scale=softmax_scale) - ref).abs().max() < 1e-5


@pytest.mark.parametrize("scale", [0.0, 1.0, 2.0, -1.0])
@pytest.mark.parametrize("alpha", [1.25, 1.5, 2.0])
def test_joint_correction_matches_the_joint_weights_in_float64(lse_path, weights_path, scale, alpha):
    q, k, v = joint_qkv()
    ref = joint_pladis_ref(q, k, v, slice(0, 20), scale, alpha)
    assert (joint_out(q, k, v, 20, scale, alpha) - ref).abs().max() < 1e-5 * (1 + abs(scale))


def test_joint_weights_keep_each_row_summing_to_one_and_text_rows_dense():
    q, k, v = joint_qkv()
    ones = torch.ones_like(v)
    out = joint_out(q, k, ones, 20, 2.0, 1.5)  # rows of W summed
    assert (out - 1).abs().max() < 1e-5
    ref = joint_pladis_ref(q, k, v, slice(0, 20), 2.0, 1.5)
    dense = pladis_ref(q, k, v, 0.0, 1.5)
    assert torch.equal(ref[..., :20, :], dense[..., :20, :])  # the reference leaves text queries dense
    assert (ref[..., 20:, :] - dense[..., 20:, :]).abs().max() > 1e-2  # and changes image queries


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_joint_correction_honours_a_text_padding_mask(lse_path, weights_path, kind):
    q, k, v = joint_qkv()
    keep = torch.ones(2, 1, 1, 56, dtype=torch.bool)
    keep[0, ..., 15:20] = False  # padded text tokens of the first sample
    keep[1, ..., :20] = False  # no text at all: nothing to sharpen
    mask = keep if kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))
    out = joint_out(q, k, v, 20, 2.0, 1.5, mask=mask)
    ref = joint_pladis_ref(q, k, v, slice(0, 20), 2.0, 1.5, mask=keep)
    assert not out.isnan().any() and (out - ref).abs().max() < 1e-5
    assert (out[1] - pladis_ref(q, k, v, 0.0, 1.5, mask=keep)[1]).abs().max() < 1e-5


def test_joint_correction_in_chunks_equals_one_pass():
    q, k, v = joint_qkv(text=30, image=200)
    whole = joint_residual(q[..., 30:, :], k, v, slice(0, 30), 2.0, 1.5, chunk_bytes=10**9)
    for budget in (1, 100_000):
        assert (joint_residual(q[..., 30:, :], k, v, slice(0, 30), 2.0, 1.5, chunk_bytes=budget) - whole).abs().max() < 1e-5


def test_joint_correction_memory_is_bounded_at_flux_size(monkeypatch, lse_path):
    """Flux at 1024px: 4096 image and 512 text tokens, 24 heads of 128. The correction's extra
    memory stays within its chunk budget, a small fraction of the joint attention matrix."""
    monkeypatch.setattr(attention, "CPU_CHUNK_LOGIT_BYTES", 10**12)
    text, image, heads = 512, 4096, 24
    q, k, v = joint_qkv(b=1, h=heads, text=text, image=image, d=128)
    q_image = q[..., text:, :].contiguous()
    joint_matrix = heads * (text + image) ** 2 * 4
    budget = 16 * 2**20
    output = q_image.numel() * 4  # as big as the kernel's by-product output, which is freed first
    row_lse, text_kv = heads * image * 4, 2 * heads * text * 128 * 4
    joint_residual(q_image[..., :64, :], k, v, slice(0, text), 2.0, 1.5, chunk_bytes=budget)  # compile outside the measurement
    extra = peak_allocated_bytes(lambda: joint_residual(q_image, k, v, slice(0, text), 2.0, 1.5, chunk_bytes=budget)) - output
    assert extra <= budget + row_lse + text_kv
    assert budget < joint_matrix / 100

"""The CPU's row kernel (pladis_core/cpu_rows.cpp) against the entmax package in float64, its
build and cache, and the fallback where it cannot be built."""
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pladis_core import cpu_rows, weights
from pladis_core.fused import family_of
from pladis_core.weights import pladis_weights
from reference import entmax_ref

PACK = Path(__file__).resolve().parent.parent
# Every power beta - 1 the kernel has: 0 (sparsemax), 1 (entmax15), 2 to 9 (3 and 7 take their
# roots by square roots), 1/3 (alpha 1.75, its cube root), and alphas of no integer beta (its own
# exp2 and log2), from near softmax to near sparsemax.
KERNEL_ALPHAS = [2.0, 1.5, 1 + 1 / 3, 1.25, 1.2, 1 + 1 / 6, 1 + 1 / 7, 1.125, 1 + 1 / 9, 1.1, 1.05, 1.35, 1.55, 1.75, 1.95]


def weights_ref(z, scale, alpha, residual):
    dense = entmax_ref(z, 1.0)
    return scale * (entmax_ref(z, alpha) - dense) + (0 if residual else dense)


def logits(rows, keys, spread, seed=0):
    z = torch.randn(rows, keys, generator=torch.Generator().manual_seed(seed)) * spread
    z[0] = float("-inf")  # a fully masked row
    z[1, : keys // 2] = float("-inf")  # masked keys
    return z


@pytest.mark.parametrize("alpha", KERNEL_ALPHAS)
@pytest.mark.parametrize("keys, spread", [(1, 1.0), (3, 5.0), (77, 0.1), (77, 3.0), (77, 30.0), (300, 8.0), (4096, 0.5)])
def test_the_kernel_matches_the_entmax_package(alpha, keys, spread):
    z = logits(40, keys, spread)
    for residual in (False, True):
        for scale in (2.0, -1.0):
            found = cpu_rows.cpu_pladis_weights(z, scale, alpha, family_of(alpha), residual)
            assert found is not None, "the row kernel did not build here"
            assert (found.double() - weights_ref(z, scale, alpha, residual)).abs().max() < 2e-6, (residual, scale)


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="an x86 compiler flag")
def test_the_kernel_built_without_avx512_matches_too(monkeypatch, tmp_path):
    """Many desktop CPUs and every ARM one have no AVX-512: there the keys above the bound are
    gathered by the kernel's scalar loop, not compressed 8 at a time."""
    monkeypatch.setattr(cpu_rows, "FLAGS", cpu_rows.FLAGS + ("-mno-avx512f",))
    monkeypatch.setattr(cpu_rows, "_loaded", {})
    monkeypatch.setenv("PLADIS_CACHE_DIR", str(tmp_path))
    for alpha in (2.0, 1.5, 1.25, 1.75):
        for keys, spread in ((77, 3.0), (300, 8.0)):
            z = logits(40, keys, spread)
            found = cpu_rows.cpu_pladis_weights(z, 2.0, alpha, family_of(alpha), False)
            assert found is not None, "the row kernel did not build here"
            assert (found.double() - weights_ref(z, 2.0, alpha, False)).abs().max() < 2e-6, (alpha, keys)


def test_it_serves_every_alpha_on_the_cpu(monkeypatch):
    monkeypatch.setitem(weights._compiled, "cpu", None)  # torch.compile's kernel would fall to plain torch...
    monkeypatch.setattr(weights, "fused_pladis_weights", None)  # ...which would fail the test
    z = logits(2 * 3 * 50, 77, 3.0).view(2, 3, 50, 77)
    for alpha in (1.5, 2.0, 1.25, 1.75):
        for residual in (False, True):
            assert (pladis_weights(z, 2.0, alpha, residual).double() - weights_ref(z, 2.0, alpha, residual)).abs().max() < 2e-6


def test_it_takes_float32_only():
    assert cpu_rows.cpu_pladis_weights(logits(4, 77, 3.0).double(), 2.0, 1.5, "entmax15", False) is None


def test_logits_that_are_a_strided_view_give_their_own_weights():
    z = logits(77, 40, 3.0).t()  # rows of 77 keys, not contiguous
    found = cpu_rows.cpu_pladis_weights(z, 2.0, 1.5, "entmax15", False)
    assert (found.double() - weights_ref(z, 2.0, 1.5, False)).abs().max() < 2e-6


def test_rows_are_independent_of_the_thread_count():
    z = logits(999, 77, 3.0)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = cpu_rows.cpu_pladis_weights(z, 2.0, 1.5, "entmax15", False)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(alone, cpu_rows.cpu_pladis_weights(z, 2.0, 1.5, "entmax15", False))


def test_it_is_built_once_and_reused_by_later_processes(tmp_path):
    """Each process checks its results against the float64 reference; only the first builds,
    and says how long that took."""
    script = tmp_path / "build.py"
    script.write_text(
        "import logging, sys, torch\n"
        f"sys.path.insert(0, {str(PACK)!r}); sys.path.insert(0, {str(PACK / 'tests')!r})\n"
        "from pladis_core import attention, cpu_rows\n"
        "from reference import pladis_ref\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "g = torch.Generator().manual_seed(0)\n"
        "q, k, v = (torch.randn(1, 2, n, 8, generator=g) * 2 for n in (9, 7, 7))\n"
        "assert (attention.pladis_attention(q, k, v, 2.0, 1.5).double() - pladis_ref(q, k, v, 2.0, 1.5)).abs().max() < 3e-5\n"
        "assert cpu_rows._loaded['kernel'] is not None\n"
    )
    cache = tmp_path / "cache"
    logs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600,
                              env={**os.environ, "PLADIS_CACHE_DIR": str(cache)})
        assert done.returncode == 0, done.stderr[-3000:]
        logs.append(re.findall(r"PLADIS: built the CPU kernel in ([\d.]+) s", done.stderr))
    assert len(logs[0]) == 1 and float(logs[0][0]) > 0 and logs[1] == [], logs
    assert len(list(cache.glob("cpu_rows-*.so"))) == 1


def test_a_build_that_fails_leaves_torch_compile_serving_and_says_so_once(monkeypatch, tmp_path, caplog):
    broken = tmp_path / "cpu_rows.cpp"
    broken.write_text(cpu_rows.SOURCE.read_text().replace("namespace {", "namespace { no such C++", 1))
    monkeypatch.setattr(cpu_rows, "SOURCE", broken)
    monkeypatch.setattr(cpu_rows, "_loaded", {})
    monkeypatch.setenv("PLADIS_CACHE_DIR", str(tmp_path / "cache"))
    compiled = weights._fused_for(torch.device("cpu"))
    calls = []
    monkeypatch.setitem(weights._compiled, "cpu", lambda *args: calls.append(args[3]) or compiled(*args))
    z = logits(60, 77, 3.0)
    for _ in range(2):
        assert (pladis_weights(z, 2.0, 1.5).double() - weights_ref(z, 2.0, 1.5, False)).abs().max() < 2e-6
    assert calls == ["entmax15", "entmax15"] and cpu_rows._loaded == {"kernel": None}  # built once only
    assert caplog.text.count("could not build the CPU kernel") == 1
    assert "no such C++" in caplog.text  # the compiler's own message, for the user to act on

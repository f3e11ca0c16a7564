"""On a CUDA GPU: the fused kernel compiled by Triton, torch's CUDA attention kernels for the
text mass, and no host synchronisation in the attention calls of a model evaluation.

Skipped without a CUDA GPU; bench/gpu.sh runs them on one. pladis_core only: no ComfyUI needed.
"""
import pytest
import torch

from pladis_core.attention import attention_and_logsumexp, joint_residual, pladis_attention, pladis_residual
from pladis_core.weights import settled_after
from reference import joint_pladis_ref, pladis_ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bench/gpu.sh runs these there)")
CUDA = torch.device("cuda")
# Float32 maps and logits whatever the input dtype; the product with v runs in v's dtype.
TOLERANCE = {torch.float32: 3e-5, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def qkv(b=2, h=4, n=300, m=77, d=64, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, length, d, generator=g) for length in (n, m, m))
    return q.to(CUDA, dtype), (k * 2).to(CUDA, dtype), v.to(CUDA, dtype)


@pytest.mark.parametrize("alpha", [1.25, 1.5, 1.75, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_compiled_kernel_on_cuda_matches_the_float64_reference(alpha, dtype):
    q, k, v = qkv(dtype=dtype)
    out = pladis_attention(q, k, v, 2.0, alpha)
    ref = pladis_ref(*(t.cpu() for t in (q, k, v)), 2.0, alpha)
    assert out.dtype == dtype and out.device.type == "cuda"
    assert (out.cpu().double() - ref).abs().max() < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_dense_pass_gives_the_text_mass_on_cuda(dtype):
    """Flash (bfloat16) and memory-efficient (float32) attention give the row log-sum-exp with
    the dense output: the joint correction from it is the method's."""
    text = 24
    q, k, v = qkv(b=1, n=text + 200, m=text + 200, dtype=dtype)
    found = attention_and_logsumexp(q, k, v)
    assert found is not None
    dense, row_lse = found
    out = dense.clone()
    out[..., text:, :] += joint_residual(q[..., text:, :], k, v, slice(0, text), 2.0, 1.5, row_lse=row_lse[..., text:, :]).to(dtype)
    ref = joint_pladis_ref(*(t.cpu() for t in (q, k, v)), slice(0, text), 2.0, 1.5)
    assert (out.cpu().double() - ref).abs().max() < TOLERANCE[dtype]


def test_no_host_synchronisation_inside_a_model_evaluation():
    """torch's sync debug mode raises on any call that waits for the GPU: none in the attention
    calls of an evaluation (the unsettled rows are read once, when it ends)."""
    q, k, v = qkv(dtype=torch.bfloat16)
    text = 24
    calls = [
        lambda: pladis_attention(q, k, v, 2.0, 1.5),
        lambda: pladis_residual(q, k, v, 2.0, 1.25),
        lambda: joint_residual(q, k, v, slice(0, text), 2.0, 2.0, row_lse=attention_and_logsumexp(q, k, v)[1]),
    ]
    with settled_after():
        for call in calls:
            call()  # compiles outside the checked calls
    torch.cuda.synchronize()
    with settled_after():
        torch.cuda.set_sync_debug_mode("error")
        try:
            for call in calls:
                call()
        finally:
            torch.cuda.set_sync_debug_mode("default")

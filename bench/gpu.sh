#!/usr/bin/env bash
# The CUDA checks and benchmark, prepared to run on a machine with a CUDA GPU in under 8 minutes:
#
#   bench/gpu.sh
#
# 1. tests/test_cuda.py: the fused kernel compiled by Triton against the float64 reference
#    (float32, bfloat16, float16), the text mass from the dense pass (flash and memory-efficient
#    kernels), and no host synchronisation inside a model evaluation (torch's sync debug mode).
# 2. bench/run.py: per-call, joint-call, memory and cold-start figures; where a ComfyUI imports
#    (COMFYUI_PATH, or the pinned tree), also sampling at native resolution and a Flux step.
#
# Needs python3 (PYTHON=...) with torch, Triton, pytest and the entmax package (the tests'
# reference). Writes bench/results/gpu.json and gpu.md, and copies them and the log to $OUT
# where that is set. Each stage has its own time limit, so that the whole stays under 8 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
log=$(mktemp)
{
    "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA GPU'; print(torch.cuda.get_device_name(), 'torch', torch.__version__)" || exit 1
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
    started=$(date +%s)
    timeout 150 "$PYTHON" -m pytest tests/test_cuda.py -q -c tests/pytest.ini --rootdir tests
    tests=$?
    parts=layers,joint,cold,e2e,flux,memory  # memory last: a fresh process per call
    timeout 300 "$PYTHON" bench/run.py --parts "$parts" --name gpu
    bench=$?
    echo "tests exit $tests, benchmark exit $bench, $(( $(date +%s) - started )) s"
} 2>&1 | tee "$log"
if [ -n "${OUT:-}" ]; then
    cp "$log" "$OUT/gpu.log"
    cp bench/results/gpu.json bench/results/gpu.md "$OUT/" 2>/dev/null || true
fi
grep -q "tests exit 0, benchmark exit 0" "$log"

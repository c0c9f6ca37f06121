#!/usr/bin/env bash
# The CUDA check (issue: performance, GPU-ready): the layer, kernel, flow and ensemble tests with CUDA
# as the default device (every tensor a test makes lands on the GPU and the library must follow its
# inputs), then the side-by-side benchmark rows on the GPU.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]       # needs python3 with a CUDA torch, pytest, hypothesis
#
# normflows and Pyro are used when importable (else their columns read "not installed").
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench-out}"
mkdir -p "$out"
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print('device:', torch.cuda.get_device_name(), 'torch', torch.__version__)"
status=0
FLOWPROBE_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider -k "not accurate_inverse" \
    tests/layers/test_generic.py tests/layers/test_kernels.py tests/layers/test_constraints.py \
    tests/layers/test_planar.py tests/layers/test_radial.py tests/layers/test_sylvester.py \
    tests/test_flow.py tests/test_ensemble_fit.py 2>&1 | tee "$out/gpu_tests.log" || status=1
FLOWPROBE_BENCH_THREADS=1 python3 benchmarks/compare_anchors.py --device cuda --reps 3 --target 0.2 \
    --json "$out/gpu_compare_anchors.json" 2>&1 | tee "$out/gpu_bench.log"
exit $status

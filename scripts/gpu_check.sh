#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU and torch, triton and the test tools already
# installed (no network needed), build fgkernels with its CUDA kernels, run the CUDA and Triton
# tests on the GPU, then the GPU benchmarks with their baselines, and print a short table last.
# Results land in $OUT (default /tmp/fgkernels-gpu): gpu.json, RESULTS-gpu.md, results-gpu.png,
# profile.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fgkernels-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

echo "== build (FORCE_CUDA=1)"
FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} python -m pip install -q --no-build-isolation --no-deps -e . \
  2>&1 | tail -n 5
python -c "import fgkernels; print('backends:', fgkernels.available_backends())"

echo "== tests on the GPU"
python -m pytest tests/test_native.py tests/test_triton.py tests/test_functional.py \
  tests/test_modules.py -q -x -p no:cacheprovider 2>&1 | tee "$OUT/tests.txt" | tail -n 5

echo "== where a ResNet-18 dual pass spends its time (native backend)"
python benchmarks/profile_dual_pass.py --batch 256 --backend native 2>&1 | tee "$OUT/profile.txt" \
  | tail -n 6

echo "== benchmarks (baselines in the same run)"
python -m pytest benchmarks -q -p no:cacheprovider --benchmark-json="$OUT/gpu.json" \
  --benchmark-columns=median,iqr,rounds 2>&1 | tail -n 3
python benchmarks/report.py "$OUT/gpu.json" -o "$OUT/RESULTS-gpu.md" --plot "$OUT/results-gpu.png"
grep -E "^(###|\| (fgkernels|forward_ad|backprop|primal))" "$OUT/RESULTS-gpu.md" | head -n 80

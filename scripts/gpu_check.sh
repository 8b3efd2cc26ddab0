#!/usr/bin/env bash
# The GPU check: on a machine with a CUDA GPU and torch, triton and the test tools already
# installed (no network needed), build fgkernels with its CUDA kernels, run the CUDA and Triton
# tests on the GPU, then the GPU benchmarks with their baselines, and print a short table last.
# Results land in $OUT (default /tmp/fgkernels-gpu): gpu.json, RESULTS-gpu.md, results-gpu.png,
# profile.txt. Each step prints its time; the whole check is sized for 8 minutes on one H100.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fgkernels-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"

step() {  # step NAME: announce a step and the time the previous one took
  local now=$SECONDS
  [ -n "${STEP_NAME:-}" ] && echo "   ($STEP_NAME took $((now - STEP_START)) s)"
  STEP_NAME=$1 STEP_START=$now
  echo "== $1"
}
trap 'step done' EXIT

step "build (FORCE_CUDA=1)"
FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} python -m pip install -q --no-build-isolation --no-deps -e . \
  2>&1 | tail -n 5
python -c "import fgkernels; print('backends:', fgkernels.available_backends())"

step "tests on the GPU"
python -m pytest tests/test_native.py tests/test_triton.py tests/test_functional.py \
  tests/test_modules.py tests/test_hostile_inputs.py -q -x -p no:cacheprovider 2>&1 \
  | tee "$OUT/tests.txt" | tail -n 5

step "where a ResNet-18 dual pass spends its time (native backend)"
python benchmarks/profile_dual_pass.py --batch 256 --backend native 2>&1 | tee "$OUT/profile.txt" \
  | tail -n 6

step "benchmarks (baselines in the same run)"
python -m pytest benchmarks/test_layers.py benchmarks/test_network.py -q -p no:cacheprovider --benchmark-json="$OUT/gpu.json" \
  --benchmark-columns=median,iqr,rounds 2>&1 | tail -n 3
python benchmarks/report.py "$OUT/gpu.json" -o "$OUT/RESULTS-gpu.md" --plot "$OUT/results-gpu.png"
grep -E "^(###|\| (fgkernels|forward_ad|backprop|primal))" "$OUT/RESULTS-gpu.md" | head -n 80

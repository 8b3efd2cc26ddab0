#!/usr/bin/env bash
# The GPU check, for one machine with a CUDA GPU where torch, triton, pytest and pytest-benchmark
# are installed (no network needed). Parts, run in the order given (default: all of them):
#
#   build    the extension with its CUDA kernels                       (~1.5 min on 16 cores)
#   smoke    every kernel variant launched a few times, vs forward_ad  (< 1 min)
#   tests    the Triton, CUDA and mixed-precision tests on the GPU      (~2 min)
#   bench    the layers' and the network's benchmarks (parts layers and network)
#   layers   layer benchmarks with their baselines                     (~1.5 min)
#   network  ResNet-18 benchmarks with their baselines, eager and      (~1.5 min)
#            captured in a CUDA graph
#   compiled ResNet-18 compiled by fgkernels.compile against eager     (~2 min)
#            forward_ad and backprop, its compiles included
#   profile  where a ResNet-18 dual pass spends its time, its costliest (~1 min)
#            kernels, and where its host time goes
#   report   the kernel report compiled on this machine (sm_90)        (~1 min on 16 cores)
#
#   scripts/gpu_check.sh                 # all parts
#   scripts/gpu_check.sh build smoke     # some
#
# Every part runs under `timeout` (LIMIT_<part> seconds, else PART_LIMIT, default 240; its
# pytest runs are interrupted a little earlier with SIGINT, so that they still write their
# results) and writes its results into $OUT (default /tmp/fgkernels-gpu) as it goes; a failing
# part does not stop the next one, and a part that would start after TOTAL_LIMIT seconds
# (default 570) is skipped. The summary table comes last. All parts take about 11 minutes on
# an H200. $OUT holds log.txt (everything printed), summary.md and a file per part run:
# smoke.json, tests.xml, bench-layers.json, bench-network.json, bench-compiled.json,
# profile.txt, report.json.
cd "$(dirname "$0")/.." || exit 2
SELF=scripts/gpu_check.sh
PY=${PYTHON:-python3}
# The build command, in one place.
BUILD=(env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 "$PY" -m pip install -q
       --no-build-isolation --no-deps -e .)

OUT=${OUT:-/tmp/fgkernels-gpu}
PART_LIMIT=${PART_LIMIT:-240}
TOTAL_LIMIT=${TOTAL_LIMIT:-570}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
unset TRITON_INTERPRET FGKERNELS_BACKEND
LOG="$OUT/log.txt"
PYTEST=("$PY" -m pytest -p no:cacheprovider -o addopts= -q -rfE)

say() { echo "$@" | tee -a "$LOG"; }
limited() {  # limited SECONDS COMMAND...: interrupted (SIGINT) after SECONDS (at least 10),
  local seconds=$1; shift  # killed 10 s later
  timeout -s INT -k 10 "$(( seconds > 10 ? seconds : 10 ))" "$@"
}

part() {  # part NAME: run its body under timeout, log, record status and time
  local name=$1
  if (( SECONDS > TOTAL_LIMIT )); then
    say "== $name: skipped (past TOTAL_LIMIT=${TOTAL_LIMIT}s)"
    echo "$name skipped 0" >> "$STATUS"
    return
  fi
  local own="LIMIT_$name"
  local limit=${!own:-$PART_LIMIT}
  say "== $name (limit ${limit}s, at ${SECONDS}s)"
  local start=$SECONDS
  PART_LIMIT=$limit timeout --kill-after=10 "$limit" bash "$SELF" --in-part "$name" 2>&1 \
    | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  say "== $name: exit $rc after $((SECONDS - start))s"
  echo "$name $rc $((SECONDS - start))" >> "$STATUS"
}

build() {
  echo "nvcc: $(command -v nvcc || echo none) ($(nvcc --version 2>/dev/null | tail -n 1)); CUDA_HOME=${CUDA_HOME:-unset}"
  "$PY" -c "import torch, triton; from torch.utils import cpp_extension as c; \
print('torch', torch.__version__, 'triton', triton.__version__, 'toolkit', c.CUDA_HOME)"
  # The system compiler where there is one: a compiler whose libstdc++ is linked statically
  # (seen: the image's CXX=/opt/gcc/bin/g++) gives the extension a second libstdc++, whose
  # streams crash when an error message is formatted.
  if [[ -x /usr/bin/g++ && -x /usr/bin/gcc ]]; then export CXX=/usr/bin/g++ CC=/usr/bin/gcc; fi
  if ! "${BUILD[@]}"; then
    # Without the CUDA kernels the Triton kernels still run (the ops the native backend would
    # take on CUDA fall back to torch's): the remaining parts still measure them.
    echo "the CUDA build failed; building the CPU kernels only"
    env FGKERNELS_CUDA=0 MAX_JOBS=16 "$PY" -m pip install -q --no-build-isolation --no-deps -e .
    return 1
  fi
  if ! readelf -d fgkernels/_C*.so | grep -q "libstdc++"; then
    echo "the extension carries its own libstdc++ (CXX=${CXX:-c++}): error messages may crash"
  fi
  "$PY" -c "import fgkernels, torch; print('backends:', fgkernels.available_backends()); \
torch.ops.fgkernels.dual_bn_stats(torch.ones(2, 3, 4, 4, device='cuda'), None); print('CUDA kernels: ok')"
}

smoke() { "$PY" scripts/gpu_smoke.py --json "$OUT/smoke.json"; }

tests() {
  # Eight processes: most of the time goes to Triton compiling each test's kernels.
  local parallel=()
  "$PY" -c "import xdist" 2>/dev/null && parallel=(-n 8)
  local ntk=tests/train/test_estimators.py::test_ntk_guess_draws_from_the_generator_and_leaves_global_rng_alone
  limited $(( PART_LIMIT - 20 )) "${PYTEST[@]}" "${parallel[@]}" tests/backends/test_triton.py \
    tests/backends/test_cuda_kernels.py tests/backends/test_native.py "$ntk" \
    tests/test_testing.py tests/train/test_memory.py --junitxml="$OUT/tests.xml"
}

precompile() {
  # The benchmarks' kernels compiled in parallel into Triton's cache (their launches bound as
  # the launcher binds them), before a benchmark waits on them one by one.
  [[ -n ${PRECOMPILED:-} ]] && return
  limited 45 "$PY" tools/kernel_report.py --matrix resnet18 --arch 90 --json "$(mktemp)" \
    | tail -n 14
  PRECOMPILED=1
}

bench() {  # the layers, then the network, each with its share of the part's time
  local start=$SECONDS
  precompile
  local left=$(( PART_LIMIT - 20 - (SECONDS - start) ))
  PART_LIMIT=$(( left * 6 / 10 + 20 )) layers
  PART_LIMIT=$(( PART_LIMIT - (SECONDS - start) )) network
}

layers() {
  precompile
  limited $(( PART_LIMIT - 20 )) "${PYTEST[@]}" benchmarks/test_layers.py -k "conv or bn_relu" \
    --benchmark-json="$OUT/bench-layers.json" --benchmark-columns=median,iqr,rounds
}

network() {
  local start=$SECONDS
  precompile
  limited $(( PART_LIMIT - 20 - (SECONDS - start) )) "${PYTEST[@]}" benchmarks/test_network.py \
    -k "resnet18_dual_pass or graphed" --benchmark-json="$OUT/bench-network.json" \
    --benchmark-columns=median,iqr,rounds
}

compiled() {
  limited $(( PART_LIMIT - 20 )) "${PYTEST[@]}" benchmarks/test_network.py \
    -k resnet18_compiled_pass --benchmark-json="$OUT/bench-compiled.json" \
    --benchmark-columns=median,iqr,rounds
}

profile() {
  : > "$OUT/profile.txt"
  # The native passes also by host function (cProfile): where an eager pass's host time goes.
  for run in "native float32 25" "native bfloat16 25" "triton float32 0"; do
    set -- $run
    "$PY" benchmarks/profile_dual_pass.py --batch 256 --backend "$1" --dtype "$2" --passes 3 \
      --channels-last --top 8 --python "$3" | tee -a "$OUT/profile.txt"
  done
}

report() { "$PY" tools/kernel_report.py --arch 90 --json "$OUT/report.json" | tail -n 20; }

if [[ ${1:-} == --in-part ]]; then  # one part's body, run by part() under timeout
  "$2"
  exit $?
fi

PARTS=("$@")
(( ${#PARTS[@]} )) || PARTS=(build smoke tests bench compiled profile report)
STATUS=$(mktemp)  # one line per part: name, exit code, seconds (read by the summary)
: > "$LOG"
say "fgkernels GPU check: parts ${PARTS[*]}; results in $OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | tee -a "$LOG"
for name in "${PARTS[@]}"; do
  case $name in
    build|smoke|tests|bench|layers|network|compiled|profile|report) part "$name" ;;
    *) say "unknown part '$name' (build smoke tests bench layers network compiled profile" \
         "report)"; exit 2 ;;
  esac
done
"$PY" scripts/gpu_summary.py "$OUT" "$STATUS" | tee "$OUT/summary.md" | tee -a "$LOG"
rm -f "$STATUS"

#!/usr/bin/env bash
# Sets up an environment with everything fgkernels needs, builds its extension into it, and
# checks that the extension loads. Idempotent: a second run only rebuilds what changed.
#
#   scripts/setup.sh           .venv: CPU torch 2.13, triton 3.6, the test and trainer tools;
#                              fgkernels installed editable (the checkout is the package).
#   scripts/setup.sh --models  .venv-models: torch 2.14.1 and torchvision 0.29.1 (a CUDA build,
#                              run on the CPU here), timm, transformers and the test tools;
#                              fgkernels installed as a package, its CPU kernels only. Run
#                              its tests with `.venv-models/bin/python -P -m pytest tests/...`
#                              (-P: the installed package, not the checkout, is imported).
# MAX_JOBS (default 2) bounds the parallel compile jobs; PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export MAX_JOBS=${MAX_JOBS:-2}

models=0
case "${1:-}" in
  "") ;;
  --models) models=1 ;;
  *) echo "usage: scripts/setup.sh [--models]" >&2; exit 2 ;;
esac
VENV=$([ "$models" = 1 ] && echo .venv-models || echo .venv)

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
. "$VENV/bin/activate"

# The build tools of a --no-build-isolation install (pyproject.toml's [build-system] and ninja).
BUILD_TOOLS=(setuptools ninja)

if [ "$models" = 0 ]; then
  if ! python -c "import torch, triton, sklearn, pytest_benchmark, xdist, hypothesis, tqdm, matplotlib, ninja, setuptools" 2>/dev/null \
      || ! command -v ruff >/dev/null; then
    python -m pip install -q --upgrade pip
    # torch first and pinned: a plain 'torch' requirement would pull a multi-GB CUDA build.
    python -m pip install -q "torch==2.13.0"
    # numpy < 2.4 for Triton 3.6's interpreter, which converts 1-element arrays to int (numpy 2.4
    # refuses); newer Triton releases run with numpy 2.4.
    python -m pip install -q "triton==3.6.0" "numpy<2.4" "${BUILD_TOOLS[@]}" pytest \
      pytest-benchmark pytest-xdist hypothesis scikit-learn tqdm matplotlib "ruff==0.17.6"
  fi
  # Without build isolation: compiled against the torch above, incrementally. Not --no-deps:
  # pyproject's dependencies are resolved against what is installed (nothing new when they hold).
  python -m pip install -q --no-build-isolation -e ".[test]"
else
  if ! python -c "import torch, torchvision, timm, transformers, pytest, xdist, hypothesis, ninja, setuptools" 2>/dev/null; then
    python -m pip install -q --upgrade pip
    # torchvision 0.29.1 needs torch 2.14.1.
    python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
    python -m pip install -q timm "transformers==5.25.0" pytest pytest-xdist hypothesis "${BUILD_TOOLS[@]}"
  fi
  # A package, not editable: the checkout's fgkernels/_C belongs to .venv's torch. CPU kernels
  # only (FGKERNELS_CUDA=0): nothing here runs CUDA, and compiling for four GPU architectures
  # takes long. The build backend's torch requirement is this venv's torch, so
  # --no-build-isolation only saves installing that torch a second time.
  FGKERNELS_CUDA=0 python -m pip install -q --no-build-isolation ".[test]"
fi

# fgkernels falls back to its reference backend, with a warning, when the extension does not
# load; here that is an error.
(cd / && FGKERNELS_REQUIRE_NATIVE=1 python -c "
import fgkernels, torch
print(f'fgkernels ready in $VENV (torch {torch.__version__}, {fgkernels.__file__}); backends:',
      ', '.join(fgkernels.available_backends()))")

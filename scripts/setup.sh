#!/usr/bin/env bash
# Sets up .venv with everything fgkernels needs and builds its extension. Idempotent: a second
# run only rebuilds what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
if ! python -c "import torch, triton, sklearn, pytest_benchmark, hypothesis, tqdm, matplotlib" 2>/dev/null \
    || ! command -v ruff >/dev/null; then
  python -m pip install -q --upgrade pip
  # torch first and pinned: a plain 'torch' requirement would pull a multi-GB CUDA build.
  python -m pip install -q "torch==2.13.0"
  # numpy < 2.4: Triton 3.6's interpreter converts 1-element arrays to int, which numpy 2.4 refuses.
  python -m pip install -q "triton==3.6.0" "numpy<2.4" ninja pytest pytest-benchmark hypothesis \
    scikit-learn tqdm matplotlib "ruff==0.17.6"
fi
MAX_JOBS=${MAX_JOBS:-2} python -m pip install -q --no-build-isolation --no-deps -e .
python -c "import fgkernels; print('fgkernels ready; backends:', ', '.join(fgkernels.available_backends()))"

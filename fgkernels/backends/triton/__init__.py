"""The Triton backend: the fused dual convolution (with the batch-norm sums in its epilogue)
and the in-place batch-norm apply (``backend.TritonBackend``), registered as operators of
``torch.ops.fgkernels_triton`` (``ops.py``). ``INTERPRETED`` is read once here: under
``TRITON_INTERPRET=1`` the kernels run in Triton's interpreter on the CPU."""
from __future__ import annotations

import functools
import os

import torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# The dtypes the kernels compute in (float32 sums)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def triton_available() -> bool:
    """True when Triton imports and can run: on CUDA, or on the CPU under TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or INTERPRETED

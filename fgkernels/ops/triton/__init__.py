"""The Triton backend."""
from __future__ import annotations

import functools
import os

import torch

from ..native import NativeBackend


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when Triton imports and can run: on CUDA, or on the CPU under TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


class TritonBackend(NativeBackend):
    name = "triton"

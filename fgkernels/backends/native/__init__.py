"""The native backend: the compiled ``torch.ops.fgkernels`` ops (C++ on the CPU, CUDA on GPUs).

Importing ``fgkernels._C`` registers the ops; their fake implementations are registered right
after (``fakes``), so that they trace under ``torch.compile``, and the CUDA implementations
written in Python of those with no CUDA C++ kernel (``cuda_python_impls``). Without the extension
fgkernels runs on the reference backend and says so once; ``FGKERNELS_REQUIRE_NATIVE=1`` (set by
the project's set-up and CI) makes a missing or broken extension an ImportError instead.
"""
from __future__ import annotations

import os
from typing import Optional

REQUIRE_VARIABLE = "FGKERNELS_REQUIRE_NATIVE"


def _load_extension() -> Optional[str]:
    """Loads ``fgkernels._C``; returns why it could not be loaded, or None."""
    try:
        from ... import _C  # noqa: F401
    except ImportError as e:
        # Not built, or built against another torch (an undefined symbol).
        reason = f"{type(e).__name__}: {e}"
        if os.environ.get(REQUIRE_VARIABLE) == "1":
            raise ImportError(f"{REQUIRE_VARIABLE}=1, but the compiled extension fgkernels._C "
                              f"does not load ({reason})") from e
        return reason
    from . import cuda_python_impls, fakes  # noqa: F401
    return None


_LOAD_ERROR = _load_extension()


def native_available() -> bool:
    """True when the compiled extension ``fgkernels._C`` loaded (it registers the ops)."""
    return _LOAD_ERROR is None


def native_load_error() -> Optional[str]:
    """Why ``fgkernels._C`` did not load (the ImportError's message), or None when it did."""
    return _LOAD_ERROR

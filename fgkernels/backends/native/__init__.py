"""The native backend: the compiled ``torch.ops.fgkernels`` ops (C++ on the CPU, CUDA on GPUs).

Importing ``fgkernels._C`` registers the ops; their fake implementations are registered right
after (``fakes``), so that they trace under ``torch.compile``.
"""
from __future__ import annotations


def _load_extension() -> bool:
    try:
        from ... import _C  # noqa: F401
    except ImportError:
        return False
    from . import fakes  # noqa: F401
    return True


_AVAILABLE = _load_extension()


def native_available() -> bool:
    """True when the compiled extension ``fgkernels._C`` loaded (it registers the ops)."""
    return _AVAILABLE

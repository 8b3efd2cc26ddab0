"""fgkernels: fused forward-mode (dual) kernels for Conv2d / BatchNorm2d / ReLU networks.

A ``Dual`` carries a primal tensor and its tangent(s); ``set_tangents`` gives parameters theirs;
any model then runs its dual pass on a Dual input, exactly, and ``convert`` swaps in the twins of
``fgkernels.nn`` (``DualConv2d``, ...) that compute primal and tangents in one fused pass, with no
autograd graph and no stored activations. The twins are reachable from here too
(``fgkernels.DualConv2d``), as names of ``fgkernels.nn``.
"""
from . import functional, nn, rules  # noqa: F401  (rules: every op's rule registered)
from .backends import available_backends, current_backend, use_backend
from .dual import Dual, is_dual
from .dual.passes import dual_pass
from .dual.precision import fast_bfloat16, tangent_dtype
from .dual.tangents import clear_tangents, random_tangents, set_tangents
from .nn import compile, convert
from .rules.fallback import fallback_ops, strict_rules

__version__ = "0.1.0"

__all__ = [
    "Dual", "is_dual", "set_tangents", "random_tangents", "clear_tangents", "dual_pass", "convert",
    "compile", "functional", "nn", "use_backend", "available_backends", "current_backend",
    "fallback_ops", "strict_rules", "tangent_dtype", "fast_bfloat16",
]


def __getattr__(name: str):
    """``fgkernels.DualConv2d`` and the other names of ``fgkernels.nn``."""
    if name in nn.__all__:
        return getattr(nn, name)
    raise AttributeError(f"module 'fgkernels' has no attribute {name!r}")

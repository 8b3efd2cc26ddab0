"""fgkernels: fused forward-mode (dual) kernels for Conv2d / BatchNorm2d / ReLU networks.

A ``Dual`` carries a primal tensor and its tangent(s); the Dual layers (``DualConv2d``, ...)
compute both in one pass, with no autograd graph and no stored activations.
"""
from . import functional, rules  # noqa: F401  (rules: every op's rule registered)
from .backends import available_backends, current_backend, use_backend
from .dual import Dual, is_dual
from .dual.precision import fast_bfloat16, tangent_dtype
from .dual.tangents import clear_tangents, random_tangents, set_tangents
from .nn import (
    DualAdaptiveAvgPool2d,
    DualAvgPool2d,
    DualBatchNorm1d,
    DualBatchNorm2d,
    DualConv2d,
    DualFlatten,
    DualGroupNorm,
    DualLayerNorm,
    DualLinear,
    DualMaxPool2d,
    DualModule,
    DualReLU,
    DualSequential,
    compile,
    convert,
    register_twin,
    reuse_conv_outputs,
)
from .rules.fallback import fallback_ops, strict_rules

__version__ = "0.1.0"

__all__ = [
    "Dual", "is_dual", "functional", "convert", "set_tangents", "random_tangents",
    "clear_tangents", "use_backend", "available_backends", "current_backend",
    "DualConv2d", "DualBatchNorm2d", "DualBatchNorm1d", "DualReLU", "DualLinear",
    "DualMaxPool2d", "DualAvgPool2d", "DualAdaptiveAvgPool2d", "DualFlatten", "DualSequential",
    "DualModule", "DualLayerNorm", "DualGroupNorm", "reuse_conv_outputs",
    "fallback_ops", "strict_rules", "register_twin", "tangent_dtype",
    "fast_bfloat16", "compile",
]

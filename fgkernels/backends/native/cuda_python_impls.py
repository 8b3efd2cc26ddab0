"""The CUDA implementations, written in Python, of the native ops that have a CPU kernel but no
CUDA C++ kernel (the batch norm's coefficients and its running-statistics update): Triton
kernels, one launch each, where Triton is installed, else ``bn_math``'s composites of torch's
ops (a dozen launches each)."""
from __future__ import annotations

import importlib.util

import torch

from .. import bn_math

if importlib.util.find_spec("triton") is not None:
    from ..triton.batch_norm import bn_update_running_stats_, dual_bn_coefficients
else:
    dual_bn_coefficients = bn_math.coefficients_composite
    bn_update_running_stats_ = bn_math.update_running_stats_composite

_LIB = torch.library.Library("fgkernels", "IMPL")
_LIB.impl("dual_bn_coefficients", dual_bn_coefficients, "CUDA")
_LIB.impl("bn_update_running_stats_", bn_update_running_stats_, "CUDA")

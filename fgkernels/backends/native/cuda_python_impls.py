"""The CUDA implementations, written in Python, of the native ops that have a CPU kernel but no
CUDA C++ kernel (the batch norm's coefficients and its running-statistics update): Triton
kernels, one launch each, where Triton imports, else ``bn_math``'s composites of torch's ops
(a dozen launches each). Each checks its arguments as the CPU op does first."""
from __future__ import annotations

import functools

import torch

from .. import bn_math
from .fakes import check_coefficients_args, check_running_stats_args


@functools.cache
def _kernels():
    """The Triton launchers, or the composites where Triton does not import (loaded on the
    first CUDA call, not with fgkernels)."""
    try:
        from ..triton import batch_norm
    except ImportError:
        return bn_math.coefficients_composite, bn_math.update_running_stats_composite
    return batch_norm.dual_bn_coefficients, batch_norm.bn_update_running_stats_


def dual_bn_coefficients(mean, var, tmean, tcov, weight, weight_t, bias, bias_t, x_pos, p_pos,
                         count, training, eps):
    """``fgkernels::dual_bn_coefficients`` on CUDA: one Triton launch, or torch's ops."""
    check_coefficients_args(mean, var, tmean, tcov, weight, weight_t, bias, bias_t, x_pos,
                            p_pos, count, training)
    return _kernels()[0](mean, var, tmean, tcov, weight, weight_t, bias, bias_t, x_pos, p_pos,
                         count, training, eps)


def bn_update_running_stats_(running_mean, running_var, mean, var, n, momentum):
    """``fgkernels::bn_update_running_stats_`` on CUDA: one Triton launch, or torch's ops."""
    check_running_stats_args(running_mean, running_var, mean, var, n)
    _kernels()[1](running_mean, running_var, mean, var, n, momentum)


_LIB = torch.library.Library("fgkernels", "IMPL")
_LIB.impl("dual_bn_coefficients", dual_bn_coefficients, "CUDA")
_LIB.impl("bn_update_running_stats_", bn_update_running_stats_, "CUDA")

"""What a tangent's dtype may be beside its primal's, and the dtype sums are taken in: the one
statement of both, for the Dual, the rules, the fakes and the backends."""
from __future__ import annotations

import torch


def tangent_dtype_fits(primal: torch.dtype, tangent: torch.dtype) -> bool:
    """A tangent's dtype is its primal's, or one of fewer bits of the same kind (bfloat16 or
    float16 tangents of a float32 primal; complex64 of complex128): the ops compute tangent terms
    in it and accumulate sums and statistics in the primal's ``acc_dtype``."""
    if tangent == primal:
        return True
    if primal.is_complex:
        return tangent.is_complex and tangent.itemsize < primal.itemsize
    return primal.is_floating_point and tangent.is_floating_point \
        and tangent.itemsize < primal.itemsize


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of the kernels (statistics, coefficients): float64 for float64
    inputs, float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32

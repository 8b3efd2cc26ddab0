"""The precision of tangents: the dtype in which fgkernels draws them.

A tangent may have a lower precision than its primal (``Dual(x_float32, t_bfloat16)``); every
op then computes its tangent terms in that dtype with float32 accumulation, and the primal as
before. Tangents are directional derivatives feeding a noisy gradient estimate, so bfloat16
costs the estimate little and halves the memory traffic of every tangent slot.
"""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Optional

import torch

from .dtypes import tangent_dtype_fits

_local = threading.local()


@contextlib.contextmanager
def tangent_dtype(dtype: Optional[torch.dtype]) -> Iterator[None]:
    """Inside the block, the tangents that fgkernels draws (``random_tangents``, the trainer's
    directions) have ``dtype`` instead of their primal's where it is of the primal's kind (a
    bfloat16 block leaves a complex parameter's tangent complex; None: their primal's). A
    ``dtype=`` given to the draw applies to every parameter, refused where it does not fit."""
    check_dtype(dtype, "tangent_dtype")
    previous = getattr(_local, "dtype", None)
    _local.dtype = dtype
    try:
        yield
    finally:
        _local.dtype = previous


def check_dtype(dtype, who: str) -> None:
    """Raise TypeError naming ``who`` unless ``dtype`` is a floating or complex torch.dtype, or
    None."""
    if dtype is not None and not (isinstance(dtype, torch.dtype)
                                  and (dtype.is_floating_point or dtype.is_complex)):
        raise TypeError(f"{who}: dtype must be a floating or complex torch.dtype or None, got "
                        f"{dtype!r}")


def default_tangent_dtype() -> Optional[torch.dtype]:
    """The dtype of the innermost ``tangent_dtype`` block; None outside any."""
    return getattr(_local, "dtype", None)


def resolve_tangent_dtype(primal: torch.dtype, dtype: Optional[torch.dtype] = None) -> torch.dtype:
    """The dtype of a tangent drawn for a ``primal`` tensor: ``dtype`` if given, else the
    block's where it is of the primal's kind (a bfloat16 block leaves a complex parameter's
    tangent complex), else the primal's. It must be the primal's or one of fewer bits of the
    same kind."""
    block = default_tangent_dtype()
    if dtype is None and block is not None and block.is_complex == primal.is_complex:
        dtype = block
    chosen = dtype or primal
    if not tangent_dtype_fits(primal, chosen):
        kind = "complex" if primal.is_complex else "floating"
        raise TypeError(f"a tangent of a {primal} tensor must be {primal} or a {kind} dtype "
                        f"of fewer bits, got {chosen}")
    return chosen


def fast_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` has bfloat16 arithmetic in hardware: a CUDA GPU of compute capability
    8.0 or more, or a CPU with AVX512-BF16 or AMX. Elsewhere torch emulates bfloat16
    convolutions, and bfloat16 tangents are slower than float32 ones, not faster."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "cpu":
        probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in probes)
    return False

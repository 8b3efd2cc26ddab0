"""Dual batch norm in Triton: the apply (+ReLU), a per-channel affine map of (y, ẏ) in place:

    u    = y - center_c
    y'   = scale_c·u + shift_c                       (ReLU: max(y', 0))
    ẏ'_t = scale_c·ẏ_t + t_xscale_tc·u + t_shift_tc   (ReLU: 0 where y' <= 0)

with the coefficients of ``fgkernels.backends.bn_math``. One read and one write of y and of every
tangent slot: the whole batch norm after the fused convolution's statistics epilogue.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...dual.layout import kernel_format
from . import INTERPRETED

_BLOCK = 128 if INTERPRETED else 1024


@triton.jit
def _dual_bn_relu_apply_kernel(y_ptr, yt_ptr, center_ptr, scale_ptr, shift_ptr, txs_ptr,
                               tsh_ptr, numel, C, inner, T, RELU: tl.constexpr,
                               WIDE: tl.constexpr, BLOCK: tl.constexpr):
    # Offsets inside one slot are int32 unless a slot has 2³¹ elements or more (WIDE); a slot's
    # offset t·numel is int64 (the slots together pass 2³¹ elements long before one does).
    pid = tl.program_id(0)
    if WIDE:
        pid = pid.to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    c = (offs // inner) % C  # [outer, C, inner] layout: NCHW has inner = H·W, NHWC inner = 1
    u = tl.load(y_ptr + offs, mask=ok, other=0.0).to(tl.float32) - tl.load(center_ptr + c,
                                                                           mask=ok, other=0.0)
    scale = tl.load(scale_ptr + c, mask=ok, other=0.0)
    out = scale * u + tl.load(shift_ptr + c, mask=ok, other=0.0)
    # A NaN stays in the primal and keeps its tangent, as in torch.relu and its derivative.
    drop = out <= 0.0
    if RELU:
        out = tl.where(drop, 0.0, out)
    tl.store(y_ptr + offs, out.to(y_ptr.dtype.element_ty), mask=ok)
    for t in range(T):
        t_wide = tl.cast(t, tl.int64)
        ptrs = yt_ptr + t_wide * numel + offs
        yt = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32)
        v = (scale * yt + tl.load(txs_ptr + t_wide * C + c, mask=ok, other=0.0) * u
             + tl.load(tsh_ptr + t_wide * C + c, mask=ok, other=0.0))
        if RELU:
            v = tl.where(drop, 0.0, v)
        tl.store(ptrs, v.to(yt_ptr.dtype.element_ty), mask=ok)


def dual_bn_relu_apply_(y: torch.Tensor, yt, center, scale, shift, t_xscale, t_shift,
                        relu: bool) -> None:
    """Apply in place to ``y`` (contiguous, or channels_last) and its slots ``yt`` (each slot
    laid out like y, slots adjacent), as the fused convolution writes them."""
    if y.numel() == 0:
        return
    C = y.shape[1]
    inner = 1 if kernel_format(y) == torch.channels_last else y.shape[2] * y.shape[3]
    T = 0 if yt is None else yt.shape[0]
    f32 = lambda v: v.to(torch.float32).contiguous()
    _dual_bn_relu_apply_kernel[(triton.cdiv(y.numel(), _BLOCK),)](
        y, y if yt is None else yt, f32(center), f32(scale), f32(shift), f32(t_xscale),
        f32(t_shift), y.numel(), C, inner, T, RELU=relu,
        WIDE=y.numel() + _BLOCK >= 2 ** 31, BLOCK=_BLOCK)

"""Dual batch norm in Triton: the apply (+ReLU), a per-channel affine map of (y, ẏ) in place,
and on CUDA the native ops that have no CUDA C++ kernel (coefficients, running statistics).

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
from ...dual.slots import positions_index
from ..bn_math import coefficients_composite, update_running_stats_composite
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


@triton.jit
def _dual_bn_coefficients_kernel(mean_ptr, var_ptr, tmean_ptr, tcov_ptr, w_ptr, wt_ptr, b_ptr,
                                 bt_ptr, x_pos_ptr, p_pos_ptr, scale_ptr, shift_ptr,
                                 t_xscale_ptr, t_shift_ptr, C, X, P, count, eps,
                                 HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                                 HAS_WT: tl.constexpr, HAS_BT: tl.constexpr,
                                 FROM_BATCH: tl.constexpr, BLOCK: tl.constexpr):
    # One program per BLOCK channels, in float32 (the parameters and their tangents, of the
    # network's dtype, widened as they are loaded); with r = 1/√(var + eps), a = γr:
    #   scale = a, shift = β, and for each output slot t the sum of the parts that land on it:
    #   t_xscale[t] = Σ_{x_pos[s]=t} −a·r²·cov[s] + Σ_{p_pos[p]=t} γ̇[p]·r
    #   t_shift[t]  = Σ_{x_pos[s]=t} −a·m1[s]     + Σ_{p_pos[p]=t} β̇[p]
    c = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = c < C
    var = tl.load(var_ptr + c, mask=ok, other=1.0)
    r = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
    a = r
    if HAS_W:
        a = tl.load(w_ptr + c, mask=ok, other=0.0).to(tl.float32) * r
    tl.store(scale_ptr + c, a, mask=ok)
    shift = tl.zeros_like(a)
    if HAS_B:
        shift = tl.load(b_ptr + c, mask=ok, other=0.0).to(tl.float32)
    tl.store(shift_ptr + c, shift, mask=ok)
    for t in range(count):
        xs = tl.zeros_like(a)
        sh = tl.zeros_like(a)
        if FROM_BATCH:
            for s in range(X):
                hit = tl.load(x_pos_ptr + s) == t
                cov = tl.load(tcov_ptr + s * C + c, mask=ok, other=0.0)
                m1 = tl.load(tmean_ptr + s * C + c, mask=ok, other=0.0)
                xs += tl.where(hit, -a * r * r * cov, 0.0)
                sh += tl.where(hit, -a * m1, 0.0)
        for p in range(P):
            hit = tl.load(p_pos_ptr + p) == t
            if HAS_WT:
                wt = tl.load(wt_ptr + p * C + c, mask=ok, other=0.0).to(tl.float32)
                xs += tl.where(hit, wt * r, 0.0)
            if HAS_BT:
                bt = tl.load(bt_ptr + p * C + c, mask=ok, other=0.0).to(tl.float32)
                sh += tl.where(hit, bt, 0.0)
        tl.store(t_xscale_ptr + t * C + c, xs, mask=ok)
        tl.store(t_shift_ptr + t * C + c, sh, mask=ok)


def dual_bn_coefficients(mean, var, tmean, tcov, weight, weight_t, bias, bias_t, x_pos, p_pos,
                         count: int, training: bool, eps: float):
    """``dual_bn_coefficients`` (its schema in csrc/fgkernels.cpp) in one launch for float32
    statistics (float64 ones: ``bn_math.coefficients_composite``); the arguments as that
    composite takes them."""
    if mean.dtype != torch.float32:
        return coefficients_composite(mean, var, tmean, tcov, weight, weight_t, bias, bias_t,
                                      x_pos, p_pos, count, training, eps)
    C, dtype = mean.shape[0], mean.dtype
    as_acc = lambda t: None if t is None else t.to(dtype).contiguous()
    # The parameters and their tangents are read in their own dtype (no cast launched).
    dense = lambda t: None if t is None else t.contiguous()
    from_batch = training and len(x_pos) > 0
    # Both position lists in one index tensor, made once per layout (_slots.positions_index);
    # a trailing 0 keeps it non-empty.
    positions = positions_index((*x_pos, *p_pos, 0), mean.device)
    scale, shift = torch.empty_like(mean), torch.empty_like(mean)
    t_xscale = mean.new_empty((count, C))
    t_shift = mean.new_empty((count, C))
    var = as_acc(var)
    weight, weight_t, bias, bias_t = map(dense, (weight, weight_t, bias, bias_t))
    tmean, tcov = (as_acc(tmean), as_acc(tcov)) if from_batch else (mean, mean)
    block = 128
    _dual_bn_coefficients_kernel[(triton.cdiv(C, block),)](
        mean, var, tmean, tcov, mean if weight is None else weight,
        mean if weight_t is None else weight_t, mean if bias is None else bias,
        mean if bias_t is None else bias_t, positions, positions[len(x_pos):], scale, shift,
        t_xscale, t_shift, C, len(x_pos), len(p_pos), count, eps, HAS_W=weight is not None,
        HAS_B=bias is not None, HAS_WT=weight_t is not None, HAS_BT=bias_t is not None,
        FROM_BATCH=from_batch, BLOCK=block)
    return scale, shift, t_xscale, t_shift


@triton.jit
def _bn_update_running_stats_kernel(rm_ptr, rv_ptr, mean_ptr, var_ptr, momentum: tl.float64,
                                    unbias: tl.float64, C, BLOCK: tl.constexpr):
    # In float64 (momentum m and unbias = n / (n - 1) passed as float64 numbers), rounded to
    # the buffers' dtype as the CPU op rounds (a narrower one through float32, as torch's own
    # cast from float64 does):
    #   rm ← m·mean + (1 - m)·rm,   rv ← m·var·n/(n - 1) + (1 - m)·rv
    c = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = c < C
    rm = tl.load(rm_ptr + c, mask=ok, other=0.0).to(tl.float64)
    rv = tl.load(rv_ptr + c, mask=ok, other=0.0).to(tl.float64)
    mean = tl.load(mean_ptr + c, mask=ok, other=0.0).to(tl.float64)
    var = tl.load(var_ptr + c, mask=ok, other=0.0).to(tl.float64)
    new_rm = momentum * mean + (1 - momentum) * rm
    new_rv = momentum * (var * unbias) + (1 - momentum) * rv
    tl.store(rm_ptr + c, _rounded_as_torch(new_rm, rm_ptr.dtype.element_ty), mask=ok)
    tl.store(rv_ptr + c, _rounded_as_torch(new_rv, rv_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _rounded_as_torch(v, dtype: tl.constexpr):
    # float64 v in ``dtype`` as torch casts a float64 tensor: a narrower dtype through float32,
    # each step to nearest, ties to even. bfloat16 is rounded by hand (Triton's interpreter
    # truncates): add 0x7FFF plus the lowest bit kept to the float32 bits, keep the top 16
    # (a NaN stays a NaN).
    if dtype == tl.float64:
        return v
    v = v.to(tl.float32)
    if dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        top = (bits + (((bits >> 16) & 1) + 0x7FFF)) >> 16
        return tl.where(v != v, 0x7FC0, top).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return v.to(dtype)


def bn_update_running_stats_(running_mean, running_var, mean, var, n: int,
                             momentum: float) -> None:
    """``bn_update_running_stats_`` (its schema in csrc/fgkernels.cpp) in one launch, for
    contiguous buffers of any floating dtype (strided ones:
    ``bn_math.update_running_stats_composite``, which computes the same)."""
    if not (running_mean.is_contiguous() and running_var.is_contiguous()):
        update_running_stats_composite(running_mean, running_var, mean, var, n, momentum)
        return
    block = 128
    _bn_update_running_stats_kernel[(triton.cdiv(mean.shape[0], block),)](
        running_mean, running_var, mean.contiguous(), var.contiguous(), momentum, n / (n - 1),
        mean.shape[0], BLOCK=block)

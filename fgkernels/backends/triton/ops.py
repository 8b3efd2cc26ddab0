"""The Triton kernels as operators of ``torch.ops.fgkernels_triton``, registered as the native
ops are: a schema, an implementation (the launcher) and a fake, so that ``torch.compile`` takes
a dual pass on the Triton backend as one graph with the kernels as opaque nodes, and
``torch.library.opcheck`` checks them (on the CPU in Triton's interpreter).

- ``dual_conv2d``: the fused convolution of ``conv.py``; with ``bn_stats`` also the batch
  statistics of its output (mean, biased var, tangent mean, mean((y − μ)·ẏ), float32, as
  ``fgkernels::dual_bn_stats`` gives them) from its epilogue's tile sums. It serves the calls
  that ``serves`` accepts and refuses any other with an error that says why.
- ``dual_bn_apply_``: the in-place batch-norm apply of ``batch_norm.py``, the contract of
  ``fgkernels::dual_bn_apply_`` (csrc/fgkernels.cpp) with one Triton launch.
"""
from __future__ import annotations

import torch

from ...dual.dtypes import tangent_dtype_fits
from ...dual.layout import (
    empty_like_format,
    empty_slots,
    in_kernel_layout,
    kernel_format,
    shares_memory,
)
from ..base import ConvArgs
from ..contracts import check_conv
from . import DTYPES
from .batch_norm import dual_bn_relu_apply_
from .conv import combine_tile_stats, slot_layout, too_large
from .conv import dual_conv2d as _launch_dual_conv2d

Tensor = torch.Tensor

_CONV_SCHEMA = ("(Tensor x, Tensor? xt, Tensor w, Tensor? wt, Tensor? b, Tensor? bt, "
                "int[] x_pos, int[] p_pos, int count, int[] stride, int[] padding, "
                "int[] dilation, bool bn_stats) "
                "-> (Tensor, Tensor?, Tensor?, Tensor?, Tensor?, Tensor?)")
_APPLY_SCHEMA = ("(Tensor(a!) x, Tensor(b!)? xt, Tensor center, Tensor scale, Tensor shift, "
                 "Tensor t_xscale, Tensor t_shift, bool relu) -> ()")


def serves(x: Tensor, w: Tensor, x_pos, p_pos, count: int, stride, padding, dilation) -> bool:
    """True when ``dual_conv2d`` serves this call: a slot layout the kernel lays out (the
    input's slots first, the parameters' the same or appended), an output of at least one
    pixel (else at::conv2d's refusal, where the caller falls back) and offsets inside a slot
    that fit int32, of an x with channels."""
    return (slot_layout(tuple(x_pos), tuple(p_pos), count) is not None
            and x.shape[1] > 0
            and min(_output_shape(x, w, stride, padding, dilation)[2:]) >= 1
            and not too_large(x, w, stride, padding, dilation))


def _output_shape(x, w, stride, padding, dilation):
    return ConvArgs(tuple(stride), tuple(padding), tuple(dilation), 1).output_shape(x.shape,
                                                                                  w.shape)


def _check_conv_operands(x, xt, w, wt, b, bt, x_pos, p_pos, stride, padding,
                         dilation) -> None:
    """The operands as the launcher takes them: conv2d's contract (groups = 1), one floating
    dtype for x, W and b that the kernel computes in, each tangent stacked over its role's
    slots, every tensor on x's device; an output of at least one pixel."""
    check_conv(x, w, b, 1, list(stride), list(padding), list(dilation))
    torch._check(x.dtype in DTYPES and w.dtype == x.dtype and (b is None or b.dtype == x.dtype),
                 lambda: f"fgkernels_triton.dual_conv2d computes in float32, bfloat16 or "
                         f"float16, x, w and b in one of them; got {x.dtype}, {w.dtype}"
                         f"{'' if b is None else f', {b.dtype}'}")
    for name, t, shape in (("xt", xt, (len(x_pos), *x.shape)), ("wt", wt, (len(p_pos), *w.shape)),
                           ("bt", bt, (len(p_pos), w.shape[0]))):
        if t is None:
            continue
        torch._check(tuple(t.shape) == shape,
                     lambda: f"fgkernels_triton.dual_conv2d: {name} must have shape {shape} "
                             f"(its slots, then the operand's shape), got {tuple(t.shape)}")
        torch._check(t.dtype in DTYPES,
                     lambda: f"fgkernels_triton.dual_conv2d: {name} must be float32, bfloat16 "
                             f"or float16, got {t.dtype}")
    # Each position names a slot of a tangent given (the launcher reads it), and x has the
    # channels the kernel's reduction runs over.
    torch._check(xt is not None or not x_pos,
                 lambda: f"fgkernels_triton.dual_conv2d: x_pos {list(x_pos)} names slots of "
                         "xt, which is None")
    torch._check(wt is not None or bt is not None or not p_pos,
                 lambda: f"fgkernels_triton.dual_conv2d: p_pos {list(p_pos)} names slots of "
                         "wt and bt, which are None")
    torch._check(x.shape[1] > 0,
                 lambda: f"fgkernels_triton.dual_conv2d: x has no channels, shape "
                         f"{tuple(x.shape)}")
    # (as the native op: the tangents of one call share one dtype, x's or one of fewer bits)
    given = [(name, t) for name, t in (("xt", xt), ("wt", wt), ("bt", bt)) if t is not None]
    torch._check(all(t.dtype == given[0][1].dtype for _, t in given),
                 lambda: "fgkernels_triton.dual_conv2d: the tangents of one call must share "
                         "one dtype, got " + ", ".join(f"{n} {t.dtype}" for n, t in given))
    torch._check(not given or tangent_dtype_fits(x.dtype, given[0][1].dtype),
                 lambda: f"fgkernels_triton.dual_conv2d: the tangents must have x's dtype "
                         f"{x.dtype} or one of fewer bits, got {given[0][1].dtype}")
    for name, t in (("xt", xt), ("w", w), ("wt", wt), ("b", b), ("bt", bt)):
        torch._check(t is None or t.device == x.device,
                     lambda: f"fgkernels_triton.dual_conv2d: {name} is on {t.device}, x on "
                             f"{x.device}")
    out = _output_shape(x, w, stride, padding, dilation)
    torch._check(min(out[2:]) >= 1,
                 lambda: f"fgkernels_triton.dual_conv2d: the output would be {out[2]}x{out[3]}: "
                         f"Kernel size can't be greater than actual input size (input "
                         f"{tuple(x.shape[2:])}, padding {tuple(padding)}, kernel "
                         f"{tuple(w.shape[2:])}, dilation {tuple(dilation)})")


def _check_served(x, w, x_pos, p_pos, count, stride, padding, dilation) -> None:
    torch._check(slot_layout(tuple(x_pos), tuple(p_pos), count) is not None,
                 lambda: f"fgkernels_triton.dual_conv2d lays out the input's slots first and "
                         f"the parameters' the same or appended after them; got x_pos "
                         f"{list(x_pos)}, p_pos {list(p_pos)}, count {count}")
    torch._check(not too_large(x, w, stride, padding, dilation),
                 lambda: "fgkernels_triton.dual_conv2d: a slot of 2**31 elements or more "
                         "(its offsets are int32)")


def _dual_conv2d(x, xt, w, wt, b, bt, x_pos, p_pos, count, stride, padding, dilation,
                 bn_stats):
    _check_conv_operands(x, xt, w, wt, b, bt, x_pos, p_pos, stride, padding, dilation)
    _check_served(x, w, x_pos, p_pos, count, stride, padding, dilation)
    y, yt, tiles = _launch_dual_conv2d(x, xt, w, wt, b, bt, tuple(x_pos), tuple(p_pos), count,
                                       stride, padding, dilation, bn_stats=bn_stats)
    stats = combine_tile_stats(*tiles, torch.float32) if bn_stats else (None,) * 4
    return (y, yt, *stats)


dual_conv2d = torch.library.custom_op("fgkernels_triton::dual_conv2d", _dual_conv2d,
                                      mutates_args=(), schema=_CONV_SCHEMA)


@dual_conv2d.register_fake
def _(x, xt, w, wt, b, bt, x_pos, p_pos, count, stride, padding, dilation, bn_stats):
    _check_conv_operands(x, xt, w, wt, b, bt, x_pos, p_pos, stride, padding, dilation)
    _check_served(x, w, x_pos, p_pos, count, stride, padding, dilation)
    y = empty_like_format(_output_shape(x, w, stride, padding, dilation), x)
    tangent_dtype = next((t.dtype for t in (xt, wt, bt) if t is not None), x.dtype)
    yt = empty_slots(count, y, tangent_dtype) if count else None
    if not bn_stats:
        return y, yt, None, None, None, None
    C = w.shape[0]
    stat = lambda *shape: x.new_empty(shape, dtype=torch.float32)
    return y, yt, stat(C), stat(C), stat(count, C), stat(count, C)


def _check_apply_operands(x, xt, center, scale, shift, t_xscale, t_shift) -> None:
    """The apply's contract, as ``fgkernels::dual_bn_apply_``'s: x a 4-D floating tensor,
    contiguous or channels_last; its T slots (T, *x.shape), each laid out as x, slot after slot;
    coefficients of shape (C,) and (T, C) on x's device."""
    torch._check(x.dim() == 4 and x.dtype in DTYPES,
                 lambda: f"fgkernels_triton.dual_bn_apply_: x must be a 4-D float32, bfloat16 or "
                         f"float16 tensor, got {x.dtype} of shape {tuple(x.shape)}")
    torch._check(x.is_contiguous(memory_format=kernel_format(x)),
                 lambda: "fgkernels_triton.dual_bn_apply_: x must be contiguous or "
                         f"channels_last, got strides {x.stride()}")
    C, T = x.shape[1], 0 if xt is None else xt.shape[0]
    if xt is not None:
        torch._check(tuple(xt.shape) == (T, *x.shape) and xt.dtype in DTYPES,
                     lambda: f"fgkernels_triton.dual_bn_apply_: xt must be a float32, bfloat16 "
                             f"or float16 stack of shape (T, {', '.join(map(str, x.shape))}), "
                             f"got {xt.dtype} of shape {tuple(xt.shape)}")
        torch._check(in_kernel_layout(x, xt),
                     lambda: "fgkernels_triton.dual_bn_apply_: each slot of xt must be laid out "
                             "as x, slot after slot")
        torch._check(tangent_dtype_fits(x.dtype, xt.dtype),
                     lambda: f"fgkernels_triton.dual_bn_apply_: xt must have x's dtype {x.dtype} "
                             f"or one of fewer bits, got {xt.dtype}")
    torch._check(center.shape == (C,) and scale.shape == (C,) and shift.shape == (C,),
                 lambda: f"fgkernels_triton.dual_bn_apply_: center, scale and shift must have "
                         f"shape ({C},)")
    torch._check(t_xscale.shape == (T, C) and t_shift.shape == (T, C),
                 lambda: f"fgkernels_triton.dual_bn_apply_: t_xscale and t_shift must have "
                         f"shape ({T}, {C})")
    for name, t in (("xt", xt), ("center", center), ("scale", scale), ("shift", shift),
                    ("t_xscale", t_xscale), ("t_shift", t_shift)):
        torch._check(t is None or t.device == x.device,
                     lambda: f"fgkernels_triton.dual_bn_apply_: {name} is on {t.device}, x on "
                             f"{x.device}")


def _dual_bn_apply_(x, xt, center, scale, shift, t_xscale, t_shift, relu) -> None:
    _check_apply_operands(x, xt, center, scale, shift, t_xscale, t_shift)
    # (the kernel reads the coefficients while it writes x and xt, and writes both: they must
    # not share memory, as the native op checks)
    written = [("x", x)] + ([("xt", xt)] if xt is not None else [])
    if xt is not None and shares_memory(x, xt):
        raise RuntimeError("x and xt share memory; they must be separate tensors")
    for name, c in (("center", center), ("scale", scale), ("shift", shift),
                    ("t_xscale", t_xscale), ("t_shift", t_shift)):
        for target, w in written:
            if shares_memory(c, w):
                raise RuntimeError(f"{name} and {target} share memory; they must be separate "
                                   "tensors")
    dual_bn_relu_apply_(x, xt, center, scale, shift, t_xscale, t_shift, relu)


dual_bn_apply_ = torch.library.custom_op("fgkernels_triton::dual_bn_apply_", _dual_bn_apply_,
                                         mutates_args=("x", "xt"), schema=_APPLY_SCHEMA)


@dual_bn_apply_.register_fake
def _(x, xt, center, scale, shift, t_xscale, t_shift, relu) -> None:
    _check_apply_operands(x, xt, center, scale, shift, t_xscale, t_shift)
    return None


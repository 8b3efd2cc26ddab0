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

from ...dual.layout import empty_like_format, empty_slots
from ..base import ConvArgs
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
    input's slots first, the parameters' the same or appended) and offsets inside a slot that
    fit int32."""
    return (slot_layout(tuple(x_pos), tuple(p_pos), count) is not None
            and not too_large(x, w, stride, padding, dilation))


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
    _check_served(x, w, x_pos, p_pos, count, stride, padding, dilation)
    y, yt, tiles = _launch_dual_conv2d(x, xt, w, wt, b, bt, tuple(x_pos), tuple(p_pos), count,
                                       stride, padding, dilation, bn_stats=bn_stats)
    stats = combine_tile_stats(*tiles, torch.float32) if bn_stats else (None,) * 4
    return (y, yt, *stats)


dual_conv2d = torch.library.custom_op("fgkernels_triton::dual_conv2d", _dual_conv2d,
                                      mutates_args=(), schema=_CONV_SCHEMA)


@dual_conv2d.register_fake
def _(x, xt, w, wt, b, bt, x_pos, p_pos, count, stride, padding, dilation, bn_stats):
    _check_served(x, w, x_pos, p_pos, count, stride, padding, dilation)
    y = empty_like_format(ConvArgs(tuple(stride), tuple(padding), tuple(dilation), 1)
                          .output_shape(x.shape, w.shape), x)
    tangent_dtype = next((t.dtype for t in (xt, wt, bt) if t is not None), x.dtype)
    yt = empty_slots(count, y, tangent_dtype) if count else None
    if not bn_stats:
        return y, yt, None, None, None, None
    C = w.shape[0]
    stat = lambda *shape: x.new_empty(shape, dtype=torch.float32)
    return y, yt, stat(C), stat(C), stat(count, C), stat(count, C)


def _dual_bn_apply_(x, xt, center, scale, shift, t_xscale, t_shift, relu) -> None:
    # (the kernel reads the coefficients while it writes x and xt, as the native op's check)
    for name, c in (("center", center), ("scale", scale), ("shift", shift),
                    ("t_xscale", t_xscale), ("t_shift", t_shift)):
        for written, w in (("x", x), ("xt", xt)):
            if w is not None and c.untyped_storage().data_ptr() == w.untyped_storage().data_ptr():
                raise RuntimeError(f"{name} and {written} share memory; they must be separate "
                                   "tensors")
    dual_bn_relu_apply_(x, xt, center, scale, shift, t_xscale, t_shift, relu)


dual_bn_apply_ = torch.library.custom_op("fgkernels_triton::dual_bn_apply_", _dual_bn_apply_,
                                         mutates_args=("x", "xt"), schema=_APPLY_SCHEMA)


@dual_bn_apply_.register_fake
def _(x, xt, center, scale, shift, t_xscale, t_shift, relu) -> None:
    C, T = x.shape[1], 0 if xt is None else xt.shape[0]
    torch._check(center.shape == (C,) and scale.shape == (C,) and shift.shape == (C,),
                 lambda: f"center, scale and shift must have shape ({C},)")
    torch._check(t_xscale.shape == (T, C) and t_shift.shape == (T, C),
                 lambda: f"t_xscale and t_shift must have shape ({T}, {C})")
    return None


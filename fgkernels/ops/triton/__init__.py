"""The Triton backend: the fused dual convolution (with the batch-norm sums in its epilogue)
and the in-place batch-norm apply. What they do not cover runs on the native backend."""
from __future__ import annotations

import functools
import os

import torch

from ..native import NativeBackend, _numeric_padding

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """True when Triton imports and can run: on CUDA, or on the CPU under TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


def _serves(x, w, groups, padding, dilation):
    """Numeric padding when the Triton convolution serves this call, else None."""
    if groups != 1 or x.dtype not in _DTYPES or w.dtype != x.dtype:
        return None
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return None
    return _numeric_padding(padding, w, dilation)


class TritonBackend(NativeBackend):
    """Fused Triton kernels where they apply (groups = 1; float32/bfloat16/float16; slots laid
    out as ``conv.slot_layout`` accepts), the native ops elsewhere."""

    name = "triton"

    def conv2d(self, x, xt, w, wt, b, bt, x_pos, p_pos, count, stride, padding, dilation,
               groups, y=None):
        """The Triton kernel computes the primal with the tangents from the same loads of x, so
        a given ``y`` is used only where it falls back to the native ops."""
        from .conv import dual_conv2d
        pad = _serves(x, w, groups, padding, dilation)
        out = None if pad is None else dual_conv2d(x, xt, w, wt, b, bt, x_pos, p_pos, count,
                                                   stride, pad, dilation)
        if out is None:
            return super().conv2d(x, xt, w, wt, b, bt, x_pos, p_pos, count, stride, padding,
                                  dilation, groups, y)
        y, yt, _ = out
        return y, yt

    def conv2d_batch_norm(self, x, xt, w, wt, cb, cbt, x_pos, conv_pos, count, stride, padding,
                          dilation, groups, g, bb, gt, bbt, bn_pos, running_mean, running_var,
                          training, momentum, eps, relu, conv_y=None):
        """Convolution with the batch-norm sums in its epilogue, then the apply kernel in place:
        the conv output is read once more, never for statistics. ``conv_y`` is used only where
        it falls back to the native ops (see ``conv2d``)."""
        from .batch_norm import dual_bn_relu_apply_
        from .conv import combine_tile_stats, dual_conv2d
        pad = _serves(x, w, groups, padding, dilation)
        out = None if pad is None else dual_conv2d(x, xt, w, wt, cb, cbt, x_pos, conv_pos, count,
                                                   stride, pad, dilation, bn_stats=training)
        if out is None:
            return super().conv2d_batch_norm(x, xt, w, wt, cb, cbt, x_pos, conv_pos, count,
                                             stride, padding, dilation, groups, g, bb, gt, bbt,
                                             bn_pos, running_mean, running_var, training,
                                             momentum, eps, relu, conv_y)
        y, yt, tile_stats = out
        stats = combine_tile_stats(*tile_stats, torch.float32) if training else None
        c = self.bn_coefficients(y, yt, g, bb, gt, bbt, tuple(range(count)), bn_pos, count,
                                 running_mean, running_var, training, momentum, eps, stats=stats)
        dual_bn_relu_apply_(y, yt, *c.apply_args(), relu)
        return y, yt

"""The Triton backend's ops: the fused convolution where it serves (groups = 1; float32,
bfloat16 or float16; slots laid out as ``conv.slot_layout`` accepts), the in-place
batch-norm apply after it; everything else is delegated to the native backend."""
from __future__ import annotations

import torch

from ...dual.slots import SlotPlan
from .. import bn_math
from ..base import ConvArgs, Delegating, LayerParams, Opt, Result, Tensor
from ..fused import InPlaceConvBatchNorm
from ..native.backend import NativeBackend
from . import DTYPES, INTERPRETED
from .ops import serves  # importing .ops registers torch.ops.fgkernels_triton


def _serves(x: Tensor, w: Tensor, conv: ConvArgs):
    """Explicit padding when the Triton convolution serves this call, else None."""
    if conv.groups != 1 or x.dtype not in DTYPES or w.dtype != x.dtype or x.numel() == 0:
        return None
    if x.device.type != "cuda" and not INTERPRETED:
        return None
    return conv.explicit_padding(w.shape)


class TritonBackend(InPlaceConvBatchNorm, Delegating):
    """Fused Triton kernels where they apply, the native ops elsewhere."""

    name = "triton"

    def __init__(self, fallback: NativeBackend):
        self.fallback = fallback  # the loaded native backend (its ops registered)

    def _fused_conv(self, x, xt, p: LayerParams, plan: SlotPlan, conv: ConvArgs, bn_stats):
        """The fused kernel's ``(y, yt, mean, var, tmean, tcov)`` (the statistics None without
        ``bn_stats``), or None where it does not serve."""
        pad = _serves(x, p.weight, conv)
        if pad is None or p.bias is not None and p.bias.dtype != x.dtype:
            return None  # (the native op: at::conv2d's refusal of a bias of another dtype)
        x_pos, p_pos = plan.positions
        if not serves(x, p.weight, x_pos, p_pos, plan.count, conv.stride, pad, conv.dilation):
            return None
        return torch.ops.fgkernels_triton.dual_conv2d(x, xt, *p, x_pos, p_pos, plan.count,
                                                      conv.stride, pad, conv.dilation, bn_stats)

    def conv2d(self, x: Tensor, xt: Opt, p: LayerParams, plan: SlotPlan, conv: ConvArgs,
               y: Opt = None) -> Result:
        """The kernel computes the primal with the tangents from the same loads of x, so a
        given ``y`` is used only where it delegates."""
        out = self._fused_conv(x, xt, p, plan, conv, bn_stats=False)
        if out is None:
            return self.fallback.conv2d(x, xt, p, plan, conv, y)
        return out[0], out[1]

    # --- the two hooks of InPlaceConvBatchNorm ------------------------------------------------
    def conv_for_batch_norm(self, x, xt, conv_p, conv_plan, conv, training, conv_y):
        """The batch-norm sums come from the convolution's epilogue: the output is read once
        more, never for statistics."""
        out = self._fused_conv(x, xt, conv_p, conv_plan, conv, bn_stats=training)
        if out is None:
            h, ht, _, owned = self.fallback.conv_for_batch_norm(x, xt, conv_p, conv_plan, conv,
                                                                training, conv_y)
            return h, ht, None, owned
        y, yt, *stats = out
        return y, yt, tuple(stats) if training else None, True

    def apply_in_place(self, h, ht, c: bn_math.BNCoefficients, relu: bool) -> None:
        # (a convolution the kernel did not serve, float64 say, comes from the native one)
        if h.device.type != "cuda" and not INTERPRETED or h.dtype not in DTYPES:
            self.fallback.apply_in_place(h, ht, c, relu)
        else:
            torch.ops.fgkernels_triton.dual_bn_apply_(h, ht, *c.apply_args(), relu)

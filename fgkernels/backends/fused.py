"""``conv2d_batch_norm`` for the backends whose convolution writes a fresh output that the
batch norm then updates in place: one template, two hooks.

The native and Triton backends differ only in where the batch statistics come from (a
statistics pass over the output, or the fused convolution's epilogue) and which apply kernel
runs; this mixin holds the rest: one activation-sized buffer less at the peak of every Conv→BN
run, and no statistics pass where the convolution supplies the sums."""
from __future__ import annotations

from typing import Optional

from ..dual.slots import SlotPlan
from . import bn_math
from .base import BatchNormArgs, ConvArgs, LayerParams, Opt, Result, Tensor


class InPlaceConvBatchNorm:
    """Mixin: ``conv2d_batch_norm`` from ``conv_for_batch_norm`` and ``apply_in_place``."""

    def conv2d_batch_norm(self, x: Tensor, xt: Opt, conv_p: LayerParams, conv_plan: SlotPlan,
                          conv: ConvArgs, bn_p: LayerParams, bn_plan: SlotPlan,
                          bn: BatchNormArgs, conv_y: Opt = None) -> Result:
        h, ht, stats, owned = self.conv_for_batch_norm(x, xt, conv_p, conv_plan, conv,
                                                       bn.training, conv_y)
        if not owned:
            return self.batch_norm(h, ht, bn_p, bn_plan, bn)
        c = bn_math.coefficients(h, ht, bn_p, bn_plan, bn, stats)
        self.apply_in_place(h, ht, c, bn.relu)
        return h, ht

    def conv_for_batch_norm(self, x: Tensor, xt: Opt, conv_p: LayerParams,
                            conv_plan: SlotPlan, conv: ConvArgs, training: bool,
                            conv_y: Opt) -> tuple[Tensor, Opt, Optional[tuple], bool]:
        """Hook: the convolution's ``(h, ht, batch statistics or None, owned)``; ``owned``
        when h and ht are fresh and laid out for ``apply_in_place``."""
        raise NotImplementedError

    def apply_in_place(self, h: Tensor, ht: Opt, c: bn_math.BNCoefficients,
                       relu: bool) -> None:
        """Hook: overwrite h and ht with the batch norm's (and ReLU's) output."""
        raise NotImplementedError

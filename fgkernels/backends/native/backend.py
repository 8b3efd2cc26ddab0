"""The native backend's ops: batch norm as one statistics pass and one apply pass that writes
the primal and every tangent slot together (ReLU fused); the convolution in three library calls
whatever the number of tangents (``csrc/composite.cpp``), two when the caller already has its
primal output. An op with no tangent in or out runs the plain
torch op; what the ops do not serve is delegated to the reference backend: a convolution whose
padding would be asymmetric and, on CUDA, a batch norm with more output slots than the kernel's
launch parameters hold (``MAX_BN_SLOTS``). The ops declared with their rules (``KernelOp``: ReLU,
hardtanh, max pool; ``LayerOp``: linear) run their compiled op where it serves, their reference
elsewhere."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ...dual.layout import in_kernel_layout
from ...dual.slots import SlotPlan, place
from .. import bn_math
from ..base import BatchNormArgs, ConvArgs, LayerParams, Opt, Result, Tensor
from ..fused import InPlaceConvBatchNorm
from ..reference import ReferenceBackend


class NativeBackend(InPlaceConvBatchNorm):
    """Ops of ``torch.ops.fgkernels``."""

    name = "native"
    # The most output slots a batch-norm apply serves, per device type (none on the CPU): the
    # CUDA kernel takes its slot map in the launch's parameters (``kMaxSlots`` in
    # csrc/cuda/dual_kernels.h).
    MAX_BN_SLOTS = {"cuda": 64}

    def __init__(self):
        self.fallback = ReferenceBackend()

    def serves_batch_norm(self, x: Tensor, plan: SlotPlan) -> bool:
        """Whether the batch-norm apply kernel of ``x``'s device takes ``plan``'s slots."""
        limit = self.MAX_BN_SLOTS.get(x.device.type)
        return limit is None or plan.count <= limit

    def conv2d(self, x: Tensor, xt: Opt, p: LayerParams, plan: SlotPlan, conv: ConvArgs,
               y: Opt = None) -> Result:
        w, wt, b, bt = p
        pad = conv.explicit_padding(w.shape)
        if pad is None:  # 'same' with an even kernel: asymmetric padding
            return self.fallback.conv2d(x, xt, p, plan, conv, y)
        if plan.count == 0:
            y = F.conv2d(x, w, b, conv.stride, pad, conv.dilation, conv.groups) if y is None \
                else y
            return y, None
        if y is None:
            y, x_part, p_part = torch.ops.fgkernels.dual_conv2d(
                x, xt, w, wt, b, bt, conv.stride, pad, conv.dilation, conv.groups)
        else:
            x_part, p_part = torch.ops.fgkernels.dual_conv2d_tangents(
                x, y, xt, w, wt, bt, conv.stride, pad, conv.dilation, conv.groups)
        x_pos, p_pos = plan.positions
        return y, place(plan.count, [(x_part, x_pos), (p_part, p_pos)], owned=True)

    def batch_norm(self, x: Tensor, xt: Opt, p: LayerParams, plan: SlotPlan,
                   bn: BatchNormArgs) -> Result:
        if plan.count == 0:
            y = F.batch_norm(x, bn.running_mean, bn.running_var, p.weight, p.bias, bn.training,
                             bn.momentum, bn.eps)
            return (torch.relu(y) if bn.relu else y), None
        if not self.serves_batch_norm(x, plan):
            return self.fallback.batch_norm(x, xt, p, plan, bn)
        c = bn_math.coefficients(x, xt, p, plan, bn)
        return torch.ops.fgkernels.dual_bn_apply(x, xt, c.x_slot, *c.apply_args(), bn.relu,
                                                 tangent_dtype=plan.dtype)

    # --- the two hooks of InPlaceConvBatchNorm ------------------------------------------------
    def conv_for_batch_norm(self, x, xt, conv_p, conv_plan, conv, training, conv_y):
        """The compiled convolution's output is fresh: the batch norm may update it in place
        (the reference one may hand back an expanded bias tangent), when the apply kernel
        serves its slots."""
        h, ht = self.conv2d(x, xt, conv_p, conv_plan, conv, conv_y)
        owned = (conv.explicit_padding(conv_p.weight.shape) is not None and conv_plan.count > 0
                 and in_kernel_layout(h, ht) and self.serves_batch_norm(h, conv_plan))
        return h, ht, None, owned

    def apply_in_place(self, h, ht, c: bn_math.BNCoefficients, relu: bool) -> None:
        torch.ops.fgkernels.dual_bn_apply_(h, ht, *c.apply_args(), relu)

    def kernel_op(self, op, x: Tensor, xt: Opt, *args) -> Result:
        kernel = op.kernel(x, *args) if xt is not None else None
        return op.reference(x, xt, *args) if kernel is None else kernel(x, xt, *args)

    def layer_op(self, op, x: Tensor, xt: Opt, p: LayerParams, plan: SlotPlan,
                 *args) -> Result:
        kernel = op.kernel(x, p.weight, *args) if plan.count else None
        if kernel is None:
            return op.run(op.reference, x, xt, p, plan, args)
        return op.run(kernel, x, xt, p, plan, args, owned=True)

"""The reference backend: the JVP formulas of docs/design.md in plain PyTorch.

Tangent terms are computed in the tangents' dtype (``plan.dtype``; a float32 weight meets a
bfloat16 tangent cast to bfloat16), except batch norm's, which are computed in float64 from
float64 statistics and rounded once: in float32 the normalised values of a channel whose mean
is far from zero beside its spread lose most of their digits (x̂ = (x − μ)/σ with μ rounded),
and so would a tangent made from them (tests/rules/test_hostile_inputs.py holds it to torch's
own error on such channels).

The readable definition of each rule, the backend when the extension is not built, and the one
the others delegate to for what they do not cover (``base.Backend`` states the contract).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..dual.slots import SlotPlan, place
from ..dual.value import in_primal_layout
from .base import BatchNormArgs, ConvArgs, LayerParams, Opt, Result, Tensor


def relu_reference(x: Tensor, xt: Opt) -> Result:
    """ReLU: ``ẏ = ẋ`` where ``x > 0`` or x is NaN, else 0 (torch.relu's derivative). A select,
    not a product: a NaN or Inf tangent where x <= 0 gives 0, as in torch."""
    return torch.relu(x), None if xt is None else zeroed_where(xt, x <= 0)


def zeroed_where(xt: Tensor, zero: Tensor) -> Tensor:
    """The stack ``xt`` with 0 where ``zero`` (of the primal's shape) holds, each slot laid out
    as ``xt``'s (``masked_fill`` of a broadcast mask would lay the result out contiguous)."""
    return xt.clone().masked_fill_(zero, 0)


def _bias_slots(bt: Tensor, y: Tensor) -> Tensor:
    """A stacked bias tangent ``(T, C)`` shaped to broadcast over ``(T, *y.shape)``,
    y being ``(N, C, *spatial)``."""
    return bt.reshape(bt.shape[0], 1, bt.shape[1], *([1] * (y.dim() - 2)))


class ReferenceBackend:
    """Pure-PyTorch JVPs."""

    name = "reference"

    # --- conv2d: y = W*x + b,  ẏ = W*ẋ + Ẇ*x + ḃ -----------------------------------------------
    def conv2d(self, x: Tensor, xt: Opt, p: LayerParams, plan: SlotPlan, conv: ConvArgs,
               y: Opt = None) -> Result:
        w, wt, b, bt = p
        run = lambda inp, weight, bias=None: F.conv2d(inp, weight, bias, conv.stride,
                                                      conv.padding, conv.dilation, conv.groups)
        y = run(x, w, b) if y is None else y
        x_pos, p_pos = plan.positions
        parts = []
        if xt is not None:
            # (each slot laid out as y: with one image, whose layout is ambiguous, F.conv2d
            # may return a channels_last input's result contiguous)
            x_part = run(xt.flatten(0, 1), w.to(plan.dtype)).unflatten(0, xt.shape[:2])
            parts.append((in_primal_layout(x_part, y), x_pos))
        if p_pos:
            if wt is not None:
                x_in = x.to(plan.dtype)
                pt = torch.stack([run(x_in, wt[t]) for t in range(wt.shape[0])])
                if bt is not None:
                    pt = pt + _bias_slots(bt, y)
            else:
                pt = _bias_slots(bt, y).expand(bt.shape[0], *y.shape)
            parts.append((pt, p_pos))
        return y, place(plan.count, parts) if parts else None

    # --- batch norm (+ ReLU) ---------------------------------------------------------------------
    def batch_norm(self, x: Tensor, xt: Opt, p: LayerParams, plan: SlotPlan,
                   bn: BatchNormArgs) -> Result:
        """Training: ``x̂ = (x-μ)/σ``, ``ẋ̂ = (ẋ - mean ẋ - x̂·mean(x̂ẋ))/σ``; eval: the affine map of
        the running stats. ``y = γx̂ + β``, ``ẏ = γ̇x̂ + γẋ̂ + β̇``; the running stats are updated
        by ``F.batch_norm`` itself, so they match ``nn.BatchNorm2d`` exactly. The tangent is
        computed in float64 and rounded once to ``plan.dtype``."""
        y = F.batch_norm(x, bn.running_mean, bn.running_var, p.weight, p.bias, bn.training,
                         bn.momentum, bn.eps)
        acc = torch.float64
        x, xt = x.to(acc), None if xt is None else xt.to(acc)
        w, wt, b, bt = (None if v is None else v.to(acc) for v in p)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        if bn.training:
            mean = x.mean(dims, keepdim=True)
            rstd = torch.rsqrt(x.var(dims, unbiased=False, keepdim=True) + bn.eps)
        else:
            mean = bn.running_mean.view(shape).to(acc)
            rstd = torch.rsqrt(bn.running_var.view(shape).to(acc) + bn.eps)
        xhat = (x - mean) * rstd
        x_pos, p_pos = plan.positions
        parts = []
        if xt is not None:
            if bn.training:
                tdims = [d + 1 for d in dims]
                xt_c = xt - xt.mean(tdims, keepdim=True)  # NaN where ẋ is an Inf, as torch's
                xt_hat = (xt_c - xhat * (xhat * xt_c).mean(tdims, keepdim=True)) * rstd
            else:
                xt_hat = xt * rstd
            parts.append((xt_hat if w is None else xt_hat * w.view(shape), x_pos))
        if p_pos:
            slots = p.slots
            bias = None if bt is None else bt.view(slots, *shape)
            if wt is not None:
                pt = wt.view(slots, *shape) * xhat
                pt = pt if bias is None else pt + bias
            else:
                pt = bias.expand(slots, *x.shape)
            parts.append((pt, p_pos))
        yt = place(plan.count, parts).to(plan.dtype) if parts else None
        return relu_reference(y, yt) if bn.relu else (y, yt)

    # --- conv2d → batch norm (+ ReLU) -------------------------------------------------------
    def conv2d_batch_norm(self, x: Tensor, xt: Opt, conv_p: LayerParams, conv_plan: SlotPlan,
                          conv: ConvArgs, bn_p: LayerParams, bn_plan: SlotPlan,
                          bn: BatchNormArgs, conv_y: Opt = None) -> Result:
        h, ht = self.conv2d(x, xt, conv_p, conv_plan, conv, conv_y)
        return self.batch_norm(h, ht, bn_p, bn_plan, bn)

    # --- an op declared with its own reference ----------------------------------------------
    def kernel_op(self, op, x: Tensor, xt: Opt, *args) -> Result:
        return op.reference(x, xt, *args)

    def layer_op(self, op, x: Tensor, xt: Opt, p: LayerParams, plan: SlotPlan,
                 *args) -> Result:
        return op.run(op.reference, x, xt, p, plan, args)

"""The contract between the layers' rules (``fgkernels.rules.layers``) and a backend.

A rule checks every argument (``contracts``), splits each Dual into its primal and
its stacked tangent ``(T, *shape)`` (None when zero), plans the output's slots (``SlotPlan``)
and calls one method of the backend that the registry picks for the device.
A backend computes and returns ``(y, y_tangents)``: the primal output and its stacked tangent
(None when no slot is live). It never sees a Dual and never re-checks arguments.

Slots: ``plan.positions`` gives, per operand in the order of the method's arguments (the input,
then the layer's parameters), the output slots its tangent slots fill; ``plan.count`` is the
number of output slots. A backend must not multiply by a tangent known to be zero: an operand
with no tangent is None and its terms are skipped.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Protocol, Union

import torch

from ..dual.dtypes import tangent_dtype_fits
from ..dual.slots import SlotPlan

Tensor = torch.Tensor
Opt = Optional[Tensor]
Result = tuple[Tensor, Opt]

__all__ = ["Backend", "Delegating", "LayerParams", "ConvArgs", "BatchNormArgs",
           "SlotPlan", "Result", "check_stacked_tangent", "shared_tangent_dtype", "param_slots"]


def check_stacked_tangent(x: Tensor, xt: Tensor, name: str = "xt") -> None:
    """xt must stack tangents of x: (T, *x.shape), of a dtype that fits x's (the ops' fakes
    check what the compiled ops check)."""
    torch._check(xt.dim() == x.dim() + 1 and xt.shape[1:] == x.shape,
                 lambda: f"{name} must have shape (T, *{tuple(x.shape)}), "
                         f"got {tuple(xt.shape)}")
    torch._check(xt.shape[0] >= 1,
                 lambda: f"{name}: a stack of T tangents needs T >= 1, got T = 0")
    torch._check(tangent_dtype_fits(x.dtype, xt.dtype),
                 lambda: f"{name} must have dtype {x.dtype} or one of fewer bits of the same kind, "
                         f"got {xt.dtype}")


def shared_tangent_dtype(x: Tensor, *tangents: Opt) -> torch.dtype:
    """The dtype the tangents of one call (any of them None) share; x's without any."""
    dtypes = {t.dtype for t in tangents if t is not None}
    torch._check(len(dtypes) <= 1,
                 lambda: f"the tangents of one call must share one dtype, got "
                         f"{sorted(map(str, dtypes))}")
    return dtypes.pop() if dtypes else x.dtype


def param_slots(wt: Opt, bt: Opt) -> int:
    """P, the parameter tangents' number of slots (0 without any)."""
    return wt.shape[0] if wt is not None else (bt.shape[0] if bt is not None else 0)


class LayerParams(NamedTuple):
    """A layer's weight and bias and their stacked tangents (any of them None)."""

    weight: Opt
    weight_t: Opt
    bias: Opt
    bias_t: Opt

    @property
    def slots(self) -> int:
        """The parameters' number of tangent slots (0 when none has a tangent)."""
        t = self.weight_t if self.weight_t is not None else self.bias_t
        return 0 if t is None else t.shape[0]


class ConvArgs(NamedTuple):
    """A 2-D convolution's geometry, as ``F.conv2d`` takes it (pairs, or a padding string)."""

    stride: tuple[int, int]
    padding: Union[tuple[int, int], str]
    dilation: tuple[int, int]
    groups: int

    def output_shape(self, x_shape, w_shape) -> tuple[int, int, int, int]:
        """``(N, C_out, H_out, W_out)`` for an input and weight of these shapes."""
        n, co = x_shape[0], w_shape[0]
        if self.padding == "same":
            return (n, co, *x_shape[2:])
        padding = (0, 0) if self.padding == "valid" else self.padding
        return (n, co, *[(size + 2 * p - d * (k - 1) - 1) // s + 1 for size, k, s, p, d in
                         zip(x_shape[2:], w_shape[2:], self.stride, padding, self.dilation)])

    def explicit_padding(self, w_shape) -> Optional[tuple[int, int]]:
        """Symmetric padding as two ints (resolving 'same'/'valid'), None when 'same' would
        need asymmetric padding (an even effective kernel)."""
        if not isinstance(self.padding, str):
            return tuple(self.padding)
        if self.padding == "valid":
            return (0, 0)
        total = [d * (k - 1) for d, k in zip(self.dilation, w_shape[2:])]
        return None if any(t % 2 for t in total) else tuple(t // 2 for t in total)


class BatchNormArgs(NamedTuple):
    """What a batch norm needs besides its input and parameters. ``momentum`` is the factor of
    this call (``nn.BatchNorm``'s cumulative average already resolved)."""

    running_mean: Opt
    running_var: Opt
    training: bool
    momentum: float
    eps: float
    relu: bool = False


class Backend(Protocol):
    """What a backend provides. Every method returns ``(y, stacked tangent or None)``."""

    name: str

    def conv2d(self, x: Tensor, xt: Opt, p: LayerParams, plan: SlotPlan, conv: ConvArgs,
               y: Opt = None) -> Result:
        """``y = W*x + b``, ``ẏ = W*ẋ + Ẇ*x + ḃ``; plan over (input, parameters). ``y``: the
        primal output when the caller has it (only the tangents are then computed)."""

    def batch_norm(self, x: Tensor, xt: Opt, p: LayerParams, plan: SlotPlan,
                   bn: BatchNormArgs) -> Result:
        """Batch norm (ReLU fused when ``bn.relu``), the running stats updated once from the
        primal as ``F.batch_norm`` does; plan over (input, parameters)."""

    def conv2d_batch_norm(self, x: Tensor, xt: Opt, conv_p: LayerParams, conv_plan: SlotPlan,
                          conv: ConvArgs, bn_p: LayerParams, bn_plan: SlotPlan,
                          bn: BatchNormArgs, conv_y: Opt = None) -> Result:
        """``conv2d`` then ``batch_norm`` as one op; ``bn_plan`` is over (the convolution's
        output slots, the batch norm's parameters) and has the convolution's slots.
        ``conv_y``: the convolution's primal output when the caller has it; it is handed
        over (the batch norm may overwrite it)."""

    def kernel_op(self, op, x: Tensor, xt: Opt, *args) -> Result:
        """An op declared as a ``kernel_op.KernelOp``: its compiled kernel where the backend
        has one for x's device that serves the call, else ``op.reference``."""

    def layer_op(self, op, x: Tensor, xt: Opt, p: LayerParams, plan: SlotPlan,
                 *args) -> Result:
        """An op declared as a ``layer_op.LayerOp``: its compiled kernel where the backend has
        one for x's device that serves the call, else ``op.reference``; plan over (input,
        parameters)."""


class Delegating:
    """Every op taken from the backend's ``fallback``: a backend inherits this last and
    implements only the ops it accelerates."""

    fallback: Backend

    def conv2d(self, x: Tensor, xt: Opt, p: LayerParams, plan: SlotPlan, conv: ConvArgs,
               y: Opt = None) -> Result:
        return self.fallback.conv2d(x, xt, p, plan, conv, y)

    def batch_norm(self, x: Tensor, xt: Opt, p: LayerParams, plan: SlotPlan,
                   bn: BatchNormArgs) -> Result:
        return self.fallback.batch_norm(x, xt, p, plan, bn)

    def conv2d_batch_norm(self, x: Tensor, xt: Opt, conv_p: LayerParams, conv_plan: SlotPlan,
                          conv: ConvArgs, bn_p: LayerParams, bn_plan: SlotPlan,
                          bn: BatchNormArgs, conv_y: Opt = None) -> Result:
        return self.fallback.conv2d_batch_norm(x, xt, conv_p, conv_plan, conv, bn_p, bn_plan,
                                               bn, conv_y)

    def kernel_op(self, op, x: Tensor, xt: Opt, *args) -> Result:
        return self.fallback.kernel_op(op, x, xt, *args)

    def layer_op(self, op, x: Tensor, xt: Opt, p: LayerParams, plan: SlotPlan,
                 *args) -> Result:
        return self.fallback.layer_op(op, x, xt, p, plan, *args)


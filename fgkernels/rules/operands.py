"""An op's operands split for a backend: each Dual into its primal and stacked tangent, one
layer's parameters into a ``LayerParams``, and the output's slots planned (``_slots.plan``)."""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.autograd.forward_ad as fwAD
from torch.utils import _pytree as pytree

from ..backends.base import LayerParams
from ..dual import slots as _slots
from ..dual.tangent_store import dual_of
from ..dual.value import Dual, refuse_autocast, refuse_nested_forward_mode

Tensor = torch.Tensor
MaybeDual = Union[Tensor, Dual]


class Parts(NamedTuple):
    """A Dual, Tensor or None as a backend takes it."""

    primal: Optional[Tensor]
    tangents: Optional[Tensor]          # (T, *primal.shape), None when zero
    slots: Optional[_slots.SlotOperand]  # None when zero


class LayerOperands(NamedTuple):
    """The input and parameters of a layer's op, and the output's slot plan over them."""

    x: Tensor
    xt: Optional[Tensor]
    params: LayerParams
    plan: _slots.SlotPlan


def parts(v) -> Parts:
    """The parts of a Dual, or of a Tensor (its recorded parameter tangent, if any) or None."""
    d = v if isinstance(v, Dual) else dual_of(v) if isinstance(v, Tensor) else None
    if d is None:
        return Parts(v, None, None)
    return Parts(d.primal, d.tangents, d.slot_operand())


def primal_of(v):
    """``v``'s primal where it is a Dual, else ``v`` itself (a Tensor, a number or None)."""
    return v.primal if isinstance(v, Dual) else v


def as_dual(v: MaybeDual, op: str) -> Dual:
    """``v`` as a Dual (a Tensor: its recorded parameter tangent, else a zero tangent). Refused
    under autocast, and where it is a dual tensor of forward_ad's (a converted layer's rule is
    called without Dual's dispatch, which refuses both for every other op)."""
    if torch._C._is_any_autocast_enabled():
        refuse_autocast(v if isinstance(v, Dual) else dual_of(v) if isinstance(v, Tensor) else v)
    if fwAD._current_level >= 0:
        refuse_nested_forward_mode(v)
    if isinstance(v, Dual):
        return v
    if isinstance(v, Tensor):
        d = dual_of(v)
        return Dual._unchecked(v, None, None, False) if d is None else d
    raise TypeError(f"{op}: expected a Dual or Tensor input, got {type(v).__name__}")


def layer_params(op: str, weight, bias) -> tuple[LayerParams, Optional[_slots.SlotOperand]]:
    """One layer's weight and bias and the slots their tangents carry together: the union of
    the two's directions, as any op takes its operands' (a backend takes one slot set for
    both: a slot only one of them has is zero in the other's stack), in the promoted dtype."""
    for name, v in (("weight", weight), ("bias", bias)):
        if not (v is None or isinstance(v, (Tensor, Dual))):
            raise TypeError(f"{op}: {name} must be a Dual, Tensor or None, got "
                            f"{type(v).__name__}")
    if fwAD._current_level >= 0:
        refuse_nested_forward_mode((weight, bias))
    w, b = parts(weight), parts(bias)
    if w.slots is not None and b.slots is not None and w.slots != b.slots:
        plan = _slots.plan([w.slots, b.slots], op)
        (w_pos, b_pos), n = plan.positions, plan.count
        return LayerParams(w.primal, _slots.spread(w.tangents, w_pos, n, w.primal, plan.dtype),
                           b.primal, _slots.spread(b.tangents, b_pos, n, b.primal, plan.dtype)), \
            plan.operand()
    return LayerParams(w.primal, w.tangents, b.primal, b.tangents), w.slots or b.slots


def layer_operands(op: str, input: MaybeDual, weight, bias) -> LayerOperands:
    """Split a layer op's input and parameters and plan its output's slots; every tangent is
    cast to the output slots' dtype (a no-op when they share it)."""
    x = parts(as_dual(input, op))
    params, slots = layer_params(op, weight, bias)
    plan = layer_plan([x.slots, slots], op, x.primal.dtype)
    return LayerOperands(x.primal, _slots.cast(x.tangents, plan.dtype),
                         tangents_as(params, plan.dtype), plan)


def layer_plan(operands: list, op: str, input_dtype: torch.dtype) -> _slots.SlotPlan:
    """The slots of a layer's output, whose primal has its input's dtype: in the operands'
    promoted dtype, or the input's where the parameters' tangents are wider (a bfloat16 input
    of a float32 batch norm has a bfloat16 output, and forward_ad a bfloat16 tangent)."""
    plan = _slots.plan(operands, op)
    dtype = plan.dtype_for(input_dtype) if plan.count else None
    return plan if dtype == plan.dtype else plan._replace(dtype=dtype)


def tangents_as(p: LayerParams, dtype: Optional[torch.dtype]) -> LayerParams:
    """``p`` with its tangents in ``dtype``."""
    weight_t, bias_t = _slots.cast(p.weight_t, dtype), _slots.cast(p.bias_t, dtype)
    if weight_t is p.weight_t and bias_t is p.bias_t:
        return p
    return LayerParams(p.weight, weight_t, p.bias, bias_t)


def result(y: Tensor, yt: Optional[Tensor], plan: _slots.SlotPlan) -> Dual:
    """The output Dual of an op whose backend returned ``(y, yt)``."""
    return Dual._unchecked(y, yt, plan.directions, plan.single) if yt is not None else Dual(y)


def refuse_dual_index(index) -> None:
    """Refuse a Dual among an index (of a Dual or of a plain tensor, read or written)."""
    if any(isinstance(i, Dual) for i in pytree.tree_leaves(index)):  # (in a list too)
        raise TypeError("a Dual cannot index a tensor; index with its primal (d.primal)")

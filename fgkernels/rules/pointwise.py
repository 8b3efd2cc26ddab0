"""Dual rules for elementwise arithmetic, activations and the linear tensor ops real networks
use (views, reductions, indexing).

Broadcasting: an operand's stacked tangent ``(T, *a.shape)`` is aligned with the result on its
trailing data dims, as torch aligns ``a``; the slot axis T stays in front and is never broadcast
against data. An operand without tangent (a plain tensor or number) is a constant.

Activations run torch's own derivative kernel of the activation over every tangent slot at
once: the formula of torch's forward-mode rule, its conventions at kinks and at NaN included.

Tangents of a lower precision than the primal (bfloat16) stay in it: a primal factor of a
tangent term is cast to the tangent's dtype (``_like``), and torch's kernels compute in float32.
"""
from __future__ import annotations

import cmath
import math
import struct
import sys
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from ..backends.kernel_op import KernelOp
from ..backends.reference import zeroed_where
from ..dual import slots as _slots
from ..dual.layout import empty_slots, kernel_format, slots_in_format, view_root
from ..dual.rule_table import implements
from ..dual.value import Dual, differentiable, in_primal_layout
from .fallback import forward_ad_fallback
from .operands import as_dual, parts

Tensor = torch.Tensor

__all__ = ["add", "sub", "mul", "div", "where", "clamp", "exp"]


def _parts(v):
    """``operands.parts`` of an arithmetic operand: a Dual, a Tensor or a number (a NumPy
    scalar taken as the Python number it holds, as torch takes it)."""
    if not isinstance(v, (Dual, Tensor, int, float, complex, bool)):
        numpy = sys.modules.get("numpy")
        if numpy is None or not isinstance(v, numpy.generic):
            raise TypeError(f"expected a Dual, Tensor or number, got {type(v).__name__}")
        v = v.item()
    return parts(v)


def lift(stack: Tensor, dim: int) -> Tensor:
    """A stack ``(T, *s)`` with singleton dims inserted after T so that its data part has
    ``dim`` dims, trailing dims aligned: it then broadcasts against data of ``dim`` dims."""
    missing = dim - (stack.dim() - 1)
    return stack if missing <= 0 else stack.reshape(stack.shape[0], *([1] * missing),
                                                    *stack.shape[1:])


def broadcast_stack(stack: Tensor, shape) -> Tensor:
    """A stack ``(T, *s)`` broadcast to ``(T, *shape)``, ``s`` aligned on ``shape``'s trailing
    dims (a view, no copy)."""
    if stack.shape[1:] == shape:
        return stack
    return lift(stack, len(shape)).expand(stack.shape[0], *shape)


def _number_left(a, b) -> bool:
    """True for a Python number left of a tensor (``2 + d``, ``0.9 * d``, ``1 / d``): the
    primal is then computed as torch computes the reflected operator (``t + 2``, ``t * 0.9``,
    ``t.reciprocal() * 1``), the number a scalar of the tensor's own precision (not a float32
    0.9 widened), with no dtype to work out (``torch.result_type``, which torch.compile cannot
    trace)."""
    return not isinstance(a, Tensor) and isinstance(b, Tensor)


def _like(v, t: Tensor):
    """A primal factor ``v`` of a tangent term, in the dtype of the tangent ``t``."""
    return v.to(t.dtype) if isinstance(v, Tensor) and v.is_floating_point() else v


def _combine(op: str, y: Tensor, terms) -> Dual:
    """The Dual of ``y`` whose tangent is the sum of ``terms``: (operand slots, function of that
    operand's stack giving its term, broadcastable to ``(T, *y.shape)``), None-free. Each stack
    reaches its function in the output slots' dtype (``SlotPlan.dtype_for``: y's, unless a
    tangent is narrower than its primal by design)."""
    terms = [(o, t, fn) for o, t, fn in terms if o is not None]
    if not differentiable(y.dtype):  # a Dual filled into an integer tensor: torch's value alone
        return y
    plan = _slots.plan([o for o, _, _ in terms], op)
    if plan.count == 0:
        return Dual(y)
    dtype = plan.dtype_for(y.dtype)
    parts = [(broadcast_stack(fn(lift(_slots.cast(t, dtype), y.dim())), y.shape), pos)
             for (_, t, fn), pos in zip(terms, plan.positions)]
    stack = _slots.place(plan.count, parts)
    # The output owns its tangent, dense, as forward_ad's does: one broadcast from a smaller
    # operand (X − b) is laid out in full, one passed through from an operand (x + c, a where
    # with one Dual branch) is copied, or an in-place op on a view of the output would write
    # many elements into one, or into the operand's tangent.
    if 0 in stack.stride():
        stack = slots_in_format(stack, kernel_format(y))
    if any(view_root(stack) is view_root(t) for _, t, _ in terms):
        stack = stack.clone()
    return Dual._unchecked(y, stack, plan.directions, plan.single)


# --- arithmetic ---------------------------------------------------------------------------------
@implements(torch.add, torch.Tensor.add, torch.Tensor.__add__, torch.Tensor.__radd__)
def add(input, other, *, alpha=1) -> Dual:
    """Dual ``input + alpha·other`` (either may be a Dual, a tensor or a number)."""
    (a, at, ao), (b, bt, bo) = _parts(input), _parts(other)
    if not _number_left(a, b):
        y = torch.add(a, b, alpha=alpha)
    else:  # a + alpha·b
        y = torch.add(b, a) if alpha == 1 else torch.rsub(b, a, alpha=-alpha)
    # (alpha = 1: the tangent as it is, not a scaled copy)
    return _combine("add", y, [(ao, at, lambda t: t),
                               (bo, bt, (lambda t: t) if alpha == 1 else (lambda t: t * alpha))])


@implements(torch.sub, torch.Tensor.sub, torch.Tensor.__sub__)
def sub(input, other, *, alpha=1) -> Dual:
    """Dual ``input - alpha·other``."""
    _refuse_bool_subtraction(input, other)
    return add(input, other, alpha=-alpha)


@implements(torch.Tensor.__rsub__, torch.rsub)
def _rsub(input, other, *, alpha=1) -> Dual:
    _refuse_bool_subtraction(input, other)
    return add(other, input, alpha=-alpha)


def _refuse_bool_subtraction(*operands) -> None:
    """torch's refusal of ``-`` with a bool tensor, which ``add(alpha=-1)`` would not give."""
    if any(isinstance(v, bool) or isinstance(v, Tensor) and v.dtype == torch.bool
           for v in operands):
        raise RuntimeError("Subtraction, the `-` operator, with a bool tensor is not supported. "
                           "If you are trying to invert a mask, use the `~` or `logical_not()` "
                           "operator instead.")


@implements(torch.mul, torch.Tensor.mul, torch.Tensor.__mul__, torch.Tensor.__rmul__,
            torch.multiply)
def mul(input, other) -> Dual:
    """Dual product: ``ẏ = ȧ·b + a·ḃ``."""
    (a, at, ao), (b, bt, bo) = _parts(input), _parts(other)
    y = torch.mul(b, a) if _number_left(a, b) else torch.mul(a, b)
    return _combine("mul", y,
                    [(ao, at, lambda t: t * _like(b, t)), (bo, bt, lambda t: _like(a, t) * t)])


@implements(torch.floor_divide, torch.Tensor.floor_divide, torch.Tensor.__floordiv__)
def floor_divide(input, other) -> Dual:
    """Dual ``floor_divide``: ``div(rounding_mode='floor')``, as torch computes it (a step:
    a zero tangent; forward_ad has no rule for it)."""
    return div(input, other, rounding_mode="floor")


@implements(torch.Tensor.__rfloordiv__)
def _rfloordiv(input, other) -> Dual:
    return div(other, input, rounding_mode="floor")


@implements(torch.div, torch.Tensor.div, torch.Tensor.__truediv__, torch.true_divide,
            torch.divide)
def div(input, other, *, rounding_mode: Optional[str] = None) -> Dual:
    """Dual quotient: ``y = a/b``, ``ẏ = (ȧ − y·ḃ)/b`` (one quotient, as forward_ad: at b = 0
    the two terms ``ȧ/b`` and ``y·ḃ/b`` would be infinities whose difference is NaN). Rounded
    (``rounding_mode`` 'trunc' or 'floor'), a step function: a zero tangent, as forward_ad's
    (and floor's) is, a NaN or infinite one too."""
    (a, at, ao), (b, bt, bo) = _parts(input), _parts(other)
    if rounding_mode is not None:
        y = torch.div(a, b, rounding_mode=rounding_mode)
        plan = _slots.plan([ao, bo], "div")
        if plan.count == 0:
            return Dual(y)
        zeros = empty_slots(plan.count, y, plan.dtype_for(y.dtype)).zero_()
        return Dual._unchecked(y, zeros, plan.directions, plan.single)
    y = torch.reciprocal(b) * a if _number_left(a, b) else torch.div(a, b)
    if ao is None or bo is None:
        return _combine("div", y, [(ao, at, lambda t: t / _like(b, t)),
                                   (bo, bt, lambda t: -(_like(y, t) * t) / _like(b, t))])
    # both terms present: the numerator's stack is a fresh sum, divided in place
    out = _combine("div", y, [(ao, at, lambda t: t), (bo, bt, lambda t: -(_like(y, t) * t))])
    out.tangents.div_(_like(b, out.tangents))
    return out


@implements(torch.Tensor.__rtruediv__)
def _rdiv(input, other) -> Dual:
    return div(other, input)


@implements(torch.neg, torch.Tensor.neg, torch.Tensor.__neg__, torch.negative)
def _neg(input: Dual) -> Dual:
    return input.map(torch.neg)


@implements(torch.lerp, torch.Tensor.lerp)
def lerp(input, end, weight) -> Dual:
    """Dual ``input + w·(end − input)``: ``ẏ = (1 − w)·ȧ + w·ė + ẇ·(end − input)``."""
    (a, at, ao), (e, et, eo), (w, wt, wo) = _parts(input), _parts(end), _parts(weight)
    y = torch.lerp(a, e, w)
    # 1 − w at the primal's precision, rounded once: w rounded first cancels near w = 1
    return _combine("lerp", y, [(ao, at, lambda t: t * _like(1 - w, t)),
                                (eo, et, lambda t: t * _like(w, t)),
                                (wo, wt, lambda t: t * _like(e - a, t))])


@implements(torch.addcmul, torch.Tensor.addcmul)
def addcmul(input, tensor1, tensor2, *, value=1) -> Dual:
    """Dual ``input + value·t₁·t₂``: ``ẏ = ȧ + value·(ṫ₁·t₂ + t₁·ṫ₂)``."""
    (a, at, ao), (b, bt, bo), (c, ct, co) = _parts(input), _parts(tensor1), _parts(tensor2)
    y = torch.addcmul(a, b, c, value=value)
    return _combine("addcmul", y, [(ao, at, lambda t: t),
                                   (bo, bt, lambda t: t * _like(c, t) * value),
                                   (co, ct, lambda t: t * _like(b, t) * value)])


@implements(torch.addcdiv, torch.Tensor.addcdiv)
def addcdiv(input, tensor1, tensor2, *, value=1) -> Dual:
    """Dual ``input + value·t₁/t₂``: ``ẏ = ȧ + value·(ṫ₁/t₂ − (t₁/t₂)·ṫ₂/t₂)``, divided twice
    as forward_ad does: t₂² leaves the dtype's range where t₁/t₂² does not."""
    (a, at, ao), (b, bt, bo), (c, ct, co) = _parts(input), _parts(tensor1), _parts(tensor2)
    y = torch.addcdiv(a, b, c, value=value)
    return _combine("addcdiv", y, [(ao, at, lambda t: t),
                                   (bo, bt, lambda t: t / _like(c, t) * value),
                                   (co, ct, lambda t: -(t * _like(b / c, t)) / _like(c, t)
                                    * value)])


@implements(torch.atan2, torch.Tensor.atan2, torch.arctan2, torch.Tensor.arctan2)
def atan2(input, other) -> Dual:
    """Dual ``atan2(a, b)``: ``ẏ = (b·ȧ − a·ḃ)/(a² + b²)``, each coefficient one quotient (as
    forward_ad's formula: 1/(a² + b²) overflows where b/(a² + b²) does not)."""
    (a, at, ao), (b, bt, bo) = _parts(input), _parts(other)
    y = torch.atan2(a, b)
    den = a * a + b * b
    return _combine("atan2", y, [(ao, at, lambda t: t * _like(b / den, t)),
                                 (bo, bt, lambda t: t * _like(-a / den, t))])


@implements(torch.nan_to_num, torch.Tensor.nan_to_num)
def nan_to_num(input, nan: float = 0.0, posinf: Optional[float] = None,
               neginf: Optional[float] = None) -> Dual:
    """Dual ``nan_to_num``: ``ẏ = ẋ`` where x is finite, 0 where x was replaced (a constant; a
    NaN tangent there stays NaN, as forward_ad's product with 0 leaves it)."""
    y = torch.nan_to_num(input.primal, nan, posinf, neginf)
    return _activation(input, y, lambda t, x: t * torch.isfinite(x))


@implements(torch.where)
def where(condition, input=None, other=None) -> Dual:
    """Dual select: ``ẏ = where(condition, ȧ, ḃ)`` (an operand without tangent gives 0).
    ``torch.where(d)`` alone is ``nonzero(as_tuple=True)`` of the primal: indices."""
    if input is None and other is None and isinstance(condition, Dual):
        return torch.where(condition.primal)
    if isinstance(condition, Dual):
        raise TypeError("where: the condition must be a bool Tensor, got a Dual")
    (a, at, ao), (b, bt, bo) = _parts(input), _parts(other)
    y = torch.where(condition, a, b)
    return _combine("where", y, [(ao, at, lambda t: torch.where(condition, t, 0)),
                                 (bo, bt, lambda t: torch.where(condition, 0, t))])


@implements(torch.Tensor.where)
def _where_method(input, condition, other) -> Dual:
    """``input.where(condition, other)``: ``torch.where(condition, input, other)``."""
    return where(condition, input, other)


@implements(torch.masked_fill, torch.Tensor.masked_fill)
def masked_fill(input, mask, value) -> Dual:
    """Dual ``masked_fill``: torch's value; ``ẏ = where(mask, v̇, ẋ)`` (``v̇`` 0 for a number or
    a plain tensor; a masked tangent of x is dropped, a NaN one too, as forward_ad drops it)."""
    if isinstance(mask, Dual):
        raise TypeError("masked_fill: the mask must be a bool Tensor, got a Dual")
    (x, xt, xo), (v, vt, vo) = _parts(input), _parts(value)
    y = torch.masked_fill(x, mask, v)
    return _combine("masked_fill", y, [(xo, xt, lambda t: t.masked_fill(mask, 0)),
                                       (vo, vt, lambda t: torch.where(mask, t, 0))])


@implements(torch.index_fill, torch.Tensor.index_fill)
def index_fill(input, dim: int, index: Tensor, value) -> Dual:
    """Dual ``index_fill``: torch's value; ``ẏ = v̇`` at the filled indices, ``ẋ`` elsewhere (a
    0-d Dual value into a plain tensor included, whose slots ``torch.vmap`` gets wrong)."""
    (x, xt, xo), (v, vt, vo) = _parts(input), _parts(value)
    y = torch.index_fill(x, dim, index, v)
    filled = torch.zeros_like(x, dtype=torch.bool).index_fill(dim, index, True)
    return _combine("index_fill", y, [(xo, xt, lambda t: t.masked_fill(filled, 0)),
                                      (vo, vt, lambda t: torch.where(filled, t, 0))])


@implements(torch.Tensor.masked_fill_)
def _masked_fill_(input, mask, value) -> Dual:
    if not isinstance(input, Dual):  # a plain tensor filled from a Dual: the fallback's policy
        return forward_ad_fallback(torch.Tensor.masked_fill_, (input, mask, value), {})
    return input._assign(masked_fill(input, mask, value))


@implements(torch.maximum, torch.Tensor.maximum)
def maximum(input, other) -> Dual:
    """Dual elementwise maximum: the larger operand's tangent, the two's mean at a tie."""
    return _extremum(torch.maximum, torch.gt, input, other)


@implements(torch.minimum, torch.Tensor.minimum)
def minimum(input, other) -> Dual:
    """Dual elementwise minimum: the smaller operand's tangent, the two's mean at a tie."""
    return _extremum(torch.minimum, torch.lt, input, other)


def _extremum(op: Callable, wins: Callable, input, other) -> Dual:
    """``op(a, b)`` of maximum or minimum, whose tangent is torch's forward mode's
    ``ḃ + w·(ȧ − ḃ)`` (as ``w·ȧ + (ḃ − w·ḃ)``, equal to rounding) with ``w`` ½ where a = b,
    else 1 where ``wins(a, b)``: ḃ where either is NaN (the primal is NaN there). An infinite
    ḃ gives NaN wherever it is, as in torch's (Inf − Inf or 0·Inf), not (1 − w)·ḃ's ±Inf."""
    (a, at, ao), (b, bt, bo) = _parts(input), _parts(other)
    y = op(a, b)
    w = torch.where(a == b, 0.5, wins(a, b).to(y.dtype))
    return _combine(op.__name__, y, [(ao, at, lambda t: t * _like(w, t)),
                                     (bo, bt, lambda t: t - t * _like(w, t))])


# torch 2.14 changed clamp's forward-mode rule where x ties a bound: a number bound now keeps
# x's tangent strictly inside the bounds only (before: inside or on them), and a tensor bound
# that x ties (the bounds ordered, min < max, where there are two) gives the mean of x's and
# the bound's tangents (before: the bound's with one bound, x's with two). The rule follows the
# torch it runs on, as forward_ad does.
_CLAMP_TIES_SHARED = torch.torch_version.TorchVersion(torch.__version__) >= (2, 14)


@implements(torch.clamp, torch.Tensor.clamp, torch.clip, torch.Tensor.clip)
def clamp(input, min=None, max=None) -> Dual:
    """Dual clamp, with torch's forward-mode conventions for each form of the bounds (those of
    the torch it runs on: ``_CLAMP_TIES_SHARED``).

    Number bounds: ``ẏ = ẋ`` where ``min ≤ x ≤ max`` (from torch 2.14: ``min < x < max``), else
    0. Tensor bounds (a Dual's tangent counts; a plain tensor is constant): ``ẏ`` is the
    tangent of the operand ``y`` equals, and where ``min > max``, ``y = max``. At a tie, torch
    before 2.14 gives x's tangent when both bounds are given, the bound's when one is; from
    2.14, the mean of x's and the bound's (x's where ``min = max``)."""
    return _clamp(input, min, max, x_takes_ties=False)


@implements(torch.clamp_min, torch.Tensor.clamp_min)
def clamp_min(input, min) -> Dual:
    """Dual ``clamp_min``: clamp's rule with the bound ``min``, but for torch's forward mode
    before 2.14 at a tie with a tensor bound, where it keeps x's tangent, not the bound's."""
    return _clamp(input, min, None, x_takes_ties=not _CLAMP_TIES_SHARED)


@implements(torch.clamp_max, torch.Tensor.clamp_max)
def clamp_max(input, max) -> Dual:
    """Dual ``clamp_max``: as ``clamp_min``, with the bound ``max``."""
    return _clamp(input, None, max, x_takes_ties=not _CLAMP_TIES_SHARED)


def _clamp(input, min, max, x_takes_ties: bool) -> Dual:
    """``clamp``'s rule; ``x_takes_ties``: with one tensor bound, x's tangent where x ties it."""
    if not isinstance(min, (Tensor, Dual)) and not isinstance(max, (Tensor, Dual)):
        input = as_dual(input, "clamp")  # (a plain tensor: the functional face's zero tangent)
        x = input.primal
        inside = torch.ones_like(x, dtype=torch.bool)
        if min is not None:
            inside &= x >= min if not _CLAMP_TIES_SHARED else x > min
        if max is not None:
            inside &= x <= max if not _CLAMP_TIES_SHARED else x < max
        return input.with_tangents(torch.clamp(x, min, max), _select(input.tangents, inside))
    (x, xt, xo), (lo, lot, loo), (hi, hit, hio) = (parts(v) for v in (input, min, max))
    y = torch.clamp(x, lo, hi)
    tie_lo = tie_hi = None
    if lo is not None and hi is not None:
        # torch: where(min > max, ṁax, where(x < min, ṁin, where(x > max, ṁax, ẋ))), and
        # from 2.14 (ẋ + ṁin)/2 where x = min < max, (ẋ + ṁax)/2 where x = max > min
        swapped, below, above = lo > hi, x < lo, x > hi
        to_lo = ~swapped & below
        to_hi = swapped | (~below & above)
        to_x = ~(to_lo | to_hi)
        if _CLAMP_TIES_SHARED:
            ordered = lo < hi
            tie_lo, tie_hi = ordered & (x == lo), ordered & (x == hi)
    elif lo is not None:
        to_x = x >= lo if x_takes_ties else x > lo
        # torch: where(x > min, ẋ, ṁin) (clamp_min: x >= min); 2.14: (ẋ + ṁin)/2 at x = min
        to_lo, to_hi = ~to_x, None
        tie_lo = x == lo if _CLAMP_TIES_SHARED else None
    else:
        to_x = x <= hi if x_takes_ties else x < hi
        # torch: where(x < max, ẋ, ṁax) (clamp_max: x <= max); 2.14: (ẋ + ṁax)/2 at x = max
        to_lo, to_hi = None, ~to_x
        tie_hi = x == hi if _CLAMP_TIES_SHARED else None
    pick = lambda mask: lambda t: torch.where(mask, t, 0)
    if tie_lo is None and tie_hi is None:
        return _combine("clamp", y, [(xo, xt, pick(to_x)), (loo, lot, pick(to_lo)),
                                     (hio, hit, pick(to_hi))])
    tie = tie_lo if tie_hi is None else tie_hi if tie_lo is None else tie_lo | tie_hi
    # a tie takes half of each tangent: x's, and the bound's it ties
    share = lambda keep, half: lambda t: torch.where(half, t * 0.5, torch.where(keep, t, 0))
    return _combine("clamp", y, [(xo, xt, share(to_x, tie)),
                                 (loo, lot, share(to_lo, tie_lo) if tie_lo is not None
                                  else pick(to_lo)),
                                 (hio, hit, share(to_hi, tie_hi) if tie_hi is not None
                                  else pick(to_hi))])


def _select(stack: Optional[Tensor], keep: Tensor) -> Optional[Tensor]:
    """Every slot where ``keep``, else 0 (a select: a NaN tangent where not ``keep`` gives 0),
    each slot laid out as before."""
    return None if stack is None else zeroed_where(stack, ~keep)


# --- activations: y = f(x), ẏ = f'(x)·ẋ ---------------------------------------------------------
# Each tangent comes from torch's own derivative kernel of f (``aten.<f>_backward``, the
# formula torch's forward-mode AD uses), run once over every slot: one fused pass, and exactly
# forward_ad's numbers, its conventions at kinks and at NaN included.
_aten = torch.ops.aten


def _activation(input, y: Tensor, derivative: Callable[[Tensor, Tensor], Tensor],
                inplace: bool = False, selects: bool = False) -> Dual:
    """The Dual of ``y = f(x)`` with ``ẏ = derivative(ẋ, x)`` over all slots; ``inplace``
    makes it an in-place op on ``input`` (``Dual._assign``).

    A tangent narrower than x takes the slope ``f'(x) = derivative(1, x)`` computed at x's own
    precision, and each product ``ẋ·f'(x)`` is formed there too and rounded once: x rounded to
    the tangent's dtype first could cross a kink (a bound at 1.5: 1.496 rounds to 1.5 in
    bfloat16, where the slope is 0), and a slope rounded alone could overflow where the product
    does not (log's 1/x at x = 1e-5 in float16). A kernel that
    ``selects`` (hardsigmoid's, hardswish's: 0 outside a range, whatever the
    tangent) gives 0 there for a NaN or infinite tangent too, where a product with the slope
    would not: those places are found as the ones where it gives 0 for a NaN tangent. Any other
    kernel multiplies, and so does the product (a NaN tangent stays NaN where the slope
    underflows to 0, as in forward_ad)."""
    d = input if isinstance(input, Dual) else Dual(input)
    x, t = d.primal, d.tangents
    if t is None:
        tangents = None
    elif t.dtype == x.dtype:
        tangents = derivative(t, x.expand_as(t))
    elif x.is_complex():
        # A complex derivative need not be a product with a slope (|x|'s is Re(conj(ẋ)·x/|x|),
        # and real): formed at x's precision, a complex one rounded once to the tangent's (a
        # real one stays at the output's, as the slot plans take a real output's dtype)
        tangents = derivative(t.to(x.dtype), x.expand_as(t))
        if tangents.is_complex():
            tangents = tangents.to(t.dtype)
    else:
        slope = derivative(torch.ones_like(x), x)
        if torch.compiler.is_dynamo_compiling() or (
                torch.is_grad_enabled() and (slope.requires_grad or t.requires_grad)):
            # (autograd records no out=; Dynamo refuses a strided one, a channels_last stack,
            # and breaks the graph: Inductor fuses the product and the cast anyway)
            tangents = (t * slope).to(t.dtype)
        else:  # the product in x's dtype, element by element, written in t's: no wide copy
            tangents = torch.mul(t, slope, out=torch.empty_like(t))
        if selects:
            tangents.masked_fill_(derivative(torch.full_like(x, float("nan")), x) == 0, 0)
    out = d.with_tangents(y, tangents)
    return d._assign(out) if inplace else out


# hardtanh: y = clamp(x, min_val, max_val), ẏ = ẋ where min_val < x < max_val or x is NaN,
# else 0: a select, x compared with the bounds as torch's derivative compares them, in x's dtype
# or in float32 for a 16-bit x (a bound such as 0.1 is not rounded to bfloat16 first; its
# vectorized CPU loop gives 0 at a NaN x, its scalar loop and torch.relu's derivative ẋ); one
# compiled kernel on the native backend.
def _hardtanh_reference(x: Tensor, xt: Optional[Tensor], min_val: float, max_val: float):
    y = F.hardtanh(x, min_val, max_val)
    xw = x.float() if x.dtype in (torch.bfloat16, torch.float16) else x
    return y, None if xt is None else zeroed_where(xt, (xw <= min_val) | (xw >= max_val))


def _check_hardtanh(x: Tensor, min_val: float, max_val: float) -> None:
    torch._check_value(min_val <= max_val,
                       lambda: "hardtanh: min_val cannot be greater than max_val")


_hardtanh = KernelOp("dual_hardtanh", _hardtanh_reference, _check_hardtanh)


@implements(F.hardtanh)
def hardtanh(input, min_val: float = -1.0, max_val: float = 1.0, inplace: bool = False) -> Dual:
    """Dual hardtanh (ReLU6 too): ``ẏ = ẋ`` strictly inside the bounds and at a NaN x, else
    0."""
    d = input if isinstance(input, Dual) else Dual(input)
    out = _hardtanh.on(d, min_val, max_val)
    return d._assign(out) if inplace else out


@implements(F.hardtanh_)
def _hardtanh_(input, min_val: float = -1.0, max_val: float = 1.0) -> Dual:
    return hardtanh(input, min_val, max_val, inplace=True)


@implements(F.relu6)
def relu6(input, inplace: bool = False) -> Dual:
    """Dual ReLU6: hardtanh on [0, 6]."""
    return hardtanh(input, 0.0, 6.0, inplace)


@implements(F.leaky_relu)
def leaky_relu(input, negative_slope: float = 0.01, inplace: bool = False) -> Dual:
    """Dual leaky ReLU: slope 1 where x > 0, else ``negative_slope``."""
    return _activation(input, F.leaky_relu(input.primal, negative_slope),
                       lambda t, x: _aten.leaky_relu_backward(t, x, negative_slope, False),
                       inplace)


@implements(F.leaky_relu_)
def _leaky_relu_(input, negative_slope: float = 0.01) -> Dual:
    return leaky_relu(input, negative_slope, inplace=True)


@implements(F.rrelu)
def rrelu(input, lower: float = 1.0 / 8, upper: float = 1.0 / 3, training: bool = False,
          inplace: bool = False) -> Dual:
    """Dual randomized leaky ReLU: slope 1 where x > 0, else, in training, a slope drawn from
    U(lower, upper) per element (torch's draw, once: the primal and every slot take it), and
    out of training the mean ``(lower + upper) / 2``; ``ẏ = slope·ẋ``."""
    d = input if isinstance(input, Dual) else Dual(input)
    if lower > upper:
        raise RuntimeError(f"rrelu: Lower bound should be less than or equal to the upper "
                           f"bound, got lower={lower}, upper={upper}")
    if not training:
        return leaky_relu(d, (lower + upper) / 2, inplace)
    # The draw torch's kernel writes (1 where x > 0), into a buffer laid out as torch.rrelu
    # hands it one: contiguous, which the kernel's writes assume (one in the input's strides,
    # transposed or channels_last, took the slopes in another order)
    slopes = torch.empty_like(d.primal, memory_format=torch.contiguous_format)
    y = _aten.rrelu_with_noise(d.primal, slopes, lower, upper, True)
    return _activation(d, y, lambda t, x: t * slopes.to(t.dtype), inplace)


@implements(F.rrelu_)
def _rrelu_(input, lower: float = 1.0 / 8, upper: float = 1.0 / 3,
            training: bool = False) -> Dual:
    return rrelu(input, lower, upper, training, inplace=True)


@implements(F.prelu, torch.prelu, torch.Tensor.prelu)
def prelu(input, weight) -> Dual:
    """Dual PReLU, ``y = x`` where x ≥ 0, else ``a·x`` (a learned per channel, dim 1, or one
    for all): ``ẏ = ẋ`` where x ≥ 0 (slope 1 at 0, as torch's), else ``a·ẋ + ȧ·x``."""
    x, a = as_dual(input, "prelu"), as_dual(weight, "prelu")
    y = torch.prelu(x.primal, a.primal)  # torch's value and its checks of the weight's shape
    if a.primal.numel() == 1:
        a = a.reshape(())
    elif x.primal.dim() > 2:  # (C,) against dim 1 of (N, C, *spatial)
        a = a.reshape(-1, *(1,) * (x.primal.dim() - 2))
    out = where(x.primal >= 0, x, mul(a, x))
    return out.with_tangents(y, out.tangents)


@implements(F.elu)
def elu(input, alpha: float = 1.0, inplace: bool = False) -> Dual:
    """Dual ELU: slope 1 where x > 0, else ``alpha·eˣ``."""
    return _activation(input, F.elu(input.primal, alpha),
                       lambda t, x: _aten.elu_backward(t, alpha, 1, 1, False, x), inplace)


@implements(F.elu_)
def _elu_(input, alpha: float = 1.0) -> Dual:
    return elu(input, alpha, inplace=True)


# SELU's constants, as torch defines them (its kernel is ELU's with them)
_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946


@implements(F.selu, torch.selu)
def selu(input, inplace: bool = False) -> Dual:
    """Dual SELU: slope ``scale`` where x > 0, else ``scale·alpha·eˣ``."""
    return _activation(input, torch.selu(input.primal),
                       lambda t, x: _aten.elu_backward(t, _SELU_ALPHA, _SELU_SCALE, 1, False, x),
                       inplace)


@implements(torch.selu_)
def _selu_(input) -> Dual:
    return selu(input, inplace=True)


@implements(F.celu, torch.celu)
def celu(input, alpha: float = 1.0, inplace: bool = False) -> Dual:
    """Dual CELU: slope 1 where x > 0, else ``e^(x/alpha)``, with torch's ``1/alpha``: of alpha
    rounded to float32 (``1.0 / alpha.toFloat()``, in its value and its derivative alike)."""
    input_scale = 1 / struct.unpack("f", struct.pack("f", alpha))[0]  # (no tensor: traceable)
    return _activation(input, torch.celu(input.primal, alpha), lambda t, x: _aten.elu_backward(
        t, alpha, 1, input_scale, False, x), inplace)


@implements(torch.celu_)
def _celu_(input, alpha: float = 1.0) -> Dual:
    return celu(input, alpha, inplace=True)


@implements(F.hardshrink, torch.hardshrink, torch.Tensor.hardshrink)
def hardshrink(input, lambd: float = 0.5) -> Dual:
    """Dual hard shrinkage: slope 1 where ``|x| > lambd``, else 0."""
    return _activation(input, torch.hardshrink(input.primal, lambd),
                       lambda t, x: _aten.hardshrink_backward(t, x, lambd), selects=True)


@implements(F.softshrink)
def softshrink(input, lambd: float = 0.5) -> Dual:
    """Dual soft shrinkage: slope 1 where ``|x| > lambd``, else 0."""
    return _activation(input, F.softshrink(input.primal, lambd),
                       lambda t, x: _aten.softshrink_backward(t, x, lambd), selects=True)


@implements(torch.erf, torch.Tensor.erf, torch.special.erf)
def erf(input) -> Dual:
    """Dual error function: slope ``2/√π·e^(−x²)``."""
    return _activation(input, torch.erf(input.primal),
                       lambda t, x: t * _like((2 / math.sqrt(math.pi)) * torch.exp(-x * x), t))


@implements(F.silu)
def silu(input, inplace: bool = False) -> Dual:
    """Dual SiLU ``x·σ(x)``: slope ``σ(x)·(1 + x·(1 − σ(x)))``."""
    return _activation(input, F.silu(input.primal), _aten.silu_backward, inplace)


@implements(F.gelu)
def gelu(input, approximate: str = "none") -> Dual:
    """Dual GELU, exact (slope ``Φ(x) + x·φ(x)``) or tanh-approximated."""
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return _activation(input, F.gelu(input.primal, approximate=approximate),
                       lambda t, x: _aten.gelu_backward(t, x, approximate=approximate))


@implements(torch.sigmoid, torch.Tensor.sigmoid, F.sigmoid)
def sigmoid(input) -> Dual:
    """Dual sigmoid: slope ``y·(1 − y)`` (torch's derivative kernel on real values; on complex
    ones the product itself, which that kernel, a gradient's, conjugates)."""
    y = torch.sigmoid(input.primal)
    if y.is_complex():
        return _activation(input, y, lambda t, x: t * (y * (1 - y)))
    return _activation(input, y,
                       lambda t, x: _aten.sigmoid_backward(t, _like(y, t).expand_as(t)))


@implements(torch.tanh, torch.Tensor.tanh, F.tanh)
def tanh(input) -> Dual:
    """Dual tanh: slope ``1 − y²`` (on complex values the product itself, as for sigmoid)."""
    y = torch.tanh(input.primal)
    if y.is_complex():
        return _activation(input, y, lambda t, x: t * (1 - y * y))
    return _activation(input, y, lambda t, x: _aten.tanh_backward(t, _like(y, t).expand_as(t)))


@implements(F.tanhshrink)
def tanhshrink(input) -> Dual:
    """Dual ``x − tanh(x)``: slope ``tanh(x)²``."""
    th = torch.tanh(input.primal)
    return _activation(input, input.primal - th, lambda t, x: t * _like(th * th, t))


@implements(F.softsign)
def softsign(input) -> Dual:
    """Dual ``x/(1 + |x|)``: slope ``1/(1 + |x|)²``, the tangent divided twice by ``1 + |x|``
    (its square leaves float16's range above |x| = 255; torch's quotient rule,
    ``(ẋ − sign(x)·y·ẋ)/(1 + |x|)``, loses ``1 − |y|`` to rounding at large |x|), plus
    ``0·sign(x)·y·ẋ``: NaN exactly where that rule's term is (x = ±inf, an infinite ẋ), as
    forward_ad gives it. On complex values, where ``|x|`` is not holomorphic and no slope times
    ẋ is the tangent, torch's composition by its rules."""
    if input.primal.is_complex():
        return input / (torch.abs(input) + 1)
    den = input.primal.abs() + 1
    y = input.primal / den
    sign_y = torch.sign(input.primal) * y
    return _activation(input, y, lambda t, x: t / _like(den, t) / _like(den, t)
                       + (t * _like(sign_y, t)) * 0)


@implements(torch.exp, torch.Tensor.exp)
def exp(input) -> Dual:
    """Dual exp: slope ``y``."""
    y = torch.exp(input.primal)
    return _activation(input, y, lambda t, x: t * _like(y, t))


@implements(torch.expm1, torch.Tensor.expm1, torch.special.expm1)
def expm1(input) -> Dual:
    """Dual ``eˣ − 1``: slope ``y + 1``."""
    y = torch.expm1(input.primal)
    return _activation(input, y, lambda t, x: t * _like(y + 1, t))


@implements(torch.exp2, torch.Tensor.exp2, torch.special.exp2)
def exp2(input) -> Dual:
    """Dual ``2ˣ``: slope ``y·ln 2``."""
    y = torch.exp2(input.primal)
    return _activation(input, y, lambda t, x: t * _like(y, t) * math.log(2))


@implements(torch.abs, torch.Tensor.abs, torch.Tensor.__abs__, torch.absolute)
def absolute(input) -> Dual:
    """Dual absolute value: slope ``sign(x)``, 0 at 0; of a complex x, ``Re(conj(ẋ)·x/|x|)``."""
    if input.primal.is_complex():
        return _activation(input, torch.abs(input.primal),
                           lambda t, x: torch.real(t.conj() * x.sgn()))
    return _activation(input, torch.abs(input.primal), lambda t, x: t * _like(x.sgn(), t))


@implements(torch.sqrt, torch.Tensor.sqrt)
def sqrt(input) -> Dual:
    """Dual square root: slope ``1/(2y)``."""
    y = torch.sqrt(input.primal)
    return _activation(input, y, lambda t, x: t / (2 * _like(y, t)))


@implements(torch.rsqrt, torch.Tensor.rsqrt)
def rsqrt(input) -> Dual:
    """Dual reciprocal square root (RMS norms'): slope ``−y³/2``."""
    y = torch.rsqrt(input.primal)
    return _activation(input, y, lambda t, x: -0.5 * t * _like(y, t).pow(3))


@implements(torch.log, torch.Tensor.log)
def log(input) -> Dual:
    """Dual natural logarithm: slope ``1/x``."""
    return _activation(input, torch.log(input.primal), lambda t, x: t / _like(x, t))


@implements(torch.log1p, torch.Tensor.log1p, torch.special.log1p)
def log1p(input) -> Dual:
    """Dual ``log(1 + x)``: slope ``1/(1 + x)``."""
    return _activation(input, torch.log1p(input.primal), lambda t, x: t / _like(x + 1, t))


@implements(torch.sin, torch.Tensor.sin)
def sin(input) -> Dual:
    """Dual sine: slope ``cos x``."""
    return _activation(input, torch.sin(input.primal), lambda t, x: t * _like(x.cos(), t))


@implements(torch.cos, torch.Tensor.cos)
def cos(input) -> Dual:
    """Dual cosine: slope ``−sin x``."""
    return _activation(input, torch.cos(input.primal), lambda t, x: -t * _like(x.sin(), t))


@implements(torch.tan, torch.Tensor.tan)
def tan(input) -> Dual:
    """Dual tangent function: slope ``1 + y²``."""
    y = torch.tan(input.primal)
    return _activation(input, y, lambda t, x: t * _like(1 + y * y, t))


@implements(torch.atan, torch.Tensor.atan, torch.arctan, torch.Tensor.arctan)
def atan(input) -> Dual:
    """Dual arctangent: slope ``1/(1 + x²)``."""
    return _activation(input, torch.atan(input.primal), lambda t, x: t / _like(x * x + 1, t))


@implements(torch.asin, torch.Tensor.asin, torch.arcsin, torch.Tensor.arcsin)
def asin(input) -> Dual:
    """Dual arcsine: slope ``1/√(1 − x²)``."""
    return _activation(input, torch.asin(input.primal),
                       lambda t, x: t * _like((1 - x * x).rsqrt(), t))


@implements(torch.acos, torch.Tensor.acos, torch.arccos, torch.Tensor.arccos)
def acos(input) -> Dual:
    """Dual arccosine: slope ``−1/√(1 − x²)``."""
    return _activation(input, torch.acos(input.primal),
                       lambda t, x: t * _like(-(1 - x * x).rsqrt(), t))


@implements(torch.sinh, torch.Tensor.sinh)
def sinh(input) -> Dual:
    """Dual hyperbolic sine: slope ``cosh x``."""
    return _activation(input, torch.sinh(input.primal), lambda t, x: t * _like(x.cosh(), t))


@implements(torch.cosh, torch.Tensor.cosh)
def cosh(input) -> Dual:
    """Dual hyperbolic cosine: slope ``sinh x``."""
    return _activation(input, torch.cosh(input.primal), lambda t, x: t * _like(x.sinh(), t))


@implements(torch.log2, torch.Tensor.log2)
def log2(input) -> Dual:
    """Dual base-2 logarithm: slope ``1/(x·ln 2)``."""
    return _activation(input, torch.log2(input.primal),
                       lambda t, x: t / _like(x * math.log(2), t))


@implements(torch.log10, torch.Tensor.log10)
def log10(input) -> Dual:
    """Dual base-10 logarithm: slope ``1/(x·ln 10)``."""
    return _activation(input, torch.log10(input.primal),
                       lambda t, x: t / _like(x * math.log(10), t))


def _step_rule(func: Callable) -> Callable:
    """The rule of a step function (sign, floor, ceil, round, trunc): slope 0 (zeros, as
    forward_ad's tangent, a NaN or infinite one too)."""

    def rule(input, *args, **kwargs) -> Dual:
        return _activation(input, func(input.primal, *args, **kwargs),
                           lambda t, x: torch.zeros_like(t), selects=True)

    return rule


for _step in (torch.sign, torch.floor, torch.ceil, torch.round, torch.trunc, torch.fix):
    implements(_step, getattr(torch.Tensor, _step.__name__))(_step_rule(_step))


@implements(torch.frac, torch.Tensor.frac)
def frac(input) -> Dual:
    """Dual fractional part ``x − trunc x``: slope 1."""
    return _activation(input, torch.frac(input.primal), lambda t, x: t.clone())


@implements(torch.reciprocal, torch.Tensor.reciprocal)
def reciprocal(input) -> Dual:
    """Dual reciprocal: slope ``−y²``."""
    y = torch.reciprocal(input.primal)
    return _activation(input, y, lambda t, x: -t * _like(y * y, t))


@implements(F.hardsigmoid)
def hardsigmoid(input, inplace: bool = False) -> Dual:
    """Dual hardsigmoid: slope 1/6 strictly between −3 and 3, else 0."""
    return _activation(input, F.hardsigmoid(input.primal), _aten.hardsigmoid_backward, inplace,
                       selects=True)


@implements(F.hardswish)
def hardswish(input, inplace: bool = False) -> Dual:
    """Dual hardswish: slope 0 up to −3, ``x/3 + 1/2`` below 3, 1 from 3 on."""
    return _activation(input, F.hardswish(input.primal), _aten.hardswish_backward, inplace,
                       selects=True)


@implements(F.mish)
def mish(input, inplace: bool = False) -> Dual:
    """Dual Mish ``x·tanh(softplus(x))``."""
    return _activation(input, F.mish(input.primal), _aten.mish_backward, inplace)


@implements(F.softplus)
def softplus(input, beta: float = 1.0, threshold: float = 20.0) -> Dual:
    """Dual softplus ``log(1 + e^(βx))/β``: slope ``σ(βx)``, 1 where ``βx > threshold``."""
    return _activation(input, F.softplus(input.primal, beta, threshold),
                       lambda t, x: _aten.softplus_backward(t, x, beta, threshold))


@implements(F.logsigmoid)
def logsigmoid(input) -> Dual:
    """Dual log-sigmoid ``log σ(x)``: slope ``σ(−x)``, torch's own derivative kernel (which
    reads the forward's buffer on the CPU)."""
    y, buffer = _aten.log_sigmoid_forward(input.primal)
    return _activation(input, y, lambda t, x: _aten.log_sigmoid_backward(t, x, buffer))


@implements(F.glu)
def glu(input, dim: int = -1) -> Dual:
    """Dual gated linear unit ``y = a·σ(b)``, ``a`` and ``b`` the halves of ``dim``:
    ``ẏ = σ(b)·ȧ + y·(1 − σ(b))·ḃ``, the factors in x's dtype, rounded once to the tangents'."""
    d = as_dual(input, "glu")
    y = F.glu(d.primal, dim)  # torch's checks: a dim of even size
    if d.tangents is None:
        return d.with_tangents(y, None)
    t = d.tangents
    s = torch.sigmoid(d.primal.chunk(2, dim)[1])
    ta, tb = t.chunk(2, _slot_dim(dim, d.primal.dim()))
    return d.with_tangents(y, ta * _like(s, t) + tb * _like(y * (1 - s), t))


# --- powers: y = aᵇ, ẏ = b·aᵇ⁻¹·ȧ + y·ln(a)·ḃ ---------------------------------------------------
# Each term as torch's forward mode computes it (pow_backward_self, pow_backward_exponent): the
# base's term is 0 where b = 0 (whatever ȧ), the exponent's factor y·ln(a) is 0 where a = 0
# and b ≥ 0 (0ᵇ is constant there), so that 0⁰ and 0² have finite tangents.
@implements(torch.Tensor.pow, torch.Tensor.__pow__)
def power(input, exponent) -> Dual:
    """Dual power, either operand a Dual, a tensor or a number (``d ** 2``, ``2 ** d``)."""
    (a, at, ao), (b, bt, bo) = _parts(input), _parts(exponent)
    y = torch.pow(a, b)

    def base_term(t):
        if not isinstance(b, Tensor):
            return torch.zeros_like(t) if b == 0 else \
                _real_if(a, t * _like(b * torch.pow(a, b - 1), t))
        return _real_if(a, torch.where(b == 0, 0, t * _like(b * torch.pow(a, b - 1), t)))

    def exponent_term(t):
        # b ≥ 0: of a complex b, a real one
        at_least_0 = (b.imag == 0) & (b.real >= 0) if b.is_complex() else b >= 0
        if isinstance(a, Tensor):
            factor = torch.where(at_least_0 & (a == 0), 0, y * torch.log(a.to(y.dtype)))
        elif a == 0:
            factor = torch.where(at_least_0, 0, y * -math.inf)
        else:  # ln of a number base in double, as torch's: NaN of a negative real, complex
            # of a complex or in a complex result (rounded to y's dtype first, ln(1.0001) is 0
            # in float16)
            factor = y * (cmath.log(a) if y.is_complex() or isinstance(a, complex)
                          else math.log(a) if a > 0 else math.nan)
        return _real_if(b, t * _like(factor, t))

    return _combine("pow", y, [(ao, at, base_term), (bo, bt, exponent_term)])


def _real_if(operand, term: Tensor) -> Tensor:
    """The term of a real ``operand`` in a complex result: its real part (in the result's
    complex dtype), as torch's forward mode takes it."""
    real = not (operand.is_complex() if isinstance(operand, Tensor) else isinstance(operand,
                                                                                 complex))
    return term.real.to(term.dtype) if real and term.is_complex() else term


@implements(torch.pow)
def _torch_pow(*args, **kwargs) -> Dual:
    # torch.pow names a number base ``self`` (torch.pow(self=2, exponent=d)), a tensor ``input``
    if "self" in kwargs:
        kwargs["input"] = kwargs.pop("self")
    return power(*args, **kwargs)


@implements(torch.Tensor.__rpow__)
def _rpow(input, other) -> Dual:
    return power(other, input)


@implements(torch.square, torch.Tensor.square)
def square(input) -> Dual:
    """Dual square: ``ẏ = 2x·ẋ``."""
    return power(input, 2)


# --- linear tensor ops: the same map on the primal and on every slot ----------------------------
# The linear ops that copy a 0-d tensor as it is
_COPIES_OF_A_NUMBER = {torch.roll, torch.Tensor.roll, torch.flip, torch.Tensor.flip}


def _linear_rule(func: Callable, on_slot: Optional[Callable] = None) -> Callable:
    """The rule of a tensor op that is linear in its first (Dual) argument and keeps the others
    constant: the op on the primal, and on every slot at once (``torch.vmap`` over T) as
    ``on_slot`` (default: ``func`` itself) computes it."""
    on_slot = on_slot or func

    def rule(input, *args, **kwargs):
        y = func(input.primal, *args, **kwargs)
        if input.tangents is None:
            return _wrap_like(input, y, None)
        if input.primal.dim() == 0 and func in _COPIES_OF_A_NUMBER:
            # vmap's rules of roll and flip go wrong on 0-d slots (reorder them, or raise)
            t = input.tangents.clone()
        else:
            t = torch.vmap(lambda s: on_slot(s, *args, **kwargs))(input.tangents)
        if isinstance(t, Tensor) and view_root(t) is not view_root(input.tangents):
            t = in_primal_layout(t, y)  # vmap's roll lays a channels_last stack out contiguous
        return _wrap_like(input, y, t)

    return rule


def _wrap_like(d: Dual, y, t):
    """Outputs of a linear op on ``d``: a Dual per tensor (tuples and lists kept)."""
    if isinstance(y, (tuple, list)):
        return type(y)(_wrap_like(d, yi, None if t is None else ti)
                       for yi, ti in zip(y, t if t is not None else [None] * len(y)))
    return d.as_view(d.with_tangents(y, t))


# --- views and reductions over data dims: the same op on the stack, its dims past the slot axis --
def _slot_dim(dim: int, ndim: int) -> int:
    """Data dim ``dim`` of a primal of ``ndim`` dims, as a dim of its stack ``(T, *shape)``."""
    if not -ndim <= dim < max(ndim, 1):
        raise IndexError(f"dimension {dim} is out of range for a tensor of {ndim} dims")
    return (dim + ndim if dim < 0 else dim) + 1


def _slot_dims(dims, ndim: int):
    """``_slot_dim`` of an int, a sequence of them, or None or an empty sequence (every data
    dim, as torch's reductions take an empty ``dim``)."""
    if dims is None or (not isinstance(dims, int) and len(dims) == 0):
        return tuple(range(1, ndim + 1))
    if isinstance(dims, int):
        return _slot_dim(dims, ndim)
    return tuple(_slot_dim(d, ndim) for d in dims)


def _dims_arg(dims: tuple, dims_by_name: dict):
    """Dims given as varargs (``x.permute(0, 2, 1)``), as one sequence or by torch's name
    (``x.permute(dims=(0, 2, 1))``)."""
    if not dims:
        return tuple(dims_by_name["dims"])
    return tuple(dims[0]) if len(dims) == 1 and not isinstance(dims[0], int) else dims


def _reduce(op: str):
    def on_stack(t, n, dim=None, keepdim=False, *, dtype=None):
        if n == 0:  # a 0-d primal: every slot is its own mean and sum
            return t if dtype is None else t.to(dtype)
        return getattr(t, op)(_slot_dims(dim, n), keepdim, dtype=dtype)
    return on_stack


def _repeat_interleave(t, n, repeats, dim=None, *, output_size=None):
    if dim is None:  # over the flattened primal
        return t.reshape(t.shape[0], -1).repeat_interleave(repeats, 1, output_size=output_size)
    return t.repeat_interleave(repeats, _slot_dim(dim, n), output_size=output_size)


def _cumsum(t, n, dim, *, dtype=None):
    if n == 0:  # a 0-d primal is its own cumulative sum (dim 0 or -1)
        _slot_dim(dim, 1)
        return t if dtype is None else t.to(dtype)
    return t.cumsum(_slot_dim(dim, n), dtype=dtype)


def _take(t, n, index):
    # each slot read as the primal is: flattened, at index
    return t.reshape(t.shape[0], -1)[:, index]


def _contiguous(t, n, memory_format=torch.contiguous_format):
    return slots_in_format(t, memory_format)


def _clone(t, n, *, memory_format=torch.preserve_format):
    # each slot a copy laid out as the primal's clone is (vmap has no rule for a memory format)
    if memory_format in (torch.channels_last, torch.channels_last_3d):
        laid_out = slots_in_format(t, memory_format)
        return laid_out.clone() if laid_out.data_ptr() == t.data_ptr() else laid_out
    return t.clone(memory_format=memory_format)


def _tensor_split(t, n, indices_or_sections=None, dim=0, *, sections=None, indices=None,
                  tensor_indices_or_sections=None):
    # (the split by keyword takes the name of its overload's; vmap has no rule for a tensor)
    split = next(v for v in (indices_or_sections, sections, indices, tensor_indices_or_sections)
                 if v is not None)
    return t.tensor_split(split, _slot_dim(dim, n))


def _transposed(t, n, dim0, dim1):
    if n == 0:  # a 0-d primal's dim 0 (or -1), as torch takes it: the stack is as it was
        return t.movedim(*_scalar_dims(dim0, dim1))
    return t.transpose(_slot_dim(dim0, n), _slot_dim(dim1, n))


def _moved(t, n, source, destination):
    if n == 0:
        return t.movedim(*_scalar_dims(source, destination))
    return t.movedim(_slot_dims(source, n), _slot_dims(destination, n))


def _scalar_dims(*dims) -> tuple:
    """Dims of a 0-d primal, each 0 or -1 (or a sequence of them, as torch takes them), as
    the stack's slot dim: an op that moves them leaves the stack as it was."""
    for d in dims:
        for v in (d,) if isinstance(d, int) else d:
            if v not in (0, -1):
                raise IndexError(f"Dimension out of range (expected to be in range of [-1, 0], "
                                 f"but got {v})")
    return tuple(d if isinstance(d, int) else tuple(d) for d in dims)


# op -> the same op on a stack of T slots: (stack, primal's ndim, *the op's other arguments,
# named as torch names them: a call may give them by keyword).
_SLOT_VIEWS: dict[Callable, Callable] = {
    torch.Tensor.permute: lambda t, n, *dims, **named: t.permute(
        0, *_slot_dims(_dims_arg(dims, named), n)),
    torch.permute: lambda t, n, dims: t.permute(0, *_slot_dims(dims, n)),
    torch.Tensor.transpose: lambda t, n, dim0, dim1: _transposed(t, n, dim0, dim1),
    torch.transpose: lambda t, n, dim0, dim1: _transposed(t, n, dim0, dim1),
    torch.Tensor.swapaxes: lambda t, n, axis0, axis1: _transposed(t, n, axis0, axis1),
    torch.swapaxes: lambda t, n, axis0, axis1: _transposed(t, n, axis0, axis1),
    torch.Tensor.swapdims: lambda t, n, dim0, dim1: _transposed(t, n, dim0, dim1),
    torch.swapdims: lambda t, n, dim0, dim1: _transposed(t, n, dim0, dim1),
    torch.Tensor.movedim: lambda t, n, source, destination: _moved(t, n, source, destination),
    torch.movedim: lambda t, n, source, destination: _moved(t, n, source, destination),
    torch.Tensor.moveaxis: lambda t, n, source, destination: _moved(t, n, source, destination),
    torch.moveaxis: lambda t, n, source, destination: _moved(t, n, source, destination),
    torch.Tensor.adjoint: lambda t, n: t.transpose(-2, -1).conj(),
    torch.adjoint: lambda t, n: t.transpose(-2, -1).conj(),
    torch.Tensor.unsqueeze: lambda t, n, dim: t.unsqueeze(_slot_dim(dim, n + 1)),
    torch.unsqueeze: lambda t, n, dim: t.unsqueeze(_slot_dim(dim, n + 1)),
    torch.Tensor.chunk: lambda t, n, chunks, dim=0: t.chunk(chunks, _slot_dim(dim, n)),
    torch.chunk: lambda t, n, chunks, dim=0: t.chunk(chunks, _slot_dim(dim, n)),
    torch.Tensor.split: lambda t, n, split_size, dim=0: t.split(split_size, _slot_dim(dim, n)),
    torch.split: lambda t, n, split_size_or_sections, dim=0: t.split(split_size_or_sections,
                                                                     _slot_dim(dim, n)),
    torch.Tensor.split_with_sizes: lambda t, n, split_sizes, dim=0: t.split_with_sizes(
        split_sizes, _slot_dim(dim, n)),
    torch.split_with_sizes: lambda t, n, split_sizes, dim=0: t.split_with_sizes(
        split_sizes, _slot_dim(dim, n)),
    torch.Tensor.clone: _clone, torch.clone: _clone,
    torch.Tensor.tensor_split: _tensor_split, torch.tensor_split: _tensor_split,
    # (vmap has no batching rule for a tensor start)
    torch.Tensor.narrow: lambda t, n, dim, start, length: t.narrow(_slot_dim(dim, n), start,
                                                                   length),
    torch.narrow: lambda t, n, dim, start, length: t.narrow(_slot_dim(dim, n), start, length),
    torch.Tensor.repeat_interleave: _repeat_interleave, torch.repeat_interleave: _repeat_interleave,
    torch.Tensor.cumsum: _cumsum, torch.cumsum: _cumsum,
    torch.Tensor.take: _take, torch.take: _take,
    torch.Tensor.mean: _reduce("mean"), torch.mean: _reduce("mean"),
    torch.Tensor.sum: _reduce("sum"), torch.sum: _reduce("sum"),
}


def _slot_view_rule(func: Callable, on_stack: Callable) -> Callable:
    """The rule of a view or reduction over data dims: ``func`` on the primal, ``on_stack`` on
    the slots at once (no vmap: one call on the stack)."""

    def rule(input, *args, **kwargs):
        y = func(input.primal, *args, **kwargs)
        t = input.tangents
        return _wrap_like(input, y, None if t is None else
                          on_stack(t, input.primal.dim(), *args, **kwargs))

    return rule


_LINEAR_OPS = [
    torch.Tensor.permute, torch.permute, torch.Tensor.transpose, torch.transpose,
    torch.Tensor.movedim, torch.movedim, torch.Tensor.moveaxis, torch.moveaxis,
    torch.Tensor.adjoint, torch.adjoint, torch.Tensor.swapaxes, torch.swapaxes,
    torch.Tensor.swapdims, torch.swapdims, torch.Tensor.chunk, torch.chunk, torch.Tensor.split,
    torch.split, torch.Tensor.split_with_sizes, torch.split_with_sizes, torch.Tensor.unbind,
    torch.unbind, torch.Tensor.expand, torch.Tensor.squeeze, torch.squeeze,
    torch.Tensor.unsqueeze, torch.unsqueeze, torch.Tensor.mean, torch.mean, torch.Tensor.sum,
    torch.sum, torch.Tensor.narrow, torch.narrow, torch.Tensor.select,
    torch.select, torch.Tensor.flip, torch.flip, torch.Tensor.roll, torch.roll,
    torch.Tensor.repeat, torch.Tensor.unflatten, torch.unflatten, torch.Tensor.clone,
    torch.clone, torch.Tensor.t, torch.t, torch.Tensor.diagonal, torch.diagonal,
    torch.Tensor.unfold, torch.Tensor.tensor_split, torch.tensor_split, torch.Tensor.hsplit,
    torch.hsplit, torch.Tensor.vsplit, torch.vsplit, torch.Tensor.dsplit, torch.dsplit,
    torch.Tensor.repeat_interleave, torch.repeat_interleave, torch.Tensor.cumsum, torch.cumsum,
    torch.Tensor.tile, torch.tile, torch.Tensor.tril, torch.tril, torch.Tensor.triu, torch.triu,
    F.pixel_shuffle, F.pixel_unshuffle,
    torch.Tensor.broadcast_to, torch.broadcast_to, torch.Tensor.ravel, torch.ravel,
    torch.Tensor.rot90, torch.rot90, torch.Tensor.fliplr, torch.fliplr, torch.Tensor.flipud,
    torch.flipud, torch.Tensor.diag, torch.diag, torch.Tensor.diag_embed, torch.diag_embed,
    torch.Tensor.trace, torch.trace,
    # indices and masks kept constant (the op on each slot, vmapped)
    torch.Tensor.gather, torch.gather, torch.Tensor.index_select, torch.index_select,
    torch.Tensor.take_along_dim, torch.take_along_dim, torch.Tensor.take, torch.take,
    F.channel_shuffle, F.unfold, F.fold,
    # the 1-d average pools (the 2-d ones have rules of their own)
    F.avg_pool1d, F.adaptive_avg_pool1d,
    # the transposing properties (d.T, d.mT, d.H, d.mH), views as t() is
    torch.Tensor.T.__get__, torch.Tensor.mT.__get__, torch.Tensor.H.__get__,
    torch.Tensor.mH.__get__,
]
for _op in _LINEAR_OPS:
    implements(_op)(_slot_view_rule(_op, _SLOT_VIEWS[_op]) if _op in _SLOT_VIEWS
                    else _linear_rule(_op))

# torch's unsafe splits are its splits with views autograd does not track (a write into one
# still reaches the input): taken as the tracked ones, a write into one reaches the Dual
# (torch.unsafe_split names its size as the method split does: split_size).
_UNSAFE_SPLITS = {
    torch.unsafe_chunk: torch.chunk, torch.Tensor.unsafe_chunk: torch.Tensor.chunk,
    torch.unsafe_split: torch.Tensor.split, torch.Tensor.unsafe_split: torch.Tensor.split,
    torch.unsafe_split_with_sizes: torch.split_with_sizes,
    torch.Tensor.unsafe_split_with_sizes: torch.Tensor.split_with_sizes,
}
for _unsafe, _safe in _UNSAFE_SPLITS.items():
    implements(_unsafe)(_slot_view_rule(_safe, _SLOT_VIEWS[_safe]))


def _avg_pool3d_on_slot(slot: Tensor, *args, **kwargs) -> Tensor:
    """``F.avg_pool3d`` of one tangent slot. torch's CPU kernel takes no bfloat16 or half: a
    narrower slot there (a float32 model's bfloat16 tangent) is pooled in float32 and rounded
    back, as a float32 layer sums it; the primal is pooled as torch pools it."""
    if slot.device.type == "cpu" and slot.dtype in (torch.bfloat16, torch.float16):
        return F.avg_pool3d(slot.float(), *args, **kwargs).to(slot.dtype)
    return F.avg_pool3d(slot, *args, **kwargs)


# the 3-d average pools (adaptive_avg_pool3d takes every dtype on the CPU as it is)
implements(F.avg_pool3d)(_linear_rule(F.avg_pool3d, _avg_pool3d_on_slot))
implements(F.adaptive_avg_pool3d)(_linear_rule(F.adaptive_avg_pool3d))


_contiguous_copy = _slot_view_rule(torch.Tensor.contiguous, _contiguous)


@implements(torch.Tensor.contiguous)
def contiguous(input: Dual, memory_format=torch.contiguous_format) -> Dual:
    """``d.contiguous()``: ``d`` itself where its primal is contiguous in ``memory_format``,
    as torch returns the tensor itself (an in-place op on the result is one on ``d``; its
    slots stay as they are, a row of a stack strided); else a copy of the primal and of each
    slot, laid out so."""
    if input.primal.is_contiguous(memory_format=memory_format):
        return input
    return _contiguous_copy(input, memory_format=memory_format)

"""Nonlinear reductions over data dims: ``logsumexp``, ``var``/``std`` and
``var_mean``/``std_mean`` (every overload), ``amax``/``amin``, and the selections ``max``/``min``
(every form), ``sort`` and ``topk``. Each tangent is torch's
forward-mode formula, computed over every slot at once (the reduced dims shifted past the slot
axis); sums and means, which are linear, are views' rules (``pointwise``)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..dual.rule_table import implements
from ..dual.value import Dual, in_primal_layout
from .fallback import forward_ad_fallback
from .pointwise import _like, _slot_dim, _slot_dims, maximum, minimum

Tensor = torch.Tensor


def _as_1d(x: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """A 0-d primal and its stack as one element (a reduction of it over dim 0 or -1)."""
    return (x.reshape(1), t.reshape(t.shape[0], 1)) if x.dim() == 0 else (x, t)


def _dims(dim, ndim: int) -> tuple:
    """The data dims a reduction's ``dim`` names: all of them for None or ``()``."""
    if dim is None or (not isinstance(dim, int) and len(dim) == 0):
        return tuple(range(ndim))
    return (dim,) if isinstance(dim, int) else tuple(dim)


@implements(torch.logsumexp, torch.Tensor.logsumexp, torch.special.logsumexp)
def logsumexp(input: Dual, dim, keepdim: bool = False) -> Dual:
    """Dual logsumexp: ``ẏ = Σ e·ẋ / Σ e`` over ``dim``, ``e = exp(x − max x)``, as torch's
    forward mode computes it (complex values: forward AD on the op)."""
    y = torch.logsumexp(input.primal, dim, keepdim)
    if input.tangents is None:
        return input.with_tangents(y, None)
    if y.is_complex():
        return forward_ad_fallback(torch.logsumexp, (input, dim, keepdim), {})
    x, t = _as_1d(input.primal, input.tangents)
    dims = _dims(dim, x.dim())
    e = (x - x.amax(dims, keepdim=True)).exp() if x.numel() else x.exp()  # empty: no max
    yt = (t * _like(e, t)).sum(_slot_dims(dims, x.dim()), keepdim) / \
        _like(e.sum(dims, keepdim), t)
    return input.with_tangents(y, yt.reshape(t.shape[0], *y.shape))


def _variance_args(args: tuple, kwargs: dict) -> tuple[object, float, bool]:
    """``dim``, ``correction`` and ``keepdim`` of a call of var or std, in any of torch's
    overloads: ``(dim=None, *, correction=1, keepdim=False)``, ``(dim, unbiased, keepdim)``
    and ``(unbiased)``."""
    args, kwargs = list(args), dict(kwargs)
    if args and isinstance(args[0], bool):
        kwargs["unbiased"] = args.pop(0)
    for name, value in zip(("dim", "unbiased", "keepdim"), args):
        kwargs[name] = value
    correction = kwargs.get("correction")
    if "unbiased" in kwargs:
        correction = 1 if kwargs["unbiased"] else 0
    return kwargs.get("dim"), 1 if correction is None else correction, kwargs.get("keepdim",
                                                                                  False)


def _variance_tangent(input: Dual, args: tuple, kwargs: dict, y: Tensor) -> Optional[Tensor]:
    """var's tangent ``2/(N − correction) · Σ (x − mean x)·ẋ`` over the reduced dims; None
    where ``N − correction ≤ 0`` (var is infinite or NaN: torch's forward mode decides)."""
    x, t = _as_1d(input.primal, input.tangents)
    dim, correction, keepdim = _variance_args(args, kwargs)
    dims = _dims(dim, x.dim())
    n = math.prod([x.shape[d] for d in dims])  # (a list: Dynamo takes no generator here)
    if n - correction <= 0:
        return None
    # each term scaled before the sum, as torch's: the sum unscaled leaves float16's range
    # where the variance does not
    coefficient = (x - x.mean(dims, keepdim=True)).conj() * (2.0 / (n - correction))
    yt = (t * _like(coefficient, t)).sum(_slot_dims(dims, x.dim()), keepdim)
    if yt.is_complex():
        yt = yt.real
    return yt.reshape(t.shape[0], *y.shape)


def _spread(op, input: Dual, args: tuple, kwargs: dict, of_variance) -> Dual:
    """var or std (``op``) and its tangent ``of_variance(var's tangent, y)``."""
    y = op(input.primal, *args, **kwargs)
    if input.tangents is None:
        return input.with_tangents(y, None)
    yt = _variance_tangent(input, args, kwargs, y)
    if yt is None:
        return forward_ad_fallback(op, (input, *args), kwargs)
    return input.with_tangents(y, of_variance(yt, y))


def _var_of_variance(yt: Tensor, y: Tensor) -> Tensor:
    return yt


def _std_of_variance(yt: Tensor, y: Tensor) -> Tensor:
    """std's tangent from var's: over ``2·y``, 0 where y = 0 (as torch's)."""
    return (yt / _like(2 * y, yt)).masked_fill_(y == 0, 0)


@implements(torch.var, torch.Tensor.var)
def var(input: Dual, *args, **kwargs) -> Dual:
    """Dual variance (any overload of ``torch.var``)."""
    return _spread(torch.var, input, args, kwargs, _var_of_variance)


@implements(torch.std, torch.Tensor.std)
def std(input: Dual, *args, **kwargs) -> Dual:
    """Dual standard deviation: var's tangent over ``2·y``, 0 where y = 0 (as torch's)."""
    return _spread(torch.std, input, args, kwargs, _std_of_variance)


def _spread_and_mean(op, input: Dual, args: tuple, kwargs: dict,
                     of_variance) -> tuple[Dual, Dual]:
    """var_mean or std_mean (``op``): torch's two values, the spread's tangent
    ``of_variance(var's tangent, y)`` and the mean's ``mean ẋ`` over the same dims."""
    y, m = op(input.primal, *args, **kwargs)
    if input.tangents is None:
        return input.with_tangents(y, None), input.with_tangents(m, None)
    yt = _variance_tangent(input, args, kwargs, y)
    if yt is None:
        return forward_ad_fallback(op, (input, *args), kwargs)
    x, t = _as_1d(input.primal, input.tangents)
    dim, _, keepdim = _variance_args(args, kwargs)
    mt = t.mean(_slot_dims(_dims(dim, x.dim()), x.dim()), keepdim)
    return (input.with_tangents(y, of_variance(yt, y)),
            input.with_tangents(m, mt.reshape(t.shape[0], *m.shape)))


@implements(torch.var_mean)
def var_mean(input: Dual, *args, **kwargs) -> tuple[Dual, Dual]:
    """Dual ``(variance, mean)`` (any overload of ``torch.var_mean``)."""
    return _spread_and_mean(torch.var_mean, input, args, kwargs, _var_of_variance)


@implements(torch.std_mean)
def std_mean(input: Dual, *args, **kwargs) -> tuple[Dual, Dual]:
    """Dual ``(standard deviation, mean)`` (any overload of ``torch.std_mean``)."""
    return _spread_and_mean(torch.std_mean, input, args, kwargs, _std_of_variance)


def _extreme(op, input: Dual, dim, keepdim: bool, by_product: bool = False) -> Dual:
    """amax or amin: ``ẏ = Σ_{x = y} ẋ / #{x = y}``, ties sharing the tangent evenly (a
    select: a NaN tangent elsewhere gives no NaN; ``by_product``: ẋ times the ties' mask, as
    torch's forward mode computes max and min over everything, a NaN tangent anywhere or an
    infinite one off the ties giving NaN)."""
    y = op(input.primal, dim, keepdim)
    if input.tangents is None:
        return input.with_tangents(y, None)
    x, t = _as_1d(input.primal, input.tangents)
    dims = _dims(dim, x.dim())
    ties = x == op(x, dims, True)
    picked = t * ties if by_product else torch.where(ties, t, 0)
    yt = picked.sum(_slot_dims(dims, x.dim()), keepdim) / _like(ties.sum(dims, keepdim), t)
    return input.with_tangents(y, yt.reshape(t.shape[0], *y.shape))


@implements(torch.amax, torch.Tensor.amax)
def amax(input: Dual, dim=(), keepdim: bool = False) -> Dual:
    """Dual amax (ties share the tangent evenly, as torch's forward mode)."""
    return _extreme(torch.amax, input, dim, keepdim)


@implements(torch.amin, torch.Tensor.amin)
def amin(input: Dual, dim=(), keepdim: bool = False) -> Dual:
    """Dual amin (ties share the tangent evenly, as torch's forward mode)."""
    return _extreme(torch.amin, input, dim, keepdim)


# --- selections: values picked by index, each slot's tangent picked at the same index ----------
def _picked(input: Dual, values: Tensor, indices: Tensor, dim: int, keepdim: bool) -> Dual:
    """``values`` (torch's, picked from ``input`` along ``dim`` at ``indices``) with each slot's
    tangent at the same indices: a tie takes the tangent of the element torch picked, as its
    forward mode does."""
    t = input.tangents
    if t is None:
        return input.with_tangents(values, None)
    n = input.primal.dim()
    if n == 0:  # a 0-d primal is its own selection
        return input.with_tangents(values, t.clone())
    at = _slot_dim(dim, n)
    index = indices if keepdim else indices.unsqueeze(at - 1)
    picked = t.gather(at, index.expand(t.shape[0], *index.shape))
    return input.with_tangents(values, in_primal_layout(picked if keepdim else picked.squeeze(at),
                                                        values))


def _max_or_min(op, reduce, binary, input, args: tuple, kwargs: dict):
    """``op`` (torch.max or torch.min) in each of its forms: over everything (``reduce``,
    torch.amax or torch.amin, its ties sharing the tangent by a product with their mask, as
    torch's forward mode has it for this form), of two tensors (``binary``'s rule), or along
    ``dim`` (values and indices, a tie taking the tangent of the element torch picked)."""
    if not args and not kwargs:
        return _extreme(reduce, input, (), False, by_product=True)
    other = args[0] if args else kwargs.get("other")
    if isinstance(other, (Tensor, Dual)):
        return binary(input, other)
    result = op(input.primal, *args, **kwargs)
    dim = args[0] if args else kwargs["dim"]
    keepdim = args[1] if len(args) > 1 else kwargs.get("keepdim", False)
    return type(result)((_picked(input, result.values, result.indices, dim, keepdim),
                         result.indices))


@implements(torch.max, torch.Tensor.max)
def max_(input, *args, **kwargs):
    """Dual max: over everything, of two tensors, or along a dim (values and indices)."""
    return _max_or_min(torch.max, torch.amax, maximum, input, args, kwargs)


@implements(torch.min, torch.Tensor.min)
def min_(input, *args, **kwargs):
    """Dual min: over everything, of two tensors, or along a dim (values and indices)."""
    return _max_or_min(torch.min, torch.amin, minimum, input, args, kwargs)


@implements(torch.sort, torch.Tensor.sort)
def sort(input: Dual, *args, **kwargs):
    """Dual sort: the sorted values and their indices, each slot's tangent sorted alike."""
    result = torch.sort(input.primal, *args, **kwargs)
    dim = args[0] if args and isinstance(args[0], int) else kwargs.get("dim", -1)
    return type(result)((_picked(input, result.values, result.indices, dim, True),
                         result.indices))


@implements(torch.topk, torch.Tensor.topk)
def topk(input: Dual, k: int, *args, **kwargs):
    """Dual topk: the k values and their indices, each slot's tangent picked alike."""
    result = torch.topk(input.primal, k, *args, **kwargs)
    dim = args[0] if args else kwargs.get("dim", -1)
    return type(result)((_picked(input, result.values, result.indices, dim, True),
                         result.indices))

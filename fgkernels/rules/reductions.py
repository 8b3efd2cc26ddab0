"""Nonlinear reductions over data dims: ``logsumexp``, ``var``/``std`` and
``var_mean``/``std_mean`` (every overload) and ``amax``/``amin``. Each tangent is torch's
forward-mode formula, computed over every slot at once (the reduced dims shifted past the slot
axis); sums and means, which are linear, are views' rules (``pointwise``)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..dual.value import Dual, implements
from .fallback import forward_ad_fallback
from .pointwise import _like, _slot_dims

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
    n = math.prod(x.shape[d] for d in dims)
    if n - correction <= 0:
        return None
    centred = x - x.mean(dims, keepdim=True)
    yt = (t * _like(centred.conj(), t)).sum(_slot_dims(dims, x.dim()), keepdim)
    if yt.is_complex():
        yt = yt.real
    return (yt * (2.0 / (n - correction))).reshape(t.shape[0], *y.shape)


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


def _extreme(op, input: Dual, dim, keepdim: bool) -> Dual:
    """amax or amin: ``ẏ = Σ_{x = y} ẋ / #{x = y}``, ties sharing the tangent evenly (a
    select: a NaN tangent elsewhere gives no NaN)."""
    y = op(input.primal, dim, keepdim)
    if input.tangents is None:
        return input.with_tangents(y, None)
    x, t = _as_1d(input.primal, input.tangents)
    dims = _dims(dim, x.dim())
    ties = x == op(x, dims, True)
    yt = torch.where(ties, t, 0).sum(_slot_dims(dims, x.dim()), keepdim) / \
        _like(ties.sum(dims, keepdim), t)
    return input.with_tangents(y, yt.reshape(t.shape[0], *y.shape))


@implements(torch.amax, torch.Tensor.amax)
def amax(input: Dual, dim=(), keepdim: bool = False) -> Dual:
    """Dual amax (ties share the tangent evenly, as torch's forward mode)."""
    return _extreme(torch.amax, input, dim, keepdim)


@implements(torch.amin, torch.Tensor.amin)
def amin(input: Dual, dim=(), keepdim: bool = False) -> Dual:
    """Dual amin (ties share the tangent evenly, as torch's forward mode)."""
    return _extreme(torch.amin, input, dim, keepdim)

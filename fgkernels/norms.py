"""Dual layer norm and group norm: the batch-norm formulas over other axes.

Over the normalised axes, ``μ, σ²`` (biased), ``r = 1/√(σ² + eps)``, ``x̂ = (x − μ)·r``:
    ẋ̂ = r·(ẋ − mean ẋ − x̂·mean(x̂·ẋ)),    y = γx̂ + β,    ẏ = γẋ̂ + γ̇x̂ + β̇
(layer norm: the last ``len(normalized_shape)`` axes, γ and β of that shape; group norm: each
sample's group of ``C/G`` channels with its spatial axes, γ and β per channel).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F

from . import _slots
from .dual import Dual, implements
from .operands import as_dual, layer_params, parts
from .pointwise import lift

Tensor = torch.Tensor


def _normalize(x: Tensor, xt: Optional[Tensor], dims: list[int], mean: Tensor, r: Tensor):
    """x̂ and the stacked ẋ̂ (None without tangent), from the statistics over ``dims`` of x
    (``mean`` and ``r`` shaped to broadcast over x), in the statistics' dtype."""
    xhat = (x - mean) * r
    if xt is None:
        return xhat, None
    xt = xt.to(xhat.dtype)
    tdims = [d + 1 for d in dims]
    xt_hat = (xt - xt.mean(tdims, keepdim=True)
              - xhat * (xhat * xt).mean(tdims, keepdim=True)) * r
    return xhat, xt_hat


def _affine(op: str, y: Tensor, xhat: Tensor, xt_hat: Optional[Tensor], x_operand, weight, bias,
            param_shape: Sequence[int]) -> Dual:
    """``γx̂ + β`` and its tangent ``γẋ̂ + γ̇x̂ + β̇``; γ, β viewed as ``param_shape``. The
    terms are summed in x̂'s dtype and rounded once to the output slots'."""
    (w, wt, b, bt), p_operand = layer_params(op, weight, bias)
    plan = _slots.plan([x_operand, p_operand], op)
    if plan.count == 0:
        return Dual(y)
    w, wt, b, bt = (None if v is None else v.to(xhat.dtype) for v in (w, wt, b, bt))
    x_pos, p_pos = plan.positions
    parts = []
    if xt_hat is not None:
        parts.append((xt_hat if w is None else xt_hat * w.view(param_shape), x_pos))
    if p_pos:
        slots = (wt if wt is not None else bt).shape[0]
        as_slots = lambda t: lift(t.view(slots, *param_shape), xhat.dim())
        pt = as_slots(wt) * xhat if wt is not None else 0
        if bt is not None:
            pt = pt + as_slots(bt)
        parts.append((pt.expand(slots, *xhat.shape), p_pos))
    yt = _slots.place(plan.count, parts).to(plan.dtype)
    return Dual._unchecked(y, yt, plan.directions, plan.single)


@implements(F.layer_norm)
@torch.no_grad()
def layer_norm(input, normalized_shape, weight=None, bias=None, eps: float = 1e-5) -> Dual:
    """Dual layer norm (arguments as ``F.layer_norm``)."""
    x, xt, x_operand = parts(as_dual(input, "layer_norm"))
    normalized_shape = tuple(normalized_shape) if not isinstance(normalized_shape, int) \
        else (normalized_shape,)
    k = len(normalized_shape)
    if tuple(x.shape[x.dim() - k:]) != normalized_shape:
        raise ValueError(f"layer_norm: input of shape {tuple(x.shape)} does not end with "
                         f"normalized_shape {normalized_shape}")
    # torch's own kernel gives y and the statistics in one pass.
    y, mean, r = torch.native_layer_norm(x, normalized_shape, _primal(weight), _primal(bias), eps)
    xhat, xt_hat = _normalize(x, xt, list(range(x.dim() - k, x.dim())), mean, r)
    return _affine("layer_norm", y, xhat, xt_hat, x_operand, weight, bias, normalized_shape)


@implements(F.group_norm)
@torch.no_grad()
def group_norm(input, num_groups: int, weight=None, bias=None, eps: float = 1e-5) -> Dual:
    """Dual group norm (arguments as ``F.group_norm``)."""
    x, xt, x_operand = parts(as_dual(input, "group_norm"))
    if x.dim() < 2 or x.shape[1] % num_groups:
        raise ValueError(f"group_norm: {num_groups} groups do not divide the channels of input "
                         f"of shape {tuple(x.shape)}")
    n, c = x.shape[:2]
    y, mean, r = torch.native_group_norm(x, _primal(weight), _primal(bias), n, c,
                                         x.numel() // max(n * c, 1), num_groups, eps)
    grouped = x.reshape(n, num_groups, -1)
    xhat, xt_hat = _normalize(grouped, None if xt is None else
                              xt.reshape(xt.shape[0], *grouped.shape), [2],
                              mean.unsqueeze(-1), r.unsqueeze(-1))
    xhat = xhat.reshape(x.shape)
    xt_hat = None if xt_hat is None else xt_hat.reshape(xt.shape)
    param_shape = (x.shape[1],) + (1,) * (x.dim() - 2)
    return _affine("group_norm", y, xhat, xt_hat, x_operand, weight, bias, param_shape)


def _primal(v):
    return v.primal if isinstance(v, Dual) else v

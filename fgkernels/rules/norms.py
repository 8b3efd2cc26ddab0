"""Dual layer norm, RMS norm, group norm and instance norm (the batch-norm formulas over other
axes), vector norms, normalisation and cosine similarity.

Over the normalised axes, ``μ, σ²`` (biased), ``r = 1/√(σ² + eps)``, ``x̂ = (x − μ)·r``:
    ẋ̂ = r·(ẋ − mean ẋ − x̂·mean(x̂·ẋ)),    y = γx̂ + β,    ẏ = γẋ̂ + γ̇x̂ + β̇
(layer norm: the last ``len(normalized_shape)`` axes, γ and β of that shape; RMS norm: the same
axes, x not centred (μ = 0, no ``mean ẋ`` term, σ² = mean x²), no β; group norm: each
sample's group of ``C/G`` channels with its spatial axes, γ and β per channel; instance norm:
group norm with one group per channel).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F

from ..backends.layer_op import LayerOp
from ..dual import slots as _slots
from ..dual.dtypes import acc_dtype
from ..dual.layout import kernel_format
from ..dual.rule_table import implements
from ..dual.value import Dual, in_primal_layout
from .fallback import forward_ad_fallback
from .operands import as_dual, layer_operands, layer_params, parts, primal_of, result
from .pointwise import lift

Tensor = torch.Tensor


def _normalize(x: Tensor, xt: Optional[Tensor], dims: list[int], mean: Optional[Tensor],
               r: Tensor):
    """x̂ and the stacked ẋ̂ (None without tangent), from the statistics over ``dims`` of x
    (``mean`` and ``r`` shaped to broadcast over x), in the statistics' dtype. ``mean`` None:
    x is not centred (RMS norm: ``x̂ = x·r``, ``ẋ̂ = r·ẋ − x̂·(r·mean(x̂·ẋ))``). Both are fresh
    tensors (the caller may scale them in place)."""
    xhat = (x - mean).mul_(r) if mean is not None else x * r
    if xt is None:
        return xhat, None
    xt = _slots.cast(xt, xhat.dtype)
    tdims = [d + 1 for d in dims]
    # ẋ̂ = r·(ẋ − mean(ẋ)) − x̂·(r·mean(x̂·(ẋ − mean(ẋ)))), in the one tangent-sized buffer that
    # holds x̂·ẋ first (not the five the expression would allocate term by term). x̂'s mean is 0
    # but for the rounding of x's mean, which times a large mean(ẋ) (a common part of x and ẋ)
    # would enter mean(x̂·ẋ): mean(x̂·(ẋ − m1)) is taken as mean(x̂·ẋ) − m1·mean(x̂). ẋ's mean is
    # taken out before the scale, as torch's forward mode does: a row of no spread has
    # r = 1/√eps, where r·ẋ − r·mean(ẋ) would keep the rounding of r·ẋ. (RMS norm: x̂ and ẋ
    # not centred.)
    buffer = xhat * xt
    m2 = buffer.mean(tdims, keepdim=True)
    if mean is not None:
        m1 = xt.mean(tdims, keepdim=True)
        m2 = m2.sub_(m1 * xhat.mean(dims, keepdim=True))
        # torch's mean(x̂·(ẋ − m1)) is NaN where m1 is not finite (NaN where ẋ is the Inf)
        m2.masked_fill_(~m1.isfinite(), float("nan"))
    m2r = m2.mul_(r)
    # Traced, no out= (Dynamo refuses a strided one and breaks the graph; Inductor fuses the
    # expression into one buffer anyway).
    out = None if torch.compiler.is_dynamo_compiling() else buffer
    xt_hat = torch.mul(xt, r, out=out) if mean is None else \
        torch.sub(xt, m1, out=out).mul_(r)
    return xhat, xt_hat.addcmul_(xhat, m2r, value=-1)


def _affine_terms(xhat: Tensor, xt_hat: Optional[Tensor], w, wt, b, bt,
                  param_shape: Sequence[int]) -> tuple[Optional[Tensor], Optional[Tensor]]:
    """The terms of ``ẏ = γẋ̂ + γ̇x̂ + β̇`` in x̂'s dtype: the input's ``γẋ̂`` (``xt_hat``,
    _normalize's fresh stack, scaled in place) and the parameters' ``γ̇x̂ + β̇`` (a fresh stack),
    each None without its tangents; γ, β viewed as ``param_shape``."""
    w, wt, b, bt = (_slots.cast(v, xhat.dtype) for v in (w, wt, b, bt))
    x_part = None if xt_hat is None else \
        xt_hat if w is None else xt_hat.mul_(w.view(param_shape))
    if wt is None and bt is None:
        return x_part, None
    slots = (wt if wt is not None else bt).shape[0]
    as_slots = lambda t: lift(t.view(slots, *param_shape), xhat.dim())
    if wt is None:
        # A fresh stack (place takes the parts as its own): a plain expand, or the
        # contiguous() of an expand that changes nothing, would be bt itself.
        p_part = torch.empty((slots, *xhat.shape), dtype=xhat.dtype,
                             device=xhat.device).copy_(as_slots(bt))
    elif bt is None:
        p_part = as_slots(wt) * xhat
    else:
        p_part = torch.addcmul(as_slots(bt), as_slots(wt), xhat)
    return x_part, p_part


def _affine(op: str, y: Tensor, xhat: Tensor, xt_hat: Optional[Tensor], x_operand, weight, bias,
            param_shape: Sequence[int]) -> Dual:
    """``γx̂ + β`` and its tangent ``γẋ̂ + γ̇x̂ + β̇`` (``_affine_terms``), summed in x̂'s dtype
    and rounded once to the output slots'."""
    (w, wt, b, bt), p_operand = layer_params(op, weight, bias)
    plan = _slots.plan([x_operand, p_operand], op)
    if plan.count == 0:
        return Dual(y)
    x_part, p_part = _affine_terms(xhat, xt_hat, w, wt, b, bt, param_shape)
    x_pos, p_pos = plan.positions
    parts = [(t, pos) for t, pos in ((x_part, x_pos), (p_part, p_pos)) if t is not None]
    # (float32 parameters of a bfloat16 input: torch's output and its tangent are bfloat16)
    dtype = plan.dtype_for(y.dtype)
    yt = _slots.cast(_slots.place(plan.count, parts, owned=True), dtype)
    return Dual._unchecked(y, yt, plan.directions, plan.single)


def _normalized_dims(op: str, x: Tensor, normalized_shape) -> tuple[tuple, list[int]]:
    """``normalized_shape`` as a tuple, and the dims of x it names (its last ones)."""
    normalized_shape = tuple(normalized_shape) if not isinstance(normalized_shape, int) \
        else (normalized_shape,)
    k = len(normalized_shape)
    if tuple(x.shape[x.dim() - k:]) != normalized_shape:
        raise ValueError(f"{op}: input of shape {tuple(x.shape)} does not end with "
                         f"normalized_shape {normalized_shape}")
    return normalized_shape, list(range(x.dim() - k, x.dim()))


# Layer norm: one compiled op on the CPU (csrc/cpu/dual_layer_norm.cpp: torch's kernel for y
# and the statistics, then one pass per row for the tangents), its reference elsewhere.
def _layer_norm_reference(x: Tensor, xt: Optional[Tensor], w, wt, b, bt, normalized_shape,
                          eps: float, sum_terms: bool):
    y, mean, r = torch.native_layer_norm(x, normalized_shape, w, b, eps)
    _, dims = _normalized_dims("layer_norm", x, normalized_shape)
    xhat, xt_hat = _normalize(x, xt, dims, mean, r)
    x_part, p_part = _affine_terms(xhat, xt_hat, w, wt, b, bt, normalized_shape)
    return (y, x_part.add_(p_part), None) if sum_terms else (y, x_part, p_part)


def _check_layer_norm(x: Tensor, w: Optional[Tensor], b: Optional[Tensor], normalized_shape,
                      eps: float) -> None:
    """layer_norm's input, normalized_shape, weight and bias."""
    if not len(normalized_shape):
        raise ValueError("layer_norm: normalized_shape must name at least one dim, got ()")
    shape, _ = _normalized_dims("layer_norm", x, normalized_shape)
    for name, p in (("weight", w), ("bias", b)):
        if p is not None and tuple(p.shape) != shape:
            raise ValueError(f"layer_norm: {name} has shape {tuple(p.shape)}, expected "
                             f"normalized_shape {shape}")


def _layer_norm_kernel_serves(x: Tensor, w: Optional[Tensor], *args) -> bool:
    """The kernel takes float32 and float64 inputs with a weight of the input's dtype."""
    return x.dtype in (torch.float32, torch.float64) and (w is None or w.dtype == x.dtype)


_layer_norm = LayerOp("dual_layer_norm", _layer_norm_reference, _check_layer_norm,
                      outputs=lambda x, w, b, shape, eps: F.layer_norm(x, shape, w, b, eps),
                      serves=_layer_norm_kernel_serves)


@implements(F.layer_norm)
@torch.no_grad()
def layer_norm(input, normalized_shape, weight=None, bias=None, eps: float = 1e-5) -> Dual:
    """Dual layer norm (arguments as ``F.layer_norm``)."""
    x, xt, p, plan = layer_operands("layer_norm", input, weight, bias)
    shape = [normalized_shape] if isinstance(normalized_shape, int) else list(normalized_shape)
    y, yt = _layer_norm(x, xt, p, plan, shape, eps)  # (the op checks the shapes)
    # (float32 parameters of a bfloat16 input: torch's output and its tangent are bfloat16)
    return result(y, _slots.cast(yt, plan.dtype_for(y.dtype)), plan)


@implements(F.rms_norm, torch.rms_norm)
@torch.no_grad()
def rms_norm(input, normalized_shape, weight=None, eps: Optional[float] = None) -> Dual:
    """Dual RMS norm (arguments as ``F.rms_norm``): ``r = 1/√(mean(x²) + eps)`` over the
    normalised axes, in the accumulation dtype as torch computes it; eps None is that dtype's
    machine epsilon, as for torch (float32's for a half-precision input). Complex inputs and a
    weight of another dtype than the input's: forward AD on the op."""
    x, xt, x_operand = parts(as_dual(input, "rms_norm"))
    if x.is_complex() or (weight is not None and primal_of(weight).dtype != x.dtype):
        return forward_ad_fallback(F.rms_norm, (input, normalized_shape),
                                   dict(weight=weight, eps=eps))
    normalized_shape, dims = _normalized_dims("rms_norm", x, normalized_shape)
    y = torch.rms_norm(x, normalized_shape, primal_of(weight), eps)
    acc = acc_dtype(x.dtype)
    xa = x.to(acc)
    r = xa.square().mean(dims, keepdim=True).add_(
        torch.finfo(acc).eps if eps is None else eps).rsqrt_()
    xhat, xt_hat = _normalize(xa, xt, dims, None, r)
    return _affine("rms_norm", y, xhat, xt_hat, x_operand, weight, None, normalized_shape)


def _contiguous(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None else t.contiguous()


@implements(F.group_norm)
@torch.no_grad()
def group_norm(input, num_groups: int, weight=None, bias=None, eps: float = 1e-5) -> Dual:
    """Dual group norm (arguments as ``F.group_norm``)."""
    x, xt, x_operand = parts(as_dual(input, "group_norm"))
    if x.dim() < 2 or x.shape[1] % num_groups:
        raise ValueError(f"group_norm: {num_groups} groups do not divide the channels of input "
                         f"of shape {tuple(x.shape)}")
    n, c = x.shape[:2]
    # torch's kernel takes x dense in its own layout (F.group_norm makes it so first).
    fmt = kernel_format(x)
    x = x.contiguous(memory_format=fmt)
    hw = x.numel() // max(n * c, 1)
    # (its kernel reads weight and bias as contiguous, whatever their strides: F.group_norm
    # makes them so first)
    y, mean, r = torch.native_group_norm(x, _contiguous(primal_of(weight)),
                                         _contiguous(primal_of(bias)), n, c, hw, num_groups, eps)
    if xt is not None:
        xt = in_primal_layout(xt, x)
    # Each group viewed in x's own layout (no -1: an empty batch has n = 0): contiguous x as
    # (N, G, C/G·H·W), the statistics over dim 2; channels_last x as (N, H·W, G, C/G), over
    # dims 1 and 3 (a reshape of its channels-last order is a view, where the contiguous
    # grouping would copy it, and its result be copied back).
    if fmt == torch.channels_last:
        def grouped(v: Tensor) -> Tensor:
            return v.movedim(-3, -1).reshape(*v.shape[:-3], hw, num_groups, c // num_groups)

        def ungrouped(v: Tensor, like: Tensor) -> Tensor:
            return v.reshape(*like.shape[:-3], *like.shape[-2:], c).movedim(-1, -3)

        dims, stat_shape = [1, 3], (n, 1, num_groups, 1)
    else:
        def grouped(v: Tensor) -> Tensor:
            return v.reshape(*v.shape[:-x.dim() + 1], num_groups, c // num_groups * hw)

        def ungrouped(v: Tensor, like: Tensor) -> Tensor:
            return v.reshape(like.shape)

        dims, stat_shape = [2], (n, num_groups, 1)
    xhat, xt_hat = _normalize(grouped(x), None if xt is None else grouped(xt), dims,
                              mean.view(stat_shape), r.view(stat_shape))
    xhat = ungrouped(xhat, x)
    xt_hat = None if xt_hat is None else ungrouped(xt_hat, xt)
    param_shape = (x.shape[1],) + (1,) * (x.dim() - 2)
    d = _affine("group_norm", y, xhat, xt_hat, x_operand, weight, bias, param_shape)
    # (a parameter's term γ̇x̂ + β̇ may come out of the broadcast in another layout)
    return d if d.tangents is None else d.with_tangents(y, in_primal_layout(d.tangents, y))


@implements(F.instance_norm)
def instance_norm(input, running_mean: Optional[Tensor] = None,
                  running_var: Optional[Tensor] = None, weight=None, bias=None,
                  use_input_stats: bool = True, momentum: float = 0.1, eps: float = 1e-5) -> Dual:
    """Dual instance norm (arguments as ``F.instance_norm``). The value, its checks and the
    running statistics' update are torch's; the tangent is group norm's with one group per
    channel (the same normalisation) with each instance's own statistics, else eval-mode batch
    norm's with the running ones."""
    x = as_dual(input, "instance_norm")
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and not isinstance(t, Tensor):  # a Dual included, as batch norm's
            raise TypeError(f"instance_norm: {name} must be a Tensor or None, got "
                            f"{type(t).__name__}")
    with torch.no_grad():
        y = F.instance_norm(x.primal, running_mean, running_var, primal_of(weight), primal_of(bias),
                            use_input_stats, momentum, eps)
    if use_input_stats:
        d = group_norm(x, x.shape[1], weight, bias, eps)
    else:
        d = F.batch_norm(x, running_mean, running_var, weight, bias, False, momentum, eps)
    return d.with_tangents(y, None if d.tangents is None else in_primal_layout(d.tangents, y))


# --- vector norms and weight normalisation ------------------------------------------------------
def _reduced_dims(dim, ndim: int) -> list[int]:
    if dim is None or (not isinstance(dim, int) and len(dim) == 0):  # every dim, as torch
        return list(range(ndim))
    dims = [dim] if isinstance(dim, int) else list(dim)
    return sorted(d % max(ndim, 1) for d in dims) if ndim else []


@torch.no_grad()
def _euclidean_norm(input, dim, keepdim: bool, dtype=None) -> Dual:
    """``n = ‖x‖₂`` over ``dim``, ``ṅ = Re Σ conj(x)·ẋ / n`` (0 where n = 0, the subgradient
    torch's derivative takes there)."""
    d = as_dual(input, "vector_norm")
    if dtype is not None:  # the input cast first, as torch does, its tangent as Dual.to casts it
        if torch.promote_types(d.primal.dtype, dtype) != dtype:
            raise ValueError(f"vector_norm: dtype {dtype} would narrow the input's "
                             f"{d.primal.dtype}; torch takes only a dtype that holds it")
        d = d.to(dtype)
    x = d.primal
    n = torch.linalg.vector_norm(x, 2, dim, keepdim)
    t = d.tangents
    if t is None:
        return d.with_tangents(n, None)
    dims = [k + 1 for k in _reduced_dims(dim, x.dim())]
    xt = _like_tangent(x, t)
    inner = xt.conj() * t if x.is_complex() else xt * t
    inner = inner.sum(dims, keepdim=keepdim) if dims else inner  # (a 0-dim x: nothing to sum)
    inner = inner.real if inner.is_complex() else inner
    nt = _like_tangent(n, inner)
    return d.with_tangents(n, torch.where(nt == 0, 0, inner / torch.where(nt == 0, 1, nt)))


def _like_tangent(v: Tensor, t: Tensor) -> Tensor:
    """A primal factor in the dtype of the tangent it multiplies (complex kept complex)."""
    if v.is_complex() or t.is_complex():
        return v
    return v.to(t.dtype)


@implements(torch.linalg.vector_norm)
def vector_norm(input, ord=2, dim=None, keepdim: bool = False, *, dtype=None, out=None):
    """Dual vector norm: the 2-norm by its own rule, any other order by forward AD."""
    if ord == 2 and out is None:
        return _euclidean_norm(input, dim, keepdim, dtype)
    return forward_ad_fallback(torch.linalg.vector_norm, (input, ord, dim, keepdim),
                     dict(dtype=dtype, out=out) if out is not None else dict(dtype=dtype))


@implements(torch.norm, torch.Tensor.norm)
def norm(input, p="fro", dim=None, keepdim: bool = False, dtype=None, out=None):
    """Dual ``torch.norm``: the Frobenius / 2-norm over the given dims by its own rule."""
    if p in ("fro", 2) and out is None:
        return _euclidean_norm(input, dim, keepdim, dtype)
    kwargs = dict(p=p, dim=dim, keepdim=keepdim, dtype=dtype)
    if out is not None:
        kwargs["out"] = out
    return forward_ad_fallback(torch.norm, (input,), kwargs)


@implements(F.normalize)
def normalize(input, p: float = 2.0, dim: int = 1, eps: float = 1e-12, out=None) -> Dual:
    """Dual ``F.normalize``: torch's own composition (``x / max(‖x‖_p, eps)``), each op by its
    rule, so that the numbers are torch's (the 2-norm by the rule above, another order by
    forward AD)."""
    if out is not None:
        return forward_ad_fallback(F.normalize, (input,), dict(p=p, dim=dim, eps=eps, out=out))
    d = as_dual(input, "normalize")
    denom = torch.clamp(d.norm(p, dim, keepdim=True), min=eps)
    return d / denom.expand(d.shape)


@implements(F.cosine_similarity)
def cosine_similarity(x1, x2, dim: int = 1, eps: float = 1e-8) -> Dual:
    """Dual cosine similarity: torch's own composition (each operand, both broadcast to their
    common shape, over ``max(‖x‖₂, eps)`` along ``dim``, then the sum of their product along
    ``dim``), each op by its rule, so that the value is torch's to the bit."""
    a, b = as_dual(x1, "cosine_similarity"), as_dual(x2, "cosine_similarity")
    if a.tangents is None and b.tangents is None:
        return Dual(F.cosine_similarity(a.primal, b.primal, dim, eps))
    torch._check_value(eps >= 0, lambda: f"cosine_similarity: eps must be non-negative, got {eps}")
    # As torch's kernel: an integer operand cast to the operands' common dtype, a floating one
    # kept (each normalised in its own dtype, their product promoted: a float32 operand against
    # a 0-d float64 one gives a float64 similarity)
    dtype, shape = torch.result_type(a.primal, b.primal), torch.broadcast_shapes(a.shape, b.shape)
    a, b = ((v if v.primal.is_floating_point() or v.primal.is_complex() else v.to(dtype))
            .expand(shape) for v in (a, b))

    def unit(v: Dual) -> Dual:
        return v / torch.clamp(_euclidean_norm(v, dim, True), min=eps).expand(shape)

    return (unit(a) * unit(b)).sum(dim)


@implements(torch._weight_norm)
def weight_norm(v, g, dim: int = 0) -> Dual:
    """Dual weight normalisation ``w = g·v/‖v‖`` (the norm over every dim but ``dim``; all of
    them for dim = -1), in ops with rules of their own (torch's fused kernel for it has no
    forward-mode derivative)."""
    v_ = primal_of(v)
    others = None if dim == -1 else [k for k in range(v_.dim()) if k != dim % v_.dim()]
    return v * (g / _euclidean_norm(v, others, keepdim=dim != -1))

"""The losses' rules: cross-entropy, negative log-likelihood, binary cross-entropy on logits,
the Kullback-Leibler divergence, the regression losses (MSE, L1, smooth L1, Huber) and CTC.
Each loss value, with torch's checks of its arguments (shapes, targets, reduction,
broadcasting's warning), is torch's own; its tangent is written as torch's forward mode
computes it, conventions at kinks and at NaN included (CTC, which torch's forward mode does not
differentiate: as its definition's)."""
from __future__ import annotations

import sys
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn import _reduction as _Reduction

from ..dual import slots as _slots
from ..dual.dtypes import acc_dtype
from ..dual.rule_table import implements
from ..dual.value import Dual, in_primal_layout
from .attention import centred
from .fallback import forward_ad_fallback
from .layers import _no_grad
from .operands import MaybeDual, as_dual, parts
from .pointwise import _activation, _combine, _like

Tensor = torch.Tensor
_aten = torch.ops.aten
_NO_REDUCTION = 0  # at::Reduction::None, for the derivative kernels

__all__ = ["cross_entropy", "linear_cross_entropy", "nll_loss", "binary_cross_entropy",
           "binary_cross_entropy_with_logits", "kl_div", "mse_loss", "l1_loss", "smooth_l1_loss",
           "huber_loss", "ctc_loss"]


def _reduction(size_average, reduce, reduction: str) -> str:
    """``reduction``, or the one torch's legacy ``size_average``/``reduce`` name (warned)."""
    if size_average is not None or reduce is not None:
        return _Reduction.legacy_get_string(size_average, reduce)
    return reduction


@implements(F.cross_entropy)
@_no_grad
def cross_entropy(input: MaybeDual, target: Tensor, weight=None, size_average=None,
                  ignore_index: int = -100, reduce=None, reduction: str = "mean",
                  label_smoothing: float = 0.0) -> Dual:
    """Dual cross-entropy on logits ``z`` of shape (N, C) and class indices ``target`` (N,):
    ``L̇ = mean_n Σ_c (softmax(z)_nc − p_nc)·ż_nc``, p the (smoothed) one-hot target."""
    d = as_dual(input, "cross_entropy")
    z = d.primal
    index_target = isinstance(target, Tensor) and not isinstance(target, Dual) \
        and not target.is_floating_point()
    if weight is not None or size_average is not None or reduce is not None \
            or not index_target or z.dim() != 2:
        # class weights, probability (or Dual) targets, (N, C, d1, ...) logits: forward AD
        return forward_ad_fallback(F.cross_entropy, (input, target), dict(
            weight=weight, size_average=size_average, ignore_index=ignore_index, reduce=reduce,
            reduction=reduction, label_smoothing=label_smoothing))
    if target.dtype not in (torch.long, torch.uint8) or target.shape != z.shape[:1]:
        raise ValueError(f"cross_entropy: target must be int64 (or uint8) class indices of "
                         f"shape ({z.shape[0]},), got {target.dtype} of shape "
                         f"{tuple(target.shape)}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"cross_entropy: reduction must be 'mean', 'sum' or 'none', "
                         f"got {reduction!r}")
    loss = F.cross_entropy(z, target, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    if d.tangents is None:
        return Dual(loss)
    keep = target != ignore_index
    # L̇_n = Σ_c softmax_nc·ż_nc − Σ_c p_nc·ż_nc, in the accumulation dtype, rounded once to
    # the tangents' (a bfloat16 tangent of a float32 network stays bfloat16, as every op keeps
    # it). ż's mean over the classes is taken out first (``centred``): Σ_c (softmax − p) = 0, so
    # it changes nothing but the rounding of a large common part of ż, which the sums would
    # cancel. The two sums are kept apart, and without label smoothing the target's term is a
    # pick, as torch's log_softmax and nll_loss compute them: an Inf in ż gives its Inf or NaN
    # (never 0·Inf at a class the target does not hold), and an ignored sample's term is 0
    # whatever its ż.
    acc = acc_dtype(z.dtype)
    zt = centred(d.tangents.to(acc), -1)  # (T, N, C)
    # an ignored sample's index may lie outside the classes (ignore_index=255): class 0 then
    picked = torch.where(keep, target, 0).long()
    if label_smoothing:
        p = F.one_hot(picked, z.shape[1]).to(acc)
        p = p * (1 - label_smoothing) + label_smoothing / z.shape[1]
        target_term = (p * zt).sum(-1)
    else:
        target_term = zt.gather(-1, picked.view(1, -1, 1).expand(zt.shape[0], -1, 1)).squeeze(-1)
    per_sample = (torch.softmax(z, dim=1).to(acc) * zt).sum(-1) - target_term  # (T, N)
    per_sample.masked_fill_(~keep, 0)
    if reduction == "mean":  # over the kept samples: 0/0 = NaN when every one is ignored
        lt = per_sample.sum(-1) / keep.sum()
    elif reduction == "sum":
        lt = per_sample.sum(-1)
    else:
        lt = per_sample
    return d.with_tangents(loss, lt.to(d.tangents.dtype))


@implements(F.linear_cross_entropy)
def linear_cross_entropy(input: MaybeDual, linear_weight: MaybeDual, target: Tensor, *,
                         linear_bias: Optional[MaybeDual] = None, weight=None,
                         reduction: str = "mean", ignore_index: Optional[int] = None,
                         label_smoothing: float = 0.0, options=None) -> Dual:
    """Dual ``F.linear_cross_entropy`` (arguments as torch's): its reference form,
    ``cross_entropy(linear(input, linear_weight, linear_bias), target, ...)``, by forward AD.
    ``options`` only chooses how torch chunks that computation, which changes no value, and
    torch's chunked op has no forward-mode formula (its tangent would be undefined)."""
    return forward_ad_fallback(F.linear_cross_entropy, (input, linear_weight, target), dict(
        linear_bias=linear_bias, weight=weight, reduction=reduction, ignore_index=ignore_index,
        label_smoothing=label_smoothing, options=None))


@implements(F.nll_loss)
def nll_loss(input: MaybeDual, target: Tensor, weight: Optional[Tensor] = None,
             size_average=None, ignore_index: int = -100, reduce=None,
             reduction: str = "mean") -> Dual:
    """Dual negative log-likelihood (arguments as ``F.nll_loss``). It is linear in its input,
    so ``L̇ = nll_loss(ẋ)`` for each slot with the same target, weights and reduction, as torch's
    forward mode computes it (a narrower tangent: computed in the input's dtype, rounded once)."""
    reduction = _reduction(size_average, reduce, reduction)
    if isinstance(target, Dual) or parts(weight).tangents is not None:
        return forward_ad_fallback(F.nll_loss, (input, target), dict(
            weight=weight, ignore_index=ignore_index, reduction=reduction))
    d = as_dual(input, "nll_loss")

    def loss(v: Tensor) -> Tensor:
        return F.nll_loss(v, target, weight, ignore_index=ignore_index, reduction=reduction)

    y = loss(d.primal)
    if d.tangents is None:
        return Dual(y)
    t = torch.vmap(loss)(d.tangents.to(y.dtype))
    return d.with_tangents(y, t.to(d.tangents.dtype))


@implements(F.ctc_loss)
def ctc_loss(log_probs: MaybeDual, targets: Tensor, input_lengths, target_lengths,
             blank: int = 0, reduction: str = "mean", zero_infinity: bool = False) -> Dual:
    """Dual connectionist temporal classification loss (arguments as ``F.ctc_loss``; torch's
    forward mode has no rule for it). Each sample's loss ``−log Σ_paths exp(Σ_t lp[t, path_t])``
    has the derivative ``−γ`` in its log-probabilities, ``γ`` the occupancy of each frame and
    class by the paths, so ``L̇_n = −Σ_{t,c} γ[t, n, c]·l̇p[t, n, c]``. ``γ`` is read from torch's
    own gradient of the loss, which is ``exp(lp) − γ`` over each sample's frames (the derivative
    of the loss of ``log_softmax(lp)``, the same where ``lp`` is normalised) and 0 for a sample
    ``zero_infinity`` zeroes."""
    if any(isinstance(v, Dual) for v in (targets, input_lengths, target_lengths)):
        raise TypeError("ctc_loss: the targets and lengths must be integer Tensors or ints, "
                        "got a Dual")
    d = as_dual(log_probs, "ctc_loss")

    def loss(lp: Tensor, reduction: str, zero_infinity: bool = zero_infinity) -> Tensor:
        return F.ctc_loss(lp, targets, input_lengths, target_lengths, blank, reduction,
                          zero_infinity)

    y = loss(d.primal, reduction)
    if d.tangents is None:
        return d.with_tangents(y, None)
    lp = d.primal.detach()
    # (copies: made in inference mode, the operands would be tensors autograd refuses)
    copy = lambda v: v.clone() if isinstance(v, Tensor) else v
    with torch.inference_mode(False), torch.enable_grad():
        x = lp.clone().requires_grad_()
        (grad,) = torch.autograd.grad(F.ctc_loss(
            x, copy(targets), copy(input_lengths), copy(target_lengths), blank, "sum",
            zero_infinity), x)
    lengths = torch.as_tensor(input_lengths, device=lp.device)
    frames = torch.arange(lp.shape[0], device=lp.device).view(-1, *[1] * lengths.dim())
    counted = frames < lengths  # (T, N), or (T,) unbatched
    if zero_infinity:
        counted = counted & loss(lp, "none", False).isfinite()
    occupancy = lp.exp() * counted.unsqueeze(-1) - grad  # γ
    # A frame or class no path visits takes no part, a non-finite tangent there included. γ
    # there is exp(lp) less torch's own exp(lp), which may differ from it in the last bits: a
    # γ within a few roundings of exp(lp) is taken as 0 (a share that small of a finite
    # tangent is below the rounding of the sum it enters).
    visited = occupancy.abs() > 4 * torch.finfo(lp.dtype).eps * lp.exp()
    terms = torch.where(visited, occupancy * d.tangents.to(lp.dtype), 0)
    each = -terms.sum(-1).sum(1).view(terms.shape[0], -1)  # (slots, N); N = 1 unbatched
    if reduction == "mean":
        lengths = torch.as_tensor(target_lengths, device=lp.device).view(-1)
        each = (each / lengths.clamp_min(1)).mean(-1)
    elif reduction == "sum":
        each = each.sum(-1)
    elif lp.dim() == 2:
        each = each.squeeze(-1)
    return d.with_tangents(y, each.to(d.tangents.dtype))


def _per_element(name: str, each: Tensor, slopes: list[tuple[Dual, Optional[Tensor]]]) -> Dual:
    """The per-element loss ``each`` as a Dual whose tangent sums ``slope·ḋ`` over its operands
    ``d`` (pairs ``(d, ∂ℓ/∂d)``; a slope is None where d has no tangent). The slots are in the
    dtype forward_ad gives the loss's tangent (the loss's own, unless a tangent is narrower than
    its primal by design: ``SlotPlan.dtype_for``), each product formed at its factors' wider
    precision and rounded once: a float32 Dual's logits against a float64 target give a float64
    tangent, a bfloat16 tangent of float32 logits stays bfloat16."""
    live = [(d, slope) for d, slope in slopes if d.tangents is not None]
    return _combine(name, each, [(d.slot_operand(), d.tangents,
                                  lambda t, slope=slope: (t * slope).to(t.dtype))
                                 for d, slope in live])


def _reduced(out: Dual, reduction: str) -> Dual:
    """A per-element loss reduced as ``reduction`` says."""
    return out.mean() if reduction == "mean" else out.sum() if reduction == "sum" else out


@implements(F.binary_cross_entropy_with_logits)
@_no_grad
def binary_cross_entropy_with_logits(input: MaybeDual, target: MaybeDual,
                                     weight: Optional[Tensor] = None, size_average=None,
                                     reduce=None, reduction: str = "mean",
                                     pos_weight: Optional[Tensor] = None) -> Dual:
    """Dual binary cross-entropy on logits (arguments as ``F.binary_cross_entropy_with_logits``).
    Per element, with ``q = 1 + (p − 1)·y`` (``p`` the positive weight, 1 without one),
    ``ℓ = w·((1 − y)·x + q·softplus(−x))``, so ``∂ℓ/∂x = w·(q·σ(x) − p·y)`` and
    ``∂ℓ/∂y = w·((p − 1)·softplus(−x) − x)``; the target may be a Dual (soft labels). Weights
    with tangents: forward AD on the op."""
    reduction = _reduction(size_average, reduce, reduction)
    if parts(weight).tangents is not None or parts(pos_weight).tangents is not None:
        return forward_ad_fallback(F.binary_cross_entropy_with_logits, (input, target), dict(
            weight=weight, reduction=reduction, pos_weight=pos_weight))
    x, y = as_dual(input, "binary_cross_entropy_with_logits"), \
        as_dual(target, "binary_cross_entropy_with_logits")
    loss = F.binary_cross_entropy_with_logits(x.primal, y.primal, weight, reduction=reduction,
                                              pos_weight=pos_weight)
    if x.tangents is None and y.tangents is None:
        return Dual(loss)
    xp, yp = x.primal, y.primal
    p = 1 if pos_weight is None else pos_weight
    w = 1 if weight is None else weight
    slope_x = w * ((1 + (p - 1) * yp) * torch.sigmoid(xp) - p * yp)
    slope_y = None if y.tangents is None else w * ((p - 1) * F.softplus(-xp) - xp)
    each = loss if reduction == "none" else F.binary_cross_entropy_with_logits(
        xp, yp, weight, reduction="none", pos_weight=pos_weight)
    out = _reduced(_per_element("binary_cross_entropy_with_logits", each,
                                [(x, slope_x), (y, slope_y)]), reduction)
    return out.with_tangents(loss, out.tangents)


@implements(F.binary_cross_entropy)
@_no_grad
def binary_cross_entropy(input: MaybeDual, target: MaybeDual, weight: Optional[Tensor] = None,
                         size_average=None, reduce=None, reduction: str = "mean") -> Dual:
    """Dual binary cross-entropy on probabilities (arguments as ``F.binary_cross_entropy``).
    Per element ``ℓ = −w·(y·log p + (1 − y)·log(1 − p))``: ``∂ℓ/∂p = w·(p − y)/max(p(1 − p),
    1e-12)`` (torch's own derivative kernel) and ``∂ℓ/∂y = −w·logit(p)``, as torch's forward mode
    has them; the target may be a Dual (soft labels). A weight with tangents: forward AD on the
    op."""
    reduction = _reduction(size_average, reduce, reduction)
    if parts(weight).tangents is not None:
        return forward_ad_fallback(F.binary_cross_entropy, (input, target), dict(
            weight=weight, reduction=reduction))
    x, y = as_dual(input, "binary_cross_entropy"), as_dual(target, "binary_cross_entropy")
    loss = F.binary_cross_entropy(x.primal, y.primal, weight, reduction=reduction)
    if x.tangents is None and y.tangents is None:
        return Dual(loss)
    xp, yp = x.primal, y.primal
    w = None if weight is None else weight.expand_as(xp)
    slope_x = torch.ops.aten.binary_cross_entropy_backward(torch.ones_like(xp), xp, yp, w, 0)
    out = _activation(x, xp, lambda t, _: t * _like(slope_x, t))
    if y.tangents is not None:
        slope_y = -torch.logit(xp) if w is None else -torch.logit(xp) * w
        out = out + _activation(y, yp, lambda t, _: t * _like(slope_y, t))
    out = _reduced(out, reduction)
    return out.with_tangents(loss, out.tangents)


@implements(F.kl_div)
@_no_grad
def kl_div(input: MaybeDual, target: MaybeDual, size_average=None, reduce=None,
           reduction: str = "mean", log_target: bool = False) -> Dual:
    """Dual Kullback-Leibler divergence (arguments as ``F.kl_div``; ``input`` log-probabilities).
    Per element, with ``p`` the target's probability (``e^t`` with ``log_target``, else ``t``):
    ``ℓ = xlogy(t, t) − t·x``, ``∂ℓ/∂x = −t``, ``∂ℓ/∂t = xlogy(t ≠ 0, t) + t/t − x`` (NaN at
    t = 0, as torch's forward mode gives through xlogy), or ``ℓ = e^t·(t − x)``,
    ``∂ℓ/∂x = −e^t``, ``∂ℓ/∂t = e^t·(t − x + 1)``. Operands of different shapes: forward AD on
    the op."""
    reduction = _reduction(size_average, reduce, reduction)
    x, y = as_dual(input, "kl_div"), as_dual(target, "kl_div")
    if x.primal.shape != y.primal.shape:
        return forward_ad_fallback(F.kl_div, (input, target),
                                   dict(reduction=reduction, log_target=log_target))
    loss = F.kl_div(x.primal, y.primal, reduction=reduction, log_target=log_target)
    if x.tangents is None and y.tangents is None:
        return Dual(loss)
    xp, yp = x.primal, y.primal
    p = yp.exp() if log_target else yp
    slope_y = None if y.tangents is None else p * (yp - xp + 1) if log_target else \
        torch.xlogy(yp != 0, yp) + yp / yp - xp
    each = loss if reduction == "none" else F.kl_div(xp, yp, reduction="none",
                                                      log_target=log_target)
    out = _per_element("kl_div", each, [(x, -p), (y, slope_y)])
    if reduction == "batchmean" and xp.dim() != 0:
        out = out.sum() / xp.shape[0]
    else:
        out = _reduced(out, "sum" if reduction == "batchmean" else reduction)
    return out.with_tangents(loss, out.tangents)


# --- regression losses: L = reduce(ℓ(x − y)), L̇ = reduce(ℓ'(x − y)·(ẋ − ẏ)) ---------------------
# Each slope ℓ' is torch's own derivative kernel (as the activations' are), run once over every
# slot: forward_ad's numbers, its conventions at the kinks and at a NaN difference included.
def _regression(name: str, loss_fn: Callable, input: MaybeDual, target: MaybeDual,
                reduction: str, slope: Callable[[Tensor, Tensor], Tensor],
                weight: Optional[Tensor] = None, **options) -> Dual:
    """``loss_fn(input, target, reduction=reduction, **options)`` and its tangent: the reduction
    of ``slope(ḋ, d)`` (``ℓ'(d)·ḋ``) over the Duals' difference ``d = input − target``.
    Per-element weights: forward AD on the op."""
    if weight is not None:
        return forward_ad_fallback(loss_fn, (input, target),
                                   dict(reduction=reduction, weight=weight, **options))
    x, y = as_dual(input, name), as_dual(target, name)
    loss = loss_fn(x.primal, y.primal, reduction=reduction, **options)
    d = _difference(x, y)
    out = _activation(d, d.primal, slope)  # its primal a stand-in: the value is torch's
    return _as_tangent_of(loss, _reduced(out, reduction))


def _difference(x: Dual, y: Dual) -> Dual:
    """``x − y`` of the operands broadcast first, as torch's regression losses take them: a 0-d
    operand's dtype then counts."""
    if x.shape != y.shape:
        shape = torch.broadcast_shapes(x.shape, y.shape)
        x, y = x.expand(shape), y.expand(shape)
    return x - y


def _as_tangent_of(loss: Tensor, out: Dual) -> Dual:
    """Torch's ``loss`` with ``out``'s tangent in the dtype forward_ad gives it
    (``SlotPlan.dtype_for``): a loss torch computes in its input's dtype whatever the target's
    (``huber_loss`` of a float32 input and a 0-d float64 target) has its tangent there too."""
    stack = out.tangents
    if stack is not None:
        stack = in_primal_layout(_slots.cast(stack, _slots.plan(
            [out.slot_operand()], "loss").dtype_for(loss.dtype)), loss)
    return out.with_tangents(loss, stack)


@implements(F.mse_loss)
def mse_loss(input: MaybeDual, target: MaybeDual, size_average=None, reduce=None,
             reduction: str = "mean", weight: Optional[Tensor] = None) -> Dual:
    """Dual mean squared error: slope ``2d``."""
    return _regression("mse_loss", F.mse_loss, input, target,
                       _reduction(size_average, reduce, reduction),
                       lambda t, d: _aten.mse_loss_backward(t, d, d.new_zeros(()), _NO_REDUCTION),
                       weight)


@implements(F.l1_loss)
def l1_loss(input: MaybeDual, target: MaybeDual, size_average=None, reduce=None,
            reduction: str = "mean", weight: Optional[Tensor] = None) -> Dual:
    """Dual L1 loss: slope ``sign d``, 0 at a tie. Of complex values, where ``|d|`` is not
    holomorphic and no slope times ḋ is its tangent: the reduction of ``|d|`` by the rules
    (abs's tangent ``Re(conj(sgn d)·ḋ)``)."""
    if weight is None:
        weight = _l1_loss_weight()
    reduction = _reduction(size_average, reduce, reduction)
    x, y = as_dual(input, "l1_loss"), as_dual(target, "l1_loss")
    if weight is None and (x.primal.is_complex() or y.primal.is_complex()):
        loss = F.l1_loss(x.primal, y.primal, reduction=reduction)
        return _as_tangent_of(loss, _reduced(torch.abs(_difference(x, y)), reduction))
    return _regression("l1_loss", F.l1_loss, input, target, reduction, _sign_slope, weight)


_L1_LOSS = F.l1_loss.__code__


def _l1_loss_weight() -> Optional[Tensor]:
    """The ``weight`` of the ``F.l1_loss`` call that dispatched to the rule, read from its
    frame: torch (2.13, 2.14) hands ``__torch_function__`` that call without it (the weight is
    only among the arguments it looks at for overrides), and the rule would compute the
    unweighted loss. A traced call has no such frame: there the weight stays lost."""
    if torch.compiler.is_compiling():
        return None
    frame = sys._getframe(2)
    while frame is not None and frame.f_code is not _L1_LOSS:
        frame = frame.f_back
    return None if frame is None else frame.f_locals.get("weight")


def _sign_slope(t: Tensor, d: Tensor) -> Tensor:
    return t * _like(d.sgn(), t)


@implements(F.smooth_l1_loss)
def smooth_l1_loss(input: MaybeDual, target: MaybeDual, size_average=None, reduce=None,
                   reduction: str = "mean", beta: float = 1.0) -> Dual:
    """Dual smooth L1 loss: slope ``d/β`` where ``|d| ≤ β``, else ``sign d`` (NaN at a NaN d;
    β = 0 is the L1 loss, as torch computes it)."""
    slope = _sign_slope if beta == 0 else lambda t, d: _aten.smooth_l1_loss_backward(
        t, d, d.new_zeros(()), _NO_REDUCTION, beta)
    return _regression("smooth_l1_loss", F.smooth_l1_loss, input, target,
                       _reduction(size_average, reduce, reduction), slope, beta=beta)


@implements(F.huber_loss)
def huber_loss(input: MaybeDual, target: MaybeDual, reduction: str = "mean",
               delta: float = 1.0, weight: Optional[Tensor] = None) -> Dual:
    """Dual Huber loss: slope ``d`` where ``|d| ≤ δ``, else ``δ·sign d`` (NaN at a NaN d)."""
    return _regression("huber_loss", F.huber_loss, input, target, reduction,
                       lambda t, d: _aten.huber_loss_backward(
                           t, d, d.new_zeros(()), _NO_REDUCTION, delta), weight, delta=delta)

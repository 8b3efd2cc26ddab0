"""Functional dual ops: each takes Duals (or plain tensors, meaning a zero tangent) and returns a
Dual with the primal and the tangent(s) of the output. Parameters may be Duals too: their tangents
add the ``Ẇ*x``-style terms. The ops also serve as the ``__torch_function__`` rules of ``Dual``,
so ``F.conv2d(dual, w)``, ``torch.flatten(dual, 1)`` and ``dual + dual`` run the same code.

The nonlinear ops run on the backend chosen by ``fgkernels.ops`` for the tensor's device; the
linear ones (add, reshape, pooling by averaging, padding, ...) apply the same map to the primal
and to every tangent slot. No op runs under autograd.
"""
from __future__ import annotations

import functools
import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from . import _slots
from .dual import Dual, implements
from .ops import current_backend
from .pointwise import add, clamp, div, mul, sub, where  # noqa: F401  (rules; re-exported)

Tensor = torch.Tensor
MaybeDual = Union[Tensor, Dual]

__all__ = [
    "conv2d", "linear", "batch_norm", "conv2d_batch_norm", "relu", "max_pool2d", "avg_pool2d",
    "adaptive_avg_pool2d", "flatten", "reshape", "dropout", "pad", "cat", "add", "sub", "mul",
    "div", "where", "clamp", "cross_entropy", "add_direction",
]


def _split(v):
    """(primal, stacked tangent or None, SlotOperand or None) of a Dual, Tensor or None."""
    if isinstance(v, Dual):
        return v.primal, v.tangents, v.slot_operand()
    return v, None, None


def _as_dual(v: MaybeDual, op: str) -> Dual:
    if isinstance(v, Dual):
        return v
    if isinstance(v, Tensor):
        return Dual(v)
    raise TypeError(f"{op}: expected a Dual or Tensor input, got {type(v).__name__}")


def _result(y: Tensor, yt: Optional[Tensor], plan: _slots.SlotPlan) -> Dual:
    return Dual._unchecked(y, yt, plan.directions, plan.single) if yt is not None else Dual(y)


def _split_params(op: str, params, names=("weight", "bias")):
    """(primals, stacked tangents, their one SlotOperand or None) of one module's parameters,
    whose tangents must cover the same slots."""
    primals, stacks, operands = zip(*(_split(p) for p in params))
    live = {o for o in operands if o is not None}
    if len(live) > 1:
        slots = ", ".join(f"{name}: {_describe(o)}" for name, o in zip(names, operands)
                          if o is not None)
        raise ValueError(f"{op}: the parameters' tangents must carry the same slots, got {slots}")
    return primals, stacks, next(iter(live)) if live else None


def _describe(o: _slots.SlotOperand) -> str:
    return f"T={o.count}" + ("" if o.directions is None else f" directions {o.directions}") \
        + (" (single)" if o.single else "")


def _with_params(op: str, x: MaybeDual, *params):
    """Split the input and parameters and plan the output slots.

    Returns ``x, xt, primals, stacks, plan, x_pos, p_pos``.
    """
    x, xt, xo = _split(_as_dual(x, op))
    primals, stacks, po = _split_params(op, params)
    plan = _slots.plan([xo, po], op)
    x_pos, p_pos = plan.positions
    return x, xt, primals, stacks, plan, x_pos, p_pos


def _no_grad(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.no_grad():
            return fn(*args, **kwargs)
    return wrapper


# --- ops with parameters --------------------------------------------------------------------------
@implements(torch.conv2d, F.conv2d)
@_no_grad
def conv2d(input: MaybeDual, weight: MaybeDual, bias: Optional[MaybeDual] = None, stride=1,
           padding=0, dilation=1, groups: int = 1, *, primal: Optional[Tensor] = None) -> Dual:
    """Dual conv2d: ``y = W*x + b``, ``ẏ = W*ẋ + Ẇ*x + ḃ`` (arguments as ``F.conv2d``).

    ``primal``: ``y`` when the caller already has it (``F.conv2d`` of the same primal operands),
    so that only the tangents are computed and it becomes the output's primal, not copied (the
    Triton kernels compute the primal from the same loads as the tangents, and use their own)."""
    x, xt, (w, b), (wt, bt), plan, x_pos, p_pos = _with_params("conv2d", input, weight, bias)
    _check_conv(x, w, b, groups)
    stride, dilation = _pair(stride), _pair(dilation)
    padding = padding if isinstance(padding, str) else _pair(padding)
    if primal is not None:
        _check_primal("conv2d", primal, x, _conv_output_shape(x, w, stride, padding, dilation))
    y, yt = current_backend(x.device).conv2d(x, xt, w, wt, b, bt, x_pos, p_pos, plan.count,
                                             stride, padding, dilation, groups, primal)
    return _result(y, yt, plan)


def _check_primal(op: str, primal: Optional[Tensor], x: Tensor, shape: tuple) -> None:
    """A caller's primal output (if any) must have the op's output shape, x's dtype and
    device."""
    if primal is None:
        return
    if not isinstance(primal, Tensor) or isinstance(primal, Dual):
        raise TypeError(f"{op}: primal must be a Tensor, got {type(primal).__name__}")
    if tuple(primal.shape) != tuple(shape) or primal.dtype != x.dtype \
            or primal.device != x.device:
        raise ValueError(f"{op}: primal must be a {x.dtype} tensor of shape {tuple(shape)} on "
                         f"{x.device}, got {primal.dtype} {tuple(primal.shape)} on "
                         f"{primal.device}")


def _check_conv(x: Tensor, w: Tensor, b: Optional[Tensor], groups: int) -> None:
    if not isinstance(groups, int) or isinstance(groups, bool) or groups < 1:
        raise ValueError(f"conv2d: groups must be a positive int, got {groups!r}")
    if x.dim() != 4:
        raise ValueError(f"conv2d: input must be 4-D (N, C, H, W), got shape {tuple(x.shape)}")
    if w.dim() != 4:
        raise ValueError(f"conv2d: weight must be 4-D (C_out, C_in/groups, kH, kW), "
                         f"got shape {tuple(w.shape)}")
    if x.shape[1] != w.shape[1] * groups:
        raise ValueError(f"conv2d: input has {x.shape[1]} channels, but weight of shape "
                         f"{tuple(w.shape)} with groups={groups} expects {w.shape[1] * groups}")
    if b is not None and b.shape != (w.shape[0],):
        raise ValueError(f"conv2d: bias has shape {tuple(b.shape)}, expected ({w.shape[0]},)")


@implements(F.linear)
@_no_grad
def linear(input: MaybeDual, weight: MaybeDual, bias: Optional[MaybeDual] = None) -> Dual:
    """Dual linear: ``y = xWᵀ + b``, ``ẏ = ẋWᵀ + xẆᵀ + ḃ``."""
    x, xt, (w, b), (wt, bt), plan, x_pos, p_pos = _with_params("linear", input, weight, bias)
    if x.dim() == 0 or w.dim() != 2:
        raise ValueError(f"linear: input must have at least 1 dim and weight 2, got shapes "
                         f"{tuple(x.shape)} and {tuple(w.shape)}")
    if x.shape[-1] != w.shape[1]:
        raise ValueError(f"linear: input has {x.shape[-1]} features, but weight of shape "
                         f"{tuple(w.shape)} expects {w.shape[1]}")
    y, yt = current_backend(x.device).linear(x, xt, w, wt, b, bt, x_pos, p_pos, plan.count)
    return _result(y, yt, plan)


@implements(F.batch_norm)
@_no_grad
def batch_norm(input: MaybeDual, running_mean: Optional[Tensor], running_var: Optional[Tensor],
               weight: Optional[MaybeDual] = None, bias: Optional[MaybeDual] = None,
               training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
               relu: bool = False) -> Dual:
    """Dual batch norm (arguments as ``F.batch_norm``; ``relu=True`` fuses a ReLU after it).

    Training: ``ẋ̂ = (ẋ - mean ẋ - x̂·mean(x̂·ẋ))/σ``; eval: the running stats' affine map;
    ``ẏ = γ̇x̂ + γẋ̂ + β̇``. The running stats are updated once, from the primal, as
    ``F.batch_norm`` updates them.
    """
    x, xt, (w, b), (wt, bt), plan, x_pos, p_pos = _with_params("batch_norm", input, weight, bias)
    _check_batch_norm(x.shape, running_mean, running_var, w, b, training)
    if x.numel() == 0:  # as torch.nn: an empty output, running stats left as they are
        y = F.batch_norm(x, running_mean, running_var, w, b, training, momentum, eps)
        y = torch.relu(y) if relu else y
        return _result(y, y.new_zeros((plan.count, *y.shape)) if plan.count else None, plan)
    y, yt = current_backend(x.device).batch_norm(
        x, xt, w, b, wt, bt, x_pos, p_pos, plan.count, running_mean, running_var, training,
        momentum, eps, relu)
    return _result(y, yt, plan)


def _check_batch_norm(shape, running_mean, running_var, w, b, training) -> None:
    """Check batch norm's arguments against its input's ``shape``."""
    if len(shape) < 2 or shape[1] == 0:
        raise ValueError(f"batch_norm: input must have a channel dimension of at least 1 "
                         f"channel, got shape {tuple(shape)}")
    channels = shape[1]
    for name, t in (("running_mean", running_mean), ("running_var", running_var)):
        if t is not None and not isinstance(t, Tensor):  # a Dual included
            raise TypeError(f"batch_norm: {name} must be a Tensor or None, got "
                            f"{type(t).__name__}")
    for name, t in (("running_mean", running_mean), ("running_var", running_var),
                    ("weight", w), ("bias", b)):
        if t is not None and t.shape != (channels,):
            raise ValueError(f"batch_norm: {name} has shape {tuple(t.shape)}, but the input has "
                             f"{channels} channels")
    if not training and (running_mean is None or running_var is None):
        raise ValueError("batch_norm: eval mode needs running_mean and running_var")
    if training and shape[0] * math.prod(shape[2:]) == 1:  # as torch: an empty input passes
        raise ValueError(f"batch_norm: training needs more than 1 value per channel, got input "
                         f"of shape {tuple(shape)}")


def _conv_output_shape(x: Tensor, w: Tensor, stride, padding, dilation) -> tuple[int, ...]:
    if padding == "same":
        return (x.shape[0], w.shape[0], *x.shape[2:])
    padding = (0, 0) if padding == "valid" else padding
    return (x.shape[0], w.shape[0], *[(n + 2 * p - d * (k - 1) - 1) // s + 1 for n, k, s, p, d in
                                      zip(x.shape[2:], w.shape[2:], stride, padding, dilation)])


@_no_grad
def conv2d_batch_norm(input: MaybeDual, weight: MaybeDual, conv_bias: Optional[MaybeDual],
                      stride, padding, dilation, groups: int,
                      running_mean: Optional[Tensor], running_var: Optional[Tensor],
                      bn_weight: Optional[MaybeDual], bn_bias: Optional[MaybeDual],
                      training: bool, momentum: float, eps: float, relu: bool, *,
                      conv_primal: Optional[Tensor] = None) -> Dual:
    """Conv2d followed by batch norm (and ReLU) as one op, so that a backend can fuse them
    (the Triton backend accumulates the batch-norm sums in the convolution's epilogue).

    The batch norm's parameter tangents may cover fewer slots than the convolution's output
    (they land at ``bn_pos``); when they bring slots of their own, the two ops run one after
    the other. ``conv_primal`` is the convolution's output when the caller already has it (as
    ``conv2d``'s ``primal``); it is handed over: the batch norm may overwrite it in place."""
    x, xt, (w, cb), (wt, cbt), conv_plan, x_pos, conv_pos = _with_params(
        "conv2d_batch_norm", input, weight, conv_bias)
    _check_conv(x, w, cb, groups)
    (g, bb), (gt, bbt), bn_op = _split_params("batch_norm", (bn_weight, bn_bias))
    conv_out = (_slots.SlotOperand(conv_plan.count, conv_plan.directions, conv_plan.single)
                if conv_plan.count else None)
    plan = _slots.plan([conv_out, bn_op], "conv2d_batch_norm")
    if plan.count != conv_plan.count:
        h = conv2d(input, weight, conv_bias, stride, padding, dilation, groups,
                   primal=conv_primal)
        return batch_norm(h, running_mean, running_var, bn_weight, bn_bias, training, momentum,
                          eps, relu)
    stride, dilation = _pair(stride), _pair(dilation)
    padding = padding if isinstance(padding, str) else _pair(padding)
    shape = _conv_output_shape(x, w, stride, padding, dilation)
    _check_primal("conv2d_batch_norm", conv_primal, x, shape)
    _check_batch_norm(shape, running_mean, running_var, g, bb, training)
    if math.prod(shape) == 0:
        return batch_norm(conv2d(input, weight, conv_bias, stride, padding, dilation, groups),
                          running_mean, running_var, bn_weight, bn_bias, training, momentum, eps,
                          relu)
    y, yt = current_backend(x.device).conv2d_batch_norm(
        x, xt, w, wt, cb, cbt, x_pos, conv_pos, conv_plan.count, stride, padding, dilation,
        groups, g, bb, gt, bbt, plan.positions[1], running_mean, running_var, training,
        momentum, eps, relu, conv_primal)
    return _result(y, yt, plan)


# --- nonlinear ops without parameters -------------------------------------------------------------
@implements(F.relu, torch.relu, torch.Tensor.relu)
@_no_grad
def relu(input: MaybeDual, inplace: bool = False) -> Dual:
    """Dual ReLU: ``ẏ = ẋ`` where ``x > 0`` or x is NaN, else 0 (torch's derivative).
    ``inplace`` rebinds a Dual ``input`` to the result (its tensors stay intact)."""
    d = _as_dual(input, "relu")
    y, yt = current_backend(d.device).relu(d.primal, d.tangents)
    out = d.with_tangents(y, yt)
    return d._assign(out) if inplace and isinstance(input, Dual) else out


@implements(torch.relu_, F.relu_)
def relu_(input: Dual) -> Dual:
    """In-place Dual ReLU: ``input`` is rebound to the result."""
    return relu(input, inplace=True)


@implements(F.max_pool2d, torch.max_pool2d)
@_no_grad
def max_pool2d(input: MaybeDual, kernel_size, stride=None, padding=0, dilation=1,
               ceil_mode: bool = False, return_indices: bool = False) -> Dual:
    """Dual max-pool: the tangent is gathered at the primal's argmax."""
    if return_indices:
        raise NotImplementedError("max_pool2d on a Dual does not return indices")
    d = _as_dual(input, "max_pool2d")
    stride = kernel_size if stride is None or stride == [] else stride
    y, yt = current_backend(d.device).max_pool2d(d.primal, d.tangents, kernel_size, stride,
                                                 padding, dilation, ceil_mode)
    return d.with_tangents(y, yt)


@implements(F.cross_entropy)
@_no_grad
def cross_entropy(input: MaybeDual, target: Tensor, weight=None, size_average=None,
                  ignore_index: int = -100, reduce=None, reduction: str = "mean",
                  label_smoothing: float = 0.0) -> Dual:
    """Dual cross-entropy on logits ``z`` of shape (N, C) and class indices ``target`` (N,):
    ``L̇ = mean_n Σ_c (softmax(z)_nc − p_nc)·ż_nc``, p the (smoothed) one-hot target."""
    if weight is not None or size_average is not None or reduce is not None:
        raise NotImplementedError("cross_entropy on a Dual supports no class weight and no "
                                  "legacy size_average/reduce arguments")
    if not isinstance(target, Tensor) or isinstance(target, Dual):
        raise TypeError(f"cross_entropy: target must be a Tensor of class indices, got "
                        f"{type(target).__name__}")
    d = _as_dual(input, "cross_entropy")
    z = d.primal
    if z.dim() != 2:
        raise ValueError(f"cross_entropy: logits must be (N, C), got shape {tuple(z.shape)}")
    if target.dtype != torch.long or target.shape != z.shape[:1]:
        raise ValueError(f"cross_entropy: target must be int64 class indices of shape "
                         f"({z.shape[0]},), got {target.dtype} of shape {tuple(target.shape)}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"cross_entropy: reduction must be 'mean', 'sum' or 'none', "
                         f"got {reduction!r}")
    loss = F.cross_entropy(z, target, ignore_index=ignore_index, reduction=reduction,
                           label_smoothing=label_smoothing)
    if d.tangents is None:
        return Dual(loss)
    keep = target != ignore_index
    p = F.one_hot(target.clamp_min(0), z.shape[1]).to(z.dtype)
    if label_smoothing:
        p = p * (1 - label_smoothing) + label_smoothing / z.shape[1]
    residual = (torch.softmax(z, dim=1) - p) * keep.unsqueeze(1)
    per_sample = (residual * d.tangents).sum(-1)  # (T, N)
    if reduction == "mean":  # over the kept samples: 0/0 = NaN when every one is ignored
        lt = per_sample.sum(-1) / keep.sum()
    elif reduction == "sum":
        lt = per_sample.sum(-1)
    else:
        lt = per_sample
    return d.with_tangents(loss, lt)


# --- linear ops: the same map on the primal and on every tangent slot -----------------------------
@implements(F.avg_pool2d)
def avg_pool2d(input: MaybeDual, *args, **kwargs) -> Dual:
    """Dual average pool (arguments as ``F.avg_pool2d``)."""
    return _as_dual(input, "avg_pool2d").map(lambda t: F.avg_pool2d(t, *args, **kwargs))


@implements(F.adaptive_avg_pool2d)
def adaptive_avg_pool2d(input: MaybeDual, output_size) -> Dual:
    """Dual adaptive average pool."""
    return _as_dual(input, "adaptive_avg_pool2d").map(
        lambda t: F.adaptive_avg_pool2d(t, output_size))


@implements(F.pad)
def pad(input: MaybeDual, pad: Sequence[int], mode: str = "constant",
        value: Optional[float] = None) -> Dual:
    """Dual pad: the primal is padded with ``value``, each tangent with zero."""
    d = _as_dual(input, "pad")
    y = F.pad(d.primal, pad, mode, value)
    if d.tangents is None:
        return d.with_tangents(y, None)
    zero = None if value is None else 0.0
    t = F.pad(d.tangents.flatten(0, 1), pad, mode, zero)
    return d.with_tangents(y, t.view(d.num_tangents, *y.shape))


def _reshaped(d: Dual, y: Tensor) -> Dual:
    """``d``'s slots carried to ``y``, a reshape of ``d.primal`` (row-major order kept)."""
    t = d.tangents
    return d.with_tangents(y, None if t is None else t.reshape(t.shape[0], *y.shape))


@implements(torch.flatten, torch.Tensor.flatten)
def flatten(input: Dual, start_dim: int = 0, end_dim: int = -1) -> Dual:
    """Dual flatten."""
    return _reshaped(input, torch.flatten(input.primal, start_dim, end_dim))


@implements(torch.reshape, torch.Tensor.reshape, torch.Tensor.view)
def reshape(input: Dual, *shape) -> Dual:
    """Dual reshape / view."""
    shape = shape[0] if len(shape) == 1 and not isinstance(shape[0], int) else shape
    return _reshaped(input, input.primal.reshape(shape))


@implements(F.dropout)
def dropout(input: MaybeDual, p: float = 0.5, training: bool = True,
            inplace: bool = False) -> Dual:
    """Dual dropout: one mask, drawn once, scales the primal and every tangent."""
    d = _as_dual(input, "dropout")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: p must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return d
    keep = torch.empty_like(d.primal).bernoulli_(1 - p)
    mask = keep / (1 - p) if p < 1 else keep
    return d.with_tangents(d.primal * mask, None if d.tangents is None else d.tangents * mask)


@implements(torch.cat, torch.concat)
def cat(tensors: Sequence[MaybeDual], dim: int = 0) -> Dual:
    """Dual concatenation; a slot that some operand lacks is zero for that operand's part."""
    duals = [_as_dual(t, "cat") for t in tensors]
    plan = _slots.plan([d.slot_operand() for d in duals], "cat")
    y = torch.cat([d.primal for d in duals], dim)
    if plan.count == 0:
        return Dual(y)
    tdim = dim + 1 if dim >= 0 else dim
    pieces = []
    for d, pos in zip(duals, plan.positions):
        if pos == tuple(range(plan.count)):
            pieces.append(d.tangents)
        else:
            piece = d.primal.new_zeros((plan.count, *d.primal.shape))
            if pos:
                piece[list(pos)] = d.tangents
            pieces.append(piece)
    return _result(y, torch.cat(pieces, tdim), plan)


def add_direction(input: Dual, direction: int, tangent: Tensor) -> Dual:
    """``input`` with one more labelled direction, whose tangent (primal-shaped) enters here: a
    perturbation of this activation. ``input`` must not carry that direction already."""
    if tangent.shape != input.primal.shape:
        raise ValueError(f"add_direction: tangent has shape {tuple(tangent.shape)}, expected the "
                         f"primal's {tuple(input.primal.shape)}")
    if input.directions is not None and direction in input.directions:
        raise ValueError(f"add_direction: direction {direction} is already carried")
    new = Dual(input.primal, tangent.unsqueeze(0), directions=[direction])
    plan = _slots.plan([input.slot_operand(), new.slot_operand()], "add_direction")
    parts = [(t, pos) for t, pos in zip((input.tangents, new.tangents), plan.positions)
             if t is not None]
    return _result(input.primal, _slots.place(plan.count, parts), plan)

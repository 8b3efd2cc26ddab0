"""The layers' rules: convolution (2-d, with a following batch norm as one op; 1-d as 2-d),
linear, batch norm, ReLU, pooling, padding, reshapes, dropout, concatenation and embedding (the
losses are ``losses``). Each takes Duals (or plain tensors, meaning a zero tangent) and returns a
Dual with the primal and the tangent(s) of the output; parameters may be Duals too, their
tangents adding the ``Ẇ*x``-style terms. Each is also the ``__torch_function__`` rule of its
torch functions, so ``F.conv2d(dual, w)`` and ``torch.flatten(dual, 1)`` run the same code.

The nonlinear ops run on the backend chosen by ``fgkernels.backends`` for the tensor's device; the
linear ones (reshape, pooling by averaging, padding, ...) apply the same map to the primal and to
every tangent slot. No op runs under autograd.
"""
from __future__ import annotations

import functools
import math
import operator
from collections.abc import Sequence
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _single

from ..backends import contracts, current_backend
from ..backends.base import BatchNormArgs, ConvArgs, shared_tangent_dtype
from ..backends.kernel_op import KernelOp
from ..backends.layer_op import LayerOp
from ..backends.reference import relu_reference
from ..dual import slots as _slots
from ..dual.layout import kernel_format
from ..dual.rule_table import implements
from ..dual.value import Dual, check_direction, differentiable, in_primal_layout
from .fallback import forward_ad_fallback
from .operands import (
    MaybeDual,
    as_dual,
    layer_operands,
    layer_params,
    layer_plan,
    primal_of,
    result,
    tangents_as,
)
from .products import _product

Tensor = torch.Tensor

__all__ = [
    "conv2d", "conv1d", "linear", "batch_norm", "conv2d_batch_norm", "relu", "max_pool2d",
    "avg_pool2d", "adaptive_avg_pool2d", "interpolate", "flatten", "reshape", "dropout", "pad",
    "cat", "stack", "embedding", "embedding_bag", "add_direction",
]


def _no_grad(fn):
    """``fn`` under ``torch.no_grad()`` (its ops on parameters build no graph), entered only
    where grad mode is on."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        with torch.no_grad():
            return fn(*args, **kwargs)
    return wrapper


def _conv_args(stride, padding, dilation, groups: int) -> ConvArgs:
    return ConvArgs(_two(stride), padding if isinstance(padding, str) else _two(padding),
                    _two(dilation), _int(groups))


def _two(v):
    """A convolution's or pool's int, or sequence of one or two, as torch takes them (NumPy
    ints too): two Python ints; anything else as it is, for the op's checks to name."""
    try:
        if isinstance(v, (tuple, list)):
            v = tuple(operator.index(e) for e in v)
            return v * 2 if len(v) == 1 else v
        return (operator.index(v),) * 2
    except TypeError:
        return v


def _one(v):
    """A 1-D convolution's int or 1-sequence (NumPy ints too) as a Python int; anything else
    as it is, for the op's checks to name."""
    try:
        if isinstance(v, (tuple, list)) and len(v) == 1:
            v = v[0]
        return operator.index(v)
    except TypeError:
        return v


def _int(v):
    """``v`` as a Python int where it is an integer of another type (a NumPy int)."""
    try:
        return v if isinstance(v, bool) else operator.index(v)
    except TypeError:
        return v


# --- ops with parameters --------------------------------------------------------------------------
@implements(torch.conv2d, F.conv2d)
@_no_grad
def conv2d(input: MaybeDual, weight: MaybeDual, bias: Optional[MaybeDual] = None, stride=1,
           padding=0, dilation=1, groups: int = 1, *, primal: Optional[Tensor] = None) -> Dual:
    """Dual conv2d: ``y = W*x + b``, ``ẏ = W*ẋ + Ẇ*x + ḃ`` (arguments as ``F.conv2d``).

    ``primal``: ``y`` when the caller already has it (``F.conv2d`` of the same primal operands),
    so that only the tangents are computed and it becomes the output's primal, not copied (the
    Triton kernels compute the primal from the same loads as the tangents, and use their own).
    An unbatched input ``(C, H, W)`` is a batch of one, as for ``F.conv2d``."""
    input = as_dual(input, "conv2d")
    if input.dim() == 3:
        return conv2d(input.unsqueeze(0), weight, bias, stride, padding, dilation, groups,
                      primal=None if primal is None else primal.unsqueeze(0)).squeeze(0)
    if input.dim() != 4:
        raise ValueError(f"conv2d: input must be 3-D (C, H, W) or 4-D (N, C, H, W), got shape "
                         f"{tuple(input.shape)}")
    x, xt, p, plan = layer_operands("conv2d", input, weight, bias)
    conv = _conv_args(stride, padding, dilation, groups)
    contracts.check_conv(x, p.weight, p.bias, conv.groups, conv.stride, conv.padding,
                         conv.dilation)
    contracts.check_primal("conv2d", primal, x, conv.output_shape(x.shape, p.weight.shape))
    return result(*current_backend(x.device).conv2d(x, xt, p, plan, conv, primal), plan)


@implements(torch.conv1d, F.conv1d)
def conv1d(input: MaybeDual, weight: MaybeDual, bias: Optional[MaybeDual] = None, stride=1,
           padding=0, dilation=1, groups: int = 1) -> Dual:
    """Dual conv1d (arguments as ``F.conv1d``): the conv2d of a height-1 image by a height-1
    kernel, ``(N, C, L) -> (N, C, 1, L)``, so that it runs on the backend's convolution."""
    x, w = as_dual(input, "conv1d"), as_dual(weight, "conv1d")
    stride, dilation, groups = _one(stride), _one(dilation), _int(groups)
    padding = padding if isinstance(padding, str) else _one(padding)
    contracts.check_conv1d(x, w, bias, groups, stride, padding, dilation)
    pad = padding if isinstance(padding, str) else (0, *_single(padding))
    y = conv2d(x.unsqueeze(-2), w.unsqueeze(-2), bias, (1, *_single(stride)), pad,
               (1, *_single(dilation)), groups)
    return y.squeeze(-2)


# linear: one compiled op for every device (csrc/composite.cpp: three GEMMs whatever the slots).
def _linear_reference(x: Tensor, xt: Optional[Tensor], w: Tensor, wt: Optional[Tensor],
                      b: Optional[Tensor], bt: Optional[Tensor], sum_terms: bool):
    """``y = xWᵀ + b``; the input's terms ``ẋWᵀ``, the parameters' ``xẆᵀ + ḃ`` (each None when
    absent), in the tangents' dtype; with ``sum_terms``, their sum and None."""
    y = F.linear(x, w, b)
    dtype = shared_tangent_dtype(x, xt, wt, bt)
    x_part = None if xt is None else F.linear(xt, w.to(dtype))
    if wt is None and bt is None:
        return y, x_part, None
    bias = None if bt is None else bt.reshape(bt.shape[0], *([1] * (y.dim() - 1)), -1)
    if wt is None:
        p_part = bias.expand(bt.shape[0], *y.shape)
    else:
        x_in = x.to(dtype)
        p_part = torch.stack([F.linear(x_in, wt[t]) for t in range(wt.shape[0])])
        p_part = p_part if bias is None else p_part + bias
    return (y, x_part + p_part, None) if sum_terms else (y, x_part, p_part)


_linear = LayerOp("dual_linear", _linear_reference, check=contracts.check_linear,
                  outputs=lambda x, w, b: F.linear(x, w, b))


@implements(F.linear)
@_no_grad
def linear(input: MaybeDual, weight: MaybeDual, bias: Optional[MaybeDual] = None) -> Dual:
    """Dual linear: ``y = xWᵀ + b``, ``ẏ = ẋWᵀ + xẆᵀ + ḃ``."""
    w, b = primal_of(weight), primal_of(bias)
    if w.dim() == 1 or (w.dim() == 2 and b is not None and tuple(b.shape) != (w.shape[0],)):
        return _linear_by_products(input, weight, bias)
    x, xt, p, plan = layer_operands("linear", input, weight, bias)
    return result(*_linear(x, xt, p, plan), plan)


def _linear_by_products(input: MaybeDual, weight: MaybeDual, bias: Optional[MaybeDual]) -> Dual:
    """torch's other forms of linear, by the product and sum rules: a 1-D weight (``y = x·w``,
    the last dim contracted away) and a bias that broadcasts to y (``(1,)``, 0-d, a bias per
    row). The primal is torch's own result (and torch's error where it refuses the shapes)."""
    y = F.linear(primal_of(input), primal_of(weight), primal_of(bias))
    weight = as_dual(weight, "linear")
    out = torch.matmul(input, weight if weight.dim() == 1 else weight.mT)
    out = out if bias is None else out + as_dual(bias, "linear")
    return out.with_tangents(y, out.tangents)


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
    x, xt, p, plan = layer_operands("batch_norm", input, weight, bias)
    bn = BatchNormArgs(running_mean, running_var, training, momentum, eps, relu)
    contracts.check_batch_norm(x.shape, bn, p.weight, p.bias, x.dtype)
    if x.numel() == 0:  # as torch.nn: an empty output, running stats left as they are
        y = F.batch_norm(x, running_mean, running_var, p.weight, p.bias, training, momentum, eps)
        y = torch.relu(y) if relu else y
        yt = y.new_zeros((plan.count, *y.shape), dtype=plan.dtype) if plan.count else None
        return result(y, yt, plan)
    return result(*current_backend(x.device).batch_norm(x, xt, p, plan, bn), plan)


@_no_grad
def conv2d_batch_norm(input: MaybeDual, weight: MaybeDual, conv_bias: Optional[MaybeDual],
                      stride, padding, dilation, groups: int,
                      running_mean: Optional[Tensor], running_var: Optional[Tensor],
                      bn_weight: Optional[MaybeDual], bn_bias: Optional[MaybeDual],
                      training: bool, momentum: float, eps: float, relu: bool, *,
                      conv_primal: Optional[Tensor] = None) -> Dual:
    """Conv2d followed by batch norm (and ReLU) as one op, so that a backend can fuse them
    (the Triton backend accumulates the batch-norm sums in the convolution's epilogue).

    The batch norm's parameter tangents may cover fewer slots than the convolution's output;
    when they bring slots of their own, the two ops run one after the other. ``conv_primal``
    is the convolution's output when the caller already has it (as ``conv2d``'s ``primal``);
    it is handed over: the batch norm may overwrite it in place."""
    x, xt, conv_p, conv_plan = layer_operands("conv2d_batch_norm", input, weight, conv_bias)
    conv = _conv_args(stride, padding, dilation, groups)
    contracts.check_conv(x, conv_p.weight, conv_p.bias, conv.groups, conv.stride,
                         conv.padding, conv.dilation)
    bn_p, bn_slots = layer_params("batch_norm", bn_weight, bn_bias)
    bn_plan = layer_plan([conv_plan.operand(), bn_slots], "conv2d_batch_norm", x.dtype)
    shape = conv.output_shape(x.shape, conv_p.weight.shape)
    if bn_plan.count != conv_plan.count or bn_plan.dtype != conv_plan.dtype \
            or math.prod(shape) == 0:
        h = conv2d(input, weight, conv_bias, stride, padding, dilation, groups,
                   primal=conv_primal)
        return batch_norm(h, running_mean, running_var, bn_weight, bn_bias, training, momentum,
                          eps, relu)
    contracts.check_primal("conv2d_batch_norm", conv_primal, x, shape)
    bn = BatchNormArgs(running_mean, running_var, training, momentum, eps, relu)
    contracts.check_batch_norm(shape, bn, bn_p.weight, bn_p.bias, x.dtype)
    bn_p = tangents_as(bn_p, bn_plan.dtype)
    y, yt = current_backend(x.device).conv2d_batch_norm(x, xt, conv_p, conv_plan, conv, bn_p,
                                                        bn_plan, bn, conv_primal)
    return result(y, yt, bn_plan)


# --- nonlinear ops without parameters -------------------------------------------------------------
_relu = KernelOp("dual_relu", relu_reference)


@implements(F.relu, torch.relu, torch.Tensor.relu)
@_no_grad
def relu(input: MaybeDual, inplace: bool = False) -> Dual:
    """Dual ReLU: ``ẏ = ẋ`` where ``x > 0`` or x is NaN, else 0 (torch's derivative).
    ``inplace`` acts on a Dual ``input`` as every in-place op on a Dual (``Dual``)."""
    d = as_dual(input, "relu")
    out = _relu.on(d)
    return d._assign(out) if inplace and isinstance(input, Dual) else out


@implements(torch.relu_, F.relu_)
def relu_(input: Dual) -> Dual:
    """In-place Dual ReLU: ``input`` is rebound to the result."""
    return relu(input, inplace=True)


# max pool: ẏ is ẋ gathered at the primal's argmax; one compiled op on the native backend
# (4-d input).
def _max_pool2d_reference(x: Tensor, xt: Optional[Tensor], *pool):
    y, idx = F.max_pool2d(x, *pool, return_indices=True)
    if xt is None:
        return y, None
    flat_idx = idx.flatten(-2).expand(xt.shape[0], *idx.shape[:-2], -1)
    return y, in_primal_layout(xt.flatten(-2).gather(-1, flat_idx).view(xt.shape[0], *y.shape), y)


_max_pool2d = KernelOp("dual_max_pool2d", _max_pool2d_reference,
                       outputs=lambda x, *pool: F.max_pool2d(x, *pool),
                       serves=lambda x, *pool: x.dim() == 4)


@implements(F.max_pool2d, torch.max_pool2d)
@_no_grad
def max_pool2d(input: MaybeDual, kernel_size, stride=None, padding=0, dilation=1,
               ceil_mode: bool = False, return_indices: bool = False) -> Dual:
    """Dual max-pool: the tangent is gathered at the primal's argmax."""
    if return_indices:  # the values and their indices
        return _max_pool2d_with_indices(input, kernel_size, stride, padding, dilation, ceil_mode,
                                        return_indices=True)
    d = as_dual(input, "max_pool2d")
    stride = kernel_size if stride is None or stride == [] else stride
    pool = [_two(v) for v in (kernel_size, stride, padding, dilation)]
    if not all(isinstance(v, tuple) and all(type(e) is int for e in v) for v in pool) \
            or any(type(v) is bool for v in (kernel_size, stride, padding, dilation)):
        # torch's TypeError, naming the argument (a float among ints; a bool, not a tuple)
        torch.max_pool2d(d.primal, kernel_size, stride, padding, dilation, ceil_mode)
        raise TypeError(f"max_pool2d: kernel_size, stride, padding and dilation must be ints "
                        f"or tuples of ints, got {kernel_size!r}, {stride!r}, {padding!r}, "
                        f"{dilation!r}")
    return _max_pool2d.on(d, *pool, bool(ceil_mode))


def _selecting_pool(pool_with_indices: Callable, spatial: int, pair: bool = False) -> Callable:
    """The rule of a max pool over the last ``spatial`` dims, ``pool_with_indices`` its form
    that returns the argmax (``F.max_pool1d_with_indices``, ...): torch's values, and each
    slot's tangent gathered where torch found them (forward AD's rule); with the indices where
    ``return_indices`` asks, or always (``pair``: the rule of ``pool_with_indices`` itself,
    which torch hands the ``return_indices`` its caller gave, False when called directly)."""

    @_no_grad
    def rule(input: MaybeDual, *args, return_indices: bool = False, **kwargs):
        d = as_dual(input, pool_with_indices.__name__)
        y, index = pool_with_indices(d.primal, *args, **kwargs)
        t = d.tangents
        if t is not None:
            at = index.flatten(-spatial)
            t = in_primal_layout(t.flatten(-spatial).gather(-1, at.expand(t.shape[0], *at.shape))
                                 .view(t.shape[0], *y.shape), y)
        out = d.with_tangents(y, t)
        return (out, index) if return_indices or pair else out

    return rule


# (F.max_pool2d, with its own kernels, takes the rule for the form with indices)
_max_pool2d_with_indices = implements(F.max_pool2d_with_indices)(
    _selecting_pool(F.max_pool2d_with_indices, 2, pair=True))
for _pool, _with_indices, _spatial in (
        (F.max_pool1d, F.max_pool1d_with_indices, 1),
        (F.max_pool3d, F.max_pool3d_with_indices, 3),
        (F.adaptive_max_pool1d, F.adaptive_max_pool1d_with_indices, 1),
        (F.adaptive_max_pool2d, F.adaptive_max_pool2d_with_indices, 2),
        (F.adaptive_max_pool3d, F.adaptive_max_pool3d_with_indices, 3)):
    implements(_pool)(_selecting_pool(_with_indices, _spatial))
    implements(_with_indices)(_selecting_pool(_with_indices, _spatial, pair=True))


# --- linear ops: the same map on the primal and on every tangent slot -----------------------------
@implements(F.avg_pool2d)
def avg_pool2d(input: MaybeDual, *args, **kwargs) -> Dual:
    """Dual average pool (arguments as ``F.avg_pool2d``)."""
    return as_dual(input, "avg_pool2d").map(lambda t: F.avg_pool2d(t, *args, **kwargs))


@implements(F.interpolate, F.upsample)
def interpolate(input: MaybeDual, *args, **kwargs) -> Dual:
    """Dual resampling (arguments as ``F.interpolate``): every mode is linear in the input.
    The antialiased modes have no CPU kernel for half-precision tangents of a wider primal:
    they resample the tangents at the primal's precision and round them back."""
    d = as_dual(input, "interpolate")
    antialias = kwargs.get("antialias", args[5] if len(args) > 5 else False)
    narrow = d.tangents is not None and d.tangents.dtype != d.primal.dtype \
        and d.tangents.dtype in (torch.bfloat16, torch.float16)
    if antialias and narrow and d.primal.device.type == "cpu":
        wide = d.primal.dtype
        return d.map(lambda t: F.interpolate(t.to(wide), *args, **kwargs).to(t.dtype))
    return d.map(lambda t: F.interpolate(t, *args, **kwargs))


@implements(F.adaptive_avg_pool2d)
def adaptive_avg_pool2d(input: MaybeDual, output_size) -> Dual:
    """Dual adaptive average pool."""
    return as_dual(input, "adaptive_avg_pool2d").map(
        lambda t: F.adaptive_avg_pool2d(t, output_size))


@implements(F.pad)
def pad(input: MaybeDual, pad: Sequence[int], mode: str = "constant",
        value: Optional[float] = None) -> Dual:
    """Dual pad: the primal is padded with ``value``, each tangent with zero."""
    d = as_dual(input, "pad")
    y = F.pad(d.primal, pad, mode, value)
    if d.tangents is None:
        return d.with_tangents(y, None)
    if mode == "constant":  # the stack's slot axis stays in front of the padded trailing dims
        return d.with_tangents(y, in_primal_layout(F.pad(d.tangents, pad, mode, 0.0), y))
    # reflect, replicate, circular: torch pads the spatial dims of a batch, the slots in it
    t = F.pad(d.tangents.flatten(0, 1), pad, mode)
    return d.with_tangents(y, t.view(d.num_tangents, *y.shape))


def _reshaped(d: Dual, y: Tensor) -> Dual:
    """``d``'s slots carried to ``y``, a reshape of ``d.primal`` (row-major order kept)."""
    t = d.tangents
    return d.as_view(d.with_tangents(y, None if t is None else t.reshape(t.shape[0], *y.shape)))


@implements(torch.flatten, torch.Tensor.flatten)
def flatten(input: MaybeDual, start_dim: int = 0, end_dim: int = -1) -> Dual:
    """Dual flatten."""
    input = as_dual(input, "flatten")
    return _reshaped(input, torch.flatten(input.primal, start_dim, end_dim))


def _shape_arg(sizes: tuple, by_name: dict, name: str):
    """A shape given as varargs (``d.view(2, 3)``), as one sequence, or by torch's keyword
    ``name`` (``torch.reshape(d, shape=...)``, ``d.view(size=...)``)."""
    if not sizes:
        if set(by_name) != {name}:
            raise TypeError(f"expected the shape as sizes or as {name}=, got "
                            f"{sorted(by_name) or 'neither'}")
        return by_name[name]
    if by_name:
        raise TypeError(f"unexpected keyword arguments {sorted(by_name)} beside the sizes")
    return sizes[0] if len(sizes) == 1 and not isinstance(sizes[0], int) else sizes


@implements(torch.reshape, torch.Tensor.reshape)
def reshape(input: MaybeDual, *sizes, **shape) -> Dual:
    """Dual reshape."""
    input = as_dual(input, "reshape")
    return _reshaped(input, input.primal.reshape(_shape_arg(sizes, shape, "shape")))


@implements(torch.Tensor.view)
def view(input: Dual, *sizes, **size) -> Dual:
    """Dual view: torch's error where the primal's strides allow no view (a reshape would copy,
    and an in-place op on the copy would not reach ``input``). A view as the Dual's own dtype
    (``d.view(d.dtype)``) is the primal as it is, with its tangent, as ``d.view(d.shape)``; one
    as another dtype is refused (``_viewed_as_dtype``)."""
    dtype = size.get("dtype", sizes[0] if len(sizes) == 1 else None)
    if isinstance(dtype, torch.dtype):
        return _viewed_as_dtype(input, input.primal.view(*sizes, **size))
    return _reshaped(input, input.primal.view(_shape_arg(sizes, size, "size")))


def _viewed_as_dtype(d: Dual, y: Tensor) -> Dual:
    """``d`` viewed as ``y``, its primal's view as a dtype: ``d.view(d.shape)`` where that is
    the primal's own dtype (torch's alias of it is no view of it to autograd, which
    ``Dual.as_view`` asks); any other is refused. Reinterpreted bits have no tangent:
    forward_ad gives such a view none (nor one of the tensor's own dtype), so that a floating
    one would go on as a constant, and a write through it would change the primal alone."""
    if y.dtype != d.dtype:
        convert = f", or convert the Dual for its values with their tangent, d.to({y.dtype})" \
            if differentiable(y.dtype) else ""
        raise TypeError(f"a Dual cannot be viewed as {y.dtype}, another dtype than its own "
                        f"{d.dtype} (its bits reinterpreted have no tangent); view its primal "
                        f"for the bits, d.primal.view({y.dtype}){convert}")
    return _reshaped(d, d.primal.view(d.shape))


def _dropout_rule(draw: Callable) -> Callable:
    """The rule of ``draw`` (``F.dropout``, or a channel dropout: one draw per channel)."""

    def rule(input: MaybeDual, p: float = 0.5, training: bool = True,
             inplace: bool = False) -> Dual:
        return _dropout(draw, input, p, training, inplace)

    rule.__doc__ = f"Dual {draw.__name__}: one mask, drawn once, scales the primal and every " \
        "tangent."
    return rule


dropout = implements(F.dropout)(_dropout_rule(F.dropout))
for _draw in (F.dropout1d, F.dropout2d, F.dropout3d):
    implements(_draw)(_dropout_rule(_draw))


def _dropout(draw, input: MaybeDual, p: float, training: bool, inplace: bool) -> Dual:
    name = draw.__name__
    d = as_dual(input, name)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"{name}: p must be in [0, 1], got {p}")
    if not training or p == 0.0:
        return d
    # torch's own draw (the random numbers a plain pass under the same seed takes, its shape
    # checks and warnings), as the scaled mask 0 or 1/(1 − p)
    mask = draw(torch.ones_like(d.primal), p, True)
    y = d.primal * mask
    t = d.tangents
    if inplace:
        return d._assign(d.with_tangents(y, None if t is None else t * mask.to(t.dtype)))
    return d.with_tangents(y, None if t is None else t * mask.to(t.dtype))


def _alpha_dropout_rule(draw: Callable) -> Callable:
    """The rule of ``draw`` (``F.alpha_dropout``, or ``F.feature_alpha_dropout``: one draw per
    channel)."""

    def rule(input: MaybeDual, p: float = 0.5, training: bool = False,
             inplace: bool = False) -> Dual:
        return _alpha_dropout(draw, input, p, training, inplace)

    rule.__doc__ = f"Dual {draw.__name__} (SELU networks'): ``y = x·a·m + b(m)``, one mask m " \
        "drawn once for the primal and every slot, ``ẏ = a·m·ẋ``."
    return rule


alpha_dropout = implements(F.alpha_dropout)(_alpha_dropout_rule(F.alpha_dropout))
implements(F.feature_alpha_dropout)(_alpha_dropout_rule(F.feature_alpha_dropout))

# SELU's negative saturation, −λα, to which alpha dropout sets a dropped value before its affine
_SELU_SATURATION = 1.7580993408473766


def _alpha_dropout(draw, input: MaybeDual, p: float, training: bool, inplace: bool) -> Dual:
    d = as_dual(input, draw.__name__)
    # torch's own draw (its checks; the random numbers a plain pass under the same seed takes,
    # in the input's layout: the fallback's jvp drew them as if it were contiguous), made at 0,
    # where it is the offset b = λα·a·(m − 1 + p), a of the scale that keeps unit variance
    b = draw(torch.zeros_like(d.primal), p, training)
    if not training or p == 0.0 or d.primal.numel() == 0:
        return d
    if p == 1.0:
        slope = torch.zeros_like(d.primal)  # everything dropped: torch's x·0
        y = d.primal * slope
    else:
        a = 1.0 / math.sqrt((_SELU_SATURATION ** 2 * p + 1) * (1 - p))
        kept = b > _SELU_SATURATION * a * (p - 0.5)  # (b is λα·a·p where kept, λα·a·(p − 1) not)
        slope = kept.to(d.primal.dtype) * a
        y = d.primal * slope + b  # torch's x·(a·m) + b, rounded as torch rounds it
    t = d.tangents
    out = d.with_tangents(y, None if t is None else t * slope.to(t.dtype))
    return d._assign(out) if inplace else out


@implements(F.embedding)
def embedding(input: Tensor, weight: MaybeDual, padding_idx: Optional[int] = None,
              max_norm: Optional[float] = None, norm_type: float = 2.0,
              scale_grad_by_freq: bool = False, sparse: bool = False) -> Dual:
    """Dual embedding lookup: the rows ``input`` picks, of the weight and of every tangent
    slot (``padding_idx``, ``scale_grad_by_freq`` and ``sparse`` shape the backward only). A
    ``max_norm`` renormalises the picked rows of the weight in place first: the fallback's."""
    if max_norm is not None:
        return forward_ad_fallback(F.embedding, (input, weight, padding_idx, max_norm,
                                                 norm_type, scale_grad_by_freq, sparse), {})
    if isinstance(input, Dual):
        raise TypeError("embedding: the indices must be an integer Tensor, got a Dual")
    w = as_dual(weight, "embedding")
    y = F.embedding(input, w.primal, padding_idx, None, norm_type, scale_grad_by_freq, sparse)
    return w.with_tangents(y, None if w.tangents is None else w.tangents[:, input])


@implements(F.embedding_bag)
def embedding_bag(input: Tensor, weight: MaybeDual, offsets: Optional[Tensor] = None,
                  max_norm: Optional[float] = None, norm_type: float = 2.0,
                  scale_grad_by_freq: bool = False, mode: str = "mean", sparse: bool = False,
                  per_sample_weights: Optional[MaybeDual] = None,
                  include_last_offset: bool = False, padding_idx: Optional[int] = None) -> Dual:
    """Dual embedding bags: the sum, mean or max over each bag of the rows it picks. A sum or
    mean is linear in the weight (a sum bilinear in the weight and ``per_sample_weights``):
    each term is the same bag of the tangent's rows, every slot in one call (the slots side by
    side as columns). A max takes, for each coordinate, the tangent of the row its maximum came
    from. ``max_norm`` renormalises the picked rows of the weight's primal in place first, as
    torch does (their tangent as forward_ad leaves it)."""
    if isinstance(input, Dual) or isinstance(offsets, Dual):
        raise TypeError("embedding_bag: the indices and offsets must be integer Tensors, got a "
                        "Dual")

    def bag(w, samples, renorm=None):
        return F.embedding_bag(input, w, offsets, renorm, norm_type, scale_grad_by_freq, mode,
                               sparse, samples, include_last_offset, padding_idx)

    def term(i: int, stack: Tensor, primals: list, _) -> Tensor:
        w, samples = primals
        if i == 1:  # Σ_k ṡ_k·W[i_k] over each bag, one slot at a time
            return torch.stack([bag(w.to(stack.dtype), s) for s in stack])
        slots, rows, width = stack.shape
        if mode == "max":  # (the maxima found in the primal, not in a narrower cast of it)
            at, empty = _embedding_bag_argmax(input, w, offsets, include_last_offset,
                                              padding_idx)
            picked = stack.gather(1, at.unsqueeze(0).expand(slots, -1, -1))
            return picked.masked_fill(empty.unsqueeze(-1), 0)  # an empty bag's max is 0
        columns = stack.permute(1, 0, 2).reshape(rows, slots * width)
        if samples is not None:
            samples = samples.to(stack.dtype)
        return bag(columns, samples).unflatten(-1, (slots, width)).movedim(-2, 0)

    return _product("embedding_bag", [weight, per_sample_weights],
                    lambda f: bag(f[0], f[1], max_norm), term, primal_factors=True)


def _embedding_bag_argmax(input: Tensor, weight: Tensor, offsets: Optional[Tensor],
                          include_last_offset: bool,
                          padding_idx: Optional[int]) -> tuple[Tensor, Tensor]:
    """For each bag and coordinate of a max-mode embedding bag, the weight's row its maximum
    came from, and which bags are empty (no row but padding: their max is 0, their row 0): what
    torch's op keeps, the bags laid out as ``F.embedding_bag`` lays them (a 2-D input is one
    bag per row)."""
    if input.dim() == 2:
        offsets = torch.arange(0, input.numel(), input.shape[1], device=input.device,
                               dtype=input.dtype)
        input, include_last_offset = input.reshape(-1), False
    _, _, size, at = torch.embedding_bag(weight, input, offsets, False, 2, False, None,
                                         include_last_offset, padding_idx)
    return at, size == 0


@implements(torch.cat, torch.concat, torch.concatenate)
def cat(tensors: Sequence[MaybeDual], dim: int = 0, *, axis: Optional[int] = None) -> Dual:
    """Dual concatenation; a slot that some operand lacks is zero for that operand's part."""
    return _join("cat", torch.cat, tensors, dim, axis)


@implements(torch.stack)
def stack(tensors: Sequence[MaybeDual], dim: int = 0, *, axis: Optional[int] = None) -> Dual:
    """Dual stacking along a new ``dim``; a slot that some operand lacks is zero there."""
    return _join("stack", torch.stack, tensors, dim, axis)


def _join(op: str, join: Callable, tensors: Sequence[MaybeDual], dim: int,
          axis: Optional[int]) -> Dual:
    """``join`` (torch.cat or torch.stack) of the primals, and of the tangent stacks along the
    same data dim (the slot axis in front); ``axis`` is torch's other name of ``dim``."""
    if axis is not None:
        dim = axis
    duals = [as_dual(t, op) for t in tensors]
    plan = _slots.plan([d.slot_operand() for d in duals], op)
    y = join([d.primal for d in duals], dim)
    if plan.count == 0:
        return Dual(y)
    tdim = dim + 1 if dim >= 0 else dim
    # torch.cat passes over a 1-d empty operand of any other shape (a legacy placeholder);
    # its slots, (T, 0), it would not
    legacy = [op == "cat" and d.primal.shape == (0,) and y.dim() != 1 for d in duals]
    dtype, pieces = plan.dtype_for(y.dtype), []
    for d, pos, skip in zip(duals, plan.positions, legacy):
        if skip:
            continue
        t = _slots.cast(d.tangents, dtype)
        if pos == tuple(range(plan.count)):
            pieces.append(t)
        else:
            piece = d.primal.new_zeros((plan.count, *d.primal.shape), dtype=dtype)
            if pos:
                piece[list(pos)] = t
            pieces.append(piece)
    if kernel_format(y) != torch.channels_last:
        return result(y, join(pieces, tdim), plan)
    # Each slot laid out as y: the slots joined in their channels-last order, (T, N, H, W, C)
    # (torch.cat of 5-d channels_last slots lays them out contiguous)
    last, back = (0, 1, 3, 4, 2), (0, 1, 4, 2, 3)
    joined = join([p.permute(last) for p in pieces], last.index(tdim % 5))
    return result(y, joined.permute(back), plan)


def add_direction(input: MaybeDual, direction: int, tangent: Tensor) -> Dual:
    """``input`` (a Dual, or a Tensor: no direction yet) with one more labelled direction,
    whose tangent (primal-shaped) enters here: a perturbation of this activation. ``input`` must
    not carry that direction already."""
    input = as_dual(input, "add_direction")
    if direction is None:
        raise ValueError("add_direction: direction must be a non-negative int, got None")
    check_direction(direction, "add_direction")
    if not isinstance(tangent, Tensor) or isinstance(tangent, Dual):
        raise TypeError(f"add_direction: tangent must be a Tensor, got {type(tangent).__name__}")
    if tangent.shape != input.primal.shape:
        raise ValueError(f"add_direction: tangent has shape {tuple(tangent.shape)}, expected the "
                         f"primal's {tuple(input.primal.shape)}")
    if input.directions is not None and direction in input.directions:
        raise ValueError(f"add_direction: direction {direction} is already carried")
    new = Dual(input.primal, tangent.unsqueeze(0), directions=[direction])
    plan = _slots.plan([input.slot_operand(), new.slot_operand()], "add_direction")
    parts = [(_slots.cast(t, plan.dtype), pos)
             for t, pos in zip((input.tangents, new.tangents), plan.positions) if t is not None]
    return result(input.primal, _slots.place(plan.count, parts), plan)

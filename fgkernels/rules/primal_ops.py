"""Ops on a Dual whose result has no tangent, and conversions.

As ``torch.autograd.forward_ad`` gives them for a dual tensor: comparisons, predicates, indices
and counts are computed on the primals and returned as plain tensors; constructors that take only
a shape, dtype and device from their argument (``d.new_zeros(...)``, ``torch.zeros_like(d)``)
return plain tensors; a conversion to an integer or bool dtype drops the tangent. A conversion to
another floating dtype or device (``d.double()``, ``d.to("cuda")``) converts every slot too.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.utils import _pytree as pytree

from ..dual.dtypes import tangent_dtype_fits
from ..dual.layout import slots_in_format
from ..dual.rule_table import implements
from ..dual.value import Dual, differentiable
from .fallback import forward_ad_fallback
from .operands import primal_of

Tensor = torch.Tensor


def _primals(args, kwargs):
    return pytree.tree_map(primal_of, (args, kwargs), is_leaf=lambda v: isinstance(v, Dual))


def _on_primals(func: Callable) -> Callable:
    def rule(*args, **kwargs):
        a, k = _primals(args, kwargs)
        return func(*a, **k)
    return rule


_T = torch.Tensor
PRIMAL_ONLY = [
    # comparisons and predicates
    torch.eq, _T.eq, torch.ne, _T.ne, torch.lt, _T.lt, torch.le, _T.le, torch.gt, _T.gt,
    torch.ge, _T.ge, torch.greater, torch.greater_equal, torch.less, torch.less_equal,
    torch.not_equal, _T.__eq__, _T.__ne__, _T.__lt__, _T.__le__, _T.__gt__, _T.__ge__,
    torch.isnan, _T.isnan, torch.isinf, _T.isinf, torch.isfinite, _T.isfinite, torch.isposinf,
    torch.isneginf, torch.isreal, torch.isclose, _T.isclose, torch.allclose, _T.allclose,
    torch.equal, _T.equal, torch.signbit, torch.is_nonzero, _T.is_nonzero,
    # (a Dual answers the method forms, d.is_complex(), as its primal; torch code calls these)
    torch.is_floating_point, torch.is_complex, torch.is_signed, torch.is_inference,
    torch.is_same_size, torch.numel,
    # (whether a padding mask is left-aligned over a sequence: nn.TransformerEncoder asks)
    torch._nested_tensor_from_mask_left_aligned,
    torch.logical_not, torch.logical_and, torch.logical_or, torch.logical_xor,
    # indices and counts
    torch.argmax, _T.argmax, torch.argmin, _T.argmin, torch.argsort, _T.argsort,
    torch.nonzero, _T.nonzero, torch.count_nonzero, _T.count_nonzero, torch.any, _T.any,
    torch.all, _T.all, torch.bucketize, torch.searchsorted, torch.histc,
    # constructors from shape, dtype and device
    _T.new_zeros, _T.new_ones, _T.new_full, _T.new_empty, _T.new_tensor,
    torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like,
    torch.randn_like, torch.randint_like,
    # conversions to integer and bool dtypes
    _T.long, _T.int, _T.short, _T.char, _T.byte, _T.bool,
]
for _op in PRIMAL_ONLY:
    implements(_op)(_on_primals(_op))


def _tangent_dtype(d: Dual, y: Tensor) -> torch.dtype:
    """The tangent's dtype after a conversion of the primal to ``y``'s: a tangent in the
    primal's dtype follows it; a lower-precision one stays as it is where it still fits."""
    t = d.tangents.dtype
    if t != d.primal.dtype and tangent_dtype_fits(y.dtype, t):
        return t
    return y.dtype


def _conversion(func: Callable) -> Callable:
    def rule(input, *args, **kwargs):
        if not isinstance(input, Dual):
            # a plain tensor converted to a Dual's dtype and device (t.type_as(d), t.to(d)):
            # the Dual gives only those, and the result is the tensor's, without tangent
            a, k = _primals(args, kwargs)
            return func(input, *a, **k)
        a, k = _primals(args, kwargs)
        y = func(input.primal, *a, **k)
        if not isinstance(y, Tensor) or not differentiable(y.dtype):
            return y  # d.type() names the type; an integer or bool result has no tangent
        t = input.tangents
        if t is None:
            return input.with_tangents(y, None)
        t = t.to(device=y.device, dtype=_tangent_dtype(input, y))
        fmt = k.get("memory_format", torch.preserve_format)
        if fmt != torch.preserve_format:
            t = slots_in_format(t, fmt if y.is_contiguous(memory_format=fmt)
                                else torch.contiguous_format)
        # A conversion that changes nothing returns the tensors themselves, as torch's does;
        # a new primal (float32 → float64) gets a tangent of its own, though a bfloat16
        # tangent stays as it was.
        return input.as_view(input.with_tangents(y, t))
    return rule


for _op in (_T.to, _T.double, _T.float, _T.half, _T.bfloat16, _T.cpu, _T.cuda, _T.type,
            _T.type_as, _T.cfloat, _T.cdouble):
    implements(_op)(_conversion(_op))


# --- in-place fills: the Dual rebound to the new values (``Dual`` in-place semantics) -----------
def _fill(func: Callable) -> Callable:
    """``d.zero_()``, ``torch.zero_(d)``, ``d.fill_(v)``, ``d.uniform_()``, ...: values with no
    tangent, which zero the Dual's slots (a Dual fill value brings its own)."""
    def rule(input: Dual, *args, **kwargs):
        if not isinstance(input, Dual):  # a plain tensor filled from a Dual value
            return forward_ad_fallback(func, (input, *args), kwargs)
        value = args[0] if args and isinstance(args[0], Dual) else None
        if value is not None:  # fill_(Dual scalar): every element takes its value and tangent
            if value.dim() != 0:
                raise RuntimeError(f"fill_ only supports 0-dimension value tensor but got "
                                   f"tensor with {value.dim()} dimensions.")
            return input._assign(value.expand_as(input.primal) * 1.0)
        a, k = _primals(args, kwargs)
        y = func(input.primal.clone(), *a, **k)
        return input._assign(Dual._unchecked(y, None, None, False))
    return rule


for _op in (_T.zero_, torch.zero_, _T.fill_, _T.uniform_, _T.normal_, _T.bernoulli_, _T.random_,
            _T.exponential_, _T.geometric_, _T.log_normal_, _T.cauchy_):
    implements(_op)(_fill(_op))


@implements(_T.copy_)
def copy_(input, src, non_blocking: bool = False):
    """``d.copy_(src)``: ``d`` rebound to ``src`` broadcast to its shape, dtype and device (a
    source without tangent zeroes the Dual's slots)."""
    if not isinstance(input, Dual):
        return forward_ad_fallback(_T.copy_, (input, src, non_blocking), {})
    source = src if isinstance(src, Dual) else Dual._unchecked(src, None, None, False)
    value = source.to(device=input.device, dtype=input.dtype).expand_as(input.primal)
    return input._assign(value * 1.0 if value.tangents is not None else
                         Dual._unchecked(value.primal.clone(), None, None, False))


# --- shape and dtype donors: the other tensor lends only its shape or dtype ---------------------
def _donor(func: Callable) -> Callable:
    def rule(input, other, *args, **kwargs):
        other = primal_of(other)
        if not isinstance(input, Dual):
            return func(input, other, *args, **kwargs)
        return Dual.__torch_function__(_BY_SHAPE[func], (Dual,), (input, other.shape), {}) \
            if func in _BY_SHAPE else _conversion(func)(input, other)
    return rule


_BY_SHAPE = {_T.expand_as: _T.expand, _T.view_as: _T.view, _T.reshape_as: _T.reshape}
for _op in (_T.expand_as, _T.view_as, _T.reshape_as):
    implements(_op)(_donor(_op))

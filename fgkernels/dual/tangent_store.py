"""The tangent store: a tensor's tangent, recorded on the tensor itself for the next dual passes
(``set_tangents`` in ``tangents`` fills it), and the module attributes it was set under, whose
replacement a pass refuses.

A tangent is an attribute of the tensor (so ``torch.compile`` reads it as it reads any tensor
attribute, with a guard); ``deepcopy`` and ``state_dict`` leave it behind, as they should a
per-step value. The store counts the tensors that have one (``LIVE``): fgkernels' global module
hooks (``passes``) are registered while any does.
"""
from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Iterable
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .dtypes import tangent_dtype_fits
from .value import Dual

Tensor = torch.Tensor


class ParameterTangent(NamedTuple):
    """A tensor's tangent as the store keeps it: stacked ``(T, *shape)``, with its slots'
    direction labels (None: unlabelled) and whether it was given as a single tangent."""

    stack: Tensor
    directions: Optional[tuple[int, ...]]
    single: bool

    def __reduce__(self):
        # A per-step value never travels with its tensor: pickled (torch.save(model)) or
        # copied (copy.copy, copy.deepcopy), it comes back as None, "no tangent", as a state
        # dict leaves it behind.
        return _no_tangent, ()


def _no_tangent() -> None:
    return None


TANGENT_ATTRIBUTE = "_fgkernels_tangent"
# id -> a weak reference to each tensor that has a tangent
LIVE: dict[int, weakref.ref] = {}
# module -> {name in its _parameters: the tensor a tangent was set for under that name}: a
# parameter replaced after its tangent was set is refused at the next dual pass.
_BOUND: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# bumped at every change of _BOUND's: a list of bound modules made before is stale
_bound_generation = [0]


def _nothing() -> None:
    return None


# Called when a tensor with a tangent is freed: ``passes``, which owns fgkernels' global module
# hooks, sets it, to take them away with the last one.
sync_hooks: Callable[[], None] = _nothing


def tangent_of(t) -> Optional[ParameterTangent]:
    """The tangent recorded for tensor ``t`` (None: none)."""
    return getattr(t, TANGENT_ATTRIBUTE, None) if isinstance(t, Tensor) else None


def has_tangent(t) -> bool:
    """True if a tangent is recorded for tensor ``t``."""
    return tangent_of(t) is not None


def dual_of(t: Tensor) -> Optional[Dual]:
    """``t`` as a Dual of its recorded tangent (None when it has none)."""
    entry = tangent_of(t)
    if entry is None:
        return None
    return Dual._of_parameter(t, entry.stack, entry.directions, entry.single)


def record_tangent(t: Tensor, tangent: ParameterTangent) -> None:
    """Record ``tangent`` for tensor ``t`` (and count ``t`` among the tensors with one until it
    is freed)."""
    key = id(t)

    def forget(ref, key=key):
        if LIVE.get(key) is ref:
            del LIVE[key]
            sync_hooks()

    setattr(t, TANGENT_ATTRIBUTE, tangent)
    if key not in LIVE:
        LIVE[key] = weakref.ref(t, forget)


def drop_tangent(t: Tensor) -> None:
    """Remove the tangent recorded for ``t``, if any."""
    if getattr(t, TANGENT_ATTRIBUTE, None) is not None:
        delattr(t, TANGENT_ATTRIBUTE)
        LIVE.pop(id(t), None)


def checked_dual(m: nn.Module, name: str, t: Tensor) -> Dual:
    """``t`` (read as ``m.<name>``) as a Dual of its recorded tangent, refused where ``t`` has
    changed dtype, shape or device since the tangent was set."""
    entry = tangent_of(t)
    _check_tangent_fits(m, name, t, entry.stack)
    return Dual._of_parameter(t, entry.stack, entry.directions, entry.single)


def _check_tangent_fits(m: nn.Module, name: str, t: Tensor, stack: Tensor) -> None:
    if stack.device != t.device or stack.shape[1:] != t.shape \
            or not tangent_dtype_fits(t.dtype, stack.dtype):
        raise RuntimeError(
            f"{type(m).__name__}.{name} is now a {t.dtype} tensor of shape {tuple(t.shape)} on "
            f"{t.device}, but its tangent ({stack.dtype}, {tuple(stack.shape[1:])}, "
            f"{stack.device}) was set before it changed; set its tangent again")


def check_still_bound(m: nn.Module) -> None:
    """Refuse a parameter of ``m`` replaced since ``set_tangents`` gave it its tangent."""
    for name, t in _BOUND.get(m, {}).items():
        if m._parameters.get(name) is not t:
            raise RuntimeError(
                f"{type(m).__name__}.{name} was replaced after its tangent was set; set "
                "its tangent again with fgkernels.set_tangents, or clear it with "
                "fgkernels.clear_tangents (torch.func.functional_call swaps in the "
                "tensors it is given, which carry no tangent: call the module itself)")


def check_tangents_still_fit(module: nn.Module, listed: list) -> None:
    """What an eager pass checks at each module call, for a pass whose modules' hooks do not
    run (a compiled one): a parameter replaced since its tangent was set, or changed in dtype,
    shape or device, is refused (it would carry no tangent, or a tangent it no longer fits).
    ``listed``, the caller's own one-element list, keeps the modules of ``module`` that
    ``set_tangents`` bound, listed again after each binding."""
    if not listed or listed[0][0] != _bound_generation[0]:
        listed[:] = [(_bound_generation[0],
                      [(m, bound) for m in module.modules() if (bound := _BOUND.get(m))])]
    for m, bound in listed[0][1]:
        for name, t in bound.items():
            if m._parameters.get(name) is not t:
                check_still_bound(m)
            entry = tangent_of(t)
            if entry is not None:
                _check_tangent_fits(m, name, t, entry.stack)


def bind(owner: nn.Module, leaf: str, t: Tensor) -> None:
    """Record that ``owner.<leaf>`` was given its tangent as tensor ``t``
    (``check_still_bound``)."""
    _BOUND.setdefault(owner, {})[leaf] = t


def unbind_removed(module: nn.Module) -> None:
    """Forget the bindings of ``module``'s tree whose parameter is gone (a prune or a
    parametrization moves it under another name): no longer refused."""
    for m in module.modules():
        bound = _BOUND.get(m)
        for leaf in [leaf for leaf in bound or () if leaf not in m._parameters]:
            del bound[leaf]


def unbind(module: nn.Module) -> None:
    """Forget every binding of ``module``'s tree."""
    for m in module.modules():
        _BOUND.pop(m, None)


def bindings_changed() -> None:
    """Mark every list of bound modules made so far stale (``check_tangents_still_fit``)."""
    _bound_generation[0] += 1


def _is_dataclass(v) -> bool:
    """True for a dataclass instance that torch's pytree does not take apart itself."""
    return dataclasses.is_dataclass(v) and not isinstance(v, type) \
        and type(v) not in pytree.SUPPORTED_NODES


def temporaries_as_duals(output, temporaries: Iterable[Optional[Tensor]]):
    """``output`` with each of ``temporaries`` in it (found in tuples, lists, dicts, the other
    containers torch's pytree knows, and dataclasses) as a Dual of its own: the tensor and its
    recorded tangent."""
    temporaries = {id(t): t for t in temporaries if t is not None}

    def as_dual(v):
        if _is_dataclass(v):  # (a container pytree may not know)
            return dataclasses.replace(v, **{f.name: pytree.tree_map(as_dual, getattr(
                v, f.name), is_leaf=_is_dataclass) for f in dataclasses.fields(v) if f.init})
        if not isinstance(v, Tensor) or temporaries.get(id(v)) is not v:
            return v  # (None, which pytree takes for a leaf, is no temporary either)
        entry = tangent_of(v)
        return Dual._unchecked(v, entry.stack, entry.directions, entry.single)

    return pytree.tree_map(as_dual, output, is_leaf=_is_dataclass)

"""Lifted tensors: for the length of a dual pass, each tensor with a tangent is of a subclass of
its own class whose ops take it as its Dual, so that a read the parameter substitution does not
reach (a closure's, a global's, a container the pass does not look into) carries the tangent
too; and the call of an op with such tensors among its arguments, shared with the compiled
pass's function mode (``function_mode``)."""
from __future__ import annotations

import contextlib
import copy
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Optional

import torch
from torch import nn
from torch.utils import _pytree as pytree

from .rule_state import inside_rule
from .tangent_store import dual_of, tangent_of
from .value import PRIMAL_METADATA, Dual

Tensor = torch.Tensor


def _no_pass() -> bool:
    return False


# Whether a dual pass runs in this thread: ``passes``, which runs them, sets it.
pass_runs: Callable[[], bool] = _no_pass


def lifted_call(func, args: tuple, kwargs: dict):
    """``func`` called with every tensor with a tangent among its arguments taken as its
    Dual: the Dual's rule for it."""
    flat, spec = pytree.tree_flatten((args, kwargs))
    flat = [with_recorded_tangent(v) for v in flat]
    if not any(isinstance(v, Dual) for v in flat):  # (a tangent cleared during the pass)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)
    args, kwargs = pytree.tree_unflatten(flat, spec)
    name = _tensor_attribute(func)
    if name is not None and args and isinstance(args[0], Dual):
        # ``p.shape``, ``p.data``, ``p.detach()``: the Dual answers as it does in an eager
        # pass, where the module holds it (a property read goes nowhere near the op rules).
        if not callable(getattr(torch.Tensor, name)):
            return getattr(args[0], name)
        if name in _DUAL_PROTOCOLS:  # no keywords (torch's repr passes one of its own)
            return getattr(args[0], name)(*args[1:])
        if name in _DUAL_METHODS:
            return getattr(args[0], name)(*args[1:], **kwargs)
    return Dual.__torch_function__(func, (Dual,), args, kwargs)


def _lifting_torch_function(cls, func, types, args=(), kwargs=None):
    """A lifted tensor's ops during its thread's dual pass, on its Dual; those of a rule
    (which acts on primals), any other thread's, an attribute set (``p.requires_grad =
    False``) and a read of an attribute that its Dual reads from it (``p.shape``, ``p.grad``,
    ``p.requires_grad``) as its class's own."""
    kwargs = kwargs or {}
    kind = getattr(func, "__name__", None)
    if inside_rule() or not pass_runs() or kind == "__set__" \
            or (kind == "__get__" and _tensor_attribute(func) not in _VALUE_PROPERTIES):
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)
    return lifted_call(func, args, kwargs)


# The properties of a tensor whose values carry its tangent (``w.T``); the others describe it.
_VALUE_PROPERTIES = frozenset({"T", "mT", "H", "mH", "real", "imag"})


class Lifted:
    """Mixin of the lifted classes: a copy or a pickle of a lifted tensor is of its own
    class, with no tangent (as a state dict leaves the tangent behind)."""

    __torch_function__ = classmethod(_lifting_torch_function)

    def __deepcopy__(self, memo):
        with unlifted(self):
            return copy.deepcopy(self, memo)

    def __reduce_ex__(self, protocol):
        with unlifted(self):
            return self.__reduce_ex__(protocol)


class _LiftedParameter(Lifted, nn.Parameter):
    """A Parameter with a tangent while a dual pass runs (``passes._Pass.lift_the_rest``)."""


class _LiftedTensor(Lifted, Tensor):
    """A plain tensor with a tangent while a dual pass runs (``passes._Pass.lift_the_rest``)."""


_LIFTED = {nn.Parameter: _LiftedParameter, Tensor: _LiftedTensor}
UNLIFTED = {lifted: cls for cls, lifted in _LIFTED.items()}
# id -> [a weak reference to the lifted tensor, how many running passes hold it lifted]
LIFTS: dict[int, list] = {}
_LIFTS_LOCK = threading.Lock()


def lift(t: Tensor) -> bool:
    """Lift ``t`` for one more running pass (False if its class is not one that lifts)."""
    with _LIFTS_LOCK:
        entry = LIFTS.get(id(t))
        if entry is None or entry[0]() is not t:
            if type(t) not in _LIFTED:
                return False
            key = id(t)
            # (a tensor freed while lifted takes its entry with it; no lock in a callback,
            # which the collector may run while this thread holds it)
            entry = LIFTS[key] = [weakref.ref(t, lambda _, key=key: LIFTS.pop(key, None)), 0]
            t.__class__ = _LIFTED[type(t)]
        entry[1] += 1
        return True


def unlift(t: Tensor) -> None:
    """One running pass lets go of ``t``: its own class again when none holds it."""
    with _LIFTS_LOCK:
        entry = LIFTS.get(id(t))
        if entry is None or entry[0]() is not t:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del LIFTS[id(t)]
            t.__class__ = UNLIFTED.get(type(t), type(t))


@contextlib.contextmanager
def unlifted(t: Tensor) -> Iterator[None]:
    """Lifted ``t`` of its own class for the length of the block."""
    lifted = type(t)
    t.__class__ = UNLIFTED[lifted]
    try:
        yield
    finally:
        t.__class__ = lifted


# Tensor methods that a Dual answers with a method of its own (``detach``, ``size``, ...),
# rather than through an op rule; and Python's protocols, which it answers too (``len(p)``,
# ``repr(p)``, ``bool(p)``, ``x in p``).
_DUAL_METHODS = frozenset(n for n, v in vars(Dual).items()
                          if callable(v) and not n.startswith("_") and hasattr(Tensor, n)) \
    | PRIMAL_METADATA
_DUAL_PROTOCOLS = frozenset({"__len__", "__repr__", "__format__", "__contains__", "__bool__",
                             "__int__", "__float__", "__index__", "__complex__"}) & set(vars(Dual))


def _tensor_attribute(func) -> Optional[str]:
    """The name of the Tensor attribute ``func`` reads (a property's getter, as torch hands it
    to a torch function mode) or calls (a method), else None."""
    descriptor = getattr(func, "__self__", None)
    if getattr(func, "__name__", None) == "__get__" and \
            getattr(descriptor, "__objclass__", None) is torch._C.TensorBase:
        return descriptor.__name__
    name = getattr(func, "__name__", None)
    return name if name is not None and getattr(Tensor, name, None) is func else None


def meets_dual(values: Iterable) -> bool:
    """True if a Dual or a tensor with a tangent is among ``values`` or inside a container of
    them. (An op on Duals alone is handed to their rules here too: Dynamo, tracing the mode,
    cannot trace the op's own call on a tuple of Duals, ``torch.cat((a, b))``.)"""
    for v in values:
        if isinstance(v, (tuple, list, dict)):
            if any(_is_dual(leaf) for leaf in pytree.tree_leaves(v)):
                return True
        elif _is_dual(v):
            return True
    return False


def _is_dual(v) -> bool:
    return isinstance(v, Dual) or tangent_of(v) is not None


def with_recorded_tangent(v):
    """``v`` as its Dual where it is a tensor with a recorded tangent, else as it is."""
    d = dual_of(v) if isinstance(v, Tensor) else None
    return v if d is None else d

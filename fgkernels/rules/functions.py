"""``torch.autograd.Function`` subclasses called on Duals.

A Function that defines ``jvp`` is differentiated by it, as forward_ad differentiates it: inside
``torch.autograd.forward_ad`` itself, its forward on the primals and its jvp on one tangent slot
at a time (the forward once per slot, each from the same random state: torch's forward mode
carries one tangent per level), so that ``ctx``, ``save_for_forward``,
``mark_non_differentiable``, ``set_materialize_grads`` and ``setup_context`` mean what they mean
there. A straight-through estimator (``round`` forward, identity jvp) passes its input's tangent
on, as its author meant, where the ops of its forward have derivative 0. The forwards after the
first run on copies of the tensors as the first found them, so that what a forward writes in
place (its input, ``mark_dirty``; a running statistic) it writes once; a Dual written so is
the output, as torch returns the input itself, its tangents the jvp's. An output marked
non-differentiable has tangent 0 (forward_ad gives it none).

A Function without ``jvp`` (forward_ad refuses it) runs its forward on the Duals themselves:
fgkernels differentiates the ops it runs, which is exact for what the forward computes, but is
not what its backward says where that is a surrogate gradient; its first call warns, once per
Function (torch's own, reentrant checkpointing's, are exact and do not).

``Function.apply`` is wrapped once, when fgkernels is imported, to look for Duals among a call's
arguments, as torch looks for tensors: at the top level (a tensor with a recorded tangent counts
where an op would take it as its Dual: beside a Dual, or during a dual pass); a call without any
is torch's own. A reference to ``apply`` taken before fgkernels was imported
(``swish = SwishFunction.apply`` in a library imported first) stays torch's, whose Function
then runs on Duals as one without jvp does. A compiled pass (``fgkernels.compile``) breaks its
graph at a Function with jvp, which then runs eagerly as above.
"""
from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch.utils import _pytree as pytree

from ..dual.dynamo import eager_under_compile, when_dynamo_loads
from ..dual.function_mode import compiled_pass
from ..dual.lifting import Lifted
from ..dual.tangent_store import TANGENT_ATTRIBUTE, tangent_of
from ..dual.value import Dual
from .fallback import Differentiation, differentiate

__all__ = ["defines_jvp"]

# torch's own apply, as the class holds it (a classmethod, or torch 2.14's C one)
_torch_apply_of_class = torch.autograd.Function.__dict__["apply"]
_no_jvp = torch.autograd.Function.jvp
_warned: set[type] = set()


def _torch_apply(cls: type, *args, **kwargs):
    """torch's ``cls.apply(*args, **kwargs)``."""
    return _torch_apply_of_class.__get__(None, cls)(*args, **kwargs)


def defines_jvp(cls: type) -> bool:
    """True if the Function class ``cls`` defines its own ``jvp``."""
    return cls.jvp is not _no_jvp


def _forward_ad_jvp(f, primals: tuple, tangents: tuple) -> tuple[Any, Any]:
    """``torch.func.jvp(f, primals, tangents)``'s answer, by ``torch.autograd.forward_ad``:
    it calls a Function's own jvp whatever the Function's style (torch.func.jvp takes only
    Functions with ``setup_context``). An output without a tangent (marked
    non-differentiable, or given None by the jvp) has a zero one, as torch.func.jvp gives it."""
    with fwAD.dual_level():
        out = f(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents)))
        flat, spec = pytree.tree_flatten(out)
        unpacked = [fwAD.unpack_dual(v) for v in flat]
    primal = [u.primal for u in unpacked]
    tangent = [torch.zeros_like(u.primal) if u.tangent is None else u.tangent for u in unpacked]
    return pytree.tree_unflatten(primal, spec), pytree.tree_unflatten(tangent, spec)


_BY_ITS_JVP = Differentiation(_forward_ad_jvp, batched=False, fallback=False)


def _warn_no_jvp(cls: type) -> None:
    if cls in _warned or cls.__module__.startswith("torch."):
        # (torch's own, reentrant checkpointing's: a backward that recomputes, no surrogate)
        return
    _warned.add(cls)
    warnings.warn(
        f"fgkernels: the torch.autograd.Function '{cls.__qualname__}' defines no jvp "
        "(forward_ad refuses it): fgkernels differentiates the ops its forward runs, which is "
        "not its backward where that is a surrogate gradient (a straight-through estimator's); "
        "define jvp to give the Function's own forward-mode derivative", stacklevel=5)


class _WritingOnce:
    """``cls.apply`` for ``differentiate`` to call ``calls`` times at most (once per tangent
    slot): every call after the first runs on copies of the tensors among its arguments as the
    first call found them, each dual one with its tangent, so that what the forward writes in
    place it writes once. ``written`` pairs each output that is one of its arguments (written
    in place, ``mark_dirty``: torch returns the argument itself) with that argument, by their
    positions among the leaves of the output and of ``(args, kwargs)``."""

    def __init__(self, cls: type, calls: int):
        self.cls, self.calls = cls, calls
        self.found: Optional[list] = None  # the first call's tensors, copied before it ran
        self.written: list[tuple[int, int]] = []

    def __call__(self, *args, **kwargs):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        first = self.found is None
        if first:
            self.found = [fwAD.unpack_dual(v).primal.clone()
                          if self.calls > 1 and isinstance(v, torch.Tensor) else None
                          for v in leaves]
        else:
            args, kwargs = pytree.tree_unflatten(
                [v if copy is None else _copy_at_level(v, copy)
                 for v, copy in zip(leaves, self.found)], spec)
        out = _torch_apply(self.cls, *args, **kwargs)
        if first:
            self.written = [(i, j) for i, v in enumerate(pytree.tree_leaves(out))
                            for j, arg in enumerate(leaves) if v is arg]
        return out


def _copy_at_level(v: torch.Tensor, found: torch.Tensor) -> torch.Tensor:
    """A copy of ``found`` with ``v``'s tangent at the current forward-AD level, if it has one."""
    tangent = fwAD.unpack_dual(v).tangent
    copy = found.clone()
    return copy if tangent is None else fwAD.make_dual(copy, tangent)


@eager_under_compile
def _apply_on_duals(cls: type, args: tuple, kwargs: dict):
    """``cls.apply(*args, **kwargs)`` with Duals among the arguments: by its jvp if it defines
    one, else through the ops of its forward. Eager between graphs: see ``_apply``."""
    if not defines_jvp(cls):
        _warn_no_jvp(cls)
        return _torch_apply(cls, *args, **kwargs)
    apply = _WritingOnce(cls, sum(_slot_count(v) for v in (*args, *kwargs.values())))
    out = differentiate(apply, args, kwargs, f"{cls.__qualname__}.apply", _BY_ITS_JVP)
    if not apply.written:
        return out
    # An argument written in place is the output, as torch returns it: a Dual takes the
    # output's primal and tangents (the jvp's), and is returned in its place.
    flat, spec = pytree.tree_flatten(out, is_leaf=lambda v: isinstance(v, Dual))
    given = pytree.tree_leaves((args, kwargs), is_leaf=lambda v: isinstance(v, Dual))
    for i, j in apply.written:
        if isinstance(given[j], Dual) and isinstance(flat[i], Dual):
            flat[i] = given[j]._assign(flat[i])
    return pytree.tree_unflatten(flat, spec)


def _slot_count(v) -> int:
    """The tangent slots ``v`` carries (a Dual's, or a tensor's recorded ones)."""
    if isinstance(v, Dual):
        return v.num_tangents
    recorded = tangent_of(v)
    return 0 if recorded is None else recorded.stack.shape[0]


def _apply(cls, *args, **kwargs):
    """``cls.apply(*args, **kwargs)``: torch's own unless Duals are among the arguments."""
    # (no call of a Python function before the choice: see the note below) A tensor with a
    # tangent is lifted during an eager pass, and recorded alone during a compiled one.
    for v in (*args, *kwargs.values()):
        if isinstance(v, (Dual, Lifted)) or (compiled_pass.running and getattr(
                v, TANGENT_ATTRIBUTE, None) is not None):
            return _apply_on_duals(cls, args, kwargs)
    return _torch_apply_of_class.__get__(None, cls)(*args, **kwargs)


# (named as torch's: Dynamo knows a Function's apply by its name)
_apply.__name__, _apply.__qualname__ = "apply", "Function.apply"
_apply.__doc__ = torch.autograd.Function.apply.__doc__
torch.autograd.Function.apply = classmethod(_apply)
# Dynamo traces a Function's apply its own way, and never this one; but a call that runs
# between graphs enters it as a frame of its own, which Dynamo must not compile (torch 2.14's
# cannot trace the C method it calls): skipped, the frames it calls compiled as before (the
# Function's forward; so it calls no Python function of fgkernels' own on plain tensors).
when_dynamo_loads(lambda: torch._dynamo.eval_frame.skip_code(_apply.__code__))

"""``torch.autograd.Function`` subclasses called on Duals.

A Function that defines ``jvp`` is differentiated by it, as forward_ad differentiates it: inside
``torch.autograd.forward_ad`` itself, its forward on the primals and its jvp on one tangent slot
at a time (the forward once per slot, each from the same random state: torch's forward mode
carries one tangent per level), so that ``ctx``, ``save_for_forward``,
``mark_non_differentiable``, ``set_materialize_grads`` and ``setup_context`` mean what they mean
there. A straight-through estimator (``round`` forward, identity jvp) passes its input's tangent
on, as its author meant, where the ops of its forward have derivative 0. A Function that writes
its input in place (``mark_dirty``) writes it once, the later slots' forwards running on copies:
its output is the written Dual, whose tangents are the jvp's; with several slots, the input
Dual itself keeps the tangents it had (``x = F.apply(x)`` reads the output).

A Function without ``jvp`` (forward_ad refuses it) runs its forward on the Duals themselves:
fgkernels differentiates the ops it runs, which is exact for what the forward computes, but is
not what its backward says where that is a surrogate gradient; its first call warns, once per
Function (torch's own, reentrant checkpointing's, are exact and do not).

``Function.apply`` is wrapped once, when fgkernels is imported, to look for Duals (and tensors
with a recorded tangent) among a call's arguments, as torch looks for tensors: at the top level;
a call without any is torch's own. A compiled pass (``fgkernels.compile``) breaks its graph at a
Function with jvp called on Duals, which then runs eagerly as above.
"""
from __future__ import annotations

import functools
import warnings
from typing import Any

import torch
import torch.autograd.forward_ad as fwAD
from torch.utils import _pytree as pytree

from ..dual.dynamo import eager_under_compile, when_dynamo_loads
from ..dual.tangents import TANGENT_ATTRIBUTE
from ..dual.value import Dual
from .fallback import Differentiation, differentiate

__all__ = ["defines_jvp"]

# torch's own apply, as the class holds it (a classmethod, or torch 2.14's C one), and bound
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


@eager_under_compile
def _apply_on_duals(cls: type, args: tuple, kwargs: dict):
    """``cls.apply(*args, **kwargs)`` with Duals among the arguments: by its jvp if it defines
    one, else through the ops of its forward. Eager between graphs: see ``_apply``."""
    if defines_jvp(cls):
        return differentiate(functools.partial(_torch_apply, cls), args, kwargs,
                             f"{cls.__qualname__}.apply", _BY_ITS_JVP)
    _warn_no_jvp(cls)
    return _torch_apply(cls, *args, **kwargs)


def _apply(cls, *args, **kwargs):
    """``cls.apply(*args, **kwargs)``: torch's own unless Duals are among the arguments."""
    # (no call of a Python function before the choice: see the note below)
    for v in (*args, *kwargs.values()):
        if isinstance(v, Dual) or getattr(v, TANGENT_ATTRIBUTE, None) is not None:
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

"""The exact fallback for torch ops without an fgkernels rule: PyTorch's own forward-mode AD
(``torch.func.jvp``) on that op alone, vmapped over the tangent slots.

A model that runs under torch.nn therefore runs on Duals and gets forward_ad's tangent, more
slowly where it takes this path. Each op that takes it warns once; ``fallback_ops()`` lists
them. ``FGKERNELS_STRICT=1`` or ``with strict_rules():`` makes them raise ``TypeError`` instead,
for those who want only the fused rules. In-place ops without a rule always raise: their
result would have to be written into the Dual's tensors.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator
from typing import Any, Callable

import torch
from torch.utils import _pytree as pytree

from . import _slots
from .backends.base import tangent_dtype_fits

_used: dict[str, int] = {}
_local = threading.local()


def op_name(func: Callable) -> str:
    """A readable name of a torch function or method (``'Tensor.permute'``, ``'layer_norm'``)."""
    name = getattr(func, "__name__", None) or repr(func)
    owner = getattr(func, "__objclass__", None)
    return f"Tensor.{name}" if owner is not None and issubclass(owner, torch._C.TensorBase) \
        else name


def fallback_ops() -> dict[str, int]:
    """The ops that ran on the forward-AD fallback in this process, with their call counts."""
    return dict(_used)


def _strict() -> bool:
    return getattr(_local, "strict", 0) > 0 or os.environ.get("FGKERNELS_STRICT") == "1"


@contextlib.contextmanager
def strict_rules() -> Iterator[None]:
    """Inside the block, an op on a Dual without an fgkernels rule raises ``TypeError``
    instead of taking the forward-AD fallback."""
    _local.strict = getattr(_local, "strict", 0) + 1
    try:
        yield
    finally:
        _local.strict -= 1


def _note(name: str) -> None:
    if name not in _used:
        warnings.warn(f"fgkernels: '{name}' has no fgkernels rule; its tangent is computed by "
                      "PyTorch's forward-mode AD on that op alone (exact, slower). "
                      "fgkernels.fallback_ops() lists such ops.", stacklevel=4)
    _used[name] = _used.get(name, 0) + 1


def forward_ad_fallback(func: Callable, args: tuple, kwargs: dict) -> Any:
    """``func(*args, **kwargs)`` with Duals among its arguments: the primal outputs, and their
    tangents by ``torch.func.jvp``, one slot per vmapped lane."""
    from .dual import Dual
    name = op_name(func)
    leaves, spec = pytree.tree_flatten((args, kwargs), is_leaf=lambda v: isinstance(v, Dual))
    where = [i for i, v in enumerate(leaves) if isinstance(v, Dual)]
    duals = [leaves[i] for i in where]

    def call(*primals):
        values = list(leaves)
        for i, p in zip(where, primals):
            values[i] = p
        a, k = pytree.tree_unflatten(values, spec)
        return func(*a, **k)

    primals = tuple(d.primal for d in duals)
    plan = _slots.plan([d.slot_operand() for d in duals], name)
    if plan.count == 0:
        return _wrap(call(*primals), None, plan)
    if _strict():
        raise TypeError(f"fgkernels.Dual has no forward-mode rule for '{name}' (strict mode: "
                        "the forward-AD fallback is off)")
    if name.endswith("_") and not name.endswith("__"):
        raise TypeError(f"fgkernels.Dual: the in-place op '{name}' has no rule; use its "
                        "out-of-place form (tensors of a Dual are never written in place)")
    _note(name)
    # torch's forward AD wants each tangent in its primal's dtype: lower-precision tangents are
    # widened for the op and its result rounded back to the output slots' dtype.
    stacks = tuple(_full_stack(d, pos, plan.count).to(d.primal.dtype)
                   for d, pos in zip(duals, plan.positions))
    with torch.no_grad():
        primal_out, tangents = jvp_over_slots(call, primals, stacks)
    return _wrap(primal_out, tangents, plan)


def _full_stack(d, positions: tuple, count: int) -> torch.Tensor:
    """``d``'s tangent with a zero slot wherever ``d`` has none of the output's slots."""
    if d.tangents is None:
        return d.primal.new_zeros((count, *d.primal.shape))
    if positions == tuple(range(count)):
        return d.tangents
    full = d.tangents.new_zeros((count, *d.primal.shape))
    full[list(positions)] = d.tangents
    return full


def jvp_over_slots(call: Callable, primals: tuple, stacks: tuple):
    """``call(*primals)`` and its tangents along ``stacks`` (one stack per primal, T slots
    each), stacked over the slots, by ``torch.func.jvp``. vmap draws any random
    numbers once for all slots; where an op cannot be vmapped, each slot runs in turn from the
    same random state, so that every slot differentiates the same draw."""
    one_slot = lambda *t: torch.func.jvp(call, primals, t)
    try:
        return torch.func.vmap(one_slot, randomness="same", out_dims=(None, 0))(*stacks)
    except Exception:  # an op vmap cannot batch (data-dependent shapes, missing rules)
        pass
    state = torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    outs = []
    for t in range(stacks[0].shape[0]):
        torch.random.set_rng_state(state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)
        outs.append(one_slot(*(s[t] for s in stacks)))
    primal_out = outs[0][0]
    tangents = pytree.tree_map(lambda *ts: torch.stack(ts), *[o[1] for o in outs])
    return primal_out, tangents


def _differentiable(v) -> bool:
    return isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex())


def _tangent_of(v: torch.Tensor, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An output's tangent in the slots' dtype, unless that does not fit the output (an op that
    changes the dtype, such as ``.double()``)."""
    return t.to(dtype) if tangent_dtype_fits(v.dtype, dtype) else t


def _wrap(out, tangents, plan):
    """Each floating tensor output as a Dual (with its tangent stack, if any); other outputs
    (indices, masks, shapes, numbers) as they are."""
    from .dual import Dual
    if tangents is None:
        return pytree.tree_map(lambda v: Dual(v) if _differentiable(v) else v, out)
    flat_out, spec = pytree.tree_flatten(out)
    flat_t = pytree.tree_leaves(tangents)
    if len(flat_t) != len(flat_out):
        raise RuntimeError("fgkernels: forward-mode AD returned tangents that do not match the "
                           "op's outputs")
    wrapped = [Dual._unchecked(v, _tangent_of(v, t, plan.dtype), plan.directions, plan.single)
               if _differentiable(v) else v for v, t in zip(flat_out, flat_t)]
    return pytree.tree_unflatten(wrapped, spec)

"""The compiled pass's substitution (``fgkernels.compile``): a torch function mode that hands
every tensor with a tangent to the ops as its Dual, which ``torch.compile`` traces where it
cannot trace the eager pass's substitution of module parameters, and the tensors of the
forward's own that such a pass takes as Duals."""
from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Optional

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .dynamo import eager_between_graphs
from .lifting import lifted_call, meets_dual
from .rule_state import inside_rule
from .tangent_store import (
    TANGENT_ATTRIBUTE,
    ParameterTangent,
    drop_tangent,
    dual_of,
    temporaries_as_duals,
)
from .value import Dual, in_primal_layout

Tensor = torch.Tensor


class ParameterTangents(TorchFunctionMode):
    """Every op that meets a tensor with a recorded tangent takes it as its Dual, whatever the
    other operands: the dual pass's substitution written as a torch function mode, which
    ``torch.compile`` traces (it cannot trace the substitution of module parameters)."""

    # Dynamo hands it ``p.T`` and the other tensor-valued properties, as eager torch does
    # (``dynamo.route_tensor_properties_through_modes``).
    traces_tensor_properties = True

    @eager_between_graphs
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if inside_rule() or isinstance(func, (torch._ops.OpOverload,
                                              torch._ops.OpOverloadPacket)):
            return func(*args, **kwargs)  # a rule's own ops, a compiled graph's kernels
        temporaries = compiled_pass.temporaries
        if temporaries is not None and temporaries.tensors:
            temporaries.refuse_views_taken_before((args, kwargs))
        if not (meets_dual(args) or meets_dual(kwargs.values())):
            # Most calls: a compiled graph's wrapper reads every output's dtype, for one.
            return func(*args, **kwargs)
        return lifted_call(func, args, kwargs)


class _CompiledTemporaries:
    """The tensors of the forward's own that a compiled pass (``fgkernels.compile``) takes as
    Duals where a Dual is written into them, as an eager pass does (``passes._Pass.take_as_dual``),
    in a way Dynamo traces: the tangent is recorded on the tensor, and ``ParameterTangents``
    hands the tensor out with it, where the eager pass lifts it (a class change) and keeps a
    weak reference. ``root`` is the compiled module: what its modules hold is state, which
    takes the primal instead."""

    def __init__(self, root: nn.Module):
        self.root = root
        self.tensors: list[Tensor] = []

    def holds_as_state(self, t: Tensor) -> bool:
        """True if a module of the root's tree holds ``t``, or the tensor it views, as a
        parameter, a buffer or an attribute (``passes._Pass.holds_as_state``; found by identity,
        which Dynamo traces where it cannot take the ``id`` of a tensor the forward made)."""
        base = t._base
        return any(v is t or v is base for m in self.root.modules()
                   for v in (*m._parameters.values(), *m._buffers.values(), *m.__dict__.values())
                   if isinstance(v, Tensor))

    def can_take_as_dual(self, t: Tensor) -> bool:
        """True for a plain tensor that views nothing and that no module holds. Whether other
        tensors view it (``passes._Pass.can_take_as_dual``) cannot be asked while Dynamo traces: a
        view taken before the write is refused where an op reads it
        (``refuse_views_taken_before``)."""
        return type(t) is Tensor and t._base is None and not self.holds_as_state(t)

    def can_take_view_as_dual(self, v: Tensor) -> bool:
        """False: whether other tensors view a view's base cannot be asked while Dynamo traces,
        so a Dual written into a view of a tensor of the forward's own is refused
        (``passes._Pass.can_take_view_as_dual`` takes it in an eager pass)."""
        return False

    def take_as_dual(self, t: Tensor, count: int, directions, single: bool,
                     dtype: torch.dtype) -> Dual:
        """``t`` as a Dual of a zero tangent of ``count`` slots, which the write about to be
        made and later ones fill (``passes._Pass.take_as_dual``), its tangent recorded on it until
        the pass ends (``drop``)."""
        stack = in_primal_layout(t.new_zeros((count, *t.shape), dtype=dtype), t)
        setattr(t, TANGENT_ATTRIBUTE, ParameterTangent(stack, directions, single))
        self.tensors.append(t)
        return dual_of(t)

    def refuse_views_taken_before(self, values) -> None:
        """Refuse a plain view of one of the tensors in ``values`` (an op's operands, the
        pass's output; in containers): it was taken before the tensor became a Dual (a view
        taken after is a Dual), and holds values written since without their tangent. (A
        RuntimeError: torch's operators take a TypeError for a refused operand type, and
        raise their own: ``rows[0] + rows[1]``.)"""
        for v in pytree.tree_leaves(values):
            if isinstance(v, Tensor) and v._base is not None \
                    and any(v._base is t for t in self.tensors):
                raise RuntimeError(
                    "fgkernels.Dual: a view of a tensor, taken before a Dual was written into "
                    "the tensor and made it a Dual, is read (by an op, or as the pass's "
                    "output): it holds the values written without their tangent; make the "
                    "tensor a Dual (fgkernels.Dual(torch.zeros_like(x))) before taking views "
                    "of it, or take the view after the write")

    def with_duals(self, output):
        """``output`` with each of these tensors in it as a Dual of its own
        (``temporaries_as_duals``); a view of one among them, taken before it became a Dual, is
        refused."""
        if not self.tensors:
            return output
        self.refuse_views_taken_before(output)
        return temporaries_as_duals(output, self.tensors)

    def drop(self) -> None:
        """The tensors' tangents dropped as the pass ends: plain tensors again."""
        for t in self.tensors:
            drop_tangent(t)
        self.tensors = []


class _CompiledPass(threading.local):
    """Whether this thread runs a compiled dual pass of ``fgkernels.compile`` (under
    ``ParameterTangents``, which does the hooks' substitution), and the tensors of its forward
    that it takes as Duals (``_CompiledTemporaries``). Per thread: an eager pass in another
    thread substitutes as ever. (Set on the instance at each thread's first use, as
    ``rule_state._RuleDepth``.)"""

    def __init__(self):
        self.running = False
        self.temporaries: Optional[_CompiledTemporaries] = None

    @contextlib.contextmanager
    def run(self, root: nn.Module) -> Iterator[_CompiledTemporaries]:
        """A compiled pass of ``root`` runs in this thread for the length of the block (the
        one that ran before, if any, is back after it); the temporaries' tangents are dropped
        as it ends."""
        outer = self.running, self.temporaries
        self.running, self.temporaries = True, _CompiledTemporaries(root)
        try:
            yield self.temporaries
        finally:
            self.temporaries.drop()
            self.running, self.temporaries = outer


compiled_pass = _CompiledPass()

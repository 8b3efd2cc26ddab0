"""A layer op with parameters that the native backend runs as one compiled op: declared once,
beside its rule, with everything the backends need.

``LayerOp(name, reference, check, outputs, serves)``: ``name`` is the op of
``torch.ops.fgkernels`` (its schema in csrc/fgkernels.cpp, its kernels in csrc/, each registered
for its device or as a composite of torch's ops for all) that maps
``(x, xt, w, wt, b, bt, *args, sum_terms)`` to ``(y, x_part, p_part)``: the primal output, the
input's tangent terms ``(T, *y.shape)`` and the parameters' ``(P, *y.shape)`` (``w``'s and
``b``'s tangents carry the same P slots), each of the two empty when its tangents are absent.
With ``sum_terms`` (set when the call's slot plan puts both in the same slots, T == P, the
usual case) the op returns their sum as ``x_part`` and ``p_part`` empty: a kernel can then
accumulate one term into the other's output, never holding both. ``reference`` takes the same
arguments and computes the same with torch's ops (None for an absent part; the tangent terms in
the tangents' dtype): the reference backend runs it, and the native one wherever the library
has no kernel for the device or the kernel does not ``serve`` the call. The output's slots are
the two parts placed by the call's slot plan (``place``). ``check(x, w, b, *args)`` is the op's
argument contract (messages naming the argument): run in front of every call, and, with the
tangents' stacking contract, in the op's fake, so that the op traces under ``torch.compile``
and refuses there what it refuses eagerly; ``outputs(x, w, b, *args)`` gives the fake its
primal output.

Adding a layer op is then its rule module's ``LayerOp``, the schema, and a kernel file per
device (or one composite for all) (``backends/README.md``).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..dual.layout import empty_slots
from ..dual.slots import SlotPlan, place
from . import current_backend
from .base import LayerParams, check_stacked_tangent, param_slots, shared_tangent_dtype
from .compiled_op import CompiledOp

Tensor = torch.Tensor
Opt = Optional[Tensor]
Result = tuple[Tensor, Opt]
Parts = tuple[Tensor, Opt, Opt]


class LayerOp(CompiledOp):
    """A layer op with parameters and a compiled kernel (see the module's docstring)."""

    def __call__(self, x: Tensor, xt: Opt, p: LayerParams, plan: SlotPlan, *args) -> Result:
        """``(y, yt)`` on the backend the registry picks for x's device; ``plan`` over (the
        input, the parameters)."""
        self.check(x, p.weight, p.bias, *args)
        return current_backend(x.device).layer_op(self, x, xt, p, plan, *args)

    def run(self, impl, x: Tensor, xt: Opt, p: LayerParams, plan: SlotPlan, args: tuple,
            owned: bool = False) -> Result:
        """``(y, yt)`` from ``impl`` (the compiled op or ``reference``): each of its parts'
        slots where the plan puts them (``owned``: the parts are fresh and may be summed in
        place), or its sum of the two where they share every slot."""
        summed = terms_share_slots(plan)
        y, x_part, p_part = impl(x, xt, *p, *args, summed)
        if summed:
            return y, x_part
        x_pos, p_pos = plan.positions
        terms = [(t, pos) for t, pos in ((x_part, x_pos), (p_part, p_pos)) if t is not None]
        return y, place(plan.count, terms, owned=owned) if terms else None

    def fake(self, x: Tensor, xt: Opt, w: Tensor, wt: Opt, b: Opt, bt: Opt, *rest) -> Parts:
        """The op on fake tensors: its contract checked, its outputs' shapes, dtypes and
        layout."""
        *args, sum_terms = rest
        self.check(x, w, b, *args)
        if xt is not None:
            check_stacked_tangent(x, xt)
        dtype = shared_tangent_dtype(x, xt, wt, bt)
        y = self.outputs(x, w, b, *args)
        P = param_slots(wt, bt)
        torch._check(not sum_terms or (xt is not None and P == xt.shape[0]),
                     lambda: "sum_terms needs the input's and the parameters' tangents with one "
                             "slot count")
        x_part = empty_slots(xt.shape[0], y, dtype) if xt is not None else \
            y.new_empty(0, dtype=dtype)
        return y, x_part, empty_slots(P, y, dtype) if P and not sum_terms else \
            y.new_empty(0, dtype=dtype)


def terms_share_slots(plan: SlotPlan) -> bool:
    """Whether a layer's input and parameter terms fill the same output slots (``plan`` over
    (input, parameters)): the op may then return them summed."""
    x_pos, p_pos = plan.positions
    return bool(x_pos) and x_pos == p_pos

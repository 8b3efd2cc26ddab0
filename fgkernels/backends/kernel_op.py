"""An op of one input that the native backend runs as one compiled op: declared once, beside
its rule, with everything the backends need.

``KernelOp(name, reference, check, outputs, serves)``: ``name`` is the op of
``torch.ops.fgkernels`` (its schema in csrc/fgkernels.cpp, its kernels in csrc/, each registered
for its device or as a composite of torch's ops for all) that maps ``(x, xt, *args)`` to
``(y, yt)``: the primal output and its stacked tangent ``(T, *y.shape)``, in the kernels' layout
(``dual.layout.kernel_format``). ``reference`` computes the same with torch's ops (``xt`` None
when zero): the reference backend runs it, and the native one wherever the library has no
kernel for the device or the kernel does not ``serve`` the call. ``check(x, *args)`` is the op's
argument contract (``torch._check``, messages naming the argument): run in front of every call,
and, with the tangents' stacking contract, in the op's fake implementation, so that the op
traces under ``torch.compile`` and refuses there what it refuses eagerly; ``outputs(x, *args)``
gives the fake its primal output's shape (x's own for an elementwise op).

Adding an elementwise native op is then its rule module's ``KernelOp``, the schema, and a
kernel file per device (``backends/README.md``).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..dual.layout import empty_slots, kernel_format
from ..dual.value import Dual
from . import current_backend
from .base import check_stacked_tangent
from .compiled_op import CompiledOp, always

Tensor = torch.Tensor
Result = tuple[Tensor, Optional[Tensor]]


def no_arguments(x: Tensor, *args) -> None:
    """The check of an op whose arguments besides its input need none of their own."""


def elementwise(x: Tensor, *args) -> Tensor:
    """The primal output of an elementwise op: shaped like x."""
    return x


class KernelOp(CompiledOp):
    """An op of one input with a compiled kernel (see the module's docstring)."""

    def __init__(self, name: str, reference: Callable[..., Result],
                 check: Callable[..., None] = no_arguments,
                 outputs: Callable[..., Tensor] = elementwise,
                 serves: Callable[..., bool] = always):
        super().__init__(name, reference, check, outputs, serves)

    def __call__(self, x: Tensor, xt: Optional[Tensor], *args) -> Result:
        """``(y, yt)`` on the backend the registry picks for x's device."""
        self.check(x, *args)
        return current_backend(x.device).kernel_op(self, x, xt, *args)

    def on(self, d: Dual, *args) -> Dual:
        """The op on a Dual: its primal and slots through ``self``, its directions kept."""
        return d.with_tangents(*self(d.primal, d.tangents, *args))

    def fake(self, x: Tensor, xt: Tensor, *args) -> Result:
        """The op on fake tensors: its contract checked, its outputs' shapes, dtypes and
        layout."""
        check_stacked_tangent(x, xt)
        self.check(x, *args)
        y = self.outputs(x, *args).contiguous(memory_format=kernel_format(x))
        return torch.empty_like(y), empty_slots(xt.shape[0], y, xt.dtype)

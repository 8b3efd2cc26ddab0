"""An elementwise op that the native backend runs as one compiled kernel: declared once, beside
its rule, with everything the backends need.

``KernelOp(name, reference, check)``: ``name`` is the op of ``torch.ops.fgkernels`` (its schema
in csrc/fgkernels.cpp, its kernels in csrc/cpu/ and csrc/cuda/, each registered for its device)
that maps ``(x, xt, *args)`` to ``(y, yt)``: the primal output shaped like x and the stacked
tangent ``(T, *x.shape)``, in the kernels' layout (``dual.layout.kernel_format``). ``reference``
computes the same with torch's ops (``xt`` None when zero): the reference backend runs it, and
the native one wherever the library has no kernel for the device. ``check(x, *args)`` is the
op's argument contract (``torch._check``, messages naming the argument): run in front of every
call, and, with the tangents' stacking contract, as the op's fake implementation, so that the
op traces under ``torch.compile`` and refuses there what it refuses eagerly.

Adding an elementwise native op is then its rule module's ``KernelOp``, the schema, and a
kernel file per device (``backends/README.md``).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from ..dual.layout import empty_slots, kernel_format
from . import current_backend, native
from .base import check_stacked_tangent

Tensor = torch.Tensor
Result = tuple[Tensor, Optional[Tensor]]


def no_arguments(x: Tensor) -> None:
    """The check of an op with no argument besides its input."""


class KernelOp:
    """An elementwise dual op with a compiled kernel (see the module's docstring)."""

    def __init__(self, name: str, reference: Callable[..., Result],
                 check: Callable[..., None] = no_arguments):
        self.name = name
        self.reference = reference
        self.check = check
        # The device types the compiled library has a kernel of this op for; filled when it
        # loads (``native.on_load``), so that a traced call reads it without asking torch.
        self.devices: frozenset = frozenset()
        native.on_load(self._register)

    def __call__(self, x: Tensor, xt: Optional[Tensor], *args) -> Result:
        """``(y, yt)`` on the backend the registry picks for x's device."""
        self.check(x, *args)
        return current_backend(x.device).kernel_op(self, x, xt, *args)

    def kernel(self, device: torch.device) -> Optional[Callable[..., Result]]:
        """The compiled op when the library has a kernel of it for ``device``, else None."""
        return getattr(torch.ops.fgkernels, self.name) if device.type in self.devices else None

    def fake(self, x: Tensor, xt: Tensor, *args) -> Result:
        """The op on fake tensors: its contract checked, its outputs' shapes, dtypes and
        layout."""
        check_stacked_tangent(x, xt)
        self.check(x, *args)
        x = x.contiguous(memory_format=kernel_format(x))
        return torch.empty_like(x), empty_slots(xt.shape[0], x, xt.dtype)

    def _register(self) -> None:
        if not hasattr(torch.ops.fgkernels, self.name):  # a library built before the op
            return
        qualname = f"fgkernels::{self.name}"
        self.devices = frozenset(d for d in ("cpu", "cuda")
                                 if torch._C._dispatch_has_kernel_for_dispatch_key(
                                     qualname, d.upper()))
        torch.library.register_fake(qualname)(self.fake)


"""What an op declared beside its rule shares, whatever its kind (``kernel_op.KernelOp``, an op
of one input; ``layer_op.LayerOp``, a layer with parameters): the compiled op it names in
``torch.ops.fgkernels``, its reference in torch's ops, its argument contract, its fake's primal
output, which calls its kernel serves, and the devices the loaded library has a kernel of it for
(read once, when the library loads, so that a traced call reads an attribute)."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from . import native

Tensor = torch.Tensor


def always(x: Tensor, *args) -> bool:
    """A kernel that serves every call."""
    return True


class CompiledOp:
    """The compiled op ``name`` and what serves in its place (see the module's docstring); a
    kind of op adds how it is called and its fake."""

    def __init__(self, name: str, reference: Callable, check: Callable[..., None],
                 outputs: Callable[..., Tensor], serves: Callable[..., bool] = always):
        self.name = name
        self.reference = reference
        self.check = check
        self.outputs = outputs
        self.serves = serves
        self.devices: frozenset = frozenset()
        native.on_load(self._register)

    def kernel(self, x: Tensor, *args) -> Optional[Callable]:
        """The compiled op when the library has a kernel of it for x's device that serves
        this call (``serves(x, *args)``), else None."""
        if x.device.type not in self.devices or not self.serves(x, *args):
            return None
        return getattr(torch.ops.fgkernels, self.name)

    def fake(self, *args):
        """The op on fake tensors (each kind of op gives its own)."""
        raise NotImplementedError

    def _register(self) -> None:
        self.devices = native.register_fake(self.name, self.fake)

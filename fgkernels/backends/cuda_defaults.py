"""Which backend serves each fused op on CUDA when none is forced (``use_backend``,
``FGKERNELS_BACKEND``): the table ``CUDA_DEFAULTS``.

Every entry is ``"native"`` (cuDNN convolutions and the CUDA batch-norm kernels) until a GPU
run of the benchmarks (``scripts/gpu_check.sh bench``, recorded in
``benchmarks/RESULTS-gpu.md``) measures the Triton kernel faster for that op; an entry then
names ``"triton"``. Ops not in the table (linear, ReLU, pooling, a batch norm on its own) are
the native backend's.
"""
from __future__ import annotations

from typing import Callable, Optional

from ..dual.slots import SlotPlan
from . import bn_math
from .base import Backend, ConvArgs, Delegating, LayerParams, Opt, Result, Tensor
from .fused import InPlaceConvBatchNorm

CUDA_DEFAULTS = {
    "conv2d": "native",             # the dual convolution alone
    "conv2d_batch_norm": "native",  # a Conv→BN's convolution and its batch statistics
    "batch_norm_apply": "native",   # the batch norm (+ReLU) applied in place after it
}


class PerOpBackend(InPlaceConvBatchNorm, Delegating):
    """The ops of ``table`` (op -> backend) from the backends it names, the rest from
    ``fallback``."""

    name = "per-op"

    def __init__(self, table: dict[str, Backend], fallback: Backend):
        self.table = table
        self.fallback = fallback

    def _of(self, op: str) -> Backend:
        return self.table.get(op, self.fallback)

    def conv2d(self, x: Tensor, xt: Opt, p: LayerParams, plan: SlotPlan, conv: ConvArgs,
               y: Opt = None) -> Result:
        return self._of("conv2d").conv2d(x, xt, p, plan, conv, y)

    def conv_for_batch_norm(self, x, xt, conv_p, conv_plan, conv, training, conv_y):
        return self._of("conv2d_batch_norm").conv_for_batch_norm(x, xt, conv_p, conv_plan,
                                                                 conv, training, conv_y)

    def apply_in_place(self, h, ht, c: bn_math.BNCoefficients, relu: bool) -> None:
        self._of("batch_norm_apply").apply_in_place(h, ht, c, relu)


def cuda_default(load: Callable[[str], Optional[Backend]],
                 table: Optional[dict[str, str]] = None) -> Optional[Backend]:
    """The backend for CUDA tensors: the native one where ``table`` (``CUDA_DEFAULTS``) names
    it for every op, else a ``PerOpBackend``; None without the native backend. An entry whose
    backend cannot run here (``load`` gives None) falls back on the native one."""
    native = load("native")
    if native is None:
        return None
    chosen = {op: load(name) for op, name in (table or CUDA_DEFAULTS).items()
              if name != "native"}
    chosen = {op: backend for op, backend in chosen.items() if backend is not None}
    return PerOpBackend(chosen, native) if chosen else native

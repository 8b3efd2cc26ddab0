"""The implementations a benchmark compares: fgkernels on each backend against PyTorch's
forward-mode AD (torch.autograd.forward_ad, torch.func.jvp), the primal alone, and backprop."""
from __future__ import annotations

import contextlib

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.func import functional_call

import fgkernels
from fgkernels import Dual

BASELINES = ("forward_ad", "func_jvp", "primal", "backprop")


def fgkernels_providers() -> list[str]:
    """One provider per backend that runs on this machine's benchmark device."""
    backends = fgkernels.available_backends()
    if not torch.cuda.is_available():
        backends = [b for b in backends if b != "triton"]  # the interpreter is no timing
    return [f"fgkernels-{b}" for b in backends]


def backend_of(provider: str):
    """The ``use_backend`` context of a fgkernels provider (a null context otherwise)."""
    if provider.startswith("fgkernels-"):
        return fgkernels.use_backend(provider.split("-", 1)[1])
    return contextlib.nullcontext()


def jvp_forward_ad(fn, primals, tangents):
    """(fn(*primals), its JVP) by torch.autograd.forward_ad."""
    with fwAD.dual_level():
        out = fn(*[fwAD.make_dual(p, t) for p, t in zip(primals, tangents)])
        return fwAD.unpack_dual(out)


def dual_call(fn, primals, tangents):
    """fn on Duals, returning the output Dual."""
    return fn(*[Dual(p, t) for p, t in zip(primals, tangents)])


def loss_jvp_forward_ad(model, params, tangents, x, y):
    """(cross-entropy loss of ``model`` with ``params``, its JVP along ``tangents``) by
    torch.autograd.forward_ad, the model's buffers (batch-norm running statistics) updated."""
    with fwAD.dual_level():
        duals = {n: fwAD.make_dual(p, tangents[n]) for n, p in params.items()}
        out = functional_call(model, {**duals, **dict(model.named_buffers())}, (x,))
        return fwAD.unpack_dual(F.cross_entropy(out, y))

"""``fgkernels.compile``: a model's dual pass compiled by ``torch.compile``, converted or not."""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..backends import current_backend
from ..dual.tangents import ParameterTangents, _compiled_pass, _holds_dual
from ..dual.value import Dual


def compile(module: nn.Module, **options: Any) -> Callable:
    """``module`` compiled by ``torch.compile(module, **options)``, whose calls with a Dual
    among their positional inputs run the dual pass compiled: every op that meets a parameter
    with a tangent takes its Dual (``ParameterTangents``), so tied, listed and attention
    parameters and ops on a parameter alone carry their tangents, converted model or not. Other
    calls run the compiled plain forward. ``dynamic=True`` among the options compiles once for
    every batch size."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"fgkernels.compile: expected an nn.Module, got {type(module).__name__}")
    compiled = torch.compile(module, **options)

    @functools.wraps(module.forward)
    def run(*args, **kwargs):
        if not _holds_dual(args):
            return compiled(*args, **kwargs)
        # The backend is chosen before the trace, not loaded inside it: a trace that loads it
        # is recompiled at the next call, which finds it loaded.
        for a in pytree.tree_leaves(args, is_leaf=lambda v: isinstance(v, Dual)):
            if isinstance(a, Dual):
                current_backend(a.device)
        _compiled_pass[0] = True
        try:
            with ParameterTangents():
                return compiled(*args, **kwargs)
        finally:
            _compiled_pass[0] = False

    run.compiled = compiled
    return run

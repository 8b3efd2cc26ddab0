"""``fgkernels.compile``: a model's dual pass compiled by ``torch.compile``, converted or not."""
from __future__ import annotations

import functools
import types
import weakref
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
    every batch size. Each compiled model keeps its graphs apart from every other model's."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"fgkernels.compile: expected an nn.Module, got {type(module).__name__}")
    compiled = torch.compile(_entry_point(module), **options)

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


# module -> the code object of its entry point: Dynamo's graphs for it hang on that code object
_entry_codes: weakref.WeakKeyDictionary[nn.Module, types.CodeType] = weakref.WeakKeyDictionary()


def _entry_point(module: nn.Module) -> Callable:
    """A function that calls ``module``, with a code object of the module's own. Dynamo keeps
    a code object's compiled graphs in one list, recompiling at most ``recompile_limit`` (8)
    times for it, and compiles the first frame it enters that is not torch's: compiled as
    itself, every converted model whose top module is a twin would enter at the twins' one
    ``__call__``, so the ninth model compiled in a process would run eagerly, and a guard
    filter that skips the guards on modules could run one model's graph on another. The same
    module compiled again gets the same code object, and so finds the graphs it has."""
    def call(*args, **kwargs):
        return module(*args, **kwargs)

    # Every closure of one ``def`` shares its code object: a copy, kept per module, makes this
    # one the module's own.
    code = _entry_codes.get(module)
    if code is None:
        code = _entry_codes[module] = call.__code__.replace()
    return types.FunctionType(code, call.__globals__, call.__name__, call.__defaults__,
                              call.__closure__)

"""``fgkernels.compile``: a model's dual pass compiled by ``torch.compile``, converted or not."""
from __future__ import annotations

import functools
import itertools
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
    every batch size. Each compiled model keeps its graphs, and the input sizes they were
    compiled for, apart from every other model's; compiling it again with the same options
    reuses its graphs (other options compile anew, counting against the same recompile limit).
    Torch compiles the call of ``module`` itself, its hooks included, as it does for a model's
    inner modules (``torch.compile(module)`` calls the top module's hooks outside the graph)."""
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


# id(module) -> the code object of its entry point, on which Dynamo hangs the module's graphs
# (by id, not by the module: a module class may define ``__eq__`` and ``__hash__`` as it likes)
_entry_codes: dict[int, types.CodeType] = {}
_entry_numbers = itertools.count()


def _entry_point(module: nn.Module) -> Callable:
    """A function that calls ``module``, with a code object of the module's own. Dynamo keeps
    a code object's compiled graphs in one list, recompiling at most ``recompile_limit`` (8)
    times for it, and compiles the first frame it enters that is not torch's: compiled as
    itself, every converted model whose top module is a twin would enter at the twins' one
    ``__call__``, so the ninth model compiled in a process would run eagerly, and a guard
    filter that skips the guards on modules could run one model's graph on another. The same
    module compiled again gets the same code object, and so finds the graphs it has. The code
    object's name is the module's own too (``compiled_ResNet_0``, ...), as Dynamo's record of
    the input sizes it has seen is keyed by name: another model's batch size would otherwise
    make this one's batch dimension dynamic."""
    def call(*args, **kwargs):
        return module(*args, **kwargs)

    # Every closure of one ``def`` shares its code object: a copy, kept per module, makes this
    # one the module's own.
    key = id(module)
    code = _entry_codes.get(key)
    if code is None:
        name = f"compiled_{type(module).__name__}_{next(_entry_numbers)}"
        code = _entry_codes[key] = call.__code__.replace(co_name=name, co_qualname=name)
        weakref.finalize(module, _entry_codes.pop, key, None)
    return types.FunctionType(code, call.__globals__, code.co_name, call.__defaults__,
                              call.__closure__)

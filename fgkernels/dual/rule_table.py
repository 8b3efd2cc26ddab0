"""Which rule a torch function runs on Duals: the rules the modules of ``fgkernels.rules``
register (``implements``), those of other libraries' ops, found by the op's name
(``implements_library_op``), and the fallback for every other function
(``implements_fallback``). ``Dual.__torch_function__`` looks them up here."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .dynamo import when_dynamo_loads

# torch function -> rule; filled by the modules of fgkernels.rules with the ops that have a JVP
# rule, and by rules.indexing with the rule of Dual.__setitem__.
RULES: dict[Callable, Callable] = {}
# qualified name of an op of another library ("torchvision::roi_align") -> rule: such an op
# exists only once its library is loaded, so its rule is found by the op's name.
LIBRARY_RULES: dict[str, Callable] = {}
# The rule of every torch function without one of its own, installed by fgkernels.rules.fallback.
fallback_rule: Optional[Callable] = None


# The ruled torch functions that are Python wrappers (``Tensor.__rsub__``, ``__rdiv__``,
# ``__rmatmul__``): under torch.compile, Dynamo hands them to __torch_function__ for ``d - t``
# (a Dual left of a plain tensor) and traces a dict lookup keyed by them as a miss, whose guard
# then fails; they are found by identity while compiling.
_WRAPPED: list[Callable] = []


def implements(*funcs: Callable) -> Callable:
    """Register the decorated function as the Dual rule of each torch function in ``funcs``."""

    def register(rule: Callable) -> Callable:
        for f in funcs:
            RULES[f] = rule
            if hasattr(f, "__wrapped__") and f not in _WRAPPED:
                _WRAPPED.append(f)
        return rule

    return register


def implements_library_op(*names: str) -> Callable:
    """Register the decorated function as the Dual rule of each op of another library that
    ``names`` qualify (``"torchvision::roi_align"``: the op and each of its overloads), whether
    that library is loaded yet or not."""

    def register(rule: Callable) -> Callable:
        for name in names:
            LIBRARY_RULES[name] = rule
        return rule

    return register


def library_op_name(func: Callable) -> Optional[str]:
    """The qualified name of an op that a library other than torch registered
    (``torch.library``: a custom op, torchvision's, an extension's): ``'torchvision::roi_align'``
    for the op and each of its overloads; None for any other function. A constant to Dynamo
    (marked when it loads)."""
    if isinstance(func, torch._ops.OpOverload):
        name = func._schema.name
    elif isinstance(func, torch._ops.OpOverloadPacket):
        name = func._qualified_op_name
    else:
        return None
    return None if name.startswith(("aten::", "prims::")) else name


when_dynamo_loads(lambda: torch.compiler.assume_constant_result(library_op_name))


def rule_while_compiling(func: Callable) -> Optional[Callable]:
    """The rule registered for ``func``, or None, as Dynamo traces it (see ``_WRAPPED``)."""
    for f in _WRAPPED:
        if func is f:
            return RULES[f]
    return RULES.get(func)


def implements_fallback(rule: Callable) -> Callable:
    """Register the decorated ``rule(func, args, kwargs)`` as the rule of every torch function
    that has none of its own (and of every call with ``out=``)."""
    global fallback_rule
    fallback_rule = rule
    return rule


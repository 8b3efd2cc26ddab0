"""Whether this thread's code runs inside a rule: a rule's own torch ops act on primals and
tangents, and what hands parameters out as Duals (a lifted tensor's class, the compiled pass's
function mode) lets them be; a model's own computation that a rule calls (a parametrization)
leaves the rule for its length."""
from __future__ import annotations

import threading


class _RuleDepth(threading.local):
    """How deep this thread's running code is inside fgkernels' rules. Per thread: another
    thread's rule must not let this thread's parameters pass as plain tensors. Dynamo reads
    it and guards on it; each thread's first use sets the count on the instance, so the guards
    a trace builds in a new thread hold after the trace's own code ran there."""

    def __init__(self):
        self.depth = 0
        self.set_aside: list[int] = []  # the depths ``leave_rule`` set aside, innermost last


_rule_depth = _RuleDepth()


class _InRule:
    """The context ``in_rule`` returns, entered on every Dual op and module call: a plain class
    rather than a generator context (less to enter; Dynamo traces a fresh instance of it)."""

    __slots__ = ()

    def __enter__(self) -> None:
        _rule_depth.depth += 1

    def __exit__(self, *exc) -> bool:
        _rule_depth.depth -= 1
        return False


def in_rule() -> _InRule:
    """Marks code that computes a rule: its torch ops act on primals and tangents, and a torch
    function mode that hands out parameters as Duals (``function_mode.ParameterTangents``) lets
    them be."""
    return _InRule()


def inside_rule() -> bool:
    """True while a rule is computed (see ``in_rule``), except inside model code that
    ``leave_rule`` runs as the model's own (a parametrization a twin's rule reads)."""
    return _rule_depth.depth > 0


def leave_rule() -> None:
    """Run what follows, up to the matching ``return_to_rule``, as code outside any rule: a
    model's own computation that a rule calls (a parametrization computing the weight a twin
    reads), whose ops take the tangents of the parameters they meet."""
    _rule_depth.set_aside.append(_rule_depth.depth)
    _rule_depth.depth = 0


def return_to_rule() -> None:
    """Back inside the rule that ``leave_rule`` left."""
    _rule_depth.depth = _rule_depth.set_aside.pop()


def rule_state() -> tuple[int, int]:
    """This thread's rule depth and how many depths ``leave_rule`` set aside."""
    return _rule_depth.depth, len(_rule_depth.set_aside)


def restore_rule_state(state: tuple[int, int]) -> None:
    """Back to a ``rule_state``: a KeyboardInterrupt (which runs no module hook) inside code
    that left a rule does not return to it."""
    _rule_depth.depth = state[0]
    del _rule_depth.set_aside[state[1]:]

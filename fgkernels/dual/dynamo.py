"""What Dynamo needs to trace Duals, given to it when Dynamo loads, not before.

Importing Dynamo takes about a second, as long as the rest of ``import torch``, and most users of
fgkernels never compile: so fgkernels does not import it. What it tells Dynamo is registered
with ``when_dynamo_loads``: run at once where Dynamo is already loaded, else by an import hook
right after the ``torch._dynamo`` package has loaded (which ``torch.compile`` does before it
traces anything).
"""
from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import inspect
import operator
import sys
from types import ModuleType
from typing import Callable

import torch
from torch._C._dynamo.eval_frame import _FrameAction, _FrameExecStrategy, set_code_exec_strategy

DYNAMO = "torch._dynamo"
# The Dynamo module whose table maps a builtin operator to a tensor's reflected method.
BUILTIN_TABLES = "torch._dynamo.variables.builtin"

_pending: list[Callable[[], None]] = []


def when_dynamo_loads(callback: Callable[[], None]) -> None:
    """Run ``callback`` once Dynamo is loaded: now if it is, else right after it loads."""
    if DYNAMO in sys.modules:
        callback()
        return
    _pending.append(callback)
    if _hook not in sys.meta_path:
        sys.meta_path.insert(0, _hook)


def eager_between_graphs(fn: Callable) -> Callable:
    """``fn`` (a ``__torch_function__``), which torch.compile traces inline within a compiled
    region, made to run as it is, with all it calls, where a compiled model's Python runs
    eagerly between graphs (past a graph break). Dynamo would otherwise compile it there as a
    frame of its own, guarding on nothing of the torch function it is handed (a Tensor method
    passed as an argument): in a loop past a graph break the graph of its first method served
    every later one (``h.exp()`` answered with ``h.tanh()``)."""
    set_code_exec_strategy(fn.__code__, _FrameExecStrategy(_FrameAction.SKIP, _FrameAction.SKIP))
    return fn


def eager_under_compile(fn: Callable) -> Callable:
    """``fn``, which torch.compile runs eagerly between graphs (``torch.compiler.disable``, a
    graph break around the call), made so without loading Dynamo: the disabled function is
    made when Dynamo loads, and until then (when nothing can compile) ``fn`` runs as it is."""
    target = [fn]
    when_dynamo_loads(lambda: target.__setitem__(0, torch.compiler.disable(fn)))

    @functools.wraps(fn)
    def call(*args, **kwargs):
        return target[0](*args, **kwargs)
    return call


def _run_pending() -> None:
    while _pending:
        _pending.pop(0)()


class _ThenRun(importlib.abc.Loader):
    """A module's own loader, followed by the pending callbacks."""

    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._loader.exec_module(module)
        _run_pending()

    def __getattr__(self, name: str):  # get_source, is_package, ...: the loader's own
        return getattr(self._loader, name)


class _OnLoad(importlib.abc.MetaPathFinder):
    """Finds the ``torch._dynamo`` package as the other finders do, its loader wrapped in
    ``_ThenRun``; takes itself off ``sys.meta_path`` at once (one package, loaded once)."""

    def find_spec(self, name, path, target=None):
        if name != DYNAMO:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _ThenRun(spec.loader)
        return spec


_hook = _OnLoad()


def add_reflected_matmul() -> None:
    """Dynamo traces ``d @ t`` (a Dual, not a tensor, left of a tensor) as the tensor's
    reflected method with the operands swapped, as it does ``d - t``; but it has no reflected
    entry for ``@`` and swaps the operands of ``Tensor.matmul`` itself, tracing ``t @ d``. Give
    it the reflected entry (``Tensor.__rmatmul__(t, d)`` is ``d @ t``). A torch whose Dynamo
    lays this out otherwise is left as it is (tests/nn/test_compile.py checks the operators)."""
    table = getattr(sys.modules.get(BUILTIN_TABLES), "BUILTIN_TO_TENSOR_RFN_MAP", None)
    if isinstance(table, dict):
        # Dynamo fills the table lazily and never with ``@`` (it skips it): the entry stays.
        table.setdefault(operator.matmul, torch.Tensor.__rmatmul__)


def add_matmul_of_objects() -> None:
    """Dynamo traces ``a * b`` between two objects that are not tensors (two Duals) through
    their ``__mul__``, but ``a @ b`` through nothing: its table of the operators it hands to
    their dunder methods (``BuiltinVariable._binops``, cached) names ``@`` only in a comment,
    so ``q @ k.transpose(-2, -1)`` in an attention written out stopped the trace. Give it the
    entry, before Dynamo builds its handlers from the table. A torch whose Dynamo has no such
    table, or has the entry, is left as it is (tests/nn/test_compile.py checks ``@``)."""
    builtin = getattr(sys.modules.get(BUILTIN_TABLES), "BuiltinVariable", None)
    binops = getattr(builtin, "_binops", None)
    table = binops() if callable(binops) else None
    if isinstance(table, dict):
        table.setdefault(operator.matmul,
                         (["__matmul__", "__rmatmul__", "__imatmul__"], operator.imatmul))


# The Tensor properties whose value is a tensor computed from the tensor (not its metadata):
# read through a torch function mode in eager, but traced by Dynamo straight into the graph.
TENSOR_VALUED_PROPERTIES = frozenset({"T", "mT", "H", "mH", "real", "imag"})


def route_tensor_properties_through_modes() -> None:
    """Dynamo traces ``p.T`` (``mT``, ``H``, ``mH``, ``real``, ``imag``) on a plain tensor
    straight into the graph, past the torch function modes on the stack, which eager torch
    hands the read to. Under the compiled pass's mode (``ParameterTangents``) the transpose of
    a parameter with a tangent, ``x @ self.weight.T`` (a tied embedding's, say), then lost its
    tangent without a word. While a mode that asks for them (``traces_tensor_properties``)
    is on the stack, route these reads to the modes, as eager torch does and as Dynamo does for
    a tensor subclass's; other libraries' modes are traced as before. A torch whose Dynamo lays
    this out otherwise is left as it is (tests/nn/test_compile.py checks the properties)."""
    tensor = sys.modules.get("torch._dynamo.variables.tensor")
    torch_function = sys.modules.get("torch._dynamo.variables.torch_function")
    variable = getattr(tensor, "TensorVariable", None)
    dispatch = getattr(torch_function, "dispatch_torch_function", None)
    can_dispatch = getattr(torch_function, "can_dispatch_torch_function", None)
    # the attribute read's method: ``var_getattr``, ``tp_getattro_impl`` from torch 2.14
    method = next((m for m in ("var_getattr", "tp_getattro_impl") if hasattr(variable, m)), None)
    if method is None or dispatch is None or can_dispatch is None \
            or getattr(getattr(variable, method), "routes_properties", False):
        return
    traced = getattr(variable, method)

    def var_getattr(self, tx, name):
        if name in TENSOR_VALUED_PROPERTIES and type(self) is variable \
                and _mode_asks(tx) \
                and can_dispatch(tx, [self], {}):
            from torch._dynamo.variables.base import VariableTracker
            getter = VariableTracker.build(tx, getattr(torch.Tensor, name).__get__)
            return dispatch(tx, getter, [self], {})
        return traced(self, tx, name)

    var_getattr.routes_properties = True
    setattr(variable, method, var_getattr)


def route_rows_and_abs_through_modes() -> None:
    """The same for two more reads Dynamo traces past the modes: the rows of a tensor iterated
    or unpacked (``for row in self.weight``, ``f(*self.weight)``), and Python's ``abs(p)``.
    Eager torch hands ``__iter__`` and ``__abs__`` to the modes; Dynamo put plain rows and a
    plain ``abs`` in the graph, and a parameter's tangent was lost there too. Under a mode that
    asks for them, the rows are taken by indexing and ``abs`` is ``torch.abs``, both of which
    Dynamo hands to the modes."""
    tensor = sys.modules.get("torch._dynamo.variables.tensor")
    builtin = getattr(sys.modules.get(BUILTIN_TABLES), "BuiltinVariable", None)
    variable = getattr(tensor, "TensorVariable", None)
    if not hasattr(variable, "unpack_var_sequence") or not hasattr(builtin, "call_abs") \
            or getattr(variable.unpack_var_sequence, "routes_rows", False):
        return
    unpack, builtin_abs = variable.unpack_var_sequence, builtin.call_abs

    def unpack_var_sequence(self, tx, idxes=None):
        rows = unpack(self, tx, idxes)  # plain rows, and torch's checks of the unpacking
        if type(self) is not variable or not _mode_asks(tx):
            return rows
        from torch._dynamo.variables.base import VariableTracker
        getitem = builtin(operator.getitem)
        return [getitem.call_function(tx, [self, VariableTracker.build(tx, i)], {})
                for i in (idxes if idxes is not None else range(len(rows)))]

    def call_abs(self, tx, arg):
        if type(arg) is variable and _mode_asks(tx):
            from torch._dynamo.variables.base import VariableTracker
            return VariableTracker.build(tx, torch.abs).call_function(tx, [arg], {})
        return builtin_abs(self, tx, arg)

    unpack_var_sequence.routes_rows = True
    variable.unpack_var_sequence = unpack_var_sequence
    builtin.call_abs = call_abs


def route_private_functions_through_modes() -> None:
    """Dynamo hands a torch function call to the torch function modes only where the function
    is among ``torch.overrides.get_overridable_functions()``, which leaves out torch's private
    functions; eager torch hands them over as any other. ``torch._weight_norm``, which
    ``torch.nn.utils.parametrizations.weight_norm`` computes a weight by, would go into the
    graph past the compiled pass's mode, on the parameters as plain tensors, losing their
    tangents. Under a mode that asks for them, every private function outside
    ``torch.overrides.get_ignored_functions()`` is handed to the modes, as eager torch hands
    its private operators; the mode passes on the calls that meet no tangent."""
    torch_variables = sys.modules.get("torch._dynamo.variables.torch")
    variable = getattr(torch_variables, "TorchInGraphFunctionVariable", None)
    torch_function = sys.modules.get("torch._dynamo.variables.torch_function")
    can_dispatch = getattr(torch_function, "can_dispatch_torch_function", None)
    enabled = getattr(variable, "torch_function_override_enabled", None)
    if enabled is None or can_dispatch is None or getattr(enabled, "routes_private", False):
        return
    ignored = torch.overrides.get_ignored_functions()

    def torch_function_override_enabled(self, tx, args, kwargs):
        if enabled(self, tx, args, kwargs):
            return True
        func = self.get_function()
        return getattr(func, "__name__", "").startswith("_") and func not in ignored \
            and _mode_asks(tx) and can_dispatch(tx, args, kwargs)

    torch_function_override_enabled.routes_private = True
    variable.torch_function_override_enabled = torch_function_override_enabled


def _checkpoint_options() -> frozenset:
    """torch.utils.checkpoint.checkpoint's own keywords, as its signature in this torch names
    them (the rest are the checkpointed function's)."""
    from torch.utils.checkpoint import checkpoint
    names = set(inspect.signature(checkpoint).parameters) - {"function", "args", "kwargs"}
    return frozenset(names | {"preserve_rng_state"})  # (read from **kwargs before torch 2.14)


def trace_checkpoints_as_calls() -> None:
    """Dynamo traces ``torch.utils.checkpoint.checkpoint(fn, *args)`` as a higher-order op
    whose body it traces apart, past the torch function modes: the parameters a checkpointed
    block reads would lose their tangents. Under a mode that asks for it, the call is traced as
    ``fn(*args)``, as eager runs it on Duals: a forward pass has nothing to recompute."""
    higher_order = sys.modules.get("torch._dynamo.variables.higher_order_ops")
    variable = getattr(higher_order, "CheckpointHigherOrderVariable", None)
    traced = getattr(variable, "call_function", None)
    if traced is None or getattr(traced, "traces_calls", False):
        return
    options = _checkpoint_options()

    def call_function(self, tx, args, kwargs):
        if not (_mode_asks(tx) and args):
            return traced(self, tx, args, kwargs)
        kwargs = {k: v for k, v in kwargs.items() if k not in options}
        return args[0].call_function(tx, list(args[1:]), kwargs)

    call_function.traces_calls = True
    variable.call_function = call_function


def _mode_asks(tx) -> bool:
    """True while a torch function mode that asks for the reads Dynamo traces past the modes
    (``traces_tensor_properties``) is on the stack of the trace."""
    return any(getattr(type(getattr(m, "value", None)), "traces_tensor_properties", False)
               for m in tx.symbolic_torch_function_state.mode_stack)

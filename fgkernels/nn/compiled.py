"""``fgkernels.compile``: a model's dual pass compiled by ``torch.compile``, converted or not."""
from __future__ import annotations

import contextlib
import functools
import itertools
import types
import weakref
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils import _pytree as pytree

from ..backends import current_backend
from ..dual.function_mode import ParameterTangents, compiled_pass
from ..dual.module_state import holds_dual
from ..dual.passes import hooks, is_dual_pass_root, lifted_set_aside, stores_put_back
from ..dual.rule_state import in_rule, restore_rule_state, rule_state
from ..dual.tangent_store import check_tangents_still_fit
from ..dual.value import Dual, census, refuse_autocast
from ..rules.functions import defines_jvp


def compile(module: nn.Module, **options: Any) -> Callable:
    """``module`` compiled by ``torch.compile(module, **options)``, whose calls with a Dual
    among their positional inputs (and all its calls inside ``fgkernels.dual_pass(module)``)
    run the dual pass compiled: every op that meets a parameter with a tangent takes its Dual
    (``ParameterTangents``), so tied, listed and attention parameters and ops on a parameter
    alone carry their tangents, converted model or not, as do parametrized weights
    (``torch._weight_norm`` included) and blocks under ``torch.utils.checkpoint``, traced into
    the graph. Other calls run the compiled plain
    forward. ``dynamic=True`` among the options compiles once for every batch size. A dual
    call traces torch's recurrent layers (``nn.LSTM``, ``nn.GRU``, ``nn.RNN``) into its graph,
    unrolled by their rules, where Dynamo's default (``torch._dynamo.config.allow_rnn`` off)
    would break the graph at each; a plain call leaves them to that setting, as
    ``torch.compile`` does.

    Each compiled model keeps its graphs, and the input sizes they were compiled for, apart
    from every other model's. Compiling it again reuses any of its graphs whose guards pass for
    the new options' backend, but never across guard filters (``options={"guard_filter_fn":
    ...}``): a graph compiled with one filter, or none, is not taken under another. Torch
    compiles the call of ``module`` itself, its hooks included, as it does for inner modules
    (``torch.compile(module)`` calls the top module's hooks outside the graph)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"fgkernels.compile: expected an nn.Module, got {type(module).__name__}")
    guard_filter = (options.get("options") or {}).get("guard_filter_fn")
    _stores_dispatch_torch_function()
    _functions_with_jvp_run_eagerly()
    options = _graphs_run_as_rules(options)
    compiled = torch.compile(_entry_point(module, guard_filter), **options)
    # Dynamo breaks the graph at torch's recurrent layers unless allow_rnn is set; in a dual
    # pass their rules unroll the cells into ops it traces.
    recurrent = any(isinstance(m, nn.RNNBase) for m in module.modules())
    bound = []  # the modules set_tangents bound (check_tangents_still_fit)

    @functools.wraps(module.forward)
    def run(*args, **kwargs):
        if not (holds_dual(args) or is_dual_pass_root(module)):
            try:
                with lifted_set_aside():
                    return compiled(*args, **kwargs)
            finally:
                hooks.sync()  # as below
        # The backend is chosen before the trace, not loaded inside it: a trace that loads it
        # is recompiled at the next call, which finds it loaded.
        if torch._C._is_any_autocast_enabled():  # (refused before Dynamo traces the refusal)
            refuse_autocast(args)
        for a in pytree.tree_leaves(args, is_leaf=lambda v: isinstance(v, Dual)):
            if isinstance(a, Dual):
                current_backend(a.device)
        check_tangents_still_fit(module, bound)  # (an eager pass's hooks check it)
        rules = rule_state()
        try:
            with compiled_pass.run(module) as temporaries, ParameterTangents(), \
                    lifted_set_aside(), _autograd_state_restored_on_error(), \
                    _rnn_traced() if recurrent else contextlib.nullcontext(), \
                    stores_put_back(module):
                return _counted(temporaries.with_duals(compiled(*args, **kwargs)))
        finally:
            restore_rule_state(rules)  # (a parametrization an interrupt cut short left one)
            hooks.sync()  # (one the collector asked for while compiling was put off)

    run.compiled = compiled
    # torch.compile's public answer to "compiled with what?": the wrapped backend's settings
    # (Inductor's patched config), not those of the wrapper torch puts around any backend given
    # as a callable, which has none.
    run.get_compiler_config = compiled.get_compiler_config = \
        options["backend"].compiler_config
    return run


@contextlib.contextmanager
def _autograd_state_restored_on_error():
    """Put back the autograd state a compiled call that raises leaves behind (Dynamo does not
    unwind the call's frames): the grad mode a ``torch.no_grad()`` inside it set (the
    fallback's), and the forward-AD level its compiled ``torch.func.jvp`` opened (every later
    forward-mode computation in the process, eager passes included, was refused as nested; a
    level the caller opened before is the caller's)."""
    grad_enabled = torch.is_grad_enabled()
    caller_level = torch.autograd.forward_ad._current_level
    try:
        yield
    except BaseException:
        torch.set_grad_enabled(grad_enabled)
        if caller_level == -1:
            try:
                torch._C._exit_dual_level(level=0)
            except RuntimeError:  # none was left open
                pass
        raise


def _counted(output):
    """``output`` with each Dual in it counted (``value.census``), as an eager op's output is:
    Dynamo makes the Duals a compiled call returns without counting them."""
    for v in pytree.tree_leaves(output, is_leaf=lambda v: isinstance(v, Dual)):
        if isinstance(v, Dual) and not getattr(v, "_counted", False):
            v._counted = census.count()
    return output


def _rnn_traced():
    """Dynamo traces ``nn.RNN``, ``nn.GRU`` and ``nn.LSTM`` within this context."""
    return torch._dynamo.config.patch(allow_rnn=True)


def _stores_dispatch_torch_function() -> None:
    """Make Dynamo trace ``t[key] = v`` on a tensor ``t`` through ``__torch_function__``, as
    ``t.__setitem__(key, v)`` is traced. Torch 2.14's Dynamo puts the store straight into the
    graph, past the ``__torch_function__`` of ``v`` and of the active mode: a Dual written
    into a plain tensor (``out[:, 1:] = d``) failed to trace ("Failed to convert args/kwargs
    to proxy"), and a store into a tensor that a compiled pass hands out as a Dual
    (``ParameterTangents``) would skip its tangent. Such a store now goes the method's way,
    as torch 2.13 traced every store; any other store, and a torch whose Dynamo traces stores
    as methods, are left as they were. Done once, at the first ``fgkernels.compile``."""
    try:
        from torch._dynamo.variables.tensor import TensorVariable
        from torch._dynamo.variables.torch_function import can_dispatch_torch_function
    except ImportError:  # (a Dynamo laid out otherwise traces stores as it will)
        return

    def through_the_method(store):
        def mp_ass_subscript_impl(self, tx, key, value):
            if value is not None and can_dispatch_torch_function(tx, (self, key, value), {}):
                return self.call_method(tx, "__setitem__", [key, value], {})
            return store(self, tx, key, value)
        return mp_ass_subscript_impl

    _wrap_once(TensorVariable, "mp_ass_subscript_impl", through_the_method)


def _functions_with_jvp_run_eagerly() -> None:
    """Make Dynamo break the graph at a ``torch.autograd.Function`` that defines ``jvp``
    called on Duals, or during a compiled pass (where a parameter is one), so that the call
    runs eagerly, where fgkernels differentiates it by its jvp (``rules.functions``). Dynamo
    inlines the forward of a Function whose arguments need no gradient, past its jvp: a
    straight-through estimator's tangent came out 0. ``fullgraph=True`` refuses such a call by
    name; other compiled code is traced as before. Done once, at the first
    ``fgkernels.compile``."""
    try:
        from torch._dynamo.exc import unimplemented
        from torch._dynamo.utils import has_torch_function
        from torch._dynamo.variables.misc import AutogradFunctionVariable
    except ImportError:  # (a Dynamo laid out otherwise traces Functions as it will)
        return

    def eagerly_with_jvp(call_apply):
        def call_apply_with_jvp_eagerly(self, tx, args, kwargs):
            if defines_jvp(self.fn_cls) and (compiled_pass.running or any(
                    has_torch_function(v) for v in (*args, *kwargs.values()))):
                unimplemented(
                    gb_type="fgkernels: torch.autograd.Function with jvp on Duals",
                    context=f"{self.fn_cls.__qualname__}.apply",
                    explanation=f"the torch.autograd.Function '{self.fn_cls.__qualname__}' "
                    "defines jvp, which fgkernels takes for its tangent eagerly: Dynamo would "
                    "trace its forward's ops instead",
                    hints=["Leave out fullgraph=True to run it between graphs."])
            return call_apply(self, tx, args, kwargs)
        return call_apply_with_jvp_eagerly

    _wrap_once(AutogradFunctionVariable, "call_apply", eagerly_with_jvp)


def _wrap_once(owner: type, name: str, wrap: Callable[[Callable], Callable]) -> None:
    """Replace the method ``owner.<name>`` by ``wrap(method)``, once: one wrapped before, or
    one the class does not define (a Dynamo laid out otherwise), is left as it is."""
    method = owner.__dict__.get(name)
    if method is None or getattr(method, "wrapped_by_fgkernels", False):
        return
    wrapped = functools.wraps(method)(wrap(method))
    wrapped.wrapped_by_fgkernels = True
    setattr(owner, name, wrapped)


# (id(module), guard filter) -> the code object of the module's entry point, on which Dynamo
# hangs its graphs (by id, not by the module: a module class may define ``__eq__`` and
# ``__hash__`` as it likes)
_entry_codes: dict[tuple[int, Optional[Callable]], types.CodeType] = {}
_entry_numbers = itertools.count()


def _entry_point(module: nn.Module, guard_filter: Optional[Callable] = None) -> Callable:
    """A function that calls ``module``, with a code object of the module's own. Dynamo keeps
    a code object's compiled graphs in one list, recompiling at most ``recompile_limit`` (8)
    times for it, and compiles the first frame it enters that is not torch's: compiled as
    itself, every converted model whose top module is a twin would enter at the twins' one
    ``__call__``, so the ninth model compiled in a process would run eagerly, and a guard
    filter that skips the guards on modules could run one model's graph on another. The same
    module compiled again gets the same code object, and so finds the graphs it has, unless
    its guard filter differs: a graph whose guards a filter dropped would pass checks it should
    fail, so each filter has a code object of its own. The code object's name is its own too
    (``compiled_ResNet_0``, ...), as Dynamo keys its record of the input sizes it has seen by
    name: another model's batch size would otherwise make this one's batch dimension dynamic."""
    def call(*args, **kwargs):
        return module(*args, **kwargs)

    # Every closure of one ``def`` shares its code object: a copy, kept per module, makes this
    # one the module's own.
    key = (id(module), guard_filter)
    code = _entry_codes.get(key)
    if code is None:
        name = f"compiled_{type(module).__name__}_{next(_entry_numbers)}"
        code = _entry_codes[key] = call.__code__.replace(co_name=name, co_qualname=name)
        weakref.finalize(module, _entry_codes.pop, key, None)
    return types.FunctionType(code, call.__globals__, code.co_name, call.__defaults__,
                              call.__closure__)


def _graphs_run_as_rules(options: dict) -> dict:
    """torch.compile's ``options`` with the backend torch.compile would build from them (the
    default backend, or the one named or given; Inductor's with ``mode`` or ``options``,
    ``use_aoti`` and ``name``) wrapped in ``_GraphsRunAsRules``. The caller's dicts are left as
    they were (torch.compile takes ``guard_filter_fn`` out of the one it is given)."""
    options = dict(options)
    backend = options.pop("backend", None) or _default_backend()
    mode = options.pop("mode", None)
    given = options.pop("options", None)
    if mode is not None and given is not None:
        raise RuntimeError("fgkernels.compile: either mode or options can be given, not both "
                           "(as torch.compile)")
    settings = dict(given or {})
    guard_filter = settings.pop("guard_filter_fn", None)
    use_aoti = settings.pop("use_aoti", False)
    dynamic = options.get("dynamic")
    if backend == "inductor":
        wrapper = torch._TorchCompileAOTInductorWrapper if use_aoti \
            else torch._TorchCompileInductorWrapper
        name = options.get("name")
        compiler = wrapper(mode, settings, dynamic, *([name] if name is not None else []))
    else:
        compiler = torch._TorchCompileWrapper(backend, mode, settings, dynamic)
    options["backend"] = _GraphsRunAsRules(compiler)
    if guard_filter is not None:
        options["options"] = {"guard_filter_fn": guard_filter}
    return options


def _default_backend():
    """torch.compile's default backend (``torch._dynamo.set_default_backend``), Inductor where
    torch has no such setting."""
    try:
        from torch._dynamo.backends.registry import get_default_backend
    except ImportError:
        return "inductor"
    return get_default_backend()


class _GraphsRunAsRules:
    """A Dynamo backend: ``compiler``'s, each graph it compiles run as a rule's ops run
    (``in_rule``), on the parameters as the plain tensors they are.

    The dual pass's torch function mode (``ParameterTangents``) hands out a parameter with a
    tangent as its Dual; Dynamo traces that into the graph, but the graph's own code meets the
    mode again when it runs: Inductor's wrapper passes a parameter straight to
    ``torch.convolution`` (a bias) or ``torch.addmm``, the "eager" backend's graph calls torch's
    functions on them, and the mode would take them as Duals there."""

    def __init__(self, compiler: Callable):
        self.compiler = compiler
        # torch.compile wraps a backend it is given and names it by ``__name__``
        self.__name__ = getattr(compiler, "compiler_name", type(compiler).__name__)

    def __call__(self, graph_module: torch.fx.GraphModule, example_inputs) -> Callable:
        graph = self.compiler(graph_module, example_inputs)

        @functools.wraps(graph)
        def run(*args):
            with in_rule():
                return graph(*args)

        return run

    def compiler_config(self) -> Any:
        """``get_compiler_config()`` of the backend that compiles the graphs (None where it
        has no such method, as for torch.compile with that backend)."""
        config = getattr(self.compiler, "get_compiler_config", None)
        return config() if config is not None else None

    def __eq__(self, other) -> bool:
        # Dynamo takes a graph compiled before only from an equal backend (torch's wrappers
        # compare their settings): compiling a model again reuses its graphs.
        return isinstance(other, _GraphsRunAsRules) and self.compiler == other.compiler

    __hash__ = None

    def __getattr__(self, name: str):  # compiler_name, get_compiler_config, reset: compiler's
        if name == "compiler":  # not set yet (a copy being made)
            raise AttributeError(name)
        return getattr(self.compiler, name)

"""The dual pass: while a module called with a Dual runs, whatever reads a tensor with a tangent
(``tangent_store``) reads its Dual; two global module hooks make and undo the substitution.

A dual pass starts when a module is called with a ``Dual`` among its positional inputs, or when
the module of a ``dual_pass(module)`` block is called, whatever its inputs: for the length of
that call, every module of its tree that holds a tensor with a tangent (its own, a tied one, one
in a ``ParameterList`` or ``ParameterDict``, a parametrization's source) holds the Dual of that
tensor instead, as ``torch.func.functional_call`` substitutes parameters, and so do the lists,
tuples and dicts a module of a type of its own holds it in (``self.weights = [w1, w2]``).
Whatever reads the parameter then sees its tangent: the layer's own op, a tied layer,
``cls_token.expand(n, -1, -1)``, ``weight * self.g``. What reaches the tensor itself instead (a
closure, a global, a container the pass does not look into) reaches it lifted (``lifting``):
for the length of the pass, each tensor with a tangent is of a subclass of its own class whose
ops take it as its Dual. An op that meets such a tensor among its operands outside a dual pass
(``F.linear(Dual(x), lin.weight)``) looks it up in the store too. A plain call stays a plain
call.

The substitution is made and undone by two global module hooks, registered while some tensor
has a tangent or some Dual exists (a pass with the input's tangents alone fills the forward's
own tensors from Duals, ``_Pass.take_as_dual``; the first plain call after the last Dual takes
them away): the pre-hook (which sees positional inputs only) starts the pass, the forward hook
(``always_call``: also when the forward raises an Exception) ends it. A pass that a
KeyboardInterrupt or SystemExit cut short (torch runs no forward hook then) is ended at the next
module call that finds its root call gone, or by ``clear_tangents``. A module outside the root's
tree (held in a plain list) called during the pass joins it. The substitution changes the
modules themselves: a model must not run in another thread while a dual pass runs on it.
"""
from __future__ import annotations

import contextlib
import operator
import sys
import threading
import weakref
from collections.abc import Iterator
from typing import NamedTuple, Optional

import torch
from torch import nn
from torch.nn.modules import module as torch_module
from torch.nn.utils import parametrize

from . import lifting, tangent_store
from .function_mode import compiled_pass
from .layout import kernel_format
from .lifting import UNLIFTED, lift, unlift, unlifted
from .module_state import (
    CONTAINER_DEPTH,
    CONTAINERS,
    MODULE_STATE,
    Attributes,
    check_module,
    class_during_passes,
    holds_dual,
    may_store_attributes,
    module_tree,
    sets_no_attributes,
    strip_dual_buffers,
)
from .rule_state import leave_rule, return_to_rule
from .tangent_store import (
    LIVE,
    ParameterTangent,
    check_still_bound,
    checked_dual,
    drop_tangent,
    dual_of,
    record_tangent,
    tangent_of,
    temporaries_as_duals,
)
from .value import Dual, census, in_primal_layout

Tensor = torch.Tensor


class _Swap(NamedTuple):
    holder: dict       # a module's _parameters
    name: str
    tensor: Tensor     # what it held before the pass


class _EntrySwap(NamedTuple):
    """A Dual (or a tuple rebuilt with one), ``during``, put into ``holder`` (a module's
    ``__dict__``, or a list or dict it holds) in place of ``before``."""

    holder: object
    before: object
    during: object


class _Pass:
    """The substitution of one dual pass, rooted at the module whose call started it; ``frame``
    is the Python frame of that call (the pass runs while it does). Where no tensor has a
    tangent as it starts (the Duals came in with the input: a JVP along the input, activity
    perturbations), the pass is *light*: nothing to substitute or lift, it is there for the
    tensors its forward fills from Duals (``take_as_dual``), and a module call costs it a
    check."""

    def __init__(self, root: nn.Module, frame):
        self.root, self.depth, self.frame = root, 1, frame
        self.ending = None  # the root's hook that ends the pass (``_Hooks.root_done``)
        self.swaps: list[_Swap] = []
        self.entry_swaps: list[_EntrySwap] = []
        self.attributes: list[Attributes] = []
        self.class_swaps: list[tuple[nn.Module, type]] = []  # (module, its own class)
        self.members: set[int] = set()
        self.modules: list[nn.Module] = []
        self.duals: dict[int, Dual] = {}
        # (weakly: a temporary the forward drops is freed, its tangent with it)
        self.lifted: list[weakref.ref] = []
        self.temporaries: list[weakref.ref] = []
        self.state: Optional[set[int]] = None  # ``holds_as_state``'s, made at its first call
        self.light = not LIVE
        if self.light:
            return
        self.join(root)
        try:
            self.lift_the_rest()
        except BaseException:
            self.undo()
            raise

    def join(self, module: nn.Module) -> None:
        """Substitute the tensors of ``module``'s tree that are not substituted yet (the root's,
        or those of a module outside it that the pass calls); all or nothing: a refusal undoes
        the whole pass."""
        # A global module hook of someone else's may store what it sees on any module.
        foreign_hooks = foreign_module_hooks()
        try:
            for m in module_tree(module):
                if id(m) not in self.members:
                    self.members.add(id(m))
                    self.modules.append(m)
                    self._substitute(m, foreign_hooks)
        except BaseException:
            self.undo()
            raise
        self.forget_cached_parametrizations()

    def lift_the_rest(self) -> None:
        """Every tensor with a tangent becomes, for the length of the pass, an instance of a
        subclass of its class whose ops take it as its Dual (``lifting._LiftedParameter``): a
        read the substitution does not reach (a closure's, a global's, a container of a
        torch.nn layer's or one nested deeper than the pass looks) carries the tangent too. Only a
        plain Parameter or Tensor changes class (torch's own lazy parameters change theirs
        so); any other subclass keeps its own ``__torch_function__``. Passes in other threads
        may hold the same tensor lifted: it is lifted while any does (``lift``), and its ops
        take its tangent only in a thread whose pass runs."""
        for ref in list(LIVE.values()):  # (another thread's pass may add a temporary)
            t = ref()
            if t is not None and lift(t):
                self.lifted.append(weakref.ref(t))

    def take_as_dual(self, t: Tensor, count: int, directions, single: bool,
                     dtype: torch.dtype) -> Dual:
        """``t``, a plain tensor of the forward's own (``torch.zeros_like(x)``) that a Dual is
        about to be written into, as a Dual of a zero tangent of ``count`` slots, which that
        write and later ones fill: forward_ad's write makes such a tensor dual in place. For
        the rest of the pass ``t`` is lifted (whatever reads it takes its tangent), and an
        output of the pass that is ``t`` comes out as its Dual."""
        stack = in_primal_layout(t.new_zeros((count, *t.shape), dtype=dtype), t)
        record_tangent(t, ParameterTangent(stack, directions, single))
        lift(t)
        self.lifted.append(weakref.ref(t))
        self.temporaries.append(weakref.ref(t))
        return dual_of(t)

    def can_take_as_dual(self, t: Tensor) -> bool:
        """True for a plain tensor of the forward's own that ``take_as_dual`` can make a Dual:
        one that views nothing, that nothing views (the one user of its storage: written from a
        Dual, it takes the tangent whole) and that no module of the pass holds."""
        return type(t) is Tensor and t._base is None \
            and torch._C._storage_Use_Count(t.untyped_storage()._cdata) <= 2 \
            and not self.holds_as_state(t)  # (use count 2: t's and this call's)

    def take_view_as_dual(self, v: Tensor, count: int, directions, single: bool,
                          dtype: torch.dtype) -> Dual:
        """``v``, a view of a plain tensor of the forward's own that a Dual is about to be
        written into (``batch[i, :, :h, :w].copy_(image)`` into ``batch = x.new_zeros(...)``,
        as torchvision's detection models pad a batch), as the same view of that tensor taken
        as a Dual (``take_as_dual``): forward_ad's write makes the view and its base dual. For
        the rest of the pass ``v`` is lifted too, its tangent the view of the base's: a read
        of it after the write takes the tangent written."""
        whole = self.take_as_dual(v._base, count, directions, single, dtype)
        # v's view of the Dual's primal (an alias of the base) and of each of its slots, laid
        # out as the base is
        stack, offset = whole.tangents, v.storage_offset() - v._base.storage_offset()
        d = whole.as_view(Dual._unchecked(
            whole.primal.as_strided(v.size(), v.stride(), v.storage_offset()),
            stack.as_strided((count, *v.shape), (stack.stride(0), *v.stride()),
                             stack.storage_offset() + offset), directions, single))
        record_tangent(v, ParameterTangent(d.tangents, directions, single))
        lift(v)
        self.lifted.append(weakref.ref(v))
        self.temporaries.append(weakref.ref(v))
        return d

    def can_take_view_as_dual(self, v: Tensor) -> bool:
        """True for a plain view of a plain tensor of the forward's own that
        ``take_view_as_dual`` can make Duals: a tensor that no module of the pass holds, that
        nothing but ``v`` views (the two the only users of its storage), and that is contiguous
        or channels_last (its tangent's slots are then laid out as it is, ``in_primal_layout``,
        and ``v``'s strides step through each)."""
        base = v._base
        return type(v) is Tensor and base is not None and type(base) is Tensor \
            and base.is_contiguous(memory_format=kernel_format(base)) \
            and torch._C._storage_Use_Count(v.untyped_storage()._cdata) <= 3 \
            and not self.holds_as_state(v)  # (use count 3: the base's, v's and this call's)

    def with_duals(self, output):
        """``output`` with each of the pass's temporaries in it (``take_as_dual``) as a Dual of
        its own (``temporaries_as_duals``)."""
        return temporaries_as_duals(output, (ref() for ref in self.temporaries))

    def holds_as_state(self, t: Tensor) -> bool:
        """True if a module of the pass holds ``t``, or the tensor it views, as a parameter, a
        buffer or an attribute (running statistics, a frozen codebook, a cache): the tensors
        they held at this pass's first such question."""
        if self.state is None:
            modules = module_tree(self.root) if self.light else self.modules
            self.state = {id(v) for m in modules for v in (
                *m._parameters.values(), *m._buffers.values(), *m.__dict__.values())
                if isinstance(v, Tensor)} | {id(swap.tensor) for swap in self.swaps}
        return id(t) in self.state or (t._base is not None and id(t._base) in self.state)

    def forget_cached_parametrizations(self) -> None:
        """Within ``parametrize.cached()`` a parametrized tensor is computed once and kept: one
        kept before the pass has no tangent, and one kept during it is a Dual that would
        outlive it. The tree's are dropped as the pass starts and as it ends."""
        if parametrize._cache_enabled:
            for key in [k for k in parametrize._cache if k[0] in self.members]:
                del parametrize._cache[key]

    def running(self) -> bool:
        """True while the root's call runs (False once a KeyboardInterrupt or SystemExit ended
        it without the forward hook that ends the pass). Python refuses to clear the frame of a
        call that still runs, and clears a finished one, whose locals nothing needs any more:
        one O(1) question, asked on every module call of a pass."""
        try:
            self.frame.clear()
        except RuntimeError:
            return True
        return False

    def _substitute(self, m: nn.Module, foreign_hooks: bool) -> None:
        if isinstance(m, torch.jit.ScriptModule):
            refuse_script_module(m)
        if any(isinstance(t, Dual) for t in m._parameters.values()):
            raise RuntimeError(
                f"{type(m).__name__} holds Duals of another dual pass, running in another thread: "
                "a dual pass substitutes the model's parameters, so a model must not run in two "
                "threads at once")
        check_still_bound(m)
        if m._forward_pre_hooks:
            _check_hooks(m)
        if may_store_attributes(m, foreign_hooks):
            self.attributes.append(Attributes.of(m))
        for name, t in m._parameters.items():
            if t is None or tangent_of(t) is None:
                continue
            self.swaps.append(_Swap(m._parameters, name, t))
            m._parameters[name] = self._dual(m, name, t)
        pass_class = class_during_passes(type(m))
        if pass_class is not None:
            self.class_swaps.append((m, type(m)))
            m.__class__ = pass_class
        if not sets_no_attributes(type(m)):
            # A tensor the module holds in a container of its own (``self.weights = [w1, w2]``,
            # a tuple, a dict, nested) is read from there: the container holds its Dual too.
            attributes = m.__dict__
            for key in [k for k, v in attributes.items()
                        if isinstance(v, CONTAINERS) and k not in MODULE_STATE]:
                self._put_duals(attributes, key, m, (key,), CONTAINER_DEPTH)

    def _put_duals(self, holder, key, m: nn.Module, path: tuple, depth: int) -> None:
        """Put the Dual of each tensor with a tangent found at ``holder[key]`` (at ``path``, the
        attribute's name and the keys inside it, on ``m``) there: into a list or dict in place
        (so that every reference to it sees them), a tuple rebuilt (a named tuple as its own
        type)."""
        v = holder[key]
        if isinstance(v, Tensor):
            if isinstance(v, Dual) or tangent_of(v) is None:
                return
            new = self._dual(m, path[0] + "".join(f"[{k!r}]" for k in path[1:]), v)
        elif depth == 0 or not isinstance(v, CONTAINERS):
            return
        elif isinstance(v, tuple):
            # Its entries go through a scratch list (the sweep that puts entries back visits it
            # too, harmlessly); a list or dict inside is changed in place as ever.
            entries = list(v)
            for i in range(len(entries)):
                self._put_duals(entries, i, m, (*path, i), depth - 1)
            if all(map(operator.is_, entries, v)):
                return
            new = v._make(entries) if hasattr(v, "_make") else type(v)(entries)
        else:
            for k in range(len(v)) if isinstance(v, list) else list(v):
                self._put_duals(v, k, m, (*path, k), depth - 1)
            return
        self.entry_swaps.append(_EntrySwap(holder, v, new))
        holder[key] = new

    def _dual(self, m: nn.Module, name: str, t: Tensor) -> Dual:
        """The pass's one Dual of tensor ``t`` (read as ``m.<name>``), made at its first read."""
        d = self.duals.get(id(t))
        if d is None:
            d = self.duals[id(t)] = checked_dual(m, name, t)
        return d

    def _put_back_entries(self) -> None:
        """Each object the pass put into a container or a module's attribute (a Dual, a tuple
        rebuilt with Duals) becomes what it replaced, wherever the forward has moved it within
        its container since (``self.weights.reverse()``); what the forward put there in its
        place stays (the snapshot takes any Dual out of it)."""
        before = {id(s.during): s.before for s in self.entry_swaps}
        seen = set()
        for swap in self.entry_swaps:
            holder = swap.holder
            if id(holder) in seen:
                continue
            seen.add(id(holder))
            for k, e in (enumerate(holder) if isinstance(holder, list) else list(holder.items())):
                if id(e) in before:
                    holder[k] = before[id(e)]

    def undo(self) -> None:
        for t in [ref() for ref in self.lifted]:
            if t is not None:
                unlift(t)
        for t in [ref() for ref in self.temporaries]:
            if t is not None:
                drop_tangent(t)
        self.lifted, self.temporaries, self.state = [], [], None
        strip_dual_buffers(module_tree(self.root) if self.light else self.modules)
        self._put_back_entries()
        for holder, name, t in reversed(self.swaps):
            holder[name] = t
        for attributes in self.attributes:
            attributes.restore()
        for m, cls in self.class_swaps:
            m.__class__ = cls
        self.forget_cached_parametrizations()
        self.swaps, self.entry_swaps, self.attributes, self.frame = [], [], [], None
        self.class_swaps = []
        if self.ending is not None:
            self.ending.remove()
            self.ending = None


@contextlib.contextmanager
def stores_put_back(root: nn.Module) -> Iterator[None]:
    """What the forwards of ``root``'s tree store on their modules during the block is put
    back when it ends, as an eager pass puts it back (``_Pass.undo``): the compiled pass's
    (``fgkernels.compile``), whose ``ParameterTangents`` substitutes nothing to undo. It runs
    at every compiled call, so it looks only at the modules that may store something
    (``may_store_attributes``): none of a converted model of torch.nn's layers but the
    model's own classes."""
    foreign_hooks = foreign_module_hooks()
    modules = [m for m in module_tree(root) if may_store_attributes(m, foreign_hooks)]
    attributes = [Attributes.of(m) for m in modules]
    try:
        yield
    finally:
        strip_dual_buffers(modules)
        for a in attributes:
            a.restore()


def refuse_script_module(m: nn.Module, name: Optional[str] = None) -> None:
    """A TorchScript module reads its parameters in C++, where no tangent reaches them: one
    whose parameters have tangents (or, with ``name``, are given them) is refused."""
    if name is not None or any(tangent_of(p) is not None for p in m.parameters()):
        what = f"{name!r} belongs to" if name is not None else "a parameter with a tangent in"
        raise TypeError(f"{what} a TorchScript module ({type(m).__name__}, from torch.jit.script "
                        "or torch.jit.trace), which reads its parameters in C++, where a dual "
                        "pass cannot give them their tangents; use the eager nn.Module")


def _check_hooks(m: nn.Module) -> None:
    for hook in m._forward_pre_hooks.values():
        if type(hook).__name__ == "SpectralNorm" and m.training \
                and tangent_of(m._parameters.get(f"{hook.name}_orig")) is not None:
            raise NotImplementedError(
                f"{type(m).__name__}.{hook.name} is computed by torch.nn.utils.spectral_norm's "
                "hook, which in training updates its power-iteration vectors in place; use "
                "torch.nn.utils.parametrizations.spectral_norm, which fgkernels differentiates "
                "(or the module in eval mode, whose hook updates nothing)")


def _check_compilable(module: nn.Module) -> None:
    """Inside torch.compile the parameters are not substituted: without ``ParameterTangents``
    (``fgkernels.compile``), only the twins of ``fgkernels.convert``, whose ops look up their
    parameters' tangents, can hold one."""
    for m in module.modules():
        if getattr(type(m), "reads_parameter_tangents", False):
            continue
        for name, p in m._parameters.items():
            if tangent_of(p) is not None:
                raise RuntimeError(
                    f"{type(m).__name__}.{name} has a tangent, and inside torch.compile only "
                    "the layers of fgkernels.convert hand their parameters' tangents to the "
                    "dual pass; convert the model, or compile with fgkernels.compile(model)")


def _holds_tangents(module: nn.Module) -> bool:
    return any(tangent_of(t) is not None for t in module.parameters())


# torch's tables of global module forward hooks (id -> hook, or -> a flag of the hook's)
_GLOBAL_HOOK_TABLES = (torch_module._global_forward_pre_hooks, torch_module._global_forward_hooks,
                       torch_module._global_forward_hooks_with_kwargs,
                       torch_module._global_forward_hooks_always_called)


class _Hooks:
    """The two global module hooks, registered while some tensor has a tangent or some Dual
    exists (``value.census``). Registered once, they are then put into torch's tables and
    taken out again under the same ids: a graph Dynamo traced with them guards on those
    tables, and would be compiled anew for hooks registered anew."""

    def __init__(self):
        self.handles: list = []  # made at the first registration, kept
        self.entries: list[tuple[dict, int, object]] = []  # (table, id, entry) of the two
        self.registered = 0  # how many of them are in: a plain int, which torch.compile reads
        # (reentrant: a tensor's tangent freed by the collector syncs from inside a sync)
        self.lock = threading.RLock()
        self.roots = 0  # how many dual_pass blocks are open, in every thread: a plain int too
        self.roots_lock = threading.Lock()
        self.local = threading.local()

    def sync(self) -> None:
        with self.lock:
            # (off before the census is read: a Dual made after that read finds them off,
            # and registers them once this sync is done)
            census.hooks_on = False
            wanted = bool(LIVE) or census.alive() > 0
            if wanted and not self.registered:
                self.put_in()
            elif not wanted and self.registered and getattr(self.local, "active", None) is None:
                self.take_out()
            census.hooks_on = bool(self.registered)

    def put_in(self) -> None:
        if not self.handles:
            self.handles = [torch_module.register_module_forward_pre_hook(self.pre),
                            torch_module.register_module_forward_hook(
                                self.post, with_kwargs=True, always_call=True)]
            self.entries = [(table, h.id, table[h.id]) for h in self.handles
                            for table in _GLOBAL_HOOK_TABLES if h.id in table]
        else:
            for table, key, entry in self.entries:
                table[key] = entry
        self.registered = len(self.handles)

    def take_out(self) -> None:
        for table, key, _ in self.entries:
            table.pop(key, None)
        self.registered = 0

    def sync_unless_compiling(self) -> None:
        """``sync``, unless Dynamo is compiling in this thread. The garbage collector frees a
        tensor when it likes, in the middle of a compile too; the trace has read the hooks
        and the guards Dynamo builds after it look them up, so they stay until the next
        ``sync`` (``fgkernels.compile`` syncs after each call)."""
        guards = sys.modules.get("torch._guards")
        if guards is None or guards.CompileContext.try_get() is None:
            self.sync()

    def pre(self, module: nn.Module, args: tuple) -> None:
        if compiled_pass.running:  # ParameterTangents does the substitution's work
            if type(module) is parametrize.ParametrizationList:
                # A parametrized weight read inside a rule (a twin's ``self.weight``) is
                # computed as the model's own code: ParameterTangents hands its sources'
                # tangents to its ops. (An eager pass substituted the sources already.)
                leave_rule()
            return
        # Dynamo traces this call (fgkernels asks ``is_dynamo_compiling`` throughout: torch
        # holds ``is_compiling`` true in every thread while any one compiles).
        if torch.compiler.is_dynamo_compiling():
            if holds_dual(args) or (self.roots and is_dual_pass_root(module)):
                _check_compilable(module)
            return
        active = getattr(self.local, "active", None)
        if active is not None:
            # Inside the pass: a module of its tree, the root again, or a module outside the
            # tree, which joins. A pass an interrupt cut short is ended first.
            if active.running():
                if module is active.root:
                    active.depth += 1
                elif not active.light and id(module) not in active.members:
                    active.join(module)
                return
            self.end_stale()
        if isinstance(module, torch.jit.ScriptModule):
            return  # its parameters, read in C++, take no tangent: no pass (nor its hook) needed
        if holds_dual(args) or (self.roots and is_dual_pass_root(module)):
            active = self.local.active = _Pass(module, sys._getframe(1))
            # The pass ends after the root's own forward hooks, which torch runs after the
            # global ones: a hook of the root's reads its parameters with their tangents.
            active.ending = module.register_forward_hook(self.root_done, always_call=True)
        elif not LIVE and census.alive() == 0:
            self.sync()  # the last Dual is gone: a plain call takes the hooks away

    def end_stale(self) -> None:
        """End this thread's pass if its root call is gone (cut short by a KeyboardInterrupt or
        SystemExit, which run no forward hook): the modules get their tensors back."""
        active = getattr(self.local, "active", None)
        if active is not None and not active.running():
            self.local.active = None
            active.undo()
            self.sync()

    def post(self, module: nn.Module, args: tuple, *rest) -> None:
        if compiled_pass.running and type(module) is parametrize.ParametrizationList:
            return_to_rule()
        if compiled_pass.running or torch.compiler.is_dynamo_compiling():
            return
        if getattr(self.local, "active", None) is not None:
            return  # the pass's root ends it (``root_done``)
        # rest is (kwargs, output), or (output,) when the forward raised
        if len(rest) == 2 and rest[0] and holds_dual(rest[0].values()) \
                and _holds_tangents(module):
            raise TypeError(
                f"{type(module).__name__} was called with a Dual by keyword only; pass it "
                "positionally, or call the module inside fgkernels.dual_pass(module): a dual "
                "pass, which hands out the parameters' tangents, starts at a module called "
                "with a Dual among its positional inputs or at that block's module")

    def root_done(self, module: nn.Module, args: tuple, output=None):
        """The end of a call of the pass's root (its last forward hook): the pass ends with
        the outermost one, its output's temporaries made Duals (``_Pass.take_as_dual``)."""
        active = getattr(self.local, "active", None)
        if active is None or active.root is not module:
            return None  # the root called in another thread, or after a pass cut short
        active.depth -= 1
        if active.depth > 0:
            return None
        output = active.with_duals(output) if active.temporaries else None
        self.local.active = None
        active.undo()
        self.sync()
        return output


hooks = _Hooks()


@contextlib.contextmanager
def dual_pass(module: nn.Module) -> Iterator[None]:
    """Inside the block, each call of ``module`` (in this thread) is a dual pass, whatever its
    inputs, as a call with a Dual among its positional inputs is: its parameters carry their
    tangents. For a model that takes only integers (a language model's token ids: the
    embedding's weight brings the tangents in) or takes its Duals by keyword
    (``model(pixel_values=Dual(x))``). ``fgkernels.compile(module)`` honours it too. Blocks
    nest; a call with no tangent anywhere is the plain call it was."""
    check_module(module, "dual_pass")
    roots = hooks.local.__dict__.setdefault("roots", [])
    roots.append(module)
    with hooks.roots_lock:
        hooks.roots += 1
    try:
        yield
    finally:
        del roots[max(i for i, m in enumerate(roots) if m is module)]
        with hooks.roots_lock:
            hooks.roots -= 1


def is_dual_pass_root(module: nn.Module) -> bool:
    """True if ``module``'s calls are dual passes in this thread (``dual_pass``)."""
    return any(m is module for m in getattr(hooks.local, "roots", ()))


def in_dual_pass() -> bool:
    """True while a dual pass runs in this thread (its parameters substituted; a pass an
    interrupt cut short does not run: the next module call ends it)."""
    active = getattr(hooks.local, "active", None)
    return active is not None and active.running()


@contextlib.contextmanager
def lifted_set_aside() -> Iterator[None]:
    """The tensors this thread's eager pass holds lifted, of their own class for the length of
    the block: a compiled call inside the pass (``fgkernels.compile``), whose trace would take
    the subclass for a tensor subclass of its own and whose ``ParameterTangents`` hands out
    their tangents."""
    active = running_pass()
    held = [] if active is None else \
        [t for t in (ref() for ref in active.lifted) if t is not None and type(t) in UNLIFTED]
    with contextlib.ExitStack() as stack:
        for t in held:
            stack.enter_context(unlifted(t))
        yield


@contextlib.contextmanager
def hooks_set_aside() -> Iterator[None]:
    """fgkernels' global module hooks removed for the length of the block, which runs no dual
    pass: the plain calls of a baseline, timed as in a process without fgkernels (with the
    hooks registered, every module call of every model takes torch's slower call path). They
    are registered again after it, as the tensors with tangents and the Duals want them."""
    if running_pass() is not None:
        raise RuntimeError("hooks_set_aside: a dual pass is running in this thread")
    with hooks.lock:
        hooks.take_out()
        census.hooks_on = False
    try:
        yield
    finally:
        hooks.sync()


def running_pass() -> Optional[_Pass]:
    """This thread's dual pass, while it runs (else None)."""
    active = getattr(hooks.local, "active", None)
    return active if active is not None and active.running() else None


def writing_pass():
    """The pass that takes a tensor of this thread's forward that a Dual is written into as a
    Dual (``take_as_dual``): the compiled pass running, else the eager one (None if none
    runs)."""
    return compiled_pass.temporaries if compiled_pass.running else running_pass()


def foreign_module_hooks() -> bool:
    """True if a global module forward hook or pre-hook other than fgkernels' own is
    registered (it would see, and may keep, what any module is called with). Asked for every
    layer of a dual pass, so it counts: fgkernels' own hooks, while registered, are one of
    each kind."""
    return len(torch_module._global_forward_hooks) \
        + len(torch_module._global_forward_pre_hooks) > hooks.registered


# What the layers below call back into: a Dual made while the hooks are out puts them in
# (``census``), a freed tangent may take them out (``tangent_store``), a lifted tensor's op asks
# whether its thread runs a pass (``lifting``).
census.register = hooks.sync_unless_compiling
tangent_store.sync_hooks = hooks.sync_unless_compiling
lifting.pass_runs = in_dual_pass

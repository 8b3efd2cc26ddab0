"""Parameter tangents: the per-step directions ``Ẇ`` of a forward-mode pass, kept against the
parameter tensors themselves.

``set_tangents(model, {name: Ẇ})`` records ``Ẇ`` for the tensor ``model.<name>``. A *dual pass*
starts when a module is called with a ``Dual`` among its positional inputs, or when the module
of a ``dual_pass(module)`` block is called, whatever its inputs: for the length of that call,
every module of its tree that holds a tensor with a tangent (its own, a tied one, one in a
``ParameterList`` or ``ParameterDict``, a parametrization's source) holds the Dual of that
tensor instead, as ``torch.func.functional_call`` substitutes parameters, and so do the lists,
tuples and dicts a module of a type of its own holds it in (``self.weights = [w1, w2]``).
Whatever reads the parameter then sees its tangent: the layer's own op, a tied layer,
``cls_token.expand(n, -1, -1)``, ``weight * self.g``. What reaches the tensor itself instead (a
closure, a global, a container the pass does not look into) reaches it lifted: for the length
of the pass, each tensor with a tangent is of a subclass of its own class whose ops take it as
its Dual. An op that meets such a tensor among its operands outside a dual pass
(``F.linear(Dual(x), lin.weight)``) looks it up here too. A plain call stays a plain call.

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
import copy
import dataclasses
import operator
import sys
import threading
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import NamedTuple, Optional

import torch
from torch import nn
from torch.nn.modules import module as torch_module
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .dtypes import acc_dtype, tangent_dtype_fits
from .dynamo import eager_between_graphs
from .layout import kernel_format
from .precision import check_dtype, resolve_tangent_dtype
from .value import (
    PRIMAL_METADATA,
    Dual,
    census,
    check_direction,
    check_tangent,
    in_primal_layout,
    inside_rule,
    leave_rule,
    return_to_rule,
)

Tensor = torch.Tensor

__all__ = ["set_tangents", "random_tangents", "clear_tangents", "tangent_of", "has_tangent",
           "ParameterTangent"]


class ParameterTangent(NamedTuple):
    """A tensor's tangent as the store keeps it: stacked ``(T, *shape)``, with its slots'
    direction labels (None: unlabelled) and whether it was given as a single tangent."""

    stack: Tensor
    directions: Optional[tuple[int, ...]]
    single: bool

    def __reduce__(self):
        # A per-step value never travels with its tensor: pickled (torch.save(model)) or
        # copied (copy.copy, copy.deepcopy), it comes back as None, "no tangent", as a state
        # dict leaves it behind.
        return _no_tangent, ()


def _no_tangent() -> None:
    return None


# A tensor's tangent is an attribute of the tensor itself (so torch.compile reads it as it reads
# any tensor attribute, with a guard); deepcopy and state_dict leave it behind, as they should
# a per-step value. _LIVE counts the tensors that have one, for the hooks below.
TANGENT_ATTRIBUTE = "_fgkernels_tangent"
_LIVE: dict[int, weakref.ref] = {}
# module -> {name in its _parameters: the tensor a tangent was set for under that name}: a
# parameter replaced after its tangent was set is refused at the next dual pass.
_BOUND: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def tangent_of(t) -> Optional[ParameterTangent]:
    """The tangent recorded for tensor ``t`` (None: none)."""
    return getattr(t, TANGENT_ATTRIBUTE, None) if isinstance(t, Tensor) else None


def has_tangent(t) -> bool:
    """True if a tangent is recorded for tensor ``t``."""
    return tangent_of(t) is not None


def dual_of(t: Tensor) -> Optional[Dual]:
    """``t`` as a Dual of its recorded tangent (None when it has none)."""
    entry = tangent_of(t)
    if entry is None:
        return None
    return Dual._of_parameter(t, entry.stack, entry.directions, entry.single)


def _put(t: Tensor, tangent: ParameterTangent) -> None:
    key = id(t)

    def forget(ref, key=key):
        if _LIVE.get(key) is ref:
            del _LIVE[key]
            _hooks.sync_unless_compiling()

    setattr(t, TANGENT_ATTRIBUTE, tangent)
    if key not in _LIVE:
        _LIVE[key] = weakref.ref(t, forget)


def _drop(t: Tensor) -> None:
    if getattr(t, TANGENT_ATTRIBUTE, None) is not None:
        delattr(t, TANGENT_ATTRIBUTE)
        _LIVE.pop(id(t), None)


# --- the dual pass: substitution while a module called with a Dual runs ------------------------
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
        self.attributes: list[_Attributes] = []
        self.class_swaps: list[tuple[nn.Module, type]] = []  # (module, its own class)
        self.members: set[int] = set()
        self.modules: list[nn.Module] = []
        self.duals: dict[int, Dual] = {}
        # (weakly: a temporary the forward drops is freed, its tangent with it)
        self.lifted: list[weakref.ref] = []
        self.temporaries: list[weakref.ref] = []
        self.state: Optional[set[int]] = None  # ``holds_as_state``'s, made at its first call
        self.light = not _LIVE
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
            for m in _tree(module):
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
        subclass of its class whose ops take it as its Dual (``_LiftedParameter``): a read the
        substitution does not reach (a closure's, a global's, a container of a torch.nn
        layer's or one nested deeper than the pass looks) carries the tangent too. Only a
        plain Parameter or Tensor changes class (torch's own lazy parameters change theirs
        so); any other subclass keeps its own ``__torch_function__``. Passes in other threads
        may hold the same tensor lifted: it is lifted while any does (``_lift``), and its ops
        take its tangent only in a thread whose pass runs."""
        for ref in list(_LIVE.values()):  # (another thread's pass may add a temporary)
            t = ref()
            if t is not None and _lift(t):
                self.lifted.append(weakref.ref(t))

    def take_as_dual(self, t: Tensor, count: int, directions, single: bool,
                     dtype: torch.dtype) -> Dual:
        """``t``, a plain tensor of the forward's own (``torch.zeros_like(x)``) that a Dual is
        about to be written into, as a Dual of a zero tangent of ``count`` slots, which that
        write and later ones fill: forward_ad's write makes such a tensor dual in place. For
        the rest of the pass ``t`` is lifted (whatever reads it takes its tangent), and an
        output of the pass that is ``t`` comes out as its Dual."""
        stack = in_primal_layout(t.new_zeros((count, *t.shape), dtype=dtype), t)
        _put(t, ParameterTangent(stack, directions, single))
        _lift(t)
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
        _put(v, ParameterTangent(d.tangents, directions, single))
        _lift(v)
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
        its own (``_with_duals``)."""
        return _with_duals(output, (ref() for ref in self.temporaries))

    def holds_as_state(self, t: Tensor) -> bool:
        """True if a module of the pass holds ``t``, or the tensor it views, as a parameter, a
        buffer or an attribute (running statistics, a frozen codebook, a cache): the tensors
        they held at this pass's first such question."""
        if self.state is None:
            modules = _tree(self.root) if self.light else self.modules
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
            _refuse_script_module(m)
        if any(isinstance(t, Dual) for t in m._parameters.values()):
            raise RuntimeError(
                f"{type(m).__name__} holds Duals of another dual pass, running in another thread: "
                "a dual pass substitutes the model's parameters, so a model must not run in two "
                "threads at once")
        _check_still_bound(m)
        if m._forward_pre_hooks:
            _check_hooks(m)
        if _may_store_attributes(m, foreign_hooks):
            self.attributes.append(_Attributes.of(m))
        for name, t in m._parameters.items():
            if t is None or tangent_of(t) is None:
                continue
            self.swaps.append(_Swap(m._parameters, name, t))
            m._parameters[name] = self._dual(m, name, t)
        pass_class = _pass_class(type(m))
        if pass_class is not None:
            self.class_swaps.append((m, type(m)))
            m.__class__ = pass_class
        if not _sets_no_attributes(type(m)):
            # A tensor the module holds in a container of its own (``self.weights = [w1, w2]``,
            # a tuple, a dict, nested) is read from there: the container holds its Dual too.
            attributes = m.__dict__
            for key in [k for k, v in attributes.items()
                        if isinstance(v, _CONTAINERS) and k not in _MODULE_STATE]:
                self._put_duals(attributes, key, m, (key,), _CONTAINER_DEPTH)

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
        elif depth == 0 or not isinstance(v, _CONTAINERS):
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
            d = self.duals[id(t)] = _checked_dual(m, name, t)
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
                _unlift(t)
        for t in [ref() for ref in self.temporaries]:
            if t is not None:
                _drop(t)
        self.lifted, self.temporaries, self.state = [], [], None
        _strip_dual_buffers(_tree(self.root) if self.light else self.modules)
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


def _with_duals(output, temporaries: Iterable[Optional[Tensor]]):
    """``output`` with each of ``temporaries`` in it (found in tuples, lists, dicts, the other
    containers torch's pytree knows, and dataclasses) as a Dual of its own: the tensor and its
    recorded tangent."""
    temporaries = {id(t): t for t in temporaries if t is not None}

    def as_dual(v):
        if _is_dataclass(v):  # (a container pytree may not know)
            return dataclasses.replace(v, **{f.name: pytree.tree_map(as_dual, getattr(
                v, f.name), is_leaf=_is_dataclass) for f in dataclasses.fields(v) if f.init})
        if not isinstance(v, Tensor) or temporaries.get(id(v)) is not v:
            return v  # (None, which pytree takes for a leaf, is no temporary either)
        entry = tangent_of(v)
        return Dual._unchecked(v, entry.stack, entry.directions, entry.single)

    return pytree.tree_map(as_dual, output, is_leaf=_is_dataclass)


class _CompiledTemporaries:
    """The tensors of the forward's own that a compiled pass (``fgkernels.compile``) takes as
    Duals where a Dual is written into them, as an eager pass does (``_Pass.take_as_dual``),
    in a way Dynamo traces: the tangent is recorded on the tensor, and ``ParameterTangents``
    hands the tensor out with it, where the eager pass lifts it (a class change) and keeps a
    weak reference. ``root`` is the compiled module: what its modules hold is state, which
    takes the primal instead."""

    def __init__(self, root: nn.Module):
        self.root = root
        self.tensors: list[Tensor] = []

    def holds_as_state(self, t: Tensor) -> bool:
        """True if a module of the root's tree holds ``t``, or the tensor it views, as a
        parameter, a buffer or an attribute (``_Pass.holds_as_state``; found by identity,
        which Dynamo traces where it cannot take the ``id`` of a tensor the forward made)."""
        base = t._base
        return any(v is t or v is base for m in self.root.modules()
                   for v in (*m._parameters.values(), *m._buffers.values(), *m.__dict__.values())
                   if isinstance(v, Tensor))

    def can_take_as_dual(self, t: Tensor) -> bool:
        """True for a plain tensor that views nothing and that no module holds. Whether other
        tensors view it (``_Pass.can_take_as_dual``) cannot be asked while Dynamo traces: a
        view taken before the write is refused where an op reads it
        (``refuse_views_taken_before``)."""
        return type(t) is Tensor and t._base is None and not self.holds_as_state(t)

    def can_take_view_as_dual(self, v: Tensor) -> bool:
        """False: whether other tensors view a view's base cannot be asked while Dynamo traces,
        so a Dual written into a view of a tensor of the forward's own is refused
        (``_Pass.can_take_view_as_dual`` takes it in an eager pass)."""
        return False

    def take_as_dual(self, t: Tensor, count: int, directions, single: bool,
                     dtype: torch.dtype) -> Dual:
        """``t`` as a Dual of a zero tangent of ``count`` slots, which the write about to be
        made and later ones fill (``_Pass.take_as_dual``), its tangent recorded on it until
        the pass ends (``drop``)."""
        stack = in_primal_layout(t.new_zeros((count, *t.shape), dtype=dtype), t)
        setattr(t, TANGENT_ATTRIBUTE, ParameterTangent(stack, directions, single))
        self.tensors.append(t)
        return dual_of(t)

    def refuse_views_taken_before(self, values) -> None:
        """Refuse a plain view of one of the tensors in ``values`` (an op's operands, the
        pass's output; in containers): it was taken before the tensor became a Dual (a view
        taken after is a Dual), and holds values written since without their tangent. (A
        RuntimeError: torch's operators take a TypeError for a refused operand type, and
        raise their own: ``rows[0] + rows[1]``.)"""
        for v in pytree.tree_leaves(values):
            if isinstance(v, Tensor) and v._base is not None \
                    and any(v._base is t for t in self.tensors):
                raise RuntimeError(
                    "fgkernels.Dual: a view of a tensor, taken before a Dual was written into "
                    "the tensor and made it a Dual, is read (by an op, or as the pass's "
                    "output): it holds the values written without their tangent; make the "
                    "tensor a Dual (fgkernels.Dual(torch.zeros_like(x))) before taking views "
                    "of it, or take the view after the write")

    def with_duals(self, output):
        """``output`` with each of these tensors in it as a Dual of its own (``_with_duals``);
        a view of one among them, taken before it became a Dual, is refused."""
        if not self.tensors:
            return output
        self.refuse_views_taken_before(output)
        return _with_duals(output, self.tensors)

    def drop(self) -> None:
        """The tensors' tangents dropped as the pass ends: plain tensors again."""
        for t in self.tensors:
            _drop(t)
        self.tensors = []


# The containers of a module's attributes that a pass looks into for tensors with a tangent, how
# deep (``[[w1, b1], [w2, b2]]`` is two), and the attributes every module has, which it skips.
_CONTAINERS = (list, tuple, dict)
_CONTAINER_DEPTH = 4
_MODULE_STATE = frozenset(vars(nn.Module()))


# module type -> whether its forward sets no public attribute on its module: torch.nn's own
# layers, and the twins of fgkernels.nn (registered there); any other type may.
_NO_ATTRIBUTES: dict[type, bool] = {}


def forward_sets_no_attributes(cls: type) -> type:
    """Mark module type ``cls`` (exactly: not its subclasses) as one whose forward sets no
    public attribute on its module, so that a dual pass need not look for Duals left there."""
    _NO_ATTRIBUTES[cls] = True
    return cls


def _may_store_attributes(m: nn.Module, foreign_hooks: bool) -> bool:
    """True if a call of ``m`` may store a value on it: a forward of a type not known to
    store nothing, a hook of the module's, or a global one of someone else's
    (``foreign_hooks``). What it stores during a dual pass (a weight computed by a weight_norm
    or prune pre-hook, a cache such as LeViT's attention biases) is a Dual: it is put back as
    the pass ends (``_Attributes``), so that no Dual outlives the pass in a module's state."""
    return foreign_hooks or bool(m._forward_pre_hooks) or bool(m._forward_hooks) \
        or not _sets_no_attributes(type(m))


def _strip_dual_buffers(modules: Iterable[nn.Module]) -> None:
    """A buffer the forward rebound to a Dual (a carried state: ``self.state = h``) keeps
    its new value without the tangent, as forward_ad's dual tensor does when its level ends
    (the next plain call would otherwise read the pass's tangent)."""
    for m in modules:
        for name, b in m._buffers.items():
            if isinstance(b, Dual):
                m._buffers[name] = b.primal


@contextlib.contextmanager
def stores_put_back(root: nn.Module) -> Iterator[None]:
    """What the forwards of ``root``'s tree store on their modules during the block is put
    back when it ends, as an eager pass puts it back (``_Pass.undo``): the compiled pass's
    (``fgkernels.compile``), whose ``ParameterTangents`` substitutes nothing to undo. It runs
    at every compiled call, so it looks only at the modules that may store something
    (``_may_store_attributes``): none of a converted model of torch.nn's layers but the
    model's own classes."""
    foreign_hooks = foreign_module_hooks()
    modules = [m for m in _tree(root) if _may_store_attributes(m, foreign_hooks)]
    attributes = [_Attributes.of(m) for m in modules]
    try:
        yield
    finally:
        _strip_dual_buffers(modules)
        for a in attributes:
            a.restore()


def _sets_no_attributes(cls: type) -> bool:
    known = _NO_ATTRIBUTES.get(cls)
    if known is None:
        # (a recurrent layer's forward lists its weights anew in _flat_weights)
        known = _NO_ATTRIBUTES[cls] = cls.__module__.startswith("torch.nn.modules.") \
            and not issubclass(cls, nn.RNNBase)
    return known


# torch.nn layer class -> how to find the class a full dual pass gives a layer of it (or of a
# subclass) while it runs (``run_as_during_passes``).
_PASS_CLASS_OF: dict[type, Callable[[type], Optional[type]]] = {}


def run_as_during_passes(cls: type, pass_class_of: Callable[[type], Optional[type]]) -> None:
    """Make every layer of class ``cls`` or a subclass of it that a full dual pass substitutes
    run as ``pass_class_of(its class)`` (a subclass of its class adding no state; None: as it
    is) until the pass ends: ``fgkernels.nn`` gives ``nn.MultiheadAttention`` its twin so, whose
    forward takes Dual masks, which torch's refuses. A layer called as the pass's root, or held
    outside the tree of the module the pass started at, joins the pass as it is called: that
    call runs its own class's forward."""
    _PASS_CLASS_OF[cls] = pass_class_of


def _pass_class(cls: type) -> Optional[type]:
    for base, pass_class_of in _PASS_CLASS_OF.items():
        if issubclass(cls, base):
            return pass_class_of(cls)
    return None


def _is_dataclass(v) -> bool:
    """True for a dataclass instance that torch's pytree does not take apart itself."""
    return dataclasses.is_dataclass(v) and not isinstance(v, type) \
        and type(v) not in pytree.SUPPORTED_NODES


def _tree(root: nn.Module) -> list[nn.Module]:
    """``root.modules()``, each module once, without the names ``named_modules`` builds."""
    seen, order, stack = set(), [], [root]
    while stack:
        m = stack.pop()
        if m is None or id(m) in seen:  # (a child registered as None)
            continue
        seen.add(id(m))
        order.append(m)
        if m._modules:
            stack.extend(reversed(m._modules.values()))
    return order


class _Snapshot(NamedTuple):
    """A value before a dual pass, and for a dict or list, a snapshot of each entry (else
    None): what it is put back to."""

    value: object
    entries: object


def _snapshot(v) -> _Snapshot:
    if type(v) is dict:
        return _Snapshot(v, {k: _snapshot(e) for k, e in v.items()})
    if type(v) is list:
        return _Snapshot(v, [_snapshot(e) for e in v])
    return _Snapshot(v, None)


def _strip(container, entries) -> None:
    """Take every Dual the pass put into ``container`` (a dict or list, whose entries were
    ``entries`` before it) out of it: an entry that holds one becomes what it was (a container
    changed in place, in place), and one added that holds one is dropped; any other entry
    stays."""
    if type(container) is dict:
        for key in [key for key, e in container.items() if _holds_dual((e,))]:
            if key in entries:
                container[key] = _put_back(entries[key])
            else:
                del container[key]
    else:
        container[:] = [_put_back(entries[i]) if i < len(entries) and _holds_dual((e,)) else e
                        for i, e in enumerate(container)
                        if i < len(entries) or not _holds_dual((e,))]


def _put_back(snapshot: _Snapshot):
    """The value a snapshot was taken of, with any Dual put into it since taken out."""
    if snapshot.entries is not None:
        _strip(snapshot.value, snapshot.entries)
    return snapshot.value


class _Attributes(NamedTuple):
    """A module's attributes before a dual pass: its ``__dict__`` (a shallow copy) and a
    snapshot of each public dict and list in it, nested ones included (a cache or a record a
    forward may fill)."""

    module: nn.Module
    before: dict
    containers: dict[str, _Snapshot]

    @classmethod
    def of(cls, m: nn.Module) -> _Attributes:
        d = m.__dict__
        return cls(m, d.copy(), {k: _snapshot(v) for k, v in d.items()
                                 if type(v) in (dict, list) and k[:1] != "_"})

    def restore(self) -> None:
        """Put back each attribute that the pass set to a Dual or to a value holding one at any
        depth (``self.state = (h, c)``), private ones included (delete it if it is new), and
        take the Duals out of each public dict or list, nested ones included, and of a private
        one the pass set anew (a recurrent layer's ``_flat_weights``): what an entry held
        before, or nothing for an entry added."""
        d, before, snapshots = self.module.__dict__, self.before, self.containers
        # Usually no attribute was set: every name still holds what it held (compared at C
        # speed), and only the containers that were there before can have gained a Dual.
        if d.keys() == before.keys() \
                and all(map(operator.is_, d.values(), map(before.__getitem__, d))):
            changed = snapshots
        else:
            changed = [k for k, v in d.items() if _holds_dual((v,))
                       and (type(v) not in (dict, list) or k[:1] != "_"
                            or v is not before.get(k))]
        for k in changed:
            v = d.get(k)
            if type(v) in (dict, list):
                snapshot = snapshots.get(k) or _snapshot(_container(before.get(k), type(v)))
                _strip(v, snapshot.entries)
            elif _holds_dual((v,)):
                if k in before:
                    d[k] = before[k]
                else:
                    del d[k]


def _container(v, kind: type):
    """``v`` where it is a ``kind`` (what a private container held before the pass), else an
    empty one."""
    return v if type(v) is kind else kind()


def _checked_dual(m: nn.Module, name: str, t: Tensor) -> Dual:
    entry = tangent_of(t)
    _check_tangent_fits(m, name, t, entry.stack)
    return Dual._of_parameter(t, entry.stack, entry.directions, entry.single)


def _check_tangent_fits(m: nn.Module, name: str, t: Tensor, stack: Tensor) -> None:
    if stack.device != t.device or stack.shape[1:] != t.shape \
            or not tangent_dtype_fits(t.dtype, stack.dtype):
        raise RuntimeError(
            f"{type(m).__name__}.{name} is now a {t.dtype} tensor of shape {tuple(t.shape)} on "
            f"{t.device}, but its tangent ({stack.dtype}, {tuple(stack.shape[1:])}, "
            f"{stack.device}) was set before it changed; set its tangent again")


def _check_still_bound(m: nn.Module) -> None:
    """Refuse a parameter of ``m`` replaced since ``set_tangents`` gave it its tangent."""
    for name, t in _BOUND.get(m, {}).items():
        if m._parameters.get(name) is not t:
            raise RuntimeError(
                f"{type(m).__name__}.{name} was replaced after its tangent was set; set "
                "its tangent again with fgkernels.set_tangents, or clear it with "
                "fgkernels.clear_tangents (torch.func.functional_call swaps in the "
                "tensors it is given, which carry no tangent: call the module itself)")


# bumped at every set_tangents and clear_tangents: a list of bound modules made before is stale
_bound_generation = [0]


def check_tangents_still_fit(module: nn.Module, listed: list) -> None:
    """What an eager pass checks at each module call, for a pass whose modules' hooks do not
    run (a compiled one): a parameter replaced since its tangent was set, or changed in dtype,
    shape or device, is refused (it would carry no tangent, or a tangent it no longer fits).
    ``listed``, the caller's own one-element list, keeps the modules of ``module`` that
    ``set_tangents`` bound, listed again after each binding."""
    if not listed or listed[0][0] != _bound_generation[0]:
        listed[:] = [(_bound_generation[0],
                      [(m, bound) for m in module.modules() if (bound := _BOUND.get(m))])]
    for m, bound in listed[0][1]:
        for name, t in bound.items():
            if m._parameters.get(name) is not t:
                _check_still_bound(m)
            entry = tangent_of(t)
            if entry is not None:
                _check_tangent_fits(m, name, t, entry.stack)


def _refuse_script_module(m: nn.Module, name: Optional[str] = None) -> None:
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


def _holds_dual(values: Iterable) -> bool:
    """True if a Dual is among ``values`` or inside a tuple, list or dict among them, at any
    depth (``model({"x": [Dual(x)]})``)."""
    for v in values:
        if isinstance(v, Dual):
            return True
        if isinstance(v, (tuple, list)) and _holds_dual(v):
            return True
        if isinstance(v, dict) and _holds_dual(v.values()):
            return True
    return False


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


class ParameterTangents(TorchFunctionMode):
    """Every op that meets a tensor with a recorded tangent takes it as its Dual, whatever the
    other operands: the dual pass's substitution written as a torch function mode, which
    ``torch.compile`` traces (it cannot trace the substitution of module parameters)."""

    # Dynamo hands it ``p.T`` and the other tensor-valued properties, as eager torch does
    # (``dynamo.route_tensor_properties_through_modes``).
    traces_tensor_properties = True

    @eager_between_graphs
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if inside_rule() or isinstance(func, (torch._ops.OpOverload,
                                              torch._ops.OpOverloadPacket)):
            return func(*args, **kwargs)  # a rule's own ops, a compiled graph's kernels
        temporaries = _compiled_pass.temporaries
        if temporaries is not None and temporaries.tensors:
            temporaries.refuse_views_taken_before((args, kwargs))
        if not (_meets_dual(args) or _meets_dual(kwargs.values())):
            # Most calls: a compiled graph's wrapper reads every output's dtype, for one.
            return func(*args, **kwargs)
        return _lifted_call(func, args, kwargs)


def _lifted_call(func, args: tuple, kwargs: dict):
    """``func`` called with every tensor with a tangent among its arguments taken as its
    Dual: the Dual's rule for it."""
    flat, spec = pytree.tree_flatten((args, kwargs))
    flat = [with_recorded_tangent(v) for v in flat]
    if not any(isinstance(v, Dual) for v in flat):  # (a tangent cleared during the pass)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)
    args, kwargs = pytree.tree_unflatten(flat, spec)
    name = _tensor_attribute(func)
    if name is not None and args and isinstance(args[0], Dual):
        # ``p.shape``, ``p.data``, ``p.detach()``: the Dual answers as it does in an eager
        # pass, where the module holds it (a property read goes nowhere near the op rules).
        if not callable(getattr(torch.Tensor, name)):
            return getattr(args[0], name)
        if name in _DUAL_PROTOCOLS:  # no keywords (torch's repr passes one of its own)
            return getattr(args[0], name)(*args[1:])
        if name in _DUAL_METHODS:
            return getattr(args[0], name)(*args[1:], **kwargs)
    return Dual.__torch_function__(func, (Dual,), args, kwargs)


def _lifting_torch_function(cls, func, types, args=(), kwargs=None):
    """A lifted tensor's ops during its thread's dual pass, on its Dual; those of a rule
    (which acts on primals), any other thread's, an attribute set (``p.requires_grad =
    False``) and a read of an attribute that its Dual reads from it (``p.shape``, ``p.grad``,
    ``p.requires_grad``) as its class's own."""
    kwargs = kwargs or {}
    kind = getattr(func, "__name__", None)
    if inside_rule() or not in_dual_pass() or kind == "__set__" \
            or (kind == "__get__" and _tensor_attribute(func) not in _VALUE_PROPERTIES):
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)
    return _lifted_call(func, args, kwargs)


# The properties of a tensor whose values carry its tangent (``w.T``); the others describe it.
_VALUE_PROPERTIES = frozenset({"T", "mT", "H", "mH", "real", "imag"})


class _Lifted:
    """Mixin of the lifted classes: a copy or a pickle of a lifted tensor is of its own
    class, with no tangent (as a state dict leaves the tangent behind)."""

    __torch_function__ = classmethod(_lifting_torch_function)

    def __deepcopy__(self, memo):
        with _unlifted(self):
            return copy.deepcopy(self, memo)

    def __reduce_ex__(self, protocol):
        with _unlifted(self):
            return self.__reduce_ex__(protocol)


class _LiftedParameter(_Lifted, nn.Parameter):
    """A Parameter with a tangent while a dual pass runs (``_Pass.lift_the_rest``)."""


class _LiftedTensor(_Lifted, Tensor):
    """A plain tensor with a tangent while a dual pass runs (``_Pass.lift_the_rest``)."""


_LIFTED = {nn.Parameter: _LiftedParameter, Tensor: _LiftedTensor}
_UNLIFTED = {lifted: cls for cls, lifted in _LIFTED.items()}
# id -> [a weak reference to the lifted tensor, how many running passes hold it lifted]
_LIFTS: dict[int, list] = {}
_LIFTS_LOCK = threading.Lock()


def _lift(t: Tensor) -> bool:
    """Lift ``t`` for one more running pass (False if its class is not one that lifts)."""
    with _LIFTS_LOCK:
        entry = _LIFTS.get(id(t))
        if entry is None or entry[0]() is not t:
            if type(t) not in _LIFTED:
                return False
            key = id(t)
            # (a tensor freed while lifted takes its entry with it; no lock in a callback,
            # which the collector may run while this thread holds it)
            entry = _LIFTS[key] = [weakref.ref(t, lambda _, key=key: _LIFTS.pop(key, None)), 0]
            t.__class__ = _LIFTED[type(t)]
        entry[1] += 1
        return True


def _unlift(t: Tensor) -> None:
    """One running pass lets go of ``t``: its own class again when none holds it."""
    with _LIFTS_LOCK:
        entry = _LIFTS.get(id(t))
        if entry is None or entry[0]() is not t:
            return
        entry[1] -= 1
        if entry[1] == 0:
            del _LIFTS[id(t)]
            t.__class__ = _UNLIFTED.get(type(t), type(t))


@contextlib.contextmanager
def _unlifted(t: Tensor) -> Iterator[None]:
    lifted = type(t)
    t.__class__ = _UNLIFTED[lifted]
    try:
        yield
    finally:
        t.__class__ = lifted


# Tensor methods that a Dual answers with a method of its own (``detach``, ``size``, ...),
# rather than through an op rule; and Python's protocols, which it answers too (``len(p)``,
# ``repr(p)``, ``bool(p)``, ``x in p``).
_DUAL_METHODS = frozenset(n for n, v in vars(Dual).items()
                          if callable(v) and not n.startswith("_") and hasattr(Tensor, n)) \
    | PRIMAL_METADATA
_DUAL_PROTOCOLS = frozenset({"__len__", "__repr__", "__format__", "__contains__", "__bool__",
                             "__int__", "__float__", "__index__", "__complex__"}) & set(vars(Dual))


def _tensor_attribute(func) -> Optional[str]:
    """The name of the Tensor attribute ``func`` reads (a property's getter, as torch hands it
    to a torch function mode) or calls (a method), else None."""
    descriptor = getattr(func, "__self__", None)
    if getattr(func, "__name__", None) == "__get__" and \
            getattr(descriptor, "__objclass__", None) is torch._C.TensorBase:
        return descriptor.__name__
    name = getattr(func, "__name__", None)
    return name if name is not None and getattr(Tensor, name, None) is func else None


def _meets_dual(values: Iterable) -> bool:
    """True if a Dual or a tensor with a tangent is among ``values`` or inside a container of
    them. (An op on Duals alone is handed to their rules here too: Dynamo, tracing the mode,
    cannot trace the op's own call on a tuple of Duals, ``torch.cat((a, b))``.)"""
    for v in values:
        if isinstance(v, (tuple, list, dict)):
            if any(_is_dual(leaf) for leaf in pytree.tree_leaves(v)):
                return True
        elif _is_dual(v):
            return True
    return False


def _is_dual(v) -> bool:
    return isinstance(v, Dual) or tangent_of(v) is not None


def with_recorded_tangent(v):
    """``v`` as its Dual where it is a tensor with a recorded tangent, else as it is."""
    d = dual_of(v) if isinstance(v, Tensor) else None
    return v if d is None else d


class _CompiledPass(threading.local):
    """Whether this thread runs a compiled dual pass of ``fgkernels.compile`` (under
    ``ParameterTangents``, which does the hooks' substitution), and the tensors of its forward
    that it takes as Duals (``_CompiledTemporaries``). Per thread: an eager pass in another
    thread substitutes as ever. (Set on the instance at each thread's first use, as
    ``value._RuleDepth``.)"""

    def __init__(self):
        self.running = False
        self.temporaries: Optional[_CompiledTemporaries] = None

    @contextlib.contextmanager
    def run(self, root: nn.Module) -> Iterator[_CompiledTemporaries]:
        """A compiled pass of ``root`` runs in this thread for the length of the block (the
        one that ran before, if any, is back after it); the temporaries' tangents are dropped
        as it ends."""
        outer = self.running, self.temporaries
        self.running, self.temporaries = True, _CompiledTemporaries(root)
        try:
            yield self.temporaries
        finally:
            self.temporaries.drop()
            self.running, self.temporaries = outer


_compiled_pass = _CompiledPass()


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
            wanted = bool(_LIVE) or census.alive() > 0
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
        if _compiled_pass.running:  # ParameterTangents does the substitution's work
            if type(module) is parametrize.ParametrizationList:
                # A parametrized weight read inside a rule (a twin's ``self.weight``) is
                # computed as the model's own code: ParameterTangents hands its sources'
                # tangents to its ops. (An eager pass substituted the sources already.)
                leave_rule()
            return
        # Dynamo traces this call (fgkernels asks ``is_dynamo_compiling`` throughout: torch
        # holds ``is_compiling`` true in every thread while any one compiles).
        if torch.compiler.is_dynamo_compiling():
            if _holds_dual(args) or (self.roots and is_dual_pass_root(module)):
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
        if _holds_dual(args) or (self.roots and is_dual_pass_root(module)):
            active = self.local.active = _Pass(module, sys._getframe(1))
            # The pass ends after the root's own forward hooks, which torch runs after the
            # global ones: a hook of the root's reads its parameters with their tangents.
            active.ending = module.register_forward_hook(self.root_done, always_call=True)
        elif not _LIVE and census.alive() == 0:
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
        if _compiled_pass.running and type(module) is parametrize.ParametrizationList:
            return_to_rule()
        if _compiled_pass.running or torch.compiler.is_dynamo_compiling():
            return
        if getattr(self.local, "active", None) is not None:
            return  # the pass's root ends it (``root_done``)
        # rest is (kwargs, output), or (output,) when the forward raised
        if len(rest) == 2 and rest[0] and _holds_dual(rest[0].values()) \
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


_hooks = _Hooks()
census.register = _hooks.sync_unless_compiling


@contextlib.contextmanager
def dual_pass(module: nn.Module) -> Iterator[None]:
    """Inside the block, each call of ``module`` (in this thread) is a dual pass, whatever its
    inputs, as a call with a Dual among its positional inputs is: its parameters carry their
    tangents. For a model that takes only integers (a language model's token ids: the
    embedding's weight brings the tangents in) or takes its Duals by keyword
    (``model(pixel_values=Dual(x))``). ``fgkernels.compile(module)`` honours it too. Blocks
    nest; a call with no tangent anywhere is the plain call it was."""
    check_module(module, "dual_pass")
    roots = _hooks.local.__dict__.setdefault("roots", [])
    roots.append(module)
    with _hooks.roots_lock:
        _hooks.roots += 1
    try:
        yield
    finally:
        del roots[max(i for i, m in enumerate(roots) if m is module)]
        with _hooks.roots_lock:
            _hooks.roots -= 1


def is_dual_pass_root(module: nn.Module) -> bool:
    """True if ``module``'s calls are dual passes in this thread (``dual_pass``)."""
    return any(m is module for m in getattr(_hooks.local, "roots", ()))


def in_dual_pass() -> bool:
    """True while a dual pass runs in this thread (its parameters substituted; a pass an
    interrupt cut short does not run: the next module call ends it)."""
    active = getattr(_hooks.local, "active", None)
    return active is not None and active.running()


@contextlib.contextmanager
def lifted_set_aside() -> Iterator[None]:
    """The tensors this thread's eager pass holds lifted, of their own class for the length of
    the block: a compiled call inside the pass (``fgkernels.compile``), whose trace would take
    the subclass for a tensor subclass of its own and whose ``ParameterTangents`` hands out
    their tangents."""
    active = running_pass()
    held = [] if active is None else \
        [t for t in (ref() for ref in active.lifted) if t is not None and type(t) in _UNLIFTED]
    with contextlib.ExitStack() as stack:
        for t in held:
            stack.enter_context(_unlifted(t))
        yield


@contextlib.contextmanager
def hooks_set_aside() -> Iterator[None]:
    """fgkernels' global module hooks removed for the length of the block, which runs no dual
    pass: the plain calls of a baseline, timed as in a process without fgkernels (with the
    hooks registered, every module call of every model takes torch's slower call path). They
    are registered again after it, as the tensors with tangents and the Duals want them."""
    if running_pass() is not None:
        raise RuntimeError("hooks_set_aside: a dual pass is running in this thread")
    with _hooks.lock:
        _hooks.take_out()
        census.hooks_on = False
    try:
        yield
    finally:
        _hooks.sync()


def running_pass() -> Optional[_Pass]:
    """This thread's dual pass, while it runs (else None)."""
    active = getattr(_hooks.local, "active", None)
    return active if active is not None and active.running() else None


def writing_pass():
    """The pass that takes a tensor of this thread's forward that a Dual is written into as a
    Dual (``take_as_dual``): the compiled pass running, else the eager one (None if none
    runs)."""
    return _compiled_pass.temporaries if _compiled_pass.running else running_pass()


def foreign_module_hooks() -> bool:
    """True if a global module forward hook or pre-hook other than fgkernels' own is
    registered (it would see, and may keep, what any module is called with). Asked for every
    layer of a dual pass, so it counts: fgkernels' own hooks, while registered, are one of
    each kind."""
    return len(torch_module._global_forward_hooks) \
        + len(torch_module._global_forward_pre_hooks) > _hooks.registered


@torch.no_grad()
def _stack_parameter(name: str, p: Tensor, tangent, direction: Optional[int]):
    """A parameter's tangent stacked, each slot in the parameter's layout (``Dual``'s rule)."""
    if tangent is None:
        raise TypeError(f"set_tangents: the tangent of {name!r} is None; give a tensor, or "
                        f"leave the parameter out (clear_tangents removes tangents)")
    single = check_tangent(p.detach(), tangent, f"set_tangents: the tangent of {name!r}")
    stack = in_primal_layout(tangent.unsqueeze(0) if single else tangent, p)
    if direction is None:
        return ParameterTangent(stack, None, single)
    if not single:
        raise ValueError(f"set_tangents: with direction={direction}, the tangent of {name!r} "
                         f"must have the parameter's shape {tuple(p.shape)}")
    return ParameterTangent(stack, (direction,), False)


def _owner_and_leaf(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    if not path:
        return module, leaf
    owner = module
    for part in path.split("."):  # (not get_submodule, which a TorchScript module refuses)
        owner = owner._modules[part]
    return owner, leaf


def set_tangents(module: nn.Module, tangents: Mapping[str, Tensor],
                 direction: Optional[int] = None) -> None:
    """Give parameters of ``module`` a tangent for the next dual passes.

    ``tangents`` maps names as in ``module.named_parameters()`` (a tied parameter by any of its
    names, or by several with the same tensor) to a tensor of the parameter's shape (one
    tangent) or ``(T, *shape)`` (T tangents); every tangent of one call has the same T. With
    ``direction=j`` each (single) tangent belongs to direction j alone: the outputs it reaches
    gain a slot for j while the input carries none. The tangent belongs to the tensor: wherever
    the model reads it during a dual pass, it is a Dual. Everything is checked before anything
    is set.
    """
    check_module(module, "set_tangents")
    check_direction(direction, "set_tangents")
    _hooks.end_stale()
    if not isinstance(tangents, Mapping):
        raise TypeError(f"set_tangents: tangents must map parameter names to tensors, got "
                        f"{type(tangents).__name__}")
    params = dict(module.named_parameters(remove_duplicate=False))
    staged: dict[int, tuple[Tensor, ParameterTangent, str]] = {}
    for name, tangent in tangents.items():
        if name not in params:
            known = ", ".join(list(dict(module.named_parameters()))[:12])
            raise KeyError(f"set_tangents: unknown parameter name {name!r}; the module's "
                           f"parameters are: {known}{', ...' if len(params) > 12 else ''}")
        p = params[name]
        earlier = staged.get(id(p))
        if earlier is not None:  # a tied parameter by another name: the same tangent only
            if tangent is not tangents[earlier[2]]:
                raise ValueError(f"set_tangents: {earlier[2]!r} and {name!r} are the same (tied) "
                                 "parameter; give its tangent once")
            continue
        owner, _ = _owner_and_leaf(module, name)
        if isinstance(owner, torch.jit.ScriptModule):
            _refuse_script_module(owner, name)
        staged[id(p)] = (p, _stack_parameter(name, p, tangent, direction), name)
    counts = {e.stack.shape[0] for _, e, _ in staged.values() if e.directions is None}
    if len(counts) > 1:
        raise ValueError(f"set_tangents: the tangents of one call must share T, got "
                         f"{sorted(counts)}")
    if len({e.single for _, e, _ in staged.values() if e.directions is None}) > 1:
        raise ValueError("set_tangents: give every tangent of one call in its parameter's shape "
                         "(one tangent) or every one stacked (T, *shape), not both")
    for m in module.modules():
        # A parameter removed since its tangent was set (a prune or a parametrization moves it
        # under another name, whose tangent this call gives) is no longer refused.
        bound = _BOUND.get(m)
        for leaf in [leaf for leaf in bound or () if leaf not in m._parameters]:
            del bound[leaf]
    for p, entry, _ in staged.values():
        _put(p, entry)
    for name, p in params.items():
        if id(p) in staged:
            owner, leaf = _owner_and_leaf(module, name)
            _BOUND.setdefault(owner, {})[leaf] = p
    _bound_generation[0] += 1
    _hooks.sync()


def check_module(module, who: str) -> None:
    """Raise TypeError naming ``who`` unless ``module`` is an nn.Module."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"{who}: expected an nn.Module, got {type(module).__name__}")


def random_tangents(module: nn.Module, num_tangents: Optional[int] = None,
                    generator: Optional[torch.Generator] = None,
                    direction: Optional[int] = None,
                    dtype: Optional[torch.dtype] = None) -> dict[str, Tensor]:
    """Draw a standard normal tangent for every parameter of ``module`` (``(num_tangents,
    *shape)`` when given; a tied parameter once, under its first name), set them, and return
    them by name.

    ``dtype``: the tangents' dtype (default: that of an enclosing ``fgkernels.tangent_dtype``
    block, else the parameter's); drawn in float32 and rounded, so that a bfloat16 draw is the
    rounding of the float32 one from the same generator state. Each tangent is laid out like its
    parameter (a channels_last weight gets channels_last slots). Every argument is checked
    before anything is drawn (the generator moves only for a call that sets tangents)."""
    check_module(module, "random_tangents")
    if num_tangents is not None and (isinstance(num_tangents, bool)
                                     or not isinstance(num_tangents, int) or num_tangents < 1):
        raise ValueError(f"random_tangents: num_tangents must be a positive int, "
                         f"got {num_tangents!r}")
    check_direction(direction, "random_tangents")
    if direction is not None and num_tangents is not None:
        raise ValueError("random_tangents: a direction holds one tangent per parameter; give "
                         "direction or num_tangents, not both")
    check_dtype(dtype, "random_tangents")
    _hooks.end_stale()
    targets = {}  # (every dtype resolved before the first draw)
    for name, p in module.named_parameters():
        try:
            targets[name] = resolve_tangent_dtype(p.dtype, dtype)
        except TypeError as e:
            raise TypeError(f"random_tangents: {name}: {e}") from None
    drawn = {}
    for name, p in module.named_parameters():
        shape = p.shape if num_tangents is None else (num_tangents, *p.shape)
        target = targets[name]
        # a narrower tangent is the rounding of the draw at the parameter's precision (a
        # complex one drawn complex: acc_dtype(complex64) is real)
        draw_dtype = p.dtype if target == p.dtype or target.is_complex else acc_dtype(target)
        t = torch.randn(shape, generator=generator, dtype=draw_dtype, device=p.device)
        drawn[name] = _laid_out_like(t, p).to(target)
    set_tangents(module, drawn, direction=direction)
    return drawn


def _laid_out_like(t: Tensor, p: Tensor) -> Tensor:
    """``t`` (p's shape, or a stack of them) with every slot in p's memory format, so that the
    kernels take it as it is: a channels_last weight gets channels_last tangents (the values
    are those of the contiguous draw, whatever the layout)."""
    if p.dim() != 4 or p.is_contiguous() or not p.is_contiguous(memory_format=torch.channels_last):
        return t
    if t.dim() == 4:
        return t.contiguous(memory_format=torch.channels_last)
    return t.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)


def clear_tangents(module: nn.Module) -> None:
    """Remove the tangent of every parameter of ``module`` and its children."""
    check_module(module, "clear_tangents")
    _hooks.end_stale()
    for p in module.parameters():
        _drop(p)
    for m in module.modules():
        _BOUND.pop(m, None)
    _bound_generation[0] += 1
    _hooks.sync()

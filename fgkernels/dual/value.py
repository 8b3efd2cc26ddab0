"""``Dual``: a primal tensor travelling with its tangent(s) through a forward-mode pass."""
from __future__ import annotations

import inspect
import itertools
import operator
import threading
from collections.abc import Sequence
from typing import Callable, NamedTuple, Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch.utils import _pytree as pytree

from . import rule_table
from .dtypes import tangent_dtype_fits
from .dynamo import (
    add_matmul_of_objects,
    add_reflected_matmul,
    eager_between_graphs,
    route_private_functions_through_modes,
    route_rows_and_abs_through_modes,
    route_tensor_properties_through_modes,
    trace_checkpoints_as_calls,
    when_dynamo_loads,
)
from .layout import (
    in_kernel_layout,
    kernel_format,
    laid_out_as,
    may_overlap,
    non_overlapping_and_dense,
    shares_memory,
    slots_in_format,
    slots_in_strides_like,
    slots_in_strides_of,
    slots_laid_out_as,
    slots_step_like,
    slots_viewed_as,
    steps_like,
    view_root,
    within_span,
)
from .rule_state import in_rule
from .rule_table import library_op_name
from .slots import Directions, SlotOperand, positions_index

when_dynamo_loads(add_reflected_matmul)
when_dynamo_loads(add_matmul_of_objects)
when_dynamo_loads(route_tensor_properties_through_modes)
when_dynamo_loads(route_rows_and_abs_through_modes)
when_dynamo_loads(route_private_functions_through_modes)
when_dynamo_loads(trace_checkpoints_as_calls)


def _as_given(value):
    """``value`` (a copy's or an unpickled object's constructor that gives its argument)."""
    return value


def _or_not_implemented(op: Callable, a, b):
    """``op(a, b)``, or NotImplemented where it refuses ``b``'s type (or ``b`` is None): Python
    then compares identities, as it does for a tensor."""
    if b is None:
        return NotImplemented
    try:
        return op(a, b)
    except TypeError:
        return NotImplemented


def _writable(t: Optional[torch.Tensor]) -> bool:
    """True unless ``t`` may be expanded (a stride-0 dim), where a write would hit one element
    many times. (Any stride 0 counts: checked at C speed on every view op.)"""
    return t is None or 0 not in t.stride()


class _Storage(NamedTuple):
    """The tensors an in-place op on a Dual writes into: a parameter's Dual writes into the
    parameter and its tangent (``parameter``), a view into the tensors it views (``view``),
    a Dual that has views into its own tensors, so that its views see the op (``viewed``)."""

    primal: torch.Tensor
    stack: Optional[torch.Tensor]
    kind: str


def check_tangent(primal: torch.Tensor, tangent: torch.Tensor, what: str) -> bool:
    """Validate ``tangent`` against ``primal``; return True for a single (unstacked) tangent."""
    if not isinstance(tangent, torch.Tensor) or isinstance(tangent, Dual):
        raise TypeError(f"{what} must be a Tensor or None, got {type(tangent).__name__}")
    if not tangent_dtype_fits(primal.dtype, tangent.dtype):
        kind = "complex" if primal.dtype.is_complex else "floating"
        raise TypeError(f"{what} has dtype {tangent.dtype}; a tangent of a {primal.dtype} "
                        f"primal must be {primal.dtype} or a {kind} dtype of fewer bits")
    if tangent.device != primal.device:
        raise ValueError(f"{what} is on {tangent.device}, but the primal is on {primal.device}")
    if tangent.shape == primal.shape:
        return True
    if tangent.dim() == primal.dim() + 1 and tangent.shape[1:] == primal.shape:
        if tangent.shape[0] == 0:
            raise ValueError(f"{what}: a stack of T tangents needs T >= 1; a zero tangent is "
                             "None")
        return False
    raise ValueError(
        f"{what} has shape {tuple(tangent.shape)}; expected the primal's shape "
        f"{tuple(primal.shape)} or (T, {', '.join(map(str, primal.shape))})")


def differentiable(dtype: torch.dtype) -> bool:
    """Whether values of ``dtype`` have tangents (floating and complex dtypes, as forward_ad)."""
    return dtype.is_floating_point or dtype.is_complex


class _SlotsToLayOut(threading.local):
    """The Duals whose slots a view op could not view as it viewed their primals
    (``Dual.as_view``: slots laid out unlike the primal, a broadcast stack in a compiled pass, a
    view that changes the dtype): ``Dual.__torch_function__`` lays them out as the primals and
    runs the op again, so that its results view them (``torch.atleast_2d(a, b)`` asks for
    both). Per thread, as the rules that ask run."""

    def __init__(self):
        self.duals: list[Dual] = []

    def ask(self, dual: Dual) -> None:
        if not any(d is dual for d in self.duals):
            self.duals.append(dual)

    def take(self) -> list[Dual]:
        duals, self.duals = self.duals, []
        return duals


_slots_to_lay_out = _SlotsToLayOut()


def check_direction(direction, who: str) -> None:
    """Raise ValueError naming ``who`` unless ``direction`` is None or a non-negative int."""
    if direction is not None and (not isinstance(direction, int) or isinstance(direction, bool)
                                  or direction < 0):
        raise ValueError(f"{who}: direction must be a non-negative int, got {direction!r}")


def _check_directions(directions: Sequence[int], count: int) -> tuple[int, ...]:
    try:
        items = () if isinstance(directions, (str, bytes)) else tuple(directions)
        if len(items) != len(directions) or any(isinstance(d, bool) for d in items):
            raise TypeError
        directions = tuple(operator.index(d) for d in items)
    except TypeError:
        raise TypeError(f"directions must be a sequence of ints, got {directions!r}") from None
    if len(directions) != count:
        raise ValueError(f"directions has {len(directions)} entries for {count} tangents")
    if any(d < 0 for d in directions) or list(directions) != sorted(set(directions)):
        raise ValueError(f"directions must be distinct non-negative ints in increasing order, "
                         f"got {directions}")
    return directions


class _Census:
    """How many Duals exist. fgkernels' global module hooks are registered while any does (as
    while a tensor has a tangent), so that a module called with a Dual runs a dual pass, which
    a tensor its forward fills from Duals needs even where no parameter has a tangent
    (``passes._Pass.take_as_dual``).

    Two counters, of the Duals made and of those freed, each advanced by one C call (``next``
    on an ``itertools.count``, which no other thread interleaves): no lock on the path of
    every op. ``alive`` reads the freed one first, so that a Dual made and freed between the
    two reads can only make the answer high. A Dual made while Dynamo traces is not counted (no
    object of a trace is freed); ``fgkernels.compile`` counts the Duals its call returns. The
    hooks' owner sets ``hooks_on`` and ``register``: a Dual made by the constructor while the
    hooks are off registers them (the Duals the ops make come from Duals that exist)."""

    def __init__(self):
        self.made, self.freed = itertools.count(), itertools.count()
        self.hooks_on = False
        self.register: Callable[[], None] = lambda: None

    def alive(self) -> int:
        """How many Duals exist (at least)."""
        freed = self.freed.__reduce__()[1][0]
        return self.made.__reduce__()[1][0] - freed

    def count(self) -> bool:
        """Count a Dual made now (False, and nothing counted, while Dynamo traces)."""
        if torch.compiler.is_dynamo_compiling():
            return False
        next(self.made)
        return True


census = _Census()


class Dual:
    """A primal tensor and its tangent(s): the value and directional derivative(s) of a function.

    ``tangent`` is ``None`` (identically zero: every term it would feed is skipped), a tensor of
    the primal's shape (one tangent), or of shape ``(T, *primal.shape)`` (T tangents carried
    together). ``directions`` labels the T slots of a stacked tangent with direction numbers
    (increasing): a direction that enters part way down a network has no slot before it, and ops
    take the union of their operands' directions. Without labels, every operand of an op must
    carry the same T.

    Every torch function and Tensor method accepts a Dual through ``__torch_function__``
    (``torch.flatten(d, 1)``, ``F.relu(d)``, ``d + e``, ``d.permute(0, 2, 3, 1)``, ...): ops with
    an fgkernels rule run it; any other op is differentiated by PyTorch's own forward-mode AD on
    that op alone (``fgkernels.fallback_ops()``; ``fgkernels.strict_rules()`` refuses it).
    In-place ops rebind the Dual's parts to the result (``d += e``, ``d.relu_()``, ``d.mul_(2)``,
    ``F.relu_(d)``), in its own dtypes; on a view of a Dual (``d[1:3]``, ``d.view(-1)``) they
    write into the tensors it views, as on a view of a tensor, and on a Dual that has such views
    into its own tensors, which the views then see (``as_view``).

    The tangent may have a lower precision than the primal (``Dual(x_float32, t_bfloat16)``):
    every op then computes its tangent terms in that dtype, with float32 accumulation and
    float32 batch-norm statistics, and the primal exactly as before.
    """

    __slots__ = ("primal", "_stack", "directions", "_single", "_source", "_counted",
                 "__weakref__")
    # NumPy defers to the Dual's own operators (``np.float64(2) * d`` is ``d.__rmul__``), as
    # it does to a tensor's.
    __array_ufunc__ = None

    def __init__(self, primal: torch.Tensor, tangent: Optional[torch.Tensor] = None, *,
                 directions: Optional[Sequence[int]] = None):
        if not isinstance(primal, torch.Tensor) or isinstance(primal, Dual):
            raise TypeError(f"primal must be a Tensor, got {type(primal).__name__}")
        if not differentiable(primal.dtype):
            raise TypeError(f"a Dual's primal must have a floating or complex dtype (only those "
                            f"have tangents), got {primal.dtype}")
        if fwAD._current_level >= 0:
            refuse_nested_forward_mode((primal, tangent))
        self.primal, self._source = primal, None
        self._counted = census.count()
        if not census.hooks_on:
            census.register()
        if tangent is None:
            if directions is not None:
                raise ValueError("directions given without a tangent")
            self._stack, self.directions, self._single = None, None, False
            return
        single = check_tangent(primal, tangent, "tangent")
        if directions is not None:
            if single:
                raise ValueError("directions label a stacked tangent of shape (T, *primal.shape); "
                                 "stack a single tangent with tangent.unsqueeze(0)")
            directions = _check_directions(directions, tangent.shape[0])
        stack = in_primal_layout(tangent.unsqueeze(0) if single else tangent, primal)
        if shares_memory(stack, primal):
            stack = stack.clone()  # Dual(x, x): a write into the primal must not reach the slots
        self._stack = stack
        self.directions = directions
        self._single = single

    @classmethod
    def _unchecked(cls, primal: torch.Tensor, stack: Optional[torch.Tensor],
                   directions: Directions, single: bool) -> Dual:
        """Build from an already-stacked tangent without validating it (for the ops, whose
        outputs are consistent by construction)."""
        d = cls.__new__(cls)
        d.primal, d._stack, d.directions, d._single = primal, stack, directions, single
        d._source, d._counted = None, census.count()
        return d

    def __reduce_ex__(self, protocol):
        """A parameter's Dual during a pass copies and pickles as the parameter, without
        tangent (a module deep-copied in its forward, an EMA teacher, gets plain parameters,
        as forward_ad's dual parameter copies to a plain one); any other Dual as itself."""
        parameter = self._parameter()
        if parameter is not None:
            return _as_given, (parameter,)
        return super().__reduce_ex__(protocol)

    def __setstate__(self, state) -> None:
        """A copy or an unpickled Dual (made without ``__init__``) takes its slots, and is
        counted (``census``) as a Dual of its own."""
        for name, value in state[1].items():
            if name != "_counted":
                setattr(self, name, value)
        self._counted = census.count()

    def __del__(self, _freed=census.freed):  # (bound early: still there as Python exits)
        if getattr(self, "_counted", False):
            next(_freed)

    @classmethod
    def _of_parameter(cls, p: torch.Tensor, stack: torch.Tensor, directions: Directions,
                      single: bool) -> Dual:
        """The Dual a parameter ``p`` with a tangent is during a dual pass. An in-place op on it
        (``w.clamp_(0, 1)`` under ``no_grad``) writes through to ``p`` and to its tangent, as
        it would on a dual tensor of ``torch.autograd.forward_ad``."""
        with torch._C.DisableTorchFunctionSubclass():  # (a lifted parameter: its plain self)
            primal = p.detach()
        d = cls._unchecked(primal, stack, directions, single)
        d._source = _Storage(p, stack, "parameter")
        return d

    # --- the tangent ---------------------------------------------------------------------------
    @property
    def tangent(self) -> Optional[torch.Tensor]:
        """The tangent as given: None, primal-shaped (single), or ``(T, *primal.shape)``."""
        if self._stack is None:
            return None
        return self._stack[0] if self._single else self._stack

    @property
    def tangents(self) -> Optional[torch.Tensor]:
        """The tangent always stacked, ``(T, *primal.shape)``; None when zero."""
        return self._stack

    @property
    def tangent_dtype(self) -> Optional[torch.dtype]:
        """The tangent's dtype (None when the tangent is zero)."""
        return None if self._stack is None else self._stack.dtype

    @property
    def num_tangents(self) -> int:
        """T, the number of tangent slots (0 when the tangent is None)."""
        return 0 if self._stack is None else self._stack.shape[0]

    def slot_operand(self) -> Optional[SlotOperand]:
        """This Dual's slots, as ``_slots.plan`` takes them (None when the tangent is zero)."""
        if self._stack is None:
            return None
        return SlotOperand(self._stack.shape[0], self.directions, self._single,
                           self._stack.dtype, self._stack.dtype != self.primal.dtype)

    def with_tangents(self, primal: torch.Tensor, stack: Optional[torch.Tensor]) -> Dual:
        """A Dual with the same slots as this one but a new primal and stacked tangent."""
        return Dual._unchecked(primal, stack, self.directions if stack is not None else None,
                               self._single and stack is not None)

    def as_view(self, out: Dual) -> Dual:
        """``out``, the result of a view op on this Dual: when its primal and its slots are
        views of this Dual's, an in-place op on ``out`` writes into them, as on a view of a
        tensor (``d.view(-1).add_(1)``, ``d[1:3].zero_()``, ``for row in d: row.mul_(2)``),
        and from then on an in-place op on this Dual writes into its own tensors too, so that
        its views see it (``c = d[0]; d.mul_(3)``), as forward_ad's do. A Dual whose slots
        cannot take such writes (broadcast: a stride 0) first takes slots of its own, laid out
        as its primal (``_slots_laid_out_for``). An ``out`` whose primal is fresh (a reshape that
        copies) gets a tangent of its own too, and one whose tangent is fresh a primal of its
        own (a write into a view must reach both or neither). A Dual whose slots are laid out
        unlike its primal (as ``in_primal_layout`` leaves none; an op's output may), where a
        later view of the primal could not view them, and one whose slots the copy above
        cannot give (a view that changes the dtype, ``d.real``; any view while Dynamo traces a
        compiled pass, where no offset can be asked) has the op that made ``out`` run again on
        its slots laid out as its primal (``_SlotsToLayOut``) before its first view, so that
        every view of it views them."""
        views = out._views(self)
        lay_out = self._may_lay_out_slots_for(out)
        if views:
            # (an expanded view too, and a view of one: an in-place op on a view that overlaps
            # itself is refused, ``_write_through``, and one on this Dual reaches it). A Dual
            # that writes into tensors of its own (a view) passes them on.
            if self._source is not None or (_writable(self.primal) and _writable(self._stack)
                                            and not lay_out):
                return self._linked_view(out)
        elif out._stack is not None and self._stack is not None \
                and view_root(out._stack) is view_root(self._stack):
            out._stack = out._stack.clone()
            return out
        elif view_root(out.primal) is not view_root(self.primal):
            return out
        stack = self._slots_laid_out_for(out)
        if stack is not None:
            out._stack = stack
            return self._linked_view(out)
        if lay_out:
            _slots_to_lay_out.ask(self)
        if not views:
            out.primal = out.primal.clone()
        return out

    def _may_lay_out_slots_for(self, out: Dual) -> bool:
        """True if ``out``, a view of this Dual's primal that views none of its slots, would
        view them were they laid out as the primal (``layout.slots_in_strides_of``): a Dual
        that neither views nor has views (whose slots no view holds), of a primal no two of
        whose elements share memory, slots not laid out so yet, and ``out`` of its slots."""
        stack, primal = self._stack, self.primal
        return self._source is None and stack is not None and out._stack is not None \
            and not slots_in_strides_like(stack, primal) \
            and out.directions == self.directions and out._stack.shape[0] == stack.shape[0] \
            and view_root(out.primal) is view_root(primal) and not may_overlap(primal)

    def _linked_view(self, out: Dual) -> Dual:
        """``out``, a view of this Dual's primal and slots, made to write into them, and this
        Dual into its own tensors from then on (``as_view``)."""
        out._source = _Storage(out.primal, out._stack, "view")
        if self._source is None:
            self._source = _Storage(self.primal, self._stack, "viewed")
        return out

    def _slots_laid_out_for(self, out: Dual) -> Optional[torch.Tensor]:
        """The slots of ``out``, a view of this Dual's primal that cannot write into its slots:
        the same view, at the same offsets, of this Dual's slots laid out as its primal (each
        slot in the primal's strides, ``layout.slots_viewed_as``). Broadcast slots (a stride 0:
        many elements, one memory location) of a Dual that writes into no tensors of its own
        are laid out so here, a copy; a Dual that has views already has them so, and gives
        them to the later outputs of a view op that were made from its slots before the copy
        (``unbind``, iteration). None where the primal's elements may share memory (an
        expanded primal), the view's dtypes or slots are not this Dual's (``d.real``), or it
        reaches outside this Dual's memory (an ``as_strided``), and while Dynamo traces a
        compiled pass (no offset to ask there)."""
        stack, primal, source = self._stack, self.primal, self._source
        if torch.compiler.is_dynamo_compiling():
            return None
        if stack is None or out._stack is None or out._stack.dtype != stack.dtype \
                or out.primal.dtype != primal.dtype or out.directions != self.directions \
                or out._stack.shape[0] != stack.shape[0] or not within_span(out.primal, primal):
            return None
        if source is not None:
            if source.kind != "viewed" or not slots_in_strides_like(stack, primal):
                return None
        elif _writable(stack) or may_overlap(primal):
            return None
        else:
            self._stack = stack = slots_in_strides_of(stack, primal)
        return slots_viewed_as(stack, primal, out.primal)

    def _views(self, other: Dual) -> bool:
        """True if this Dual's primal views ``other``'s, and its slots ``other``'s (or neither
        has slots)."""
        if view_root(self.primal) is not view_root(other.primal):
            return False
        if self._stack is None or other._stack is None:
            return self._stack is None and other._stack is None
        return view_root(self._stack) is view_root(other._stack)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Dual:
        """Apply a linear, per-sample map ``fn`` to the primal and to every tangent slot."""
        y = fn(self.primal)
        if self._stack is None:
            return self.with_tangents(y, None)
        t = fn(self._stack.flatten(0, 1)) if self.primal.dim() else fn(self._stack)
        return self.with_tangents(y, t.reshape(self._stack.shape[0], *y.shape))

    def select_directions(self, directions: Sequence[int]) -> Dual:
        """Keep only the slots of the given (labelled) directions; absent ones stay absent.
        Keeping every slot gives this Dual itself; keeping fewer, a Dual of its own (a copy of
        the primal and of the kept slots: an in-place op on it, or through a view of it, acts
        on it as on any Dual, and this one, which carries the other slots too, is left as it
        is). (``d.select(dim, index)`` is ``Tensor.select``, as on any tensor.)"""
        if self._stack is None:
            return self
        if self.directions is None:
            raise ValueError("select_directions() needs a tangent labelled with directions")
        keep = [i for i, d in enumerate(self.directions) if d in set(directions)]
        if len(keep) == len(self.directions):
            return self
        primal = self.primal.clone()
        if not keep:
            return Dual._unchecked(primal, None, None, False)
        stack = self._stack[keep[0]:keep[-1] + 1].clone() \
            if keep == list(range(keep[0], keep[-1] + 1)) \
            else self._stack[positions_index(tuple(keep), self._stack.device)]
        return Dual._unchecked(primal, stack, tuple(self.directions[i] for i in keep), False)

    def detach(self) -> torch.Tensor:
        """The primal, cut from any autograd graph and without tangent (as ``detach`` of a dual
        tensor of ``torch.autograd.forward_ad``: ``x - x.detach()`` carries ``ẋ``)."""
        return self.primal.detach()

    def requires_grad_(self, requires_grad: bool = True) -> Dual:
        """Set ``requires_grad`` on the primal, as on a dual tensor of forward_ad; returns this
        Dual. (A dual pass keeps no autograd graph through its layers, whose rules run under
        ``torch.no_grad``: reverse mode differentiates the plain forward, not the pass.)"""
        self.primal.requires_grad_(requires_grad)
        return self

    @property
    def requires_grad(self) -> bool:
        """The primal's ``requires_grad`` (a parameter's Dual: the parameter's); setting it sets
        theirs, as ``requires_grad_`` (``hidden.requires_grad = True`` before gradient
        checkpointing, ``layer.weight.requires_grad = False`` during a pass)."""
        return self._requires_grad_holder().requires_grad

    @requires_grad.setter
    def requires_grad(self, requires_grad: bool) -> None:
        self._requires_grad_holder().requires_grad = requires_grad

    def _requires_grad_holder(self) -> torch.Tensor:
        parameter = self._parameter()
        return self.primal if parameter is None else parameter

    def _parameter(self) -> Optional[torch.Tensor]:
        """The parameter this Dual stands for in a dual pass (``_of_parameter``), else None."""
        source = self._source
        return source.primal if source is not None and source.kind == "parameter" else None

    # --- tensor-like surface -------------------------------------------------------------------
    shape = property(lambda self: self.primal.shape)
    dtype = property(lambda self: self.primal.dtype)
    device = property(lambda self: self.primal.device)
    ndim = property(lambda self: self.primal.dim())

    @property
    def data(self) -> torch.Tensor:
        """The primal's ``.data``, without tangent (as forward_ad's), sharing its storage: a
        write into it (``self.w.data.clamp_(-1, 1)``) writes into the primal, a parameter's
        included. Setting it (``self.w.data = self.w.data.clamp(-1, 1)``) sets the primal's,
        and a parameter's Dual's the parameter's too; the tangent stays, as forward_ad's does
        (a new shape, which the tangent could not follow, is refused)."""
        return self.primal.data

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        if not isinstance(value, torch.Tensor) or isinstance(value, Dual):
            raise TypeError(f"a Dual's .data must be set to a Tensor, got {type(value).__name__}")
        if value.shape != self.primal.shape:
            raise ValueError(f"a Dual's .data keeps its shape {tuple(self.primal.shape)} (its "
                             f"tangent's), got {tuple(value.shape)}")
        parameter = self._parameter()
        if parameter is not None:
            parameter.data = value
        self.primal.data = value

    def size(self, dim: Optional[int] = None):
        """The primal's size (of ``dim``)."""
        return self.primal.size() if dim is None else self.primal.size(dim)

    def dim(self) -> int:
        """The primal's number of dimensions."""
        return self.primal.dim()

    def numel(self) -> int:
        """The primal's number of elements."""
        return self.primal.numel()

    def is_contiguous(self, memory_format=torch.contiguous_format) -> bool:
        """Whether the primal is contiguous in ``memory_format``."""
        return self.primal.is_contiguous(memory_format=memory_format)

    def __len__(self) -> int:
        if self.primal.dim() == 0:
            # torch.tensor(d) and torch.as_tensor(d) read a Dual as a nested sequence and end
            # here, at its 0-d elements: say what to pass them.
            raise TypeError("len() of a 0-d Dual; torch.tensor and torch.as_tensor do not take "
                            "a Dual (they read it as a nested sequence): pass d.primal or "
                            "d.tangent")
        return len(self.primal)

    # --- values: the primal's, as torch gives them for a dual tensor of forward_ad ---------------
    def __bool__(self) -> bool:
        return bool(self.primal)

    def __int__(self) -> int:
        return int(self.primal)

    def __float__(self) -> float:
        return float(self.primal)

    def __complex__(self) -> complex:
        return complex(self.primal)

    def __index__(self) -> int:
        return self.primal.__index__()

    def item(self):
        """The primal's single value, as a Python number."""
        return self.primal.item()

    def tolist(self):
        """The primal as (nested) Python lists."""
        return self.primal.tolist()

    def numpy(self, *, force: bool = False):
        """The primal as a NumPy array (sharing memory, as ``Tensor.numpy``)."""
        return self.primal.detach().numpy(force=force)

    def __array__(self, dtype=None, copy=None):
        a = self.numpy()
        return a if dtype is None else a.astype(dtype)

    def __format__(self, spec: str) -> str:
        return self.primal.__format__(spec) if self.primal.dim() == 0 else repr(self)

    # Comparisons compare the primals and give a plain bool tensor; a Dual hashes by identity.
    __hash__ = object.__hash__

    # ``d == None`` and ``d == "a"`` are False, as for a tensor (whose operator answers
    # NotImplemented where torch.eq refuses the operand's type)
    def __eq__(self, other):
        return _or_not_implemented(torch.eq, self, other)

    def __ne__(self, other):
        return _or_not_implemented(torch.ne, self, other)

    def __lt__(self, other):
        return torch.lt(self, other)

    def __le__(self, other):
        return torch.le(self, other)

    def __gt__(self, other):
        return torch.gt(self, other)

    def __ge__(self, other):
        return torch.ge(self, other)

    def __iter__(self):
        if self.primal.dim() == 0:
            raise TypeError("iteration over a 0-d Dual")
        return iter(torch.unbind(self, 0))

    def __contains__(self, value) -> bool:
        return value in self.primal if not isinstance(value, Dual) else value.primal in self.primal

    def __setitem__(self, index, value) -> None:
        """``d[index] = value`` (a Dual, Tensor or number), as every in-place op on a Dual
        (see the class docstring). Into a view that overlaps itself (``d.unfold(0, 2, 1)``),
        a basic index writes the part it picks alone, as torch writes it (an in-place op on
        the whole view is refused: ``_write_through``)."""
        setitem = rule_table.RULES[Dual.__setitem__]
        if self._writes_into_overlap():
            part = self[index]
            if part._source is not None and not part._writes_into_overlap():
                part._assign(setitem(part, Ellipsis, value))
                return
        self._assign(setitem(self, index, value))

    def __repr__(self) -> str:
        t = "None" if self._stack is None else f"{tuple(self._stack.shape)}"
        lab = "" if self.directions is None else f", directions={self.directions}"
        td = "" if self._stack is None or self._stack.dtype == self.dtype \
            else f", tangent_dtype={self._stack.dtype}"
        return (f"Dual(primal={tuple(self.primal.shape)}, tangents={t}{lab}, "
                f"dtype={self.dtype}{td})")

    @classmethod
    @eager_between_graphs
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch._C._is_any_autocast_enabled():  # (one C call: a flag torch keeps)
            refuse_autocast((args, kwargs))
        if fwAD._current_level >= 0:  # (a forward_ad level is open: rare)
            refuse_nested_forward_mode((args, kwargs))
        if kwargs and _has_numpy_names(kwargs):
            kwargs = _torch_names(func, kwargs)
        rule = rule_table.rule_while_compiling(func) if torch.compiler.is_dynamo_compiling() else \
            rule_table.RULES.get(func)
        if rule is None:  # (an op of another library: by its name)
            rule = rule_table.LIBRARY_RULES.get(library_op_name(func))
        with in_rule():
            fallback = rule is None or kwargs.get("out") is not None  # out=: written in place
            out = rule_table.fallback_rule(func, args, kwargs) if fallback \
                else rule(*args, **kwargs)
            if not _slots_to_lay_out.duals:
                return out
            # A view op whose result could not view a Dual's slots (``as_view``): once more, on
            # the slots laid out as the primal, which every view of the primal views alike.
            operands = pytree.tree_leaves((args, kwargs))
            duals = [d for d in _slots_to_lay_out.take() if any(v is d for v in operands)]
            if not duals or _writes_in_place(func) or kwargs.get("inplace") is True \
                    or fallback and kwargs.get("out") is not None:
                return out  # (an in-place op, or asked outside this op: not run again)
            for dual in duals:
                dual._stack = slots_in_strides_of(dual._stack, dual.primal)
            out = rule_table.fallback_rule(func, args, kwargs) if fallback \
                else rule(*args, **kwargs)
            _slots_to_lay_out.take()  # (once: they are laid out as the primal now)
            return out

    def __getattr__(self, name: str):
        """Tensor methods and properties without a Dual method of their own (``d.permute``,
        ``d.mean(1)``, ``d.T``, ``d.is_cuda``) go through ``__torch_function__``; those that
        only describe the primal's storage (``d.stride()``, ``d.element_size()``) are the
        primal's."""
        if name in PRIMAL_METADATA:
            return getattr(self.primal, name)
        attr = getattr(torch.Tensor, name, None) if not name.startswith("__") else None
        if attr is None:
            raise AttributeError(f"'Dual' object has no attribute {name!r}")
        if callable(attr):
            return lambda *args, **kwargs: Dual.__torch_function__(attr, (Dual,), (self, *args),
                                                                   kwargs)
        value = getattr(self.primal, name)
        if not isinstance(value, torch.Tensor):
            return value  # metadata: dtype, is_cuda, requires_grad, ...
        return Dual.__torch_function__(attr.__get__, (Dual,), (self,))

    # Python operators route through torch so that one rule serves both spellings.
    def __add__(self, other):
        return torch.add(self, other)

    def __radd__(self, other):
        return torch.add(other, self)

    def __sub__(self, other):
        return torch.sub(self, other)

    def __rsub__(self, other):
        return torch.sub(other, self)

    def __mul__(self, other):
        return torch.mul(self, other)

    def __rmul__(self, other):
        return torch.mul(other, self)

    def __truediv__(self, other):
        return torch.div(self, other)

    def __rtruediv__(self, other):
        return torch.div(other, self)

    __div__, __rdiv__ = __truediv__, __rtruediv__  # (torch.Tensor's names of them too)

    def __pow__(self, other):
        return torch.pow(self, other)

    def __rpow__(self, other):
        return torch.pow(other, self)

    def __floordiv__(self, other):
        return torch.floor_divide(self, other)

    def __rfloordiv__(self, other):
        return torch.floor_divide(other, self)

    def __mod__(self, other):
        return torch.remainder(self, other)

    def __rmod__(self, other):
        return torch.remainder(other, self)

    def __matmul__(self, other):
        return torch.matmul(self, other)

    def __rmatmul__(self, other):
        return torch.matmul(other, self)

    def __neg__(self):
        return torch.neg(self)

    def __pos__(self):
        return self

    def __abs__(self):
        return torch.abs(self)

    def __round__(self, ndigits: Optional[int] = None):
        return torch.round(self) if ndigits is None else torch.round(self, decimals=ndigits)

    def __getitem__(self, index):
        return Dual.__torch_function__(torch.Tensor.__getitem__, (Dual,), (self, index))

    # In place: the Dual's parts are rebound to the result, its tensors are left untouched.
    def __iadd__(self, other):
        return self._assign(torch.add(self, other))

    def __isub__(self, other):
        return self._assign(torch.sub(self, other))

    def __imul__(self, other):
        return self._assign(torch.mul(self, other))

    def __itruediv__(self, other):
        return self._assign(torch.div(self, other))

    def __ipow__(self, other):
        return self._assign(torch.pow(self, other))

    def __imod__(self, other):
        return self._assign(torch.remainder(self, other))

    def __ifloordiv__(self, other):
        return self._assign(torch.floor_divide(self, other))

    def add_(self, *args, **kwargs) -> Dual:
        """In place, as ``Tensor.add_`` (see ``_assign``)."""
        return self._arithmetic_in_place(torch.add, "add_", args, kwargs)

    def sub_(self, *args, **kwargs) -> Dual:
        """In place, as ``Tensor.sub_``."""
        return self._arithmetic_in_place(torch.sub, "sub_", args, kwargs)

    def mul_(self, *args, **kwargs) -> Dual:
        """In place, as ``Tensor.mul_``."""
        return self._arithmetic_in_place(torch.mul, "mul_", args, kwargs)

    def div_(self, *args, **kwargs) -> Dual:
        """In place, as ``Tensor.div_``."""
        return self._arithmetic_in_place(torch.div, "div_", args, kwargs)

    def _arithmetic_in_place(self, op: Callable, name: str, args: tuple, kwargs: dict) -> Dual:
        """``op`` of this Dual and the other arguments, assigned to it: they are taken as
        torch's function takes them (``d.add_(e, alpha=2)``; ``d.add_(x2=e)``, the NumPy name
        torch's parser also takes), but for ``out=``, which the method refuses, as torch's."""
        if "out" in kwargs:
            raise TypeError(f"{name}() got an unexpected keyword argument 'out'")
        return self._assign(op(self, *args, **kwargs))

    def relu_(self) -> Dual:
        """In place, as ``Tensor.relu_``."""
        return self._assign(torch.relu(self))

    def clamp_(self, min=None, max=None) -> Dual:
        """In place, as ``Tensor.clamp_``."""
        return self._assign(torch.clamp(self, min, max))

    def _assign(self, result: Dual) -> Dual:
        """Make this Dual an in-place op's ``result`` and return it: its parts rebound to the
        result's, or the result written into the tensors of its ``_source`` (a parameter's, a
        view's, or its own once it has views)."""
        if not isinstance(result, Dual):  # an op whose result has no tangent at all
            result = Dual._unchecked(result, None, None, False)
        if view_root(result.primal) is view_root(self.primal) \
                or result.primal.shape != self.primal.shape:
            return self._view_in_place(result)
        result = self._in_own_dtypes(result)
        source = self._source
        if source is not None and source.kind == "viewed" and result._stack is not None \
                and not self._same_slots(result):
            # Its views cannot take slots it did not have: they keep the tensors as they are,
            # and this Dual takes the result (README: in-place ops).
            self._source = source = None
        if source is not None:
            result = self._write_through(result)
        else:
            result = self._in_own_layout(self._keeping_slots(result))
        self.primal, self._stack = result.primal, result._stack
        self.directions, self._single = result.directions, result._single
        return self

    def _same_slots(self, result: Dual) -> bool:
        if result._stack is None or self._stack is None:
            return result._stack is None and self._stack is None
        return result.directions == self.directions and result._stack.shape == self._stack.shape

    def _view_in_place(self, result: Dual) -> Dual:
        """An in-place view op (``d.t_()``, ``d.unsqueeze_(0)``, ``d.squeeze_()``): its result
        views this Dual's tensors and becomes them, as the op gives a tensor a new shape over
        the same storage (views taken before keep viewing it). Any other change of shape is
        refused, as torch refuses it, and so is one of a parameter's Dual (the parameter's own
        shape would have to change). A tensor of a forward's own that its dual pass made a
        Dual (``passes._Pass.take_as_dual``) takes the new shape itself, and so does its
        recorded tangent, as forward_ad's dual tensor does."""
        target = self._parameter()
        parameter = isinstance(target, torch.nn.Parameter)
        if not result._views(self) or parameter:
            raise RuntimeError(f"an in-place op cannot change {'a parameter' if parameter else 'a'}"
                               f" Dual's shape {tuple(self.primal.shape)} to "
                               f"{tuple(result.primal.shape)}")
        if target is not None:  # its Dual goes on writing into the tensor and its tangent
            _restride(target, result.primal)
            _restride(self._source.stack, result._stack)
        elif self._source is not None:  # it views, or has views: later ops write into these
            self._source = _Storage(result.primal, result._stack, self._source.kind)
        self.primal, self._stack = result.primal, result._stack
        self.directions, self._single = result.directions, result._single
        return self

    def _keeping_slots(self, result: Dual) -> Dual:
        """An in-place op's result without tangent (``d.zero_()``, ``d.fill_(c)``,
        ``d.copy_(x)``, a random draw), which this Dual is rebound to, with this Dual's slots
        zeroed: forward_ad keeps a tensor's tangent defined, zero, through such a write, so that
        a view taken after it sees a later write that brings a tangent, and a derivative
        infinite at the written value gives NaN (``sqrt`` after ``zero_()``). A Dual without
        slots keeps none (a zero tangent that no kernel multiplies)."""
        if result._stack is not None or self._stack is None:
            return result
        return Dual._unchecked(result.primal, torch.zeros_like(self._stack), self.directions,
                               self._single)

    def _in_own_layout(self, result: Dual) -> Dual:
        """An in-place op's result, which this Dual is rebound to, in the strides of this
        Dual's primal where they are non-overlapping and dense, as torch's in-place ops keep
        their tensor's strides: a transposed or channels_last Dual written from a value of
        another layout (``d.relu_()``, ``d.copy_(x)``, a contiguous mask's ``masked_fill_``)
        keeps its layout, and so do its slots, so that its later views and reshapes view or
        copy as torch's do (and its next convolution copies nothing). An expanded stack of
        slots (a broadcast tangent) stays as it is."""
        primal, stack = result.primal, result._stack
        relay_stack = stack is not None and _writable(stack) \
            and not slots_step_like(stack, self.primal)
        if steps_like(primal, self.primal) and not relay_stack \
                or not non_overlapping_and_dense(self.primal):
            return result
        if not steps_like(primal, self.primal):
            primal = laid_out_as(primal, self.primal)
        if relay_stack:
            stack = slots_laid_out_as(stack, self.primal)
        return Dual._unchecked(primal, stack, result.directions, result._single)

    def _in_own_dtypes(self, result: Dual) -> Dual:
        """An in-place op's result in this Dual's dtypes, as torch's in-place ops keep their
        tensor's (``d += e`` with a float64 ``e`` leaves a float32 ``d`` float32, its tangent
        in the dtype it had); a cast torch refuses (complex to real) raises as torch does."""
        dtype, primal, stack = self.primal.dtype, result.primal, result._stack
        if primal.dtype != dtype:
            if not torch.can_cast(primal.dtype, dtype):
                raise RuntimeError(f"result type {primal.dtype} can't be cast to the desired "
                                   f"output type {dtype} of an in-place op on a Dual")
            primal = primal.to(dtype)
        if stack is not None:
            want = self._stack.dtype if self._stack is not None else \
                stack.dtype if tangent_dtype_fits(dtype, stack.dtype) else dtype
            if stack.dtype != want:
                stack = stack.to(want)
        if primal is result.primal and stack is result._stack:
            return result
        return Dual._unchecked(primal, stack, result.directions, result._single)

    def _writes_into_overlap(self) -> bool:
        """True if an in-place op on this Dual writes into tensors two of whose elements may
        share memory (a view made by ``expand``, ``unfold``, ``as_strided``)."""
        source = self._source
        return source is not None and (may_overlap(source.primal) or source.stack is not None
                                       and may_overlap(source.stack))

    def _write_through(self, result: Dual) -> Dual:
        if self._writes_into_overlap():
            # The result, computed out of place, holds each shared element once per place it
            # sits in; written back, the copies of the elements the op did not change would
            # overwrite those it did (torch's own check sees only a stride of 0).
            raise RuntimeError(
                "unsupported operation: more than one element of the written-to tensor refers to "
                "a single memory location: an in-place op on a Dual whose memory overlaps itself "
                "(a view made by expand, unfold or as_strided) is refused; write into a part of "
                "it that does not overlap (u[i] = v, u[i].mul_(2)), or clone it first")
        target, stack, kind = self._source
        if torch.is_grad_enabled() and target.requires_grad and target.is_leaf:
            raise RuntimeError("a leaf Variable that requires grad is being used in an in-place "
                               "operation (a parameter written in place on the dual pass: do it "
                               "under torch.no_grad(), as on the plain pass)")
        if result._stack is not None and not self._same_slots(result):
            what = "a parameter" if kind == "parameter" else "a view of a Dual"
            how = "" if kind == "parameter" else (
                "; write into the Dual it views (d[i] = value, d.index_copy_(...)), or give "
                "that Dual the slots first (Dual(x, torch.zeros(T, *x.shape)))")
            raise RuntimeError(f"an in-place op on {what} cannot change its tangent's slots "
                               f"(from {self.num_tangents} slots, directions "
                               f"{self.directions}, to {result.num_tangents} slots, directions "
                               f"{result.directions}){how}")
        target.copy_(result.primal)  # autograd records it, as an in-place op on a tensor
        if stack is not None:
            with torch.no_grad():
                stack.zero_() if result._stack is None else stack.copy_(result._stack)
        primal = target.detach() if kind == "parameter" else target
        return Dual._unchecked(primal, stack, self.directions, self._single)

    def flatten(self, start_dim: int = 0, end_dim: int = -1) -> Dual:
        """``torch.flatten`` of the primal and of each tangent slot."""
        return torch.flatten(self, start_dim, end_dim)

    def view(self, *shape, **size) -> Dual:
        """The primal and each slot in ``shape``, as ``Tensor.view`` (torch's error where the
        primal's layout allows no view). ``d.view(d.dtype)`` is ``d.view(d.shape)``; a view as
        another dtype is refused."""
        return Dual.__torch_function__(torch.Tensor.view, (Dual,), (self, *shape), size)

    def backward(self, *args, **kwargs):
        """Refused: a Dual has no autograd graph (see the message)."""
        raise TypeError("a Dual has no autograd graph to run backward on: the dual pass is "
                        "forward mode, and the tangent is already the directional derivative "
                        "(run the model on a plain tensor for backprop)")

    def reshape(self, *shape, **by_name) -> Dual:
        """``torch.reshape`` of the primal and of each tangent slot."""
        return Dual.__torch_function__(torch.Tensor.reshape, (Dual,), (self, *shape), by_name)

    def relu(self) -> Dual:
        """``torch.relu``: the tangent kept where the primal is positive (or NaN)."""
        return torch.relu(self)


def _restride(t: Optional[torch.Tensor], like: Optional[torch.Tensor]) -> None:
    """Give ``t`` the shape, strides and offset of ``like``, a view of its storage, in place
    (as an in-place view op gives them); nothing for None."""
    if t is not None:
        with torch._C.DisableTorchFunctionSubclass():  # (a lifted tensor: its plain self)
            t.as_strided_(like.shape, like.stride(), like.storage_offset())


def refuse_nested_forward_mode(values) -> None:
    """Refuse a tensor among ``values`` (any nesting; a Dual's primal and slots included) that
    is a dual tensor of torch's own forward mode at its current level (``forward_ad.make_dual``'s,
    or an input inside ``torch.func.jvp``): fgkernels' kernels compute on its values and would
    drop its tangent. Called only while such a level is open (``fwAD._current_level >= 0``)."""
    if torch.compiler.is_dynamo_compiling():
        return  # (a compiled function's inputs are Dynamo's tensors, never dual ones)
    for v in pytree.tree_leaves(values, is_leaf=lambda v: isinstance(v, Dual)):
        tensors = (v.primal, v._stack) if isinstance(v, Dual) else (v,)
        for t in tensors:
            if isinstance(t, torch.Tensor) and fwAD.unpack_dual(t).tangent is not None:
                raise TypeError(_NESTED_FORWARD_MODE)


_NESTED_FORWARD_MODE = (
    "a Dual met a dual tensor of torch's forward mode (forward_ad.make_dual's, or an input "
    "inside torch.func.jvp), as its primal, its tangent or an operand: fgkernels' kernels would "
    "drop that tangent, so forward mode nested over a Dual is not supported (nest torch's "
    "forward mode alone)")


def refuse_autocast(values) -> None:
    """Refuse a Dual among ``values`` (any nesting) whose device type autocast is enabled for:
    autocast would cast the primals of its ops, not their tangents."""
    for v in pytree.tree_leaves(values, is_leaf=lambda v: isinstance(v, Dual)):
        if isinstance(v, Dual) and torch.is_autocast_enabled(v.device.type):
            raise RuntimeError(_UNDER_AUTOCAST)


_UNDER_AUTOCAST = (
    "a Dual met torch.autocast: autocast casts the primals of its ops, not their tangents, so a "
    "dual pass under it is refused; cast the model and its input instead (model.bfloat16()), "
    "or keep them float32 and draw bfloat16 tangents (fgkernels.random_tangents(model, "
    "dtype=torch.bfloat16))")


# Tensor methods that only describe the primal's storage: no tangent, no fallback.
PRIMAL_METADATA = frozenset({
    "stride", "storage_offset", "element_size", "nelement", "is_floating_point", "is_complex",
    "is_signed", "get_device", "data_ptr", "untyped_storage", "has_names", "dim_order",
    "is_inference", "is_pinned", "is_shared", "is_set_to", "is_nonzero"})


def in_primal_layout(stack: torch.Tensor, primal: torch.Tensor) -> torch.Tensor:
    """A given stack of tangents with each slot laid out as its primal, slot after slot (a copy
    only when it is not): every op keeps that layout, and a view op then maps a Dual's primal
    and its tangents alike (a write into the view reaches both). A dense primal neither
    contiguous nor channels_last (a permutation, ``x.T``) has each slot in its strides, as
    forward_ad lays a tangent out (``layout.slots_in_strides_of``). A broadcast stack (a stride
    0) is left as given, and copied so once a view of the Dual is taken (``Dual.as_view``), and
    so is the stack of a primal with gaps (a matrix's column, whose slots in its strides would
    each span the matrix) or whose elements share memory."""
    fmt = kernel_format(primal)
    if primal.is_contiguous(memory_format=fmt):
        return stack if in_kernel_layout(primal, stack) else slots_in_format(stack, fmt)
    if not _writable(stack) or not non_overlapping_and_dense(primal) \
            or slots_in_strides_like(stack, primal):
        return stack
    return slots_in_strides_of(stack, primal)


# The NumPy names torch's argument parser takes for ``dim`` and ``keepdim``, and for ``input``
# and ``other`` (``torch.linalg.vector_norm(x=t)``, ``torch.add(x1=a, x2=b)``, ``t.add(x2=b)``)
_NUMPY_NAMES = {"axis": "dim", "keepdims": "keepdim"}
_NUMPY_OPERAND_NAMES = {"x": "input", "a": "input", "x1": "input", "x2": "other"}


def _has_numpy_names(kwargs: dict) -> bool:
    """True if a NumPy name is among ``kwargs``' (a loop of lookups, as Dynamo traces it: no
    set ops)."""
    for name in kwargs:
        if name in _NUMPY_NAMES or name in _NUMPY_OPERAND_NAMES:
            return True
    return False


# (func, NumPy name) -> torch's name of that operand of func, or None (``_operand_name``)
_OPERAND_NAMES: dict[tuple[Callable, str], Optional[str]] = {}


def _operand_name(func: Callable, name: str) -> Optional[str]:
    """torch's name of the operand that ``func`` takes under the NumPy name ``name`` (``x``,
    ``a``, ``x1``: ``input``; ``x2``: ``other``) where ``func``'s rule takes it by torch's name;
    None where the rule takes ``name`` itself (``cosine_similarity(x1, x2)``, ``cdist``) or no
    such operand. (A Python function of torch's binds its own names before it reaches a rule:
    ``F.relu(x=t)`` is refused there, as for a tensor.) Looked up once per function and name;
    a constant to Dynamo (marked when it loads)."""
    key = (func, name)
    if key not in _OPERAND_NAMES:
        _OPERAND_NAMES[key] = _rule_operand_name(rule_table.RULES.get(func),
                                                 _NUMPY_OPERAND_NAMES[name], name)
    return _OPERAND_NAMES[key]


def _rule_operand_name(rule: Optional[Callable], torch_name: str, name: str) -> Optional[str]:
    """``_operand_name`` worked out from the parameters of ``rule`` (None: no rule): torch's
    name where the rule takes it by name, or takes any name (``**kwargs``) but ``name``."""
    try:
        parameters = inspect.signature(rule).parameters if rule is not None else {}
    except (TypeError, ValueError):
        return None
    by_any_name = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    takes = torch_name in parameters or by_any_name
    return torch_name if takes and name not in parameters else None


when_dynamo_loads(lambda: torch.compiler.assume_constant_result(_operand_name))


def _torch_name(func: Callable, name: str, kwargs: dict) -> str:
    """torch's own name of the keyword argument ``name`` of ``func`` where ``name`` is a NumPy
    name of it and ``kwargs`` do not also give torch's (the rule then refuses the two, as torch
    does); else ``name``."""
    if name in _NUMPY_NAMES:
        torch_name = _NUMPY_NAMES[name]
    else:
        torch_name = _operand_name(func, name) if name in _NUMPY_OPERAND_NAMES else None
    return name if torch_name is None or torch_name in kwargs else torch_name


def _torch_names(func: Callable, kwargs: dict) -> dict:
    """``kwargs`` with NumPy names under torch's own, which the rules take (torch's argument
    parser takes both: ``axis=`` and ``keepdims=`` for every op's ``dim`` and ``keepdim``,
    ``x=`` for ``input``, ...)."""
    return {_torch_name(func, name, kwargs): value for name, value in kwargs.items()}


def _writes_in_place(func: Callable) -> bool:
    """True if ``func`` writes its first operand in place (``x.foo_(...)``, ``x[i] = v``; and
    ``F.alpha_dropout(d, inplace=True)``, which torch hands over by name); a constant to Dynamo
    (marked when it loads)."""
    name = getattr(func, "__name__", "")
    return name == "__setitem__" or (name.endswith("_") and not name.endswith("__"))


when_dynamo_loads(lambda: torch.compiler.assume_constant_result(_writes_in_place))


def is_dual(x) -> bool:
    """True if ``x`` is a Dual."""
    return isinstance(x, Dual)

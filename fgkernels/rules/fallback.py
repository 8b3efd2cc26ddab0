"""The exact fallback for torch ops without an fgkernels rule: PyTorch's own forward-mode AD
(``torch.func.jvp``) on that op alone, vmapped over the tangent slots.

A model that runs under torch.nn therefore runs on Duals and gets forward_ad's tangent, more
slowly where it takes this path. Each op that takes it warns once; ``fallback_ops()`` lists
them. ``FGKERNELS_STRICT=1`` or ``with strict_rules():`` makes them raise ``TypeError`` instead,
for those who want only the fused rules.

Operands: a Dual is its primal and tangent; a tensor with a recorded parameter tangent
(``fgkernels.set_tangents``) counts as the Dual of that tangent. Outputs: each floating or
complex tensor becomes a Dual (a complex output keeps a complex tangent); anything else (indices,
masks, None, numbers) is returned as it is. An output whose tangent forward AD leaves undefined
though reverse mode differentiates it (``scatter_reduce``'s ``"prod"``) is refused by name, not
given jvp's zeros.

In-place ops: on a Dual, the op's out-of-place form (``fill_diagonal_`` and nn.init's functions,
which have none, on a copy of the Dual; any other without one is refused) is differentiated and
the Dual rebound to its result, as every in-place rule does. A plain tensor of the forward's
own written in place from Duals (``out=``, ``buf.add_(d)``, ``buf[i] = d``, ``buf += d``)
becomes a Dual during a dual pass, eager or compiled (``passes.writing_pass``), as
forward_ad's write makes it dual, and so, in an eager pass, does one written through a view
of it that is the tensor's only view (``batch[i, :, :h].copy_(d)``); under
``torch.no_grad()`` a module's state (running statistics, power-iteration vectors) and a
tensor outside any pass take the primal; anything else is refused by name. Refusals of such
writes are
``RuntimeError``s, as torch's own refusals of in-place ops: torch turns a ``TypeError`` raised
in ``a += b`` into ``NotImplemented``, and Python then computes ``a = a + b`` out of place,
leaving ``a``'s tensor and its views unwritten.
"""
from __future__ import annotations

import contextlib
import os
import threading
import warnings
from collections.abc import Iterator
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch.utils import _pytree as pytree

from ..dual import slots as _slots
from ..dual.dtypes import tangent_dtype_fits
from ..dual.dynamo import when_dynamo_loads
from ..dual.layout import view_root
from ..dual.passes import writing_pass
from ..dual.rule_table import implements_fallback, library_op_name
from ..dual.tangent_store import dual_of
from ..dual.value import Dual, differentiable
from .operands import primal_of, refuse_dual_index

_used: dict[str, int] = {}
_local = threading.local()


def op_name(func: Callable) -> str:
    """A readable name of a torch function or method (``'Tensor.permute'``, ``'layer_norm'``),
    or of an op of another library by its qualified name (``'torchvision::roi_align'``)."""
    name = getattr(func, "__name__", None) or repr(func)
    library_op = library_op_name(func)
    if library_op is not None:
        return f"{library_op.split('::')[0]}::{name}"
    owner = getattr(func, "__objclass__", None)
    return f"Tensor.{name}" if owner is not None and issubclass(owner, torch._C.TensorBase) \
        else name


def fallback_ops() -> dict[str, int]:
    """The ops that ran on the forward-AD fallback in this process, with their call counts."""
    return dict(_used)


def _strict() -> bool:
    return getattr(_local, "strict", 0) > 0 or os.environ.get("FGKERNELS_STRICT") == "1"


@contextlib.contextmanager
def strict_rules() -> Iterator[None]:
    """Inside the block, an op on a Dual without an fgkernels rule raises ``TypeError``
    instead of taking the forward-AD fallback."""
    _local.strict = getattr(_local, "strict", 0) + 1
    try:
        yield
    finally:
        _local.strict -= 1


def _note(name: str) -> None:
    if name not in _used:
        warnings.warn(f"fgkernels: '{name}' has no fgkernels rule; its tangent is computed by "
                      "PyTorch's forward-mode AD on that op alone (exact, slower). "
                      "fgkernels.fallback_ops() lists such ops.", stacklevel=5)
    _used[name] = _used.get(name, 0) + 1


def _as_operand(v):
    """A leaf of an op's arguments as the fallback takes it: a Dual, a tensor with a recorded
    tangent as its Dual, anything else as it is."""
    if isinstance(v, torch.Tensor) and not isinstance(v, Dual):
        d = dual_of(v)
        return v if d is None else d
    return v


def _describe(func: Callable) -> tuple[str, bool]:
    """(the op's name, whether it writes its first operand in place: ``x.foo_(...)``); a
    constant to Dynamo (marked when Dynamo loads)."""
    name = op_name(func)
    return name, name.endswith("_") and not name.endswith("__")


when_dynamo_loads(lambda: torch.compiler.assume_constant_result(_describe))


class Differentiation(NamedTuple):
    """How ``differentiate`` takes an op's tangents: ``jvp(f, primals, tangents)``, answering
    as ``torch.func.jvp`` does; ``batched``: vmapped over the slots (else one slot at a time,
    each from the same random state); ``fallback``: the op has no rule of its own (strict
    mode refuses it, and its first use warns)."""

    jvp: Callable
    batched: bool
    fallback: bool


_BY_FUNC_JVP = Differentiation(torch.func.jvp, batched=True, fallback=True)


@implements_fallback
def forward_ad_fallback(func: Callable, args: tuple, kwargs: dict) -> Any:
    """``func(*args, **kwargs)`` with Duals among its arguments: the primal outputs, and their
    tangents by ``torch.func.jvp``, one slot per vmapped lane."""
    name, in_place = _describe(func)
    if in_place or name == "Tensor.__setitem__" or kwargs.get("out") is not None:
        return _in_place(func, name, args, kwargs)
    if kwargs.get("inplace") is True and args and isinstance(args[0], Dual):
        # (F.threshold(d, ..., inplace=True): the op out of place, d rebound to it and returned)
        return args[0]._assign(differentiate(func, args, {**kwargs, "inplace": False}, name,
                                             _BY_FUNC_JVP))
    return differentiate(func, args, kwargs, name, _BY_FUNC_JVP)


def differentiate(func: Callable, args: tuple, kwargs: dict, name: str,
                  by: Differentiation) -> Any:
    """``func(*args, **kwargs)`` (not in place) with Duals among its arguments: the primal
    outputs as Duals, with tangents ``by`` the given differentiation, each output that views
    an operand linked to it."""
    leaves, spec = pytree.tree_flatten((args, kwargs), is_leaf=lambda v: isinstance(v, Dual))
    leaves = [_as_operand(v) for v in leaves]
    operands = [v for v in leaves if isinstance(v, Dual)]  # (an output viewing one links to it)
    if any(d.tangents is not None for d in operands):
        # A Dual without tangent is then a constant of the op, as a plain tensor is: given a
        # zero tangent it would meet an infinite partial derivative as NaN (fmod by a zero
        # divisor)
        leaves = [v.primal if isinstance(v, Dual) and v.tangents is None else v for v in leaves]
    where = [i for i, v in enumerate(leaves) if isinstance(v, Dual)]
    duals = [leaves[i] for i in where]

    def call(*primals):
        values = list(leaves)
        for i, p in zip(where, primals):
            values[i] = p
        a, k = pytree.tree_unflatten(values, spec)
        return func(*a, **k)

    primals = tuple(_dense_if_expanded(d.primal) for d in duals)
    plan = _slots.plan([d.slot_operand() for d in duals], name)
    if plan.count == 0:
        return _linked(_wrap(call(*primals), None, plan), operands)
    if by.fallback and _strict():
        raise TypeError(f"fgkernels.Dual has no forward-mode rule for '{name}' (strict mode: "
                        "the forward-AD fallback is off)")
    if by.fallback and not torch.compiler.is_dynamo_compiling():
        _note(name)
    with torch.no_grad():
        primal_out, tangents = _jvp_by_carriers(call, primals, duals, plan, name, by)
    # Tangents narrower than their primals come out in the slots' dtype (a bfloat16 tangent
    # stays bfloat16); tangents of their primals' dtype take the outputs' (``cumsum(x,
    # dtype=torch.float64)`` of a float32 Dual gives a float64 tangent, as forward AD does).
    out = _wrap(primal_out, tangents, plan, plan.dtype if plan.narrow else None)
    if not (plan.narrow and by.batched):
        return _linked(out, operands)

    def own_slots(k: int, i: int) -> Optional[torch.Tensor]:
        # output i of the op on operand k's own (narrower) slots, the other operands' primals
        # beside them: a view of those slots where the op is a view op
        d = operands[k]
        at = next((j for j, e in enumerate(duals) if e is d), None)
        if at is None or d.directions != plan.directions or d.tangents.shape[0] != plan.count:
            return None  # its slots are not the output's
        take = lambda s: pytree.tree_leaves(call(*[s if j == at else p
                                                  for j, p in enumerate(primals)]))[i]
        try:
            return torch.func.vmap(take)(d.tangents)
        except Exception:  # an op vmap cannot batch: the output stays a copy of both
            return None

    return _linked(out, operands, own_slots)


def _linked(out, duals: list[Dual],
            own_slots: Optional[Callable[[int, int], Optional[torch.Tensor]]] = None):
    """The outputs, each that views an operand's primal linked to that operand as its view
    (``Dual.as_view``): a write into ``torch.atleast_2d(d)``, ``d.real`` or ``d.as_strided(...)``
    reaches ``d``, as a write into a tensor's view does. vmap and jvp give a view op's tangents
    as views of the slots they were given, the operand's own unless they were widened (a
    bfloat16 tangent of a float32 primal): then ``own_slots(k, i)`` takes output i of the op
    on operand k's own slots. An output whose tangent views no operand's slots (spread to
    another operand's directions) is a copy of both."""
    flat, spec = pytree.tree_flatten(out, is_leaf=lambda v: isinstance(v, Dual))
    for i, v in enumerate(flat):
        viewed = [k for k, d in enumerate(duals) if isinstance(v, Dual)
                  and view_root(d.primal) is view_root(v.primal)]
        if not viewed:
            continue
        k = next((k for k in viewed if v._views(duals[k])), viewed[0])
        d = duals[k]
        if d.tangents is None and v.tangents is not None:
            # a view of an operand without tangent has none (jvp gave it zeros: the other
            # operands' slots, ``torch.broadcast_tensors(x, y)``)
            v = v.with_tangents(v.primal, None)
        elif own_slots is not None and v.tangents is not None and d.tangents is not None \
                and not v._views(d):
            # (a view that changes the dtype, ``d.real`` of complex64 slots, views them in
            # their real kind: a tangent dtype that fits the output all the same)
            stack = own_slots(k, i)
            if stack is not None and stack.shape == v.tangents.shape \
                    and tangent_dtype_fits(v.primal.dtype, stack.dtype):
                v = v.with_tangents(v.primal, stack)
        flat[i] = d.as_view(v)
    return pytree.tree_unflatten(flat, spec)


def _in_place(func: Callable, name: str, args: tuple, kwargs: dict) -> Any:
    """An in-place op (``x.foo_(...)``, ``out=``, ``x[i] = v``) with Duals among its operands."""
    out = kwargs.get("out")
    # The target: out=, else the first operand, by position or by name (nn.init's functions
    # hand theirs on as tensor=)
    key = None if out is not None or args else next((k for k in kwargs if k != "out"), None)
    target = out if out is not None else args[0] if args else kwargs.get(key)
    rest = {k: v for k, v in kwargs.items() if k not in ("out", key)}
    if name == "Tensor.__setitem__":
        refuse_dual_index(args[1])
    if isinstance(target, Dual) and out is None:
        if name == "Tensor.__setitem__":
            target[args[1]] = args[2]
            return None
        outplace = getattr(torch.Tensor, name[len("Tensor."):-1], None) \
            if name.startswith("Tensor.") else getattr(torch, name[:-1], None)
        if outplace is None and key is None and name not in _WRITES_ON_A_COPY:
            raise TypeError(f"fgkernels.Dual: the in-place op '{name}' has no out-of-place form "
                            "to differentiate; use an out-of-place op")
        if outplace is None or key is not None:
            outplace = _on_a_copy(func, name, key)
        return target._assign(Dual.__torch_function__(outplace, (Dual,), (target, *args[1:]),
                                                      rest))
    if isinstance(out, Dual):  # out= a Dual: the op out of place, then written into it
        return out._assign(Dual.__torch_function__(func, (Dual,), args, rest))
    if isinstance(out, (tuple, list)):  # out=(values, indices): each written as one out= is
        rest = {k: v for k, v in kwargs.items() if k != "out"}
        results = Dual.__torch_function__(func, (Dual,), args, rest)
        if len(out) != len(results):
            raise TypeError(f"{name}: out= takes {len(results)} tensors, got {len(out)}")
        for target, result in zip(out, results):
            if isinstance(target, Dual):
                target.copy_(result)
                continue
            if target.shape != result.shape:  # (torch resizes its out= tensors)
                target.resize_(result.shape)
            _in_place(torch.Tensor.copy_, f"{name}(out=...)", (target, result), {})
        return type(results)(out)
    written = (args if out is not None else args[1:], rest)
    if _carries_tangent(written) and differentiable(target.dtype):
        return _write_duals_into_plain(func, name, target, written, args, kwargs, key, out)
    # (a Dual without tangent, or an integer target, has nothing to lose: the primal)
    return _on_primals(func, args, kwargs)


def _on_primals(func: Callable, args: tuple, kwargs: dict) -> Any:
    """``func`` on its operands' primals."""
    a, k = pytree.tree_map(primal_of, (args, kwargs), is_leaf=lambda v: isinstance(v, Dual))
    return func(*a, **k)


def _write_duals_into_plain(func: Callable, name: str, target: torch.Tensor, written,
                            args: tuple, kwargs: dict, key: Optional[str], out) -> Any:
    """``func`` writing Duals with tangents (``written``) into the plain tensor ``target``: in
    a dual pass, a tensor of the forward's own becomes a Dual; under ``torch.no_grad()``, state
    takes the primal; anything else is refused. Every refusal is a RuntimeError (see the
    module's docstring: a TypeError would make ``target += d`` an out-of-place add)."""
    what = "out=" if out is not None else f"'{name}'"
    pass_ = writing_pass()
    taken = pass_ is not None and pass_.can_take_as_dual(target)
    view_taken = not taken and pass_ is not None and pass_.can_take_view_as_dual(target)
    if taken or view_taken:
        # A tensor of the forward's own filled from Duals (torch.zeros_like(x), then
        # written: Longformer's chunks, an MoE's index_add_, RWKV's steps), or through a
        # view (a batch padded image by image), becomes a Dual, as forward_ad's write makes
        # it dual.
        take = pass_.take_as_dual if taken else pass_.take_view_as_dual
        d = take(target, *_slots_of(target, written, name))
        if out is not None or key is not None:
            args, kwargs = args, {**kwargs, key or "out": d}
        else:
            args = (d, *args[1:])
        try:
            return Dual.__torch_function__(func, (Dual,), args, kwargs)
        except TypeError as e:
            raise RuntimeError(str(e)) from e
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"fgkernels.Dual: {what} would write a Dual into a plain tensor, which cannot "
            "take its tangent; compute the result out of place, or make the tensor a Dual "
            "(fgkernels.Dual(torch.zeros_like(x))), whose writes keep their tangents (or, "
            "for state such as running statistics, write under torch.no_grad(), where it "
            "takes the primal)")
    if pass_ is not None and not pass_.holds_as_state(target):
        # (under no_grad too its tangent would be lost)
        raise RuntimeError(
            f"fgkernels.Dual: {what} would write a Dual's tangent into a plain tensor that "
            "no module of the dual pass holds and that cannot become a Dual (a view of one, "
            "or one that other tensors view: they would keep their values without the "
            "tangent); make that tensor a Dual (fgkernels.Dual(torch.zeros_like(x))) "
            "before taking views of it, or compute the result out of place")
    return _on_primals(func, args, kwargs)


# In-place ops without out-of-place form that write values forward AD differentiates as it
# writes them (besides nn.init's, which take their target by name): run on a copy of the Dual.
# Any other (``set_``, ``share_memory_``, ``apply_``: no values written) is refused.
_WRITES_ON_A_COPY = {"Tensor.fill_diagonal_"}


def _on_a_copy(func: Callable, name: str, key: Optional[str]) -> Callable:
    """An in-place op without out-of-place form (``d.fill_diagonal_(v)``, ``nn.init.normal_``)
    made one: the op on a copy of its target (given by position, or as ``key``), which forward
    AD differentiates as the write itself (an element written with a constant or a random draw
    takes a zero tangent, the others keep theirs)."""
    def op(target, *args, **kwargs):
        copy = target.clone()
        if key is None:
            func(copy, *args, **kwargs)
        else:
            func(*args, **{key: copy}, **kwargs)
        return copy

    op.__name__ = f"{name} (on a copy)"
    return op


def _slots_of(target: torch.Tensor, written, name: str) -> tuple:
    """The slots (count, directions, single, dtype) that the Duals ``written`` into
    ``target`` carry together."""
    duals = [v for v in pytree.tree_leaves(written, is_leaf=lambda v: isinstance(v, Dual))
             if isinstance(v, Dual) and v.tangents is not None]
    plan = _slots.plan([d.slot_operand() for d in duals], name)
    return plan.count, plan.directions, plan.single, plan.dtype_for(target.dtype)


def _carries_tangent(values) -> bool:
    return any(isinstance(v, Dual) and v.tangents is not None
               for v in pytree.tree_leaves(values, is_leaf=lambda v: isinstance(v, Dual)))


def _dense_if_expanded(p: torch.Tensor) -> torch.Tensor:
    """An expanded primal (a stride-0 dim) as a dense copy of its values: forward AD writes a
    tangent of another layout into the primal's strides, which an expanded primal cannot
    take (a tangent widened from a narrower dtype comes out dense)."""
    if any(stride == 0 and size > 1 for stride, size in zip(p.stride(), p.shape)):
        return p.contiguous()
    return p


def _jvp_by_carriers(call: Callable, primals: tuple, duals: list[Dual], plan: _slots.SlotPlan,
                     name: str, by: Differentiation):
    """``jvp_over_slots`` of the op, its output slots grouped by the operands that carry them
    (labelled directions that only some operands carry): in each group the other operands are
    constants of the op, as forward_ad takes an operand without that direction (a zero tangent
    would meet an infinite partial derivative as NaN); each group from the same random state.
    Every operand carrying every slot, the usual case, is one group. torch's forward AD wants
    each tangent in its primal's dtype: lower-precision tangents are widened for the op (and
    its result rounded back to the output slots' dtype by the caller)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for s in range(plan.count):
        groups.setdefault(tuple(k for k, pos in enumerate(plan.positions) if s in pos),
                          []).append(s)
    if len(groups) == 1:
        stacks = tuple(_slots.spread(d.tangents, pos, plan.count, d.primal).to(d.primal.dtype)
                       for d, pos in zip(duals, plan.positions))
        return jvp_over_slots(call, primals, stacks, name, by)
    state = _random_state()
    full = None
    for carriers, slots in groups.items():
        _set_random_state(state)

        def part(*ps, carriers=carriers):
            values = list(primals)
            for k, p in zip(carriers, ps):
                values[k] = p
            return call(*values)

        stacks = tuple(duals[k].tangents[[plan.positions[k].index(s) for s in slots]]
                       .to(duals[k].primal.dtype) for k in carriers)
        primal_out, tangents = jvp_over_slots(part, tuple(primals[k] for k in carriers), stacks,
                                              name, by)
        leaves, spec = pytree.tree_flatten(tangents)
        if full is None:
            full = [t.new_empty((plan.count, *t.shape[1:])) for t in leaves]
        for whole, t in zip(full, leaves):
            whole[slots] = t
    return primal_out, pytree.tree_unflatten(full, spec)


def _random_state() -> tuple:
    """The random state an op draws from: the CPU's and, where CUDA is in use, every GPU's."""
    return (torch.random.get_rng_state(),
            torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)


def _set_random_state(state: tuple) -> None:
    cpu, gpus = state
    torch.random.set_rng_state(cpu)
    if gpus is not None:
        torch.cuda.set_rng_state_all(gpus)


def jvp_over_slots(call: Callable, primals: tuple, stacks: tuple, name: str,
                   by: Differentiation = _BY_FUNC_JVP):
    """``call(*primals)`` and its tangents along ``stacks`` (one stack per primal, T slots
    each), stacked over the slots, by ``by.jvp`` (``torch.func.jvp``). vmap draws any random
    numbers once for all slots; where an op cannot be vmapped, or ``by`` is not batched, each
    slot runs in turn from the same random state, so that every slot differentiates the same
    draw. An output whose tangent forward AD leaves undefined though reverse mode
    differentiates it is refused."""
    undefined: set[int] = set()  # the outputs forward AD gave no tangent (jvp gives zeros)

    def differentiated(*p):
        out = _tensors_only(call(*p))
        undefined.update(i for i, v in enumerate(pytree.tree_leaves(out))
                         if i not in _kept.values and _is_differentiable(v)
                         and fwAD.unpack_dual(v).tangent is None)
        return out

    def one_slot(*t):
        return by.jvp(differentiated, primals, t)

    if stacks[0].shape[0] == 1:
        # One slot: no batch to map over (and under torch.compile an op vmap cannot batch,
        # nn.RReLU's, fails the trace instead of reaching the loop below)
        primal_out, tangent = one_slot(*(s[0] for s in stacks))
        return _refused_if(undefined, name, primal_out), \
            pytree.tree_map(lambda t: t.unsqueeze(0), tangent)
    if by.batched:
        try:
            primal_out, tangents = torch.func.vmap(one_slot, randomness="same",
                                                   out_dims=(None, 0))(*stacks)
        except Exception:  # an op vmap cannot batch (data-dependent shapes, missing rules)
            pass
        else:
            return _refused_if(undefined, name, primal_out), tangents
    state = _random_state()
    outs = []
    for t in range(stacks[0].shape[0]):
        _set_random_state(state)
        outs.append(one_slot(*(s[t] for s in stacks)))
    tangents = pytree.tree_map(lambda *ts: torch.stack(ts), *[o[1] for o in outs])
    return _refused_if(undefined, name, outs[0][0]), tangents


def _refused_if(undefined: set, name: str, primal_out):
    """``primal_out`` restored (``_restore``), once no output in ``undefined`` is refused."""
    if undefined:
        _refuse_undefined_tangents(sorted(undefined), name)
    return _restore(primal_out)


# Ops whose outputs torch's forward mode leaves without tangent though reverse mode
# differentiates them: refused by name, as is every op of another library (a custom op whose
# autograd formula has no jvp, torchvision's roi_align: forward_ad refuses them). An undefined
# tangent elsewhere is an output torch marks non-differentiable (a Bessel function's, the
# statistics native_layer_norm returns beside its result): zero, as torch.func.jvp gives it.
# Named, not found by running the op again under reverse mode, which would repeat its writes
# (native_batch_norm's running statistics) and cost.
_NO_FORWARD_FORMULA = frozenset({"scatter_reduce", "Tensor.scatter_reduce"})


def _refuse_undefined_tangents(outputs: list[int], name: str) -> None:
    """Refuse the op where it is one of ``_NO_FORWARD_FORMULA`` or another library's and
    forward AD left the tangent of some of its ``outputs`` (by position) undefined
    (``scatter_reduce(..., "prod")``, a custom op registered without a jvp)."""
    if "::" in name:
        raise NotImplementedError(
            f"fgkernels.Dual: '{name}' is an op of a library outside torch whose forward-mode "
            f"derivative torch does not know (it leaves the tangent of output {outputs[0]} "
            "undefined: an autograd formula without jvp), so the forward-AD fallback cannot "
            "give its tangent; write the computation with torch's own ops, call the op "
            "inside a torch.autograd.Function that defines its jvp, or take this derivative "
            "in reverse mode")
    if name in _NO_FORWARD_FORMULA:
        raise NotImplementedError(
            f"fgkernels.Dual: torch's forward-mode AD has no formula for '{name}' with these "
            f"arguments (it leaves the tangent of output {outputs[0]} undefined, though reverse "
            "mode differentiates it), so the forward-AD fallback cannot give its tangent; "
            "write the computation with ops that forward AD differentiates, or take this "
            "derivative in reverse mode")


# The outputs of the call being differentiated that jvp cannot carry (None, numbers), by
# position: set aside while their siblings are differentiated, put back after.
_kept = threading.local()


def _tensors_only(out):
    """``out`` with each leaf that is not a tensor replaced by an empty placeholder."""
    flat, spec = pytree.tree_flatten(out)
    _kept.values = {i: v for i, v in enumerate(flat) if not isinstance(v, torch.Tensor)}
    return pytree.tree_unflatten(
        [torch.zeros(0) if i in _kept.values else v for i, v in enumerate(flat)], spec)


def _restore(primal_out):
    """The primal outputs with the leaves that are not tensors put back."""
    kept = getattr(_kept, "values", None)
    _kept.values = None
    if not kept:
        return primal_out
    flat, spec = pytree.tree_flatten(primal_out)
    return pytree.tree_unflatten([kept.get(i, v) for i, v in enumerate(flat)], spec)


def _is_differentiable(v) -> bool:
    return isinstance(v, torch.Tensor) and differentiable(v.dtype)


def _tangent_of(v: torch.Tensor, t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """An output's tangent in the slots' dtype where that fits the output (an op may change the
    dtype, ``.double()``, or give a complex result, ``torch.fft.rfft``: then its own)."""
    if dtype is None or t.dtype == dtype:
        return t
    if tangent_dtype_fits(v.dtype, dtype):
        return t.to(dtype)
    if v.is_complex() and dtype.is_floating_point:
        complex_dtype = (torch.complex64 if dtype.itemsize <= 4 else torch.complex128)
        return t.to(complex_dtype) if tangent_dtype_fits(v.dtype, complex_dtype) else t
    return t


def _wrap(out, tangents, plan, dtype: Optional[torch.dtype] = None):
    """Each differentiable tensor output as a Dual (with its tangent stack, if any, in
    ``dtype`` where that fits the output); other outputs (indices, masks, shapes, numbers,
    None) as they are."""
    if tangents is None:
        return pytree.tree_map(
            lambda v: Dual._unchecked(v, None, None, False) if _is_differentiable(v) else v, out)
    flat_out, spec = pytree.tree_flatten(out)
    flat_t = pytree.tree_leaves(tangents)
    if len(flat_t) != len(flat_out):
        raise RuntimeError("fgkernels: forward-mode AD returned tangents that do not match the "
                           "op's outputs")
    wrapped = [Dual._unchecked(v, _tangent_of(v, t, dtype), plan.directions, plan.single)
               if _is_differentiable(v) else v for v, t in zip(flat_out, flat_t)]
    return pytree.tree_unflatten(wrapped, spec)

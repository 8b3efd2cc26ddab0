"""Tangent slots: how the tangents of an op's operands line up in its output.

A tangent is stored as a stack of slots, shape ``(T, *primal.shape)``. Slots are either
*unlabelled* (dense: slot t of every operand is the same direction t, and every operand must carry
the same T) or *labelled* with direction numbers (a direction may enter part way down a network;
an operand simply has no slot for a direction that has not reached it yet, and the output carries
the union). ``plan`` decides the output's slots, ``place`` assembles the output tangent from parts
that each cover some of them, without materialising a zero slot unless no part covers it.

Slots also have a dtype: the primal's, or a lower precision by design (bfloat16 tangents of a
float32 network: a *narrow* tangent). An op's output slots take the promoted dtype of its
operands' (``torch.promote_types``) while some tangent is narrow, so that narrow tangents stay
narrow; tangents of their primals' dtype follow the output primal's promotion, as forward_ad's
do (``SlotPlan.dtype_for``).
"""
from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch

from .dtypes import tangent_dtype_fits
from .layout import empty_slots

Directions = Optional[tuple[int, ...]]


class SlotOperand(NamedTuple):
    """The tangent slots of one operand: ``count`` slots, labelled by ``directions`` or not,
    of dtype ``dtype``, ``narrow`` where that is narrower than the primal's. (A named tuple, as
    the other per-call records: made for every operand of every op, it must cost little to
    build.)"""

    count: int
    directions: Directions
    single: bool  # one tangent of the primal's shape (unlabelled, count 1)
    dtype: Optional[torch.dtype] = None
    narrow: bool = False


class SlotPlan(NamedTuple):
    """The output's slots, and where each operand's slots land among them."""

    count: int
    directions: Directions
    single: bool
    positions: tuple[tuple[int, ...], ...]  # per operand (empty for an operand with no tangent)
    dtype: Optional[torch.dtype] = None     # the operands' promoted dtype (None without slots)
    narrow: bool = False                    # some operand's tangent is narrow

    def operand(self) -> Optional[SlotOperand]:
        """The output's slots as an operand of a following op (None without slots)."""
        return SlotOperand(self.count, self.directions, self.single, self.dtype, self.narrow) \
            if self.count else None

    def dtype_for(self, primal: torch.dtype) -> torch.dtype:
        """The output slots' dtype beside an output primal of dtype ``primal``: the operands'
        promoted dtype while some tangent is narrow and that fits ``primal`` (a bfloat16
        tangent of a float32 Dual times a float64 tensor stays bfloat16); else ``primal``
        itself, as forward_ad's tangent follows its primal (a float32 Dual times a float64
        tensor has a float64 tangent; a 0-d float64 Dual times a float32 one, a float32
        one)."""
        if self.narrow and tangent_dtype_fits(primal, self.dtype):
            return self.dtype
        return primal


def plan(operands: Sequence[Optional[SlotOperand]], op: str) -> SlotPlan:
    """Line up the slots of ``operands`` (None for an operand without tangent) for op ``op``.
    A network meets the same few slot layouts at every layer and pass: each is planned once
    (under torch.compile afresh: a trace runs once, and Dynamo would warn at the cache)."""
    if torch.compiler.is_dynamo_compiling():
        return _plan.__wrapped__(tuple(operands), op)
    return _plan(tuple(operands), op)


@functools.lru_cache(maxsize=4096)
def _plan(operands: tuple[Optional[SlotOperand], ...], op: str) -> SlotPlan:
    live = [o for o in operands if o is not None]
    if not live:
        return SlotPlan(0, None, False, tuple(() for _ in operands))
    dtype = promoted_dtype(o.dtype for o in live)
    narrow = any(o.narrow for o in live)
    labelled = {o.directions is not None for o in live}
    if len(labelled) > 1:
        raise ValueError(
            f"{op}: cannot combine tangents labelled with directions and unlabelled tangents; "
            "give every tangent a direction or none")
    if labelled == {False}:
        counts = {o.count for o in live}
        if len(counts) > 1:
            raise ValueError(
                f"{op}: operands carry different numbers of tangents T {sorted(counts)}; "
                "every tangent of one op must have the same T")
        (count,) = counts
        single = all(o.single for o in live)
        ident = tuple(range(count))
        return SlotPlan(count, None, single,
                        tuple(ident if o is not None else () for o in operands), dtype, narrow)
    union = sorted(set().union(*(o.directions for o in live)))
    index = {d: i for i, d in enumerate(union)}
    positions = tuple(tuple(index[d] for d in o.directions) if o is not None else ()
                      for o in operands)
    return SlotPlan(len(union), tuple(union), False, positions, dtype, narrow)


def promoted_dtype(dtypes) -> Optional[torch.dtype]:
    """The dtype that tangents of ``dtypes`` (None: unknown, skipped) combine into."""
    out = None
    for d in dtypes:
        if d is not None:
            out = d if out is None else torch.promote_types(out, d)
    return out


def cast(stack: Optional[torch.Tensor], dtype: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    """``stack`` in ``dtype`` (itself when it already is, or when either is None)."""
    if stack is None or dtype is None or stack.dtype == dtype:
        return stack
    return stack.to(dtype)


def spread(stack: Optional[torch.Tensor], positions: tuple[int, ...], count: int,
           primal: torch.Tensor, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """An operand's stack (None: no tangent) over all ``count`` output slots: its slots at
    ``positions``, zero elsewhere (the stack itself when it fills every slot)."""
    dtype = dtype or (primal.dtype if stack is None else stack.dtype)
    if stack is not None and positions == tuple(range(count)):
        return stack.to(dtype)
    full = empty_slots(count, primal, dtype).zero_()
    if stack is not None:
        run = _consecutive(positions)
        if run is not None:
            full[run] = stack.to(dtype)
        else:
            full.index_copy_(0, positions_index(positions, full.device), stack.to(dtype))
    return full


def place(count: int, parts: Sequence[tuple[torch.Tensor, tuple[int, ...]]],
          owned: bool = False) -> torch.Tensor:
    """Sum ``parts`` (a tensor of ``len(pos)`` slots and the output slots ``pos`` it fills) into
    one tangent of ``count`` slots. With ``owned`` (the caller created the parts and hands them
    over) a part that fills every slot takes the others' sums in place: no new buffer."""
    parts = [(t, tuple(p)) for t, p in parts if len(p)]
    full = tuple(range(count))
    if owned and all(p == full for _, p in parts):
        # The usual case (every part fills every slot, e.g. a layer's input and parameter
        # terms of the same directions): the first part takes the others' sums in place.
        base = parts[0][0]
        for t, _ in parts[1:]:
            base.add_(t)
        return base
    covering = [i for i, (_, p) in enumerate(parts) if p == full]
    if covering:
        # One part fills every slot: add the others into it (in place from the second add on,
        # or from the first when the parts are owned).
        base, _ = parts[covering[0]]
        rest = [part for i, part in enumerate(parts) if i != covering[0]]
        for k, (t, p) in enumerate(rest):
            fresh = k == 0 and not owned
            if p == full:
                base = base + t if fresh else base.add_(t)
            else:
                base = add_into_slots(base.clone() if fresh else base, p, t)
        return base
    # A new stack, each slot laid out as the first part's (channels_last stays so, which a
    # concatenation of the stacks would not keep).
    t0 = parts[0][0]
    out = empty_slots(count, t0[0], promoted_dtype(t.dtype for t, _ in parts))
    taken = [s for _, p in parts for s in p]
    if sorted(taken) == list(full):
        # Disjoint parts that together fill every slot: each copied to its slots.
        for t, p in parts:
            run = _consecutive(p)
            if run is not None:
                out[run].copy_(t)
            else:
                out.index_copy_(0, positions_index(p, out.device), t.to(out.dtype))
        return out
    # Parts that overlap without one covering all: accumulate from zero.
    out.zero_()
    for t, p in parts:
        add_into_slots(out, p, t)
    return out


def add_into_slots(out: torch.Tensor, positions: tuple[int, ...],
                   part: torch.Tensor) -> torch.Tensor:
    """``out[positions] += part`` along the slot dimension, in place; returns ``out``."""
    run = _consecutive(positions)
    if run is not None:
        out[run].add_(part)
    else:
        out.index_add_(0, positions_index(positions, out.device), part)
    return out


def _consecutive(positions: tuple[int, ...]) -> Optional[slice]:
    """``positions`` as a slice when they are ascending consecutive slots (the usual case: a
    view then takes them, with no index tensor)."""
    if positions and all(b == a + 1 for a, b in zip(positions, positions[1:])):
        return slice(positions[0], positions[-1] + 1)
    return None


_INDEX: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}


def positions_index(positions: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``positions`` as an index tensor on ``device``, made once: an index built from a list
    on each call is a copy from the host, which on a GPU waits for every queued kernel."""
    key = (tuple(positions), torch.device(device))
    index = _INDEX.get(key)
    if index is None:
        index = torch.tensor(key[0], device=device)
        # Only a real tensor is kept: one made while tracing (a fake tensor) belongs to it.
        if type(index) is torch.Tensor and not torch.compiler.is_dynamo_compiling():
            _INDEX[key] = index
    return index

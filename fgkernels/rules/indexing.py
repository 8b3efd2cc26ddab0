"""Indexing a Dual: ``d[index]`` and ``d[index] = value`` for every index torch takes (ints,
slices, None, Ellipsis, bool masks, integer tensors and lists), each tangent slot indexed as its
primal is."""
from __future__ import annotations

from typing import Optional

import torch

from ..dual import slots as _slots
from ..dual.layout import non_overlapping_and_dense, within_span
from ..dual.rule_table import implements
from ..dual.value import Dual
from .fallback import forward_ad_fallback
from .operands import parts, refuse_dual_index
from .pointwise import lift
from .products import _product

Tensor = torch.Tensor


def _is_advanced(i) -> bool:
    """An index item torch reads as an advanced index: a tensor, a bool, or any sequence (a
    list, a tuple inside the index, a range, a NumPy array)."""
    if isinstance(i, (Tensor, bool, list, tuple, range)):
        return True
    if i is None or i is Ellipsis or isinstance(i, (int, slice, torch.SymInt)):
        return False  # (before hasattr, which Dynamo cannot answer for a slice)
    return hasattr(i, "__len__") and not isinstance(i, str)  # a NumPy array


def as_torch_reads(index):
    """``index`` as torch reads it: a list of fewer than 32 items of which one is a slice,
    Ellipsis, None, a tensor or a sequence is a tuple of indices (``d[[0, slice(1, 3)]]`` is
    ``d[0, 1:3]``, NumPy's old rule, which torch keeps), not one list of integers."""
    if type(index) is list and len(index) < 32 and any(
            i is None or i is Ellipsis or isinstance(i, slice)
            or (_is_advanced(i) and not isinstance(i, bool)) for i in index):
        return tuple(index)
    return index


def slot_index(index) -> Optional[tuple]:
    """The index of a stack ``(T, *shape)`` that picks in every slot what ``index`` picks in
    the primal (``index`` as torch reads it), or None where none does (advanced indices apart
    from one another move their dims to the front, ahead of the slot axis)."""
    items = index if isinstance(index, tuple) else (index,)
    advanced = [k for k, i in enumerate(items) if _is_advanced(i)]
    if advanced and advanced != list(range(advanced[0], advanced[-1] + 1)):
        return None
    return (slice(None), *items)


def _index_stack(stack: Tensor, index) -> Tensor:
    at = slot_index(index)
    return stack[at] if at is not None else torch.stack([s[index] for s in stack])


@implements(torch.Tensor.__getitem__)
def getitem(input: Dual, index) -> Dual:
    """``d[index]``: the primal and every slot indexed alike. With basic indexing (integers,
    slices, None, Ellipsis) both are views of ``d``'s, and an in-place op on the result writes
    into them, as on a view of a tensor (``b[n:2 * n].zero_()`` zeroes a part of ``b`` and of its
    tangent)."""
    refuse_dual_index(index)
    index = as_torch_reads(index)
    y = input.primal[index]
    t = input.tangents
    return input.as_view(input.with_tangents(y, None if t is None else _index_stack(t, index)))


@implements(Dual.__setitem__)
def setitem(d: Dual, index, value) -> Dual:
    """The Dual ``d`` with ``d[index] = value`` (a Dual, Tensor or number), out of place: the
    region takes value's primal and tangent (zero where value has none)."""
    refuse_dual_index(index)
    index, v = as_torch_reads(index), parts(value)
    y = d.primal.clone()
    y[index] = v.primal
    plan = _slots.plan([d.slot_operand(), v.slots], "setitem")
    if plan.count == 0:
        return Dual._unchecked(y, None, None, False)
    (d_pos, v_pos), dtype = plan.positions, plan.dtype_for(y.dtype)
    base = _slots.spread(d.tangents, d_pos, plan.count, d.primal, dtype)
    base = base.clone() if base is d.tangents else base
    region = y[index].dim()
    if v.tangents is None:
        fill = torch.zeros((), dtype=dtype, device=y.device)
    else:
        like = v.primal if isinstance(v.primal, Tensor) else y[index]
        fill = _slots.spread(v.tangents, v_pos, plan.count, like, dtype)
        extra = fill.dim() - 1 - region
        if extra > 0:  # leading size-1 dims of value, which torch's assignment drops
            fill = fill.reshape(fill.shape[0], *fill.shape[1 + extra:])
        fill = lift(fill, region)
    at = slot_index(index)
    if at is not None:
        base[at] = fill
    else:
        for s in range(plan.count):
            base[s][index] = fill if fill.dim() == 0 else fill[s]
    return Dual._unchecked(y, base, plan.directions, plan.single)


@implements(torch.index_add, torch.Tensor.index_add)
def index_add(input, dim: int, index: Tensor, source, *, alpha=1) -> Dual:
    """Dual ``index_add``, ``y = x`` with ``alpha·source`` added at ``index`` along ``dim``
    (an MoE summing its experts' outputs by token): linear in x and in the source, so
    ``ẏ = ẋ.index_add(dim, index, alpha·ṡ)``, every slot alike."""
    if isinstance(index, Dual):
        raise TypeError("index_add: the index must be an integer Tensor, got a Dual")

    def term(i: int, stack: Tensor, f: list) -> Tensor:
        if i == 0:
            return stack
        y_shape = f[0].shape
        flat = stack.reshape(stack.shape[0], -1) if not y_shape else stack  # (a 0-d y)
        at = dim % len(y_shape) + 1 if y_shape else 1
        out = flat.new_zeros((flat.shape[0], *(y_shape or (1,))))
        return out.index_add_(at, index, flat, alpha=alpha).reshape(stack.shape[0], *y_shape)

    return _product("index_add", [input, source],
                    lambda f: torch.index_add(f[0], dim, index, f[1], alpha=alpha), term)


@implements(torch.as_strided, torch.Tensor.as_strided)
def as_strided(input: Dual, size, stride, storage_offset=None) -> Dual:
    """``d.as_strided(size, stride, offset)``: the primal's storage read at those positions,
    and each slot at the same positions of a tangent laid out as the primal's storage, as
    forward AD lays a tangent out: ``d``'s own tangents at its elements, and beyond them the
    tangents of the Dual ``d`` views (a view linked to it, ``Dual.as_view``), or zero where
    ``d`` views none (forward AD's tangent of a view of a larger tensor made dual). Where
    ``d``'s slots are laid out as the storage (a Dual's slots, and a view's of them, follow
    its primal) and the positions are its elements or it views a Dual, the result views the
    slots, and a write through it reaches them; else it is a copy (beyond the elements of a
    view whose slots are laid out otherwise, refused). In a compiled pass, where no storage
    can be asked, the forward-AD fallback takes it (exact within ``d``'s elements)."""
    y = torch.as_strided(input.primal, size, stride, storage_offset)
    t, p = input.tangents, input.primal
    if t is not None and torch.compiler.is_compiling():  # (no storage to ask while tracing)
        return forward_ad_fallback(torch.as_strided, (input, size, stride, storage_offset), {})
    if t is not None:
        viewing = input._source is not None and input._source.kind == "view"
        if _mirror_storage(p, t) and (viewing or _among_elements(y, p)):
            t = _slots_mirroring(p, t, y)
        else:
            t = _slots_at_elements(p, t, y, zero_beyond=not viewing)
    return input.as_view(input.with_tangents(y, t))


def _storage_numel(t: Tensor) -> int:
    return t.untyped_storage().nbytes() // t.element_size()


def _mirror_storage(p: Tensor, stack: Tensor) -> bool:
    """True if every slot of ``stack`` lies in its storage as ``p`` in its own, a slot's
    element at ``p``'s storage position q at ``shift + q`` (plus the slot's stride), every
    position of ``p``'s storage inside the stack's, and no two slots' regions overlapping."""
    if any(n > 1 and s != ps for n, s, ps in zip(p.shape, stack.stride()[1:], p.stride())):
        return False
    count, step = stack.shape[0], stack.stride(0)
    extent, shift = _storage_numel(p), stack.storage_offset() - p.storage_offset()
    apart = count == 1 or step == 0 or step >= extent
    return apart and shift >= 0 and shift + (count - 1) * step + extent <= _storage_numel(stack)


def _element_at(p: Tensor) -> Tensor:
    """For each position of ``p``'s storage, the index of the element of ``p`` stored there
    (flat, in ``p``'s order), -1 where none is."""
    element = torch.full((_storage_numel(p),), -1, dtype=torch.long, device=p.device)
    element.as_strided(p.shape, p.stride(), p.storage_offset()).copy_(
        torch.arange(p.numel(), device=p.device).view(p.shape))
    return element


def _among_elements(y: Tensor, p: Tensor) -> bool:
    """True if every position ``y`` reads in the storage holds an element of ``p``."""
    if non_overlapping_and_dense(p):
        return within_span(y, p)  # (p's span has no gaps)
    read = _element_at(p).as_strided(y.shape, y.stride(), y.storage_offset())
    return bool((read >= 0).all())


def _slots_mirroring(p: Tensor, stack: Tensor, y: Tensor) -> Tensor:
    """``y``'s view of ``p``'s storage taken of every slot of ``stack``, which mirrors it."""
    shift = stack.storage_offset() - p.storage_offset()
    return stack.as_strided((stack.shape[0], *y.shape), (stack.stride(0), *y.stride()),
                            shift + y.storage_offset())


def _slots_at_elements(p: Tensor, stack: Tensor, y: Tensor, zero_beyond: bool) -> Tensor:
    """``y``'s positions in ``p``'s storage read from the slots of ``stack`` (``p``'s
    tangents), a copy: each position as the element of ``p`` stored there, and a position
    that holds none zero (``zero_beyond``) or refused: its tangent is the viewed Dual's, in
    slots not laid out as the storage."""
    read = _element_at(p).as_strided(y.shape, y.stride(), y.storage_offset()).reshape(-1)
    beyond = read < 0
    if not zero_beyond and beyond.any():
        raise RuntimeError(
            "as_strided: the view reads storage positions outside the Dual's own elements, "
            "which belong to the Dual it views, whose tangent slots are not laid out as its "
            "primal's storage; take the view of that Dual itself")
    out = stack.reshape(stack.shape[0], -1)[:, read.clamp(min=0)]
    return out.masked_fill_(beyond, 0).view(stack.shape[0], *y.shape)

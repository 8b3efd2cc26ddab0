"""Memory layouts of the kernels' tensors, the Python twin of csrc/checks.h.

A primal is used as stored when it is contiguous or channels_last (else it is made contiguous);
a stack of tangent slots ``(T, N, C, H, W)`` keeps each slot in the primal's layout, slot after
slot.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch

Tensor = torch.Tensor


def view_root(t: torch.Tensor) -> torch.Tensor:
    """The tensor whose storage ``t`` views (``t`` itself when it is no view)."""
    return t if t._base is None else t._base


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True if ``a`` and ``b`` may share memory: one storage (where a tensor has none to ask,
    one under torch.compile or a transform, if one views the other)."""
    if not torch.compiler.is_compiling():
        try:
            return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
        except RuntimeError:
            pass
    return view_root(a) is view_root(b)


def kernel_format(x: Tensor) -> torch.memory_format:
    """channels_last when x is laid out so (and not also plainly contiguous), else contiguous."""
    cl = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(
        memory_format=torch.channels_last)
    return torch.channels_last if cl else torch.contiguous_format


def slots_in_format(xt: Tensor, fmt: torch.memory_format) -> Tensor:
    """Stacked slots, each contiguous in ``fmt`` (a copy only when they are not):
    channels_last and channels_last_3d lay each slot's channels last."""
    if fmt in (torch.channels_last, torch.channels_last_3d):
        n = xt.dim() - 1  # each slot's dims
        last, back = (0, 1, *range(3, n + 1), 2), (0, 1, n, *range(2, n))
        return xt.permute(last).contiguous().permute(back)
    return xt.contiguous()


def empty_slots(T: int, x: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """An uninitialised stack of T slots shaped and laid out like ``x``, of ``dtype`` (x's by
    default)."""
    if kernel_format(x) == torch.channels_last:
        n, c, h, w = x.shape
        return x.new_empty((T, n, h, w, c), dtype=dtype).permute(0, 1, 4, 2, 3)
    return x.new_empty((T, *x.shape), dtype=dtype)


def empty_like_format(shape, like: Tensor) -> Tensor:
    """An uninitialised (N, C, H, W) tensor in ``like``'s kernel format."""
    return torch.empty(shape, dtype=like.dtype, device=like.device,
                       memory_format=kernel_format(like))


def in_kernel_layout(x: Tensor, xt) -> bool:
    """True if ``x`` and its stacked slots ``xt`` (or None) are laid out as the kernels write
    them, so that they can be updated in place."""
    fmt = kernel_format(x)
    if not x.is_contiguous(memory_format=fmt):
        return False
    if xt is None:
        return True
    if fmt == torch.channels_last:
        return xt.permute(0, 1, 3, 4, 2).is_contiguous()
    return xt.is_contiguous()


def _strides_by_size(t: Tensor) -> list:
    """``t``'s (stride, size) pairs of the dims of size > 1, smallest stride first."""
    return sorted((stride, size) for stride, size in zip(t.stride(), t.shape) if size != 1)


def non_overlapping_and_dense(t: Tensor) -> bool:
    """True if ``t``'s elements fill a block of memory with no gap and no element twice (some
    order of its dims is contiguous): torch's in-place ops keep such a tensor's strides."""
    if t.is_contiguous() or t.is_contiguous(memory_format=torch.channels_last):
        return True
    expected = 1
    for stride, size in _strides_by_size(t):
        if stride != expected:
            return False
        expected *= size
    return True


def may_overlap(t: Tensor) -> bool:
    """True if two elements of ``t`` may share a memory location (``expand``, ``unfold``,
    an overlapping ``as_strided``). A sufficient test of the contrary: ordered by stride,
    each dim steps past every offset the dims of smaller stride reach (a slice, a transpose,
    a strided slice pass); a view that interleaves its dims without overlap counts as
    overlapping."""
    if t.is_contiguous() or t.numel() == 0:
        return False
    reach = 0
    for stride, size in _strides_by_size(t):
        if stride <= reach:
            return True
        reach += (size - 1) * stride
    return False


def steps_like(t: Tensor, like: Tensor) -> bool:
    """True if ``t`` steps through memory as ``like`` (of one shape) does along every dim of
    size > 1."""
    return _steps(t.stride(), like)


def _steps(strides: Sequence[int], like: Tensor) -> bool:
    """True if ``strides`` step through memory as ``like`` does along every dim of size > 1."""
    return all(size == 1 or a == b for size, a, b in zip(like.shape, strides, like.stride()))


def slots_step_like(stack: Tensor, primal: Tensor) -> bool:
    """True if every slot of ``stack`` steps through memory as ``primal`` does, slot after
    slot."""
    if stack.shape[0] == 0:
        return True
    return (stack.shape[0] == 1 or stack.stride(0) == primal.numel()) \
        and _steps(stack.stride()[1:], primal)


def laid_out_as(t: Tensor, like: Tensor) -> Tensor:
    """A copy of ``t`` with ``like``'s strides (``like`` of ``t``'s shape, non-overlapping and
    dense)."""
    out = torch.empty_strided(like.shape, like.stride(), dtype=t.dtype, device=t.device)
    return out.copy_(t)


def slots_laid_out_as(stack: Tensor, like: Tensor) -> Tensor:
    """A copy of the stacked slots ``stack`` with each slot in ``like``'s strides (``like``
    non-overlapping and dense), slot after slot."""
    strides = (like.numel(), *like.stride())
    out = torch.empty_strided(stack.shape, strides, dtype=stack.dtype, device=stack.device)
    return out.copy_(stack)


def memory_span(t: Tensor) -> int:
    """How many elements of memory ``t`` reaches, from its first element to its last (its numel
    when it is non-overlapping and dense, more where it steps over gaps; 0 when empty)."""
    if _surely(t.numel() == 0, default=False):
        return 0
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))


def _surely(cond, default: bool) -> bool:
    """``cond``, a comparison of sizes, where it can be decided, else ``default``: while Dynamo
    traces, a size it learns only at run time (how many boxes a detector keeps) admits no
    guard, and asking one fails the compile."""
    if not torch.compiler.is_dynamo_compiling():
        return bool(cond)
    shapes = torch.fx.experimental.symbolic_shapes  # (loaded with Dynamo)
    return shapes.guard_or_true(cond) if default else shapes.guard_or_false(cond)


def slots_in_strides_of(stack: Tensor, like: Tensor) -> Tensor:
    """A copy of the stacked slots ``stack`` with each slot in the strides of ``like`` (of the
    slots' shape, no two elements in one place), slot after slot, each over ``like``'s memory
    span: an element of ``like`` and its tangents then sit at one offset into their memory, so
    that any view of ``like`` has its slots in this copy (``slots_viewed_as``). Memory that no
    element of ``like`` reaches (the gaps of a strided ``like``) is zero."""
    span = max(memory_span(like), 1)
    memory = stack.new_zeros(stack.shape[0] * span)
    return memory.as_strided(stack.shape, (span, *like.stride())).copy_(stack)


def slots_viewed_as(stack: Tensor, like: Tensor, view: Tensor) -> Tensor:
    """The slots of ``view``, a view of ``like``'s memory (``within_span``): the view of the
    stacked slots ``stack``, in ``like``'s strides (``slots_in_strides_of``), at the same
    offsets."""
    offset = stack.storage_offset() + view.storage_offset() - like.storage_offset()
    return stack.as_strided((stack.shape[0], *view.shape), (stack.stride(0), *view.stride()),
                            offset)


def slots_in_strides_like(stack: Tensor, like: Tensor) -> bool:
    """True if each slot of ``stack`` steps through memory as ``like`` does, slot after slot,
    each over ``like``'s memory span (as ``slots_in_strides_of`` lays them out). (Asked on the
    first view of every Dual: equal strides, the common case, are answered by one tuple
    comparison.)"""
    strides = stack.stride()
    if strides[1:] != like.stride() and not _steps(strides[1:], like):
        return False
    return stack.shape[0] == 1 or _surely(strides[0] >= memory_span(like), default=True)


def within_span(view: Tensor, like: Tensor) -> bool:
    """True if every element of ``view`` (of ``like``'s dtype and storage) lies in ``like``'s
    memory span."""
    if view.numel() == 0:
        return True
    start = view.storage_offset() - like.storage_offset()
    return start >= 0 and start + memory_span(view) <= memory_span(like)

"""Property: a program of views and writes in place, drawn by Hypothesis, leaves every tensor it
made (the base, each view of it, each operand, each result) with forward_ad's primal, strides
and tangents, slot by slot.

A program starts from one Dual (contiguous, transposed, channels_last or at an offset into its
storage; its tangents a stack, laid out as the primal, or broadcast) and takes views of any
tensor it holds (slices, selects, pieces, transposes, permutes, diagonals, unfolds, expands,
views that merge or split dims, reshapes that view or copy), writes in place into any of them
(pointwise ops, products with other tensors of the program, copies, fills, masked fills, index
adds, item assignment), and makes new tensors of them. Each step is first tried on plain
tensors: a view torch refuses must be refused on the Duals too; a write torch refuses is not
drawn. The same program then runs on Duals and, once per slot, on forward_ad's dual tensors,
which copy each write's value in: forward_ad's own in-place formulas are wrong where an operand
is the target (below)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

import pytest
import torch
import torch.autograd.forward_ad as fwAD

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, event, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fgkernels import Dual  # noqa: E402

from helpers import laid_out  # noqa: E402

PROFILE = settings(max_examples=300, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
# A Dual's layouts. Not one with gaps (every other column of a wider tensor; a plain operand may
# have them): written in place, such a Dual is rebound to a dense result (README: an in-place
# op keeps the strides where they are non-overlapping and dense), so a later contiguous() or
# reshape of it views where torch's copies. Views with gaps of a dense Dual are drawn.
LAYOUTS = ["contiguous", "transposed", "channels_last", "offset"]


@dataclass(frozen=True)
class Leaf:
    """A tensor the program starts from: its values laid out as ``layout``, with ``tangents``
    (T, *shape) or none (a constant), given to the Dual as a contiguous stack, laid out as
    ``layout`` slot by slot, or broadcast from one slot (``stack``)."""
    values: torch.Tensor
    layout: str
    tangents: Optional[torch.Tensor]
    stack: str = "contiguous"


@dataclass(frozen=True)
class Step:
    """``fn`` of the program's tensors at ``operands``: a view or a new tensor (the program's
    next tensor) or, where ``value`` is given, a write into the first operand of what ``value``
    computes of them; one that torch refuses with an exception of type ``refused``."""
    what: str
    fn: Callable
    operands: tuple[int, ...]
    value: Optional[Callable] = None
    refused: Optional[type] = None


def run(program: list, leaf: Callable[[Leaf], object], copy_in: bool = False) -> list:
    """Every tensor the program makes, in order, each leaf made by ``leaf``; with ``copy_in``,
    each write copies its value in (computed before the target changes) instead of running the
    op in place, and the steps torch refuses are left out (they must be refused otherwise)."""
    held = []
    for step in program:
        if isinstance(step, Leaf):
            held.append(leaf(step))
            continue
        operands = [held[i] for i in step.operands]
        if step.refused is not None:
            if not copy_in:
                with pytest.raises(step.refused):
                    step.fn(*operands)
            continue
        if step.value is None:
            held.append(step.fn(*operands))
        elif copy_in:
            operands[0].copy_(step.value(*operands).clone())
        else:
            out = step.fn(*operands)
            assert out is None or out is operands[0], f"{step.what} returned another object"
    return held


def _fresh(leaf: Leaf) -> torch.Tensor:
    """The leaf's values in memory of their own, laid out as the leaf says (``offset``:
    contiguous, three elements into its storage)."""
    if leaf.layout == "offset":
        return torch.cat([leaf.values.new_zeros(3), leaf.values.flatten()])[3:].view_as(
            leaf.values)
    return laid_out(leaf.values.clone(), leaf.layout)


def as_duals(leaf: Leaf):
    if leaf.tangents is None:
        return _fresh(leaf)
    stack = {"contiguous": lambda t: t.clone(),
             "laid out": lambda t: laid_out(t.clone(), leaf.layout),
             "broadcast": lambda t: t[:1].clone().expand_as(t)}[leaf.stack](leaf.tangents)
    return Dual(_fresh(leaf), stack)


def as_forward_ad(slot: int) -> Callable[[Leaf], torch.Tensor]:
    def make(leaf: Leaf) -> torch.Tensor:
        if leaf.tangents is None:
            return _fresh(leaf)
        return fwAD.make_dual(_fresh(leaf), leaf.tangents[slot].clone())
    return make


# -- drawing a program ------------------------------------------------------------------------

def _view_steps(draw, t: torch.Tensor) -> dict[str, Callable[[], Callable]]:
    """Views (and reshapes that may copy) of ``t``, each drawing its parameters when made."""
    nd = t.dim()

    def dim(extra: int = 0) -> int:
        return draw(st.integers(-nd - extra, nd - 1 + extra))

    def sliced():
        d = draw(st.integers(0, nd - 1))
        start, stop = sorted(draw(st.lists(st.integers(0, t.shape[d]), min_size=2, max_size=2)))
        step = draw(st.integers(1, 2))
        return lambda a: a[(slice(None),) * d + (slice(start, stop, step),)]

    def selected():
        d = draw(st.sampled_from([d for d in range(nd) if t.shape[d]]))
        i = draw(st.integers(-t.shape[d], t.shape[d] - 1))
        return lambda a: a.select(d, i)

    def merged():
        d = draw(st.integers(0, nd - 2))
        return lambda a: a.view(*a.shape[:d], -1, *a.shape[d + 2:])

    def split():
        d = draw(st.integers(0, nd - 1))
        return lambda a: a.view(*a.shape[:d], 1, a.shape[d], *a.shape[d + 1:])

    def piece():
        d, i = dim(), draw(st.integers(0, 1))
        how = draw(st.sampled_from(["unbind", "split", "chunk", "narrow"]))
        return {"unbind": lambda a: a.unbind(d)[i], "split": lambda a: a.split(1, d)[i],
                "chunk": lambda a: a.chunk(2, d)[i], "narrow": lambda a: a.narrow(d, i, 1)}[how]

    def unfold():
        d, size, step = dim(), draw(st.integers(1, 2)), draw(st.integers(1, 2))
        return lambda a: a.unfold(d, size, step)

    steps = {"unsqueeze": lambda: (lambda k: lambda a: a.unsqueeze(k))(dim(1)),
             "flatten": lambda: lambda a: a.flatten(),
             "view(-1)": lambda: lambda a: a.view(-1),
             "reshape(-1)": lambda: lambda a: a.reshape(-1),
             "contiguous": lambda: lambda a: a.contiguous(),
             "expand": lambda: lambda a: a.unsqueeze(0).expand(2, *a.shape)}
    if nd:
        steps.update({
            "slice": sliced, "view splitting a dim": split, "piece": piece, "unfold": unfold,
            "movedim": lambda: (lambda i, j: lambda a: a.movedim(i, j))(dim(), dim()),
            "permute": lambda: (lambda o: lambda a: a.permute(*o))(
                draw(st.permutations(range(nd)))),
            "transpose": lambda: (lambda i, j: lambda a: a.transpose(i, j))(dim(), dim()),
            "squeeze": lambda: (lambda k: lambda a: a.squeeze(k))(dim())})
    if nd and t.numel():
        steps["select"] = selected
    if nd >= 2:
        steps.update({
            "view merging two dims": merged,
            "diagonal": lambda: (lambda o: lambda a: a.diagonal(o))(draw(st.integers(-1, 1))),
            "mT": lambda: lambda a: a.mT})
    return steps


def _broadcasts_to(shape, target) -> bool:
    try:
        return torch.broadcast_shapes(shape, target) == torch.Size(target)
    except RuntimeError:
        return False


def _overlaps_itself(t: torch.Tensor) -> bool:
    """Whether two of ``t``'s elements share memory (an expanded or unfolded view)."""
    if t.numel() <= 1:
        return False
    span = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride())) + 1
    offsets = torch.arange(span).as_strided(t.shape, t.stride())
    return offsets.unique().numel() < t.numel()


def _draw_leaf(draw, shape, slots: int, tangent: bool) -> Leaf:
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    values = torch.randn(shape, generator=g, dtype=torch.float64)
    if not tangent:
        return Leaf(values, draw(st.sampled_from(LAYOUTS + ["strided"])), None)
    stack = draw(st.sampled_from(["contiguous", "laid out", "broadcast"]))
    tangents = torch.randn((1 if stack == "broadcast" else slots, *shape), generator=g,
                           dtype=torch.float64).expand(slots, *shape)
    return Leaf(values, draw(st.sampled_from(LAYOUTS)), tangents, stack)


# Writes in place: (operands besides the target, the write of a number c, the value it writes).
# forward_ad's own in-place formulas read a slot they have already written when an operand is
# the target itself (x.mul_(x): (1 + x)·x·ẋ, not 2x·ẋ), so its runs copy the value in instead.
WRITES = {
    "mul_ by a number": (0, lambda c: (lambda a: a.mul_(c), lambda a: a * c)),
    "add_": (1, lambda c: (lambda a, b: a.add_(b, alpha=c), lambda a, b: a + c * b)),
    "mul_": (1, lambda c: (lambda a, b: a.mul_(b), lambda a, b: a * b)),
    "copy_": (1, lambda c: (lambda a, b: a.copy_(b), lambda a, b: b)),
    "addcmul_": (2, lambda c: (lambda a, b, e: a.addcmul_(b, e, value=c),
                               lambda a, b, e: a + c * b * e)),
    "sin_": (0, lambda c: (lambda a: a.sin_(), lambda a: a.sin())),
    "relu_": (0, lambda c: (lambda a: a.relu_(), lambda a: a.relu())),
    "clamp_": (0, lambda c: (lambda a: a.clamp_(-abs(c), abs(c)),
                             lambda a: a.clamp(-abs(c), abs(c)))),
    "zero_": (0, lambda c: (lambda a: a.zero_(), lambda a: torch.zeros_like(a))),
    "fill_": (0, lambda c: (lambda a: a.fill_(c), lambda a: torch.full_like(a, c))),
    "setitem": (1, lambda c: (lambda a, b: a.__setitem__(..., b), lambda a, b: b)),
    "setitem at a mask": (1, lambda c: (lambda a, b: a.__setitem__(a > 0, b.expand_as(a)[a > 0]),
                                        lambda a, b: torch.where(a > 0, b, a))),
    "masked_fill_": (0, lambda c: (lambda a: a.masked_fill_(a > 0, c),
                                   lambda a: a.masked_fill(a > 0, c))),
    "index_add_": (1, lambda c: (lambda a, b: a.index_add_(0, _reversed(a), b, alpha=c),
                                 lambda a, b: a + c * b.expand_as(a).flip(0))),
    "lerp_": (1, lambda c: (lambda a, b: a.lerp_(b, c), lambda a, b: a + c * (b - a))),
    "pow_": (0, lambda c: (lambda a: a.pow_(2), lambda a: a * a)),
}


def _reversed(a: torch.Tensor) -> torch.Tensor:
    """The indices of ``a``'s first dim, last first."""
    return torch.arange(a.shape[0] - 1, -1, -1)


NEW = {
    "mul": (1, lambda a, b: a * b),
    "exp": (0, lambda a: a.exp()),
    "clone": (0, lambda a: a.clone()),
    "sum(0)": (0, lambda a: a.sum(0)),
}


@st.composite
def programs(draw, max_steps: int = 12):
    """(T, program): a Dual, then views, writes and new tensors, each a step torch takes."""
    slots = draw(st.integers(1, 3))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=4)))
    program = [_draw_leaf(draw, shape, slots, tangent=True)]
    plain = run(program, _fresh)  # the program's tensors, without tangents
    dual = [True]  # whether each of them carries tangents
    for _ in range(draw(st.integers(2, max_steps))):
        kind = draw(st.sampled_from(["view", "view", "write", "write", "write", "new"]))
        target = draw(st.integers(0, len(plain) - 1))
        t = plain[target]
        if kind == "write" and (not dual[target] or _overlaps_itself(t)):
            # A write into a tensor without tangents is no Dual's business; one into a view
            # that overlaps itself is a fill at most, which torch takes and a Dual refuses.
            continue
        added: list[Leaf] = []
        if kind == "view":
            views = _view_steps(draw, t)
            what = draw(st.sampled_from(sorted(views)))
            step = Step(what, views[what](), (target,))
        else:
            table = WRITES if kind == "write" else NEW
            what = draw(st.sampled_from(sorted(table)))
            arity, make = table[what]
            operands = [target]
            for _ in range(arity):
                # Another tensor of the program that broadcasts to the target, or a new one.
                fits = [i for i, p in enumerate(plain) if _broadcasts_to(p.shape, t.shape)]
                if fits and draw(st.booleans()):
                    operands.append(draw(st.sampled_from(fits)))
                else:
                    added.append(_draw_leaf(draw, tuple(t.shape), slots, draw(st.booleans())))
                    operands.append(len(plain) + len(added) - 1)
            if kind == "write":
                fn, value = make(draw(st.sampled_from([-1.5, 0.5, 2.0])))
                step = Step(what, fn, tuple(operands), value)
            else:
                step = Step(what, make, tuple(operands))
        mirror = plain + [_fresh(leaf) for leaf in added]
        try:
            out = step.fn(*(mirror[i] for i in step.operands))
        except (RuntimeError, IndexError) as e:
            if step.value is not None:
                # torch refuses a write whose operand overlaps its target (x.index_add_(0, i,
                # x)); a Dual, which computes the value before writing it, may take it.
                continue
            # A view torch refuses (of strides that cannot take it): so must a Dual, leaving
            # what it holds as it was.
            program += added + [dataclasses.replace(step, refused=type(e))]
            dual += [leaf.tangents is not None for leaf in added]
            plain = mirror
            continue
        program += added + [step]
        dual += [leaf.tangents is not None for leaf in added]
        plain = mirror
        if step.value is None:
            plain.append(out)
            dual.append(any(dual[i] for i in step.operands))
    return slots, program


def _strides(t: torch.Tensor) -> list[int]:
    """``t``'s strides where they matter (dims of size 1 have none)."""
    return [stride for size, stride in zip(t.shape, t.stride()) if size > 1]


def _describe(program: list) -> str:
    lines, count = [], 0
    for step in program:
        if isinstance(step, Leaf):
            kind = "Dual" if step.tangents is not None else "tensor"
            lines.append(f"t{count} = {kind} {tuple(step.values.shape)} {step.layout}")
            count += 1
        elif step.refused is not None:
            lines.append(f"{step.what}{step.operands}: refused ({step.refused.__name__})")
        elif step.value is not None:
            lines.append(f"{step.what}{step.operands}")
        else:
            lines.append(f"t{count} = {step.what}{step.operands}")
            count += 1
    return "\n".join(lines)


@PROFILE
@given(case=programs())
def test_views_and_writes_in_place_match_forward_ad(case):
    slots, program = case
    note(_describe(program))
    writes = sum(isinstance(s, Step) and s.value is not None for s in program)
    event(f"writes in place: {writes if writes < 3 else '3 or more'}")
    # Only programs whose writes in place read no value they have already written (torch's
    # in-place ops give no such promise where an operand overlaps the target).
    in_place, copied_in = run(program, _fresh), run(program, _fresh, copy_in=True)
    assume(all(torch.equal(a, b) for a, b in zip(in_place, copied_in)))
    duals = run(program, as_duals)
    for slot in range(slots):
        with fwAD.dual_level():
            want = [fwAD.unpack_dual(t) for t in run(program, as_forward_ad(slot), copy_in=True)]
            for i, (ours, (primal, tangent)) in enumerate(zip(duals, want)):
                ours_primal = ours.primal if isinstance(ours, Dual) else ours
                ours_tangent = (ours.tangents[slot] if isinstance(ours, Dual)
                                else torch.zeros_like(ours))
                tangent = torch.zeros_like(primal) if tangent is None else tangent
                torch.testing.assert_close(ours_primal, primal, rtol=1e-12, atol=1e-12,
                                           equal_nan=True, msg=lambda m: f"t{i} primal: {m}")
                assert _strides(ours_primal) == _strides(primal), f"t{i}'s strides"
                torch.testing.assert_close(ours_tangent, tangent, rtol=1e-10, atol=1e-12,
                                           equal_nan=True,
                                           msg=lambda m: f"t{i} slot {slot}: {m}")

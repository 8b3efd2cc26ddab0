"""Products of two or more operands: ``matmul`` (``@``), ``mm``, ``bmm``, ``mv``, ``dot``,
``vdot``, ``outer``, ``baddbmm``, ``addmm`` and ``einsum``. Each is linear in every operand,
so its tangent is the sum over operands of the product with that operand replaced by its
tangent (``(a·b)˙ = ȧ·b + a·ḃ``), each term computed over every slot at once (the slot axis a
leading batch dim)."""
from __future__ import annotations

import string
from typing import Callable, Optional

import torch

from ..dual import slots as _slots
from ..dual.rule_table import implements
from ..dual.value import Dual
from .operands import parts
from .pointwise import lift

Tensor = torch.Tensor


def _product(op: str, operands: list, compute: Callable[[list], Tensor],
             term: Callable[..., Tensor], primal_factors: bool = False,
             prepare: Optional[Callable[[Tensor], Tensor]] = None) -> Dual:
    """The Dual of ``y = compute(primals)`` whose tangent sums ``term(i, stack_i, factors)``
    over the operands with a tangent (stack_i in the output slots' dtype, and the primals as
    factors cast to it). With ``primal_factors`` a term is ``term(i, stack_i, primals, y)``
    instead: the primals as they are, for a term that finds something in them (a maximum, a
    distance) before it multiplies. ``prepare`` maps each tensor primal first (the same
    values: a layout the products take without copying)."""
    ps = [parts(v) for v in operands]
    primals = [p.primal for p in ps]
    if prepare is not None:
        primals = [prepare(v) if isinstance(v, Tensor) else v for v in primals]
    y = compute(primals)
    plan = _slots.plan([p.slots for p in ps], op)
    if plan.count == 0:
        return Dual._unchecked(y, None, None, False)
    dtype = plan.dtype_for(y.dtype)
    if primal_factors:
        term_of = lambda i, stack: term(i, stack, primals, y)
    else:
        cast = lambda v: v.to(dtype) if isinstance(v, Tensor) \
            and (v.is_floating_point() or v.is_complex()) else v
        factors = [cast(v) for v in primals]
        term_of = lambda i, stack: term(i, stack, factors)
    terms = [(term_of(i, _slots.cast(p.tangents, dtype)), pos)
             for i, (p, pos) in enumerate(zip(ps, plan.positions)) if p.tangents is not None]
    yt = _slots.place(plan.count, [(t.expand(t.shape[0], *y.shape), pos) for t, pos in terms])
    return Dual._unchecked(y, yt, plan.directions, plan.single)


def _matmul_term(i: int, stack: Tensor, f: list) -> Tensor:
    """``ȧ @ b`` (i = 0) or ``a @ ḃ`` (i = 1) over every slot: 1-D operands as matrices, and
    the stack's slot axis kept ahead of the broadcast batch dims."""
    a, b = f
    a_vec, b_vec = a.dim() == 1, b.dim() == 1
    if i == 0:
        left = stack.unsqueeze(-2) if a_vec else stack
        right = b.unsqueeze(-1) if b_vec else b
        out = lift(left, max(left.dim() - 1, right.dim())) @ right
    else:
        left = a.unsqueeze(-2) if a_vec else a
        right = stack.unsqueeze(-1) if b_vec else stack
        out = left @ lift(right, max(left.dim(), right.dim() - 1))
    if b_vec:
        out = out.squeeze(-1)
    return out.squeeze(-1 if b_vec else -2) if a_vec else out


def _folded(t: Tensor) -> Tensor:
    """``t`` as a product folds it into a batch of matrices without a copy: an operand of more
    than two dims whose batch dims do not merge into one (heads split from a fused projection,
    a key transposed) made contiguous once, where torch.matmul would copy it for the primal
    product and again for the other operand's tangent term (the same copy: the same values,
    laid out alike)."""
    if t.dim() <= 2:
        return t
    batch = [(size, stride) for size, stride in zip(t.shape[:-2], t.stride()[:-2]) if size != 1]
    merges = all(stride == inner_stride * inner_size
                 for (_, stride), (inner_size, inner_stride) in zip(batch, batch[1:]))
    return t if merges else t.contiguous()


@implements(torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)
def matmul(input, other) -> Dual:
    """Dual matrix product (``torch.matmul``'s broadcasting)."""
    return _product("matmul", [input, other], lambda p: torch.matmul(*p), _matmul_term,
                    prepare=_folded)


def matmul_tangents(input, other, y: Tensor) -> Dual:
    """The Dual of ``input @ other`` whose primal ``y`` the caller already has (computed
    otherwise, as a fused kernel computes attention): the tangent's products alone."""
    return _product("matmul", [input, other], lambda p: y, _matmul_term, prepare=_folded)


# The forms of matmul restricted to some shapes: each primal is the op's own, which refuses the
# other shapes as torch does; each tangent is matmul's. Operands named as torch names them.
@implements(torch.mm, torch.Tensor.mm)
def mm(input, mat2) -> Dual:
    """Dual ``torch.mm`` (two matrices)."""
    return _product("mm", [input, mat2], lambda p: torch.mm(*p), _matmul_term)


@implements(torch.bmm, torch.Tensor.bmm)
def bmm(input, mat2) -> Dual:
    """Dual ``torch.bmm`` (two batches of matrices)."""
    return _product("bmm", [input, mat2], lambda p: torch.bmm(*p), _matmul_term)


@implements(torch.mv, torch.Tensor.mv)
def mv(input, vec) -> Dual:
    """Dual ``torch.mv`` (a matrix and a vector)."""
    return _product("mv", [input, vec], lambda p: torch.mv(*p), _matmul_term)


@implements(torch.dot, torch.Tensor.dot)
def dot(input, tensor) -> Dual:
    """Dual ``torch.dot`` (two vectors, no conjugate)."""
    return _product("dot", [input, tensor], lambda p: torch.dot(*p), _matmul_term)


@implements(torch.vdot, torch.Tensor.vdot)
def vdot(input, other) -> Dual:
    """Dual ``torch.vdot``, ``Σ conj(a)·b``: ``conj(ȧ)·b + conj(a)·ḃ``."""
    def term(i, stack, f):
        return stack.conj() @ f[1] if i == 0 else stack @ f[0].conj()
    return _product("vdot", [input, other], lambda p: torch.vdot(*p), term)


@implements(torch.outer, torch.Tensor.outer, torch.ger, torch.Tensor.ger)
def outer(input, vec2) -> Dual:
    """Dual ``torch.outer``, ``a bᵀ``: ``ȧ bᵀ + a ḃᵀ``."""
    def term(i, stack, f):
        return stack.unsqueeze(-1) * f[1] if i == 0 else f[0].unsqueeze(-1) * stack.unsqueeze(-2)
    return _product("outer", [input, vec2], lambda p: torch.outer(*p), term)


@implements(torch.Tensor.__rmatmul__)
def _rmatmul(input, other) -> Dual:
    return matmul(other, input)


def _scaled_sum(name: str, torch_op: Callable, operands: list, dims: int, beta, alpha,
                product_term: Callable) -> Dual:
    """Dual ``beta·input + alpha·product(a, b)`` (``torch_op(input, a, b, beta=, alpha=)``,
    the product of ``dims`` dims): the input's tangent scaled by beta, ``product_term(i, stack,
    primals)`` the product's term of operand i (1 or 2) scaled by alpha."""
    def term(i, stack, f):
        if i == 0:  # input broadcasts against the product: its slot axis kept in front
            return lift(stack, dims) * beta
        return alpha * product_term(i, stack, f)
    return _product(name, operands, lambda p: torch_op(*p, beta=beta, alpha=alpha), term)


def _matmul_of_pair(i: int, stack: Tensor, f: list) -> Tensor:
    """The term of ``a @ b`` (operands 1 and 2) of operand i's slots."""
    return stack @ f[2] if i == 1 else f[1] @ stack


@implements(torch.baddbmm, torch.Tensor.baddbmm)
def baddbmm(input, batch1, batch2, *, beta=1, alpha=1) -> Dual:
    """Dual ``beta·input + alpha·batch1 @ batch2``."""
    return _scaled_sum("baddbmm", torch.baddbmm, [input, batch1, batch2], 3, beta, alpha,
                       _matmul_of_pair)


@implements(torch.addmm, torch.Tensor.addmm)
def addmm(input, mat1, mat2, *, beta=1, alpha=1) -> Dual:
    """Dual ``beta·input + alpha·mat1 @ mat2`` (a linear layer's product, as decompositions
    write it)."""
    return _scaled_sum("addmm", torch.addmm, [input, mat1, mat2], 2, beta, alpha,
                       _matmul_of_pair)


@implements(torch.addmv, torch.Tensor.addmv)
def addmv(input, mat, vec, *, beta=1, alpha=1) -> Dual:
    """Dual ``beta·input + alpha·mat @ vec``."""
    def term(i, stack, f):
        return stack @ f[2] if i == 1 else (f[1] @ stack.unsqueeze(-1)).squeeze(-1)
    return _scaled_sum("addmv", torch.addmv, [input, mat, vec], 1, beta, alpha, term)


@implements(torch.addr, torch.Tensor.addr)
def addr(input, vec1, vec2, *, beta=1, alpha=1) -> Dual:
    """Dual ``beta·input + alpha·vec1 vec2ᵀ``: ``alpha·(v̇1 vec2ᵀ + vec1 v̇2ᵀ)``."""
    def term(i, stack, f):
        return stack.unsqueeze(-1) * f[2] if i == 1 else f[1].unsqueeze(-1) * stack.unsqueeze(-2)
    return _scaled_sum("addr", torch.addr, [input, vec1, vec2], 2, beta, alpha, term)


@implements(torch.addbmm, torch.Tensor.addbmm)
def addbmm(input, batch1, batch2, *, beta=1, alpha=1) -> Dual:
    """Dual ``beta·input + alpha·Σ_b batch1[b] @ batch2[b]``."""
    def term(i, stack, f):
        return _matmul_of_pair(i, stack, f).sum(1)
    return _scaled_sum("addbmm", torch.addbmm, [input, batch1, batch2], 2, beta, alpha, term)


@implements(torch.einsum)
def einsum(equation: str, *operands) -> Dual:
    """Dual ``einsum``: each operand's term is the same contraction with that operand's
    tangent, the slot axis a letter of its own kept in front."""
    if not isinstance(equation, str):
        equation, operands = _sublist_equation((equation, *operands))
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    inputs, arrow, output = equation.replace(" ", "").partition("->")
    subscripts = inputs.split(",")
    if not arrow:
        output = "".join(sorted(c for c in set(inputs) - {","} if inputs.count(c) == 1))
    if len(operands) == 1 and isinstance(operands[0], Dual):
        return _einsum_of_one(equation, operands[0])
    if "." in equation:  # an ellipsis: torch's own handling of it, the slots by vmap
        return _product("einsum", list(operands), lambda p: torch.einsum(equation, *p),
                        lambda i, s, f: torch.vmap(lambda t: torch.einsum(
                            equation, *f[:i], t, *f[i + 1:]))(s))
    slot = next(c for c in string.ascii_letters if c not in equation)

    def term(i, stack, f):
        subs = [slot + s if k == i else s for k, s in enumerate(subscripts)]
        return torch.einsum(f"{','.join(subs)}->{slot}{output}", *f[:i], stack, *f[i + 1:])

    return _product("einsum", list(operands), lambda p: torch.einsum(equation, *p), term)


def _einsum_of_one(equation: str, d: Dual) -> Dual:
    """``einsum`` of one operand, a linear map of it: the map on the primal and on the slots
    (vmapped). A permutation or a diagonal is a view, as torch's is: a write into it reaches
    ``d``."""
    y = torch.einsum(equation, d.primal)
    t = d.tangents
    if t is not None:
        t = torch.vmap(lambda s: torch.einsum(equation, s))(t)
    return d.as_view(d.with_tangents(y, t))


def _sublist_equation(args: tuple) -> tuple[str, tuple]:
    """einsum's sublist form ``(a, [0, 1], b, [1, 2], [0, 2])`` as an equation and its
    operands (``"AB,BC->AC"``): subscripts 0-25 as A-Z, 26-51 as a-z, Ellipsis as "...", as
    torch reads them."""
    n = len(args) // 2
    letters = string.ascii_uppercase + string.ascii_lowercase
    spell = lambda subs: "".join("..." if s is Ellipsis else letters[s] for s in subs)
    equation = ",".join(spell(subs) for subs in args[1:2 * n:2])
    if len(args) % 2:
        equation += "->" + spell(args[-1])
    return equation, tuple(args[0:2 * n:2])

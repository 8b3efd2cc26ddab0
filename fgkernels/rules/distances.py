"""p-norm distances between rows: ``torch.cdist`` (every row of one operand against every row of
the other) and ``F.pdist`` (every pair of rows of one operand), which torch's forward mode does
not differentiate. The primal is torch's own; the tangent of ``d = ‖Δ‖_p``, ``Δ = a − b``, is

    ḋ = Σ_k ∂‖Δ‖_p/∂Δ_k · Δ̇_k = Σ_k sign(Δ_k)·|Δ_k|^(p−1)·Δ̇_k / d^(p−1)

(``Δ·Δ̇ / d`` at p = 2, ``Σ sign(Δ)·Δ̇`` at p = 1, the coordinates where ``|Δ|`` is the
maximum sharing ``sign(Δ)·Δ̇`` evenly at p = ∞ as ``amax``'s forward mode shares a tie, 0 at
p = 0), and 0 where ``d = 0``, as torch's backward of the op gives. Linear in Δ̇, so each
operand's term is computed alone (``products._product``)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..dual.rule_table import implements
from ..dual.value import Dual
from .operands import as_dual
from .pointwise import lift
from .products import _product

Tensor = torch.Tensor

__all__ = ["cdist", "pdist"]

# At p = 2 the tangent is formed from the rows' differences while they fit in this many elements
# (every slot's, (T, ..., P, R, M)), else by products, which need none: Δ·Δ̇ as a sum of dot
# products cancels where two rows are near (a relative error of about ε·|a|/d).
EXACT_BUDGET = 1 << 22


def _check_p(op: str, p) -> float:
    """``p`` as a float (a NumPy scalar too), refused unless a non-negative number."""
    try:
        value = float(p) if not isinstance(p, (bool, str)) else None
    except (TypeError, ValueError):
        value = None
    if value is None or not value >= 0:
        raise ValueError(f"{op}: p must be a non-negative number, got {p!r}")
    return value


def _euclidean_term(i: int, stack: Tensor, a: Tensor, b: Tensor, d: Tensor) -> Tensor:
    """``Δ·Δ̇ / d`` for ``Δ̇ = ȧ`` (i = 0) or ``−ḃ`` (i = 1), every slot, by products over the
    rows' coordinates (no ``(P, R, M)`` difference is formed):
    ``Δ·ȧ = a·ȧ − b·ȧ`` and ``−Δ·ḃ = b·ḃ − a·ḃ``."""
    stack = lift(stack, d.dim())  # the slot axis ahead of the batch dims both operands share
    if i == 0:
        dot = (a * stack).sum(-1).unsqueeze(-1) - stack @ b.transpose(-1, -2)
    else:
        dot = (b * stack).sum(-1).unsqueeze(-2) - a @ stack.transpose(-1, -2)
    return torch.where(d == 0, 0, dot / d)


def _p_norm_term(i: int, stack: Tensor, a: Tensor, b: Tensor, p: float) -> Tensor:
    """The tangent's sum over the coordinates of the differences ``Δ`` (formed for every pair
    of rows, ``(..., P, R, M)``, and their norms from them) for ``Δ̇ = ȧ`` (i = 0) or ``−ḃ``
    (i = 1)."""
    delta = a.unsqueeze(-2) - b.unsqueeze(-3)
    stack = lift(stack, delta.dim() - 1)  # the slot axis ahead of the shared batch dims
    rate = stack.unsqueeze(-2) if i == 0 else -stack.unsqueeze(-3)
    if p == 0 or delta.shape[-1] == 0:  # a count of the nonzero coordinates; no coordinates
        shape = torch.broadcast_shapes(delta.shape, rate.shape)[:-1]
        return torch.zeros(shape, dtype=stack.dtype, device=stack.device)
    if p == 1:
        return (delta.sign() * rate).sum(-1)
    if math.isinf(p):
        size = delta.abs()
        peak = size == size.amax(-1, keepdim=True)
        return (delta.sign() * rate * peak).sum(-1) / peak.sum(-1).clamp_min(1)
    d = torch.linalg.vector_norm(delta, p, -1)
    slope = delta if p == 2 else delta.sign() * delta.abs().pow(p - 1)
    if p < 1:  # |Δ|^(p−1) is infinite at Δ = 0, where torch's backward takes 0
        slope = torch.where(delta == 0, 0, slope)
    return torch.where(d == 0, 0, (slope * rate).sum(-1) / d.pow(p - 1))


@implements(torch.cdist)
def cdist(x1, x2, p: float = 2.0,
          compute_mode: str = "use_mm_for_euclid_dist_if_necessary") -> Dual:
    """Dual ``torch.cdist``: the distances between the rows of ``x1`` (..., P, M) and those of
    ``x2`` (..., R, M). The tangent is formed from the differences of every pair of rows
    (memory ``(T, ..., P, R, M)``), at p = 2 by products where those would pass
    ``EXACT_BUDGET``."""
    p = _check_p("cdist", p)

    def term(i, stack, primals, d):
        a, b = primals
        if p != 2 or stack.shape[0] * d.numel() * a.shape[-1] <= EXACT_BUDGET:
            # in the primal's dtype: a maximum found among rounded differences is not d's
            t = _p_norm_term(i, stack.to(d.dtype), a, b, p)
            return t.to(stack.dtype)
        if compute_mode != "donot_use_mm_for_euclid_dist":
            # The matrix-product form of d (‖a‖² + ‖b‖² − 2a·b, which torch takes for many
            # rows) loses |a|²/d² of its relative precision: the tangent divides by d formed
            # from the differences.
            d = torch.cdist(a, b, 2.0, "donot_use_mm_for_euclid_dist")
        # in the primal's dtype: the dot products' cancellation in a narrower one is its ε·|a|/d
        return _euclidean_term(i, stack.to(d.dtype), a, b, d).to(stack.dtype)

    return _product("cdist", [x1, x2], lambda f: torch.cdist(f[0], f[1], p, compute_mode), term,
                    primal_factors=True)


@implements(F.pdist, torch.pdist)
def pdist(input, p: float = 2.0) -> Dual:
    """Dual ``F.pdist``: the distance of every pair of rows ``i < j`` of ``input`` (N, M), in
    ``pdist``'s order; the tangent is ``cdist``'s of the input against itself, read at those
    pairs."""
    p = _check_p("pdist", p)
    d = as_dual(input, "pdist")
    if d.primal.dim() != 2:
        raise RuntimeError(f"pdist only supports 2D tensors, got: {d.primal.dim()}D")
    y = F.pdist(d.primal, p)
    if d.tangents is None:
        return d.with_tangents(y, None)
    n = d.primal.shape[0]
    rows, cols = torch.triu_indices(n, n, 1, device=y.device)
    full = cdist(d, d, p, "donot_use_mm_for_euclid_dist")
    return d.with_tangents(y, full.tangents[:, rows, cols])

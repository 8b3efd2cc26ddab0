"""The forward-mode oracle of fgkernels' tests and benchmarks: PyTorch's own forward-mode AD.

``forward_ad_jvp`` evaluates a function of plain tensors with ``torch.autograd.forward_ad``,
once per tangent slot, and returns the primal output and the stacked tangents, the layout a
``Dual`` carries. It is the reference every fgkernels rule is checked against.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, Optional

import torch
import torch.autograd.forward_ad as fwAD
from torch.utils import _pytree as pytree

Tensor = torch.Tensor


def forward_ad_jvp(fn: Callable[..., Any], primals: Sequence[Tensor],
                   tangents: Sequence[Optional[Tensor]]) -> tuple[Any, Any]:
    """``fn(*primals)`` and its tangents by forward_ad, for stacked tangents.

    ``tangents[i]`` is None (argument i is constant) or ``(T, *primals[i].shape)``; every stack
    has the same T. Returns ``(output, tangent)`` with the output's structure, each tangent
    stacked ``(T, *output.shape)`` (zeros where the output does not depend on the inputs).
    """
    count = {t.shape[0] for t in tangents if t is not None}
    if len(count) != 1:
        raise ValueError(f"forward_ad_jvp: every tangent stack needs the same T >= 1, got "
                         f"{sorted(count)}")
    (T,) = count
    primal_out, spec, slots = None, None, []
    for s in range(T):
        with fwAD.dual_level():
            args = [p if t is None else fwAD.make_dual(p, t[s])
                    for p, t in zip(primals, tangents)]
            leaves, spec = pytree.tree_flatten(fn(*args))
            pairs = [fwAD.unpack_dual(v) if isinstance(v, Tensor) else (v, None) for v in leaves]
        if primal_out is None:
            primal_out = pytree.tree_unflatten([p for p, _ in pairs], spec)
        slots.append([(torch.zeros_like(p) if t is None else t) if isinstance(p, Tensor)
                      else None for p, t in pairs])
    stacked = [None if ts[0] is None else torch.stack(ts) for ts in zip(*slots)]
    return primal_out, pytree.tree_unflatten(stacked, spec)

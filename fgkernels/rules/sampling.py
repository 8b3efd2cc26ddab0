"""Sampling an input at the points of a grid: ``F.grid_sample``, which torch's forward mode does
not differentiate. The primal is torch's own. The output is linear in the input, so the input's
term is the same sampling of its tangent (every slot in one call, batched along N); the grid's
term, ``∂y/∂grid · ġ``, is the forward-mode derivative of torch's own decomposition of the
2-d sampler (the one its compilers use: every mode, padding mode and corner alignment), taken
at the primal (in float32 at least)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..dual.dtypes import acc_dtype
from ..dual.value import Dual, implements
from .fallback import jvp_over_slots
from .products import _product

Tensor = torch.Tensor

__all__ = ["grid_sample"]

_MODES = {"bilinear": 0, "nearest": 1, "bicubic": 2}
_PADDING_MODES = {"zeros": 0, "border": 1, "reflection": 2}


def _sampler_decomposition():
    from torch._decomp import decomposition_table
    sampler = decomposition_table.get(torch.ops.aten.grid_sampler_2d.default)
    if sampler is None:
        raise NotImplementedError(
            "grid_sample: this torch has no decomposition of grid_sampler_2d, which the "
            "tangent of the grid is taken through")
    return sampler


@implements(F.grid_sample)
def grid_sample(input, grid, mode: str = "bilinear", padding_mode: str = "zeros",
                align_corners: Optional[bool] = None) -> Dual:
    """Dual ``F.grid_sample`` (arguments as torch's): the input's tangent sampled at the grid,
    plus the grid's tangent through the sampler's derivative in its coordinates (0 for
    ``nearest``, piecewise constant). A 3-d (5-D) sampling grid with a tangent is refused."""
    def term(i: int, stack: Tensor, primals: list, _) -> Tensor:
        x, g = primals
        slots, n = stack.shape[0], g.shape[0]
        # a bfloat16 grid's points located, and its samples weighed, in float32
        wide = acc_dtype(g.dtype)
        if i == 0:  # y is linear in x: the same sampling of each slot
            grid = g.to(wide).expand(slots, *g.shape).reshape(slots * n, *g.shape[1:])
            y = F.grid_sample(stack.flatten(0, 1).to(wide), grid, mode, padding_mode,
                              bool(align_corners))  # (torch has warned of None once)
            return y.unflatten(0, (slots, n)).to(stack.dtype)
        if x.dim() != 4:
            raise NotImplementedError("grid_sample: the tangent of a 3-d (5-D) sampling grid "
                                      "is not implemented; give the grid no tangent")
        sampler = _sampler_decomposition()
        flags = (_MODES[mode], _PADDING_MODES[padding_mode], bool(align_corners))
        x = x.to(wide)
        _, tangents = jvp_over_slots(lambda grid: sampler(x, grid, *flags), (g.to(wide),),
                                     (stack.to(wide),))
        return tangents.to(stack.dtype)

    return _product("grid_sample", [input, grid],
                    lambda f: F.grid_sample(f[0], f[1], mode, padding_mode, align_corners), term,
                    primal_factors=True)

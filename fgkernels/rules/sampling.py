"""Sampling an input at the points of a grid: ``F.grid_sample``, which torch's forward mode does
not differentiate. The primal is torch's own. The output is linear in the input, so the input's
term is the same sampling of its tangent (every slot in one call, batched along N); the grid's
term, ``∂y/∂grid · ġ``, takes ``∂y/∂grid`` from torch's own backward kernel, so that it is
the derivative torch's reverse mode has (every mode, padding mode and corner alignment, a
point on a border included, where the kernel's clipped coordinate has slope 0), in float32 at
least."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..dual.dtypes import acc_dtype
from ..dual.rule_table import implements
from ..dual.value import Dual
from .products import _product

Tensor = torch.Tensor

__all__ = ["grid_sample"]

_MODES = {"bilinear": 0, "nearest": 1, "bicubic": 2}
_PADDING_MODES = {"zeros": 0, "border": 1, "reflection": 2}


def _grid_derivative(x: Tensor, g: Tensor, flags: tuple) -> Tensor:
    """``∂y/∂grid`` of each output channel at each output point, ``(N, C, *out, d)``: an output
    point depends on its own grid point alone, so torch's backward kernel of one single-channel
    image per channel, under an output gradient of ones, gives each channel's derivative."""
    n, c = x.shape[:2]
    images = x.reshape(n * c, 1, *x.shape[2:])
    grid = g.unsqueeze(1).expand(n, c, *g.shape[1:]).reshape(n * c, *g.shape[1:])
    backward = torch.ops.aten.grid_sampler_2d_backward if g.shape[-1] == 2 \
        else torch.ops.aten.grid_sampler_3d_backward
    ones = images.new_ones(n * c, 1, *g.shape[1:-1])
    _, d_grid = backward(ones, images, grid, *flags, [False, True])
    return d_grid.view(n, c, *g.shape[1:])


@implements(F.grid_sample)
def grid_sample(input, grid, mode: str = "bilinear", padding_mode: str = "zeros",
                align_corners: Optional[bool] = None) -> Dual:
    """Dual ``F.grid_sample`` (arguments as torch's, 2-d and 3-d): the input's tangent sampled
    at the grid, plus the grid's tangent through the sampler's derivative in its coordinates
    (0 for ``nearest``, piecewise constant)."""
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
        flags = (_MODES[mode], _PADDING_MODES[padding_mode], bool(align_corners))
        d_grid = _grid_derivative(x.to(wide), g.to(wide), flags)  # (N, C, *out, d)
        # ẏ[s, n, c, p] = Σ_k ∂y[n, c, p]/∂g[n, p, k] · ġ[s, n, p, k]
        return torch.einsum("nc...k,sn...k->snc...", d_grid, stack.to(wide)).to(stack.dtype)

    return _product("grid_sample", [input, grid],
                    lambda f: F.grid_sample(f[0], f[1], mode, padding_mode, align_corners), term,
                    primal_factors=True)

"""The reference backend: DESIGN.md's JVP formulas in plain PyTorch.

Every op takes the primal operands, their stacked tangents (``(T, *shape)`` or None) and the slot
plan from ``fgkernels._slots``: ``x_pos`` / ``p_pos`` say which output slots the input's and the
parameters' tangents fill, ``count`` how many slots the output has. It returns ``(y, y_tangents)``.
This backend is the oracle of the tests and the fallback of the others.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._slots import place

Tensor = torch.Tensor
Opt = Optional[Tensor]


def _bias_slots(bt: Tensor, y: Tensor) -> Tensor:
    """A stacked bias tangent ``(T, C)`` shaped to broadcast over ``(T, *y.shape)``,
    y being ``(N, C, *spatial)``."""
    return bt.reshape(bt.shape[0], 1, bt.shape[1], *([1] * (y.dim() - 2)))


class ReferenceBackend:
    """Pure-PyTorch JVPs; subclasses override the ops they fuse and inherit the rest."""

    name = "reference"

    # --- conv2d: y = W*x + b,  ẏ = W*ẋ + Ẇ*x + ḃ -----------------------------------------------
    def conv2d(self, x: Tensor, xt: Opt, w: Tensor, wt: Opt, b: Opt, bt: Opt,
               x_pos: tuple, p_pos: tuple, count: int,
               stride, padding, dilation, groups: int, y: Opt = None) -> tuple[Tensor, Opt]:
        """``y``, when given, is the primal output the caller already has (``W*x + b``); then
        only the tangents are computed. Every backend takes it; one that fuses the primal with
        the tangents may compute its own instead."""
        conv = lambda inp, weight, bias=None: F.conv2d(inp, weight, bias, stride, padding,
                                                       dilation, groups)
        y = conv(x, w, b) if y is None else y
        parts = []
        if xt is not None:
            parts.append((conv(xt.flatten(0, 1), w).unflatten(0, xt.shape[:2]), x_pos))
        if p_pos:
            if wt is not None:
                pt = torch.stack([conv(x, wt[t]) for t in range(wt.shape[0])])
                if bt is not None:
                    pt = pt + _bias_slots(bt, y)
            else:
                pt = _bias_slots(bt, y).expand(bt.shape[0], *y.shape)
            parts.append((pt, p_pos))
        return y, place(count, parts) if parts else None

    # --- linear: y = xWᵀ + b,  ẏ = ẋWᵀ + xẆᵀ + ḃ --------------------------------------------------
    def linear(self, x: Tensor, xt: Opt, w: Tensor, wt: Opt, b: Opt, bt: Opt,
               x_pos: tuple, p_pos: tuple, count: int) -> tuple[Tensor, Opt]:
        y = F.linear(x, w, b)
        parts = []
        if xt is not None:
            parts.append((F.linear(xt, w), x_pos))
        if p_pos:
            bias = None if bt is None else bt.reshape(bt.shape[0], *([1] * (y.dim() - 1)), -1)
            if wt is not None:
                pt = torch.stack([F.linear(x, wt[t]) for t in range(wt.shape[0])])
                pt = pt if bias is None else pt + bias
            else:
                pt = bias.expand(bt.shape[0], *y.shape)
            parts.append((pt, p_pos))
        return y, place(count, parts) if parts else None

    # --- batch norm (+ ReLU) ---------------------------------------------------------------------
    def batch_norm(self, x: Tensor, xt: Opt, w: Opt, b: Opt, wt: Opt, bt: Opt,
                   x_pos: tuple, p_pos: tuple, count: int,
                   running_mean: Opt, running_var: Opt, training: bool, momentum: float,
                   eps: float, relu: bool) -> tuple[Tensor, Opt]:
        """Training: ``x̂ = (x-μ)/σ``, ``ẋ̂ = (ẋ - mean ẋ - x̂·mean(x̂ẋ))/σ``; eval: the affine map of
        the running stats. ``y = γx̂ + β``, ``ẏ = γ̇x̂ + γẋ̂ + β̇``; the running stats are updated
        by ``F.batch_norm`` itself, so they match ``nn.BatchNorm2d`` exactly."""
        y = F.batch_norm(x, running_mean, running_var, w, b, training, momentum, eps)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        if training:
            mean = x.mean(dims, keepdim=True)
            rstd = torch.rsqrt(x.var(dims, unbiased=False, keepdim=True) + eps)
        else:
            mean = running_mean.view(shape)
            rstd = torch.rsqrt(running_var.view(shape) + eps)
        xhat = (x - mean) * rstd
        parts = []
        if xt is not None:
            if training:
                tdims = [d + 1 for d in dims]
                xt_hat = (xt - xt.mean(tdims, keepdim=True)
                          - xhat * (xhat * xt).mean(tdims, keepdim=True)) * rstd
            else:
                xt_hat = xt * rstd
            parts.append((xt_hat if w is None else xt_hat * w.view(shape), x_pos))
        if p_pos:
            slots = (wt if wt is not None else bt).shape[0]
            bias = None if bt is None else bt.view(slots, *shape)
            if wt is not None:
                pt = wt.view(slots, *shape) * xhat
                pt = pt if bias is None else pt + bias
            else:
                pt = bias.expand(slots, *x.shape)
            parts.append((pt, p_pos))
        yt = place(count, parts) if parts else None
        if relu:
            y, yt = self.relu(y, yt)
        return y, yt

    # --- conv2d → batch norm (+ ReLU) -------------------------------------------------------
    def conv2d_batch_norm(self, x, xt, w, wt, cb, cbt, x_pos, conv_pos, count, stride, padding,
                          dilation, groups, g, bb, gt, bbt, bn_pos, running_mean, running_var,
                          training, momentum, eps, relu, conv_y=None):
        """The convolution's output slots are the batch norm's input slots, in order; the
        batch norm's parameter tangents land at ``bn_pos`` among them; ``conv_y`` is the
        convolution's primal output when the caller has it. Fused backends override."""
        h, ht = self.conv2d(x, xt, w, wt, cb, cbt, x_pos, conv_pos, count, stride, padding,
                            dilation, groups, conv_y)
        return self.batch_norm(h, ht, g, bb, gt, bbt, tuple(range(count)), bn_pos, count,
                               running_mean, running_var, training, momentum, eps, relu)

    # --- relu: ẏ = ẋ where x > 0 or x is NaN, else 0 (torch.relu's derivative) ---------------
    def relu(self, x: Tensor, xt: Opt) -> tuple[Tensor, Opt]:
        # A select, not a product: a NaN or Inf tangent where x <= 0 gives 0, as in torch.
        return torch.relu(x), None if xt is None else xt.masked_fill(x <= 0, 0)

    # --- max_pool2d: the tangent is gathered at the primal's argmax -------------------------
    def max_pool2d(self, x: Tensor, xt: Opt, kernel_size, stride, padding, dilation,
                   ceil_mode: bool) -> tuple[Tensor, Opt]:
        y, idx = F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode,
                              return_indices=True)
        if xt is None:
            return y, None
        flat_idx = idx.flatten(-2).expand(xt.shape[0], *idx.shape[:-2], -1)
        yt = xt.flatten(-2).gather(-1, flat_idx).view(xt.shape[0], *y.shape)
        return y, yt

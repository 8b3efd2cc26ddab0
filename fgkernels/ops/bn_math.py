"""Dual batch norm as a per-channel affine map of (x, ẋ), shared by the fused backends.

With ``x̂ = (x - μ)·r`` (``r = 1/√(σ² + eps)``), ``a = γr``:

    y   = a·x + (β - aμ)
    ẏ_t = a·ẋ_s + B_tc·x + D_tc          (s: the input slot that output slot t comes from)

training (μ, σ² from the batch, ``m1 = mean ẋ_s``, ``cov = mean((x-μ)ẋ_s)``):
    γẋ̂ = a(ẋ - m1 - x̂·r·cov)   →  B −= a·r²·cov,     D += −a·m1 + a·r²·cov·μ
parameter tangents (γ̇, β̇), both modes:
    γ̇x̂ + β̇                      →  B += γ̇·r,          D += β̇ − γ̇·r·μ
In eval mode μ, σ² are the running stats and ẋ̂ = r·ẋ, so only ``a·ẋ`` remains from the input.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

Tensor = torch.Tensor


@dataclass
class BNCoefficients:
    """``y = scale·x + shift``, ``ẏ_t = scale·ẋ_{x_slot[t]} + t_xscale[t]·x + t_shift[t]``."""

    scale: Tensor      # (C,)
    shift: Tensor      # (C,)
    t_xscale: Tensor   # (count, C)
    t_shift: Tensor    # (count, C)
    x_slot: list[int]  # per output slot: the input slot it continues, or -1


def bn_coefficients(mean: Tensor, var: Tensor, tmean: Optional[Tensor], tcov: Optional[Tensor],
                    w: Optional[Tensor], b: Optional[Tensor], wt: Optional[Tensor],
                    bt: Optional[Tensor], x_pos: tuple, p_pos: tuple, count: int,
                    training: bool, eps: float) -> BNCoefficients:
    """The affine coefficients from the statistics (batch ones when ``training``, else the
    running ones; ``tmean``/``tcov`` are (T, C) and used only in training)."""
    dtype = mean.dtype
    r = torch.rsqrt(var + eps)
    gamma = r.new_ones(()) if w is None else w.to(dtype)
    beta = r.new_zeros(()) if b is None else b.to(dtype)
    a = gamma * r
    scale = a.expand_as(mean).contiguous()
    shift = (beta - a * mean).expand_as(mean).contiguous()
    t_xscale = mean.new_zeros((count, mean.shape[0]))
    t_shift = mean.new_zeros((count, mean.shape[0]))
    x_slot = [-1] * count
    for s, t in enumerate(x_pos):
        x_slot[t] = s
    if x_pos and training:
        idx = torch.tensor(x_pos, device=mean.device)
        k = a * r * r * tcov                                   # a·r²·cov, (T, C)
        t_xscale.index_add_(0, idx, -k)
        t_shift.index_add_(0, idx, -a * tmean + k * mean)
    if p_pos:
        idx = torch.tensor(p_pos, device=mean.device)
        if wt is not None:
            g = wt.to(dtype) * r                               # γ̇·r
            t_xscale.index_add_(0, idx, g)
            t_shift.index_add_(0, idx, -g * mean)
        if bt is not None:
            t_shift.index_add_(0, idx, bt.to(dtype))
    return BNCoefficients(scale, shift, t_xscale, t_shift, x_slot)


def update_running_stats(running_mean: Optional[Tensor], running_var: Optional[Tensor],
                         mean: Tensor, var: Tensor, n: int, momentum: float) -> None:
    """``r ← (1 - m)·r + m·stat`` with the unbiased variance, as ``nn.BatchNorm2d`` does."""
    if running_mean is None:
        return
    unbiased = var * (n / max(n - 1, 1))
    running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
    running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)

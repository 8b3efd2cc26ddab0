"""Dual batch norm as a per-channel affine map of (x - μ, ẋ), shared by the fused backends.

With ``u = x - μ``, ``x̂ = u·r`` (``r = 1/√(σ² + eps)``), ``a = γr``:

    y   = a·u + β
    ẏ_t = a·ẋ_s + B_tc·u + D_tc          (s: the input slot that output slot t comes from)

training (μ, σ² from the batch, ``m1 = mean ẋ_s``, ``cov = mean(u·ẋ_s)``):
    γẋ̂ = a(ẋ - m1 - x̂·r·cov)   →  B −= a·r²·cov,     D −= a·m1
parameter tangents (γ̇, β̇), both modes:
    γ̇x̂ + β̇                      →  B += γ̇·r,          D += β̇
In eval mode μ, σ² are the running stats and ẋ̂ = r·ẋ, so only ``a·ẋ`` remains from the input.
The kernels subtract μ before scaling (as torch's batch norm does), so a channel whose mean is
far larger than its spread loses no more precision than in torch.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import torch

from ..dual.dtypes import acc_dtype
from ..dual.slots import SlotPlan, add_into_slots, cast
from .base import BatchNormArgs, LayerParams

Tensor = torch.Tensor


@dataclass
class BNCoefficients:
    """With ``u = x - center``: ``y = scale·u + shift``,
    ``ẏ_t = scale·ẋ_{x_slot[t]} + t_xscale[t]·u + t_shift[t]``."""

    center: Tensor     # (C,)
    scale: Tensor      # (C,)
    shift: Tensor      # (C,)
    t_xscale: Tensor   # (count, C)
    t_shift: Tensor    # (count, C)
    x_slot: list[int]  # per output slot: the input slot it continues, or -1

    def apply_args(self) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """``center, scale, shift, t_xscale, t_shift``, in the order the apply ops take them."""
        return self.center, self.scale, self.shift, self.t_xscale, self.t_shift


def coefficients(x: Tensor, xt: Optional[Tensor], p: LayerParams, plan: SlotPlan,
                 bn: BatchNormArgs, stats: Optional[tuple] = None) -> BNCoefficients:
    """A batch norm's coefficients: in training the batch statistics (``stats`` when a fused
    producer computed them, else one pass of ``dual_bn_stats`` over x and ẋ) and the
    running-stat update; in eval the running stats."""
    if bn.training:
        mean, var, tmean, tcov = stats if stats is not None else \
            torch.ops.fgkernels.dual_bn_stats(x, xt)
        if bn.running_mean is not None:
            torch.ops.fgkernels.bn_update_running_stats_(
                bn.running_mean, bn.running_var, mean, var, x.numel() // x.shape[1],
                bn.momentum)
    else:
        acc = acc_dtype(x.dtype)
        mean, var = cast(bn.running_mean, acc), cast(bn.running_var, acc)
        tmean = tcov = None
    return affine_coefficients(mean, var, tmean, tcov, p, plan, bn.training, bn.eps)


def affine_coefficients(mean: Tensor, var: Tensor, tmean: Optional[Tensor],
                        tcov: Optional[Tensor], p: LayerParams, plan: SlotPlan, training: bool,
                        eps: float) -> BNCoefficients:
    """The affine coefficients from the statistics (batch ones when ``training``, else the
    running ones; ``tmean``/``tcov`` are (T, C) and used only in training), by the op
    ``dual_bn_coefficients`` (one call: on the CPU a loop over the channels)."""
    (x_pos, p_pos), count = plan.positions, plan.count
    scale, shift, t_xscale, t_shift = torch.ops.fgkernels.dual_bn_coefficients(
        mean, var, tmean, tcov, *p, x_pos, p_pos, count, training, eps)
    x_slot = [-1] * count
    for s, t in enumerate(x_pos):
        x_slot[t] = s
    return BNCoefficients(mean.contiguous(), scale, shift, t_xscale, t_shift, x_slot)


# --- the ops in torch's own ops, for CUDA without Triton (native/cuda_python_impls.py) --------

def coefficients_composite(mean: Tensor, var: Tensor, tmean: Optional[Tensor],
                           tcov: Optional[Tensor], weight: Optional[Tensor],
                           weight_t: Optional[Tensor], bias: Optional[Tensor],
                           bias_t: Optional[Tensor], x_pos: Sequence[int],
                           p_pos: Sequence[int], count: int, training: bool,
                           eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``dual_bn_coefficients`` (its schema in csrc/fgkernels.cpp) in torch's ops; every output
    is a fresh tensor, as the schema promises (never an input returned as it is)."""
    x_pos, p_pos = tuple(x_pos), tuple(p_pos)
    dtype = mean.dtype
    r = torch.rsqrt(var + eps)
    a = r if weight is None else weight.to(dtype) * r
    shift = mean.new_zeros(mean.shape) if bias is None else bias.to(dtype, copy=True)
    from_batch = bool(x_pos) and training
    t_xscale = _slot_sum(count, mean, [
        (-a * r * r * tcov if from_batch else None, x_pos),                     # −a·r²·cov
        (None if weight_t is None else weight_t.to(dtype) * r, p_pos)])         # γ̇·r
    t_shift = _slot_sum(count, mean, [
        (-a * tmean if from_batch else None, x_pos),                            # −a·m1
        (None if bias_t is None else bias_t.to(dtype, copy=True), p_pos)])      # β̇
    return a, shift, t_xscale, t_shift


def _slot_sum(count: int, like: Tensor,
              parts: list[tuple[Optional[Tensor], tuple[int, ...]]]) -> Tensor:
    """The ``(count, C)`` sum of ``parts``: each a fresh ``(len(pos), C)`` tensor (None:
    absent) and the slots ``pos`` it adds to. A part that covers every slot is the sum itself,
    the others added into it: no zeros where a part covers every slot."""
    parts = [(t, pos) for t, pos in parts if t is not None and pos]
    every = tuple(range(count))
    base = next((t for t, pos in parts if pos == every), None)
    if base is None:
        base = like.new_zeros((count, like.shape[0]))
    for t, pos in parts:
        if t is not base:
            add_into_slots(base, pos, t)
    return base


def update_running_stats_composite(running_mean: Tensor, running_var: Tensor, mean: Tensor,
                                   var: Tensor, n: int, momentum: float) -> None:
    """``bn_update_running_stats_`` in torch's ops: ``r ← m·stat + (1 - m)·r`` with the
    unbiased variance, as ``nn.BatchNorm2d`` does, in float64 and rounded once to the buffers'
    dtype."""
    unbiased = var.double() * (n / (n - 1))
    for buf, stat in ((running_mean, mean.double()), (running_var, unbiased)):
        buf.copy_(momentum * stat + (1 - momentum) * buf.double())

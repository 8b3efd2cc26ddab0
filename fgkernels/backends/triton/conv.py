"""Fused dual convolution on Triton: the launcher of ``conv_kernel``.

The primal is computed once, then the tangents:

    launch 1 (primal):    y = x·W + b                          sums Σy, Σ(y − ȳ_tile)²
    launch 2 (tangents):  ẏ_s = ẋ_s·W  +  x·Ẇ_p  +  ḃ_p          sums Σẏ_s,
                                                  Σ(y − ȳ_tile)·(ẏ_s − ẏ̄_s,tile)

Each slot's program computes only the terms it has, with one accumulator, so registers and
shared memory do not grow with the number of slots (the slots ride on the grid's second axis).
A slot with both an input and a parameter tangent sums two products per reduction step; input
slots followed by appended parameter slots take two launches, one per role, so that no
program branches inside its reduction loop. The batch-norm sums of a tangent need the primal
tile: the tangent launch reads y back in its epilogue (one read of y per slot, against one
product x·W per slot if it recomputed it), and the primal launch's tile sums then combine with
the tangents' (``combine_tile_stats``, Chan's formulas) into the batch statistics, so that a
following training-mode batch norm needs no statistics pass.

Tiles come from ``conv_plan`` before the launch: every launch of one call shares the row tile,
so the tile sums of the primal and of every slot cover the same rows.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton

from ...dual.layout import empty_like_format, empty_slots, kernel_format, slots_in_format
from ..base import ConvArgs
from . import INTERPRETED
from .conv_kernel import _dual_conv2d_forward_kernel
from .conv_plan import MAX_REGISTERS, LaunchShape, TilePlan, block_m, plan_tiles
from .precision import cudnn_conv_fp32_precision, dot_input_precision
from .target import shared_limit, target_arch

Tensor = torch.Tensor
MAX_SLOTS = 65535  # the slots ride on the grid's second axis
# Channels of 16-bit operands come in multiples of this (16 elements, the alignment Triton
# proves from a launch's integer arguments): 16-byte vector loads and asynchronous copies.
CHANNEL_ALIGN = 16


def slot_layout(x_pos: tuple, p_pos: tuple, count: int) -> Optional[tuple[bool, int]]:
    """(P_ADD, P_OFFSET) when the kernel can lay out the slots, else None: the input's slots
    first in order, the parameters' either the same slots or appended after them."""
    tx, tp = len(x_pos), len(p_pos)
    if x_pos != tuple(range(tx)) or count > MAX_SLOTS:
        return None
    if tp and p_pos == x_pos:
        return True, 0
    if p_pos == tuple(range(tx, tx + tp)) and count == tx + tp:
        return False, tx
    return None


def too_large(x: Tensor, w: Tensor, stride, padding, dilation) -> bool:
    """True when a slot of x (its channels padded as ``kernel_operands`` pads them), of W or
    of the output has 2³¹ elements or more: offsets inside a slot are int32 in the kernel."""
    C = x.shape[1]
    padded = -(-C // CHANNEL_ALIGN) * CHANNEL_ALIGN
    out = ConvArgs(tuple(stride), tuple(padding), tuple(dilation), 1).output_shape(x.shape,
                                                                                 w.shape)
    return max(x.numel() // C * padded, math.prod(out), w.numel() // C * padded) >= 2 ** 31


@dataclass
class KernelOperands:
    """x, W and their slots laid out for the kernel's reduction order; x and W also in the
    tangents' dtype, cast once where it is lower than the primal's (the tangent terms'
    products are taken in it)."""

    x: Tensor
    xt: Optional[Tensor]
    w: Tensor
    wt: Optional[Tensor]
    x_for_tangents: Optional[Tensor]  # x in the tangents' dtype (None: no parameter slot)
    w_for_tangents: Optional[Tensor]  # W in the tangents' dtype (None: no input slot)
    c_inner: bool
    channels: int


def kernel_operands(x: Tensor, xt: Optional[Tensor], w: Tensor, wt: Optional[Tensor],
                    tangent_dtype: torch.dtype) -> KernelOperands:
    """The (kh, kw, c) order (channels_last operands) where x is channels_last or an operand
    has 16-bit elements (whose loads must be vectors to be asynchronous), channels padded with
    zeros to a multiple of ``CHANNEL_ALIGN`` for 16-bit operands; else the (c, kh, kw) order
    on contiguous operands. A copy is made only of an operand not already so."""
    sixteen_bit = min(x.element_size(), tangent_dtype.itemsize) == 2
    c_inner = sixteen_bit or kernel_format(x) == torch.channels_last
    C = x.shape[1]
    if c_inner:
        channels = C if not sixteen_bit else -(-C // CHANNEL_ALIGN) * CHANNEL_ALIGN
        x, w = _channels_last(x, channels), _channels_last(w, channels)
        xt = None if xt is None else _channels_last_slots(xt, channels)
        wt = None if wt is None else _channels_last_slots(wt, channels)
    else:
        channels = C
        x, w = x.contiguous(), w.contiguous()
        xt = None if xt is None else xt.contiguous()
        wt = None if wt is None else wt.contiguous()
    return KernelOperands(x, xt, w, wt,
                          None if wt is None else x.to(tangent_dtype),
                          None if xt is None else w.to(tangent_dtype), c_inner, channels)


def _channels_last(t: Tensor, channels: int) -> Tensor:
    """``t`` (N, C, H, W) channels_last with ``channels`` ≥ C channels (zeros after C)."""
    if channels == t.shape[1]:
        return t.contiguous(memory_format=torch.channels_last)
    n, c, h, w = t.shape
    out = t.new_zeros((n, h, w, channels)).permute(0, 3, 1, 2)
    out[:, :c] = t
    return out


def _channels_last_slots(t: Tensor, channels: int) -> Tensor:
    """A stack of slots (T, N, C, H, W), each channels_last with ``channels`` channels."""
    if channels == t.shape[2]:
        return slots_in_format(t, torch.channels_last)
    T, n, c, h, w = t.shape
    out = t.new_zeros((T, n, h, w, channels)).permute(0, 1, 4, 2, 3)
    out[:, :, :c] = t
    return out


@dataclass(frozen=True)
class Geometry:
    """The convolution's sizes as the kernel takes them: C the channels of the kernel's
    operands (padded for 16-bit ones), M = N·H_out·W_out output rows, K = C·kh·kw."""

    C: int
    H: int
    W: int
    CO: int
    HO: int
    WO: int
    KH: int
    KW: int
    M: int
    K: int
    stride: tuple
    padding: tuple
    dilation: tuple

    def kernel_args(self) -> tuple:
        return (self.C, self.H, self.W, self.CO, self.HO, self.WO, self.KH, self.KW, self.M,
                self.K, *self.stride, *self.padding, *self.dilation)


@dataclass
class Launch:
    """One launch of the kernel over ``slots`` programs per tile: ``out_s = a_s·b_s (+
    a2_s·b2_s) (+ bias_s)``; an operand's slot stride is 0 where it is shared by every slot."""

    a: Tensor
    b: Tensor
    out: Tensor
    slots: int
    terms: int
    a_slot: int = 0
    b_slot: int = 0
    a2: Optional[Tensor] = None
    a2_slot: int = 0
    b2: Optional[Tensor] = None
    b2_slot: int = 0
    bias: Optional[Tensor] = None
    bias_slot: int = 0
    out_slot: int = 0
    stats: Optional[Tensor] = None  # (tiles, slots, 2, C_out) or (tiles, 2, C_out)
    primal: Optional[Tensor] = None  # y, read back for the sums of a tangent
    primal_stats: Optional[Tensor] = None  # the primal launch's (tiles, 2, C_out) sums


def tangent_launches(ops: KernelOperands, bt: Optional[Tensor], y: Tensor, yt: Tensor,
                     stats: Optional[Tensor], tstats: Optional[Tensor], p_add: bool,
                     p_offset: int, tx: int, tp: int) -> list[Launch]:
    """The launches of the tangent slots: one over every slot where the parameters' slots are
    the input's, else one per role (input slots, then appended parameter slots). Parameter
    slots whose only tangent is the bias's take no launch (``bias_only_slots``)."""
    xt, wt = ops.xt, ops.wt
    stats_from = lambda s0: None if tstats is None else tstats[:, s0:]
    primal = dict(primal=y, primal_stats=stats)
    bias = dict(bias=bt, bias_slot=0 if bt is None else bt.stride(0))
    if p_add:  # slot s: ẋ_s·W + x·Ẇ_s + ḃ_s
        launch = Launch(xt, ops.w_for_tangents, yt, tx, 1, a_slot=xt.stride(0),
                        out_slot=yt.stride(0), stats=stats_from(0), **primal, **bias)
        if wt is not None:
            launch.terms = 2
            launch.a2, launch.b2, launch.b2_slot = ops.x_for_tangents, wt, wt.stride(0)
        return [launch]
    launches = []
    if tx:  # slot s < tx: ẋ_s·W
        launches.append(Launch(xt, ops.w_for_tangents, yt, tx, 1, a_slot=xt.stride(0),
                               out_slot=yt.stride(0), stats=stats_from(0), **primal))
    if tp and wt is not None:  # slot p_offset + p: x·Ẇ_p + ḃ_p
        launches.append(Launch(ops.x_for_tangents, wt, yt[p_offset:], tp, 1,
                               b_slot=wt.stride(0), out_slot=yt.stride(0),
                               stats=stats_from(p_offset), **primal, **bias))
    return launches


def bias_only_slots(yt: Tensor, tstats: Optional[Tensor], rows: Optional[Tensor],
                    bt: Tensor, p_offset: int) -> None:
    """Parameter slots whose only tangent is the bias's: ẏ_p = ḃ_p at every pixel, so
    Σẏ = rows·ḃ_p and Σ(y − ȳ_tile)·(ẏ_p − ẏ̄_p,tile) = 0 in every tile."""
    tp = bt.shape[0]
    yt[p_offset:p_offset + tp] = bt.to(yt.dtype)[:, None, :, None, None]
    if tstats is not None:
        tstats[:, p_offset:p_offset + tp, 0] = rows[:, None, None].float() * bt.float()[None]
        tstats[:, p_offset:p_offset + tp, 1] = 0


def dual_conv2d(x: Tensor, xt: Optional[Tensor], w: Tensor, wt: Optional[Tensor],
                b: Optional[Tensor], bt: Optional[Tensor], x_pos: tuple, p_pos: tuple,
                count: int, stride, padding, dilation, bn_stats: bool = False,
                input_precision: Optional[str] = None):
    """Run the fused convolution. Returns ``(y, yt or None, tile_stats)`` with ``tile_stats``
    = ``(stats (tiles, 2, C_out), tstats (tiles, count, 2, C_out), rows per tile)`` when
    ``bn_stats``; None where the kernel does not serve (a slot layout it does not lay out, a
    tensor slot of 2³¹ elements or more): the caller falls back.

    ``input_precision`` of float32 products: ``"tf32"`` or ``"ieee"`` (three TF32 products,
    about float32's precision); by default what cuDNN's convolutions use."""
    layout = slot_layout(x_pos, p_pos, count)
    if layout is None or too_large(x, w, stride, padding, dilation):
        return None
    N, C, H, W = x.shape
    CO, _, KH, KW = w.shape
    _, _, HO, WO = ConvArgs(stride, padding, dilation, 1).output_shape(x.shape, w.shape)
    p_add, p_offset = layout
    tx = 0 if xt is None else xt.shape[0]
    tangent_dtype = next((t.dtype for t in (xt, wt, bt) if t is not None), x.dtype)
    upcast = INTERPRETED and {x.dtype, tangent_dtype} != {torch.float32}
    precision = dot_input_precision(input_precision or cudnn_conv_fp32_precision())

    ops = kernel_operands(x, xt, w, wt, tangent_dtype)
    y = empty_like_format((N, CO, HO, WO), x)
    yt = empty_slots(count, y, tangent_dtype) if count else None
    M = N * HO * WO
    bm = block_m(M)
    tiles = triton.cdiv(M, bm)
    stats = tstats = rows = None
    if bn_stats:
        stats = torch.empty((tiles, 2, CO), device=x.device, dtype=torch.float32)
        tstats = torch.empty((tiles, count, 2, CO), device=x.device, dtype=torch.float32)
        rows = torch.full((tiles,), float(bm), device=x.device, dtype=torch.float64)
        # A fill on the device: assigning the number would copy it from the host, a wait on
        # the queue and no operation a CUDA graph can capture.
        rows[-1:].fill_(M - (tiles - 1) * bm)

    # The kernel reads a bias's channels at unit stride (a slice or an expanded one is copied).
    b = None if b is None else b.contiguous()
    bt = None if bt is None else bt.contiguous()
    launches = [Launch(ops.x, ops.w, y, 1, 1, bias=b, stats=stats)]
    if count:
        launches += tangent_launches(ops, bt, y, yt, stats, tstats, p_add, p_offset, tx,
                                     len(p_pos))
    geometry = Geometry(ops.channels, H, W, CO, HO, WO, KH, KW, M, ops.channels * KH * KW,
                        tuple(stride), tuple(padding), tuple(dilation))
    for launch in launches:
        run_launch(launch, ops, geometry, precision, upcast)
    if p_pos and wt is None and not p_add:
        bias_only_slots(yt, tstats, rows, bt, p_offset)
    return y, yt, (stats, tstats, rows) if bn_stats else None


def launch_plan(launch: Launch, ops: KernelOperands, g: Geometry, split_fp32: bool,
                device: torch.device) -> TilePlan:
    """The tiles of ``launch`` on the target of ``device``."""
    arch = target_arch(device)
    shape = LaunchShape(rows=g.M, c_out=g.CO, channels=g.C, c_inner=ops.c_inner,
                        a_bytes=launch.a.element_size(), b_bytes=launch.b.element_size(),
                        terms=launch.terms,
                        split_fp32=split_fp32 and launch.out.dtype == torch.float32,
                        bn_stats=launch.stats is not None,
                        out_bytes=launch.out.element_size(),
                        out_channels_last=launch.out.stride()[-3] == 1)
    return plan_tiles(shape, arch, shared_limit(arch, device))


def run_launch(launch: Launch, ops: KernelOperands, g: Geometry, precision: str,
               upcast: bool) -> None:
    """Launch the kernel once, as ``launch`` describes, with the tiles ``conv_plan`` gives."""
    fp32_dot = launch.out.dtype == torch.float32 and not upcast
    plan = launch_plan(launch, ops, g, precision == "tf32x3", launch.out.device)
    out, stats, ystats = launch.out, launch.stats, launch.primal_stats
    read_y = stats is not None and launch.primal is not None
    unused = out  # the pointer passed for an operand the launch does not read
    stats_strides = (0, 0) if stats is None else (stats.stride(0),
                                                  stats.stride(1) if stats.dim() == 4 else 0)
    # x's NCHW strides serve the (c, kh, kw) order only: the (kh, kw, c) one computes its
    # offsets from the sizes (the operands are contiguous channels_last).
    x_strides = (0, 0, 0, 0) if ops.c_inner else ops.x.stride()
    grid = (triton.cdiv(g.M, plan.block_m) * triton.cdiv(g.CO, plan.block_n), launch.slots)
    _dual_conv2d_forward_kernel[grid](
        launch.a, launch.b, launch.a2 if launch.a2 is not None else launch.a,
        launch.b2 if launch.b2 is not None else launch.b,
        launch.bias if launch.bias is not None else unused, out,
        launch.primal if read_y else unused, stats if stats is not None else unused,
        ystats if read_y else unused, *g.kernel_args(),
        launch.a_slot, launch.a2_slot, *x_strides, launch.b_slot, launch.b2_slot,
        launch.bias_slot, launch.out_slot, *out.stride()[-4:], *stats_strides,
        ystats.stride(0) if read_y else 0,
        TERMS=launch.terms, HAS_BIAS=launch.bias is not None, BN_STATS=stats is not None,
        READ_Y=read_y, C_INNER=ops.c_inner,
        INPUT_PRECISION=precision if fp32_dot else "tf32", UPCAST=upcast,
        BLOCK_M=plan.block_m, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k,
        num_warps=plan.num_warps, num_stages=plan.num_stages, maxnreg=MAX_REGISTERS)


def combine_tile_stats(stats: Tensor, tstats: Tensor, rows: Tensor, acc_dtype: torch.dtype):
    """Merge per-tile sums (Σy and Σ(y − ȳ_k)², Σẏ and the co-moment
    C_k = Σ(y − ȳ_k)·(ẏ − ẏ̄_k) of each tile k) into batch statistics (Chan et al.), in
    float64: mean, biased var, tangent mean, and mean((y − μ)·ẏ) per channel, as
    ``dual_bn_stats``. The co-moments merge as Σ_k [C_k + n_k·(ȳ_k − μ)·(ẏ̄_k − ẏ̄)], which is
    Σ_k [C_k + (ȳ_k − μ)·Σẏ_k] since Σ_k n_k·(ȳ_k − μ) = 0 (to float64's rounding)."""
    s, m2 = stats[:, 0].double(), stats[:, 1].double()
    n = rows.sum()
    tile_mean = s / rows[:, None]
    mean = s.sum(0) / n
    var = (m2.sum(0) + (rows[:, None] * (tile_mean - mean) ** 2).sum(0)) / n
    ts, tc = tstats[:, :, 0].double(), tstats[:, :, 1].double()
    tmean = ts.sum(0) / n
    tcov = (tc + (tile_mean - mean)[:, None, :] * ts).sum(0) / n
    return tuple(v.to(acc_dtype) for v in (mean, var, tmean, tcov))

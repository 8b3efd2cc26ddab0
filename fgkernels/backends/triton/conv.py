"""Fused dual convolution: one implicit-GEMM Triton kernel for the primal and every tangent.

GEMM view: rows m = (n, oh, ow) of the output, columns = output channels, reduction over
k = (kh, kw, c). The grid's third axis is the output: program z = 0 computes the primal, program
z = 1 + s tangent slot s, each into one accumulator tile, so registers and shared memory do not
grow with the number of slots (the x and W tiles the programs share come through L2):

    z = 0:      acc  = x · W                       y = acc + b
    z = 1 + s:  acc  = ẋ_s · W  +  x · Ẇ_p         ẏ_s = acc + ḃ_p
                (the terms the slot has: an input slot s < TX; a parameter slot p of its own)

The epilogue optionally writes the per-tile batch-norm sums of the output (Σy, Σ(y−ȳ_tile)²,
Σẏ_s, Σ(y−ȳ_tile)·ẏ_s); a tangent program then also computes its tile of y, a second
accumulator. ``combine_tile_stats`` merges them with Chan's formulas, so that a following
training-mode batch norm needs no statistics pass.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..base import ConvArgs
from ..layout import empty_like_format, empty_slots
from . import INTERPRETED

Tensor = torch.Tensor
MAX_SLOTS = 16


def _configs():
    if INTERPRETED:  # one small tile: the interpreter runs every program in numpy
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16}, num_warps=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w,
                          num_stages=s)
            # Each compiles spill-free, with wgmma on sm_90, for sm_80/89/90, float32 and
            # bfloat16, batch-norm sums on and off, and those that kept_configs keeps for
            # bfloat16 slots of float32 (python -m fgkernels.backends.triton.report).
            for bm, bn, bk, w, s in [(64, 128, 32, 8, 3), (64, 64, 64, 8, 3), (64, 32, 32, 4, 4)]]


def shared_bytes(config, elem_bytes: int) -> int:
    """The shared memory a config's software pipeline needs: per stage, the x and W tiles and,
    in a tangent program, the ẋ and Ẇ tiles."""
    bm, bn, bk = (config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    return config.num_stages * 2 * (bm * bk + bk * bn) * elem_bytes


def _device_shared_limit() -> Optional[int]:
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return getattr(props, "shared_memory_per_block_optin", None)


# A program whose tangents have a lower precision than the primal holds each operand tile twice
# (as loaded, and in the tangents' dtype): configs with more operand elements per thread than
# this spill registers there.
MIXED_OPERAND_ELEMENTS_PER_THREAD = 24


def operand_elements_per_thread(config) -> int:
    """Elements of the x and W tiles of one reduction step per thread."""
    bm, bn, bk = (config.kwargs[k] for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    return (bm * bk + bk * bn) // (32 * config.num_warps)


def kept_configs(configs, elem_bytes: int, shared_limit: Optional[int], mixed: bool = False):
    """The configs whose pipeline fits ``shared_limit`` bytes (any without a limit) and, for
    a ``mixed``-precision launch, whose operand tiles fit its register budget."""
    return [c for c in configs
            if (shared_limit is None or shared_bytes(c, elem_bytes) <= shared_limit)
            and (not mixed or operand_elements_per_thread(c) <= MIXED_OPERAND_ELEMENTS_PER_THREAD)]


def _prune(configs, named_args, **kwargs):
    """Keep the configs that fit this device's shared memory, read at run time (the launcher
    does not launch where none fits; the autotuner needs one config all the same)."""
    x = named_args.get("x_ptr")
    elem = x.element_size() if isinstance(x, torch.Tensor) else 4
    return kept_configs(configs, elem, _device_shared_limit(), kwargs.get("MIXED", False)) or \
        [min(configs, key=lambda c: shared_bytes(c, elem))]


@triton.jit
def _slot_terms(slot, TX, TP, P_OFFSET, P_ADD: tl.constexpr, HAS_XT: tl.constexpr):
    """Which terms program ``slot`` (-1: the primal) computes: the primal, ẋ_s·W (s an input
    slot), x·Ẇ_p + ḃ_p (p the parameter slot landing here: the same index with P_ADD, else
    slot − P_OFFSET). Returns (is_primal, p, has the ẋ term, has the Ẇ term)."""
    p_slot = slot - P_OFFSET
    if P_ADD:
        p_slot = slot
    has_x = (slot >= 0) & (slot < TX)
    if not HAS_XT:
        has_x = slot < -1  # never
    return slot < 0, p_slot, has_x, (slot >= 0) & (p_slot >= 0) & (p_slot < TP)


@triton.jit
def _window(k0, C, H, W, K, KW, oh, ow, row_ok, col_ok, stride_h, stride_w, pad_h, pad_w,
            dil_h, dil_w, BLOCK_K: tl.constexpr):
    """The reduction step at k0: k -> (kh, kw, c), the input pixel ih = oh·stride − pad +
    kh·dilation of each (row, k) and its mask (zero padding outside), and the weight mask."""
    k = k0 + tl.arange(0, BLOCK_K)
    k_ok = k < K
    c = k % C
    kw = (k // C) % KW
    kh = k // (C * KW)
    ih = oh[:, None] * stride_h - pad_h + kh[None, :] * dil_h
    iw = ow[:, None] * stride_w - pad_w + kw[None, :] * dil_w
    x_ok = row_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    return c, kh, kw, ih, iw, x_ok, k_ok[:, None] & col_ok[None, :]


@triton.autotune(configs=_configs(),
                 key=["C", "CO", "H", "W", "HO", "WO", "KH", "KW", "N", "TX", "TP"],
                 prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _dual_conv2d_forward_kernel(
        x_ptr, xt_ptr, w_ptr, wt_ptr, b_ptr, bt_ptr, y_ptr, yt_ptr, stats_ptr, tstats_ptr,
        N, C, H, W, CO, HO, WO, KH, KW, M, K, TX, TP, COUNT, P_OFFSET,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        sx_n, sx_c, sx_h, sx_w,
        st_t, st_n, st_c, st_h, st_w,
        sw_o, sw_c, sw_h, sw_w,
        swt_t, swt_o, swt_c, swt_h, swt_w,
        sbt_t,
        sy_n, sy_c, sy_h, sy_w,
        syt_t, syt_n, syt_c, syt_h, syt_w,
        HAS_XT: tl.constexpr, HAS_WT: tl.constexpr, HAS_B: tl.constexpr, HAS_BT: tl.constexpr,
        P_ADD: tl.constexpr, BN_STATS: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        UPCAST: tl.constexpr, MIXED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr):
    # Offsets inside a tensor are int32 (the launcher keeps every tensor under 2³¹ elements);
    # a slot's base offset is int64.
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.program_id(2) - 1  # -1: the primal

    is_primal, p_slot, has_x, has_p = _slot_terms(slot, TX, TP, P_OFFSET, P_ADD, HAS_XT)

    # Output rows of this tile: m -> (n, oh, ow).
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    n_img = offs_m // (HO * WO)
    oh = (offs_m % (HO * WO)) // WO
    ow = offs_m % WO
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = co < CO
    xt_base = xt_ptr + slot.to(tl.int64) * st_t
    wt_base = wt_ptr + p_slot.to(tl.int64) * swt_t

    # One accumulator: the program's output (y, or ẏ_s). With the batch-norm sums a tangent
    # program also needs its tile of y: a second one.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        c, kh, kw, ih, iw, x_ok, w_ok = _window(k0, C, H, W, K, KW, oh, ow, row_ok, col_ok,
                                                stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                                                BLOCK_K)
        x_tile = tl.load(x_ptr + n_img[:, None] * sx_n + c[None, :] * sx_c + ih * sx_h
                         + iw * sx_w, mask=x_ok & (is_primal | has_p | BN_STATS), other=0.0)
        w_tile = tl.load(w_ptr + co[None, :] * sw_o + c[:, None] * sw_c + kh[:, None] * sw_h
                         + kw[:, None] * sw_w, mask=w_ok & (is_primal | has_x | BN_STATS),
                         other=0.0)
        if UPCAST:  # Triton's interpreter multiplies 16-bit floats wrongly: give it float32
            x_tile, w_tile = x_tile.to(tl.float32), w_tile.to(tl.float32)
        if is_primal:
            acc = tl.dot(x_tile, w_tile, acc, input_precision=INPUT_PRECISION)
        else:
            if BN_STATS:
                acc_y = tl.dot(x_tile, w_tile, acc_y, input_precision=INPUT_PRECISION)
            if MIXED:  # tangents of a lower precision: their products in it, float32 sums
                x_dot = x_tile.to(yt_ptr.dtype.element_ty)
                w_dot = w_tile.to(yt_ptr.dtype.element_ty)
            else:
                x_dot = x_tile
                w_dot = w_tile
            if has_x:
                t_tile = tl.load(xt_base + n_img[:, None] * st_n + c[None, :] * st_c
                                 + ih * st_h + iw * st_w, mask=x_ok, other=0.0)
                if UPCAST:
                    t_tile = t_tile.to(tl.float32)
                acc = tl.dot(t_tile, w_dot, acc, input_precision=INPUT_PRECISION)
            if HAS_WT:
                if has_p:
                    wt_tile = tl.load(wt_base + co[None, :] * swt_o + c[:, None] * swt_c
                                      + kh[:, None] * swt_h + kw[:, None] * swt_w, mask=w_ok,
                                      other=0.0)
                    if UPCAST:
                        wt_tile = wt_tile.to(tl.float32)
                    acc = tl.dot(x_dot, wt_tile, acc, input_precision=INPUT_PRECISION)

    # --- epilogue ---------------------------------------------------------------------------------
    out_ok = row_ok[:, None] & col_ok[None, :]
    bias = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if HAS_B:
        bias = tl.load(b_ptr + co, mask=col_ok, other=0.0).to(tl.float32)
    if is_primal:  # y = x·W + b, and Σy, Σ(y − ȳ_tile)²
        acc += bias[None, :]
        tl.store(y_ptr + (n_img * sy_n + oh * sy_h + ow * sy_w)[:, None] + (co * sy_c)[None, :],
                 acc.to(y_ptr.dtype.element_ty), mask=out_ok)
        if BN_STATS:
            y_sum, y_centered = _tile_centred(acc, out_ok, M, pid_m, BLOCK_M)
            _store_pair(stats_ptr + pid_m * 2 * CO + co, CO, y_sum,
                        tl.sum(y_centered * y_centered, axis=0), col_ok)
    else:
        _tangent_epilogue(acc, acc_y + bias[None, :], bt_ptr, yt_ptr, tstats_ptr, slot, p_slot,
                          has_p, sbt_t, syt_t, syt_n, syt_c, syt_h, syt_w, n_img, oh, ow, co,
                          row_ok, col_ok, M, CO, COUNT, pid_m, HAS_BT, BN_STATS, BLOCK_M)


@triton.jit
def _tangent_epilogue(acc, y, bt_ptr, yt_ptr, tstats_ptr, slot, p_slot, has_p, sbt_t,
                      syt_t, syt_n, syt_c, syt_h, syt_w, n_img, oh, ow, co, row_ok, col_ok, M,
                      CO, COUNT, pid_m, HAS_BT: tl.constexpr, BN_STATS: tl.constexpr,
                      BLOCK_M: tl.constexpr):
    """ẏ_s = acc + ḃ_p stored into slot s, and its sums Σẏ_s, Σ(y − ȳ_tile)·ẏ_s (y: this
    tile of the primal, computed by the same program)."""
    out_ok = row_ok[:, None] & col_ok[None, :]
    if HAS_BT:
        if has_p:
            acc += tl.load(bt_ptr + p_slot * sbt_t + co, mask=col_ok,
                           other=0.0).to(tl.float32)[None, :]
    tl.store(yt_ptr + slot.to(tl.int64) * syt_t
             + (n_img * syt_n + oh * syt_h + ow * syt_w)[:, None] + (co * syt_c)[None, :],
             acc.to(yt_ptr.dtype.element_ty), mask=out_ok)
    if BN_STATS:
        _, y_centered = _tile_centred(y, out_ok, M, pid_m, BLOCK_M)
        t_masked = tl.where(out_ok, acc, 0.0)
        _store_pair(tstats_ptr + (pid_m * COUNT + slot) * 2 * CO + co, CO,
                    tl.sum(t_masked, axis=0), tl.sum(t_masked * y_centered, axis=0), col_ok)


@triton.jit
def _store_pair(base, CO, first, second, ok):
    """Two per-channel sums, ``CO`` apart."""
    tl.store(base, first, mask=ok)
    tl.store(base + CO, second, mask=ok)


@triton.jit
def _tile_centred(y, ok, M, pid_m, BLOCK_M: tl.constexpr):
    """Σy over the tile's valid rows, and y − ȳ_tile there (0 elsewhere): centring inside the
    tile keeps the float32 sums stable."""
    count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
    y_sum = tl.sum(tl.where(ok, y, 0.0), axis=0)
    return y_sum, tl.where(ok, y - (y_sum / count)[None, :], 0.0)


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


def dual_conv2d(x: Tensor, xt: Optional[Tensor], w: Tensor, wt: Optional[Tensor],
                b: Optional[Tensor], bt: Optional[Tensor], x_pos: tuple, p_pos: tuple,
                count: int, stride, padding, dilation, bn_stats: bool = False,
                input_precision: Optional[str] = None):
    """Run the fused kernel. Returns ``(y, yt or None, tile_stats)`` with ``tile_stats`` =
    ``(stats (tiles, 2, C_out), tstats (tiles, count, 2, C_out), rows per tile)`` when
    ``bn_stats``; None where the kernel does not serve (a slot layout it does not lay out, no
    config fitting the device's shared memory, a tensor of 2³¹ elements or more): the caller
    falls back."""
    layout = slot_layout(x_pos, p_pos, count)
    tangent_dtype = next((t.dtype for t in (xt, wt, bt) if t is not None), x.dtype)
    upcast = INTERPRETED and {x.dtype, tangent_dtype} != {torch.float32}
    mixed = tangent_dtype != x.dtype and not upcast
    if layout is None or not kept_configs(_configs(), x.element_size(), _device_shared_limit(),
                                          mixed):
        return None
    N, C, H, W = x.shape
    CO, _, KH, KW = w.shape
    _, _, HO, WO = ConvArgs(stride, padding, dilation, 1).output_shape(x.shape, w.shape)
    if max(x.numel(), N * CO * HO * WO, w.numel()) >= 2 ** 31:
        return None  # offsets inside a slot are int32 in the kernel
    p_add, p_offset = layout
    TX = 0 if xt is None else xt.shape[0]
    TP = 0 if not p_pos else (wt if wt is not None else bt).shape[0]
    y = empty_like_format((N, CO, HO, WO), x)
    yt = empty_slots(count, y, tangent_dtype) if count else y
    if input_precision is None:
        input_precision = "tf32" if torch.backends.cudnn.allow_tf32 else "ieee"
    M = N * HO * WO
    max_tiles = triton.cdiv(M, 16)  # the smallest BLOCK_M of any config
    stats = torch.empty((max_tiles, 2, CO) if bn_stats else (1,), device=x.device,
                        dtype=torch.float32)
    tstats = torch.empty((max_tiles, count, 2, CO) if bn_stats and count else (1,),
                         device=x.device, dtype=torch.float32)
    dummy = y
    xt_ = xt if xt is not None else dummy.unsqueeze(0)
    wt_ = wt if wt is not None else w.unsqueeze(0)
    bt_ = bt if bt is not None else dummy
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(CO, meta["BLOCK_N"]),
                         1 + count)
    _dual_conv2d_forward_kernel[grid](
        x, xt_, w, wt_, b if b is not None else dummy, bt_, y, yt, stats, tstats,
        N, C, H, W, CO, HO, WO, KH, KW, M, C * KH * KW, TX, TP, count, p_offset,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        *x.stride(), *xt_.stride()[:5], *w.stride(), *wt_.stride()[:5],
        bt_.stride(0) if bt is not None else 0,
        *y.stride(), *(yt.stride() if count else (0,) * 5),
        HAS_XT=xt is not None, HAS_WT=wt is not None and TP > 0, HAS_B=b is not None,
        HAS_BT=bt is not None and TP > 0, P_ADD=p_add, BN_STATS=bn_stats,
        INPUT_PRECISION=input_precision, UPCAST=upcast, MIXED=mixed)
    tile_stats = None
    if bn_stats:
        block_m = _dual_conv2d_forward_kernel.best_config.kwargs["BLOCK_M"]
        tiles = triton.cdiv(M, block_m)
        rows = torch.full((tiles,), float(block_m), device=x.device, dtype=torch.float64)
        rows[-1] = M - (tiles - 1) * block_m
        tile_stats = (stats[:tiles], tstats[:tiles] if count else tstats.new_empty(
            (tiles, 0, 2, CO)), rows)
    return y, (yt if count else None), tile_stats


def combine_tile_stats(stats: Tensor, tstats: Tensor, rows: Tensor, acc_dtype: torch.dtype):
    """Merge per-tile sums into batch statistics (Chan et al.), in float64:
    mean, biased var, tangent mean, and mean((y − μ)·ẏ) per channel, as ``dual_bn_stats``."""
    s, m2 = stats[:, 0].double(), stats[:, 1].double()
    n = rows.sum()
    tile_mean = s / rows[:, None]
    mean = s.sum(0) / n
    var = (m2.sum(0) + (rows[:, None] * (tile_mean - mean) ** 2).sum(0)) / n
    ts, tc = tstats[:, :, 0].double(), tstats[:, :, 1].double()
    tmean = ts.sum(0) / n
    tcov = (tc + (tile_mean - mean)[:, None, :] * ts).sum(0) / n
    return tuple(v.to(acc_dtype) for v in (mean, var, tmean, tcov))

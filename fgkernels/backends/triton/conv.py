"""Fused dual convolution: one implicit-GEMM Triton kernel for the primal and every tangent.

GEMM view: rows m = (n, oh, ow) of the output, columns = output channels, reduction over
k = (kh, kw, c). Per K-step a program loads the x and W tiles once and, where those tangents
exist, the ẋ tiles of all TX input slots (stacked as extra rows) and the Ẇ tiles of all TP
parameter slots (stacked as extra columns):

    acc_y  += x  @ W            (BM, BN)
    acc_x  += ẋ  @ W            (TX·BM, BN)    ẋ slots ride as extra M rows, sharing W
    acc_p  += x  @ Ẇ            (BM, TP·BN)    Ẇ slots ride as extra N columns, sharing x

The epilogue adds b and ḃ, writes y and the tangent slots, and optionally the per-tile
batch-norm sums of the output (Σy, Σ(y−ȳ_tile)², Σẏ_t, Σ(y−ȳ_tile)·ẏ_t), which
``combine_tile_stats`` merges with Chan's formulas, so that a following training-mode batch norm
needs no statistics pass.
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
            for bm, bn, bk, w, s in [(128, 64, 32, 4, 3), (64, 64, 32, 4, 3), (64, 128, 32, 4, 3),
                                     (128, 128, 32, 8, 3), (32, 64, 64, 4, 4), (64, 32, 64, 4, 4),
                                     (32, 32, 32, 2, 4), (128, 64, 64, 8, 2)]]


def _prune(configs, named_args, **kwargs):
    """Keep the tiles whose accumulators fit: (1 + TX + TP) · BM · BN floats per program."""
    slots = 1 + kwargs["TX_BLOCK"] + kwargs["TP_BLOCK"]
    kept = [c for c in configs if slots * c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 3 * 8192]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]


@triton.jit
def _store_slots(yt_ptr, tstats_ptr, v, slot0, n_slots, n_img, oh, ow, co, row_ok, col_ok,
                 y_centered, pid_m, CO, COUNT, s_slot, s_n, s_c, s_h, s_w,
                 SLOTS: tl.constexpr, BN_STATS: tl.constexpr):
    """Store tangent tile ``v`` (SLOTS, BM, BN) into output slots slot0 + t, t < n_slots, and its
    batch-norm sums Σẏ and Σ(y−ȳ_tile)·ẏ into tstats[pid_m, slot, {0, 1}, co] (COUNT slots)."""
    t = tl.arange(0, SLOTS)
    slot_ok = t < n_slots
    ptrs = (yt_ptr + (slot0 + t)[:, None, None].to(tl.int64) * s_slot
            + (n_img * s_n + oh * s_h + ow * s_w)[None, :, None] + (co * s_c)[None, None, :])
    mask = slot_ok[:, None, None] & row_ok[None, :, None] & col_ok[None, None, :]
    tl.store(ptrs, v.to(yt_ptr.dtype.element_ty), mask=mask)
    if BN_STATS:
        vm = tl.where(mask, v, 0.0)
        base = tstats_ptr + (pid_m * COUNT + slot0 + t)[:, None].to(tl.int64) * 2 * CO \
            + co[None, :]
        ok = slot_ok[:, None] & col_ok[None, :]
        tl.store(base, tl.sum(vm, axis=1), mask=ok)
        tl.store(base + CO, tl.sum(vm * y_centered[None, :, :], axis=1), mask=ok)


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
        P_ADD: tl.constexpr, BN_STATS: tl.constexpr, TX_BLOCK: tl.constexpr,
        TP_BLOCK: tl.constexpr, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)

    # Output rows of this tile: m -> (n, oh, ow).
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    n_img = offs_m // (HO * WO)
    oh = (offs_m % (HO * WO)) // WO
    ow = offs_m % WO
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = co < CO

    # Tangent rows: r -> (slot r // BM, output row r % BM), the ẋ slots stacked along M.
    r = tl.arange(0, TX_BLOCK * BLOCK_M)
    r_slot = r // BLOCK_M
    r_m = pid_m * BLOCK_M + r % BLOCK_M
    r_ok = (r_m < M) & (r_slot < TX)
    r_n = r_m // (HO * WO)
    r_oh = (r_m % (HO * WO)) // WO
    r_ow = r_m % WO
    # Parameter-tangent columns: j -> (slot j // BN, channel), the Ẇ slots stacked along N.
    j = tl.arange(0, TP_BLOCK * BLOCK_N)
    j_slot = j // BLOCK_N
    j_co = pid_n * BLOCK_N + j % BLOCK_N
    j_ok = (j_co < CO) & (j_slot < TP)

    acc_y = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_x = tl.zeros((TX_BLOCK * BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_p = tl.zeros((BLOCK_M, TP_BLOCK * BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        # k -> (kh, kw, c): input pixel ih = oh·stride − pad + kh·dilation (zero outside).
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < K
        c = k % C
        kw = (k // C) % KW
        kh = k // (C * KW)
        ih = oh[:, None] * stride_h - pad_h + kh[None, :] * dil_h
        iw = ow[:, None] * stride_w - pad_w + kw[None, :] * dil_w
        x_ok = row_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_tile = tl.load(x_ptr + n_img[:, None] * sx_n + c[None, :] * sx_c + ih * sx_h
                         + iw * sx_w, mask=x_ok, other=0.0)
        w_tile = tl.load(w_ptr + co[None, :] * sw_o + c[:, None] * sw_c + kh[:, None] * sw_h
                         + kw[:, None] * sw_w, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:  # Triton's interpreter multiplies 16-bit floats wrongly: give it float32
            x_tile, w_tile = x_tile.to(tl.float32), w_tile.to(tl.float32)
        acc_y = tl.dot(x_tile, w_tile, acc_y, input_precision=INPUT_PRECISION)
        if HAS_XT:
            r_ih = r_oh[:, None] * stride_h - pad_h + kh[None, :] * dil_h
            r_iw = r_ow[:, None] * stride_w - pad_w + kw[None, :] * dil_w
            t_ok = (r_ok[:, None] & k_ok[None, :] & (r_ih >= 0) & (r_ih < H) & (r_iw >= 0)
                    & (r_iw < W))
            t_tile = tl.load(xt_ptr + r_slot[:, None].to(tl.int64) * st_t + r_n[:, None] * st_n
                             + c[None, :] * st_c + r_ih * st_h + r_iw * st_w,
                             mask=t_ok, other=0.0)
            if UPCAST:
                t_tile = t_tile.to(tl.float32)
            acc_x = tl.dot(t_tile, w_tile, acc_x, input_precision=INPUT_PRECISION)
        if HAS_WT:
            wt_tile = tl.load(wt_ptr + j_slot[None, :].to(tl.int64) * swt_t
                              + j_co[None, :] * swt_o + c[:, None] * swt_c
                              + kh[:, None] * swt_h + kw[:, None] * swt_w,
                              mask=k_ok[:, None] & j_ok[None, :], other=0.0)
            if UPCAST:
                wt_tile = wt_tile.to(tl.float32)
            acc_p = tl.dot(x_tile, wt_tile, acc_p, input_precision=INPUT_PRECISION)

    # --- epilogue: y = acc_y + b ------------------------------------------------------------------
    if HAS_B:
        acc_y += tl.load(b_ptr + co, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out_ok = row_ok[:, None] & col_ok[None, :]
    tl.store(y_ptr + (n_img * sy_n + oh * sy_h + ow * sy_w)[:, None] + (co * sy_c)[None, :],
             acc_y.to(y_ptr.dtype.element_ty), mask=out_ok)
    y_centered = acc_y  # y − ȳ_tile over the valid rows, for the centred sums
    if BN_STATS:
        # Σy and Σ(y − ȳ_tile)² per channel: centring inside the tile keeps fp32 sums stable.
        count = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
        y_sum = tl.sum(tl.where(out_ok, acc_y, 0.0), axis=0)
        y_centered = tl.where(out_ok, acc_y - (y_sum / count)[None, :], 0.0)
        base = stats_ptr + pid_m * 2 * CO + co
        tl.store(base, y_sum, mask=col_ok)
        tl.store(base + CO, tl.sum(y_centered * y_centered, axis=0), mask=col_ok)

    # --- epilogue: tangents ẏ = W*ẋ + Ẇ*x + ḃ ---------------------------------------------------
    p3 = tl.zeros((TP_BLOCK, BLOCK_M, BLOCK_N), dtype=tl.float32)
    if HAS_WT or HAS_BT:
        if HAS_WT:
            # (BM, TP·BN) -> (TP, BM, BN)
            p3 = tl.permute(tl.reshape(acc_p, (BLOCK_M, TP_BLOCK, BLOCK_N)), (1, 0, 2))
        if HAS_BT:
            tp = tl.arange(0, TP_BLOCK)
            bt = tl.load(bt_ptr + tp[:, None] * sbt_t + co[None, :],
                         mask=(tp[:, None] < TP) & col_ok[None, :], other=0.0)
            p3 += bt.to(tl.float32)[:, None, :]
    if HAS_XT:
        x3 = tl.reshape(acc_x, (TX_BLOCK, BLOCK_M, BLOCK_N))
        if P_ADD:  # the parameter slots are the input's slots
            x3 += p3
        _store_slots(yt_ptr, tstats_ptr, x3, 0, TX, n_img, oh, ow, co, row_ok, col_ok,
                     y_centered, pid_m, CO, COUNT, syt_t, syt_n, syt_c, syt_h, syt_w, TX_BLOCK,
                     BN_STATS)
    if (HAS_WT or HAS_BT) and not P_ADD:
        _store_slots(yt_ptr, tstats_ptr, p3, P_OFFSET, TP, n_img, oh, ow, co, row_ok, col_ok,
                     y_centered, pid_m, CO, COUNT, syt_t, syt_n, syt_c, syt_h, syt_w, TP_BLOCK,
                     BN_STATS)


def _block(n: int) -> int:
    return max(1, triton.next_power_of_2(n))


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
    ``bn_stats``; None when the slot layout is not one the kernel lays out (caller falls back)."""
    layout = slot_layout(x_pos, p_pos, count)
    if layout is None:
        return None
    p_add, p_offset = layout
    N, C, H, W = x.shape
    CO, _, KH, KW = w.shape
    _, _, HO, WO = ConvArgs(stride, padding, dilation, 1).output_shape(x.shape, w.shape)
    TX = 0 if xt is None else xt.shape[0]
    TP = 0 if not p_pos else (wt if wt is not None else bt).shape[0]
    y = empty_like_format((N, CO, HO, WO), x)
    yt = empty_slots(count, y) if count else y
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
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), triton.cdiv(CO, meta["BLOCK_N"]))
    _dual_conv2d_forward_kernel[grid](
        x, xt_, w, wt_, b if b is not None else dummy, bt_, y, yt, stats, tstats,
        N, C, H, W, CO, HO, WO, KH, KW, M, C * KH * KW, TX, TP, count, p_offset,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        *x.stride(), *xt_.stride()[:5], *w.stride(), *wt_.stride()[:5],
        bt_.stride(0) if bt is not None else 0,
        *y.stride(), *(yt.stride() if count else (0,) * 5),
        HAS_XT=xt is not None, HAS_WT=wt is not None and TP > 0, HAS_B=b is not None,
        HAS_BT=bt is not None and TP > 0, P_ADD=p_add, BN_STATS=bn_stats,
        TX_BLOCK=_block(TX), TP_BLOCK=_block(TP), INPUT_PRECISION=input_precision,
        UPCAST=INTERPRETED and x.dtype != torch.float32)
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

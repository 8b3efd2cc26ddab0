"""The Triton kernel of the fused dual convolution: an implicit GEMM with a software-pipelined
reduction loop and the batch-norm sums in its epilogue.

GEMM view: rows m = (n, oh, ow) of the output, columns = output channels, reduction over the
filter window. One launch computes, for each program (tile of rows, tile of columns, slot s),

    out_s = A_s · B_s  (+ A2_s · B2_s when TERMS = 2)  (+ bias_s)

where each operand is either a plain tensor (slot stride 0) or a stack of slots. The launcher
maps the dual convolution onto it: the primal (x·W + b), the input-tangent slots (ẋ_s·W), the
parameter-tangent slots (x·Ẇ_p + ḃ_p), or both terms of a slot that has both.

The reduction walks k in one of two orders, chosen by the operands' layout so that consecutive
k are adjacent in memory (vector loads, and asynchronous copies that the pipeliner can issue
``num_stages`` iterations ahead):
    C_INNER: (kh, kw, c): x and W contiguous channels_last, (N, H, W, C) and
             (C_out, kh, kw, C); a step is one filter tap and a block of channels.
    else:    (c, kh, kw): W contiguous (C_out, C, kh, kw), read as a (C_out, K) matrix; x
             NCHW, its gather strided (float32 only: 4-byte copies are asynchronous too).
"""
from __future__ import annotations

import triton
import triton.language as tl


# Sizes that only bound loops and masks are not specialised on (one compile serves every
# batch and image size); channel counts and strides are, for the alignment of vector loads.
@triton.jit(do_not_specialize=["H", "W", "HO", "WO", "M"])
def _dual_conv2d_forward_kernel(
        a_ptr, b_ptr, a2_ptr, b2_ptr, bias_ptr, out_ptr, y_ptr, stats_ptr, ystats_ptr,
        C, H, W, CO, HO, WO, KH, KW, M, K,
        stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
        sa_t, sa2_t, sx_n, sx_c, sx_h, sx_w,
        sb_t, sb2_t,
        sbias_t, so_t, sy_n, sy_c, sy_h, sy_w, sst_m, sst_t, sys_m,
        TERMS: tl.constexpr, HAS_BIAS: tl.constexpr, BN_STATS: tl.constexpr,
        READ_Y: tl.constexpr, C_INNER: tl.constexpr, INPUT_PRECISION: tl.constexpr,
        UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr):
    # Offsets inside one tensor or slot are int32 (the launcher keeps each under 2³¹
    # elements); slot offsets are int64.
    pid = tl.program_id(0)
    slot = tl.program_id(1).to(tl.int64)
    # Column tiles vary fastest: the programs that share a tile of x run side by side (L2).
    tiles_n = tl.cdiv(CO, BLOCK_N)
    pid_m = pid // tiles_n
    pid_n = pid % tiles_n

    # Output rows m -> (n, oh, ow), and the top-left input pixel of each row's window.
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = offs_m < M
    ow = offs_m % WO
    oh = (offs_m // WO) % HO
    n_img = offs_m // (WO * HO)
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = co < CO

    a_base = a_ptr + slot * sa_t
    b_base = b_ptr + slot * sb_t
    a2_base = a2_ptr + slot * sa2_t
    b2_base = b2_ptr + slot * sb2_t

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # With two terms the steps alternate between them (A·B at even steps, A2·B2 at odd ones):
    # one product per step, so that each step's product stays in flight while the next
    # step's tiles arrive.
    if C_INNER:
        # x[n, ih, iw, c] and W[co, kh, kw, c], both contiguous: offsets are multiples of C
        # plus c, which the compiler sees aligned (C is divisible by 16 for 16-bit operands).
        x_pixels = (n_img * H + ih0) * W + iw0
        c_steps = tl.cdiv(C, BLOCK_K)
        for step in tl.range(0, TERMS * KH * KW * c_steps):
            j = step // TERMS
            second = (step - j * TERMS) == 1
            tap = j // c_steps
            c = (j - tap * c_steps) * BLOCK_K + tl.arange(0, BLOCK_K)
            kh = tap // KW
            kw = tap - kh * KW
            ih = ih0 + kh * dil_h
            iw = iw0 + kw * dil_w
            pixel_ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            c_ok = c < C
            a_off = ((x_pixels + kh * dil_h * W + kw * dil_w) * C)[:, None] + c[None, :]
            b_off = ((co * (KH * KW) + tap) * C)[None, :] + c[:, None]
            a = tl.load(tl.where(second, a2_base, a_base) + a_off,
                        mask=pixel_ok[:, None] & c_ok[None, :], other=0.0)
            b = tl.load(tl.where(second, b2_base, b_base) + b_off,
                        mask=c_ok[:, None] & col_ok[None, :], other=0.0)
            acc = _dot(a, b, acc, INPUT_PRECISION, UPCAST)
    else:
        x_rows = n_img * sx_n + ih0 * sx_h + iw0 * sx_w
        for step in tl.range(0, TERMS * tl.cdiv(K, BLOCK_K)):
            j = step // TERMS
            second = (step - j * TERMS) == 1
            k = j * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = k < K
            c = k // (KH * KW)
            tap = k - c * (KH * KW)
            kh = tap // KW
            kw = tap - kh * KW
            ih = ih0[:, None] + (kh * dil_h)[None, :]
            iw = iw0[:, None] + (kw * dil_w)[None, :]
            pixel_ok = (row_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0)
                        & (iw < W))
            a_off = x_rows[:, None] + (c * sx_c + kh * dil_h * sx_h + kw * dil_w * sx_w)[None, :]
            # W as a (C_out, K) matrix: k contiguous.
            b_off = (co * K)[None, :] + k[:, None]
            a = tl.load(tl.where(second, a2_base, a_base) + a_off, mask=pixel_ok, other=0.0)
            b = tl.load(tl.where(second, b2_base, b_base) + b_off,
                        mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            acc = _dot(a, b, acc, INPUT_PRECISION, UPCAST)

    # --- epilogue: bias, store, and the tile's batch-norm sums ---------------------------------
    out_ok = row_ok[:, None] & col_ok[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + slot * sbias_t + co, mask=col_ok, other=0.0)
        acc += bias.to(tl.float32)[None, :]
    out = acc.to(out_ptr.dtype.element_ty)
    y_off = (n_img * sy_n + oh * sy_h + ow * sy_w)[:, None] + (co * sy_c)[None, :]
    tl.store(out_ptr + slot * so_t + y_off, out, mask=out_ok)
    if BN_STATS:
        # Sums of the values as stored (a batch norm reads them so): Σv and the co-moment
        # Σ(y − ȳ_tile)·(v − v̄_tile), where v is this output and y the primal (v itself in the
        # primal's launch, else read back, with ȳ_tile from the primal launch's sums of the same
        # rows). In the primal's launch it is the centred square, stable in float32 for a
        # channel whose mean is large beside its spread (Σ(y − ȳ_tile)·y would keep ȳ_tile's
        # rounding times n·ȳ). In a tangent's it is Σ(y − ȳ_tile)·v − v̄_tile·Σ(y − ȳ_tile):
        # the second sum, the rows times ȳ_tile's rounding, takes back out the term that
        # rounding puts in the first, eps·(ȳ/σ_y)·(v̄/σ_v) relative (v is not centred: that
        # would hold a tile of registers); the products' own rounding, eps·v̄/σ_v, stays.
        v = tl.where(out_ok, out.to(tl.float32), 0.0)
        rows = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(tl.float32)
        v_sum = tl.sum(v, axis=0)
        if READ_Y:
            y_sum = tl.load(ystats_ptr + pid_m.to(tl.int64) * sys_m + co, mask=col_ok, other=0.0)
            y = tl.load(y_ptr + y_off, mask=out_ok, other=0.0).to(tl.float32)
            y_centred = tl.where(out_ok, y - (y_sum / rows)[None, :], 0.0)
            co_moment = (tl.sum(y_centred * v, axis=0)
                         - (v_sum / rows) * tl.sum(y_centred, axis=0))
        else:
            y_centred = tl.where(out_ok, v - (v_sum / rows)[None, :], 0.0)
            co_moment = tl.sum(y_centred * y_centred, axis=0)
        stats = stats_ptr + pid_m.to(tl.int64) * sst_m + slot * sst_t + co
        tl.store(stats, v_sum, mask=col_ok)
        tl.store(stats + CO, co_moment, mask=col_ok)


@triton.jit
def _dot(a, b, acc, INPUT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a·b, float32 sums."""
    if UPCAST:  # Triton's interpreter multiplies 16-bit floats wrongly: give it float32
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=INPUT_PRECISION)

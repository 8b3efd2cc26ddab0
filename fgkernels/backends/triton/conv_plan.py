"""Tile plans of the fused convolution: chosen from the shapes, dtypes and target before the
launch, deterministically (no autotuning at run time), so that the launcher knows every block
size it launches with, and the kernel report can compile exactly those launches.

A plan fits the target: its software pipeline (``shared_bytes``, the shared memory Triton
allocates for it, checked against the compiled kernels by ``tests/backends/test_kernel_report.py``)
within the block's shared memory, and its tiles within the register file without spilling
(checked there too, for every launch the launcher makes).
"""
from __future__ import annotations

from dataclasses import dataclass

import triton

# The registers a thread may use, passed to ptxas as .maxnreg: without it, ptxas caps a kernel
# that needs a little more than 128 at 128 (two blocks of 256 threads per multiprocessor)
# and spills the rest.
MAX_REGISTERS = 255


@dataclass(frozen=True)
class TilePlan:
    """Block sizes, warps and pipeline depth of one launch."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int

    def label(self) -> str:
        """``BMxBNxBK wW sS``."""
        return (f"{self.block_m}x{self.block_n}x{self.block_k} w{self.num_warps} "
                f"s{self.num_stages}")


@dataclass(frozen=True)
class LaunchShape:
    """What a plan depends on: one launch's GEMM and operands.

    ``a_bytes``/``b_bytes``: element sizes of the row (x) and column (W) operands; ``terms``:
    products per output (2 for a slot with an input and a parameter tangent); ``split_fp32``:
    float32 products emulated to full precision with three TF32 products; ``bn_stats``: the
    epilogue sums the tile for a batch norm; ``out_bytes``/``out_channels_last``: the output's
    element size and layout."""

    rows: int
    c_out: int
    channels: int
    c_inner: bool
    a_bytes: int
    b_bytes: int
    terms: int = 1
    split_fp32: bool = False
    bn_stats: bool = False
    out_bytes: int = 4
    out_channels_last: bool = False


def block_m(rows: int) -> int:
    """The row tile, chosen from the number of output rows alone (every launch of one
    convolution shares it, so that their batch-norm tile sums line up)."""
    return 64 if rows <= 8192 else 128


def block_k(shape: LaunchShape, arch: int, columns: int) -> int:
    """128 bytes of reduction per row of a tile (one line of the shared-memory swizzle); in the
    (kh, kw, c) order no wider than the channels (the stem's 3 channels take one step of 16).
    Narrower where a step's tiles cost registers per element: 16 in the (c, kh, kw) order
    (each element's window position is computed) and for split-float32 products on mma
    (before sm_90, each operand element held three times); 32 for a 128-column tile on mma."""
    if not shape.c_inner or (shape.split_fp32 and arch < 90):
        return 16
    bk = 128 // max(shape.a_bytes, shape.b_bytes)
    if arch < 90 and columns > 64:
        bk = min(bk, 32)
    return min(bk, max(16, triton.next_power_of_2(shape.channels)))


def block_n(c_out: int) -> int:
    """The column tile: no wider than C_out (rounded up to a power of two, at least 32)."""
    return max(32, min(128, triton.next_power_of_2(c_out)))


def shared_bytes(plan: TilePlan, shape: LaunchShape, arch: int) -> int:
    """The shared memory Triton allocates for ``plan``: the larger of its pipeline's buffers
    of the row and column tiles (the two terms of a slot alternate steps, so they share them)
    and, for a channels_last output, the tile rearranged for stores along the channels.

    Triton's pipeliner keeps ``num_stages − 1`` tiles in flight and, where the tensor cores
    read an operand from shared memory asynchronously (wgmma, sm_90), one more buffer of that
    operand for the product still running. On sm_80/89 (mma) every operand passes through
    registers; on sm_90 so does the column tile of a split-float32 product (its low part is
    computed in registers)."""
    in_flight = plan.num_stages - 1
    a_buffers = in_flight + (arch >= 90)
    b_buffers = in_flight + (arch >= 90 and not shape.split_fp32)
    pipeline = (a_buffers * plan.block_m * plan.block_k * shape.a_bytes
                + b_buffers * plan.block_k * plan.block_n * shape.b_bytes)
    epilogue = plan.block_m * plan.block_n * shape.out_bytes if shape.out_channels_last else 0
    return max(pipeline, epilogue)


def plan_tiles(shape: LaunchShape, arch: int, shared_limit: int) -> TilePlan:
    """The launch's tiles: the row tile from ``block_m``, the column tile from C_out, the
    reduction step from ``block_k``, 8 warps for a 128×64 accumulator or more, and as deep a
    pipeline as the shared memory holds (2 to 4 stages).

    Register budget (``tests/backends/test_kernel_report.py`` holds every launch below 240 of
    the 255 a thread has): an epilogue summing a 128×128 tile for a batch norm holds three
    tile-sized values and the tile's offsets per thread, split-float32 products their split
    operands, and the (c, kh, kw) order each element's window position, each at or near the
    limit: those launches take 64 columns; split-float32 products on mma (before sm_90) at most
    3 stages."""
    bm, bn = block_m(shape.rows), block_n(shape.c_out)
    if (shape.bn_stats or shape.split_fp32 or not shape.c_inner) and bm * bn > 128 * 64:
        bn = 64
    bk = block_k(shape, arch, bn)
    warps = 8 if bm * bn >= 128 * 64 else 4
    most_stages = 3 if shape.split_fp32 and arch < 90 else 4
    stages = 2
    for candidate in range(most_stages, 2, -1):
        plan = TilePlan(bm, bn, bk, warps, candidate)
        if shared_bytes(plan, shape, arch) <= shared_limit:
            stages = candidate
            break
    return TilePlan(bm, bn, bk, warps, stages)

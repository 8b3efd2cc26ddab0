"""Resource report of fgkernels' GPU kernels, compiled ahead of time for real GPUs, without one.

    python tools/kernel_report.py [--arch 80 89 90] [--matrix full|quick|resnet18] [--json FILE]
                                  [--table] [--cuda] [--jobs N]

Each Triton launch is compiled exactly as the launcher makes it: the launcher (``dual_conv2d``,
``dual_bn_relu_apply_``) runs on ``meta`` tensors, planned for the target GPU
(``assumed_target``); its kernel launches are captured instead of run, and Triton's own
binder turns each one's arguments into the signature, the constexprs and the integer
specialisations (divisibility by 16, ``== 1``) that a real launch gets. That is compiled with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` and inspected:

- registers, spill bytes and stack frame from ``ptxas -v`` (the flags Triton uses), and the
  cubin's local-memory instructions (``LDL``/``STL``) from ``cuobjdump -sass``;
- shared memory (``metadata.shared``) against the architecture's limit;
- tensor-core instructions in the PTX (``wgmma`` on sm_90, ``mma.sync`` on sm_80/89);
- the reduction loop's software pipeline: asynchronous copies (``cp.async``) or TMA in the
  TTGIR, and on sm_90 the deepest ``wgmma.wait_group`` (> 0: a product stays in flight);
- pointer arguments offset by a 32-bit scalar in the TTIR (a slot's or a tile's base offset
  that passes 2³¹ elements would wrap around).

A launch is clean when it compiles, spills nothing, stays below ``REGISTER_CEILING``
registers, fits the shared memory, computes every base offset in 64 bits, and (a launch with a
reduction) uses the tensor cores in a pipelined loop. Each convolution launch also carries the
shared memory that ``conv_plan``'s model expects of it. ``--cuda`` adds the CUDA kernels of
``csrc/cuda`` compiled by ``nvcc -Xptxas -v``. Run it where ``TRITON_INTERPRET`` is unset (the
interpreter replaces the compiler). Compiles run in parallel, one process per core.
"""
from __future__ import annotations

import argparse
import contextlib
import glob
import itertools
import json
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout: its fgkernels
    sys.path.insert(0, str(ROOT))

ARCHS = (80, 89, 90)
# Registers per thread above which a launch has no headroom (the hardware cap is 255).
REGISTER_CEILING = 240


# --- capture: the launcher's kernel launches, not run --------------------------------------------
@dataclass
class CapturedLaunch:
    """One kernel launch as the launcher made it."""

    kernel: object  # the JITFunction
    args: tuple
    kwargs: dict
    grid: tuple


@contextlib.contextmanager
def captured_launches(*kernels) -> Iterator[list[CapturedLaunch]]:
    """Inside the block, launching one of ``kernels`` records the launch and runs nothing."""
    launches: list[CapturedLaunch] = []

    def recorder(kernel):
        def run(*args, grid, warmup, **kwargs):
            launches.append(CapturedLaunch(kernel, args, dict(kwargs),
                                           tuple(grid(kwargs) if callable(grid) else grid)))
        return run

    for kernel in kernels:
        kernel.run = recorder(kernel)  # shadows JITFunction.run, which kernel[grid] calls
    try:
        yield launches
    finally:
        for kernel in kernels:
            del kernel.run


# --- bind: Triton's own binder, for the target ----------------------------------------------------
@dataclass
class BoundLaunch:
    """What ``JITFunction.run`` hands to the compiler for a launch."""

    kernel: str  # module:name
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict

    def key(self) -> str:
        return json.dumps([self.kernel, self.signature, sorted(self.constexprs.items()),
                           sorted((str(k), v) for k, v in self.attrs.items()),
                           sorted(self.options.items())], default=str)


def bind(launch: CapturedLaunch, arch: int) -> BoundLaunch:
    """Signature, constexprs, specialisation attributes and options of ``launch`` on sm_``arch``,
    as ``JITFunction.run`` computes them (its binder and ``_pack_args``)."""
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature
    kernel = launch.kernel
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound_args,
                                                              specialization, options)
    names = kernel.arg_names
    return BoundLaunch(f"{kernel.fn.__module__}:{kernel.fn.__name__}", signature,
                       {names[k[0]]: v for k, v in constexprs.items()},
                       {names[k[0]]: v for k, v in attrs.items()},
                       {"num_warps": options.num_warps, "num_stages": options.num_stages,
                        "maxnreg": options.maxnreg, "debug": options.debug})


# --- compile and inspect -----------------------------------------------------------------------
@dataclass
class Compiled:
    """Resources and instructions of one compiled kernel."""

    registers: int = -1
    spill_bytes: int = -1      # ptxas: spill stores + spill loads
    stack_bytes: int = -1      # ptxas: stack frame
    local_instructions: int = -1  # LDL/STL in the SASS
    shared_bytes: int = -1
    tensor_core: str = "none"  # wgmma / mma / none
    async_copies: int = 0      # TTGIR async_copy_global_to_local
    tma_copies: int = 0        # TTGIR TMA loads
    wgmma_wait_depth: int = -1  # deepest wgmma.wait_group N (sm_90), -1 without wgmma
    narrow_base_offsets: int = -1  # pointer arguments offset by a 32-bit scalar (TTIR)
    error: str = ""


def _tool(name: str, arch: int) -> str:
    from triton.backends.nvidia.compiler import get_ptxas
    ptxas = get_ptxas(arch)
    path = ptxas.path if hasattr(ptxas, "path") else ptxas[0]
    return os.path.join(os.path.dirname(path), name) if name != "ptxas" else path


def compile_kernel(bound: BoundLaunch, arch: int):
    """Triton's compile of ``bound`` for sm_``arch`` (its ``CompiledKernel``)."""
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    module, name = bound.kernel.split(":")
    kernel = getattr(importlib.import_module(module), name)
    attrs = {(kernel.arg_names.index(k),): v for k, v in bound.attrs.items()}
    return triton.compile(ASTSource(kernel, bound.signature, bound.constexprs, attrs),
                          target=GPUTarget("cuda", arch, 32), options=bound.options)


def compile_bound(bound: BoundLaunch, arch: int) -> Compiled:
    """Compile ``bound`` for sm_``arch`` and inspect the result (a failed compile is a result)."""
    try:
        compiled = compile_kernel(bound, arch)
    except Exception as e:  # noqa: BLE001 (the message is the result)
        # Triton's compile errors open with the source position and end with the cause.
        lines = [line.strip() for line in str(e).strip().splitlines() if line.strip()]
        message = f"{lines[0]} {lines[-1]}" if len(lines) > 1 else \
            (lines[0] if lines else type(e).__name__)
        return Compiled(error=message[:300])
    ttgir, ptx = compiled.asm["ttgir"], compiled.asm["ptx"]
    out = Compiled(shared_bytes=int(compiled.metadata.shared))
    out.registers, out.spill_bytes, out.stack_bytes = _ptxas_stats(ptx, arch)
    out.local_instructions = _local_instructions(compiled.asm["cubin"], arch)
    out.tensor_core = ("wgmma" if re.search(r"\bwgmma\.mma_async", ptx) else
                       "mma" if re.search(r"\bmma\.sync", ptx) else "none")
    out.async_copies = len(re.findall(r"ttg\.async_copy_global_to_local", ttgir))
    out.tma_copies = len(re.findall(r"async_tma_copy_global_to_local|tt\.descriptor_load",
                                    ttgir))
    waits = [int(n) for n in re.findall(r"wgmma\.wait_group\.sync\.aligned\s+(\d+)", ptx)]
    out.wgmma_wait_depth = max(waits) if waits else -1
    out.narrow_base_offsets = len(narrow_base_offsets(compiled.asm["ttir"], bound.signature))
    return out


def narrow_base_offsets(ttir: str, signature: dict) -> list[str]:
    """The pointer arguments that the TTIR offsets by a 32-bit scalar: where a tensor or slot
    base is computed (slot · slot size, tile · tile stride), a product that passes 2³¹
    elements wraps around in 32 bits."""
    pointers = [name for name, kind in signature.items() if kind.startswith("*")]
    return [name for name in pointers
            if re.search(rf"tt\.addptr %{name}, %\S+ : !tt\.ptr<\w+>, i32\b", ttir)]


def _ptxas_stats(ptx: str, arch: int) -> tuple[int, int, int]:
    """Registers, spill bytes and stack frame bytes of ``ptxas -v``, run as Triton runs it."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        Path(path).write_text(ptx)
        suffix = "a" if arch >= 90 else ""
        done = subprocess.run([_tool("ptxas", arch), "-lineinfo", "-v",
                               f"--gpu-name=sm_{arch}{suffix}", path, "-o",
                               os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    text = done.stderr + done.stdout
    number = lambda pattern: sum(int(v) for v in re.findall(pattern, text)) \
        if re.search(pattern, text) else -1
    return (number(r"Used (\d+) registers"),
            number(r"(\d+) bytes spill stores") + number(r"(\d+) bytes spill loads"),
            number(r"(\d+) bytes stack frame"))


def _local_instructions(cubin: bytes, arch: int) -> int:
    """Local-memory loads and stores (register spills) in the cubin's SASS."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.cubin")
        Path(path).write_bytes(cubin)
        done = subprocess.run([_tool("cuobjdump", arch), "-sass", path], capture_output=True,
                              text=True)
    if done.returncode != 0:
        return -1
    return len(re.findall(r"\b(?:LDL|STL)(?:\.\w+)*\s", done.stdout))


# --- the cases: every combination the launchers make -----------------------------------------
# (N, C, H, W, C_out, kernel, stride, padding) of the layers a ResNet's convolutions cover:
# both stems, the widths and strides of its stages, a projection, and the last stage at 7×7.
SHAPES = {
    "stem-cifar": (256, 3, 32, 32, 64, 3, 1, 1),
    "stem-imagenet": (256, 3, 224, 224, 64, 7, 2, 3),
    "c64x56": (256, 64, 56, 56, 64, 3, 1, 1),
    "c128x28-s2": (256, 64, 56, 56, 128, 3, 2, 1),
    "down1x1-s2": (256, 128, 28, 28, 256, 1, 2, 0),
    "c512x7": (256, 512, 7, 7, 512, 3, 1, 1),
    "c512x4": (256, 512, 4, 4, 512, 3, 1, 1),
}
# The convolutions of the benchmarks' ResNet-18 (CIFAR shapes, batch 256): its stem, the
# 3×3 convolutions of its stages (the first of each with stride 2) and its projections.
RESNET18_CIFAR = {
    "r18-stem": (256, 3, 32, 32, 64, 3, 1, 1),
    "r18-c64": (256, 64, 32, 32, 64, 3, 1, 1),
    "r18-c128-s2": (256, 64, 32, 32, 128, 3, 2, 1),
    "r18-c128": (256, 128, 16, 16, 128, 3, 1, 1),
    "r18-down128": (256, 64, 32, 32, 128, 1, 2, 0),
    "r18-c256-s2": (256, 128, 16, 16, 256, 3, 2, 1),
    "r18-c256": (256, 256, 8, 8, 256, 3, 1, 1),
    "r18-down256": (256, 128, 16, 16, 256, 1, 2, 0),
    "r18-c512-s2": (256, 256, 8, 8, 512, 3, 2, 1),
    "r18-c512": (256, 512, 4, 4, 512, 3, 1, 1),
    "r18-down512": (256, 256, 8, 8, 512, 1, 2, 0),
}
DTYPES = ("fp32", "fp32-ieee", "bf16", "fp16", "fp32+bf16")
# Slot roles: tangents of the input only, of the parameters only, both appended (input slots
# then parameter slots), both on the same slots, or of the bias alone.
ROLES = ("input", "param", "appended", "same", "bias-only")
LAYOUTS = ("nchw", "channels_last")


@dataclass(frozen=True)
class ConvCase:
    """One call of ``dual_conv2d``."""

    shape: str
    dtype: str
    role: str
    slots: int
    bn_stats: bool
    layout: str
    bias: bool

    def label(self) -> str:
        return (f"{self.shape} {self.dtype} {self.role}x{self.slots} "
                f"{'bn' if self.bn_stats else 'nobn'} {self.layout} "
                f"{'bias' if self.bias else 'nobias'}")


def conv_cases(matrix: str) -> list[ConvCase]:
    """``full``: every dtype × role × batch-norm sums × layout × bias on a 64-channel layer and
    the same without a bias on the last stage's (one slot); the other layers (the stems, a
    strided and a projection layer, a 4×4 one) in float32, bfloat16 and bfloat16 slots of
    float32, both layouts, with 16 + 16 appended slots and 16 on the same indices (the
    slots ride on the grid: the kernels are the one-slot ones); ``quick``: a sample, for the
    tests; ``resnet18``: the launches of the GPU benchmarks (``benchmarks/test_layers.py``,
    ``test_network.py``: one tangent on every parameter, channels_last, float32 and
    bfloat16), whose compiles also fill Triton's cache before they are timed."""
    cases = []
    if matrix == "resnet18":
        for dtype in ("fp32", "bf16"):
            for shape in RESNET18_CIFAR:
                role = "param" if shape == "r18-stem" else "same"
                cases.append(ConvCase(shape, dtype, role, 1, True, "channels_last", False))
            for shape in ("r18-c64", "r18-c128", "r18-c256", "r18-c512"):
                cases.append(ConvCase(shape, dtype, "same", 1, False, "channels_last", False))
        return cases
    if matrix == "quick":
        combos = [("c64x56", "fp32+bf16", "param", 1, True, "nchw", True),
                  ("c64x56", "fp32", "appended", 16, True, "channels_last", False),
                  ("c64x56", "fp32-ieee", "same", 1, True, "nchw", True),
                  ("c64x56", "fp32-ieee", "appended", 1, False, "channels_last", True),
                  ("down1x1-s2", "fp32", "same", 1, True, "channels_last", False),
                  ("c512x7", "bf16", "same", 16, True, "channels_last", False),
                  ("stem-cifar", "bf16", "input", 1, False, "nchw", True),
                  ("stem-imagenet", "fp32", "same", 1, True, "channels_last", False),
                  ("c128x28-s2", "fp32+bf16", "appended", 1, True, "channels_last", True),
                  ("down1x1-s2", "fp16", "param", 1, True, "nchw", False),
                  ("c512x4", "fp16", "bias-only", 1, True, "nchw", True)]
        return [ConvCase(*c) for c in combos]
    for shape, biases in (("c64x56", (False, True)), ("c512x7", (False,))):
        for dtype, role, bn, layout, bias in itertools.product(DTYPES, ROLES, (False, True),
                                                               LAYOUTS, biases):
            if role == "bias-only" and not bias:
                continue
            cases.append(ConvCase(shape, dtype, role, 1, bn, layout, bias))
    others = [shape for shape in SHAPES if shape not in ("c64x56", "c512x7")]
    for shape, dtype, role, layout in itertools.product(others, ("fp32", "bf16", "fp32+bf16"),
                                                        ("appended", "same"), LAYOUTS):
        cases.append(ConvCase(shape, dtype, role, 16, True, layout, False))
    return cases


_TORCH_DTYPES = {"fp32": "float32", "fp32-ieee": "float32", "bf16": "bfloat16",
                 "fp16": "float16", "fp32+bf16": "float32"}


def conv_launches(case: ConvCase, arch: int) -> list[CapturedLaunch]:
    """The kernel launches ``dual_conv2d`` makes for ``case`` on sm_``arch``."""
    import torch

    from fgkernels.backends.triton.conv import dual_conv2d
    from fgkernels.backends.triton.conv_kernel import _dual_conv2d_forward_kernel
    from fgkernels.backends.triton.target import assumed_target
    N, C, H, W, CO, k, s, p = {**SHAPES, **RESNET18_CIFAR}[case.shape]
    primal = getattr(torch, _TORCH_DTYPES[case.dtype])
    tangent = torch.bfloat16 if case.dtype == "fp32+bf16" else primal
    fmt = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format
    meta = lambda *shape, dtype=primal: torch.empty(shape, device="meta", dtype=dtype)
    x = meta(N, C, H, W).contiguous(memory_format=fmt)
    w = meta(CO, C, k, k).contiguous(memory_format=fmt)
    b = meta(CO) if case.bias else None
    T = case.slots
    xs = lambda: _slots(meta(T, N, C, H, W, dtype=tangent), fmt)
    ws = lambda: _slots(meta(T, CO, C, k, k, dtype=tangent), fmt)
    bs = lambda: meta(T, CO, dtype=tangent) if case.bias else None
    xt = wt = bt = None
    if case.role == "input":
        xt, x_pos, p_pos, count = xs(), tuple(range(T)), (), T
    elif case.role == "param":
        wt, bt, x_pos, p_pos, count = ws(), bs(), (), tuple(range(T)), T
    elif case.role == "appended":
        xt, wt, bt = xs(), ws(), bs()
        x_pos, p_pos, count = tuple(range(T)), tuple(range(T, 2 * T)), 2 * T
    elif case.role == "same":
        xt, wt, bt = xs(), ws(), bs()
        x_pos = p_pos = tuple(range(T))
        count = T
    else:  # bias-only
        bt, x_pos, p_pos, count = bs(), (), tuple(range(T)), T
    precision = "ieee" if case.dtype == "fp32-ieee" else "tf32"
    with assumed_target(arch), captured_launches(_dual_conv2d_forward_kernel) as launches:
        served = dual_conv2d(x, xt, w, wt, b, bt, x_pos, p_pos, count, (s, s), (p, p), (1, 1),
                             bn_stats=case.bn_stats, input_precision=precision)
    if served is None:
        raise ValueError(f"dual_conv2d does not serve {case.label()}")
    return launches


def _slots(stack, fmt):
    import torch
    if fmt == torch.channels_last:
        return stack.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    return stack.contiguous()


@dataclass(frozen=True)
class ApplyCase:
    """One call of the batch-norm apply, ``dual_bn_relu_apply_``."""

    shape: tuple
    dtype: str
    slots: int
    layout: str
    relu: bool

    def label(self) -> str:
        return (f"bn_apply {'x'.join(map(str, self.shape))} {self.dtype} x{self.slots} "
                f"{self.layout} {'relu' if self.relu else 'norelu'}")


def apply_cases(matrix: str) -> list[ApplyCase]:
    """Both layouts, every dtype, ReLU or not; one shape whose slots together pass 2³¹
    elements (256×64×112×112, 16 slots)."""
    big = (256, 64, 112, 112)
    if matrix == "resnet18":
        return []
    if matrix == "quick":
        return [ApplyCase(big, "bf16", 16, "channels_last", True),
                ApplyCase((256, 512, 7, 7), "fp32", 1, "nchw", False)]
    return [ApplyCase(shape, dtype, slots, layout, relu)
            for shape in (big, (256, 512, 7, 7))
            for dtype in ("fp32", "bf16", "fp16", "fp32+bf16")
            for slots, layout, relu in itertools.product((1, 16), LAYOUTS, (False, True))]


def apply_launches(case: ApplyCase, arch: int) -> list[CapturedLaunch]:
    """The kernel launches ``dual_bn_relu_apply_`` makes for ``case``."""
    import torch

    from fgkernels.backends.triton.batch_norm import _dual_bn_relu_apply_kernel, dual_bn_relu_apply_
    from fgkernels.backends.triton.target import assumed_target
    primal = getattr(torch, _TORCH_DTYPES[case.dtype])
    tangent = torch.bfloat16 if case.dtype == "fp32+bf16" else primal
    fmt = torch.channels_last if case.layout == "channels_last" else torch.contiguous_format
    N, C, H, W = case.shape
    y = torch.empty(case.shape, device="meta", dtype=primal).contiguous(memory_format=fmt)
    yt = _slots(torch.empty((case.slots, *case.shape), device="meta", dtype=tangent), fmt)
    coef = lambda *shape: torch.empty(shape, device="meta", dtype=torch.float32)
    with assumed_target(arch), captured_launches(_dual_bn_relu_apply_kernel) as launches:
        dual_bn_relu_apply_(y, yt, coef(C), coef(C), coef(C), coef(case.slots, C),
                            coef(case.slots, C), case.relu)
    return launches


# --- the report ----------------------------------------------------------------------------------
@dataclass
class Row:
    """One launch and the kernel compiled for it."""

    arch: int
    case: str
    launch: int      # index among the call's launches
    kernel: str
    plan: str        # tiles, warps, stages (the constexprs and options that set them)
    grid: str
    reduction: bool  # the launch runs a reduction loop (a GEMM)
    modelled_shared_bytes: int = -1  # conv_plan's shared-memory model of the launch
    slot_elements: int = 0  # elements of the launch's output slots together
    compiled: Compiled = field(default_factory=Compiled)
    key: str = ""

    def clean(self) -> bool:
        """Compiles; spills nothing; fits the shared memory; below the register ceiling; a
        reduction on the tensor cores in a pipelined loop."""
        from fgkernels.backends.triton.target import SHARED_LIMIT
        c = self.compiled
        ok = (not c.error and c.spill_bytes == 0 and c.local_instructions == 0
              and 0 <= c.shared_bytes <= SHARED_LIMIT[self.arch]
              and 0 < c.registers <= REGISTER_CEILING and c.narrow_base_offsets == 0)
        if self.reduction:
            ok = ok and c.tensor_core == ("wgmma" if self.arch >= 90 else "mma") \
                and c.async_copies + c.tma_copies > 0
        return ok


def modelled_shared(launch: CapturedLaunch, arch: int) -> int:
    """``conv_plan.shared_bytes`` of a convolution launch (-1 for another kernel)."""
    from fgkernels.backends.triton.conv_plan import LaunchShape, TilePlan, shared_bytes
    args = dict(zip(launch.kernel.arg_names, launch.args), **launch.kwargs)
    if "BLOCK_M" not in args:
        return -1
    plan = TilePlan(args["BLOCK_M"], args["BLOCK_N"], args["BLOCK_K"], args["num_warps"],
                    args["num_stages"])
    shape = LaunchShape(rows=args["M"], c_out=args["CO"], channels=args["C"],
                        c_inner=args["C_INNER"], a_bytes=args["a_ptr"].element_size(),
                        b_bytes=args["b_ptr"].element_size(), terms=args["TERMS"],
                        split_fp32=args["INPUT_PRECISION"] == "tf32x3",
                        bn_stats=args["BN_STATS"], out_bytes=args["out_ptr"].element_size(),
                        out_channels_last=args["sy_c"] == 1)
    return shared_bytes(plan, shape, arch)


def slot_elements(launch: CapturedLaunch) -> int:
    """Elements of the output slots one launch writes (the batch-norm apply: every slot)."""
    args = dict(zip(launch.kernel.arg_names, launch.args), **launch.kwargs)
    if "numel" in args:
        return args["numel"] * args["T"]
    return args["out_ptr"].numel() if "out_ptr" in args else 0


def _plan_label(bound: BoundLaunch) -> str:
    c = bound.constexprs
    if "BLOCK_M" in c:
        tiles = f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']}"
    else:
        tiles = f"{c.get('BLOCK')}"
    return f"{tiles} w{bound.options['num_warps']} s{bound.options['num_stages']}"


def _compile_job(job: tuple) -> Compiled:
    bound, arch = job
    return compile_bound(bound, arch)


def report(archs, matrix: str = "full", jobs: Optional[int] = None) -> list[Row]:
    """Every launch of every case on every arch, each distinct kernel compiled once."""
    rows, distinct = [], {}
    for arch in archs:
        cases = [(c.label(), conv_launches(c, arch)) for c in conv_cases(matrix)] + \
            [(c.label(), apply_launches(c, arch)) for c in apply_cases(matrix)]
        for label, launches in cases:
            for i, launch in enumerate(launches):
                bound = bind(launch, arch)
                key = f"{arch}|{bound.key()}"
                distinct.setdefault(key, (bound, arch))
                rows.append(Row(arch, label, i, bound.kernel.split(":")[1], _plan_label(bound),
                                "x".join(map(str, launch.grid)),
                                bound.constexprs.get("TERMS", 0) > 0,
                                modelled_shared(launch, arch), slot_elements(launch),
                                key=key))
    keys = list(distinct)
    workers = jobs or os.cpu_count() or 1
    print(f"{len(rows)} launches, {len(keys)} distinct kernels; compiling with {workers} "
          "processes", file=sys.stderr, flush=True)
    results = {}
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(ProcessPoolExecutor(workers)) if workers > 1 else None
        jobs_out = pool.map(_compile_job, [distinct[k] for k in keys]) if pool else \
            map(_compile_job, [distinct[k] for k in keys])
        for i, (key, result) in enumerate(zip(keys, jobs_out)):
            results[key] = result
            if (i + 1) % 25 == 0 or i + 1 == len(keys):
                print(f"  compiled {i + 1}/{len(keys)}", file=sys.stderr, flush=True)
    for row in rows:
        row.compiled = results[row.key]
    return rows


def summary(rows: list[Row]) -> dict:
    """Per arch: launches, distinct kernels, clean launches, worst registers and spills,
    whether every reduction is pipelined, the deepest wgmma wait."""
    out = {}
    fraction = lambda rows_, check: f"{sum(map(check, rows_))}/{len(rows_)}"
    for arch in sorted({r.arch for r in rows}):
        mine = [r for r in rows if r.arch == arch]
        red = [r for r in mine if r.reduction]
        out[arch] = {
            "launches": len(mine),
            "kernels": len({r.key for r in mine}),
            "clean": sum(r.clean() for r in mine),
            "errors": sum(bool(r.compiled.error) for r in mine),
            "max_registers": max(r.compiled.registers for r in mine),
            "max_spill_bytes": max(r.compiled.spill_bytes for r in mine),
            "max_local_instructions": max(r.compiled.local_instructions for r in mine),
            "max_shared_bytes": max(r.compiled.shared_bytes for r in mine),
            "reductions_pipelined": fraction(
                red, lambda r: r.compiled.async_copies + r.compiled.tma_copies > 0),
            "reductions_on_tensor_cores": fraction(red,
                                                   lambda r: r.compiled.tensor_core != "none"),
            "max_wgmma_wait_depth": max((r.compiled.wgmma_wait_depth for r in red), default=-1),
            "shared_model_exact": fraction(
                red, lambda r: r.modelled_shared_bytes == r.compiled.shared_bytes),
        }
    return out


def _table(rows: list[Row]) -> str:
    head = ("arch", "case", "#", "kernel", "plan", "regs", "spill B", "LDL/STL", "smem KiB",
            "tensor core", "async copies", "wgmma wait", "clean", "error")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        c = r.compiled
        lines.append(f"| sm_{r.arch} | {r.case} | {r.launch} | {r.kernel} | {r.plan} | "
                     f"{c.registers} | {c.spill_bytes} | {c.local_instructions} | "
                     f"{c.shared_bytes / 1024:.1f} | {c.tensor_core} | "
                     f"{c.async_copies + c.tma_copies} | {c.wgmma_wait_depth} | "
                     f"{'yes' if r.clean() else 'NO'} | {c.error} |")
    return "\n".join(lines)


# --- the CUDA kernels ------------------------------------------------------------------------
@dataclass
class CudaRow:
    """One kernel instantiation of csrc/cuda, by ``nvcc -Xptxas -v``."""

    kernel: str
    arch: int
    registers: int
    spill_bytes: int
    shared_bytes: int
    error: str = ""


def cuda_rows(archs) -> list[CudaRow]:
    """Each kernel instantiation of ``csrc/cuda/*.cu``, compiled by ``nvcc -Xptxas -v``."""
    rows = []
    for arch in archs:
        for source in sorted(glob.glob(str(ROOT / "csrc" / "cuda" / "*.cu"))):
            with tempfile.TemporaryDirectory() as tmp:
                done = subprocess.run(
                    ["nvcc", "-c", "-O3", *_torch_flags(source), f"-arch=sm_{arch}", "-Xptxas",
                     "-v", source, "-o", os.path.join(tmp, "k.o")], capture_output=True,
                    text=True)
            text = done.stderr + done.stdout
            if done.returncode != 0:
                rows.append(CudaRow(os.path.basename(source), arch, -1, -1, -1,
                                    text.strip().splitlines()[-1][:200]))
                continue
            # ptxas prints, per function: "Compiling entry function '<mangled>'" then
            # "Used N registers, ... bytes smem" and "N bytes stack frame, N bytes spill ...".
            for name, body in re.findall(r"Compiling entry function '(\S+)'.*?\n(.*?)"
                                         r"(?=Compiling entry function|\Z)", text, re.S):
                regs = re.search(r"Used (\d+) registers", body)
                smem = re.search(r"(\d+) bytes smem", body)
                spill = re.findall(r"(\d+) bytes spill (?:stores|loads)", body)
                rows.append(CudaRow(demangled(name), arch, int(regs.group(1)) if regs else -1,
                                    sum(map(int, spill)), int(smem.group(1)) if smem else 0))
    return rows


def _torch_flags(source: str) -> list[str]:
    """nvcc's flags for a source: torch's headers for one that includes them (an elementwise
    op's file: kernel and registration)."""
    if not re.search(r"#include <(torch|ATen|c10)/", Path(source).read_text()):
        return ["-std=c++17"]
    from torch.utils.cpp_extension import include_paths
    return ["-std=c++20", *[f"-I{p}" for p in include_paths()],
            f"-I{sysconfig.get_paths()['include']}"]


def demangled(name: str) -> str:
    """The kernel and its element types from a mangled name: ``bn_apply_kernel<float>`` (primal
    and tangents of one type) or ``bn_apply_kernel<float,bf16>``; an elementwise select op's
    kernel (``select_kernel<Op<P>, T>``, csrc/cuda/select_op.cuh) by its op:
    ``relu_kernel<float,bf16>``."""
    if "13select_kernel" in name:
        return _select_kernel(name)
    kernel = re.search(r"\d+([a-z][a-z_]*_kernel)", name)
    arg = re.search(r"IL?(\w+?)EEv", name)
    types = _template_types(arg.group(1)) if arg else ["?"]
    label = types[0] if len(set(types)) == 1 else ",".join(types)
    return f"{kernel.group(1) if kernel else name}<{label}>"


_TYPES = {"f": "float", "d": "double", "__nv_bfloat16": "bf16", "__half": "half"}
_NAMES = {"float": "float", "double": "double", "__nv_bfloat16": "bf16", "__half": "half"}


def _select_kernel(name: str) -> str:
    """``select_kernel<ns::Op<P>, T>`` as ``op_kernel<P,T>`` (``<P>`` when T is P), read from
    c++filt's demangling (the mangled form of the op's struct depends on its namespace)."""
    done = subprocess.run(["c++filt", name], capture_output=True, text=True)
    found = re.search(r"select_kernel<[\w:() ]*::(\w+)<(\w+)>, (\w+)>", done.stdout)
    if done.returncode != 0 or not found:
        return name
    op, primal, tangent = found.group(1).lower(), _NAMES[found.group(2)], _NAMES[found.group(3)]
    return f"{op}_kernel<{primal if primal == tangent else f'{primal},{tangent}'}>"


def _template_types(args: str) -> list[str]:
    """The types of a mangled template argument list (``f``, ``13__nv_bfloat16S3_``, ...). A
    substitution (``S3_``) repeats a class type named before: here always the last one."""
    out, named, i = [], [], 0
    while i < len(args):
        if args[i].isdigit():
            j = i
            while args[j].isdigit():
                j += 1
            end = j + int(args[i:j])
            named.append(_TYPES.get(args[j:end], args[j:end]))
            out.append(named[-1])
            i = end
        elif args[i] == "S":
            out.append(named[-1] if named else "?")
            i = args.index("_", i) + 1
        else:
            out.append(_TYPES.get(args[i], args[i]))
            i += 1
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python tools/kernel_report.py",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS))
    parser.add_argument("--matrix", choices=("full", "quick", "resnet18"), default="full")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compiles (cores)")
    parser.add_argument("--json", type=Path, help="write every row and the summary here")
    parser.add_argument("--table", action="store_true", help="print every row as markdown")
    parser.add_argument("--cuda", action="store_true",
                        help="also the CUDA kernels of csrc/cuda (nvcc -Xptxas -v)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter replaces Triton's compiler")
    rows = report(args.arch, args.matrix, args.jobs)
    result = {"summary": summary(rows),
              "rows": [{**{k: v for k, v in asdict(r).items() if k != "key"},
                        "clean": r.clean()} for r in rows]}
    if args.cuda:
        result["cuda"] = [asdict(r) for r in cuda_rows(args.arch)]
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    if args.table:
        print(_table(rows))
    for r in rows:
        if not r.clean():
            print(f"NOT CLEAN sm_{r.arch} {r.case} launch {r.launch} {r.plan}: "
                  f"{asdict(r.compiled)}")
    print(json.dumps(result["summary"], indent=1))
    if args.cuda:
        bad = [r for r in result["cuda"] if r["error"] or r["spill_bytes"]]
        print(f"CUDA kernels: {len(result['cuda'])} instantiations, {len(bad)} with errors or "
              "spills")
    return 0 if all(r.clean() for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

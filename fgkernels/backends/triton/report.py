"""Resource report of the Triton kernels, compiled for real GPUs without one.

    python -m fgkernels.backends.triton.report [--arch 80 89 90] [--slots 1,1 4,4] [--json]

Triton's own compiler builds each kernel for each target (``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))``), for every tile config the convolution's autotuner may
keep for that slot count, float32 (tf32), bfloat16, and bfloat16 slots of a float32 primal
(``fp32+bf16``), batch-norm sums on and off; ``ptxas``'s
statistics give registers, spill (stack) bytes and shared memory, and the PTX shows which
tensor-core instruction the dots use (wgmma, mma, or none). The CUDA kernels of ``csrc/cuda``
are compiled with ``nvcc -Xptxas -v`` for the same targets (``--cuda``; needs nvcc). One row per
compile (a CUDA row per kernel instantiation). Run it where ``TRITON_INTERPRET`` is unset: the
interpreter replaces the compiler.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import asdict, dataclass

SLOT_COUNTS = [(0, 1), (1, 0), (1, 1), (2, 2), (4, 4), (8, 8), (16, 16)]
ARCHS = (80, 89, 90)
# The shared memory a block may use, per architecture (KiB): A100 163, Ada 99, H100 227.
SHARED_LIMIT_KIB = {80: 163, 86: 99, 89: 99, 90: 227}
_ELEM_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp32+bf16": 4}


@dataclass
class Row:
    kernel: str
    arch: int
    slots: str          # "TX+TP" (input slots + parameter slots)
    dtype: str
    bn_stats: bool
    config: str         # BLOCK_M x BLOCK_N x BLOCK_K, warps, stages
    registers: int
    spill_bytes: int
    shared_bytes: int
    shared_limit_bytes: int
    tensor_core: str    # wgmma / mma / none
    error: str = ""


def _conv_signature(dtype: str, tx: int, tp: int, bn_stats: bool, config) -> tuple[dict, dict]:
    """The argument types and constexprs of ``_dual_conv2d_forward_kernel`` for a launch with
    ``tx`` input and ``tp`` parameter slots (pointers of ``dtype``, or of its two parts for a
    mixed ``primal+tangent`` dtype; int32 sizes and strides)."""
    from .conv import _dual_conv2d_forward_kernel
    fn = _dual_conv2d_forward_kernel.fn
    names = fn.arg_names
    primal, _, tangent = dtype.partition("+")
    ptr, tptr = f"*{primal}", f"*{tangent or primal}"
    pointers = {"x_ptr": ptr, "xt_ptr": tptr, "w_ptr": ptr, "wt_ptr": tptr, "b_ptr": ptr,
                "bt_ptr": tptr, "y_ptr": ptr, "yt_ptr": tptr, "stats_ptr": "*fp32",
                "tstats_ptr": "*fp32"}
    constexprs = {
        "HAS_XT": tx > 0, "HAS_WT": tp > 0, "HAS_B": True, "HAS_BT": tp > 0,
        "P_ADD": False, "BN_STATS": bn_stats,
        "INPUT_PRECISION": "tf32" if primal == "fp32" else "ieee", "UPCAST": False,
        "MIXED": bool(tangent),
        **config.kwargs,
    }
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        else:
            signature[name] = pointers.get(name, "i32")
    return signature, constexprs


def kept_configs(dtype: str, shared_limit: int):
    """The configs the convolution's autotuner keeps on a device whose blocks may use
    ``shared_limit`` bytes (the same for every slot count: slots ride on the grid)."""
    from . import conv
    return conv.kept_configs(conv._configs(), _ELEM_BYTES[dtype], shared_limit, "+" in dtype)


def _tensor_core(ptx: str) -> str:
    if re.search(r"\bwgmma\.", ptx):
        return "wgmma"
    if re.search(r"\bmma\.sync", ptx):
        return "mma"
    return "none"


def compile_conv(arch: int, tx: int, tp: int, dtype: str, bn_stats: bool, config) -> Row:
    """Compile the fused convolution once and report its resources."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .conv import _dual_conv2d_forward_kernel
    signature, constexprs = _conv_signature(dtype, tx, tp, bn_stats, config)
    label = (f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']}x{config.kwargs['BLOCK_K']}"
             f" w{config.num_warps} s{config.num_stages}")
    limit = SHARED_LIMIT_KIB[arch] * 1024
    try:
        src = ASTSource(_dual_conv2d_forward_kernel.fn, signature, constexprs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": config.num_warps,
                                           "num_stages": config.num_stages})
        regs, spills, shared = _ptxas_info(compiled, arch)
        return Row("dual_conv2d", arch, f"{tx}+{tp}", dtype, bn_stats, label, regs, spills,
                   shared, limit, _tensor_core(compiled.asm["ptx"]))
    except Exception as e:  # a compile that fails is a row too
        return Row("dual_conv2d", arch, f"{tx}+{tp}", dtype, bn_stats, label, -1, -1, -1, limit,
                   "none", str(e).strip().splitlines()[0][:200])


def _ptxas_info(compiled, arch: int) -> tuple[int, int, int]:
    """Registers and stack (spill) bytes from ``ptxas -v`` on the compiled PTX, and the
    kernel's shared memory."""
    import subprocess
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas
    found = get_ptxas(arch)
    ptxas = found.path if hasattr(found, "path") else found[0]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(compiled.asm["ptx"])
        suffix = "a" if arch >= 90 else ""
        out = subprocess.run([ptxas, "-v", f"--gpu-name=sm_{arch}{suffix}", path, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    text = out.stderr + out.stdout
    regs = re.search(r"Used (\d+) registers", text)
    stack = re.search(r"(\d+) bytes stack frame", text)
    return (int(regs.group(1)) if regs else -1, int(stack.group(1)) if stack else -1,
            int(compiled.metadata.shared))


def cuda_rows(archs) -> list[Row]:
    """Each kernel instantiation of ``csrc/cuda/*.cu``, compiled by ``nvcc -Xptxas -v``."""
    import glob
    import subprocess
    import tempfile
    root = os.path.join(os.path.dirname(__file__), "..", "..", "..", "csrc", "cuda")
    rows = []
    for arch in archs:
        for source in sorted(glob.glob(os.path.join(root, "*.cu"))):
            with tempfile.TemporaryDirectory() as tmp:
                out = subprocess.run(
                    ["nvcc", "-c", "-O3", "-std=c++17", f"-arch=sm_{arch}", "-Xptxas", "-v",
                     source, "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True)
            text = out.stderr + out.stdout
            if out.returncode != 0:
                rows.append(Row(os.path.basename(source), arch, "-", "-", False, "-", -1, -1, -1,
                                SHARED_LIMIT_KIB[arch] * 1024, "none",
                                text.strip().splitlines()[-1][:200]))
                continue
            # ptxas prints, per function: "Compiling entry function '<mangled>'" then
            # "Used N registers, ... bytes smem" and "N bytes stack frame, N bytes spill ...".
            for name, body in re.findall(r"Compiling entry function '(\S+)'.*?\n(.*?)"
                                         r"(?=Compiling entry function|\Z)", text, re.S):
                regs = re.search(r"Used (\d+) registers", body)
                smem = re.search(r"(\d+) bytes smem", body)
                spill = re.search(r"(\d+) bytes spill stores", body)
                rows.append(Row(_demangled(name), arch, "-", "-", False, "-",
                                int(regs.group(1)) if regs else -1,
                                int(spill.group(1)) if spill else 0,
                                int(smem.group(1)) if smem else 0,
                                SHARED_LIMIT_KIB[arch] * 1024, "none"))
    return rows


def _demangled(name: str) -> str:
    """The kernel and its element types from a mangled name: ``bn_apply_kernel<float>`` (primal
    and tangents of one type) or ``bn_apply_kernel<float,bf16>``."""
    kernel = re.search(r"\d+([a-z][a-z_]*_kernel)", name)
    arg = re.search(r"IL?(\w+?)EEv", name)
    types = _template_types(arg.group(1)) if arg else ["?"]
    label = types[0] if len(set(types)) == 1 else ",".join(types)
    return f"{kernel.group(1) if kernel else name}<{label}>"


_TYPES = {"f": "float", "d": "double", "__nv_bfloat16": "bf16", "__half": "half"}


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


def report(archs, slot_counts, dtypes=("fp32", "bf16", "fp32+bf16"), bn=(False, True)) -> list[Row]:
    """Every (arch, slots, dtype, BN sums, kept config) compile."""
    rows = []
    for arch in archs:
        limit = SHARED_LIMIT_KIB[arch] * 1024
        for tx, tp in slot_counts:
            for dtype in dtypes:
                for config in kept_configs(dtype, limit):
                    for bn_stats in bn:
                        rows.append(compile_conv(arch, tx, tp, dtype, bn_stats, config))
    return rows


def _table(rows: list[Row]) -> str:
    head = ("kernel", "arch", "slots", "dtype", "bn", "config", "regs", "spill B", "smem KiB",
            "limit KiB", "tensor core", "error")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r.kernel} | sm_{r.arch} | {r.slots} | {r.dtype} | "
                     f"{'on' if r.bn_stats else 'off'} | {r.config} | {r.registers} | "
                     f"{r.spill_bytes} | {r.shared_bytes / 1024:.1f} | "
                     f"{r.shared_limit_bytes // 1024} | {r.tensor_core} | {r.error} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fgkernels.backends.triton.report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS),
                        choices=sorted(SHARED_LIMIT_KIB))
    parser.add_argument("--slots", nargs="+", default=[f"{a},{b}" for a, b in SLOT_COUNTS],
                        help="input,parameter slot counts, e.g. 4,4")
    parser.add_argument("--dtype", nargs="+", default=["fp32", "bf16", "fp32+bf16"],
                        choices=["fp32", "bf16", "fp16", "fp32+bf16"])
    parser.add_argument("--bn", nargs="+", default=["off", "on"], choices=["off", "on"])
    parser.add_argument("--cuda", action="store_true",
                        help="also the CUDA kernels of csrc/cuda (nvcc -Xptxas -v)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter replaces Triton's compiler")
    slots = [tuple(int(v) for v in s.split(",")) for s in args.slots]
    rows = report(args.arch, slots, tuple(args.dtype), tuple(b == "on" for b in args.bn))
    if args.cuda:
        rows += cuda_rows(args.arch)
    print(json.dumps([asdict(r) for r in rows], indent=1) if args.json else _table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())

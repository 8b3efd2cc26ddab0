"""Where a small model's dual pass spends its time: in torch's ops (ATen kernels called from
Python, the fgkernels ops included) or in Python, and which part of fgkernels' Python, by
cProfile.

    python benchmarks/profile_python_tax.py [--models resnet mobilenet_v3 efficientnet convnext]
                                            [--batches 1 16] [--passes 10]

Each ``tests/zoo.py`` model (width 16, eval, 32×32 input, every parameter and the input
carrying one tangent, converted) runs ``--passes`` dual passes under cProfile; a function's
own time (not its callees') is charged to torch's ops when it is a builtin (a C function:
ATen, the fgkernels ops, tensor methods), else to the Python file it is in. cProfile slows
Python calls down more than C ones, so the Python shares are upper bounds; the unprofiled time
per pass is printed beside them.
"""
from __future__ import annotations

import argparse
import copy
import cProfile
import pstats
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch

import fgkernels
from fgkernels import Dual

sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))
from allocator import keep_freed_memory  # noqa: E402
from zoo import MODELS  # noqa: E402  (tests/zoo.py)

PARTS = {  # fgkernels' Python files, named by what they do
    **{f"dual/{name}.py": "parameter substitution and module hooks"
       for name in ("passes", "tangent_store", "lifting", "module_state", "function_mode")},
    "nn/modules.py": "twins and fused sequences",
    "dual/slots.py": "slot planning and placement",
    "backends/bn_math.py": "batch-norm coefficients",
    "rules/checks.py": "argument checks",
    "rules/operands.py": "operand splitting",
    "dual/value.py": "Dual and dispatch",
}


def _part(filename: str, name: str) -> str:
    if filename == "~":  # a C function: "<built-in method torch.conv2d>", "<method 'add_' of
        # 'torch._C.TensorBase' objects>", "<built-in method builtins.isinstance>", ...
        return "torch ops (C)" if "torch" in name else "other C builtins"
    if "fgkernels/" in filename:
        rel = filename.split("fgkernels/", 1)[1]
        return "fgkernels: " + PARTS.get(rel, "op rules and backends")
    return "torch.nn and other Python"


def profile_pass(fn, passes: int) -> tuple[float, Counter]:
    """The unprofiled median time of ``fn`` and the profiled own time by part."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(passes):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(passes):
        fn()
    prof.disable()
    parts = Counter()
    for (filename, _, name), (_, _, own, _, _) in pstats.Stats(prof).stats.items():
        parts[_part(filename, name)] += own
    return statistics.median(times), parts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet", "mobilenet_v3",
                                                         "efficientnet", "convnext"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--passes", type=int, default=10)
    args = parser.parse_args(argv)
    keep_freed_memory()  # as the benchmarks time (allocator.py)
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads; shares of the profiled own time\n")
    for name in args.models:
        for batch in args.batches:
            torch.manual_seed(0)
            net = fgkernels.convert(copy.deepcopy(MODELS[name](16).eval()))
            fgkernels.random_tangents(net)
            x = torch.randn(batch, 3, 32, 32)
            xt = torch.randn_like(x)
            median, parts = profile_pass(lambda: net(Dual(x, xt)), args.passes)
            total = sum(parts.values())
            print(f"{name}, batch {batch}: {1e3 * median:.2f} ms a pass unprofiled")
            for part, own in parts.most_common():
                print(f"  {100 * own / total:5.1f} %  {part}")
            print()


if __name__ == "__main__":
    main()

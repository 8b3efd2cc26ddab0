"""Where a ResNet-18 dual pass spends its time: convolutions against everything else, for
fgkernels, for torch.autograd.forward_ad and for a backprop step, by torch.profiler.

    python benchmarks/profile_dual_pass.py [--batch 32] [--backend native|triton] [--passes 5]
                                           [--channels-last] [--dtype bfloat16] [--top N]
                                           [--python N]

The convolutions are counted where ATen runs them (the reference and native backends, and
forward_ad) and, on the triton backend, as the device time of the fused convolution's
kernels, whose epilogue also sums the batch-norm statistics.

Both passes compute the same convolution FLOPs (three convolutions per layer: the primal, the
input term and the parameter term), and so does a backprop step (the primal, the input's and the
weight's gradients), so the convolutions' time bounds what fusing the rest can win: the last
lines give the ratios to forward_ad and to a backprop step that fgkernels would reach if every
operation but the convolutions took no time, and its convolutions' time against the backprop
step's. A large GEMM's FLOP rate is printed for scale.

``--top N`` adds, per provider, the time the device was busy (the sum of its kernels' own
times: a pass far longer than that waits on the host), the kernels it launched, the
host-device synchronisations it made, and the N operations that took the most device time
(CPU time without a GPU). ``--python N`` adds, per provider, the N functions (Python, and C
builtins such as the ops' entry points) where the host spends the most time, by cProfile.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

import fgkernels
from fgkernels import Dual

from allocator import keep_freed_memory
from cases import resnet18_case
from providers import loss_backprop_step, loss_jvp_forward_ad


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def profile_call(fn, device: torch.device) -> dict[str, float]:
    """One call of ``fn``: its wall time, the time inside convolutions, and the FLOPs of the
    convolutions called as ``aten::conv2d`` (all of fgkernels'; forward_ad calls its tangent
    convolutions below it, uncounted: NaN)."""
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda"
                                           else [])
    with profile(activities=activities, with_flops=True) as prof:
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        wall = time.perf_counter() - start
    averages = prof.key_averages()
    events = {event.key: event for event in averages}
    # aten::_convolution sits below autograd and forward-mode AD and above the backend kernel
    # (oneDNN, cuDNN): its inclusive time is the convolutions' own, for both passes alike.
    conv = events.get("aten::_convolution")
    # A backprop step's backward convolutions (input and weight gradients, one op) count too.
    conv_events = [event for event in (conv, events.get("aten::convolution_backward"))
                   if event is not None]
    conv_us = sum(event.device_time_total if device.type == "cuda" else event.cpu_time_total
                  for event in conv_events)
    # The Triton backend's fused convolution: its kernels' device time.
    conv_us += sum(event.device_time_total for key, event in events.items()
                   if "_dual_conv2d_forward_kernel" in key)
    conv2d = events.get("aten::conv2d")
    counted = conv is not None and conv2d is not None and conv2d.count == conv.count and \
        "aten::convolution_backward" not in events
    on_device = device.type == "cuda"
    # Nothing counted twice: on a GPU the device's own events (kernels, copies, fills; an op's
    # device time is its kernels'), on a CPU the ops' self times.
    own_us = {key: event.self_device_time_total for key, event in events.items()
              if event.device_type == DeviceType.CUDA} if on_device else \
        {key: event.self_cpu_time_total for key, event in events.items()}
    syncs = sum(event.count for key, event in events.items()
                if key in ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpyAsync"))
    return {"total_ms": wall * 1e3, "conv_ms": conv_us / 1e3,
            "conv_calls": sum(event.count for event in conv_events),
            "gflop": conv2d.flops / 1e9 if counted else float("nan"),
            "busy_ms": sum(own_us.values()) / 1e3 if on_device else float("nan"),
            "syncs": syncs, "launches": sum(event.count for key, event in events.items()
                                            if "LaunchKernel" in key),
            "own_ms": {key: us / 1e3 for key, us in own_us.items() if us > 0}}


def profile_alternating(fns: dict, device: torch.device, passes: int) -> dict[str, dict]:
    """``profile_call`` of each of ``fns`` ``passes`` times, taking turns (so that a machine
    whose speed drifts slows them alike), after two warm-up calls of each (the first calls
    choose oneDNN / cuDNN kernels and fault in memory); the mean per name."""
    for _ in range(2):
        for fn in fns.values():
            fn()
    runs = {name: [] for name in fns}
    for _ in range(passes):
        for name, fn in fns.items():
            runs[name].append(profile_call(fn, device))
    return {name: {key: _mean([r[key] for r in rs]) for key in rs[0]}
            for name, rs in runs.items()}


def _mean(values: list):
    """The mean of numbers, or of dicts of numbers key by key (a missing key counts 0)."""
    if isinstance(values[0], dict):
        keys = set().union(*values)
        return {key: sum(v.get(key, 0.0) for v in values) / len(values) for key in keys}
    return sum(values) / len(values)


def gemm_gflops(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """The FLOP rate of an n×n float32 matrix product (best of ``repeats``)."""
    a, b = (torch.randn(n, n, device=device) for _ in range(2))
    a @ b
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best / 1e9


def profile_resnet18(batch: int = 32, backend: Optional[str] = None, passes: int = 5,
                     device: Optional[torch.device] = None, quick: bool = False,
                     channels_last: bool = False, dtype: torch.dtype = torch.float32) -> dict:
    """``profile_alternating`` of the fgkernels and the forward_ad loss JVP and of a backprop
    step, and the conv FLOPs of one primal pass (``resnet18_case``'s network and batch in
    ``dtype``; ``backend``: native where built; ``channels_last``: the network and its input
    so laid out)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if backend == "triton" and device.type != "cuda":
        raise ValueError("the triton backend's kernels are profiled on a GPU only (the "
                         "interpreter is no timing)")
    model, x, y = resnet18_case(quick, batch, dtype, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    params = {n: p.detach() for n, p in model.named_parameters()}
    tangents = {n: torch.randn_like(p) for n, p in params.items()}
    backend = backend or ("native" if "native" in fgkernels.available_backends()
                          else "reference")
    with torch.no_grad():
        primal = profile_call(lambda: model(x), device)
    fgkernels.set_tangents(model, tangents)

    def ours():
        with fgkernels.use_backend(backend):
            return F.cross_entropy(model(Dual(x)), y)

    calls = {"fgkernels": ours,
             "forward_ad": lambda: loss_jvp_forward_ad(model, params, tangents, x, y),
             "backprop": lambda: loss_backprop_step(model, x, y)}
    r = profile_alternating(calls, device, passes)
    return {"backend": backend, "device": device, "primal_gflop": primal["gflop"],
            "calls": calls, **r}


def python_profile(fn, device: torch.device, passes: int, top: int) -> list[str]:
    """Where the host's time in ``passes`` calls of ``fn`` goes, by cProfile: the ``top``
    functions by own time (a builtin's is the C code it runs: an op's dispatch and, on a GPU,
    its launches), per call of ``fn``. cProfile slows Python calls more than C ones."""
    fn()
    _sync(device)
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for _ in range(passes):
        fn()
    profiler.disable()
    _sync(device)
    wall = (time.perf_counter() - start) / passes
    stats = pstats.Stats(profiler).stats
    rows = sorted(stats.items(), key=lambda kv: -kv[1][2])[:top]
    lines = [f"  host, profiled: {wall * 1e3:.1f} ms a pass; own ms a pass, calls a pass, "
             "function"]
    for (path, line, name), (_, calls, own, _, _) in rows:
        where = name if path == "~" else f"{'/'.join(Path(path).parts[-2:])}:{line} {name}"
        lines.append(f"  {own / passes * 1e3:8.3f} {calls / passes:7.0f}  {where[:90]}")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--backend", choices=("reference", "native", "triton"), default=None,
                        help="default: native where built")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="the network's and its input's dtype")
    parser.add_argument("--passes", type=int, default=5, help="passes profiled per provider")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--top", type=int, default=0, metavar="N",
                        help="also print each provider's N costliest operations")
    parser.add_argument("--python", type=int, default=0, metavar="N",
                        help="also print each provider's N Python and C functions that take "
                        "the most host time (cProfile)")
    args = parser.parse_args(argv)
    keep_freed_memory()  # as the benchmarks time (allocator.py)
    r = profile_resnet18(args.batch, args.backend, args.passes, torch.device(args.device),
                         channels_last=args.channels_last, dtype=getattr(torch, args.dtype))
    ours, theirs, backprop, device = r["fgkernels"], r["forward_ad"], r["backprop"], r["device"]

    where = f"{torch.get_num_threads()} threads" if device.type == "cpu" else \
        torch.cuda.get_device_name(device)
    layout = "channels_last" if args.channels_last else "NCHW"
    print(f"ResNet-18 loss JVP, batch {args.batch}, {args.dtype} {layout}, {device.type} "
          f"({where}), mean of {args.passes} profiled passes each, taking turns")
    print(f"{'':24}{'total ms':>10}{'conv ms':>10}{'other ms':>10}{'conv GFLOP':>12}"
          f"{'conv GFLOP/s':>14}")
    for name, p in ((f"fgkernels ({r['backend']})", ours), ("forward_ad", theirs),
                    ("backprop step", backprop)):
        print(f"{name:24}{p['total_ms']:10.1f}{p['conv_ms']:10.1f}"
              f"{p['total_ms'] - p['conv_ms']:10.1f}{p['gflop']:12.1f}"
              f"{p['gflop'] / p['conv_ms'] * 1e3:14.0f}")
    print(f"fgkernels' convolutions: {ours['gflop'] / r['primal_gflop']:.2f}× the primal pass's "
          f"{r['primal_gflop']:.1f} GFLOP; a 2048² float32 GEMM runs at "
          f"{gemm_gflops(device):.0f} GFLOP/s")
    print(f"fgkernels / forward_ad: {ours['total_ms'] / theirs['total_ms']:.2f}×; with every "
          f"non-convolution op free: {ours['conv_ms'] / theirs['total_ms']:.2f}×")
    print(f"fgkernels / a backprop step: {ours['total_ms'] / backprop['total_ms']:.2f}×; with "
          f"every non-convolution op free: {ours['conv_ms'] / backprop['total_ms']:.2f}×; the "
          f"three convolutions of each layer: {ours['conv_ms'] / backprop['conv_ms']:.2f}× the "
          "backprop step's (the primal, the input's and the weight's gradients)")
    if args.top:
        for name, p in ((f"fgkernels ({r['backend']})", ours), ("forward_ad", theirs),
                        ("backprop step", backprop)):
            print(f"{name}: device busy {p['busy_ms']:.1f} of {p['total_ms']:.1f} ms, "
                  f"{p['launches']:.0f} kernel launches and {p['syncs']:.0f} host-device "
                  "synchronisations or copies per pass")
            for key, ms in sorted(p["own_ms"].items(), key=lambda kv: -kv[1])[:args.top]:
                print(f"  {ms:9.2f} ms  {key[:100]}")
    if args.python:
        for name, fn in r["calls"].items():
            print(f"{name}: the host's time by function")
            print("\n".join(python_profile(fn, device, args.passes, args.python)))


if __name__ == "__main__":
    main()

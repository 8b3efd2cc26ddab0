"""Shared machinery of the benchmark suites.

``pytest benchmarks/ --benchmark-json=out.json`` times every provider of a case side by side
(one benchmark group per case) and records its peak memory, as the allocator saw it, in
``extra_info``. With ``--benchmark-disable`` (as CI runs them) every case runs once at a tiny
size, so the suites never rot, and nothing is judged.
"""
import os
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The small model builds of tests/zoo.py are test support that the benchmarks share.
sys.path.append(str(Path(__file__).resolve().parents[1] / "tests"))

import fgkernels  # noqa: E402
from fgkernels.dual.passes import hooks_set_aside  # noqa: E402
from fgkernels.train.memory import PeakMemory  # noqa: E402

from allocator import keep_freed_memory  # noqa: E402
from providers import BASELINES, check_against_oracle  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
STEADY_ALLOCATOR = False


def pytest_configure(config):
    # When timing, every call reuses memory already mapped, whatever ran before it
    # (allocator.py); the quick run, which times nothing, leaves the allocator as it is.
    global STEADY_ALLOCATOR
    if not config.getoption("benchmark_disable"):
        STEADY_ALLOCATOR = keep_freed_memory()


def pytest_benchmark_update_machine_info(config, machine_info):
    import triton
    machine_info["torch"] = torch.__version__
    machine_info["triton"] = triton.__version__
    machine_info["threads"] = torch.get_num_threads()
    machine_info["device"] = (torch.cuda.get_device_name() if DEVICE.type == "cuda"
                              else "CPU")
    machine_info["fgkernels_backends"] = fgkernels.available_backends()
    machine_info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    machine_info["fast_bfloat16"] = fgkernels.dual.precision.fast_bfloat16(DEVICE)
    # AMX: oneDNN computes bfloat16 in its tiles (and convolve() takes its tiny-map GEMMs)
    machine_info["amx"] = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    machine_info["steady_allocator"] = STEADY_ALLOCATOR


@pytest.fixture(scope="session")
def quick(request) -> bool:
    """True when timing is off: run each case once, at its smallest size."""
    return bool(request.config.getoption("benchmark_disable"))


def skip_emulated_bfloat16(quick: bool) -> None:
    """Skip a bfloat16 timing where the device has no bfloat16 instructions (an AVX2 CPU):
    emulated bfloat16 is no speed figure. The quick run still checks the case's result."""
    if not quick and not fgkernels.dual.precision.fast_bfloat16(DEVICE):
        pytest.skip("no bfloat16 instructions here: an emulated bfloat16 time is not published")


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def _timed_call(fn) -> float:
    _sync()
    start = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - start


@pytest.fixture
def measure(benchmark, quick, request):
    """``measure(fn, group, rounds)``: time ``fn`` (synchronised) and store its peak memory."""

    def run(fn, group: str, rounds: int = 5, budget_s: float = 1.0, paired=None,
            track_memory: bool = True, expected=None, tolerance=None):
        """At least ``rounds`` rounds; more for fast cases, up to about ``budget_s`` of timing
        (at most 100 rounds): the median of a few ms-long calls needs many of them.

        ``paired={name: baseline_fn}``: the baselines also run right before every round of
        ``fn`` (outside the benchmark's timing), and for each the median of the per-round
        ratios goes to ``extra_info["paired"][name]``: on a machine whose speed drifts over
        minutes, a ratio of neighbouring calls is steadier than one of two benchmarks run
        minutes apart. The peak memory is the allocator's (``PeakMemory``: on the CPU the
        profiler's memory events, so one untimed extra call); ``track_memory=False`` skips it.
        ``expected``: the float64 oracle's ``(primal, tangent)``, which the quick run checks
        ``fn``'s result against (``providers.check_against_oracle``, within ``tolerance``)."""
        benchmark.group = group
        params = getattr(request.node, "callspec", None)
        provider = params.params.get("provider", params.params.get("algo", "fgkernels")) \
            if params else ""
        if quick and expected is not None:
            check_against_oracle(provider, fn(), expected, tolerance)
        paired = paired or {}
        # A baseline runs as in a process without fgkernels: without its global module hooks,
        # which a tangent set on the dual pass's model keeps registered.
        plain = lambda name: hooks_set_aside() if name in BASELINES else nullcontext()
        for name, baseline_fn in paired.items():
            with plain(name):
                baseline_fn()  # warm-up
        with plain(provider):
            fn()  # warm-up: autotuning, allocator, oneDNN primitive caches
            once = _timed_call(fn)
        rounds = max(rounds, min(100, int(budget_s / max(once, 1e-6))))
        if track_memory:
            with plain(provider), PeakMemory(DEVICE) as mem:
                fn()
            benchmark.extra_info["peak_memory_bytes"] = mem.peak_bytes
        if DEVICE.type == "cuda" and not quick:
            import triton.testing
            with plain(provider):
                q = triton.testing.do_bench(fn, quantiles=[0.2, 0.5, 0.8], return_mode="median")
            benchmark.extra_info["do_bench_ms_q20_q50_q80"] = list(q)

        fn_s, base_s = [], {name: [] for name in paired}

        def baselines():
            for name, baseline_fn in paired.items():
                with plain(name):
                    base_s[name].append(_timed_call(baseline_fn))

        def timed():
            with plain(provider):
                fn_s.append(_timed_call(fn))

        warmup = 0 if quick else 1
        benchmark.pedantic(timed, setup=baselines, rounds=1 if quick else rounds, iterations=1,
                           warmup_rounds=warmup)
        if paired and not quick:
            benchmark.extra_info["paired"] = {
                name: {"ratio": statistics.median(ratios), "ratios": ratios,
                       "baseline_median_s": statistics.median(times[warmup:])}
                for name, times in base_s.items()
                for ratios in [sorted(f / b for f, b in zip(fn_s[warmup:], times[warmup:]))]}

    return run

"""The fused Triton convolution compiled for real GPUs (Triton's own compiler and ptxas, no GPU
needed): every config the autotuner keeps fits the target's shared memory and spills nothing,
whatever the slot count and for bfloat16 slots of a float32 primal too, and on sm_90 its dots
use wgmma. Skipped where Triton's compiler cannot run."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ARCHS = ("80", "90")
SLOTS = ("1,1", "16,16", "0,1")
DTYPES = ("fp32", "bf16", "fp32+bf16")


@pytest.fixture(scope="module")
def rows():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "fgkernels.backends.triton.report", "--json",
                          "--arch", *ARCHS, "--slots", *SLOTS, "--dtype", *DTYPES,
                          "--bn", "on"], capture_output=True, text=True, env=env, timeout=1500)
    if run.returncode != 0 and "ptxas" in run.stderr:
        pytest.skip(f"Triton's compiler cannot run here: {run.stderr.splitlines()[-1]}")
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


def test_every_kept_config_compiles_for_every_arch_and_slot_count(rows):
    seen = {(r["arch"], r["slots"], r["dtype"]) for r in rows}
    assert seen == {(int(a), s.replace(",", "+"), d) for a in ARCHS for s in SLOTS
                    for d in DTYPES}
    assert [r for r in rows if r["error"]] == []


def test_no_config_spills_registers(rows):
    assert [(r["arch"], r["slots"], r["dtype"], r["config"], r["spill_bytes"]) for r in rows
            if r["spill_bytes"] != 0] == []


def test_shared_memory_fits_every_target_and_does_not_grow_with_slots(rows):
    assert all(0 < r["shared_bytes"] <= r["shared_limit_bytes"] for r in rows)
    for arch in ARCHS:
        by_slots = {s: sorted((r["dtype"], r["config"], r["shared_bytes"], r["registers"])
                              for r in rows if r["arch"] == int(arch) and r["slots"] == s)
                    for s in ("1+1", "16+16")}
        assert by_slots["1+1"] == by_slots["16+16"]


def test_dots_use_wgmma_on_sm90(rows):
    sm90 = [r for r in rows if r["arch"] == 90]
    assert sm90 and all(r["tensor_core"] == "wgmma" for r in sm90), \
        [(r["config"], r["dtype"], r["tensor_core"]) for r in sm90]


def test_the_pruner_reads_the_device_limit(monkeypatch):
    """Configs whose pipeline exceeds the device's shared memory are not tried; the limit is
    read when the autotuner prunes, not fixed."""
    from fgkernels.backends.triton import conv
    configs = conv._configs()
    monkeypatch.setattr(conv, "_device_shared_limit", lambda: 0)
    assert conv._prune(configs, {}) == configs[-1:]  # nothing fits: the smallest is kept
    monkeypatch.setattr(conv, "_device_shared_limit", lambda: None)
    assert conv._prune(configs, {}) == configs
    limit = min(conv.shared_bytes(c, 4) for c in configs)
    monkeypatch.setattr(conv, "_device_shared_limit", lambda: limit)
    assert all(conv.shared_bytes(c, 4) <= limit for c in conv._prune(configs, {}))


def test_cuda_kernels_compile_without_spills():
    """csrc/cuda's kernels, by nvcc -Xptxas -v, for sm_80 and sm_90 (skipped without nvcc)."""
    import shutil
    if shutil.which("nvcc") is None:
        pytest.skip("needs nvcc")
    from fgkernels.backends.triton.report import cuda_rows
    rows = cuda_rows([80, 90])
    kernels = {r.kernel for r in rows}
    for name in ("bn_stats_kernel", "bn_apply_kernel", "relu_kernel"):
        for t in ("float", "double", "bf16", "half", "float,bf16", "float,half", "double,float"):
            assert f"{name}<{t}>" in kernels, sorted(kernels)
    assert all(not r.error and r.spill_bytes == 0 and r.registers > 0 for r in rows), rows

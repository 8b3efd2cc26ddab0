"""The GPU kernels compiled for real GPUs without one, as the launchers launch them.

``tools/kernel_report.py --matrix quick`` runs the launchers on ``meta`` tensors for sm_80,
sm_89 and sm_90, binds each launch with Triton's own binder and compiles it with
``triton.compile``: the convolution in every dtype (TF32 and full-precision float32, bfloat16,
float16, bfloat16 slots of a float32 primal), slot role, layout and batch-norm mode of the
sample, and the batch-norm apply at a shape whose slots pass 2³¹ elements. These tests hold
every launch to the report's gates and check the launches each earlier defect was seen in.
Skipped where Triton's compiler cannot run.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
ARCHS = (80, 89, 90)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(ROOT / "tools" / "kernel_report.py"), "--matrix",
                          "quick", "--arch", *map(str, ARCHS), "--json", str(out)],
                         capture_output=True, text=True, env=env, timeout=3000)
    if not out.exists() and "ptxas" in run.stderr:
        pytest.skip(f"Triton's compiler cannot run here: {run.stderr.splitlines()[-1]}")
    assert out.exists(), run.stderr[-3000:]
    return json.loads(out.read_text())


def rows(report, case_prefix="", arch=None):
    found = [r for r in report["rows"] if r["case"].startswith(case_prefix)
             and (arch is None or r["arch"] == arch)]
    assert found, case_prefix
    return found


def failures(rows_, check):
    return [(r["arch"], r["case"], r["launch"], r["plan"], r["compiled"]) for r in rows_
            if not check(r)]


def test_every_launch_is_clean(report):
    """Compiles, no spill (ptxas and SASS), registers below the ceiling, shared memory within
    the target's, 64-bit base offsets; every reduction on the tensor cores, pipelined."""
    assert {r["arch"] for r in report["rows"]} == set(ARCHS)
    assert failures(report["rows"], lambda r: r["clean"]) == []


def test_mixed_precision_parameter_slots_compile(report):
    """bfloat16 parameter slots of a float32 primal (once: "Both operands must be same dtype"
    at the first convolution of any network with bfloat16 tangents)."""
    found = rows(report, "c64x56 fp32+bf16 paramx1")
    assert {r["arch"] for r in found} == set(ARCHS)
    assert failures(found, lambda r: not r["compiled"]["error"]) == []


def test_channels_last_float32_does_not_spill_on_sm80(report):
    found = [r for r in rows(report, arch=80) if "fp32 " in r["case"]
             and "channels_last" in r["case"]]
    assert failures(found, lambda r: r["compiled"]["spill_bytes"] == 0
                    and r["compiled"]["local_instructions"] == 0) == []


def test_full_precision_float32_runs_on_the_tensor_cores_without_spilling(report):
    """cuDNN's 'ieee' float32: three TF32 products on the tensor cores (once: plain float32
    FMAs, and 1.1 KiB of spills)."""
    found = rows(report, "c64x56 fp32-ieee")
    assert {r["arch"] for r in found} == set(ARCHS)
    assert failures(found, lambda r: r["compiled"]["tensor_core"] != "none"
                    and r["compiled"]["spill_bytes"] == 0) == []


def test_batch_norm_apply_offsets_are_64_bit_past_2_31_elements(report):
    """The apply's slots together pass 2³¹ elements (256×64×112×112, 16 slots): every slot's
    offset t·numel is computed in 64 bits (once: in 32, wrapping at slot 11)."""
    found = [r for r in rows(report, "bn_apply") if r["slot_elements"] >= 2 ** 31]
    assert {r["arch"] for r in found} == set(ARCHS)
    assert failures(found, lambda r: r["compiled"]["narrow_base_offsets"] == 0) == []


def test_every_reduction_is_software_pipelined(report):
    """Asynchronous copies in the reduction loop (num_stages does what it says), and on sm_90
    a wgmma left in flight while the next tiles arrive, except with split-float32 products
    (their low parts are computed from the registers of the previous step)."""
    conv = [r for r in report["rows"] if r["reduction"]]
    assert failures(conv, lambda r: r["compiled"]["async_copies"] > 0) == []
    sm90 = [r for r in conv if r["arch"] == 90 and "ieee" not in r["case"]]
    assert failures(sm90, lambda r: r["compiled"]["wgmma_wait_depth"] >= 1) == []


def test_shared_memory_model_matches_the_compiled_kernels(report):
    """conv_plan.shared_bytes, which plans the pipeline depth, is what Triton allocates."""
    conv = [r for r in report["rows"] if r["reduction"]]
    assert failures(conv, lambda r: r["modelled_shared_bytes"]
                    == r["compiled"]["shared_bytes"]) == []


def test_column_tiles_fit_c_out(report):
    """No 128-column tile on a 64-channel output (half of each product would be padding)."""
    found = [r for r in rows(report, "c64x56") if r["reduction"]]
    assert all(r["plan"].split("x")[1] == "64" for r in found), [r["plan"] for r in found]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
def test_cuda_kernels_compile_without_spills():
    """csrc/cuda's kernels, every instantiation, by nvcc -Xptxas -v for sm_80 and sm_90."""
    from kernel_report import cuda_rows
    found = cuda_rows([80, 90])
    kernels = {r.kernel for r in found}
    for name in ("bn_stats_kernel", "bn_stats_channels_last_kernel", "bn_apply_kernel",
                 "relu_kernel"):
        for t in ("float", "double", "bf16", "half", "float,bf16", "float,half", "double,float"):
            assert f"{name}<{t}>" in kernels, sorted(kernels)
    for t in ("float", "double"):  # the per-channel kernels, per accumulation type
        for name in ("bn_stats_finalize_kernel", "bn_coefficients_kernel"):
            assert f"{name}<{t}>" in kernels, sorted(kernels)
    for t in ("float", "double", "bf16", "half"):  # per dtype of x; of the running statistics
        for name in ("bn_shift_kernel", "bn_running_stats_kernel"):
            assert f"{name}<{t}>" in kernels, sorted(kernels)
    assert all(not r.error and r.spill_bytes == 0 and r.registers > 0 for r in found), found

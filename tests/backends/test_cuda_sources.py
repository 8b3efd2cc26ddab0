"""The CUDA sources compile, also on a machine without a GPU: the batch-norm kernels with bare
nvcc (they include no torch header), the elementwise ops (kernel and registration in one file)
with nvcc against torch's headers, the batch-norm registration glue with the host compiler."""
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest
from torch.utils.cpp_extension import include_paths

from fgkernels.backends.native.backend import NativeBackend

CUDA_DIR = Path(__file__).resolve().parents[2] / "csrc" / "cuda"
TORCH_INCLUDES = [*[f"-I{p}" for p in include_paths()], f"-I{sysconfig.get_paths()['include']}"]


def _includes_torch(source: Path) -> bool:
    return re.search(r"#include <(torch|ATen|c10)/", source.read_text()) is not None


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not found")
@pytest.mark.parametrize("source", sorted(CUDA_DIR.glob("*.cu")), ids=lambda p: p.name)
def test_kernel_compiles_with_nvcc(source, tmp_path):
    torch_flags = ["-std=c++20", *TORCH_INCLUDES] if _includes_torch(source) else ["-std=c++17"]
    cmd = ["nvcc", *torch_flags, "-O3", "-gencode=arch=compute_90,code=sm_90",
           "-gencode=arch=compute_80,code=sm_80", "-c", str(source), "-o",
           str(tmp_path / "kernel.o")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not found")
@pytest.mark.parametrize("source", sorted(CUDA_DIR.glob("*.cpp")), ids=lambda p: p.name)
def test_registration_glue_compiles(source):
    cmd = ["g++", "-std=c++20", "-fsyntax-only", *TORCH_INCLUDES, str(source)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_declared_batch_norm_slot_limit_is_the_kernels():
    """NativeBackend routes a CUDA batch norm past the apply kernel's slot map to the reference
    backend: the limit it declares must be the one the kernel is compiled with."""
    header = (CUDA_DIR / "dual_kernels.h").read_text()
    k_max_slots = int(re.search(r"constexpr int kMaxSlots = (\d+);", header).group(1))
    assert NativeBackend.MAX_BN_SLOTS["cuda"] == k_max_slots

"""Builds fgkernels._C, the native backend's ops: csrc/*.cpp and csrc/cpu/*.cpp, plus the CUDA
kernels of csrc/cuda/ when torch is a CUDA build and a CUDA toolkit is found.

Environment:
  FGKERNELS_CUDA=0|1      0: CPU kernels only; 1: the CUDA kernels too, or stop saying why not.
                          Unset: the CUDA kernels when torch is a CUDA build and nvcc is found.
                          (FORCE_CUDA=1, as torchvision reads it, means FGKERNELS_CUDA=1.)
  TORCH_CUDA_ARCH_LIST    the GPU architectures (default: "8.0;8.6;8.9;9.0+PTX"), no GPU needed.
  FGKERNELS_NATIVE_ARCH=1 CPU code for the building machine only (-march=native); by default it
                          runs on any x86-64 CPU and picks AVX2 or AVX-512 loops at run time.
  MAX_JOBS                parallel compile jobs (read by torch.utils.cpp_extension).
"""
import glob
import os
import sys
from typing import Optional

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

# Ampere (A100, A10/RTX 30), Ada (L4/RTX 40), Hopper (H100) and PTX for what comes after: the
# archs torch's own arch detection would need a GPU to choose.
DEFAULT_CUDA_ARCHS = "8.0;8.6;8.9;9.0+PTX"


def _flag(name: str) -> Optional[bool]:
    """An on/off environment switch: True, False, or None when unset."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value in ("1", "true", "on", "yes"):
        return True
    if value in ("0", "false", "off", "no"):
        return False
    sys.exit(f"error: {name}={os.environ[name]!r}: use 1 or 0")


def _build_cuda() -> bool:
    wanted = _flag("FGKERNELS_CUDA")
    if wanted is None and os.environ.get("FORCE_CUDA") == "1":
        wanted = True
    if wanted is False:
        return False
    # (torch's CUDA_HOME is None beside a CPU build of torch, whatever toolkit is installed:
    # the toolkit is news only beside a CUDA build)
    missing = [f"torch {torch.__version__} is a CPU build"] if torch.version.cuda is None else \
        ["no CUDA toolkit was found (set CUDA_HOME, or put nvcc on the PATH)"] \
        if CUDA_HOME is None else []
    if wanted and missing:
        sys.exit(f"error: FGKERNELS_CUDA=1, but {' and '.join(missing)}. "
                 f"FGKERNELS_CUDA=0 builds the CPU kernels only.")
    if not missing and not glob.glob(os.path.join(CUDA_HOME, "lib64", "libcudart.so*")):
        # torch takes CUDA_HOME, else the parent of the nvcc on the PATH (a wrapper script
        # there points elsewhere), else /usr/local/cuda: stop now rather than at the link.
        sys.exit(f"error: the CUDA toolkit torch found, {CUDA_HOME}, has no lib64/libcudart.so: "
                 f"set CUDA_HOME to the toolkit's folder (the one holding bin/nvcc and lib64), "
                 f"or FGKERNELS_CUDA=0 to build the CPU kernels only.")
    return not missing


def _openmp_flags() -> list[str]:
    """-fopenmp (GCC on Linux) when torch parallelises with OpenMP: ``at::parallel_for`` is a
    header template that runs serially in code compiled without it."""
    openmp = "parallel backend: OpenMP" in torch.__config__.parallel_info()
    return ["-fopenmp"] if openmp and sys.platform.startswith("linux") else []


def _cxx_flags() -> list[str]:
    # The CPU kernels are plain loops the compiler vectorises (`omp simd` marks the reductions);
    # csrc/cpu/isa.h compiles the hot ones for several x86-64 levels, chosen at load time.
    # 256-bit vectors even on AVX-512: wider ones lose on the short per-channel planes of small
    # feature maps (a tuning choice: it changes no instruction set).
    # -g0: no debug information (Python's own flags ask for it): a quicker build, a smaller .so.
    flags = ["-O3", "-g0", "-fopenmp-simd"]
    if sys.platform.startswith("linux") and _flag("FGKERNELS_NATIVE_ARCH"):
        flags += ["-march=native", "-DFGK_NATIVE_ARCH"]
    if os.uname().machine == "x86_64":
        flags += ["-mprefer-vector-width=256"]
    return flags + _openmp_flags()


def _extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx, link = _cxx_flags(), _openmp_flags()
    # the torch this builds against, fgkernels._C.TORCH_VERSION (checked when it loads)
    built_with = [("FGK_TORCH_VERSION", torch.__version__)]
    if not _build_cuda():
        return CppExtension("fgkernels._C", sources, extra_compile_args={"cxx": cxx},
                            extra_link_args=link, define_macros=built_with)
    # torch reads the arch list when it compiles; with no list and no GPU its own detection
    # finds nothing to build for.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    # torch defines these for every .cu file; the kernels are plain CUDA (as the tests compile
    # them, with bare nvcc) and use the half and bfloat16 types' own conversions and operators.
    nvcc = ["-O3", *(f"-U__CUDA_NO_{name}__" for name in (
        "HALF_OPERATORS", "HALF_CONVERSIONS", "HALF2_OPERATORS", "BFLOAT16_CONVERSIONS"))]
    return CUDAExtension("fgkernels._C", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                         extra_link_args=link, define_macros=built_with)


def _runtime_torch() -> str:
    """The torch releases the compiled extension runs with: those of the torch it was built
    against (its C++ ABI changes between minor releases)."""
    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    return f"torch>={major}.{minor},<{major}.{minor + 1}"


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
    # One build folder per torch: environments with different torch releases built from one
    # checkout (.venv and .venv-models) each recompile only what changed for their own.
    options={"build": {"build_base": f"build/torch-{torch.__version__}"}},
    install_requires=[
        _runtime_torch(),
        "numpy",
        # The Triton backend, as tested: 3.6 (with numpy < 2.4, which its interpreter needs;
        # scripts/setup.sh pins both) to 3.8. 3.9's interpreter refuses the kernels' masks
        # ("mask has unsupported dtype").
        "triton>=3.6,<3.9; platform_system == 'Linux'",
    ],
)

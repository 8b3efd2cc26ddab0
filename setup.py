"""Builds fgkernels._C: a CppExtension from csrc/*.cpp and csrc/cpu/*.cpp, and a CUDAExtension
adding csrc/cuda/* when a CUDA toolkit and a CUDA build of torch are present (or FORCE_CUDA=1).
MAX_JOBS bounds the parallel compile jobs, as torch.utils.cpp_extension reads it;
FGKERNELS_PORTABLE=1 builds for any CPU of the architecture instead of this one."""
import glob
import os
import sys

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def _use_cuda() -> bool:
    if os.environ.get("FORCE_CUDA") == "1":
        return True
    import torch
    return CUDA_HOME is not None and torch.version.cuda is not None


def _openmp_flags() -> list[str]:
    """-fopenmp (GCC on Linux) when torch parallelises with OpenMP: ``at::parallel_for`` is a
    header template that runs serially in code compiled without it."""
    import torch
    openmp = "parallel backend: OpenMP" in torch.__config__.parallel_info()
    return ["-fopenmp"] if openmp and sys.platform.startswith("linux") else []


def _extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # The CPU kernels are plain loops the compiler vectorises (`omp simd` marks the reductions):
    # for this machine's instruction set unless FGKERNELS_PORTABLE=1 (a build to run elsewhere).
    # 256-bit vectors: wider ones lose on the short per-channel planes of small feature maps.
    portable = os.environ.get("FGKERNELS_PORTABLE") == "1" or not sys.platform.startswith("linux")
    arch = [] if portable else ["-march=native", "-mprefer-vector-width=256"]
    openmp = _openmp_flags()
    cxx = ["-O3", "-fopenmp-simd", *arch, *openmp]
    if _use_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        return CUDAExtension("fgkernels._C", sources, define_macros=[("FGK_WITH_CUDA", None)],
                             extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
                             extra_link_args=openmp, py_limited_api=False)
    return CppExtension("fgkernels._C", sources, extra_compile_args={"cxx": cxx},
                        extra_link_args=openmp)


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExtension})

"""Builds fgkernels._C: a CppExtension from csrc/*.cpp and csrc/cpu/*.cpp, and a CUDAExtension
adding csrc/cuda/* when a CUDA toolkit and a CUDA build of torch are present (or FORCE_CUDA=1).
MAX_JOBS bounds the parallel compile jobs, as torch.utils.cpp_extension reads it."""
import glob
import os

from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension


def _use_cuda() -> bool:
    if os.environ.get("FORCE_CUDA") == "1":
        return True
    import torch
    return CUDA_HOME is not None and torch.version.cuda is not None


def _extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3"]
    if _use_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
        return CUDAExtension("fgkernels._C", sources, define_macros=[("FGK_WITH_CUDA", None)],
                             extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
                             py_limited_api=False)
    return CppExtension("fgkernels._C", sources, extra_compile_args={"cxx": cxx})


setup(ext_modules=[_extension()], cmdclass={"build_ext": BuildExtension})

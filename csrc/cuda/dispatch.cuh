// Element-type dispatch shared by the CUDA launchers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "dual_kernels.h"

namespace fgkernels {
namespace cuda {

// Returns f(T{}) for the element type T that dtype names (cudaErrorInvalidValue for none).
template <typename F>
int dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat: return f(float{});
    case DType::kDouble: return f(double{});
    case DType::kBFloat16: return f(__nv_bfloat16{});
    case DType::kHalf: return f(__half{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace fgkernels

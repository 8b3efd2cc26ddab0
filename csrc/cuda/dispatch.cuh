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

// Returns f(P{}, T{}) for the primal element type P and tangent element type T that the two
// dtypes name: T is P, or a floating type of fewer bits (cudaErrorInvalidValue otherwise).
template <typename F>
int dispatch_dual(DType primal, DType tangent, F&& f) {
  return dispatch_dtype(primal, [&](auto p) {
    using P = decltype(p);
    if (tangent == primal) return f(p, p);
    if constexpr (sizeof(P) > 2) {
      if (tangent == DType::kBFloat16) return f(p, __nv_bfloat16{});
      if (tangent == DType::kHalf) return f(p, __half{});
    }
    if constexpr (sizeof(P) > 4) {
      if (tangent == DType::kFloat) return f(p, float{});
    }
    return static_cast<int>(cudaErrorInvalidValue);
  });
}

}  // namespace cuda
}  // namespace fgkernels

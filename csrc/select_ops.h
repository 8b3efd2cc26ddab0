// The rules of the dual select ops, y = f(x) with a slope of 1 or 0 (ReLU, hardtanh): one struct
// each, the same for the CPU kernels (csrc/cpu/select_op.h) and the CUDA ones
// (csrc/cuda/select_op.cuh), over the primal's element type T:
//   primal(x) = f(x),   keep(x) = whether a tangent passes (f' = 1), else the slot is 0.
// Comparisons are made in wide(x): float for the 16-bit types (c10's on the CPU, CUDA's on the
// device), T itself otherwise. A NaN fails every comparison: it stays in the primal (as
// torch.relu and torch.clamp keep it) and keeps its tangent (as their derivatives do).
#pragma once

#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <utility>

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace fgkernels {

template <typename T>
C10_HOST_DEVICE inline T wide(T v) { return v; }
inline float wide(c10::BFloat16 v) { return static_cast<float>(v); }
inline float wide(c10::Half v) { return static_cast<float>(v); }
#ifdef __CUDACC__
__device__ inline float wide(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ inline float wide(__half v) { return __half2float(v); }
#endif
template <typename T>
using wide_t = decltype(wide(std::declval<T>()));

// y = max(x, 0); the tangent passes where x > 0 or x is NaN (!(x <= 0)).
template <typename T>
struct Relu {
  using scalar_t = T;
  C10_HOST_DEVICE bool keep(T x) const { return !(wide(x) <= 0); }
  C10_HOST_DEVICE T primal(T x) const { return keep(x) ? x : T{}; }
};

// y = clamp(x, lo, hi) (lo <= hi, in T); the tangent passes strictly inside the bounds and
// where x is NaN: torch's hardtanh_backward as its scalar loop defines it, which compares in
// wide(x) with the bounds in that type (lo_wide, hi_wide: a bound a 16-bit type cannot hold,
// 0.1 in bfloat16, is not rounded to it first).
inline void check_hardtanh_bounds(double min_val, double max_val) {
  TORCH_CHECK(min_val <= max_val, "dual_hardtanh: min_val (", min_val,
              ") must not be greater than max_val (", max_val, ")");
}

template <typename T>
struct Hardtanh {
  using scalar_t = T;
  T lo, hi;
  wide_t<T> lo_wide, hi_wide;
  C10_HOST_DEVICE bool keep(T x) const { return !(wide(x) <= lo_wide || wide(x) >= hi_wide); }
  C10_HOST_DEVICE T primal(T x) const {
    return wide(x) < wide(lo) ? lo : (wide(x) > wide(hi) ? hi : x);
  }
};

}  // namespace fgkernels

// Dual hardtanh on CUDA: y = clamp(x, min_val, max_val), yt = xt strictly inside the bounds and
// where x is NaN, else 0 (csrc/cpu/dual_hardtanh.cpp).
#include <torch/library.h>

#include "select_op.cuh"

namespace fgkernels {
namespace {

// A NaN fails every comparison: it stays in the primal and keeps its tangent.
template <typename T>
struct Hardtanh {
  using scalar_t = T;
  T lo, hi;
  __device__ bool keep(T x) const {
    return !(cuda::wide(x) <= cuda::wide(lo) || cuda::wide(x) >= cuda::wide(hi));
  }
  __device__ T primal(T x) const {
    return cuda::wide(x) < cuda::wide(lo) ? lo : (cuda::wide(x) > cuda::wide(hi) ? hi : x);
  }
};

std::tuple<at::Tensor, at::Tensor> dual_hardtanh_cuda(const at::Tensor& x, const at::Tensor& xt,
                                                      double min_val, double max_val) {
  TORCH_CHECK(min_val <= max_val, "dual_hardtanh: min_val (", min_val,
              ") must not be greater than max_val (", max_val, ")");
  return dual_select_cuda<Hardtanh>(x, xt, "dual_hardtanh", [&](auto p) {
    using T = decltype(p);
    return Hardtanh<T>{cuda::narrow<T>(min_val), cuda::narrow<T>(max_val)};
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(fgkernels, CUDA, m) { m.impl("dual_hardtanh", &dual_hardtanh_cuda); }

}  // namespace fgkernels
